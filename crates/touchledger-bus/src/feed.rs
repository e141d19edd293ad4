//! The committed-event feed: every committed record, in position order, published on
//! `<prefix>.ledger.event.<kind>.<customer>` into the feed stream, whose sequence equals the
//! position (`Nats-Expected-Last-Sequence`); checkpoints on `<prefix>.ledger.checkpoint`.
//!
//! NATS outages are waited out: on a publish failure the feed backs off, re-reads the stream's
//! last sequence (some publishes may have landed) and continues from there.
//!
//! Only the last record of each chunk asks for JetStream's ack; the expected-last-sequence
//! header makes that one ack confirm the whole chunk (ADR 0003).

use std::sync::Arc;

use async_nats::jetstream::{self, message::PublishMessage};
use prost::Message;
use tokio_util::sync::CancellationToken;
use touchledger_proto::v1;
use touchledger_store::{EventStore, SledStore, StoreError};

use crate::{BusConfig, BusError, headers, js_err, nats_err};

/// How far the committed-event feed is durably stored (the stream acknowledged it), for
/// acknowledgements that must wait for it: in a partition whose owner can change, a touchpoint
/// acknowledged before its record is in the feed would exist only in the old owner's store, and
/// the new owner, which starts from the feed, would not have it. The default tracks nothing and
/// never waits (a single ledger: the store is the system of record).
#[derive(Clone, Debug, Default)]
pub struct FeedProgress(Option<Arc<tokio::sync::watch::Sender<u64>>>);

impl FeedProgress {
    /// Track the feed: acknowledgements wait until it holds their positions.
    pub fn tracked() -> Self {
        FeedProgress(Some(Arc::new(tokio::sync::watch::channel(0).0)))
    }

    pub(crate) fn set(&self, position: u64) {
        if let Some(tx) = &self.0 {
            tx.send_if_modified(|p| {
                let moved = position > *p;
                *p = (*p).max(position);
                moved
            });
        }
    }

    /// Until the feed holds `position` (at once when not tracked). `Err(Fenced)` if the lease
    /// runs out meanwhile; `Ok(false)` at `shutdown` (the caller then acknowledges nothing: the
    /// records are durable in the store and their touchpoints are redelivered).
    pub async fn reached(
        &self,
        position: u64,
        fence: &crate::Fence,
        shutdown: &CancellationToken,
    ) -> Result<bool, BusError> {
        let Some(tx) = &self.0 else {
            return Ok(true);
        };
        let mut rx = tx.subscribe();
        loop {
            if *rx.borrow_and_update() >= position {
                return Ok(true);
            }
            fence.check("acknowledgement after the feed")?;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = rx.changed() => {}
                // The fence runs out by time alone: look again now and then.
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
        }
    }
}

/// The highest position an append's outcomes name (stored now or before; 0 if none).
pub(crate) fn last_position(outcomes: &[touchledger_store::AppendOutcome]) -> u64 {
    use touchledger_store::AppendOutcome;
    outcomes
        .iter()
        .filter_map(|o| match o {
            AppendOutcome::Appended { position, .. } | AppendOutcome::Duplicate { position } => {
                Some(*position)
            }
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Records published per read of the store (bounds memory).
const CHUNK: u64 = 1000;

/// Publish committed records until `shutdown`, resuming after the feed stream's last sequence.
pub async fn run_feed(
    js: jetstream::Context,
    client: async_nats::Client,
    store: Arc<SledStore>,
    cfg: BusConfig,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut stream = js
        .get_stream(cfg.subjects.feed_stream())
        .await
        .map_err(|e| js_err("get feed stream")(&e))?;
    let mut published = resync(&mut stream, &store, &cfg).await?;
    cfg.feed.set(published);
    let mut head = store.subscribe();
    tracing::info!(published, "feed started");
    metrics::gauge!(
        "touchledger_feed_published_position",
        crate::metric_labels(&cfg.subjects, &[])
    )
    .set(published as f64);
    loop {
        let target = head.borrow_and_update().position;
        if let Err(e) = publish_range(
            &js,
            &client,
            &store,
            &cfg,
            &mut published,
            target,
            &shutdown,
        )
        .await
        {
            match e {
                BusError::Nats { .. } | BusError::JetStream { .. } => {
                    tracing::warn!(error = %e, published, "feed publish failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(cfg.retry_delay) => {}
                    }
                    match resync(&mut stream, &store, &cfg).await {
                        Ok(p) => {
                            published = p;
                            cfg.feed.set(p);
                        }
                        Err(e @ BusError::FeedMismatch { .. }) => return Err(e),
                        Err(e) => tracing::warn!(error = %e, "feed resync failed"),
                    }
                    continue;
                }
                other => return Err(other),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = head.changed() => if r.is_err() { break },
        }
    }
    // Stopped (by `run_ledger` once the store's writers have stopped): what they appended is
    // final; publish it, so that a leased partition's next owner finds it in the feed rather
    // than this store ending in records the feed lacks (which this process would refuse when
    // it takes the partition again). Bounded: what cannot be published now is published by
    // the next start's resync, or, in a leased partition whose lease is gone, never (it was
    // never acknowledged; the next owner stores it from the intake).
    let target = store.head().position;
    if published < target {
        let never = CancellationToken::new();
        let last = publish_range(&js, &client, &store, &cfg, &mut published, target, &never);
        match tokio::time::timeout(FINAL_PUBLISH, last).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, published, target, "feed incomplete at stop")
            }
            Err(_) => tracing::warn!(published, target, "feed incomplete at stop: timed out"),
        }
    }
    tracing::info!(published, "feed stopped");
    Ok(())
}

/// How long a stopping feed tries to publish the store's last records.
const FINAL_PUBLISH: std::time::Duration = std::time::Duration::from_secs(10);

/// Where the feed stands: the stream's last sequence, after checking that its last message is
/// this store's record at that position (same position header, same hash). Anything else —
/// another writer on the feed subjects, a store restored from an older backup — stops the feed
/// with [`BusError::FeedMismatch`] instead of silently skipping or contradicting positions.
async fn resync(
    stream: &mut jetstream::stream::Stream,
    store: &Arc<SledStore>,
    cfg: &BusConfig,
) -> Result<u64, BusError> {
    let Some(head) = last_message(stream).await? else {
        return Ok(0);
    };
    let last = head.sequence;
    let mismatch = |detail: String| BusError::FeedMismatch {
        stream: cfg.subjects.feed_stream(),
        detail,
    };
    if head.position != Some(last) {
        return Err(mismatch(format!(
            "message {last} carries position {:?}",
            head.position
        )));
    }
    let s = store.clone();
    let stored = tokio::task::spawn_blocking(move || s.get(last))
        .await
        .map_err(|e| nats_err("feed resync task", e))??;
    let Some(stored) = stored else {
        return Err(mismatch(format!(
            "the stream has position {last}, the store ends at {}",
            store.head().position
        )));
    };
    if head.hash != stored.hash.to_hex() {
        return Err(mismatch(format!(
            "position {last} has hash {} in the stream, {} in the store",
            head.hash, stored.hash
        )));
    }
    Ok(last)
}

/// The last message of a feed stream: its sequence and the position and hash it carries.
pub(crate) struct FeedHead {
    /// The stream's last sequence.
    pub sequence: u64,
    /// Its position header, if it parses.
    pub position: Option<u64>,
    /// Its hash header (hex; empty when absent).
    pub hash: String,
}

/// The feed stream's last message (`None` while the stream is empty).
pub(crate) async fn last_message(
    stream: &mut jetstream::stream::Stream,
) -> Result<Option<FeedHead>, BusError> {
    let last = stream
        .info()
        .await
        .map_err(|e| js_err("feed stream info")(&e))?
        .state
        .last_sequence;
    if last == 0 {
        return Ok(None);
    }
    let msg = stream
        .get_raw_message(last)
        .await
        .map_err(|e| js_err("feed last message")(&e))?;
    let get = |name: &str| msg.headers.get(name).map(|v| v.to_string());
    Ok(Some(FeedHead {
        sequence: last,
        position: get(headers::POSITION).and_then(|p| p.parse().ok()),
        hash: get(headers::HASH).unwrap_or_default(),
    }))
}

fn corrupt(position: u64, detail: impl ToString) -> BusError {
    BusError::Store(StoreError::Corrupt {
        what: format!("position {position}"),
        detail: detail.to_string(),
    })
}

/// Publish positions `published+1 ..= target`, advancing `published` chunk by chunk.
async fn publish_range(
    js: &jetstream::Context,
    client: &async_nats::Client,
    store: &Arc<SledStore>,
    cfg: &BusConfig,
    published: &mut u64,
    target: u64,
    shutdown: &CancellationToken,
) -> Result<(), BusError> {
    // Chunk by chunk, so that a large backlog does not hold up shutdown.
    while *published < target && !shutdown.is_cancelled() {
        // An owner that lost its partition's lease publishes nothing more.
        cfg.fence.check("feed publish")?;
        let from = *published + 1;
        let to = (*published + CHUNK).min(target);
        let s = store.clone();
        let records = tokio::task::spawn_blocking(move || {
            s.read_raw(from, Some(to)).collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| nats_err("feed read task", e))??;
        // Every record but the chunk's last goes out as a plain publish (no PubAck to produce,
        // send and parse); the last one asks for JetStream's ack. Each carries
        // `Nats-Expected-Last-Sequence`, so the stream stores a record only directly after its
        // predecessor: if any record of the chunk is lost or refused, every later one is
        // refused too, the last one's ack reports the wrong sequence, and the feed resyncs
        // from the stream's last message. One acknowledged publish per chunk thus confirms the
        // whole chunk.
        let last = records.len().saturating_sub(1);
        for (i, r) in records.into_iter().enumerate() {
            let (kind, customer) = touchledger_proto::peek_record(&r.record)
                .ok_or_else(|| corrupt(r.position, "record without kind or customer"))?;
            let subject = cfg.subjects.event(kind, customer);
            let mut h = async_nats::HeaderMap::new();
            // Position and hash: a re-send of this record is a duplicate, a different record at
            // this position (another writer) is not, and is refused by the expected sequence.
            h.insert(
                "Nats-Msg-Id",
                format!("{}:{}", r.position, r.hash.to_hex()).as_str(),
            );
            h.insert(
                "Nats-Expected-Last-Sequence",
                (r.position - 1).to_string().as_str(),
            );
            h.insert(headers::POSITION, r.position.to_string().as_str());
            h.insert(headers::HASH, r.hash.to_hex().as_str());
            if i < last {
                client
                    .publish_with_headers(subject, h, r.record.into())
                    .await
                    .map_err(|e| nats_err("feed publish", e))?;
            } else {
                let ack = js
                    .send_publish(
                        subject,
                        PublishMessage::build().payload(r.record.into()).headers(h),
                    )
                    .await
                    .map_err(|e| nats_err("feed publish", e))?
                    .await
                    .map_err(|e| nats_err("feed publish ack", e))?;
                // The stream must hold this record at its position: a duplicate ack for
                // another sequence means the stream does not continue this store.
                if ack.sequence != r.position {
                    return Err(BusError::FeedMismatch {
                        stream: cfg.subjects.feed_stream(),
                        detail: format!(
                            "position {} was acknowledged as stream sequence {}{}",
                            r.position,
                            ack.sequence,
                            if ack.duplicate { " (duplicate)" } else { "" }
                        ),
                    });
                }
            }
        }
        // Checkpoints of this range, after the records they cover are in the stream.
        let s = store.clone();
        let cps = tokio::task::spawn_blocking(move || {
            s.checkpoints_from(from)
                .take_while(|c| c.as_ref().map_or(true, |c| c.position <= to))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| nats_err("checkpoint read task", e))??;
        for c in cps {
            let msg = v1::Checkpoint {
                position: c.position,
                hash: c.hash.0.to_vec(),
                recorded_at: Some(touchledger_proto::to_pb_time(c.recorded_at)),
            };
            client
                .publish(cfg.subjects.checkpoint(), msg.encode_to_vec().into())
                .await
                .map_err(|e| nats_err("checkpoint publish", e))?;
        }
        *published = to;
        cfg.feed.set(to);
        // How far the feed has caught up (compare with the store's head: the feed's lag).
        metrics::gauge!(
            "touchledger_feed_published_position",
            crate::metric_labels(&cfg.subjects, &[])
        )
        .set(to as f64);
    }
    Ok(())
}

/// How long the catch-up waits for the next feed message before it gives up.
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bring `store` up to its partition's feed stream before this process takes the partition (a
/// new owner after a lease changed hands, or an owner coming back): every record the feed holds
/// beyond the store's head is restored in position order with [`SledStore::restore`], which
/// recomputes each hash and refuses a record that does not continue the store's chain. Returns
/// the number of records restored.
///
/// A store that ends *beyond* the feed must hold the feed's last record as the feed has it (its
/// further records are published by the feed when the ledger starts). A store whose history
/// differs from the feed (it appended records another owner never saw) is refused with
/// [`BusError::FeedMismatch`]: it is never merged ([`crate::own_partition`] sets such a store
/// aside and rebuilds the partition from the feed, unless the feed lacks certified history).
pub async fn catch_up_from_feed(
    js: &jetstream::Context,
    store: &Arc<SledStore>,
    cfg: &BusConfig,
) -> Result<u64, BusError> {
    use futures::StreamExt;
    let cfg = cfg.clone().scoped();
    let name = cfg.subjects.feed_stream();
    // No feed stream yet: nothing to catch up. Any other failure is not "nothing".
    let mut stream = match js.get_stream(&name).await {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(0);
        }
        Err(e) => return Err(js_err("feed stream for the catch-up")(&e)),
    };
    let Some(last) = last_message(&mut stream).await? else {
        return Ok(0);
    };
    let head = store.head().position;
    let mismatch = |detail: String| BusError::FeedMismatch {
        stream: name.clone(),
        detail,
    };
    if last.sequence <= head {
        // The store is at or beyond the feed: it must hold the feed's last record as the feed
        // has it (what is beyond is published by the feed when the ledger starts).
        let at = last.sequence;
        let s = store.clone();
        let stored = tokio::task::spawn_blocking(move || s.get(at))
            .await
            .map_err(|e| nats_err("feed catch-up task", e))??;
        return match stored {
            Some(r) if last.position == Some(at) && r.hash.to_hex() == last.hash => Ok(0),
            Some(r) => Err(mismatch(format!(
                "position {at} has hash {} in the stream, {} in the store",
                last.hash, r.hash
            ))),
            None => Err(mismatch(format!("the store lacks position {at}"))),
        };
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: head + 1,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| js_err("feed catch-up consumer")(&e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| js_err("feed catch-up messages")(&e))?;
    tracing::info!(from = head + 1, to = last.sequence, stream = %name, "catching up the store from the feed");
    let started = std::time::Instant::now();
    let mut next = head + 1;
    let mut chunk = Vec::with_capacity(CHUNK as usize);
    while next <= last.sequence {
        let m = match tokio::time::timeout(CATCH_UP_WAIT, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(nats_err("feed catch-up", e)),
            Ok(None) | Err(_) => {
                return Err(nats_err(
                    "feed catch-up",
                    format!(
                        "no message {next} of {} within {CATCH_UP_WAIT:?}",
                        last.sequence
                    ),
                ));
            }
        };
        let c = crate::remote::decode(&m).map_err(|e| mismatch(e.to_string()))?;
        if c.position != next {
            return Err(mismatch(format!(
                "message for position {next} carries position {}",
                c.position
            )));
        }
        chunk.push(c);
        next += 1;
        if chunk.len() as u64 == CHUNK || next > last.sequence {
            let records = std::mem::take(&mut chunk);
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.restore(records))
                .await
                .map_err(|e| nats_err("feed catch-up task", e))?
                .map_err(|e| match e {
                    StoreError::RestoreMismatch { position, detail } => {
                        mismatch(format!("position {position}: {detail}"))
                    }
                    other => BusError::Store(other),
                })?;
        }
    }
    let restored = last.sequence - head;
    tracing::info!(
        restored,
        seconds = started.elapsed().as_secs_f64(),
        "store caught up from the feed"
    );
    Ok(restored)
}

/// The head of partition `index` as the newest global checkpoint certifies it (`None`: no
/// checkpoint yet). Global checkpoints are read from the feeds, so a feed that ends before this
/// position has lost history the ledger had acknowledged and certified.
pub async fn certified_head(
    js: &jetstream::Context,
    subjects: &crate::Subjects,
    index: u32,
) -> Result<Option<(u64, touchledger_store::Hash)>, BusError> {
    let name = crate::global_checkpoint_stream(subjects);
    let stream = match js.get_stream(&name).await {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(js_err("global checkpoint stream")(&e)),
    };
    let msg = match stream
        .get_last_raw_message_by_subject(&crate::global_checkpoint_subject(subjects))
        .await
    {
        Ok(m) => m,
        Err(e)
            if matches!(
                e.kind(),
                jetstream::stream::LastRawMessageErrorKind::NoMessageFound
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(js_err("last global checkpoint")(&e)),
    };
    let text = String::from_utf8_lossy(&msg.payload);
    let checkpoint = touchledger_store::GlobalCheckpoint::parse(&text).map_err(|detail| {
        BusError::FeedMismatch {
            stream: name.clone(),
            detail: format!("last global checkpoint does not parse: {detail}"),
        }
    })?;
    Ok(checkpoint.heads.get(index as usize).copied())
}
