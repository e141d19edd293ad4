//! The on-disk layout: one sled tree, keyspaces separated by a one-byte prefix.
//!
//! Key decision: everything lives in a single tree so that one `apply_batch` — which sled
//! recovers atomically after a crash — commits a whole append batch: records, every index
//! entry, checkpoints and rejection records together. All integers are big-endian so that byte
//! order is numeric order. This module is the format contract that [`FORMAT_VERSION`] versions;
//! changing any key or value shape means a new format version.
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `m` | `m` ‖ name | meta values (`format`: u32) |
//! | `e` | `e` ‖ position u64 | hash (32) ‖ `StoredRecord` protobuf bytes |
//! | `i` | `i` ‖ event_id | position u64 ‖ BLAKE3 of the canonical envelope (32) |
//! | `c` | `c` ‖ len u16 ‖ customer_id ‖ customer_version u64 | position u64 |
//! | `k` | `k` ‖ kind code u8 ‖ position u64 | (empty) |
//! | `t` | `t` ‖ occurred_at (sortable i64) ‖ position u64 | (empty) |
//! | `p` | `p` ‖ position u64 | `Checkpoint` protobuf bytes |
//! | `r` | `r` ‖ sequence u64 | `RejectionRecord` protobuf bytes |

use touchledger_domain::{EventKind, Timestamp};

/// Version of this layout. Stored under `m format`; checked on every open.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the sled tree holding the ledger.
pub const TREE: &str = "ledger.v1";

/// Meta key of the format version.
pub const META_FORMAT: &[u8] = b"mformat";

/// Keyspace prefixes.
pub const EVENT: u8 = b'e';
/// Event-id index prefix.
pub const EVENT_ID: u8 = b'i';
/// Customer index prefix.
pub const CUSTOMER: u8 = b'c';
/// Kind index prefix.
pub const KIND: u8 = b'k';
/// Business-time index prefix.
pub const TIME: u8 = b't';
/// Checkpoint prefix.
pub const CHECKPOINT: u8 = b'p';
/// Rejections prefix.
pub const REJECTION: u8 = b'r';

/// Length of a chain hash.
pub const HASH_LEN: usize = 32;

/// `e` ‖ position.
pub fn event_key(position: u64) -> [u8; 9] {
    prefixed_u64(EVENT, position)
}

/// `p` ‖ position.
pub fn checkpoint_key(position: u64) -> [u8; 9] {
    prefixed_u64(CHECKPOINT, position)
}

/// `r` ‖ sequence.
pub fn rejection_key(seq: u64) -> [u8; 9] {
    prefixed_u64(REJECTION, seq)
}

fn prefixed_u64(prefix: u8, n: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}

/// `i` ‖ event_id.
pub fn event_id_key(event_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + event_id.len());
    k.push(EVENT_ID);
    k.extend_from_slice(event_id.as_bytes());
    k
}

/// `c` ‖ len ‖ customer_id — the prefix of one customer's index entries.
pub fn customer_prefix(customer_id: &str) -> Vec<u8> {
    let len = u16::try_from(customer_id.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(3 + customer_id.len() + 8);
    k.push(CUSTOMER);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(customer_id.as_bytes());
    k
}

/// `c` ‖ len ‖ customer_id ‖ version.
pub fn customer_key(customer_id: &str, version: u64) -> Vec<u8> {
    let mut k = customer_prefix(customer_id);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// Split a customer index key into (customer_id bytes, version).
pub fn parse_customer_key(key: &[u8]) -> Option<(&[u8], u64)> {
    if key.first() != Some(&CUSTOMER) || key.len() < 3 + 8 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([key[1], key[2]]));
    if key.len() != 3 + len + 8 {
        return None;
    }
    Some((&key[3..3 + len], read_u64(&key[3 + len..])?))
}

/// `k` ‖ kind ‖ position.
pub fn kind_key(kind: EventKind, position: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = KIND;
    k[1] = kind.code();
    k[2..].copy_from_slice(&position.to_be_bytes());
    k
}

/// `t` ‖ occurred_at ‖ position.
pub fn time_key(occurred_at: Timestamp, position: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = TIME;
    k[1..9].copy_from_slice(&occurred_at.to_key_bytes());
    k[9..].copy_from_slice(&position.to_be_bytes());
    k
}

/// Big-endian u64 from the first 8 bytes, if there are 8.
pub fn read_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// The trailing 8 bytes of a key as a big-endian u64 (the position of index keys).
pub fn trailing_u64(key: &[u8]) -> Option<u64> {
    read_u64(key.get(key.len().checked_sub(8)?..)?)
}
