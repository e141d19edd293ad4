//! `verify`: recompute the hash chain and cross-check every index, in bounded memory.
//!
//! Pass 1 walks the records in position order: gapless keys, record position = key,
//! `prev_hash` = previous hash, hash = BLAKE3(prev ‖ bytes), `recorded_at` non-decreasing, the
//! event decodes, and each of its four index entries exists and points back at it; stored
//! checkpoints are merge-joined against the chain. Pass 2 counts every index: equal counts plus
//! pass 1's "every record has its entry" mean the indexes hold nothing else, and walking the
//! customer index in key order checks that each customer's versions run 1, 2, 3, … without gaps.

use std::fmt;

use prost::Message;
use touchledger_proto::{encode_event, v1};

use crate::layout::{self, HASH_LEN};
use crate::sled_store::{chain_hash, decode_committed};
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

pub(crate) fn verify(tree: &sled::Tree) -> Result<VerifyReport, StoreError> {
    let mut prev = Hash::ZERO;
    let mut prev_recorded = touchledger_domain::Timestamp::from_unix_nanos(i64::MIN);
    let mut expected = 1u64;
    let mut checkpoints = tree.scan_prefix([layout::CHECKPOINT]).peekable();
    let mut checked_checkpoints = 0u64;

    for kv in tree.scan_prefix([layout::EVENT]) {
        let (k, v) = kv?;
        let pos = layout::trailing_u64(&k).unwrap_or(0);
        if pos != expected {
            return failed(expected, VerifyProblem::Gap);
        }
        if v.len() < HASH_LEN {
            return failed(
                pos,
                VerifyProblem::Undecodable("shorter than its hash".into()),
            );
        }
        let (stored_hash, bytes) = v.split_at(HASH_LEN);
        // The hash is checked first, on the exact stored bytes: any alteration shows up as a
        // hash mismatch at this position, whatever else it breaks.
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
        let c = match decode_committed(pos, &v) {
            Ok(c) => c,
            Err(e) => return failed(pos, VerifyProblem::Undecodable(e.to_string())),
        };
        if c.recorded_at < prev_recorded {
            return failed(pos, VerifyProblem::TimeWentBackwards);
        }
        let e = &c.event;
        let points_here = |key: &[u8]| -> Result<bool, StoreError> {
            Ok(tree.get(key)?.as_deref().and_then(layout::read_u64) == Some(pos))
        };
        if !points_here(&layout::customer_key(&e.customer_id, c.customer_version))? {
            return failed(
                pos,
                VerifyProblem::Index(format!(
                    "customer entry ({}, v{}) missing or wrong",
                    e.customer_id, c.customer_version
                )),
            );
        }
        match tree.get(layout::event_id_key(&e.event_id))? {
            Some(iv) if layout::read_u64(&iv) == Some(pos) => {
                // The digest was taken at append, before the record existed: a record rewritten
                // later — even with its hash recomputed — no longer matches it.
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
        if !tree.contains_key(layout::kind_key(e.kind(), pos))? {
            return failed(
                pos,
                VerifyProblem::Index(format!("kind entry {} missing", e.kind())),
            );
        }
        if !tree.contains_key(layout::time_key(e.occurred_at, pos))? {
            return failed(
                pos,
                VerifyProblem::Index("occurred_at entry missing".into()),
            );
        }
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
    let events = expected - 1;
    if let Some(kv) = checkpoints.next() {
        let (ck, _) = kv?;
        let cpos = layout::trailing_u64(&ck).unwrap_or(0);
        return failed(cpos, VerifyProblem::Checkpoint("beyond the head".into()));
    }

    // Pass 2: index sizes, and gapless customer versions.
    for (prefix, name) in [
        (layout::EVENT_ID, "event id"),
        (layout::KIND, "kind"),
        (layout::TIME, "occurred_at"),
    ] {
        let n = tree.scan_prefix([prefix]).count() as u64;
        if n != events {
            return failed(
                events,
                VerifyProblem::Index(format!("{name} index has {n} entries for {events} events")),
            );
        }
    }
    let mut customers = 0u64;
    let mut entries = 0u64;
    let mut last: Option<(Vec<u8>, u64)> = None;
    for kv in tree.scan_prefix([layout::CUSTOMER]) {
        let (k, v) = kv?;
        let pos = layout::read_u64(&v).unwrap_or(0);
        let Some((cust, version)) = layout::parse_customer_key(&k) else {
            return failed(pos, VerifyProblem::Index("malformed customer key".into()));
        };
        let want = match &last {
            Some((c, v)) if c.as_slice() == cust => v + 1,
            _ => 1,
        };
        if version != want {
            return failed(
                pos,
                VerifyProblem::CustomerVersions(format!(
                    "customer {} has version {version} where {want} was expected",
                    String::from_utf8_lossy(cust)
                )),
            );
        }
        if version == 1 {
            customers += 1;
        }
        entries += 1;
        last = Some((cust.to_vec(), version));
    }
    if entries != events {
        return failed(
            events,
            VerifyProblem::Index(format!(
                "customer index has {entries} entries for {events} events"
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
