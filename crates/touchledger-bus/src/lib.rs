//! The NATS service around the store: JetStream intake, synchronous append, and the
//! committed-event feed (with checkpoints). See `docs/adr/0003-nats-subjects-and-durability.md`.
//!
//! Key decisions:
//! * **The store's flush is the acknowledgement.** Intake acks a JetStream message only after
//!   the batch holding it is flushed; a synchronous append replies only after the flush. On a
//!   store failure nothing is acked (nak with backoff), so JetStream redelivers and the
//!   ledger's idempotency turns the redelivery into a duplicate.
//! * **Bad input is terminated, not redelivered:** it goes to `<prefix>.deadletter.<code>` with the
//!   original bytes and the reason in headers, is kept in the store's rejections record, and then
//!   the message is `Term`-acked.
//! * **The feed is exactly the log.** Each committed record is published into the feed stream with
//!   `Nats-Expected-Last-Sequence = position - 1`, so the stream's sequence *is* the position:
//!   after any restart the feed resumes at `last_sequence + 1` with no gap and no duplicate.
//! * Store calls block (sled flush), so they run on `spawn_blocking`.

mod append;
mod feed;
mod global;
mod intake;
mod lease;
mod ownership;
mod placement;
mod remote;
mod replay;
mod router;
mod status;
mod views;

use std::sync::Arc;
use std::time::Duration;

pub use async_nats;
use async_nats::jetstream::{self, stream};
use tokio_util::sync::CancellationToken;
use touchledger_domain::EventKind;
use touchledger_domain::partition::PartitionId;
use touchledger_store::SledStore;

pub use append::serve_append;
pub use feed::{FeedProgress, catch_up_from_feed, certified_head, run_feed};
pub use global::{
    feed_heads, global_checkpoint_stream, global_checkpoint_subject, run_global_checkpoints,
};
pub use intake::run_intake;
pub use lease::{Acquire, Fence, Lease, lease_bucket, lease_key};
pub use ownership::{
    Balance, Ownership, own_partition, owner_name, run_balancer, run_scheduled_refits,
};
pub use placement::{Group, Placement, place_leader, preferred_peer};
pub use remote::run_remote_projectors;
pub use replay::serve_replay;
pub use router::{EvaluateFailed, FitFailed, ReadError, Router, run_router};
pub use status::{ClusterStatus, GroupStatus, PartitionStatus, cluster_status};
pub use views::{OwnedPartition, OwnedViews, ViewConfig, open_current, open_month_ends, run_views};

/// The labels of a metric of one log: `extra`, and `partition` when the log is a partition's
/// (so each partition's gauges are their own series).
pub(crate) fn metric_labels(
    subjects: &Subjects,
    extra: &[(&'static str, &'static str)],
) -> Vec<metrics::Label> {
    let mut labels: Vec<metrics::Label> = extra
        .iter()
        .map(|(k, v)| metrics::Label::new(*k, *v))
        .collect();
    if let Some(p) = subjects.partition() {
        labels.push(metrics::Label::new("partition", p.to_string()));
    }
    labels
}

/// Header names used on dead-letter and feed messages.
pub mod headers {
    /// Rejection code (dead letters).
    pub const REJECT_CODE: &str = "Touchledger-Reject-Code";
    /// Offending field (dead letters).
    pub const REJECT_FIELD: &str = "Touchledger-Reject-Field";
    /// Human reason (dead letters).
    pub const REJECT_REASON: &str = "Touchledger-Reject-Reason";
    /// Subject the rejected message arrived on (dead letters).
    pub const ORIGINAL_SUBJECT: &str = "Touchledger-Original-Subject";
    /// Prefix under which a dead letter keeps the original's `Nats-*` headers (which must not
    /// reach the server again: `Touchledger-Original-Nats-Expected-Stream`, …).
    pub const ORIGINAL_HEADER_PREFIX: &str = "Touchledger-Original-";
    /// Position of a committed record (feed).
    pub const POSITION: &str = "Touchledger-Position";
    /// Chain hash of a committed record, hex (feed).
    pub const HASH: &str = "Touchledger-Hash";
    /// Original payload length when a dead letter's payload was truncated.
    pub const TRUNCATED_FROM: &str = "Touchledger-Truncated-From";
    /// Why a partition could not answer a read forwarded by the router (its reply has no
    /// body).
    pub const READ_ERROR: &str = "Touchledger-Read-Error";
    /// The partition a view or churn alert of a partitioned ledger comes from.
    pub const PARTITION: &str = "Touchledger-Partition";
    /// Which process answered a ledger-wide read of a partitioned ledger (its owner name,
    /// `host/pid/start`).
    pub const ANSWERED_BY: &str = "Touchledger-Answered-By";
    /// On a partition's page of contributions: the position its read models had folded when
    /// the page was read, and the hash of the record there (`<position>:<hex>`; the page
    /// reflects at least that much of the partition's log).
    pub const FOLDED: &str = "Touchledger-Folded";
}

/// Subject layout under a prefix (default `crm`).
///
/// The ledger's own subjects and its feed stream belong to one partition's log. In an
/// unpartitioned ledger they are `<prefix>.ledger.*` and `<PREFIX>_LEDGER_EVENTS`; in partition
/// `n` of a partitioned ledger ([`Subjects::in_partition`]) they are `<prefix>.partition.<n>.*` and
/// `<PREFIX>_LEDGER_EVENTS_P<n>`. Intake, dead letters, views, queries and alerts are shared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    partition: Option<u32>,
}

impl Subjects {
    /// Subjects under `prefix` (an unpartitioned ledger).
    pub fn new(prefix: impl Into<String>) -> Self {
        Subjects {
            prefix: prefix.into(),
            partition: None,
        }
    }

    /// The same layout for partition `n` of a partitioned ledger.
    pub fn in_partition(&self, n: u32) -> Self {
        Subjects {
            prefix: self.prefix.clone(),
            partition: Some(n),
        }
    }

    /// The partition whose log these subjects address (`None`: an unpartitioned ledger).
    pub fn partition(&self) -> Option<u32> {
        self.partition
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>.ledger` or `<prefix>.partition.<n>` (its own namespace, so that a permission
    /// `<prefix>.partition.*.append` can never match a feed subject).
    fn ledger(&self) -> String {
        match self.partition {
            None => format!("{}.ledger", self.prefix),
            Some(n) => format!("{}.partition.{n}", self.prefix),
        }
    }

    /// `<prefix>.touchpoint.<kind>.<customer>`: where producers publish.
    pub fn touchpoint(&self, kind: EventKind, customer: &str) -> String {
        format!("{}.touchpoint.{}.{}", self.prefix, kind.as_str(), customer)
    }

    /// `<prefix>.touchpoint.>`: the intake stream's subjects.
    pub fn touchpoints(&self) -> String {
        format!("{}.touchpoint.>", self.prefix)
    }

    /// `<prefix>.touchpoint.*.*`: the intake stream's subjects in a partitioned ledger (P > 1):
    /// exactly `<kind>.<customer>`, which the stream's subject transform routes.
    pub fn partitioned_touchpoints(&self) -> String {
        format!("{}.touchpoint.*.*", self.prefix)
    }

    /// The intake stream's subject transform in a ledger of `partitions` partitions: the server
    /// stores `<prefix>.touchpoint.<kind>.<customer>` as
    /// `<prefix>.touchpoint.<partition>.<kind>.<customer>`, where `<partition>` is
    /// [`touchledger_domain::partition::partition_of`] of the customer token (the same FNV-1a,
    /// computed by the server).
    pub fn partition_transform(&self, partitions: u32) -> stream::SubjectTransform {
        stream::SubjectTransform {
            source: self.partitioned_touchpoints(),
            destination: format!(
                "{}.touchpoint.{{{{partition({partitions},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}",
                self.prefix
            ),
        }
    }

    /// `<prefix>.touchpoint.<n>.*.*`: the stored touchpoints of partition `n` (what its intake
    /// consumer filters on).
    pub fn partition_touchpoints(&self, n: u32) -> String {
        format!("{}.touchpoint.{n}.*.*", self.prefix)
    }

    /// Check that a stored touchpoint's subject names the event's own kind and customer (and,
    /// when partitioned, the customer's partition). NATS routes by the subject, so a
    /// disagreement would file the event under another customer's partition.
    pub fn check_touchpoint_subject(
        &self,
        partition: PartitionId,
        subject: &str,
        event: &touchledger_domain::Event,
    ) -> Result<(), touchledger_domain::Rejection> {
        let mismatch = |reason: String| touchledger_domain::Rejection {
            code: touchledger_domain::RejectCode::SubjectMismatch,
            field: "subject".into(),
            reason,
        };
        let rest = subject
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix(".touchpoint."))
            .ok_or_else(|| mismatch(format!("{subject} is not a touchpoint subject")))?;
        let tokens: Vec<&str> = rest.split('.').collect();
        let (kind, customer) = match (partition.count, tokens.as_slice()) {
            (1, [kind, customer]) => (*kind, *customer),
            (p, [n, kind, customer]) if p > 1 => {
                let expected = touchledger_domain::partition::partition_of(&event.customer_id, p);
                if n.parse::<u32>().ok() != Some(expected) {
                    return Err(mismatch(format!(
                        "{subject} was routed to partition {n}; customer {} belongs to partition {expected} of {p}",
                        event.customer_id
                    )));
                }
                (*kind, *customer)
            }
            _ => {
                return Err(mismatch(format!(
                    "{subject} is not <prefix>.touchpoint.<kind>.<customer>"
                )));
            }
        };
        if customer != event.customer_id || kind != event.kind().as_str() {
            return Err(mismatch(format!(
                "published on {subject}, but the event is a {} of customer {}",
                event.kind().as_str(),
                event.customer_id
            )));
        }
        Ok(())
    }

    /// `<prefix>.ledger.append` (`<prefix>.partition.<n>.append` in a partition): synchronous append requests.
    pub fn append(&self) -> String {
        format!("{}.append", self.ledger())
    }

    /// `<prefix>.ledger.event.<kind>.<customer>` (`<prefix>.partition.<n>.event.<kind>.<customer>` in a partition): committed events.
    pub fn event(&self, kind: EventKind, customer: &str) -> String {
        format!("{}.event.{}.{}", self.ledger(), kind.as_str(), customer)
    }

    /// `<prefix>.ledger.event.>` (`<prefix>.partition.<n>.event.>` in a partition): the feed stream's subjects.
    pub fn events(&self) -> String {
        format!("{}.event.>", self.ledger())
    }

    /// `<prefix>.ledger.replay` (`<prefix>.partition.<n>.replay` in a partition): replay requests.
    pub fn replay(&self) -> String {
        format!("{}.replay", self.ledger())
    }

    /// `<prefix>.ledger.checkpoint` (`<prefix>.partition.<n>.checkpoint` in a partition): published checkpoints.
    pub fn checkpoint(&self) -> String {
        format!("{}.checkpoint", self.ledger())
    }

    /// `<prefix>.deadletter.<code>`: rejected input.
    pub fn deadletter(&self, code: &str) -> String {
        format!("{}.deadletter.{}", self.prefix, code)
    }

    /// `<prefix>.view.<model>.<customer>`: a customer's read model after a change.
    pub fn view(&self, model: &str, customer: &str) -> String {
        format!("{}.view.{model}.{customer}", self.prefix)
    }

    /// Where the read models of this log answer: `<prefix>` for an unpartitioned ledger,
    /// `<prefix>.partition.<n>` for one partition's (the ledger-wide `<prefix>.query.*` of a
    /// partitioned ledger is answered by the router, which forwards and merges).
    fn reads(&self) -> String {
        match self.partition {
            None => self.prefix.clone(),
            Some(n) => format!("{}.partition.{n}", self.prefix),
        }
    }

    /// `<prefix>.query.*` (`<prefix>.partition.<n>.query.*` in a partition): read-model queries
    /// (the last token names the model).
    pub fn queries(&self) -> String {
        format!("{}.query.*", self.reads())
    }

    /// `<prefix>.query.<model>` (`<prefix>.partition.<n>.query.<model>` in a partition):
    /// queries of one read model.
    pub fn query(&self, model: &str) -> String {
        format!("{}.query.{model}", self.reads())
    }

    /// `<prefix>.model.fit` (`<prefix>.partition.<n>.model.fit` in a partition): on-demand
    /// churn-model refits (request/reply).
    pub fn model_fit(&self) -> String {
        format!("{}.model.fit", self.reads())
    }

    /// `<prefix>.model.evaluate`: on-demand calibration/holdout evaluations (request/reply;
    /// served where fits are).
    pub fn model_evaluate(&self) -> String {
        format!("{}.model.evaluate", self.reads())
    }

    /// `<prefix>.partition.<n>.model.record` (`<prefix>.model.record` unpartitioned, unused):
    /// a partitioned ledger's fitted model, recorded in each partition's log.
    pub fn model_record(&self) -> String {
        format!("{}.model.record", self.reads())
    }

    /// `<prefix>.alert.churn.<customer>`: churn alerts (a level change).
    pub fn alert(&self, customer: &str) -> String {
        format!("{}.alert.churn.{customer}", self.prefix)
    }

    /// Stream names derive from the prefix (upper-cased; `.`, `*`, `>` replaced).
    fn stream_name(&self, what: &str) -> String {
        let p: String = self
            .prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("{p}_{what}")
    }

    /// The intake stream, e.g. `CRM_TOUCHPOINTS`.
    pub fn intake_stream(&self) -> String {
        self.stream_name("TOUCHPOINTS")
    }

    /// The feed stream, e.g. `CRM_LEDGER_EVENTS` (`CRM_LEDGER_EVENTS_P3` in partition 3).
    pub fn feed_stream(&self) -> String {
        match self.partition {
            None => self.stream_name("LEDGER_EVENTS"),
            Some(n) => self.stream_name(&format!("LEDGER_EVENTS_P{n}")),
        }
    }

    /// The dead-letter stream, e.g. `CRM_DEADLETTER`.
    pub fn deadletter_stream(&self) -> String {
        self.stream_name("DEADLETTER")
    }

    /// `<prefix>.deadletter.>`: the dead-letter stream's subjects.
    pub fn deadletters(&self) -> String {
        format!("{}.deadletter.>", self.prefix)
    }
}

/// Service settings. Defaults are documented per field.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// Subject layout. Default prefix `crm`.
    pub subjects: Subjects,
    /// Durable name of the intake consumer. Default `touchledger-ledger`.
    pub consumer: String,
    /// Messages per intake batch (one flush each). Default 500.
    pub batch: usize,
    /// How long a fetch waits for a batch to fill. Default 50 ms.
    pub fetch_wait: Duration,
    /// JetStream duplicate window of the intake stream. Default 2 min. (Idempotency is
    /// permanent in the ledger anyway; the window only saves work.)
    pub duplicate_window: Duration,
    /// Ack wait of the intake consumer: messages fetched by a ledger that died are redelivered
    /// after this. Must exceed the time to process one batch. Default 10 s.
    pub ack_wait: Duration,
    /// Nak delay after a store failure. Default 1 s.
    pub retry_delay: Duration,
    /// Queue group of the synchronous-append and replay responders. Default `touchledger-ledger`.
    pub queue_group: String,
    /// How long acknowledged touchpoints stay in the intake stream (for diagnosis; the ledger
    /// is the system of record). Default 7 days. Must exceed `duplicate_window`.
    pub intake_max_age: Duration,
    /// How long dead letters are kept in the dead-letter stream. Default 30 days.
    pub deadletter_max_age: Duration,
    /// Dead-letter payloads above this are truncated (header `Touchledger-Truncated-From`);
    /// the store's rejections record keeps the full bytes. Default 64 KiB.
    pub dead_letter_max_bytes: usize,
    /// Replays served at the same time; further requests wait. Default 4.
    pub max_concurrent_replays: usize,
    /// The partition this ledger's store holds, and the ledger's partition count. Default
    /// [`PartitionId::SINGLE`]: one partition, the intake stream unchanged. With P > 1 the intake
    /// stream routes each touchpoint to its customer's partition (a subject transform) and this
    /// ledger's intake consumer (`<consumer>-p<n>`) takes only its own partition.
    pub partition: PartitionId,
    /// The partition's ownership fence (a lease, [`Lease`]): intake and the synchronous append
    /// stop appending and acknowledging once it no longer holds. Default: none (always holds).
    pub fence: Fence,
    /// Replicas of the ledger's streams (intake, feed, dead letters) on a JetStream cluster:
    /// 3 on a 3-node cluster (each survives the loss of one node), 1 on a single server.
    /// Applied when a stream is created or updated. Default 1.
    pub replicas: usize,
    /// [`FeedProgress::tracked`]: intake acknowledges a touchpoint, and the synchronous append
    /// replies, only once its record is in the feed stream (a partition owned by lease, whose
    /// next owner starts from the feed). Default: not tracked (acknowledged once flushed).
    pub feed: FeedProgress,
}

impl BusConfig {
    /// The settings with the subjects scoped to this ledger's partition (unchanged when the
    /// ledger is not partitioned).
    pub fn scoped(mut self) -> Self {
        if self.partition.count > 1 {
            self.subjects = self.subjects.in_partition(self.partition.index);
        }
        self
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            subjects: Subjects::new("crm"),
            consumer: "touchledger-ledger".into(),
            batch: 500,
            fetch_wait: Duration::from_millis(50),
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(10),
            retry_delay: Duration::from_secs(1),
            queue_group: "touchledger-ledger".into(),
            intake_max_age: Duration::from_secs(7 * 24 * 3600),
            deadletter_max_age: Duration::from_secs(30 * 24 * 3600),
            dead_letter_max_bytes: 64 * 1024,
            max_concurrent_replays: 4,
            partition: PartitionId::SINGLE,
            fence: Fence::default(),
            replicas: 1,
            feed: FeedProgress::default(),
        }
    }
}

/// Failures of the NATS service.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The server is older than 2.9 or lacks JetStream. Upgrade or enable JetStream (`-js`).
    #[error("unsupported NATS server: {0}")]
    UnsupportedServer(String),
    /// A JetStream management call failed (stream/consumer create, info).
    #[error("JetStream {what} failed: {detail}")]
    JetStream {
        /// Which call.
        what: &'static str,
        /// The client's error.
        detail: String,
    },
    /// Publishing, subscribing or acknowledging failed (connection trouble).
    #[error("NATS {what} failed: {detail}")]
    Nats {
        /// Which call.
        what: &'static str,
        /// The client's error.
        detail: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] touchledger_store::StoreError),
    /// A projection failed (undecodable state: run `touchledger rebuild`; or a gap in the
    /// positions it was given).
    #[error("projection failed: {0}")]
    Projection(String),
    /// The intake stream on the server routes for another partition count than this ledger's
    /// (another `serve` with a different `--partitions` on the same NATS, or a ledger whose
    /// count was changed in place). Nothing was changed on the server.
    #[error("partition layout mismatch: {0}")]
    PartitionLayout(String),
    /// The feed stream does not continue this store's log (another writer on the feed subjects,
    /// or a store restored from an older backup). Investigate before restarting: the feed would
    /// otherwise skip or contradict positions.
    #[error("feed stream {stream} disagrees with the store: {detail}")]
    FeedMismatch {
        /// The stream.
        stream: String,
        /// What differs.
        detail: String,
    },
    /// This process no longer holds the partition's lease (it expired while the process was
    /// paused, or another process took it): it appends and acknowledges nothing more for the
    /// partition. Not a failure of the ledger; the partition's new owner carries on.
    #[error("lease lost: {0} refused, another process owns the partition now")]
    Fenced(&'static str),
}

pub(crate) fn js_err(what: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> BusError {
    move |e| BusError::JetStream {
        what,
        detail: e.to_string(),
    }
}

/// The next request on a query subscription, with its reply subject and the model its subject
/// names (the last token); `None` once `shutdown` is cancelled or the subscription ends.
/// Messages without a reply subject are skipped.
pub(crate) async fn next_query(
    sub: &mut async_nats::Subscriber,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<(async_nats::Message, async_nats::Subject, String)> {
    use futures::StreamExt;
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return None,
            m = sub.next() => m?,
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let model = msg
            .subject
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        return Some((msg, reply, model));
    }
}

pub(crate) fn nats_err(what: &'static str, e: impl std::fmt::Display) -> BusError {
    BusError::Nats {
        what,
        detail: e.to_string(),
    }
}

/// Count append outcomes in the metrics (`touchledger_ingest_events_total{path, outcome}` and
/// `touchledger_rejections_total{path, code}`).
pub(crate) fn count_outcomes(path: &'static str, outcomes: &[touchledger_store::AppendOutcome]) {
    for o in outcomes {
        let outcome = match o {
            touchledger_store::AppendOutcome::Rejected(_) => "rejected",
            other => other.label(),
        };
        metrics::counter!("touchledger_ingest_events_total", "path" => path, "outcome" => outcome)
            .increment(1);
        if let touchledger_store::AppendOutcome::Rejected(r) = o {
            metrics::counter!("touchledger_rejections_total", "path" => path, "code" => r.code.as_str())
                .increment(1);
        }
    }
}

/// The oldest nats-server this build runs against: 2.10, the first with stream subject
/// transforms and `partition()`, which route touchpoints to their partition (ADR 0008). The
/// tests run against the pinned 2.15.1 (and were run against 2.10.26). Raise this when the ledger
/// uses a newer feature (per-message TTL 2.11, atomic batch publish 2.12).
/// `deploy/ensure-nats-server.sh` (`MIN`) and the test kit require the same (a test checks).
pub const MIN_SERVER_VERSION: (u32, u32, u32) = (2, 10, 0);

/// Check that the connected server is at least [`MIN_SERVER_VERSION`]; the error names the
/// version found.
pub fn check_server(client: &async_nats::Client) -> Result<String, BusError> {
    let version = client.server_info().version;
    if parse_server_version(&version) < MIN_SERVER_VERSION {
        let (a, b, c) = MIN_SERVER_VERSION;
        return Err(BusError::UnsupportedServer(format!(
            "nats-server {version}; {a}.{b}.{c} or newer is required \
             (deploy/ensure-nats-server.sh installs a current one)"
        )));
    }
    Ok(version)
}

/// `2.15.1`, `2.12.0-RC.1` → (major, minor, patch); unparsable parts count as 0.
pub fn parse_server_version(version: &str) -> (u32, u32, u32) {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// The intake stream: every touchpoint, kept `intake_max_age`; with P > 1 the server routes
/// each one to its customer's partition on the way in
/// ([`Subjects::partition_transform`]).
pub fn intake_stream_config(cfg: &BusConfig) -> stream::Config {
    let p = cfg.partition.count;
    stream::Config {
        name: cfg.subjects.intake_stream(),
        subjects: vec![if p > 1 {
            cfg.subjects.partitioned_touchpoints()
        } else {
            cfg.subjects.touchpoints()
        }],
        subject_transform: (p > 1).then(|| cfg.subjects.partition_transform(p)),
        storage: stream::StorageType::File,
        duplicate_window: cfg.duplicate_window,
        max_age: cfg.intake_max_age.max(cfg.duplicate_window * 2),
        num_replicas: cfg.replicas.max(1),
        ..Default::default()
    }
}

/// Streams are created or updated one at a time in a process: the partitions of one process
/// share the intake stream, and concurrent creations of one replicated stream were seen to go
/// unanswered on a cluster.
static ENSURE_STREAMS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long creating or updating the ledger's streams may take before it is reported as a
/// failure (a cluster without quorum, say) instead of waited for.
const ENSURE_STREAMS_TIMEOUT: Duration = Duration::from_secs(30);

/// Create or update the intake and feed streams (idempotent).
///
/// A partition feed this call created has its Raft leader moved to the partition's preferred
/// peer (placement.rs) in the background, outside the lock and the timeout: a placement waits
/// for elections, and a slow one must not hold up another partition's start.
pub async fn ensure_streams(js: &jetstream::Context, cfg: &BusConfig) -> Result<(), BusError> {
    let created = {
        let _one_at_a_time = ENSURE_STREAMS.lock().await;
        tokio::time::timeout(ENSURE_STREAMS_TIMEOUT, ensure_streams_now(js, cfg))
            .await
            .map_err(|_| BusError::JetStream {
                what: "stream create/update",
                detail: format!("no answer within {ENSURE_STREAMS_TIMEOUT:?}"),
            })??
    };
    if let Some((group, n)) = created {
        let js = js.clone();
        tokio::spawn(async move { placement::spread_leader(&js, &group, n).await });
    }
    Ok(())
}

/// Create or update the streams; the partition feed it created, if any, with its partition.
async fn ensure_streams_now(
    js: &jetstream::Context,
    cfg: &BusConfig,
) -> Result<Option<(placement::Group, u32)>, BusError> {
    let intake = intake_stream_config(cfg);
    let deadletter = stream::Config {
        name: cfg.subjects.deadletter_stream(),
        subjects: vec![cfg.subjects.deadletters()],
        storage: stream::StorageType::File,
        max_age: cfg.deadletter_max_age,
        num_replicas: cfg.replicas.max(1),
        ..Default::default()
    };
    let feed = stream::Config {
        name: cfg.subjects.feed_stream(),
        subjects: vec![cfg.subjects.events()],
        storage: stream::StorageType::File,
        // The feed's own sequence is the position; dedup by position covers re-sends.
        duplicate_window: cfg.duplicate_window,
        num_replicas: cfg.replicas.max(1),
        ..Default::default()
    };
    let intake_name = intake.name.clone();
    let mut created = None;
    for config in [intake, feed, deadletter] {
        let name = config.name.clone();
        match js.get_stream(&name).await {
            Ok(existing) => {
                // The intake stream is shared by every partition's ledger: its routing says how
                // many partitions the ledger has. A process configured for another count must
                // not re-route it (touchpoints would be stored under subjects nobody reads).
                if name == intake_name {
                    let have = &existing.cached_info().config;
                    if have.subjects != config.subjects
                        || have.subject_transform != config.subject_transform
                    {
                        return Err(BusError::PartitionLayout(format!(
                            "the intake stream {name} takes {:?}{}, this ledger (P = {}) needs {:?}{}; \
                             a ledger's partition count is fixed (changing it is a migration: docs/partitions.md)",
                            have.subjects,
                            have.subject_transform
                                .as_ref()
                                .map(|t| format!(" routed to {}", t.destination))
                                .unwrap_or_default(),
                            cfg.partition.count,
                            config.subjects,
                            config
                                .subject_transform
                                .as_ref()
                                .map(|t| format!(" routed to {}", t.destination))
                                .unwrap_or_default(),
                        )));
                    }
                }
                js.update_stream(config)
                    .await
                    .map_err(|e| js_err("stream update")(&e))?;
            }
            Err(e) => {
                js.create_stream(config)
                    .await
                    .map_err(|e| js_err("stream create")(&e))?;
                // A new partition feed's Raft leader goes to the partition's peer
                // (placement.rs), so the feeds' writes are spread over a cluster's nodes. Only
                // a feed that was not there: a failed lookup of an existing one (a timeout
                // during an election) must not move its leader.
                if let (true, Some(n), true) = (
                    status::stream_missing(&e.kind()),
                    cfg.subjects.partition(),
                    name == cfg.subjects.feed_stream(),
                ) {
                    created = Some((placement::Group::Stream(name), n));
                }
            }
        }
    }
    Ok(created)
}

/// Run intake, synchronous append and the feed until `shutdown` is cancelled; then stop
/// fetching, finish the batch in hand, publish what was appended to the feed, flush the store
/// and drain the connection.
pub async fn run_ledger(
    client: async_nats::Client,
    store: Arc<SledStore>,
    cfg: BusConfig,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    run_ledger_until(client, store, cfg, shutdown, None).await
}

/// Which of the ledger's tasks finished.
#[derive(Clone, Copy, PartialEq)]
enum LedgerTask {
    /// Intake or synchronous append: appends to the store.
    Writer,
    /// Replay: reads only.
    Reader,
    /// The feed.
    Feed,
}

/// [`run_ledger`], whose feed, once the ledger's own writers have stopped, also waits for
/// `other_writers` (cancelled when whatever else appends to the store, e.g. a partition's
/// assessors, has stopped) before it publishes the store's last records and stops. So a
/// stopped ledger leaves nothing in its store that its feed lacks, as long as the feed can be
/// reached (and, in a leased partition, the lease is still held): the next owner of the
/// partition continues from everything this one stored, and this store stays a prefix of the
/// partition's history.
pub async fn run_ledger_until(
    client: async_nats::Client,
    store: Arc<SledStore>,
    cfg: BusConfig,
    shutdown: CancellationToken,
    other_writers: Option<CancellationToken>,
) -> Result<(), BusError> {
    check_server(&client)?;
    let cfg = cfg.scoped();
    let js = jetstream::new(client.clone());
    ensure_streams(&js, &cfg).await?;
    let feed_stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let (j, s, c, sd) = (js.clone(), store.clone(), cfg.clone(), shutdown.clone());
    tasks.spawn(async move { (LedgerTask::Writer, run_intake(j, s, c, sd).await) });
    let (cl, s, c, sd) = (client.clone(), store.clone(), cfg.clone(), shutdown.clone());
    tasks.spawn(async move { (LedgerTask::Writer, serve_append(cl, s, c, sd).await) });
    let (cl, s, c, sd) = (client.clone(), store.clone(), cfg.clone(), shutdown.clone());
    tasks.spawn(async move { (LedgerTask::Reader, serve_replay(cl, s, c, sd).await) });
    let (j, cl, s, c, fs) = (
        js.clone(),
        client.clone(),
        store.clone(),
        cfg.clone(),
        feed_stop.clone(),
    );
    tasks.spawn(async move { (LedgerTask::Feed, run_feed(j, cl, s, c, fs).await) });
    let mut writers = 2;
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        let (task, r) = match r {
            Ok((task, r)) => (Some(task), r),
            Err(e) => (None, Err(nats_err("task", e))),
        };
        match task {
            Some(LedgerTask::Writer) => writers -= 1,
            // A task that panicked may have been a writer: the feed stops with the rest.
            None => writers = 0,
            Some(LedgerTask::Reader | LedgerTask::Feed) => {}
        }
        if writers == 0 && !feed_stop.is_cancelled() {
            let (feed_stop, others) = (feed_stop.clone(), other_writers.clone());
            tokio::spawn(async move {
                if let Some(others) = others {
                    others.cancelled().await;
                }
                feed_stop.cancel();
            });
        }
        if let Err(e) = r {
            tracing::error!(error = %e, "ledger task failed; shutting down");
            shutdown.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    let flush = store.clone();
    tokio::task::spawn_blocking(move || flush.flush())
        .await
        .map_err(|e| nats_err("flush task", e))??;
    client.drain().await.map_err(|e| nats_err("drain", e))?;
    result
}
