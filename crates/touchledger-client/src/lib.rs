//! Rust client for touchledger, for upstream publishers and downstream consumers.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use touchledger_client::{Ledger, new_event_id};
//! use touchledger_domain::{Event, Payload, Purchase, Timestamp};
//!
//! let nats = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let ledger = Ledger::new(nats, "crm");
//! let event = Event {
//!     event_id: new_event_id(),
//!     customer_id: "c-42".into(),
//!     occurred_at: Timestamp::now(),
//!     source: "shop".into(),
//!     schema_version: 1,
//!     correlation_id: None,
//!     causation_id: None,
//!     payload: Payload::Purchase(Purchase {
//!         order_id: "o-1".into(), amount_minor: 1299, currency: "EUR".into(),
//!         item_count: 1, channel: None, category: String::new(),
//!     }),
//! };
//! // Durable in JetStream once this returns; stored by the ledger shortly after.
//! ledger.publish(&event).await?;
//! // Or: appended and flushed by the ledger when this returns, with the outcome.
//! let outcomes = ledger.append(vec![(event, None)]).await?;
//! # Ok(()) }
//! ```
//!
//! Key decisions: events go out as protobuf `Envelope`s with `Nats-Msg-Id` = event id plus a
//! content digest ([`nats_msg_id`]), so an identical retried publish is deduplicated by JetStream
//! within its window and by the ledger forever, while a same-id-different-content conflict still
//! reaches the ledger and is rejected.
//! Replayed and followed records arrive as the exact stored bytes with their hash, so a consumer
//! can check the chain itself ([`ChainCheck`]).

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::{Stream, StreamExt};
use prost::Message;
use touchledger_domain::{Event, EventKind, Rejection, Timestamp};
use touchledger_proto::{encode_event, v1};

/// The `Nats-Msg-Id` of a touchpoint: `<event_id>:<first 32 hex digits of BLAKE3(bytes)>`.
///
/// Not the bare event id, deliberately (ADR 0003): JetStream drops a message whose id it saw in
/// its duplicate window *without comparing content*, and acks it as a duplicate. With the bare
/// id, an event re-sent under the same id with different content — a conflict the ledger must
/// reject with `EVENT_ID_CONFLICT` — would vanish there. With the digest in the id, identical
/// re-sends are still dropped by JetStream, and conflicts reach the ledger.
pub fn nats_msg_id(event_id: &str, bytes: &[u8]) -> String {
    let digest = blake3::hash(bytes).to_hex();
    format!("{event_id}:{}", &digest.as_str()[..32])
}

/// A new time-ordered event id (UUIDv7).
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Publishing failed after all retries (JetStream unreachable or refusing).
    #[error("publish failed after {attempts} attempts: {detail}")]
    Publish {
        /// Attempts made.
        attempts: u32,
        /// Last error.
        detail: String,
    },
    /// A request (append, replay) failed: no responder, timeout, connection trouble.
    #[error("request to {subject} failed: {detail}")]
    Request {
        /// Subject.
        subject: String,
        /// Error.
        detail: String,
    },
    /// The ledger answered with something this client cannot decode (version skew?).
    #[error("undecodable answer from the ledger: {0}")]
    Protocol(String),
    /// The ledger refused a replay request.
    #[error("replay refused: {0}")]
    Replay(Rejection),
    /// The ledger could not take a synchronous append (nothing of it was written; retry
    /// later). `code` is stable, e.g. `STORAGE_FULL`.
    #[error("ledger unavailable ({code}): {reason}")]
    Unavailable {
        /// Stable code.
        code: String,
        /// Explanation.
        reason: String,
    },
}

/// The outcome of one synchronously appended event (all are final and durable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored at this position.
    Appended {
        /// Position.
        position: u64,
        /// Customer version.
        customer_version: u64,
        /// Chain hash.
        hash: [u8; 32],
    },
    /// Already stored, identical.
    Duplicate {
        /// Position of the original.
        position: u64,
    },
    /// The expected customer version did not match.
    VersionConflict {
        /// Expected.
        expected: u64,
        /// Actual.
        actual: u64,
    },
    /// Rejected (the code is stable; see docs/error-codes.md).
    Rejected(Rejection),
}

/// One committed record, as the ledger stored it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Position.
    pub position: u64,
    /// Customer version.
    pub customer_version: u64,
    /// Knowledge time.
    pub recorded_at: Timestamp,
    /// Hash of the previous record.
    pub prev_hash: [u8; 32],
    /// This record's hash.
    pub hash: [u8; 32],
    /// The event.
    pub event: Event,
    /// The exact stored bytes (what `hash` covers).
    pub bytes: Vec<u8>,
}

impl Record {
    fn decode(position: u64, hash: &[u8], bytes: Vec<u8>) -> Result<Record, ClientError> {
        let rec = v1::StoredRecord::decode(bytes.as_slice())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let event = Event::try_from(rec.event.unwrap_or_default())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let arr = |b: &[u8]| {
            <[u8; 32]>::try_from(b)
                .map_err(|_| ClientError::Protocol("hash is not 32 bytes".into()))
        };
        Ok(Record {
            position,
            customer_version: rec.customer_version,
            recorded_at: touchledger_proto::from_pb_time("recorded_at", rec.recorded_at)
                .map_err(|e| ClientError::Protocol(e.to_string()))?,
            prev_hash: arr(&rec.prev_hash)?,
            hash: arr(hash)?,
            event,
            bytes,
        })
    }
}

/// Checks a contiguous run of records against the hash chain.
#[derive(Clone, Debug, Default)]
pub struct ChainCheck {
    last: Option<(u64, [u8; 32])>,
}

impl ChainCheck {
    /// Check the next record: its hash must be BLAKE3(prev_hash ‖ bytes) and, if it follows the
    /// previous record checked, link to it. Returns false if the record was altered or the chain
    /// is broken.
    pub fn check(&mut self, r: &Record) -> bool {
        let mut h = blake3::Hasher::new();
        h.update(&r.prev_hash);
        h.update(&r.bytes);
        let ok_hash = h.finalize().as_bytes() == &r.hash;
        let ok_link = match self.last {
            Some((p, hash)) if p + 1 == r.position => hash == r.prev_hash,
            _ => true,
        };
        self.last = Some((r.position, r.hash));
        ok_hash && ok_link
    }
}

/// Which history to replay.
#[derive(Clone, Debug, Default)]
pub struct ReplayFilter {
    /// First position (inclusive).
    pub from_position: u64,
    /// Last position (inclusive).
    pub to_position: Option<u64>,
    /// Only this customer.
    pub customer: Option<String>,
    /// Only this kind.
    pub kind: Option<EventKind>,
    /// `occurred_at >= since`.
    pub occurred_since: Option<Timestamp>,
    /// `occurred_at < until`.
    pub occurred_until: Option<Timestamp>,
    /// Records per chunk (0 = ledger default).
    pub chunk_size: u32,
}

/// The end of a replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Records sent.
    pub count: u64,
    /// Ledger head when the replay began.
    pub head_position: u64,
    /// Its hash.
    pub head_hash: [u8; 32],
}

/// A handle on a touchledger over NATS.
#[derive(Clone)]
pub struct Ledger {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    /// `<prefix>.ledger`, or `<prefix>.partition.<n>` for partition `n` of a partitioned ledger.
    ledger: String,
    /// Publish attempts before giving up. Default 5.
    pub publish_attempts: u32,
    /// Timeout of synchronous requests. Default 10 s.
    pub request_timeout: Duration,
}

impl Ledger {
    /// A ledger under `prefix` (default deployments use `crm`).
    pub fn new(client: async_nats::Client, prefix: impl Into<String>) -> Self {
        let js = jetstream::new(client.clone());
        let prefix = prefix.into();
        Ledger {
            client,
            js,
            ledger: format!("{prefix}.ledger"),
            prefix,
            publish_attempts: 5,
            request_timeout: Duration::from_secs(10),
        }
    }

    /// The same ledger's partition `n` (a partitioned ledger: docs/partitions.md). Publishing is
    /// unchanged (NATS routes each touchpoint by its customer); synchronous appends, replay and
    /// follow address that partition's log, whose positions and chain are its own. Events sent
    /// to a partition must be of its customers
    /// (`touchledger_domain::partition::partition_of`), or they are rejected `WRONG_PARTITION`.
    pub fn in_partition(&self, n: u32) -> Self {
        Ledger {
            ledger: format!("{}.partition.{n}", self.prefix),
            ..self.clone()
        }
    }

    /// The subject a touchpoint is published on.
    pub fn touchpoint_subject(&self, e: &Event) -> String {
        format!(
            "{}.touchpoint.{}.{}",
            self.prefix,
            e.kind().as_str(),
            e.customer_id
        )
    }

    /// Publish one event to the intake stream and wait for JetStream's ack, retrying with backoff.
    /// Returns whether JetStream saw it as a duplicate within its window.
    pub async fn publish(&self, e: &Event) -> Result<bool, ClientError> {
        self.publish_raw(self.touchpoint_subject(e), &e.event_id, encode_event(e))
            .await
    }

    /// Publish pre-encoded bytes under an id (for tools that forward what they were given).
    pub async fn publish_raw(
        &self,
        subject: String,
        event_id: &str,
        bytes: Vec<u8>,
    ) -> Result<bool, ClientError> {
        let mut delay = Duration::from_millis(100);
        let mut last = String::new();
        for attempt in 1..=self.publish_attempts.max(1) {
            let msg = PublishMessage::build()
                .payload(bytes.clone().into())
                .message_id(nats_msg_id(event_id, &bytes));
            match self.js.send_publish(subject.clone(), msg).await {
                Ok(ack) => match ack.await {
                    Ok(a) => return Ok(a.duplicate),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            if attempt < self.publish_attempts {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
        Err(ClientError::Publish {
            attempts: self.publish_attempts,
            detail: last,
        })
    }

    /// Publish many events with up to `in_flight` unacknowledged at a time; returns, per event,
    /// whether JetStream saw a duplicate. Failed publishes are retried one by one.
    pub async fn publish_batch(
        &self,
        events: &[Event],
        in_flight: usize,
    ) -> Result<Vec<bool>, ClientError> {
        let mut results = vec![false; events.len()];
        for (chunk_no, chunk) in events.chunks(in_flight.max(1)).enumerate() {
            let mut acks = Vec::with_capacity(chunk.len());
            for e in chunk {
                let bytes = encode_event(e);
                let id = nats_msg_id(&e.event_id, &bytes);
                let msg = PublishMessage::build().payload(bytes.into()).message_id(id);
                acks.push(
                    self.js
                        .send_publish(self.touchpoint_subject(e), msg)
                        .await
                        .ok(),
                );
            }
            for (i, (ack, e)) in acks.into_iter().zip(chunk).enumerate() {
                let got = match ack {
                    Some(a) => a.await.ok().map(|a| a.duplicate),
                    None => None,
                };
                results[chunk_no * in_flight.max(1) + i] = match got {
                    Some(d) => d,
                    None => self.publish(e).await?,
                };
            }
        }
        Ok(results)
    }

    /// Append synchronously: the reply arrives only after the ledger flushed the batch.
    pub async fn append(
        &self,
        items: Vec<(Event, Option<u64>)>,
    ) -> Result<Vec<AppendOutcome>, ClientError> {
        let req = v1::AppendRequest {
            items: items
                .iter()
                .map(|(e, v)| v1::AppendItem {
                    event: Some(v1::Envelope::from(e)),
                    expected_customer_version: *v,
                })
                .collect(),
        };
        let subject = format!("{}.append", self.ledger);
        let reply = tokio::time::timeout(
            self.request_timeout,
            self.client
                .request(subject.clone(), req.encode_to_vec().into()),
        )
        .await
        .map_err(|_| ClientError::Request {
            subject: subject.clone(),
            detail: "timed out".into(),
        })?
        .map_err(|e| ClientError::Request {
            subject: subject.clone(),
            detail: e.to_string(),
        })?;
        let reply = v1::AppendReply::decode(reply.payload.as_ref())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let Some(u) = reply.unavailable {
            return Err(ClientError::Unavailable {
                code: u.code,
                reason: u.reason,
            });
        }
        reply.outcomes.into_iter().map(outcome).collect()
    }

    /// Follow committed events live (core NATS: what is published from now on). For a gap-free
    /// feed from a position, consume the `<PREFIX>_LEDGER_EVENTS` stream instead.
    pub async fn follow(
        &self,
        kind: Option<EventKind>,
        customer: Option<&str>,
    ) -> Result<impl Stream<Item = Result<Record, ClientError>> + use<>, ClientError> {
        let subject = format!(
            "{}.event.{}.{}",
            self.ledger,
            kind.map_or("*", |k| k.as_str()),
            customer.unwrap_or("*")
        );
        let sub =
            self.client
                .subscribe(subject.clone())
                .await
                .map_err(|e| ClientError::Request {
                    subject,
                    detail: e.to_string(),
                })?;
        Ok(sub.map(|m| {
            let h = m.headers.as_ref();
            let get = |n: &str| {
                h.and_then(|h| h.get(n))
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            };
            let position: u64 = get("Touchledger-Position")
                .parse()
                .map_err(|_| ClientError::Protocol("no position header".into()))?;
            let hash = hex_decode(&get("Touchledger-Hash"))
                .ok_or_else(|| ClientError::Protocol("no hash header".into()))?;
            Record::decode(position, &hash, m.payload.to_vec())
        }))
    }

    /// Replay history with flow control; `on_record` is called for each record in position order.
    pub async fn replay(
        &self,
        filter: &ReplayFilter,
        mut on_record: impl FnMut(Record) -> Result<(), ClientError>,
    ) -> Result<ReplaySummary, ClientError> {
        let subject = format!("{}.replay", self.ledger);
        let req = v1::ReplayRequest {
            from_position: filter.from_position,
            to_position: filter.to_position.unwrap_or(0),
            customer: filter.customer.clone().unwrap_or_default(),
            kind: filter
                .kind
                .map(|k| k.as_str().to_owned())
                .unwrap_or_default(),
            occurred_since: filter.occurred_since.map(touchledger_proto::to_pb_time),
            occurred_until: filter.occurred_until.map(touchledger_proto::to_pb_time),
            chunk_size: filter.chunk_size,
        };
        let err = |d: String| ClientError::Request {
            subject: subject.clone(),
            detail: d,
        };
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| err(e.to_string()))?;
        self.client
            .publish_with_reply(subject.clone(), inbox, req.encode_to_vec().into())
            .await
            .map_err(|e| err(e.to_string()))?;
        loop {
            let m = tokio::time::timeout(self.request_timeout, sub.next())
                .await
                .map_err(|_| err("timed out waiting for the next chunk".into()))?
                .ok_or_else(|| err("subscription closed".into()))?;
            // The server answers a request nobody is subscribed to with a status, not silence:
            // say so at once instead of waiting for the timeout (a ledger still starting, or
            // the wrong prefix).
            if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Err(err(
                    "no responders: no ledger serves replay on this subject (yet)".into(),
                ));
            }
            let chunk = v1::ReplayChunk::decode(m.payload.as_ref())
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            if let Some(r) = chunk.error {
                let r = Rejection::try_from(r).map_err(|e| ClientError::Protocol(e.to_string()))?;
                return Err(ClientError::Replay(r));
            }
            for r in chunk.records {
                on_record(Record::decode(r.position, &r.hash, r.record)?)?;
            }
            if chunk.end {
                let head_hash = <[u8; 32]>::try_from(chunk.head_hash.as_slice()).unwrap_or([0; 32]);
                return Ok(ReplaySummary {
                    count: chunk.count,
                    head_position: chunk.head_position,
                    head_hash,
                });
            }
            if let Some(credit) = m.reply {
                self.client
                    .publish(credit, Default::default())
                    .await
                    .map_err(|e| err(e.to_string()))?;
            }
        }
    }
}

fn outcome(o: v1::AppendOutcome) -> Result<AppendOutcome, ClientError> {
    use v1::append_outcome::Outcome as O;
    Ok(
        match o
            .outcome
            .ok_or_else(|| ClientError::Protocol("empty outcome".into()))?
        {
            O::Appended(a) => AppendOutcome::Appended {
                position: a.position,
                customer_version: a.customer_version,
                hash: <[u8; 32]>::try_from(a.hash.as_slice())
                    .map_err(|_| ClientError::Protocol("hash".into()))?,
            },
            O::Duplicate(d) => AppendOutcome::Duplicate {
                position: d.position,
            },
            O::VersionConflict(v) => AppendOutcome::VersionConflict {
                expected: v.expected,
                actual: v.actual,
            },
            O::Rejected(r) => AppendOutcome::Rejected(
                Rejection::try_from(r).map_err(|e| ClientError::Protocol(e.to_string()))?,
            ),
        },
    )
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
