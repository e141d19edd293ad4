//! Rebuilding projections from position 1 in passes over the log (what a reset projection, a new
//! ledger opened on a grown store, or `touchledger rebuild` runs).
//!
//! Key decisions:
//! * The incremental fold loads a customer's state from its tree, folds a batch and writes it
//!   back. On a store of millions of events and a million customers that is a load and a write
//!   per customer and commit, against trees far larger than sled's cache: the rebuild of issue
//!   #10's 10.9 M-event store did not finish in 30 minutes. A rebuild from scratch needs neither:
//!   every state starts empty, so it is folded entirely in memory and written **once**.
//! * Memory is bounded by splitting the customers into `passes` shards by a hash of their id
//!   (about [`PASS_EVENTS`] events' facts per pass): each pass reads the whole log and folds only
//!   its shard's customers. Reading the log again is cheap next to a write per customer per
//!   commit: a pass reads raw records (format 2: about 20 M/s), peeks each one's kind and
//!   customer without decoding, and decodes only its own shard's.
//! * A shard's states are written sorted by key, in batches, **without** a checkpoint: the
//!   checkpoint is removed first ([`touchledger_store::ProjectionTree::clear_checkpoint`]) and written last, so a
//!   crash half-way leaves a tree without a checkpoint, which the projector treats as "rebuild
//!   from scratch" on open, never as a partial state beside a checkpoint.
//! * While a rebuild runs, readers of the trees see the shards written so far and no
//!   checkpoint (`serve` runs it at start-up with `/readyz` not ready, and its reads fall back
//!   to full passes over what is there): a customer of a later shard is "not found" until its
//!   pass is written. The incremental catch-up showed a consistent prefix of the log instead, at
//!   a cost that did not finish at a million customers.
//! * The states are exactly those of the incremental fold (the same `CustomerFacts::apply` per
//!   event, per customer in position order, and only changed states are written): a test
//!   compares both byte for byte.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use touchledger_domain::EventKind;
use touchledger_domain::facts::{Applied, CustomerFacts};
use touchledger_store::{EventStore, ProjectionMeta};

use crate::{Projector, ProjectorError, encode};

/// Events' worth of facts folded in memory per pass. At a million customers and 10.9 M events
/// (11 passes) `touchledger rebuild` peaked at 2.6 GB RSS, most of it sled's (BENCHMARKS.md).
pub const PASS_EVENTS: u64 = 1_000_000;

/// States written per sled batch.
const WRITE_BATCH: usize = 10_000;

/// The shard of `customer` among `passes` (a hash independent of the partition function, so
/// that a partition's customers spread evenly over the passes).
fn shard(customer: &str, passes: u64) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(customer) % passes
}

/// What a rebuild did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rebuilt {
    /// The position every projector reached (the head when the rebuild started).
    pub head: u64,
    /// Passes over the log.
    pub passes: u64,
    /// States written, over all projectors.
    pub states: u64,
}

/// Fold positions `1..=head` into `projectors`, which must be empty (checkpoint 0: new or
/// reset), in passes of about `pass_events` events, and commit them at the head.
pub fn rebuild(
    store: &dyn EventStore,
    projectors: &mut [&mut Projector],
    pass_events: u64,
) -> Result<Rebuilt, ProjectorError> {
    let head = store.head().position;
    if let Some(p) = projectors
        .iter()
        .find(|p| p.checkpoint != 0 || p.folded != 0)
    {
        return Err(ProjectorError::Task(format!(
            "bulk rebuild of projection {} at checkpoint {}: only an empty projection can be rebuilt in passes",
            p.spec.name, p.checkpoint
        )));
    }
    let passes = head.div_ceil(pass_events.max(1)).max(1);
    let mut states = 0u64;
    if projectors.is_empty() || head == 0 {
        return Ok(Rebuilt {
            head,
            passes: 0,
            states,
        });
    }
    for p in projectors.iter() {
        p.tree.clear_checkpoint()?;
    }
    for pass in 0..passes {
        let mut folded: Vec<HashMap<String, (CustomerFacts, bool)>> =
            projectors.iter().map(|_| HashMap::new()).collect();
        let mut expected = 1;
        for raw in store.read_raw(1, Some(head)) {
            let raw = raw?;
            if raw.position != expected {
                return Err(ProjectorError::Gap {
                    projection: projectors[0].spec.name,
                    expected,
                    got: raw.position,
                });
            }
            expected += 1;
            // Kind and customer without decoding: a pass decodes only its shard's records
            // and those some projection keeps. A record that cannot be peeked is decoded, so
            // that its corruption is reported, never skipped.
            if let Some((kind, id)) = raw.peek() {
                let wanted = kind == EventKind::Retraction
                    || projectors.iter().any(|p| p.spec.kinds.contains(kind));
                if !wanted || (passes > 1 && shard(id, passes) != pass) {
                    continue;
                }
            }
            let c = raw.decode()?;
            let id = c.event.customer_id.as_str();
            if passes > 1 && shard(id, passes) != pass {
                continue;
            }
            let kind = c.event.kind();
            for (p, map) in projectors.iter().zip(folded.iter_mut()) {
                if !p.spec.kinds.contains(kind) && kind != EventKind::Retraction {
                    continue;
                }
                let entry = match map.get_mut(id) {
                    Some(e) => e,
                    None => map.entry(id.to_owned()).or_default(),
                };
                if entry
                    .0
                    .apply(&c.event, c.position, c.recorded_at, p.spec.kinds)
                    != Applied::Ignored
                {
                    entry.1 = true;
                }
            }
        }
        if expected <= head {
            // The store returned fewer records than positions: a gap at its end.
            return Err(ProjectorError::Gap {
                projection: projectors[0].spec.name,
                expected,
                got: head + 1,
            });
        }
        for (p, map) in projectors.iter().zip(folded) {
            let mut changed: Vec<(String, CustomerFacts)> = map
                .into_iter()
                .filter(|(_, (_, changed))| *changed)
                .map(|(k, (f, _))| (k, f))
                .collect();
            changed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for chunk in changed.chunks(WRITE_BATCH) {
                let encoded: Vec<(&str, Vec<u8>)> =
                    chunk.iter().map(|(k, f)| (k.as_str(), encode(f))).collect();
                p.tree.apply(
                    encoded.iter().map(|(k, v)| (*k, v.as_slice())),
                    std::iter::empty(),
                    None,
                )?;
            }
            states += changed.len() as u64;
        }
        tracing::info!(pass = pass + 1, passes, states, "bulk rebuild pass done");
    }
    for p in projectors.iter_mut() {
        p.tree.commit(
            std::iter::empty(),
            ProjectionMeta {
                version: p.spec.version,
                checkpoint: head,
            },
        )?;
        p.tree.flush()?;
        p.checkpoint = head;
        p.folded = head;
    }
    Ok(Rebuilt {
        head,
        passes,
        states,
    })
}
