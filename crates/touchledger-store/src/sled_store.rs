//! [`EventStore`] on sled 0.34 (layout in [`crate::layout`]).
//!
//! The append path, in order, under the writer lock: validate each item; look its id up
//! (duplicate or conflict); check the expected version; check a retraction's target; assign
//! position and version; encode the `StoredRecord` once and hash those exact bytes. Then the
//! batch's records are packed into blocks, its kind runs and event-id entries are staged with
//! any checkpoint or rejection in one `sled::Batch` — plus, every `customer_index_batch`
//! events, the customer-index runs of everything since the last such flush and the new
//! watermark. `apply_batch` (atomic, also across a crash) and `flush` (fsync) follow, and only
//! then are the outcomes returned and the head watchers woken.
//!
//! Key decision: the customer index is written in runs. Between flushes its newest entries
//! live in memory (the *tail*, bounded by `customer_index_batch`); they are derived data — each
//! record carries its customer and version — so after a crash `open` rebuilds the tail from the
//! blocks above the watermark. Reads combine the durable runs (positions ≤ the watermark) with
//! a snapshot of the tail.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use prost::Message;
use touchledger_domain::{
    Event, EventKind, LEDGER_SOURCE, Payload, RejectCode, Rejection, Timestamp,
};
use touchledger_proto::{encode_event, from_pb_time, to_pb_time, v1};

use crate::layout::{self, FORMAT_VERSION, HASH_LEN};
use crate::verify::{self, VerifyReport};
use crate::{
    AppendItem, AppendOutcome, Checkpoint, Committed, EventStore, Events, Hash, Head, RawRecord,
    RawRecords, ReadFilter, RejectionRecord, Stats, StoreConfig, StoreError, watch,
};

/// The sled-backed store. Cheap to share behind an `Arc`; one per data directory per process
/// (sled locks the directory).
pub struct SledStore {
    db: sled::Db,
    pub(crate) tree: sled::Tree,
    config: StoreConfig,
    /// Owned by the single writer: the chain head and the next rejection sequence.
    writer: Mutex<Writer>,
    /// Customer-index entries above the watermark. Written only by the writer (while it holds
    /// `writer`), read by anyone; held only for in-memory work, never across I/O.
    tail: RwLock<CustomerTail>,
    head_tx: watch::Sender<Head>,
    /// sled leftovers moved aside by this open.
    quarantined: Vec<crate::Quarantined>,
}

struct Writer {
    head: Head,
    next_rejection: u64,
    /// Current versions of recently appended customers, so that the append path rarely needs
    /// sled's (slow) `get_lt` on the customer index. Only committed versions enter it.
    versions: VersionCache,
    /// Set when applying or flushing a batch failed: sled's in-memory state may then be ahead
    /// of what is durable and of `head`, so no further append is safe until the store is
    /// reopened (which reloads the head from disk).
    failed: bool,
}

/// The customer index above the watermark: for each customer, the first version held here and
/// the positions of that and the following versions.
#[derive(Default)]
pub(crate) struct CustomerTail {
    /// The watermark: every position ≤ `upto` is in the durable customer index.
    pub(crate) upto: u64,
    runs: HashMap<String, (u64, Vec<u64>)>,
    entries: usize,
}

impl CustomerTail {
    fn version(&self, customer: &str) -> Option<u64> {
        self.runs
            .get(customer)
            .map(|(first, ps)| first + ps.len() as u64 - 1)
    }

    fn push(&mut self, customer: &str, version: u64, position: u64) {
        match self.runs.get_mut(customer) {
            Some((_, ps)) => ps.push(position),
            None => {
                self.runs
                    .insert(customer.to_owned(), (version, vec![position]));
            }
        }
        self.entries += 1;
    }
}

/// A bounded map of customer → current version with two generations: when the young one
/// fills half the capacity it becomes the old one and the previous old one is dropped. O(1),
/// at most `capacity` entries, and recently used customers survive a rotation.
struct VersionCache {
    young: HashMap<String, u64>,
    old: HashMap<String, u64>,
    half: usize,
}

impl VersionCache {
    fn new(capacity: usize) -> Self {
        VersionCache {
            young: HashMap::new(),
            old: HashMap::new(),
            half: (capacity / 2).max(1),
        }
    }

    fn get(&self, customer: &str) -> Option<u64> {
        self.young
            .get(customer)
            .or_else(|| self.old.get(customer))
            .copied()
    }

    fn insert(&mut self, customer: String, version: u64) {
        if self.young.len() >= self.half && !self.young.contains_key(&customer) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(customer, version);
    }
}

/// What the batch under construction already decided about an event id.
struct Staged {
    position: u64,
    digest: [u8; 32],
    customer_id: String,
    kind: EventKind,
}

/// A record of the batch under construction, waiting to be packed into a block.
struct Pending {
    position: u64,
    hash: [u8; 32],
    record: Vec<u8>,
    occurred_at: Timestamp,
}

/// A decoded block: its value and the (start, end) of each entry within it.
pub(crate) struct LoadedBlock {
    first: u64,
    value: sled::IVec,
    /// Byte range of each entry (hash ‖ record) inside `value`.
    ranges: Vec<(usize, usize)>,
    min: Timestamp,
    max: Timestamp,
}

impl LoadedBlock {
    fn new(key: &[u8], value: sled::IVec) -> Result<LoadedBlock, StoreError> {
        let first = layout::trailing_u64(key)
            .filter(|_| key.len() == 9)
            .ok_or_else(|| StoreError::corrupt("block key", "not b ‖ position"))?;
        let view = layout::BlockView::parse(&value)
            .map_err(|e| StoreError::corrupt(format!("block at position {first}"), e))?;
        let ranges = view.entry_ranges().collect();
        let (min, max) = (view.min_occurred(), view.max_occurred());
        Ok(LoadedBlock {
            first,
            value,
            ranges,
            min,
            max,
        })
    }

    fn last(&self) -> u64 {
        self.first + self.ranges.len() as u64 - 1
    }

    fn contains(&self, position: u64) -> bool {
        (self.first..=self.last()).contains(&position)
    }

    /// (hash, record bytes) at `position`, which must be in this block.
    fn entry(&self, position: u64) -> Option<(&[u8], &[u8])> {
        let i = usize::try_from(position.checked_sub(self.first)?).ok()?;
        let (s, e) = *self.ranges.get(i)?;
        Some(self.value[s..e].split_at(HASH_LEN))
    }

    fn committed(&self, position: u64) -> Result<Committed, StoreError> {
        let (s, e) = usize::try_from(position - self.first)
            .ok()
            .and_then(|i| self.ranges.get(i).copied())
            .ok_or_else(|| StoreError::corrupt(format!("position {position}"), "not in block"))?;
        decode_committed(position, &self.value[s..e])
    }
}

/// Records in position order from a range of blocks, optionally skipping blocks whose
/// `occurred_at` zone map cannot meet a time filter.
pub(crate) struct BlockScan {
    iter: sled::Iter,
    block: Option<LoadedBlock>,
    next: u64,
    from: u64,
    to: u64,
    since: Option<Timestamp>,
    until: Option<Timestamp>,
}

impl BlockScan {
    pub(crate) fn new(tree: &sled::Tree, from: u64, to: u64) -> Result<BlockScan, StoreError> {
        // Start at the block holding `from`, which usually begins before it.
        let start = match tree.get_lt(layout::block_key(from.saturating_add(1)))? {
            Some((k, _)) if k.first() == Some(&layout::BLOCK) => {
                layout::trailing_u64(&k).unwrap_or(from)
            }
            _ => from,
        };
        Ok(BlockScan {
            iter: tree.range(layout::block_key(start)..=layout::block_key(to)),
            block: None,
            next: from,
            from,
            to,
            since: None,
            until: None,
        })
    }

    /// Every block, for `verify` (no range logic: a block starting before 1 is reported).
    pub(crate) fn all(tree: &sled::Tree) -> BlockScan {
        BlockScan {
            iter: tree.scan_prefix([layout::BLOCK]),
            block: None,
            next: 0,
            from: 0,
            to: u64::MAX,
            since: None,
            until: None,
        }
    }

    fn with_zone(mut self, since: Option<Timestamp>, until: Option<Timestamp>) -> Self {
        self.since = since;
        self.until = until;
        self
    }

    /// The next block, raw (for `verify`).
    pub(crate) fn next_block(&mut self) -> Option<Result<(u64, sled::IVec), StoreError>> {
        self.iter.next().map(|kv| {
            let (k, v) = kv?;
            let first = layout::trailing_u64(&k)
                .filter(|_| k.len() == 9)
                .ok_or_else(|| StoreError::corrupt("block key", "not b ‖ position"))?;
            Ok((first, v))
        })
    }

    /// The next position in range; its record is in [`BlockScan::current`].
    pub(crate) fn next_entry(&mut self) -> Option<Result<u64, StoreError>> {
        loop {
            let in_block = self
                .block
                .as_ref()
                .is_some_and(|b| self.next <= b.last() && self.next <= self.to);
            if in_block {
                let p = self.next;
                self.next = p + 1;
                return Some(Ok(p));
            }
            if self.next > self.to {
                return None;
            }
            let (k, v) = match self.iter.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            let b = match LoadedBlock::new(&k, v) {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            let skip =
                self.since.is_some_and(|s| b.max < s) || self.until.is_some_and(|u| b.min >= u);
            self.next = self.next.max(b.first).max(self.from);
            if skip {
                self.next = self.next.max(b.last() + 1);
                self.block = None;
                continue;
            }
            self.block = Some(b);
        }
    }

    /// The block of the position last returned by [`BlockScan::next_entry`].
    pub(crate) fn current(&self) -> Option<&LoadedBlock> {
        self.block.as_ref()
    }

    /// Decoded committed events, filtered by `keep`.
    fn into_events<'a>(mut self, keep: impl Fn(&Committed) -> bool + Send + 'a) -> Events<'a> {
        Box::new(std::iter::from_fn(move || {
            loop {
                let p = match self.next_entry()? {
                    Ok(p) => p,
                    Err(e) => return Some(Err(e)),
                };
                let r = self
                    .current()
                    .ok_or_else(|| StoreError::corrupt("block scan", "no current block"))
                    .and_then(|b| b.committed(p));
                match r {
                    Ok(c) if keep(&c) => return Some(Ok(c)),
                    Ok(_) => continue,
                    Err(e) => return Some(Err(e)),
                }
            }
        }))
    }
}

/// Reads single positions, reusing the last block (index-driven reads are mostly ascending).
struct BlockCursor<'a> {
    tree: &'a sled::Tree,
    block: Option<LoadedBlock>,
}

impl<'a> BlockCursor<'a> {
    fn new(tree: &'a sled::Tree) -> Self {
        BlockCursor { tree, block: None }
    }

    fn get(&mut self, position: u64) -> Result<Option<Committed>, StoreError> {
        if !self.block.as_ref().is_some_and(|b| b.contains(position)) {
            self.block = load_block(self.tree, position)?;
        }
        match &self.block {
            Some(b) if b.contains(position) => Ok(Some(b.committed(position)?)),
            _ => Ok(None),
        }
    }
}

/// The block holding `position`, if any.
fn load_block(tree: &sled::Tree, position: u64) -> Result<Option<LoadedBlock>, StoreError> {
    match tree.get_lt(layout::block_key(position.saturating_add(1)))? {
        Some((k, v)) if k.first() == Some(&layout::BLOCK) => {
            let b = LoadedBlock::new(&k, v)?;
            Ok(b.contains(position).then_some(b))
        }
        _ => Ok(None),
    }
}

impl SledStore {
    /// Open (or create) the store in `config.path`, checking the on-disk format version, and
    /// rebuild the in-memory customer-index tail from the blocks above its watermark.
    pub fn open(config: StoreConfig) -> Result<SledStore, StoreError> {
        if config.checkpoint_interval == 0 {
            return Err(StoreError::Config(
                "checkpoint_interval must be >= 1".into(),
            ));
        }
        if config.customer_index_batch == 0 {
            return Err(StoreError::Config(
                "customer_index_batch must be >= 1".into(),
            ));
        }
        let quarantined = crate::recover::quarantine_leftovers(&config.path).map_err(|source| {
            StoreError::Prepare {
                path: config.path.clone(),
                source,
            }
        })?;
        let path = config.path.clone();
        // sled 0.34 panics on some damage to its log instead of returning an error.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::open_prepared(config, quarantined)
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            Err(StoreError::Damaged {
                path: path.clone(),
                detail: format!("sled panicked while reading its log `db`: {what}"),
            })
        });
        opened.map_err(|e| match e {
            StoreError::Engine(sled::Error::Corruption { at, .. }) => StoreError::Damaged {
                path,
                detail: match at {
                    Some(at) => format!("sled read corrupted data in its log `db` at {at:?}"),
                    None => "sled read corrupted data in its log `db` or a snapshot".into(),
                },
            },
            StoreError::Engine(sled::Error::Unsupported(detail)) => {
                StoreError::Unsupported { path, detail }
            }
            e => e,
        })
    }

    /// The partition this store holds.
    pub fn partition(&self) -> touchledger_domain::partition::PartitionId {
        self.config.partition
    }

    fn open_prepared(
        config: StoreConfig,
        quarantined: Vec<crate::Quarantined>,
    ) -> Result<SledStore, StoreError> {
        let db = open_db(&config)?;
        let tree = db.open_tree(layout::TREE)?;
        match tree.get(layout::META_FORMAT)? {
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::corrupt("format marker", "not 4 bytes"))?;
                if found != FORMAT_VERSION {
                    return Err(StoreError::FormatMismatch {
                        path: config.path.clone(),
                        found,
                        expected: FORMAT_VERSION,
                    });
                }
            }
            // sled shows a log it cannot read at all as an empty database: the marker file
            // says a ledger was created here, so this is damage, never a new ledger.
            None if tree.is_empty() && config.path.join(LEDGER_MARKER).exists() => {
                return Err(StoreError::Damaged {
                    path: config.path.clone(),
                    detail: format!(
                        "{LEDGER_MARKER} says a ledger was created here, but sled finds no data in its log `db`"
                    ),
                });
            }
            None if tree.is_empty() => {
                tree.insert(layout::META_FORMAT, &FORMAT_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            None => {
                return Err(StoreError::NotALedger {
                    path: config.path.clone(),
                });
            }
        }
        check_partition(&db, &tree, &config)?;
        write_marker(&config.path).map_err(|source| StoreError::Prepare {
            path: config.path.clone(),
            source,
        })?;
        let head = load_head(&tree)?;
        let next_rejection = match tree.get_lt(layout::rejection_key(u64::MAX))? {
            Some((k, _)) if k.first() == Some(&layout::REJECTION) => {
                layout::trailing_u64(&k).unwrap_or(0) + 1
            }
            _ => 1,
        };
        let tail = rebuild_tail(&tree, head.position)?;
        let (head_tx, _) = watch::channel(head);
        let versions = VersionCache::new(config.customer_cache_capacity);
        Ok(SledStore {
            db,
            tree,
            config,
            writer: Mutex::new(Writer {
                head,
                next_rejection,
                versions,
                failed: false,
            }),
            tail: RwLock::new(tail),
            head_tx,
            quarantined,
        })
    }

    /// The sled leftovers this open moved into `quarantine/` (see ADR 0007).
    pub fn quarantined(&self) -> &[crate::Quarantined] {
        &self.quarantined
    }

    /// The free space of the store's filesystem and the reserve the store keeps on it.
    pub fn space(&self) -> Result<(crate::FreeSpace, u64), StoreError> {
        let free =
            crate::space::free_space(&self.config.path).map_err(|source| StoreError::Prepare {
                path: self.config.path.clone(),
                source,
            })?;
        let snapshot = crate::space::newest_snapshot_bytes(&self.config.path);
        Ok((free, self.config.space_reserve.bytes(free.total, snapshot)))
    }

    /// Whether a rejection with this digest key is the first of its input (not in this batch,
    /// not stored before).
    fn first_rejection(
        &self,
        digest: &[u8; 33],
        batch: &std::collections::HashSet<[u8; 33]>,
    ) -> Result<bool, StoreError> {
        Ok(!batch.contains(digest) && self.tree.get(digest)?.is_none())
    }

    /// Refuse to write `bytes` more when that would leave less than the reserve free.
    fn check_space(&self, bytes: u64) -> Result<(), StoreError> {
        if self.config.space_reserve.is_none() {
            return Ok(());
        }
        let (free, reserve) = self.space()?;
        if free.available < reserve.saturating_add(bytes) {
            return Err(StoreError::StorageFull {
                path: self.config.path.clone(),
                available: free.available,
                reserve,
            });
        }
        Ok(())
    }

    /// The state tree of projection `name`, in the ledger's database (so that the ledger's
    /// flushes cover it too). See [`crate::ProjectionTree`].
    pub fn projection(&self, name: &str) -> Result<crate::ProjectionTree, StoreError> {
        crate::ProjectionTree::open(&self.db, name)
    }

    /// The due-time index `name`, in the ledger's database. See [`crate::DueIndex`].
    pub fn due_index(&self, name: &str) -> Result<crate::DueIndex, StoreError> {
        crate::DueIndex::open(&self.db, name)
    }

    /// The underlying sled tree, for benchmarks that need a baseline on the same bytes.
    /// Writing through it bypasses every guarantee of the store.
    #[doc(hidden)]
    pub fn raw_tree_for_benchmarks(&self) -> sled::Tree {
        self.tree.clone()
    }

    /// The configuration this store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Flush everything to disk (appends already do; this is for orderly shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Apply a batch atomically and flush it. On failure the writer is marked failed: sled's
    /// memory may now be ahead of the disk, so no further append is safe until a reopen.
    fn commit(&self, w: &mut Writer, sb: sled::Batch, bytes: u64) -> Result<(), StoreError> {
        // Before anything reaches sled: a refusal here leaves the writer usable.
        self.check_space(bytes)?;
        let r = self
            .tree
            .apply_batch(sb)
            .and_then(|()| self.db.flush().map(drop));
        if r.is_err() {
            w.failed = true;
        }
        Ok(r?)
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while holding the lock cannot leave a half-applied batch (the sled batch is
        // applied atomically or not at all, and the in-memory head is only advanced after the
        // flush), so a poisoned lock is safe to keep using.
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read_tail(&self) -> std::sync::RwLockReadGuard<'_, CustomerTail> {
        // The tail is only changed by plain in-memory pushes and clears; a panic mid-update
        // cannot happen between them in a way that matters more than losing the process.
        self.tail
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_tail(&self) -> std::sync::RwLockWriteGuard<'_, CustomerTail> {
        self.tail
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn load(&self, position: u64) -> Result<Option<Committed>, StoreError> {
        BlockCursor::new(&self.tree).get(position)
    }

    fn lookup_id(&self, event_id: &str) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        match self.tree.get(layout::event_id_key(event_id))? {
            None => Ok(None),
            Some(v) if v.len() == 8 + 32 => {
                let pos = layout::read_u64(&v).unwrap_or(0);
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&v[8..]);
                Ok(Some((pos, digest)))
            }
            Some(_) => Err(StoreError::corrupt(
                format!("event id index {event_id:?}"),
                "value is not position ‖ digest",
            )),
        }
    }

    /// Lazily map positions (ascending) to committed events.
    fn by_positions<'a>(
        &'a self,
        positions: impl Iterator<Item = Result<u64, StoreError>> + Send + 'a,
        keep: impl Fn(&Committed) -> bool + Send + 'a,
    ) -> Events<'a> {
        let mut cursor = BlockCursor::new(&self.tree);
        Box::new(positions.filter_map(move |p| {
            let r = p.and_then(|pos| {
                cursor.get(pos)?.ok_or_else(|| {
                    StoreError::corrupt(
                        format!("position {pos}"),
                        "index points at a missing record",
                    )
                })
            });
            match r {
                Ok(c) if keep(&c) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }
        }))
    }

    /// The positions of a customer's events, ascending: the durable runs up to the watermark,
    /// then a snapshot of the tail. The snapshot is taken first, so a flush racing with the
    /// lazy scan can only add durable positions above the snapshot's watermark, which are
    /// skipped (the snapshot holds them).
    fn customer_positions(
        &self,
        customer: &str,
    ) -> impl Iterator<Item = Result<u64, StoreError>> + Send + 'static {
        let (upto, tail) = {
            let t = self.read_tail();
            (
                t.upto,
                t.runs
                    .get(customer)
                    .map(|(_, ps)| ps.clone())
                    .unwrap_or_default(),
            )
        };
        let durable = self
            .tree
            .scan_prefix(layout::customer_prefix(customer))
            .flat_map(move |kv| -> Vec<Result<u64, StoreError>> {
                match kv {
                    Err(e) => vec![Err(e.into())],
                    Ok((_, v)) => match layout::decode_positions(&v) {
                        Some(ps) => ps.filter(|p| *p <= upto).map(Ok).collect(),
                        None => vec![Err(StoreError::corrupt(
                            "customer index run",
                            "length is not a multiple of 8",
                        ))],
                    },
                }
            });
        durable.chain(tail.into_iter().map(Ok))
    }

    /// Positions of `kind` in [from, to], ascending, from the kind runs.
    fn kind_positions(
        &self,
        kind: EventKind,
        from: u64,
        to: u64,
    ) -> impl Iterator<Item = Result<u64, StoreError>> + Send + 'static {
        let (start, failed) = match self
            .tree
            .get_lt(layout::kind_key(kind, from.saturating_add(1)))
        {
            Ok(Some((k, _))) if k.len() == 10 && k[..2] == [layout::KIND, kind.code()] => {
                (layout::trailing_u64(&k).unwrap_or(from), None)
            }
            Ok(_) => (from, None),
            // Reported first, instead of silently starting after a run that holds `from`.
            Err(e) => (from, Some(Err(StoreError::from(e)))),
        };
        failed.into_iter().chain(
            self.tree
                .range(layout::kind_key(kind, start)..=layout::kind_key(kind, to))
                .flat_map(|kv| -> Vec<Result<u64, StoreError>> {
                    match kv {
                        Err(e) => vec![Err(e.into())],
                        Ok((_, v)) => match layout::decode_positions(&v) {
                            Some(ps) => ps.map(Ok).collect(),
                            None => vec![Err(StoreError::corrupt(
                                "kind index run",
                                "length is not a multiple of 8",
                            ))],
                        },
                    }
                })
                .filter(move |p| p.as_ref().map_or(true, |p| *p >= from))
                .take_while(move |p| p.as_ref().map_or(true, |p| *p <= to)),
        )
    }
}

/// A file beside sled's own, written once the ledger exists: it lets an open tell a new
/// directory from one whose log sled can no longer read (which sled shows as empty).
pub const LEDGER_MARKER: &str = "LEDGER";

fn write_marker(dir: &std::path::Path) -> std::io::Result<()> {
    let path = dir.join(LEDGER_MARKER);
    if path.exists() {
        return Ok(());
    }
    let tmp = dir.join(format!("{LEDGER_MARKER}.tmp"));
    std::fs::write(
        &tmp,
        format!(
            "touchledger ledger, on-disk format {FORMAT_VERSION}.\nsled's files beside this one hold it; see docs/operations.md before touching any of them.\n"
        ),
    )?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Open the sled database, waiting up to `lock_timeout` for the directory lock: sled releases
/// it only when its background flusher has stopped, which can lag a drop (an in-process reopen)
/// or a previous process's exit by a few hundred milliseconds.
fn open_db(config: &StoreConfig) -> Result<sled::Db, StoreError> {
    let sled_config = sled::Config::new()
        .path(&config.path)
        .cache_capacity(config.cache_capacity)
        .mode(sled::Mode::HighThroughput);

    open_locked(&sled_config, &config.path, config.lock_timeout)
}

/// Open a sled database, waiting up to `timeout` for its directory lock (held by another
/// handle, or briefly by a dropped handle's background flusher).
pub(crate) fn open_locked(
    sled_config: &sled::Config,
    path: &std::path::Path,
    timeout: std::time::Duration,
) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match sled_config.open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::Locked {
                        path: path.to_owned(),
                    });
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(StoreError::Engine(e)),
        }
    }
}

fn load_head(tree: &sled::Tree) -> Result<Head, StoreError> {
    match tree.get_lt(layout::block_key(u64::MAX))? {
        Some((k, v)) if k.first() == Some(&layout::BLOCK) => {
            let b = LoadedBlock::new(&k, v)?;
            let position = b.last();
            let c = b.committed(position)?;
            Ok(Head {
                position,
                hash: c.hash,
                recorded_at: c.recorded_at,
            })
        }
        _ => Ok(Head::default()),
    }
}

/// A customer's last version in the durable customer index, ignoring the tail (0 = none).
pub(crate) fn durable_customer_version(
    tree: &sled::Tree,
    customer_id: &str,
) -> Result<u64, StoreError> {
    let prefix = layout::customer_prefix(customer_id);
    Ok(
        match tree.get_lt(layout::customer_key(customer_id, u64::MAX))? {
            Some((k, v)) if k.starts_with(&prefix) && k.len() == prefix.len() + 8 => {
                let first = layout::trailing_u64(&k).unwrap_or(0);
                (first + (v.len() / 8) as u64).saturating_sub(1)
            }
            _ => 0,
        },
    )
}

/// The customer-index watermark (0 when nothing was flushed yet).
pub(crate) fn customer_watermark(tree: &sled::Tree) -> Result<u64, StoreError> {
    match tree.get(layout::META_CUSTOMER_INDEX)? {
        None => Ok(0),
        Some(v) if v.len() == 8 => Ok(layout::read_u64(&v).unwrap_or(0)),
        Some(_) => Err(StoreError::corrupt(
            "customer-index watermark",
            "not 8 bytes",
        )),
    }
}

/// Rebuild the tail from the records above the watermark (at most one flush interval plus
/// one batch of them).
fn rebuild_tail(tree: &sled::Tree, head: u64) -> Result<CustomerTail, StoreError> {
    let upto = customer_watermark(tree)?;
    if upto > head {
        return Err(StoreError::corrupt(
            "customer-index watermark",
            format!("{upto} is beyond the head {head}"),
        ));
    }
    let mut tail = CustomerTail {
        upto,
        ..CustomerTail::default()
    };
    if upto == head {
        return Ok(tail);
    }
    let mut scan = BlockScan::new(tree, upto + 1, head)?;
    while let Some(p) = scan.next_entry() {
        let p = p?;
        let c = scan
            .current()
            .ok_or_else(|| StoreError::corrupt("block scan", "no current block"))?
            .committed(p)?;
        tail.push(&c.event.customer_id, c.customer_version, p);
    }
    Ok(tail)
}

/// Decode a block entry (hash ‖ StoredRecord bytes).
pub(crate) fn decode_committed(position: u64, value: &[u8]) -> Result<Committed, StoreError> {
    let what = || format!("position {position}");
    if value.len() < HASH_LEN {
        return Err(StoreError::corrupt(what(), "record shorter than its hash"));
    }
    let (hash, bytes) = value.split_at(HASH_LEN);
    decode_record(position, hash, bytes)
}

/// Decode `StoredRecord` bytes stored at `position` with their chain hash.
pub(crate) fn decode_record(
    position: u64,
    hash: &[u8],
    bytes: &[u8],
) -> Result<Committed, StoreError> {
    let what = || format!("position {position}");
    let rec = v1::StoredRecord::decode(bytes)
        .map_err(|e| StoreError::corrupt(what(), format!("undecodable record: {e}")))?;
    let env = rec
        .event
        .ok_or_else(|| StoreError::corrupt(what(), "record without event"))?;
    let event = Event::try_from(env).map_err(|r| StoreError::corrupt(what(), r.to_string()))?;
    Ok(Committed {
        position: rec.position,
        customer_version: rec.customer_version,
        recorded_at: from_pb_time("recorded_at", rec.recorded_at)
            .map_err(|r| StoreError::corrupt(what(), r.to_string()))?,
        prev_hash: Hash::from_slice(&rec.prev_hash)
            .ok_or_else(|| StoreError::corrupt(what(), "prev_hash is not 32 bytes"))?,
        hash: Hash::from_slice(hash).unwrap_or_default(),
        event,
    })
}

/// Encode a `StoredRecord` around already-encoded envelope bytes, without re-encoding them.
/// Field 5 (`event`) is the last field, so appending it by hand yields exactly prost's
/// canonical encoding of the whole message.
pub(crate) fn encode_record(
    position: u64,
    customer_version: u64,
    prev_hash: &Hash,
    recorded_at: Timestamp,
    envelope: &[u8],
) -> Vec<u8> {
    let head = v1::StoredRecord {
        position,
        customer_version,
        prev_hash: prev_hash.0.to_vec(),
        recorded_at: Some(to_pb_time(recorded_at)),
        event: None,
    };
    let mut buf = Vec::with_capacity(head.encoded_len() + envelope.len() + 8);
    // Encoding into a Vec cannot fail (it grows as needed).
    head.encode(&mut buf).unwrap_or_default();
    prost::encoding::encode_key(5, prost::encoding::WireType::LengthDelimited, &mut buf);
    prost::encoding::encode_varint(envelope.len() as u64, &mut buf);
    buf.extend_from_slice(envelope);
    buf
}

/// hash = BLAKE3(prev_hash ‖ record bytes).
pub(crate) fn chain_hash(prev: &Hash, record: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&prev.0);
    h.update(record);
    Hash(*h.finalize().as_bytes())
}

fn encode_rejection(r: &RejectionRecord) -> Vec<u8> {
    v1::RejectionRecord {
        rejection: Some(v1::Rejection::from(&r.rejection)),
        raw: r.raw.clone(),
        received_at: Some(to_pb_time(r.received_at)),
        origin: r.origin.clone(),
        event_id: r.event_id.clone(),
        customer_id: r.customer_id.clone(),
    }
    .encode_to_vec()
}

fn decode_rejection(seq: u64, v: &[u8]) -> Result<RejectionRecord, StoreError> {
    let what = || format!("rejection {seq}");
    let r =
        v1::RejectionRecord::decode(v).map_err(|e| StoreError::corrupt(what(), e.to_string()))?;
    let rej = r
        .rejection
        .ok_or_else(|| StoreError::corrupt(what(), "no rejection"))?;
    // A code written by a newer build is kept readable rather than failing the whole listing.
    let rejection = match Rejection::try_from(rej.clone()) {
        Ok(x) => x,
        Err(_) => Rejection::new(
            RejectCode::DecodeFailed,
            rej.field,
            format!("[{}] {}", rej.code, rej.reason),
        ),
    };
    Ok(RejectionRecord {
        sequence: seq,
        rejection,
        raw: r.raw,
        received_at: from_pb_time("received_at", r.received_at)
            .map_err(|e| StoreError::corrupt(what(), e.to_string()))?,
        origin: r.origin,
        event_id: r.event_id,
        customer_id: r.customer_id,
    })
}

impl SledStore {
    /// Restore exported records into this store, continuing its chain: each record must be the
    /// next position, its customer's next version, recorded no earlier than the head, and its
    /// recomputed hash (from the event's canonical encoding, the position, the version, the
    /// `recorded_at` and the head's hash) must equal the exported hash. Records with the same
    /// `recorded_at` are committed together, as the original append did; nothing of a group is
    /// written unless every record of it matches. Returns the new head.
    ///
    /// The result holds the same records (same bytes, positions, versions and hashes) as the
    /// ledger that was exported, provided it uses the same checkpoint interval; the rejections
    /// record is not part of an export and is not restored.
    pub fn restore(&self, records: Vec<Committed>) -> Result<Head, StoreError> {
        let mut start = 0;
        while start < records.len() {
            let at = records[start].recorded_at;
            let mut end = start + 1;
            while end < records.len() && records[end].recorded_at == at && end - start < 4096 {
                end += 1;
            }
            let group = &records[start..end];
            let mut prev = self.head().hash;
            for c in group {
                if c.prev_hash != prev {
                    return Err(StoreError::RestoreMismatch {
                        position: c.position,
                        detail: format!(
                            "prev_hash {} is not the hash of the record before it ({prev})",
                            c.prev_hash
                        ),
                    });
                }
                prev = c.hash;
            }
            let items = group
                .iter()
                .map(|c| AppendItem {
                    event: c.event.clone(),
                    expected_customer_version: Some(c.customer_version.saturating_sub(1)),
                    raw: None,
                    origin: format!("restore:{}", c.position),
                })
                .collect();
            self.append_inner(items, true, Some((at, group)))?;
            start = end;
        }
        Ok(self.head())
    }
}

impl SledStore {
    /// Append events the ledger derives itself (`model_fitted`, `churn_risk_assessed`, source
    /// `ledger`). Only the ledger's own code calls this; no NATS subject, file or HTTP route
    /// reaches it: every outside path goes through [`EventStore::append`], which refuses them
    /// with `SOURCE_RESERVED`. Otherwise the same as `append`.
    pub fn append_ledger_events(
        &self,
        batch: Vec<AppendItem>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        self.append_inner(batch, true, None)
    }
}

impl EventStore for SledStore {
    /// The outside path: derived kinds and source `ledger` are refused (`SOURCE_RESERVED`).
    fn append(&self, batch: Vec<AppendItem>) -> Result<Vec<AppendOutcome>, StoreError> {
        self.append_inner(batch, false, None)
    }

    fn record_rejections(&self, records: Vec<RejectionRecord>) -> Result<Vec<u64>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut w = self.lock_writer();
        if w.failed {
            return Err(StoreError::NeedsReopen);
        }
        let now = (self.config.clock)();
        let mut sb = sled::Batch::default();
        let mut seqs = Vec::with_capacity(records.len());
        let mut next = w.next_rejection;
        let mut bytes = 0u64;
        let mut seen = HashMap::new();
        for mut r in records {
            // One record per distinct input: a redelivery gets the first record's sequence.
            let digest = layout::rejection_digest_key(r.rejection.code.as_str(), &r.origin, &r.raw);
            if let Some(seq) = seen.get(&digest) {
                seqs.push(*seq);
                continue;
            }
            if let Some(v) = self.tree.get(digest)? {
                let seq = layout::read_u64(&v).unwrap_or(0);
                seen.insert(digest, seq);
                seqs.push(seq);
                continue;
            }
            r.sequence = next;
            if r.received_at == Timestamp::EPOCH {
                r.received_at = now;
            }
            let v = encode_rejection(&r);
            bytes += v.len() as u64 + 16 + 41;
            sb.insert(&layout::rejection_key(next), v);
            sb.insert(&digest[..], &next.to_be_bytes());
            seen.insert(digest, next);
            seqs.push(next);
            next += 1;
        }
        if next == w.next_rejection {
            return Ok(seqs);
        }
        self.commit(&mut w, sb, bytes)?;
        w.next_rejection = next;
        Ok(seqs)
    }

    fn head(&self) -> Head {
        *self.head_tx.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<Head> {
        self.head_tx.subscribe()
    }

    fn get(&self, position: u64) -> Result<Option<Committed>, StoreError> {
        self.load(position)
    }

    fn position_of(&self, event_id: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.lookup_id(event_id)?.map(|(p, _)| p))
    }

    fn customer_version(&self, customer_id: &str) -> Result<u64, StoreError> {
        if let Some(v) = self.read_tail().version(customer_id) {
            return Ok(v);
        }
        durable_customer_version(&self.tree, customer_id)
    }

    fn read(&self, f: &ReadFilter) -> Events<'_> {
        let from = f.from_position.max(1);
        let to = f.to_position.unwrap_or(u64::MAX);
        if from > to {
            return Box::new(std::iter::empty());
        }
        let (since, until) = (f.occurred_since, f.occurred_until);
        let in_time = move |c: &Committed| {
            since.is_none_or(|s| c.event.occurred_at >= s)
                && until.is_none_or(|u| c.event.occurred_at < u)
        };
        if let Some(customer) = &f.customer {
            let kind = f.kind;
            // The customer's versions are in position order, so stop past `to`.
            let positions = self
                .customer_positions(customer)
                .filter(move |p| p.as_ref().map_or(true, |p| *p >= from))
                .take_while(move |p| p.as_ref().map_or(true, |p| *p <= to));
            return self.by_positions(positions, move |c| {
                kind.is_none_or(|k| c.event.kind() == k) && in_time(c)
            });
        }
        if let Some(kind) = f.kind {
            return self.by_positions(self.kind_positions(kind, from, to), in_time);
        }
        match BlockScan::new(&self.tree, from, to) {
            Ok(scan) => scan.with_zone(since, until).into_events(in_time),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }

    fn read_raw(&self, from_position: u64, to_position: Option<u64>) -> RawRecords<'_> {
        let from = from_position.max(1);
        let to = to_position.unwrap_or(u64::MAX);
        if from > to {
            return Box::new(std::iter::empty());
        }
        let mut scan = match BlockScan::new(&self.tree, from, to) {
            Ok(s) => s,
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        Box::new(std::iter::from_fn(move || {
            let position = match scan.next_entry()? {
                Ok(p) => p,
                Err(e) => return Some(Err(e)),
            };
            Some(
                scan.current()
                    .and_then(|b| b.entry(position))
                    .map(|(hash, record)| RawRecord {
                        position,
                        hash: Hash::from_slice(hash).unwrap_or_default(),
                        record: record.to_vec(),
                    })
                    .ok_or_else(|| StoreError::corrupt("block scan", "no current block")),
            )
        }))
    }

    fn checkpoints(&self) -> Box<dyn Iterator<Item = Result<Checkpoint, StoreError>> + Send + '_> {
        self.checkpoints_from(0)
    }

    fn checkpoints_from(
        &self,
        from: u64,
    ) -> Box<dyn Iterator<Item = Result<Checkpoint, StoreError>> + Send + '_> {
        let range = layout::checkpoint_key(from)..=layout::checkpoint_key(u64::MAX);
        Box::new(self.tree.range(range).map(|kv| {
            let (k, v) = kv?;
            let pos = layout::trailing_u64(&k).unwrap_or(0);
            let what = || format!("checkpoint {pos}");
            let cp = v1::Checkpoint::decode(v.as_ref())
                .map_err(|e| StoreError::corrupt(what(), e.to_string()))?;
            Ok(Checkpoint {
                position: cp.position,
                hash: Hash::from_slice(&cp.hash)
                    .ok_or_else(|| StoreError::corrupt(what(), "hash is not 32 bytes"))?,
                recorded_at: from_pb_time("recorded_at", cp.recorded_at)
                    .map_err(|e| StoreError::corrupt(what(), e.to_string()))?,
            })
        }))
    }

    fn rejections(
        &self,
    ) -> Box<dyn Iterator<Item = Result<RejectionRecord, StoreError>> + Send + '_> {
        Box::new(self.tree.scan_prefix([layout::REJECTION]).map(|kv| {
            let (k, v) = kv?;
            decode_rejection(layout::trailing_u64(&k).unwrap_or(0), &v)
        }))
    }

    fn verify(&self) -> Result<VerifyReport, StoreError> {
        // Hold the writer lock so the chain does not move under the check.
        let _w = self.lock_writer();
        verify::verify(&self.tree)
    }

    fn stats(&self) -> Result<Stats, StoreError> {
        // The writer lock keeps the tail and the durable index from moving between the two
        // counts below.
        let _w = self.lock_writer();
        let mut by_kind = Vec::new();
        for kind in EventKind::ALL {
            let mut n = 0u64;
            for kv in self.tree.scan_prefix([layout::KIND, kind.code()]) {
                n += (kv?.1.len() / 8) as u64;
            }
            if n > 0 {
                by_kind.push((kind, n));
            }
        }
        let mut customers = self
            .read_tail()
            .runs
            .values()
            .filter(|(first, _)| *first == 1)
            .count() as u64;
        for kv in self.tree.scan_prefix([layout::CUSTOMER]) {
            let (k, _) = kv?;
            if layout::parse_customer_key(&k).is_some_and(|(_, v)| v == 1) {
                customers += 1;
            }
        }
        let mut rejections: std::collections::BTreeMap<String, u64> = Default::default();
        for r in self.rejections() {
            *rejections
                .entry(r?.rejection.code.as_str().to_owned())
                .or_default() += 1;
        }
        Ok(Stats {
            head: self.head(),
            by_kind,
            customers,
            checkpoints: self.tree.scan_prefix([layout::CHECKPOINT]).count() as u64,
            rejections: rejections.into_iter().collect(),
            size_on_disk: self.db.size_on_disk()?,
        })
    }
}

enum Decision {
    Outcome(AppendOutcome),
    Append {
        envelope: Vec<u8>,
        digest: [u8; 32],
        customer_version: u64,
    },
}

impl SledStore {
    /// Decide one item's fate given the store and what this batch already staged.
    #[expect(
        clippy::too_many_arguments,
        reason = "the writer's batch state, passed apart so that each borrow stays narrow"
    )]
    fn decide(
        &self,
        item: &AppendItem,
        from_ledger: bool,
        now: Timestamp,
        staged: &mut HashMap<String, Staged>,
        runs: &HashMap<String, (u64, Vec<u64>)>,
        cache: &VersionCache,
        tail: &CustomerTail,
    ) -> Result<Decision, StoreError> {
        let e = &item.event;
        let reject = |r: Rejection| Ok(Decision::Outcome(AppendOutcome::Rejected(r)));
        if let Err(r) = e.validate(&self.config.validation, now) {
            return reject(r);
        }
        // The ledger's own events come only from the ledger (and from a restore, which checks
        // them against the chain), whatever their fields say.
        if !from_ledger && (e.kind().is_derived() || e.source == LEDGER_SOURCE) {
            return reject(Rejection::new(
                RejectCode::SourceReserved,
                "source",
                format!(
                    "{} events with source \"{LEDGER_SOURCE}\" are written only by the ledger itself and cannot be appended from outside",
                    e.kind()
                ),
            ));
        }
        // Every customer's event belongs to its partition, whatever the path (a restore too);
        // only the ledger's own model events (reserved `_` customers) belong to every partition.
        let ledger_own = from_ledger && e.customer_id.starts_with('_');
        if !ledger_own && !self.config.partition.owns(&e.customer_id) {
            return reject(Rejection::new(
                RejectCode::WrongPartition,
                "customer_id",
                format!(
                    "customer {} belongs to partition {} of {}; this store holds {}",
                    e.customer_id,
                    touchledger_domain::partition::partition_of(
                        &e.customer_id,
                        self.config.partition.count
                    ),
                    self.config.partition.count,
                    self.config.partition
                ),
            ));
        }
        let envelope = encode_event(e);
        let digest = *blake3::hash(&envelope).as_bytes();
        let existing = match staged.get(&e.event_id) {
            Some(s) => Some((s.position, s.digest)),
            None => self.lookup_id(&e.event_id)?,
        };
        if let Some((position, stored)) = existing {
            return if stored == digest {
                Ok(Decision::Outcome(AppendOutcome::Duplicate { position }))
            } else {
                reject(Rejection::new(
                    RejectCode::EventIdConflict,
                    "event_id",
                    format!(
                        "event_id {:?} is already stored at position {position} with different content",
                        e.event_id
                    ),
                ))
            };
        }
        let current = match runs
            .get(&e.customer_id)
            .map(|(first, ps)| first + ps.len() as u64 - 1)
            .or_else(|| cache.get(&e.customer_id))
            .or_else(|| tail.version(&e.customer_id))
        {
            Some(v) => v,
            None => durable_customer_version(&self.tree, &e.customer_id)?,
        };
        if let Some(expected) = item.expected_customer_version
            && expected != current
        {
            return Ok(Decision::Outcome(AppendOutcome::VersionConflict {
                expected,
                actual: current,
            }));
        }
        if let Payload::Retraction(r) = &e.payload {
            let target = match staged.get(&r.retracted_event_id) {
                Some(s) => Some((s.customer_id.clone(), s.kind)),
                None => match self.lookup_id(&r.retracted_event_id)? {
                    Some((pos, _)) => self
                        .load(pos)?
                        .map(|c| (c.event.customer_id.clone(), c.event.kind())),
                    None => None,
                },
            };
            let field = "retraction.retracted_event_id";
            match target {
                None => {
                    return reject(Rejection::new(
                        RejectCode::RetractionTargetUnknown,
                        field,
                        format!("no stored event has event_id {:?}", r.retracted_event_id),
                    ));
                }
                Some((_, EventKind::Retraction)) => {
                    return reject(Rejection::new(
                        RejectCode::RetractionTargetInvalid,
                        field,
                        "a retraction cannot be retracted; append the original event again under a new id",
                    ));
                }
                Some((customer, _)) if customer != e.customer_id => {
                    return reject(Rejection::new(
                        RejectCode::RetractionTargetInvalid,
                        field,
                        format!(
                            "event {:?} belongs to another customer",
                            r.retracted_event_id
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(Decision::Append {
            envelope,
            digest,
            customer_version: current + 1,
        })
    }
}

impl SledStore {
    /// The append. `restore`: the `recorded_at` to use and the records the outcomes must equal
    /// (checked before anything is written).
    fn append_inner(
        &self,
        batch: Vec<AppendItem>,
        from_ledger: bool,
        restore: Option<(Timestamp, &[Committed])>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let mut w = self.lock_writer();
        if w.failed {
            return Err(StoreError::NeedsReopen);
        }
        // Knowledge time never goes backwards along positions, even if the wall clock does.
        let now = match restore {
            Some((at, _)) if at < w.head.recorded_at => {
                return Err(StoreError::RestoreMismatch {
                    position: w.head.position + 1,
                    detail: format!(
                        "recorded_at {at} is before the head's {}",
                        w.head.recorded_at
                    ),
                });
            }
            Some((at, _)) => at,
            None => (self.config.clock)().max(w.head.recorded_at),
        };
        let mut head = w.head;
        let mut next_rejection = w.next_rejection;
        let mut sb = sled::Batch::default();
        let mut staged: HashMap<String, Staged> = HashMap::new();
        // customer → (first version in this batch, positions), in first-appearance order.
        let mut runs: HashMap<String, (u64, Vec<u64>)> = HashMap::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut kinds: [Vec<u64>; EventKind::ALL.len()] = Default::default();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut dirty = false;
        let mut seen_rejections: std::collections::HashSet<[u8; 33]> =
            std::collections::HashSet::new();

        // Only this writer changes the tail, so one read guard serves the whole batch; it is
        // released before the commit, after which the tail is updated.
        let tail = self.read_tail();
        for item in batch {
            let outcome = self.decide(
                &item,
                from_ledger,
                now,
                &mut staged,
                &runs,
                &w.versions,
                &tail,
            )?;
            match outcome {
                Decision::Outcome(o) => {
                    let rejected = match &o {
                        AppendOutcome::Rejected(r) => {
                            let raw = item.raw.unwrap_or_else(|| encode_event(&item.event));
                            let digest =
                                layout::rejection_digest_key(r.code.as_str(), &item.origin, &raw);
                            // One record per distinct input: a redelivery is not recorded again.
                            self.first_rejection(&digest, &seen_rejections)?
                                .then_some((r, raw, digest))
                        }
                        _ => None,
                    };
                    if let Some((r, raw, digest)) = rejected {
                        seen_rejections.insert(digest);
                        sb.insert(&digest[..], &next_rejection.to_be_bytes());
                        let rec = RejectionRecord {
                            sequence: next_rejection,
                            rejection: r.clone(),
                            raw,
                            received_at: now,
                            origin: item.origin,
                            event_id: item.event.event_id,
                            customer_id: item.event.customer_id,
                        };
                        sb.insert(
                            &layout::rejection_key(next_rejection),
                            encode_rejection(&rec),
                        );
                        next_rejection += 1;
                        dirty = true;
                    }
                    outcomes.push(o);
                }
                Decision::Append {
                    envelope,
                    digest,
                    customer_version,
                } => {
                    let position = head.position + 1;
                    let e = item.event;
                    let record =
                        encode_record(position, customer_version, &head.hash, now, &envelope);
                    let hash = chain_hash(&head.hash, &record);
                    let mut idv = Vec::with_capacity(40);
                    idv.extend_from_slice(&position.to_be_bytes());
                    idv.extend_from_slice(&digest);
                    sb.insert(layout::event_id_key(&e.event_id), idv);
                    if position.is_multiple_of(self.config.checkpoint_interval) {
                        let cp = v1::Checkpoint {
                            position,
                            hash: hash.0.to_vec(),
                            recorded_at: Some(to_pb_time(now)),
                        };
                        sb.insert(&layout::checkpoint_key(position), cp.encode_to_vec());
                    }
                    let kind = e.kind();
                    if let Some(k) = EventKind::ALL.iter().position(|k| *k == kind) {
                        kinds[k].push(position);
                    }
                    match runs.get_mut(&e.customer_id) {
                        Some((_, ps)) => ps.push(position),
                        None => {
                            runs.insert(e.customer_id.clone(), (customer_version, vec![position]));
                        }
                    }
                    pending.push(Pending {
                        position,
                        hash: hash.0,
                        record,
                        occurred_at: e.occurred_at,
                    });
                    staged.insert(
                        e.event_id,
                        Staged {
                            position,
                            digest,
                            customer_id: e.customer_id,
                            kind,
                        },
                    );
                    head = Head {
                        position,
                        hash,
                        recorded_at: now,
                    };
                    dirty = true;
                    outcomes.push(AppendOutcome::Appended {
                        position,
                        customer_version,
                        hash,
                    });
                }
            }
        }
        if let Some((_, expected)) = restore {
            for (o, c) in outcomes.iter().zip(expected) {
                let detail = match o {
                    AppendOutcome::Appended {
                        position,
                        customer_version,
                        hash,
                    } => {
                        if *position != c.position {
                            Some(format!("the store's next position is {position}"))
                        } else if *customer_version != c.customer_version {
                            Some(format!(
                                "customer {:?} is at version {} here, the record says {}",
                                c.event.customer_id,
                                customer_version - 1,
                                c.customer_version
                            ))
                        } else if *hash != c.hash {
                            Some(format!(
                                "the recomputed hash {hash} differs from the recorded {} (the record or an earlier one was changed)",
                                c.hash
                            ))
                        } else {
                            None
                        }
                    }
                    AppendOutcome::Duplicate { position } => Some(format!(
                        "event_id {:?} is already stored at position {position}",
                        c.event.event_id
                    )),
                    AppendOutcome::VersionConflict { actual, .. } => Some(format!(
                        "customer {:?} is at version {actual} here, the record says {}",
                        c.event.customer_id, c.customer_version
                    )),
                    AppendOutcome::Rejected(r) => Some(format!("the event is rejected: {r}")),
                };
                if let Some(detail) = detail {
                    return Err(StoreError::RestoreMismatch {
                        position: c.position,
                        detail,
                    });
                }
            }
        }
        if !dirty {
            return Ok(outcomes);
        }
        let tail_entries = tail.entries;

        // Records → blocks of consecutive positions.
        let mut start = 0;
        while start < pending.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < pending.len()
                && end - start < layout::BLOCK_MAX_RECORDS
                && (end == start || bytes < layout::BLOCK_MAX_BYTES)
            {
                bytes += HASH_LEN + pending[end].record.len();
                end += 1;
            }
            let slice = &pending[start..end];
            let zone = slice.iter().fold(
                (
                    Timestamp::from_unix_nanos(i64::MAX),
                    Timestamp::from_unix_nanos(i64::MIN),
                ),
                |(lo, hi), p| (lo.min(p.occurred_at), hi.max(p.occurred_at)),
            );
            let entries: Vec<(&[u8], &[u8])> = slice
                .iter()
                .map(|p| (&p.hash[..], p.record.as_slice()))
                .collect();
            let block = layout::encode_block(&entries, zone);
            sb.insert(&layout::block_key(pending[start].position), block);
            start = end;
        }
        for (kind, positions) in EventKind::ALL.iter().zip(&kinds) {
            if let Some(first) = positions.first() {
                sb.insert(
                    &layout::kind_key(*kind, *first),
                    layout::encode_positions(positions),
                );
            }
        }
        // Customer index: every `customer_index_batch` events, the tail and this batch go to
        // disk as one run per customer, with the new watermark, atomically with the batch.
        let appended: usize = pending.len();
        let flush_index = {
            if tail_entries + appended >= self.config.customer_index_batch {
                for (customer, (first, positions)) in &tail.runs {
                    let mut all = positions.clone();
                    if let Some((_, more)) = runs.get(customer) {
                        all.extend_from_slice(more);
                    }
                    sb.insert(
                        layout::customer_key(customer, *first),
                        layout::encode_positions(&all),
                    );
                }
                for (customer, (first, positions)) in &runs {
                    if !tail.runs.contains_key(customer) {
                        sb.insert(
                            layout::customer_key(customer, *first),
                            layout::encode_positions(positions),
                        );
                    }
                }
                sb.insert(layout::META_CUSTOMER_INDEX, &head.position.to_be_bytes());
                true
            } else {
                false
            }
        };
        drop(tail);

        // What the batch adds, roughly: records, their hashes and per-event index entries.
        let bytes = pending
            .iter()
            .map(|p| (p.record.len() + HASH_LEN + 64) as u64)
            .sum::<u64>();
        self.commit(&mut w, sb, bytes)?;
        {
            let mut tail = self.write_tail();
            if flush_index {
                *tail = CustomerTail {
                    upto: head.position,
                    ..CustomerTail::default()
                };
            } else {
                for (customer, (first, positions)) in &runs {
                    for (i, p) in positions.iter().enumerate() {
                        tail.push(customer, first + i as u64, *p);
                    }
                }
            }
        }
        let advanced = head.position != w.head.position;
        w.head = head;
        w.next_rejection = next_rejection;
        for (customer, (first, positions)) in runs {
            w.versions
                .insert(customer, first + positions.len() as u64 - 1);
        }
        if advanced {
            self.head_tx.send_replace(head);
        }
        Ok(outcomes)
    }
}

/// Record the store's partition when it is new; refuse an open that asks for another one. A
/// store without the record predates partitions and is partition 0 of 1.
fn check_partition(
    db: &sled::Db,
    tree: &sled::Tree,
    config: &StoreConfig,
) -> Result<(), StoreError> {
    use touchledger_domain::partition::PartitionId;
    let wanted = config.partition;
    let found = match tree.get(layout::META_PARTITION)? {
        Some(v) if v.len() == 8 => {
            let index = u32::from_be_bytes(v[..4].try_into().expect("4 bytes"));
            let count = u32::from_be_bytes(v[4..].try_into().expect("4 bytes"));
            PartitionId::new(index, count)
                .map_err(|e| StoreError::corrupt("partition record", e))?
        }
        Some(_) => return Err(StoreError::corrupt("partition record", "not 8 bytes")),
        None if load_head(tree)?.position == 0 => {
            let mut v = [0u8; 8];
            v[..4].copy_from_slice(&wanted.index.to_be_bytes());
            v[4..].copy_from_slice(&wanted.count.to_be_bytes());
            tree.insert(layout::META_PARTITION, &v)?;
            db.flush()?;
            wanted
        }
        None => PartitionId::SINGLE,
    };
    if found != wanted {
        return Err(StoreError::PartitionMismatch {
            path: config.path.clone(),
            found,
            expected: wanted,
        });
    }
    Ok(())
}
