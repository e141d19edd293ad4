//! JetStream intake: a durable pull consumer on the touchpoint stream. Fetch a batch, decode,
//! append with one flush, then ack; dead-letter and terminate bad input; nak on store failure.
//!
//! Two refinements keep events from being lost to ordering: a retraction whose target is not
//! stored yet may simply have overtaken it (redelivery after a crash or a nak reorders messages),
//! so it is nak'ed and retried a few times before it is dead-lettered; and after a store failure
//! the intake stops pulling and pauses instead of taking newer messages ahead of the nak'ed ones.
//!
//! The consumer is pulled continuously (a pull stream that keeps about a batch requested ahead)
//! rather than fetch-by-fetch, so that the broker delivers the next batch while the current
//! one is flushed.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::pull, message::PublishMessage};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use touchledger_domain::{RejectCode, Rejection};
use touchledger_store::{AppendItem, AppendOutcome, EventStore, SledStore, rejection_record};

use crate::{BusConfig, BusError, headers, js_err, nats_err};

/// Deliveries a retraction with an unknown target gets before it is dead-lettered.
const RETRACTION_ATTEMPTS: i64 = 5;

/// What to do with one fetched message once its batch is committed.
enum Verdict {
    Ack,
    Retry,
    DeadLetter(Rejection),
}

/// Consume the intake stream until `shutdown`.
pub async fn run_intake(
    js: jetstream::Context,
    store: Arc<SledStore>,
    cfg: BusConfig,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let stream = js
        .get_stream(cfg.subjects.intake_stream())
        .await
        .map_err(|e| js_err("get intake stream")(&e))?;
    // A partitioned ledger's partitions each have their own durable consumer on their own
    // subjects; one partition (P = 1) keeps the plain name and takes everything.
    let (name, filter) = if cfg.partition.count > 1 {
        (
            consumer_name(&cfg.consumer, cfg.partition.count, cfg.partition.index),
            cfg.subjects.partition_touchpoints(cfg.partition.index),
        )
    } else {
        (cfg.consumer.clone(), String::new())
    };
    // Placed only when it was not there (not when its lookup merely failed, as during an
    // election): moving a working consumer's leader would interrupt its deliveries.
    let created = matches!(
        stream.consumer_info(&name).await,
        Err(e) if crate::status::consumer_missing(&e.kind())
    );
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: filter,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: cfg.ack_wait,
                max_ack_pending: (cfg.batch as i64 * 4).max(1000),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| js_err("intake consumer")(&e))?;
    if created && cfg.partition.count > 1 {
        // A new partition consumer's Raft leader goes to the partition's peer, like its feed's.
        let group = crate::Group::Consumer(cfg.subjects.intake_stream(), name.clone());
        // In the background, bounded by its own deadlines: a partition handed to another
        // process right after it was created (the balancer does that at start-up) stops this
        // intake, and its consumer must still end up placed.
        let (js, index) = (js.clone(), cfg.partition.index);
        tokio::spawn(async move { crate::placement::spread_leader(&js, &group, index).await });
    }
    tracing::info!(stream = %cfg.subjects.intake_stream(), consumer = %name, partition = %cfg.partition, "intake started");

    // One continuous pull: the client keeps about a batch requested ahead, so JetStream
    // delivers the next batch while this one is being stored (the store's fsync and the
    // broker's delivery overlap). Order is kept: one stream, one processor.
    let mut messages: Option<pull::Stream> = None;
    while !shutdown.is_cancelled() {
        let stream = match &mut messages {
            Some(s) => s,
            None => {
                let opened = consumer
                    .stream()
                    .max_messages_per_batch(cfg.batch)
                    .expires(INTAKE_PULL_EXPIRES)
                    .heartbeat(INTAKE_PULL_HEARTBEAT)
                    .messages()
                    .await;
                match opened {
                    Ok(s) => messages.insert(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "pull failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(cfg.retry_delay) => {}
                        }
                        continue;
                    }
                }
            }
        };
        let (batch, healthy) = tokio::select! {
            _ = shutdown.cancelled() => break,
            b = next_batch(stream, cfg.batch, cfg.fetch_wait) => b,
        };
        if !healthy {
            // A status error (missed heartbeats, the server went away): start a new pull.
            // What was buffered is handed back (or, if the connection is gone, redelivered
            // after the ack wait).
            if let Some(s) = messages.take() {
                release_buffered(s, cfg.retry_delay).await;
            }
        }
        if batch.is_empty() {
            if !healthy {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(cfg.retry_delay) => {}
                }
            }
            continue;
        }
        // The batch in hand is always finished, even if shutdown is requested meanwhile.
        if !process(&js, &store, &cfg, batch, &shutdown).await? {
            // Store trouble: stop pulling and pause, so that newer messages do not overtake the
            // nak'ed ones. Messages already delivered ahead are nak'ed behind the batch.
            if let Some(s) = messages.take() {
                release_buffered(s, cfg.retry_delay).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(cfg.retry_delay) => {}
            }
        }
    }
    tracing::info!("intake stopped");
    Ok(())
}

/// Deliveries of a rejected message after which it is terminated even if it could not be
/// dead-lettered (its rejection is already in the store's record).
pub const DEAD_LETTER_ATTEMPTS: i64 = 5;

/// Expiry of each pull request of the intake's continuous pull.
const INTAKE_PULL_EXPIRES: std::time::Duration = std::time::Duration::from_secs(30);
/// Idle heartbeat of the continuous pull: a silent server is noticed after two of them.
const INTAKE_PULL_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

/// Nak (with `delay`) every message the pull has already delivered but nobody has taken, then
/// drop the pull. Without this they would come back only after the ack wait, behind newer ones.
async fn release_buffered(mut stream: pull::Stream, delay: std::time::Duration) {
    use futures::FutureExt;
    let mut released = 0usize;
    while let Some(Some(Ok(m))) = stream.next().now_or_never() {
        if let Err(e) = m.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(error = %e, "nak failed; the message will be redelivered");
        }
        released += 1;
    }
    tracing::debug!(released, "pull dropped");
}

/// Up to `max` messages: wait for the first, then take more until `max` or until `wait` has
/// passed since the first. Returns the messages and whether the pull is still healthy.
async fn next_batch(
    stream: &mut pull::Stream,
    max: usize,
    wait: std::time::Duration,
) -> (Vec<jetstream::Message>, bool) {
    let mut batch = Vec::with_capacity(max);
    let mut deadline = None;
    while batch.len() < max {
        let next = match deadline {
            None => stream.next().await,
            Some(d) => match tokio::time::timeout_at(d, stream.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
        };
        match next {
            Some(Ok(m)) => {
                batch.push(m);
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pull interrupted; re-subscribing");
                return (batch, false);
            }
            None => return (batch, false),
        }
    }
    (batch, true)
}

/// Process one fetched batch. Returns false if the store failed (the batch was nak'ed).
async fn process(
    js: &jetstream::Context,
    store: &Arc<SledStore>,
    cfg: &BusConfig,
    messages: Vec<jetstream::Message>,
    shutdown: &CancellationToken,
) -> Result<bool, BusError> {
    let mut items = Vec::new();
    let mut undecodable = Vec::new();
    let mut slots: Vec<Result<usize, Rejection>> = Vec::with_capacity(messages.len());
    for m in &messages {
        // The stream sequence identifies the message across redeliveries (one rejection
        // record per message, however often it is delivered).
        let origin = match m.info() {
            Ok(i) => format!("nats:{}#{}", m.subject, i.stream_sequence),
            Err(_) => format!("nats:{}", m.subject),
        };
        // The subject must name the event's own kind and customer. An event that is invalid in
        // itself goes on to the store and gets its own code (a customer id that cannot be a
        // subject token is CUSTOMER_ID_INVALID, not a mismatch).
        let decoded = touchledger_proto::decode_event(&m.payload).and_then(|event| {
            let store_cfg = store.config();
            if event
                .validate(&store_cfg.validation, (store_cfg.clock)())
                .is_err()
            {
                return Ok(event);
            }
            cfg.subjects
                .check_touchpoint_subject(cfg.partition, &m.subject, &event)
                .map(|()| event)
        });
        match decoded {
            Ok(event) => {
                slots.push(Ok(items.len()));
                items.push(AppendItem {
                    event,
                    expected_customer_version: None,
                    raw: Some(m.payload.to_vec()),
                    origin,
                });
            }
            Err(r) => {
                let mut rec =
                    rejection_record(r.code, r.reason.clone(), m.payload.to_vec(), origin);
                rec.rejection.field = r.field.clone();
                undecodable.push(rec);
                slots.push(Err(r));
            }
        }
    }
    // A ledger whose lease has run out neither appends nor acknowledges: the batch is left to
    // its redelivery to the partition's new owner.
    cfg.fence.check("intake append")?;
    let s = store.clone();
    let started = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(
        move || -> Result<Vec<AppendOutcome>, touchledger_store::StoreError> {
            s.record_rejections(undecodable)?;
            s.append(items)
        },
    )
    .await
    .map_err(|e| nats_err("append task", e))?;
    metrics::histogram!("touchledger_ingest_batch_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("touchledger_ingest_batch_messages").record(messages.len() as f64);
    if let Ok(outcomes) = &result {
        crate::count_outcomes("intake", outcomes);
    }
    for r in slots.iter().filter_map(|s| s.as_ref().err()) {
        metrics::counter!("touchledger_rejections_total", "code" => r.code.as_str(), "path" => "intake").increment(1);
    }
    let outcomes = match result {
        Ok(o) => o,
        Err(e) => {
            // Nothing of this batch is acknowledged: JetStream redelivers it later.
            if let touchledger_store::StoreError::StorageFull {
                available, reserve, ..
            } = &e
            {
                // Not an error of the store: intake pauses (the messages stay in JetStream)
                // and resumes by itself once space is free again.
                metrics::gauge!("touchledger_store_available_bytes").set(*available as f64);
                metrics::counter!("touchledger_ingest_paused_storage_full_total").increment(1);
                tracing::warn!(
                    available,
                    reserve,
                    messages = messages.len(),
                    "storage full: intake paused, batch naked; retrying"
                );
            } else {
                tracing::error!(error = %e, messages = messages.len(), "store failed; naking the batch");
            }
            for m in &messages {
                let _ = m.ack_with(AckKind::Nak(Some(cfg.retry_delay))).await;
            }
            return match e {
                touchledger_store::StoreError::NeedsReopen => Err(e.into()),
                _ => Ok(false),
            };
        }
    };
    // Checked again after the flush: a process paused during the append (past its lease) must
    // not acknowledge what the new owner may already have been given.
    cfg.fence.check("intake acknowledgement")?;
    // In a partition owned by lease, a touchpoint is acknowledged only once its record is in
    // the feed stream, where the partition's next owner starts from.
    let last = crate::feed::last_position(&outcomes);
    if !cfg.feed.reached(last, &cfg.fence, shutdown).await? {
        return Ok(true);
    }
    for (m, slot) in messages.iter().zip(slots) {
        let verdict = match slot {
            Err(r) => Verdict::DeadLetter(r),
            Ok(i) => match &outcomes[i] {
                AppendOutcome::Appended { .. } | AppendOutcome::Duplicate { .. } => Verdict::Ack,
                AppendOutcome::Rejected(r)
                    if r.code == RejectCode::RetractionTargetUnknown
                        && m.info().map(|i| i.delivered).unwrap_or(i64::MAX)
                            < RETRACTION_ATTEMPTS =>
                {
                    Verdict::Retry
                }
                AppendOutcome::Rejected(r) => Verdict::DeadLetter(r.clone()),
                // Intake never sends an expected version; treat defensively as bad input.
                AppendOutcome::VersionConflict { expected, actual } => {
                    Verdict::DeadLetter(Rejection::new(
                        RejectCode::DecodeFailed,
                        "",
                        format!("unexpected version conflict {expected}/{actual}"),
                    ))
                }
            },
        };
        // Before each acknowledgement: dead-lettering one message can take a while.
        cfg.fence.check("intake acknowledgement")?;
        match verdict {
            // An ack lost to a connection problem only causes a redelivery, which the ledger
            // answers as a duplicate: log it and go on.
            Verdict::Ack => {
                if let Err(e) = m.ack().await {
                    tracing::warn!(error = %e, "ack failed; the message will be redelivered");
                }
            }
            Verdict::Retry => {
                if let Err(e) = m.ack_with(AckKind::Nak(Some(cfg.retry_delay))).await {
                    tracing::warn!(error = %e, "nak failed; the message will be redelivered");
                }
            }
            Verdict::DeadLetter(r) => {
                if let Err(e) = dead_letter(js, cfg, m, &r).await {
                    // The rejection is durable in the store's record (once per distinct input);
                    // without a durable dead letter the message comes back rather than vanish,
                    // but only a bounded number of times: never an endless loop.
                    let delivered = m.info().map(|i| i.delivered).unwrap_or(i64::MAX);
                    if delivered < DEAD_LETTER_ATTEMPTS {
                        tracing::warn!(error = %e, delivered, "dead-letter publish failed; leaving the message for redelivery");
                        continue;
                    }
                    metrics::counter!("touchledger_dead_letter_failures_total").increment(1);
                    tracing::error!(
                        error = %e,
                        delivered,
                        subject = %m.subject,
                        code = r.code.as_str(),
                        "dead-letter publish failed on every attempt; terminating the message (its rejection is in the store's record)"
                    );
                }
                if let Err(e) = m.ack_with(AckKind::Term).await {
                    tracing::warn!(error = %e, "term failed; the message will be redelivered");
                }
            }
        }
    }
    Ok(true)
}

/// Publish a rejected message to `<prefix>.deadletter.<code>` (captured by the dead-letter
/// stream) and wait for JetStream's ack. Payloads too large to fit with the added headers are
/// truncated (the store's rejections record keeps the full bytes).
async fn dead_letter(
    js: &jetstream::Context,
    cfg: &BusConfig,
    m: &jetstream::Message,
    r: &Rejection,
) -> Result<(), BusError> {
    let mut h = HeaderMap::new();
    if let Some(orig) = &m.headers {
        for (k, vs) in orig.iter() {
            let name: &str = k.as_ref();
            // Headers in the `Nats-` namespace are instructions to the server for the original
            // publish: `Nats-Msg-Id` would make the dead-letter stream drop repeats, and the
            // publish preconditions (`Nats-Expected-Stream`, `-Last-Sequence`, …) would make
            // the dead-letter publish fail every time (JetStream error 10060), a poison loop.
            // They are kept for diagnosis under another name.
            if name.len() >= 5 && name[..5].eq_ignore_ascii_case("nats-") {
                let kept = format!("{}{name}", headers::ORIGINAL_HEADER_PREFIX);
                for v in vs {
                    h.append(kept.as_str(), v.as_str());
                }
                continue;
            }
            for v in vs {
                h.append(k.clone(), v.clone());
            }
        }
    }
    let reason: String = r
        .reason
        .replace(['\r', '\n'], " ")
        .chars()
        .take(512)
        .collect();
    h.insert(headers::REJECT_CODE, r.code.as_str());
    h.insert(headers::REJECT_FIELD, r.field.as_str());
    h.insert(headers::REJECT_REASON, reason.as_str());
    h.insert(headers::ORIGINAL_SUBJECT, m.subject.as_str());
    let mut payload = m.payload.clone();
    let limit = cfg.dead_letter_max_bytes;
    if payload.len() > limit {
        h.insert(headers::TRUNCATED_FROM, payload.len().to_string().as_str());
        payload.truncate(limit);
    }
    let ack = js
        .send_publish(
            cfg.subjects.deadletter(r.code.as_str()),
            PublishMessage::build().payload(payload).headers(h),
        )
        .await
        .map_err(|e| nats_err("dead-letter publish", e))?;
    ack.await.map_err(|e| nats_err("dead-letter ack", e))?;
    Ok(())
}

/// The durable intake consumer of partition `index` of `count`, for the base name `base`
/// ([`crate::BusConfig::consumer`]): `<base>-p<index>` when partitioned, `base` otherwise.
pub fn consumer_name(base: &str, count: u32, index: u32) -> String {
    if count > 1 {
        format!("{base}-p{index}")
    } else {
        base.to_owned()
    }
}
