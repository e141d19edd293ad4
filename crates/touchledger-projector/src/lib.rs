//! The projector runtime: folds the committed log into the three read models (satisfaction,
//! loyalty, churn warning) and serves reads of them at any `as_of`.
//!
//! Key decisions:
//! * A projection's state is per-customer [`CustomerFacts`] (see `touchledger_domain::facts`):
//!   scores are evaluated at read time from the facts, at an explicit `as_of`, on either time
//!   axis. The fold itself is therefore trivial, exact and order-independent, and a rebuild gives
//!   byte-identical state.
//! * Each projection has its own sled tree, and each batch's states and checkpoint are one
//!   atomic sled batch ([`touchledger_store::ProjectionTree::commit`]); positions must arrive
//!   gapless, positions at or below the checkpoint are skipped. So a crash at any instant,
//!   or a redelivery by a remote feed, never loses or double-counts an event.
//! * A projection whose stored version differs from the code's [`Spec::version`] (or whose
//!   checkpoint is missing) is reset and rebuilt on open, automatically.
//! * State is encoded with bincode 2.0.1 (pinned; its format is frozen). That is sound here
//!   only because projection state can always be rebuilt from the log.

use std::collections::BTreeMap;

use touchledger_domain::EventKind;
use touchledger_domain::facts::{Applied, CustomerFacts, KindSet};
use touchledger_store::{Committed, ProjectionMeta, ProjectionTree, StoreError};

pub mod api;
pub mod bulk;
pub mod current;
pub mod evaluate;
pub mod model;
pub mod monthend;
pub mod order;
pub mod partial;
pub mod plots;
pub mod read;
mod runtime;

pub use current::Current;
pub use read::ReadModels;
pub use runtime::{Change, RunConfig, run_in_process};

/// A projection: its name (the tree and the subject token), its fold version and the kinds
/// it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    /// `satisfaction`, `loyalty` or `churn`.
    pub name: &'static str,
    /// Bump when the facts kept (or their encoding) change: the state is then rebuilt.
    pub version: u32,
    /// The kinds folded (retractions always apply).
    pub kinds: KindSet,
}

/// Satisfaction: complaints, callbacks and surveys.
pub const SATISFACTION: Spec = Spec {
    name: "satisfaction",
    version: 1,
    kinds: KindSet::of(&[EventKind::Complaint, EventKind::Callback, EventKind::Survey]),
};

/// Loyalty: purchases and surveys.
pub const LOYALTY: Spec = Spec {
    name: "loyalty",
    version: 1,
    kinds: KindSet::of(&[EventKind::Purchase, EventKind::Survey]),
};

/// Churn warning: everything, including model fits and past assessments (version 2: a kept
/// fit carries its spend model).
pub const CHURN: Spec = Spec {
    name: "churn",
    version: 2,
    kinds: KindSet::ALL,
};

/// The three projections.
pub const ALL: [Spec; 3] = [SATISFACTION, LOYALTY, CHURN];

/// Why a projector failed.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// The store failed; retry later (the state is consistent with its checkpoint).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored state could not be decoded: run `touchledger rebuild`.
    #[error(
        "projection {projection}: state of {key:?} is undecodable ({detail}); run `touchledger rebuild`"
    )]
    Decode {
        /// The projection.
        projection: &'static str,
        /// The customer.
        key: String,
        /// The decoder's message.
        detail: String,
    },
    /// Positions arrived with a gap (a feed problem): nothing of the batch was applied.
    #[error("projection {projection}: expected position {expected}, got {got}")]
    Gap {
        /// The projection.
        projection: &'static str,
        /// Checkpoint + 1.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// The projector task stopped unexpectedly.
    #[error("projector task failed: {0}")]
    Task(String),
}

/// Encode a state (bincode 2, standard configuration).
pub fn encode(facts: &CustomerFacts) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    bincode::serde::encode_to_vec(facts, bincode::config::standard()).unwrap_or_default()
}

/// Decode a state.
pub fn decode(bytes: &[u8]) -> Result<CustomerFacts, String> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(f, _)| f)
        .map_err(|e| e.to_string())
}

/// How a projector came up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// Resuming after the checkpoint.
    Resumed {
        /// The checkpoint.
        checkpoint: u64,
    },
    /// The state was reset and will be rebuilt from position 1.
    Reset {
        /// Why: `new`, or `version 1 -> 2`.
        reason: String,
    },
}

/// One projection's fold over its tree.
///
/// Folding and committing are separate steps: [`Projector::fold`] updates states in memory
/// (loading each customer once), [`Projector::commit`] writes the changed states and the new
/// checkpoint in one atomic batch. The live loop commits every batch (views are read from the
/// tree); a catch-up commits every [`CATCH_UP_COMMIT_CUSTOMERS`] customers, so a customer with
/// many events is written once per commit, not once per event.
#[derive(Debug)]
pub struct Projector {
    spec: Spec,
    tree: ProjectionTree,
    /// Last position committed to the tree.
    checkpoint: u64,
    /// Last position folded (in memory).
    folded: u64,
    /// States folded but not committed: customer → (state, changed).
    dirty: BTreeMap<String, (CustomerFacts, bool)>,
}

/// A catch-up commits when this many customers' states are held in memory (bounds memory).
pub const CATCH_UP_COMMIT_CUSTOMERS: usize = 50_000;

impl Projector {
    /// Open a projector on `tree`, resetting it when its version differs from `spec.version`
    /// or its checkpoint is missing.
    pub fn open(spec: Spec, tree: ProjectionTree) -> Result<(Projector, Opened), ProjectorError> {
        let opened = match tree.meta()? {
            Some(m) if m.version == spec.version => Opened::Resumed {
                checkpoint: m.checkpoint,
            },
            Some(m) => {
                tree.reset(spec.version)?;
                Opened::Reset {
                    reason: format!("version {} -> {}", m.version, spec.version),
                }
            }
            None => {
                tree.reset(spec.version)?;
                Opened::Reset {
                    reason: "new".into(),
                }
            }
        };
        let checkpoint = match opened {
            Opened::Resumed { checkpoint } => checkpoint,
            Opened::Reset { .. } => 0,
        };
        Ok((
            Projector {
                spec,
                tree,
                checkpoint,
                folded: checkpoint,
                dirty: BTreeMap::new(),
            },
            opened,
        ))
    }

    /// The projection.
    pub fn spec(&self) -> Spec {
        self.spec
    }

    /// The last position committed (what a restart resumes after).
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// The last position folded (committed or not).
    pub fn position(&self) -> u64 {
        self.folded
    }

    /// Customers whose folded state is not committed yet.
    pub fn pending(&self) -> usize {
        self.dirty.len()
    }

    /// The state tree.
    pub fn tree(&self) -> &ProjectionTree {
        &self.tree
    }

    /// Reset the state and checkpoint (a rebuild then folds from position 1).
    pub fn reset(&mut self) -> Result<(), ProjectorError> {
        self.tree.reset(self.spec.version)?;
        self.checkpoint = 0;
        self.folded = 0;
        self.dirty.clear();
        Ok(())
    }

    /// A customer's state (empty if none), including what is folded but not committed.
    pub fn load(&self, customer: &str) -> Result<CustomerFacts, ProjectorError> {
        match self.dirty.get(customer) {
            Some((f, _)) => Ok(f.clone()),
            None => load(&self.tree, self.spec.name, customer),
        }
    }

    /// Fold `batch` (committed events in position order) and commit: see [`Projector::fold`]
    /// and [`Projector::commit`]. Returns the customers whose state changed.
    pub fn apply(&mut self, batch: &[Committed]) -> Result<Vec<String>, ProjectorError> {
        self.fold(batch)?;
        self.commit()
    }

    /// Fold `batch` into memory: events at or below the folded position are skipped, the rest
    /// must continue it without a gap (otherwise nothing of the batch is folded).
    pub fn fold(&mut self, batch: &[Committed]) -> Result<(), ProjectorError> {
        let mut expected = self.folded + 1;
        for c in batch {
            if c.position > expected {
                return Err(ProjectorError::Gap {
                    projection: self.spec.name,
                    expected,
                    got: c.position,
                });
            }
            expected = expected.max(c.position + 1);
        }
        for c in batch {
            if c.position <= self.folded {
                continue;
            }
            self.folded = c.position;
            let kind = c.event.kind();
            if !self.spec.kinds.contains(kind) && kind != EventKind::Retraction {
                continue;
            }
            let id = c.event.customer_id.as_str();
            if !self.dirty.contains_key(id) {
                let state = load(&self.tree, self.spec.name, id)?;
                self.dirty.insert(id.to_owned(), (state, false));
            }
            if let Some(entry) = self.dirty.get_mut(id)
                && entry
                    .0
                    .apply(&c.event, c.position, c.recorded_at, self.spec.kinds)
                    != Applied::Ignored
            {
                entry.1 = true;
            }
        }
        Ok(())
    }

    /// Write the changed states and the folded position as the new checkpoint, atomically.
    /// Returns the customers whose state changed.
    pub fn commit(&mut self) -> Result<Vec<String>, ProjectorError> {
        if self.folded == self.checkpoint {
            return Ok(Vec::new());
        }
        let dirty = std::mem::take(&mut self.dirty);
        let encoded: Vec<(String, Vec<u8>)> = dirty
            .into_iter()
            .filter(|(_, (_, changed))| *changed)
            .map(|(k, (f, _))| {
                let bytes = encode(&f);
                (k, bytes)
            })
            .collect();
        self.tree.commit(
            encoded.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
            ProjectionMeta {
                version: self.spec.version,
                checkpoint: self.folded,
            },
        )?;
        self.checkpoint = self.folded;
        Ok(encoded.into_iter().map(|(k, _)| k).collect())
    }
}

pub(crate) fn load(
    tree: &ProjectionTree,
    projection: &'static str,
    customer: &str,
) -> Result<CustomerFacts, ProjectorError> {
    match tree.get(customer)? {
        None => Ok(CustomerFacts::default()),
        Some(b) => decode(&b).map_err(|detail| ProjectorError::Decode {
            projection,
            key: customer.to_owned(),
            detail,
        }),
    }
}

/// Open the three projectors on the ledger's database.
pub fn open_all(
    store: &touchledger_store::SledStore,
) -> Result<Vec<(Projector, Opened)>, ProjectorError> {
    ALL.iter()
        .map(|s| Projector::open(*s, store.projection(s.name)?))
        .collect()
}

/// Fold the whole log (from the projectors' positions to the head) synchronously. Empty
/// projectors (new or reset) are rebuilt in passes ([`bulk::rebuild`]); the others read `batch`
/// events at a time and commit whenever [`CATCH_UP_COMMIT_CUSTOMERS`] states are held, and at
/// the end (then flushed). Returns the number of events folded (per position, not per
/// projection).
pub fn catch_up(
    store: &dyn touchledger_store::EventStore,
    projectors: &mut [Projector],
    batch: u64,
) -> Result<u64, ProjectorError> {
    let Some(start) = projectors.iter().map(|p| p.folded).min() else {
        return Ok(0);
    };
    let mut empty: Vec<&mut Projector> = projectors
        .iter_mut()
        .filter(|p| p.checkpoint == 0 && p.folded == 0)
        .collect();
    if !empty.is_empty() {
        bulk::rebuild(store, &mut empty, bulk::PASS_EVENTS)?;
    }
    let head = store.head().position;
    loop {
        let from = projectors
            .iter()
            .map(|p| p.position())
            .min()
            .unwrap_or(head)
            + 1;
        if from > head {
            break;
        }
        let to = head.min(from + batch.max(1) - 1);
        let events = read_range(store, from, to)?;
        for p in projectors.iter_mut() {
            p.fold(&events)?;
            if p.pending() >= CATCH_UP_COMMIT_CUSTOMERS {
                p.commit()?;
            }
        }
    }
    for p in projectors.iter_mut() {
        p.commit()?;
        p.tree().flush()?;
    }
    Ok(head.saturating_sub(start))
}

/// Committed events at positions `from..=to`.
pub fn read_range(
    store: &dyn touchledger_store::EventStore,
    from: u64,
    to: u64,
) -> Result<Vec<Committed>, ProjectorError> {
    Ok(store
        .read(&touchledger_store::ReadFilter {
            from_position: from,
            to_position: Some(to),
            ..Default::default()
        })
        .collect::<Result<Vec<_>, _>>()?)
}
