//! The on-disk layout (format 2): one sled tree, keyspaces separated by a one-byte prefix.
//!
//! Key decisions:
//! * Everything lives in a single tree so that one `apply_batch` — which sled recovers
//!   atomically after a crash — commits a whole append batch: records, index entries,
//!   checkpoints and rejection records together.
//! * **Few keys per event.** sled costs about 6 µs per inserted key on the reference machine
//!   whatever the key's size, and about 0.5 µs per KiB of value (BENCHMARKS.md, ADR 0005). So
//!   records are packed into *blocks* of consecutive positions (one key per block), the kind
//!   index holds one run of positions per kind per append batch, and the customer index holds one
//!   run of consecutive versions per customer per index flush (the writer buffers the newest
//!   entries in memory, see [`crate::SledStore`]; they are rebuilt from the blocks after a crash).
//!   Only the event-id index, which must answer "seen before?" for any id forever, has one key
//!   per event.
//! * There is no business-time index: each block carries the minimum and maximum `occurred_at`
//!   of its records (a zone map), so a time-filtered read skips whole blocks without decoding.
//! * All integers are big-endian so that byte order is numeric order. This module is the format
//!   contract that [`FORMAT_VERSION`] versions; changing any key or value shape means a new
//!   format version.
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `m` | `m` ‖ name | meta values (`format`: u32; `cindex`: u64, the customer-index watermark) |
//! | `b` | `b` ‖ first position u64 | a block: consecutive records, see [`encode_block`] |
//! | `i` | `i` ‖ event_id | position u64 ‖ BLAKE3 of the canonical envelope (32) |
//! | `c` | `c` ‖ len u16 ‖ customer_id ‖ first version u64 | positions u64 × n of versions first … first+n−1 |
//! | `k` | `k` ‖ kind code u8 ‖ first position u64 | ascending positions u64 × n of that kind |
//! | `p` | `p` ‖ position u64 | `Checkpoint` protobuf bytes |
//! | `r` | `r` ‖ sequence u64 | `RejectionRecord` protobuf bytes |
//! | `x` | `x` ‖ BLAKE3(code ‖ 0 ‖ origin ‖ 0 ‖ raw bytes) | sequence u64 of the first rejection of that input |
//!
//! The `x` keyspace (added within format 2; a store without it just has no history of earlier
//! rejections) keeps the rejections record to one record per distinct input: the same bytes
//! from the same origin (a JetStream message by its stream sequence, a file line, the
//! synchronous-append subject) rejected with the same code are recorded once, however often
//! they are redelivered or re-sent.
//!
//! The customer-index watermark `W` says: every record at a position ≤ `W` has its entry in
//! the `c` keyspace, and no record above `W` has one.

use touchledger_domain::{EventKind, Timestamp};

/// Version of this layout. Stored under `m format`; checked on every open.
pub const FORMAT_VERSION: u32 = 2;

/// Name of the sled tree holding the ledger.
pub const TREE: &str = "ledger.v1";

/// Meta key of the format version.
pub const META_FORMAT: &[u8] = b"mformat";

/// Meta key of the store's partition: `index` u32 BE ‖ `count` u32 BE. Absent in stores made
/// before partitions existed, which are partition 0 of 1.
pub const META_PARTITION: &[u8] = b"mpartition";

/// Meta key of the customer-index watermark (u64 position).
pub const META_CUSTOMER_INDEX: &[u8] = b"mcindex";

/// Block prefix.
pub const BLOCK: u8 = b'b';
/// Event-id index prefix.
pub const EVENT_ID: u8 = b'i';
/// Customer index prefix.
pub const CUSTOMER: u8 = b'c';
/// Kind index prefix.
pub const KIND: u8 = b'k';
/// Checkpoint prefix.
pub const CHECKPOINT: u8 = b'p';
/// Rejections prefix.
pub const REJECTION: u8 = b'r';

/// Length of a chain hash.
pub const HASH_LEN: usize = 32;

/// A block is closed when it holds this many records …
pub const BLOCK_MAX_RECORDS: usize = 32;
/// … or when its entries reach this many bytes. sled writes a leaf node whole when it
/// consolidates or splits it, and a leaf holds up to 17 entries; a serialised page above sled's
/// blob threshold (segment size / 4 = 128 KiB) goes to a file of its own. 17 blocks of about
/// 6 KiB stay below it. (With 32 KiB blocks the ledger grew a blob file per leaf and appended
/// more slowly as it grew: BENCHMARKS.md.)
pub const BLOCK_MAX_BYTES: usize = 6 * 1024;

/// Block format byte.
const BLOCK_FORMAT: u8 = 1;
/// format u8 ‖ count u32 ‖ min occurred (8) ‖ max occurred (8).
const BLOCK_HEADER: usize = 1 + 4 + 8 + 8;

/// `b` ‖ first position.
pub fn block_key(first_position: u64) -> [u8; 9] {
    prefixed_u64(BLOCK, first_position)
}

/// `p` ‖ position.
pub fn checkpoint_key(position: u64) -> [u8; 9] {
    prefixed_u64(CHECKPOINT, position)
}

/// `r` ‖ sequence.
pub fn rejection_key(seq: u64) -> [u8; 9] {
    prefixed_u64(REJECTION, seq)
}

/// Prefix of the rejection-digest keyspace.
pub const REJECTION_DIGEST: u8 = b'x';

/// `x` ‖ BLAKE3(code ‖ 0 ‖ origin ‖ 0 ‖ raw): one key per distinct rejected input.
pub fn rejection_digest_key(code: &str, origin: &str, raw: &[u8]) -> [u8; 33] {
    let mut h = blake3::Hasher::new();
    h.update(code.as_bytes());
    h.update(&[0]);
    h.update(origin.as_bytes());
    h.update(&[0]);
    h.update(raw);
    let mut k = [0u8; 33];
    k[0] = REJECTION_DIGEST;
    k[1..].copy_from_slice(h.finalize().as_bytes());
    k
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

/// `c` ‖ len ‖ customer_id — the prefix of one customer's index runs.
pub fn customer_prefix(customer_id: &str) -> Vec<u8> {
    let len = u16::try_from(customer_id.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(3 + customer_id.len() + 8);
    k.push(CUSTOMER);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(customer_id.as_bytes());
    k
}

/// `c` ‖ len ‖ customer_id ‖ first version of the run.
pub fn customer_key(customer_id: &str, first_version: u64) -> Vec<u8> {
    let mut k = customer_prefix(customer_id);
    k.extend_from_slice(&first_version.to_be_bytes());
    k
}

/// Split a customer index key into (customer_id bytes, first version).
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

/// `k` ‖ kind ‖ first position of the run.
pub fn kind_key(kind: EventKind, first_position: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = KIND;
    k[1] = kind.code();
    k[2..].copy_from_slice(&first_position.to_be_bytes());
    k
}

/// Positions packed as big-endian u64s (the value of `c` and `k` runs).
pub fn encode_positions(positions: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(positions.len() * 8);
    for p in positions {
        v.extend_from_slice(&p.to_be_bytes());
    }
    v
}

/// Unpack a run of positions; `None` if the length is not a multiple of 8.
pub fn decode_positions(v: &[u8]) -> Option<impl Iterator<Item = u64> + '_> {
    if !v.len().is_multiple_of(8) {
        return None;
    }
    Some(v.chunks_exact(8).filter_map(read_u64))
}

/// Big-endian u64 from the first 8 bytes, if there are 8.
pub fn read_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// The trailing 8 bytes of a key as a big-endian u64 (the position of index keys).
pub fn trailing_u64(key: &[u8]) -> Option<u64> {
    read_u64(key.get(key.len().checked_sub(8)?..)?)
}

/// Encode a block of consecutive records: `entries` are (hash, exact `StoredRecord` bytes) in
/// position order, `zone` the (earliest, latest) `occurred_at` of their events.
///
/// `format u8 (1) ‖ count u32 ‖ min occurred_at (8) ‖ max occurred_at (8) ‖ end offset u32 × count
/// ‖ entries`, where each entry is `hash (32) ‖ record bytes` and the offsets are relative to
/// the start of the entries. Times use [`Timestamp::to_key_bytes`].
pub fn encode_block(entries: &[(&[u8], &[u8])], zone: (Timestamp, Timestamp)) -> Vec<u8> {
    let body: usize = entries.iter().map(|(h, r)| h.len() + r.len()).sum();
    let mut v = Vec::with_capacity(BLOCK_HEADER + 4 * entries.len() + body);
    v.push(BLOCK_FORMAT);
    v.extend_from_slice(
        &u32::try_from(entries.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    v.extend_from_slice(&zone.0.to_key_bytes());
    v.extend_from_slice(&zone.1.to_key_bytes());
    let mut end = 0usize;
    for (h, r) in entries {
        end += h.len() + r.len();
        v.extend_from_slice(&u32::try_from(end).unwrap_or(u32::MAX).to_be_bytes());
    }
    for (h, r) in entries {
        v.extend_from_slice(h);
        v.extend_from_slice(r);
    }
    v
}

/// A parsed view of a block value (no copying).
#[derive(Clone, Copy, Debug)]
pub struct BlockView<'a> {
    count: usize,
    min: Timestamp,
    max: Timestamp,
    offsets: &'a [u8],
    body: &'a [u8],
}

impl<'a> BlockView<'a> {
    /// Parse a block value; `Err` names what is malformed.
    pub fn parse(v: &'a [u8]) -> Result<BlockView<'a>, &'static str> {
        if v.len() < BLOCK_HEADER {
            return Err("block shorter than its header");
        }
        if v[0] != BLOCK_FORMAT {
            return Err("unknown block format");
        }
        let count = u32::from_be_bytes([v[1], v[2], v[3], v[4]]) as usize;
        if count == 0 {
            return Err("empty block");
        }
        let key = |i: usize| -> [u8; 8] { v[i..i + 8].try_into().unwrap_or_default() };
        let (min, max) = (
            Timestamp::from_key_bytes(key(5)),
            Timestamp::from_key_bytes(key(13)),
        );
        let offsets_end = BLOCK_HEADER
            .checked_add(count.checked_mul(4).ok_or("block count overflows")?)
            .ok_or("block count overflows")?;
        if v.len() < offsets_end {
            return Err("block shorter than its offset table");
        }
        let (offsets, body) = (&v[BLOCK_HEADER..offsets_end], &v[offsets_end..]);
        let b = BlockView {
            count,
            min,
            max,
            offsets,
            body,
        };
        let mut prev = 0usize;
        for i in 0..count {
            let end = b.end(i);
            if end < prev + HASH_LEN || end > body.len() {
                return Err("block offsets out of order or out of bounds");
            }
            prev = end;
        }
        if prev != body.len() {
            return Err("block has trailing bytes");
        }
        Ok(b)
    }

    fn end(&self, i: usize) -> usize {
        let o = &self.offsets[i * 4..i * 4 + 4];
        u32::from_be_bytes([o[0], o[1], o[2], o[3]]) as usize
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Never true for a parsed block.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Earliest `occurred_at` of its records.
    pub fn min_occurred(&self) -> Timestamp {
        self.min
    }

    /// Latest `occurred_at` of its records.
    pub fn max_occurred(&self) -> Timestamp {
        self.max
    }

    /// Entry `i` (0-based): (stored hash, exact `StoredRecord` bytes).
    pub fn entry(&self, i: usize) -> Option<(&'a [u8], &'a [u8])> {
        if i >= self.count {
            return None;
        }
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        let e = &self.body[start..self.end(i)];
        Some(e.split_at(HASH_LEN))
    }

    /// The byte range of each entry (hash ‖ record) within the parsed value, in order.
    pub fn entry_ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let base = BLOCK_HEADER + self.offsets.len();
        (0..self.count).map(move |i| {
            let start = if i == 0 { 0 } else { self.end(i - 1) };
            (base + start, base + self.end(i))
        })
    }

    /// All entries in order.
    pub fn entries(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + '_ {
        (0..self.count).filter_map(|i| self.entry(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_round_trips_and_rejects_damage() {
        let h1 = [1u8; 32];
        let h2 = [2u8; 32];
        let t1 = Timestamp::from_unix_nanos(-5);
        let t2 = Timestamp::from_unix_nanos(7);
        let v = encode_block(&[(&h1[..], &b"abc"[..]), (&h2[..], &b""[..])], (t1, t2));
        let b = BlockView::parse(&v).expect("parse");
        assert_eq!(b.len(), 2);
        assert_eq!((b.min_occurred(), b.max_occurred()), (t1, t2));
        assert_eq!(b.entry(0), Some((&h1[..], &b"abc"[..])));
        assert_eq!(b.entry(1), Some((&h2[..], &b""[..])));
        assert_eq!(b.entry(2), None);
        let ranges: Vec<_> = b.entry_ranges().collect();
        assert_eq!(&v[ranges[0].0..ranges[0].1][32..], b"abc");
        assert_eq!(ranges[1].1 - ranges[1].0, 32);
        assert_eq!(ranges[1].1, v.len());
        assert!(BlockView::parse(&v[..v.len() - 1]).is_err());
        let mut longer = v.clone();
        longer.push(0);
        assert!(BlockView::parse(&longer).is_err());
        assert!(BlockView::parse(&v[..10]).is_err());
    }

    #[test]
    fn positions_round_trip() {
        let v = encode_positions(&[3, 9, u64::MAX]);
        let back: Vec<u64> = decode_positions(&v).expect("multiple of 8").collect();
        assert_eq!(back, [3, 9, u64::MAX]);
        assert!(decode_positions(&v[..7]).is_none());
    }
}
