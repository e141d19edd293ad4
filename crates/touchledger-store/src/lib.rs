//! The event store: the ledger's system of record.
//!
//! Key decisions (see `docs/adr/0002-event-store-on-sled.md`):
//! * **One trait, one engine.** Callers use [`EventStore`]; [`SledStore`] implements it on
//!   sled 0.34. Sled has known crash-corruption reports upstream, so nothing above this crate
//!   may depend on sled, and the crash and tamper tests run against this trait's guarantees.
//! * **Group commit.** [`EventStore::append`] takes a batch, decides one outcome per item,
//!   writes every record, index entry, checkpoint and rejection of the batch in one atomic sled
//!   batch, and returns only after `flush` (fsync). An outcome in hand means durably recorded.
//! * **Few keys per event** (format 2, ADR 0005): sled's cost is per key, so records are packed
//!   into blocks and the kind and customer indexes into runs; only the event-id index has a key
//!   per event.
//! * **Single writer.** Appends are serialised by a mutex that owns the chain head, so positions
//!   are gapless and the hash chain has no forks; reads never take it (only `verify` and
//!   `stats`, which need the log to stand still).
//! * **Expected outcomes are values.** Duplicates, rejections and version conflicts are
//!   [`AppendOutcome`]s; a failed verification is a [`VerifyReport`]. Only the storage itself
//!   failing is a [`StoreError`].

mod error;
mod global;
pub mod layout;
mod projection;
mod recover;
mod sled_store;
mod space;
mod verify;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

pub use error::StoreError;
pub use global::GlobalCheckpoint;
pub use projection::{DueIndex, ProjectionDb, ProjectionMeta, ProjectionTree};
pub use recover::{QUARANTINE_DIR, Quarantined, quarantine_leftovers, set_aside};
pub use sled_store::{LEDGER_MARKER, SledStore};
pub use space::{FreeSpace, SpaceReserve, free_space};
pub use tokio::sync::watch;
use touchledger_domain::{Event, EventKind, RejectCode, Rejection, Timestamp, ValidationPolicy};
pub use verify::{VerifyProblem, VerifyReport};

/// A 32-byte BLAKE3 chain hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The `prev_hash` of position 1.
    pub const ZERO: Hash = Hash([0; 32]);

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// From a 32-byte slice.
    pub fn from_slice(b: &[u8]) -> Option<Hash> {
        Some(Hash(b.try_into().ok()?))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

/// The end of the chain: the last position (0 when empty) and its hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Head {
    /// Last committed position; 0 for an empty ledger.
    pub position: u64,
    /// Hash of that record ([`Hash::ZERO`] when empty).
    pub hash: Hash,
    /// Its `recorded_at`.
    pub recorded_at: Timestamp,
}

/// One event to append.
#[derive(Clone, Debug)]
pub struct AppendItem {
    /// The event.
    pub event: Event,
    /// Optimistic concurrency: append only if the customer's current version is this
    /// (0 = no events yet). `None` = append unconditionally.
    pub expected_customer_version: Option<u64>,
    /// The bytes as received, kept in the rejections record if the event is rejected.
    /// `None` = keep the canonical protobuf encoding instead.
    pub raw: Option<Vec<u8>>,
    /// Where the event came from, e.g. `file:events.jsonl:17`; kept with a rejection.
    pub origin: String,
}

impl AppendItem {
    /// An unconditional append with no raw bytes or origin.
    pub fn new(event: Event) -> Self {
        AppendItem {
            event,
            expected_customer_version: None,
            raw: None,
            origin: String::new(),
        }
    }

    /// Set the expected customer version.
    pub fn expect_version(mut self, v: u64) -> Self {
        self.expected_customer_version = Some(v);
        self
    }
}

/// What happened to one [`AppendItem`]. Every variant is final: the batch is already flushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Newly stored.
    Appended {
        /// Its global position.
        position: u64,
        /// Its per-customer version.
        customer_version: u64,
        /// Its chain hash.
        hash: Hash,
    },
    /// The identical event (same id, same content) is already stored; nothing new was written.
    Duplicate {
        /// Position of the original.
        position: u64,
    },
    /// The expected customer version did not match; nothing was written for this item.
    VersionConflict {
        /// What the caller expected.
        expected: u64,
        /// The customer's actual version.
        actual: u64,
    },
    /// Bad input; recorded in the rejections record.
    Rejected(Rejection),
}

impl AppendOutcome {
    /// A short stable label: `appended`, `duplicate`, `version_conflict` or the rejection code.
    pub fn label(&self) -> &'static str {
        match self {
            AppendOutcome::Appended { .. } => "appended",
            AppendOutcome::Duplicate { .. } => "duplicate",
            AppendOutcome::VersionConflict { .. } => "version_conflict",
            AppendOutcome::Rejected(r) => r.code.as_str(),
        }
    }
}

/// One committed event as read back.
#[derive(Clone, Debug, PartialEq)]
pub struct Committed {
    /// Global position.
    pub position: u64,
    /// Per-customer version.
    pub customer_version: u64,
    /// Knowledge time: when the ledger stored it.
    pub recorded_at: Timestamp,
    /// Hash of the previous record.
    pub prev_hash: Hash,
    /// This record's hash.
    pub hash: Hash,
    /// The event.
    pub event: Event,
}

/// One stored record exactly as hashed: `hash = BLAKE3(prev_hash ‖ record)`, where `record` is
/// the `touchledger.v1.StoredRecord` protobuf (it carries position, version, prev_hash,
/// recorded_at and the event). Forwarding these bytes lets a remote consumer verify the chain
/// itself, and costs no decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    /// Global position.
    pub position: u64,
    /// The record's chain hash.
    pub hash: Hash,
    /// The exact stored `StoredRecord` bytes.
    pub record: Vec<u8>,
}

/// A stream of raw records in position order.
pub type RawRecords<'a> = Box<dyn Iterator<Item = Result<RawRecord, StoreError>> + Send + 'a>;

impl RawRecord {
    /// The event's kind and customer, read without decoding the record (no allocation);
    /// `None` if the bytes are not a well-formed record ([`RawRecord::decode`] then says why).
    pub fn peek(&self) -> Option<(EventKind, &str)> {
        touchledger_proto::peek_record(&self.record)
    }

    /// Decode the record (what [`EventStore::read`] returns for its position): a reader that
    /// needs only some records can skip the others after a [`RawRecord::peek`].
    pub fn decode(&self) -> Result<Committed, StoreError> {
        sled_store::decode_record(self.position, &self.hash.0, &self.record)
    }
}

impl Committed {
    /// The exact stored `StoredRecord` bytes of this event (the bytes its hash covers). Encoding
    /// is canonical, so re-encoding a read event reproduces what was stored.
    pub fn record_bytes(&self) -> Vec<u8> {
        sled_store::encode_record(
            self.position,
            self.customer_version,
            &self.prev_hash,
            self.recorded_at,
            &touchledger_proto::encode_event(&self.event),
        )
    }
}

/// A rejected input, as kept in the rejections record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectionRecord {
    /// Sequence number in the rejections record (assigned on write; ignored on input).
    pub sequence: u64,
    /// Why.
    pub rejection: Rejection,
    /// The bytes as received.
    pub raw: Vec<u8>,
    /// When the ledger received them.
    pub received_at: Timestamp,
    /// Where they came from.
    pub origin: String,
    /// Best-effort ids (may be empty).
    pub event_id: String,
    /// Best-effort customer id (may be empty).
    pub customer_id: String,
}

/// A stored (position, hash) checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Position.
    pub position: u64,
    /// Hash at that position.
    pub hash: Hash,
    /// `recorded_at` of that record.
    pub recorded_at: Timestamp,
}

/// Which events to read. All filters combine with AND; results are in position order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadFilter {
    /// First position, inclusive (0 or 1 = from the start).
    pub from_position: u64,
    /// Last position, inclusive (`None` = to the head at the time of the call).
    pub to_position: Option<u64>,
    /// Only this customer (uses the customer index).
    pub customer: Option<String>,
    /// Only this kind (uses the kind index).
    pub kind: Option<EventKind>,
    /// Only events with `occurred_at >= since`. (Business time is a filter, not an order: a
    /// read without customer or kind skips every block whose `occurred_at` range cannot match.)
    pub occurred_since: Option<Timestamp>,
    /// Only events with `occurred_at < until`.
    pub occurred_until: Option<Timestamp>,
}

/// A stream of committed events. Reads are lazy: memory stays bounded for any range.
pub type Events<'a> = Box<dyn Iterator<Item = Result<Committed, StoreError>> + Send + 'a>;

/// Counts for `touchledger stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// The head.
    pub head: Head,
    /// Events per kind.
    pub by_kind: Vec<(EventKind, u64)>,
    /// Distinct customers.
    pub customers: u64,
    /// Stored checkpoints.
    pub checkpoints: u64,
    /// Rejections per code.
    pub rejections: Vec<(String, u64)>,
    /// Bytes on disk.
    pub size_on_disk: u64,
}

/// Store configuration. Defaults are documented per field.
#[derive(Clone)]
pub struct StoreConfig {
    /// Data directory (created if missing).
    pub path: PathBuf,
    /// Sled page-cache size in bytes; bounds the store's memory. Default 256 MiB.
    pub cache_capacity: u64,
    /// A checkpoint is stored at every position divisible by this. Default 1000.
    pub checkpoint_interval: u64,
    /// Validation limits. Default [`ValidationPolicy::default`].
    pub validation: ValidationPolicy,
    /// Customers whose current version the writer keeps in memory (a bounded cache in front
    /// of the customer index). Default 100,000 (a few MiB).
    pub customer_cache_capacity: usize,
    /// How long `open` waits for the directory lock held by another handle. Default 2 s.
    pub lock_timeout: std::time::Duration,
    /// The customer index is written to disk once this many events have accumulated since the
    /// last time, as one run per customer (until then its newest entries are held in memory and
    /// rebuilt from the records after a crash). Larger values write fewer keys when customers
    /// recur, at the cost of memory (~100 bytes per event) and of a longer commit when the runs
    /// are written. Default 32,768.
    pub customer_index_batch: usize,
    /// The ledger's clock (for `recorded_at` and the future-skew rule). Default: wall clock.
    /// Tests substitute a fixed clock.
    pub clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    /// Free space the store keeps on its filesystem: a commit that would go below it is
    /// refused with [`StoreError::StorageFull`] before anything is written. Default: the larger
    /// of 256 MiB and 5 % of the filesystem, plus twice the newest sled snapshot.
    pub space_reserve: SpaceReserve,
    /// Which partition of the ledger this store holds, and the ledger's partition count. Stored
    /// when the store is created and checked on every open
    /// ([`StoreError::PartitionMismatch`]); an event of a customer of another partition is
    /// rejected (`WRONG_PARTITION`). Default [`touchledger_domain::partition::PartitionId::SINGLE`] (an unpartitioned ledger).
    pub partition: touchledger_domain::partition::PartitionId,
}

impl StoreConfig {
    /// Defaults for a data directory.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreConfig {
            path: path.into(),
            cache_capacity: 256 * 1024 * 1024,
            checkpoint_interval: 1000,
            validation: ValidationPolicy::default(),
            lock_timeout: std::time::Duration::from_secs(2),
            customer_cache_capacity: 100_000,
            customer_index_batch: 32_768,
            clock: Arc::new(Timestamp::now),
            space_reserve: SpaceReserve::default(),
            partition: touchledger_domain::partition::PartitionId::SINGLE,
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("path", &self.path)
            .field("cache_capacity", &self.cache_capacity)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("validation", &self.validation)
            .field("lock_timeout", &self.lock_timeout)
            .field("customer_cache_capacity", &self.customer_cache_capacity)
            .field("customer_index_batch", &self.customer_index_batch)
            .field("space_reserve", &self.space_reserve)
            .finish_non_exhaustive()
    }
}

/// The ledger's store. Implementations must uphold the guarantees of brief §5: an outcome is
/// returned only after the batch is durable; positions are gapless; customer versions are
/// gapless from 1; event ids are unique forever; nothing is edited or deleted.
pub trait EventStore: Send + Sync {
    /// Append a batch atomically with one flush; one outcome per item, in order.
    /// On `Err`, nothing of the batch was committed.
    fn append(&self, batch: Vec<AppendItem>) -> Result<Vec<AppendOutcome>, StoreError>;

    /// Keep rejected input that never became an event (e.g. undecodable bytes). Flushed before
    /// returning. Returns the assigned sequence numbers.
    fn record_rejections(&self, records: Vec<RejectionRecord>) -> Result<Vec<u64>, StoreError>;

    /// The chain head.
    fn head(&self) -> Head;

    /// Watch the head: the receiver is marked changed after every committed batch, so
    /// in-process consumers can wait for new events instead of polling.
    fn subscribe(&self) -> watch::Receiver<Head>;

    /// One event by position.
    fn get(&self, position: u64) -> Result<Option<Committed>, StoreError>;

    /// Position of a stored event id.
    fn position_of(&self, event_id: &str) -> Result<Option<u64>, StoreError>;

    /// A customer's current version (0 = no events).
    fn customer_version(&self, customer_id: &str) -> Result<u64, StoreError>;

    /// Events matching `filter`, in position order, lazily.
    fn read(&self, filter: &ReadFilter) -> Events<'_>;

    /// Stored records in position order without decoding (`to = None`: to the head).
    fn read_raw(&self, from_position: u64, to_position: Option<u64>) -> RawRecords<'_>;

    /// Stored checkpoints at positions `>= from`, in position order.
    fn checkpoints_from(
        &self,
        from: u64,
    ) -> Box<dyn Iterator<Item = Result<Checkpoint, StoreError>> + Send + '_>;

    /// Stored checkpoints in position order.
    fn checkpoints(&self) -> Box<dyn Iterator<Item = Result<Checkpoint, StoreError>> + Send + '_>;

    /// The rejections record, in sequence order.
    fn rejections(
        &self,
    ) -> Box<dyn Iterator<Item = Result<RejectionRecord, StoreError>> + Send + '_>;

    /// Recompute the chain and check indexes; a failed check is a report, not an error.
    fn verify(&self) -> Result<VerifyReport, StoreError>;

    /// Counts.
    fn stats(&self) -> Result<Stats, StoreError>;
}

/// Convenience for a rejected item that never decoded: a record with a code and the raw bytes.
pub fn rejection_record(
    code: RejectCode,
    reason: impl Into<String>,
    raw: Vec<u8>,
    origin: impl Into<String>,
) -> RejectionRecord {
    RejectionRecord {
        sequence: 0,
        rejection: Rejection::new(code, "", reason),
        raw,
        received_at: Timestamp::EPOCH,
        origin: origin.into(),
        event_id: String::new(),
        customer_id: String::new(),
    }
}
