//! `verify`: recompute the hash chain and cross-check every index, in bounded memory.
//!
//! Pass 1 walks the blocks and their records in position order: blocks gapless and well formed,
//! each block's `occurred_at` zone map equal to its records' range, record position = slot,
//! `prev_hash` = previous hash, hash = BLAKE3(prev ‖ bytes), `recorded_at` non-decreasing, the
//! event decodes, its event-id entry points back at it with the content digest taken at append,
//! its kind entry is the next one of that kind (a merge-join against the kind runs), and — at or
//! below the customer-index watermark — its customer run holds its position at its version;
//! stored checkpoints are merge-joined against the chain. Pass 2 checks that the indexes hold
//! nothing else: leftover kind entries, an event-id index larger than the log, and a customer
//! index whose runs are not gapless from version 1 or do not add up to the watermark.

use std::fmt;

use prost::Message;
use touchledger_proto::{encode_event, v1};

use touchledger_domain::{EventKind, Timestamp};

use crate::layout::{self, HASH_LEN};
use crate::sled_store::{
    BlockScan, chain_hash, customer_watermark, decode_committed, durable_customer_version,
};
use crate::{Hash, Head, StoreError};

/// The result of `verify`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyReport {
    /// Everything checked out.
    Ok {
        /// Number of events.
        events: u64,
        /// The head.
        head: Head,
        /// Checkpoints checked.
        checkpoints: u64,
        /// Distinct customers.
        customers: u64,
    },
    /// The first problem found.
    Failed {
        /// The first bad position (for index problems: the position the entry concerns).
        position: u64,
        /// What is wrong.
        problem: VerifyProblem,
    },
}

impl VerifyReport {
    /// True when the ledger verified.
    pub fn is_ok(&self) -> bool {
        matches!(self, VerifyReport::Ok { .. })
    }
}

/// What `verify` found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyProblem {
    /// A position is missing (the chain has a gap).
    Gap,
    /// The record cannot be decoded.
    Undecodable(String),
    /// The record's own position field differs from its key.
    PositionMismatch(u64),
    /// `prev_hash` is not the previous record's hash.
    BrokenLink,
    /// The stored hash is not BLAKE3(prev_hash ‖ record bytes): the record was altered.
    HashMismatch,
    /// The event differs from the content digest recorded when it was appended: the record
    /// was rewritten (and its hash recomputed).
    ContentMismatch,
    /// `recorded_at` went backwards.
    TimeWentBackwards,
    /// An index entry for this record is missing or points elsewhere.
    Index(String),
    /// A stored checkpoint disagrees with the chain.
    Checkpoint(String),
    /// A customer's versions are not gapless from 1.
    CustomerVersions(String),
}

impl fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyProblem::Gap => f.write_str("position missing (gap in the chain)"),
            VerifyProblem::Undecodable(e) => write!(f, "record cannot be decoded: {e}"),
            VerifyProblem::PositionMismatch(p) => write!(f, "record says it is position {p}"),
            VerifyProblem::BrokenLink => {
                f.write_str("prev_hash does not match the previous record's hash")
            }
            VerifyProblem::HashMismatch => {
                f.write_str("hash does not match BLAKE3(prev_hash ‖ record): record altered")
            }
            VerifyProblem::ContentMismatch => {
                f.write_str("event differs from the digest recorded at append: record rewritten")
            }
            VerifyProblem::TimeWentBackwards => {
                f.write_str("recorded_at is earlier than the previous record's")
            }
            VerifyProblem::Index(s) => write!(f, "index: {s}"),
            VerifyProblem::Checkpoint(s) => write!(f, "checkpoint: {s}"),
            VerifyProblem::CustomerVersions(s) => write!(f, "customer versions: {s}"),
        }
    }
}

fn failed(position: u64, problem: VerifyProblem) -> Result<VerifyReport, StoreError> {
    Ok(VerifyReport::Failed { position, problem })
}

/// One kind's index runs as a stream of positions.
struct KindCursor {
    runs: sled::Iter,
    current: Option<(sled::IVec, usize)>,
}

impl KindCursor {
    fn next(&mut self) -> Result<Option<u64>, StoreError> {
        loop {
            if let Some((v, i)) = &mut self.current
                && *i + 8 <= v.len()
            {
                let p = layout::read_u64(&v[*i..]);
                *i += 8;
                return Ok(p);
            }
            match self.runs.next() {
                None => return Ok(None),
                Some(kv) => {
                    let (_, v) = kv?;
                    if !v.len().is_multiple_of(8) {
                        return Err(StoreError::corrupt(
                            "kind index run",
                            "length is not a multiple of 8",
                        ));
                    }
                    self.current = Some((v, 0));
                }
            }
        }
    }
}

pub(crate) fn verify(tree: &sled::Tree) -> Result<VerifyReport, StoreError> {
    let mut prev = Hash::ZERO;
    let mut prev_recorded = touchledger_domain::Timestamp::from_unix_nanos(i64::MIN);
    let mut expected = 1u64;
    let mut checkpoints = tree.scan_prefix([layout::CHECKPOINT]).peekable();
    let mut checked_checkpoints = 0u64;
    let mut customers = 0u64;
    let watermark = customer_watermark(tree)?;
    // Customers' last versions above the watermark (at most one index interval of records).
    let mut above: std::collections::HashMap<String, u64> = Default::default();
    let mut kinds: Vec<KindCursor> = EventKind::ALL
        .iter()
        .map(|k| KindCursor {
            runs: tree.scan_prefix([layout::KIND, k.code()]),
            current: None,
        })
        .collect();

    let mut blocks = BlockScan::all(tree);
    while let Some(kv) = blocks.next_block() {
        let (first, value) = kv?;
        if first != expected {
            return failed(expected, VerifyProblem::Gap);
        }
        let view = match layout::BlockView::parse(&value) {
            Ok(b) => b,
            Err(e) => return failed(first, VerifyProblem::Undecodable(e.to_string())),
        };
        let mut zone: Option<(Timestamp, Timestamp)> = None;
        for (i, (stored_hash, bytes)) in view.entries().enumerate() {
            let pos = first + i as u64;
            // The hash is checked first, on the exact stored bytes: any alteration shows up as
            // a hash mismatch at this position, whatever else it breaks.
            let raw = match v1::StoredRecord::decode(bytes) {
                Ok(r) => r,
                Err(e) => {
                    return failed(
                        pos,
                        if chain_hash(&prev, bytes).0 != stored_hash {
                            VerifyProblem::HashMismatch
                        } else {
                            VerifyProblem::Undecodable(e.to_string())
                        },
                    );
                }
            };
            if raw.prev_hash != prev.0 {
                return failed(pos, VerifyProblem::BrokenLink);
            }
            if chain_hash(&prev, bytes).0 != stored_hash {
                return failed(pos, VerifyProblem::HashMismatch);
            }
            if raw.position != pos {
                return failed(pos, VerifyProblem::PositionMismatch(raw.position));
            }
            let mut entry = Vec::with_capacity(HASH_LEN + bytes.len());
            entry.extend_from_slice(stored_hash);
            entry.extend_from_slice(bytes);
            let c = match decode_committed(pos, &entry) {
                Ok(c) => c,
                Err(e) => return failed(pos, VerifyProblem::Undecodable(e.to_string())),
            };
            if c.recorded_at < prev_recorded {
                return failed(pos, VerifyProblem::TimeWentBackwards);
            }
            let e = &c.event;
            match tree.get(layout::event_id_key(&e.event_id))? {
                Some(iv) if layout::read_u64(&iv) == Some(pos) => {
                    // The digest was taken at append, before the record existed: a record
                    // rewritten later — even with its hash recomputed — no longer matches it.
                    if iv.get(8..) != Some(blake3::hash(&encode_event(e)).as_bytes().as_slice()) {
                        return failed(pos, VerifyProblem::ContentMismatch);
                    }
                }
                _ => {
                    return failed(
                        pos,
                        VerifyProblem::Index(format!(
                            "event id entry {:?} missing or wrong",
                            e.event_id
                        )),
                    );
                }
            }
            let k = EventKind::ALL
                .iter()
                .position(|k| *k == e.kind())
                .unwrap_or(0);
            if kinds[k].next()? != Some(pos) {
                return failed(
                    pos,
                    VerifyProblem::Index(format!("kind entry {} missing", e.kind())),
                );
            }
            if pos <= watermark
                && customer_entry(tree, &e.customer_id, c.customer_version)? != Some(pos)
            {
                return failed(
                    pos,
                    VerifyProblem::Index(format!(
                        "customer entry ({}, v{}) missing or wrong",
                        e.customer_id, c.customer_version
                    )),
                );
            }
            if pos > watermark {
                // Above the watermark the index lives only in memory, rebuilt from these
                // versions on open: they must continue the durable runs without a gap.
                let want = match above.get(&e.customer_id) {
                    Some(v) => v + 1,
                    None => durable_customer_version(tree, &e.customer_id)? + 1,
                };
                if c.customer_version != want {
                    return failed(
                        pos,
                        VerifyProblem::CustomerVersions(format!(
                            "customer {} has version {} where {want} was expected",
                            e.customer_id, c.customer_version
                        )),
                    );
                }
                above.insert(e.customer_id.clone(), c.customer_version);
            }
            if c.customer_version == 1 {
                customers += 1;
            }
            zone = Some(match zone {
                None => (e.occurred_at, e.occurred_at),
                Some((lo, hi)) => (lo.min(e.occurred_at), hi.max(e.occurred_at)),
            });
            while let Some(Ok((ck, _))) = checkpoints.peek() {
                let cpos = layout::trailing_u64(ck).unwrap_or(0);
                if cpos > pos {
                    break;
                }
                let (_, cv) = checkpoints.next().transpose()?.unwrap_or_default();
                if cpos < pos {
                    return failed(
                        cpos,
                        VerifyProblem::Checkpoint("for a position that does not exist".into()),
                    );
                }
                let ok = v1::Checkpoint::decode(cv.as_ref())
                    .map(|cp| cp.position == pos && cp.hash == c.hash.0)
                    .unwrap_or(false);
                if !ok {
                    return failed(
                        pos,
                        VerifyProblem::Checkpoint("hash differs from the chain".into()),
                    );
                }
                checked_checkpoints += 1;
            }
            prev = c.hash;
            prev_recorded = c.recorded_at;
            expected += 1;
        }
        // A zone map narrower than its records would make time-filtered reads skip them.
        if zone != Some((view.min_occurred(), view.max_occurred())) {
            return failed(
                first,
                VerifyProblem::Index("block occurred_at range differs from its records".into()),
            );
        }
    }
    let events = expected - 1;
    if let Some(kv) = checkpoints.next() {
        let (ck, _) = kv?;
        let cpos = layout::trailing_u64(&ck).unwrap_or(0);
        return failed(cpos, VerifyProblem::Checkpoint("beyond the head".into()));
    }

    // Pass 2: the indexes hold nothing else.
    for (kind, cursor) in EventKind::ALL.iter().zip(&mut kinds) {
        if let Some(p) = cursor.next()? {
            return failed(
                p,
                VerifyProblem::Index(format!("kind index has an extra {kind} entry")),
            );
        }
    }
    let ids = tree.scan_prefix([layout::EVENT_ID]).count() as u64;
    if ids != events {
        return failed(
            events,
            VerifyProblem::Index(format!(
                "event id index has {ids} entries for {events} events"
            )),
        );
    }
    if watermark > events {
        return failed(
            events,
            VerifyProblem::Index(format!(
                "customer-index watermark {watermark} is beyond the head {events}"
            )),
        );
    }
    let mut entries = 0u64;
    let mut last: Option<(Vec<u8>, u64, u64)> = None;
    for kv in tree.scan_prefix([layout::CUSTOMER]) {
        let (k, v) = kv?;
        let pos = layout::read_u64(&v).unwrap_or(0);
        let Some((cust, first)) = layout::parse_customer_key(&k) else {
            return failed(pos, VerifyProblem::Index("malformed customer key".into()));
        };
        let n = (v.len() / 8) as u64;
        if n == 0 || !v.len().is_multiple_of(8) {
            return failed(pos, VerifyProblem::Index("malformed customer run".into()));
        }
        let (want, mut after) = match &last {
            Some((c, next, after)) if c.as_slice() == cust => (*next, *after),
            _ => (1, 0),
        };
        // Reads stop at the first position past their range, so positions must ascend.
        for p in layout::decode_positions(&v).into_iter().flatten() {
            if p <= after || p > watermark {
                return failed(
                    p,
                    VerifyProblem::Index(format!(
                        "customer {} run has position {p} out of order or above the watermark",
                        String::from_utf8_lossy(cust)
                    )),
                );
            }
            after = p;
        }
        if first != want {
            return failed(
                pos,
                VerifyProblem::CustomerVersions(format!(
                    "customer {} has version {first} where {want} was expected",
                    String::from_utf8_lossy(cust)
                )),
            );
        }
        entries += n;
        last = Some((cust.to_vec(), first + n, after));
    }
    if entries != watermark {
        return failed(
            watermark,
            VerifyProblem::Index(format!(
                "customer index has {entries} entries for the {watermark} events up to its watermark"
            )),
        );
    }
    let head = Head {
        position: events,
        hash: prev,
        recorded_at: if events == 0 {
            Default::default()
        } else {
            prev_recorded
        },
    };
    Ok(VerifyReport::Ok {
        events,
        head,
        checkpoints: checked_checkpoints,
        customers,
    })
}

/// The position the durable customer index gives for (customer, version).
fn customer_entry(
    tree: &sled::Tree,
    customer: &str,
    version: u64,
) -> Result<Option<u64>, StoreError> {
    let prefix = layout::customer_prefix(customer);
    match tree.get_lt(layout::customer_key(customer, version.saturating_add(1)))? {
        Some((k, v)) if k.starts_with(&prefix) && k.len() == prefix.len() + 8 => {
            let first = layout::trailing_u64(&k).unwrap_or(u64::MAX);
            let i = version
                .checked_sub(first)
                .and_then(|i| usize::try_from(i).ok());
            Ok(i.and_then(|i| v.get(i * 8..i * 8 + 8))
                .and_then(layout::read_u64))
        }
        _ => Ok(None),
    }
}
