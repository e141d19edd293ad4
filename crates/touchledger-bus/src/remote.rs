//! Remote projectors: fold the committed-event stream (`<PREFIX>_LEDGER_EVENTS`) into
//! projections kept in a database of their own, apart from the ledger process.
//!
//! Key decision: the feed stream's sequence is the ledger position, so an ordered consumer
//! started at `checkpoint + 1` delivers exactly the positions not yet folded, in order; the
//! projector's gap check refuses anything else. Batches are committed atomically with their
//! checkpoint, so a crash or a redelivery never loses or double-counts an event.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use touchledger_projector::{Change, Projector};
use touchledger_proto::v1;
use touchledger_store::{Committed, Hash};

use crate::{BusError, Subjects, headers, js_err, nats_err};

pub(crate) fn decode(msg: &jetstream::Message) -> Result<Committed, BusError> {
    let bad = |detail: String| BusError::Projection(format!("feed message: {detail}"));
    let h = msg.headers.as_ref();
    let get = |n: &str| h.and_then(|h| h.get(n)).map(|v| v.to_string());
    let position: u64 = get(headers::POSITION)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad("no position header".into()))?;
    let hash = get(headers::HASH)
        .and_then(|x| hex::decode(x).ok())
        .and_then(|b| Hash::from_slice(&b))
        .ok_or_else(|| bad(format!("position {position}: no hash header")))?;
    let rec = v1::StoredRecord::decode(msg.payload.as_ref()).map_err(|e| bad(e.to_string()))?;
    let recorded_at = touchledger_proto::from_pb_time("recorded_at", rec.recorded_at)
        .map_err(|e| bad(e.to_string()))?;
    let prev_hash =
        Hash::from_slice(&rec.prev_hash).ok_or_else(|| bad("prev_hash is not 32 bytes".into()))?;
    let event = touchledger_domain::Event::try_from(rec.event.unwrap_or_default())
        .map_err(|e| bad(e.to_string()))?;
    Ok(Committed {
        position,
        customer_version: rec.customer_version,
        recorded_at,
        prev_hash,
        hash,
        event,
    })
}

/// Fold the committed-event stream into `projectors` until `shutdown`, committing a batch
/// when `batch` events are in hand or the stream is idle for 20 ms. Each batch's changes are
/// sent on `changes` (if given).
pub async fn run_remote_projectors(
    js: jetstream::Context,
    subjects: Subjects,
    mut projectors: Vec<Projector>,
    batch: usize,
    changes: Option<mpsc::Sender<Change>>,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let start = projectors.iter().map(|p| p.checkpoint()).min().unwrap_or(0) + 1;
    let stream = js
        .get_stream(subjects.feed_stream())
        .await
        .map_err(|e| js_err("get feed stream")(&e))?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| js_err("create ordered consumer")(&e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| js_err("ordered consumer messages")(&e))?;
    tracing::info!(start, "remote projectors following the feed");
    let mut pending: Vec<Committed> = Vec::with_capacity(batch);
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = tokio::time::timeout(Duration::from_millis(20), messages.next()) => m,
        };
        match next {
            Ok(Some(Ok(m))) => {
                pending.push(decode(&m)?);
                if pending.len() < batch {
                    continue;
                }
            }
            Ok(Some(Err(e))) => return Err(nats_err("feed consumer", e)),
            Ok(None) => break,
            Err(_) if pending.is_empty() => continue,
            Err(_) => {}
        }
        let events = std::mem::take(&mut pending);
        let (back, result) = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut r = Ok(());
            for p in projectors.iter_mut() {
                match p.apply(&events) {
                    Ok(customers) => out.push(Change::after(p, customers, &events)),
                    Err(e) => {
                        r = Err(e);
                        break;
                    }
                }
            }
            (projectors, r.map(|_| out))
        })
        .await
        .map_err(|e| nats_err("remote projector task", e))?;
        projectors = back;
        let out = result.map_err(|e| BusError::Projection(e.to_string()))?;
        if let Some(tx) = &changes {
            for c in out {
                if tx.send(c).await.is_err() {
                    break;
                }
            }
        }
    }
    for p in &projectors {
        p.tree().flush()?;
    }
    Ok(())
}
