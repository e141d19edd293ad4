//! [`EventStore`] on sled 0.34 (layout in [`crate::layout`]).
//!
//! The append path, in order, under the writer lock: validate each item; look its id up
//! (duplicate or conflict); check the expected version; check a retraction's target; assign
//! position and version; encode the `StoredRecord` once and hash those exact bytes; stage the
//! record, its index entries and any checkpoint or rejection in one `sled::Batch`. Then
//! `apply_batch` (atomic, also across a crash) and `flush` (fsync), and only then the outcomes
//! are returned and the head watchers woken.

use std::collections::HashMap;
use std::sync::Mutex;

use prost::Message;
use touchledger_domain::{Event, EventKind, Payload, RejectCode, Rejection, Timestamp};
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
    head_tx: watch::Sender<Head>,
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

impl SledStore {
    /// Open (or create) the store in `config.path`, checking the on-disk format version.
    pub fn open(config: StoreConfig) -> Result<SledStore, StoreError> {
        if config.checkpoint_interval == 0 {
            return Err(StoreError::Config(
                "checkpoint_interval must be >= 1".into(),
            ));
        }
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
        let head = load_head(&tree)?;
        let next_rejection = match tree.get_lt(layout::rejection_key(u64::MAX))? {
            Some((k, _)) if k.first() == Some(&layout::REJECTION) => {
                layout::trailing_u64(&k).unwrap_or(0) + 1
            }
            _ => 1,
        };
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
            head_tx,
        })
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
    fn commit(&self, w: &mut Writer, sb: sled::Batch) -> Result<(), StoreError> {
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

    fn decode_committed(&self, position: u64, value: &[u8]) -> Result<Committed, StoreError> {
        decode_committed(position, value)
    }

    fn load(&self, position: u64) -> Result<Option<Committed>, StoreError> {
        match self.tree.get(layout::event_key(position))? {
            Some(v) => Ok(Some(self.decode_committed(position, &v)?)),
            None => Ok(None),
        }
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

    /// Lazily map index entries to committed events. The position is the last 8 bytes of the
    /// key (kind, time indexes) or, for the customer index, the value.
    fn by_index<'a>(
        &'a self,
        iter: sled::Iter,
        position_in_value: bool,
        keep: impl Fn(&Committed) -> bool + Send + 'a,
    ) -> Events<'a> {
        Box::new(iter.filter_map(move |kv| {
            let r = (|| {
                let (k, v) = kv?;
                let pos = if position_in_value {
                    layout::read_u64(&v)
                } else {
                    layout::trailing_u64(&k)
                }
                .ok_or_else(|| StoreError::corrupt("index entry", "too short"))?;
                self.load(pos)?.ok_or_else(|| {
                    StoreError::corrupt(
                        format!("position {pos}"),
                        "index points at a missing record",
                    )
                })
            })();
            match r {
                Ok(c) if keep(&c) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }
        }))
    }
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
    match tree.get_lt(layout::event_key(u64::MAX))? {
        Some((k, v)) if k.first() == Some(&layout::EVENT) => {
            let position = layout::trailing_u64(&k).unwrap_or(0);
            let c = decode_committed(position, &v)?;
            Ok(Head {
                position,
                hash: c.hash,
                recorded_at: c.recorded_at,
            })
        }
        _ => Ok(Head::default()),
    }
}

/// Decode an `e` value (hash ‖ StoredRecord bytes).
pub(crate) fn decode_committed(position: u64, value: &[u8]) -> Result<Committed, StoreError> {
    let what = || format!("position {position}");
    if value.len() < HASH_LEN {
        return Err(StoreError::corrupt(what(), "record shorter than its hash"));
    }
    let (hash, bytes) = value.split_at(HASH_LEN);
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

impl EventStore for SledStore {
    fn append(&self, batch: Vec<AppendItem>) -> Result<Vec<AppendOutcome>, StoreError> {
        let mut w = self.lock_writer();
        if w.failed {
            return Err(StoreError::NeedsReopen);
        }
        // Knowledge time never goes backwards along positions, even if the wall clock does.
        let now = (self.config.clock)().max(w.head.recorded_at);
        let mut head = w.head;
        let mut next_rejection = w.next_rejection;
        let mut sb = sled::Batch::default();
        let mut staged: HashMap<String, Staged> = HashMap::new();
        let mut versions: HashMap<String, u64> = HashMap::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut dirty = false;

        for item in batch {
            let outcome = self.decide(&item, now, &mut staged, &mut versions, &w.versions)?;
            match outcome {
                Decision::Outcome(o) => {
                    if let AppendOutcome::Rejected(r) = &o {
                        let raw = item.raw.unwrap_or_else(|| encode_event(&item.event));
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
                    let e = &item.event;
                    let record =
                        encode_record(position, customer_version, &head.hash, now, &envelope);
                    let hash = chain_hash(&head.hash, &record);
                    let mut value = Vec::with_capacity(HASH_LEN + record.len());
                    value.extend_from_slice(&hash.0);
                    value.extend_from_slice(&record);
                    sb.insert(&layout::event_key(position), value);
                    let mut idv = Vec::with_capacity(40);
                    idv.extend_from_slice(&position.to_be_bytes());
                    idv.extend_from_slice(&digest);
                    sb.insert(layout::event_id_key(&e.event_id), idv);
                    sb.insert(
                        layout::customer_key(&e.customer_id, customer_version),
                        &position.to_be_bytes(),
                    );
                    sb.insert(&layout::kind_key(e.kind(), position), &[]);
                    sb.insert(&layout::time_key(e.occurred_at, position), &[]);
                    if position.is_multiple_of(self.config.checkpoint_interval) {
                        let cp = v1::Checkpoint {
                            position,
                            hash: hash.0.to_vec(),
                            recorded_at: Some(to_pb_time(now)),
                        };
                        sb.insert(&layout::checkpoint_key(position), cp.encode_to_vec());
                    }
                    staged.insert(
                        e.event_id.clone(),
                        Staged {
                            position,
                            digest,
                            customer_id: e.customer_id.clone(),
                            kind: e.kind(),
                        },
                    );
                    versions.insert(e.customer_id.clone(), customer_version);
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

        if dirty {
            self.commit(&mut w, sb)?;
            let advanced = head.position != w.head.position;
            w.head = head;
            w.next_rejection = next_rejection;
            for (customer, version) in versions {
                w.versions.insert(customer, version);
            }
            if advanced {
                self.head_tx.send_replace(head);
            }
        }
        Ok(outcomes)
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
        for mut r in records {
            r.sequence = next;
            if r.received_at == Timestamp::EPOCH {
                r.received_at = now;
            }
            sb.insert(&layout::rejection_key(next), encode_rejection(&r));
            seqs.push(next);
            next += 1;
        }
        self.commit(&mut w, sb)?;
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
        let upper = layout::customer_key(customer_id, u64::MAX);
        let prefix = layout::customer_prefix(customer_id);
        Ok(match self.tree.get_lt(&upper)? {
            Some((k, _)) if k.starts_with(&prefix) && k.len() == prefix.len() + 8 => {
                layout::trailing_u64(&k).unwrap_or(0)
            }
            _ => 0,
        })
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
            let iter = self.tree.scan_prefix(layout::customer_prefix(customer));
            // The customer's versions are in position order, so stop past `to`.
            let events = self.by_index(iter, true, move |c| {
                (from..=to).contains(&c.position)
                    && kind.is_none_or(|k| c.event.kind() == k)
                    && in_time(c)
            });
            return Box::new(
                events.take_while(move |r| r.as_ref().map_or(true, |c| c.position <= to)),
            );
        }
        if let Some(kind) = f.kind {
            let iter = self
                .tree
                .range(layout::kind_key(kind, from)..=layout::kind_key(kind, to));
            return self.by_index(iter, false, in_time);
        }
        let iter = self
            .tree
            .range(layout::event_key(from)..=layout::event_key(to));
        Box::new(iter.filter_map(move |kv| {
            let r = (|| {
                let (k, v) = kv?;
                let pos = layout::trailing_u64(&k).unwrap_or(0);
                decode_committed(pos, &v)
            })();
            match r {
                Ok(c) if in_time(&c) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }
        }))
    }

    fn read_raw(&self, from_position: u64, to_position: Option<u64>) -> RawRecords<'_> {
        let from = from_position.max(1);
        let to = to_position.unwrap_or(u64::MAX);
        if from > to {
            return Box::new(std::iter::empty());
        }
        Box::new(
            self.tree
                .range(layout::event_key(from)..=layout::event_key(to))
                .map(|kv| {
                    let (k, v) = kv?;
                    let position = layout::trailing_u64(&k).unwrap_or(0);
                    if v.len() < HASH_LEN {
                        return Err(StoreError::corrupt(
                            format!("position {position}"),
                            "record shorter than its hash",
                        ));
                    }
                    Ok(RawRecord {
                        position,
                        hash: Hash::from_slice(&v[..HASH_LEN]).unwrap_or_default(),
                        record: v[HASH_LEN..].to_vec(),
                    })
                }),
        )
    }

    fn read_by_occurred(&self, since: Timestamp, until: Timestamp) -> Events<'_> {
        let iter = self
            .tree
            .range(layout::time_key(since, 0)..layout::time_key(until, 0));
        self.by_index(iter, false, |_| true)
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
        let mut by_kind = Vec::new();
        for kind in EventKind::ALL {
            let n = self.tree.scan_prefix([layout::KIND, kind.code()]).count() as u64;
            if n > 0 {
                by_kind.push((kind, n));
            }
        }
        let mut customers = 0u64;
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
    fn decide(
        &self,
        item: &AppendItem,
        now: Timestamp,
        staged: &mut HashMap<String, Staged>,
        versions: &mut HashMap<String, u64>,
        cache: &VersionCache,
    ) -> Result<Decision, StoreError> {
        let e = &item.event;
        let reject = |r: Rejection| Ok(Decision::Outcome(AppendOutcome::Rejected(r)));
        if let Err(r) = e.validate(&self.config.validation, now) {
            return reject(r);
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
        let current = match versions
            .get(&e.customer_id)
            .copied()
            .or_else(|| cache.get(&e.customer_id))
        {
            Some(v) => v,
            None => self.customer_version(&e.customer_id)?,
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
