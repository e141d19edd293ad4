//! JetStream intake: a durable pull consumer on the touchpoint stream. Fetch a batch, decode,
//! append with one flush, then ack; dead-letter and terminate bad input; nak on store failure.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use touchledger_domain::Rejection;
use touchledger_store::{AppendItem, AppendOutcome, EventStore, SledStore, rejection_record};

use crate::{BusConfig, BusError, headers, js_err, nats_err};

/// What to do with one fetched message once its batch is committed.
enum Verdict {
    Ack,
    DeadLetter(Rejection),
}

/// Consume the intake stream until `shutdown`.
pub async fn run_intake(
    js: jetstream::Context,
    client: async_nats::Client,
    store: Arc<SledStore>,
    cfg: BusConfig,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let stream = js
        .get_stream(cfg.subjects.intake_stream())
        .await
        .map_err(|e| js_err("get intake stream")(&e))?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &cfg.consumer,
            pull::Config {
                durable_name: Some(cfg.consumer.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: cfg.ack_wait,
                max_ack_pending: (cfg.batch as i64 * 4).max(1000),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| js_err("intake consumer")(&e))?;
    tracing::info!(stream = %cfg.subjects.intake_stream(), consumer = %cfg.consumer, "intake started");

    while !shutdown.is_cancelled() {
        let fetch = consumer
            .fetch()
            .max_messages(cfg.batch)
            .expires(cfg.fetch_wait)
            .messages();
        let mut batch = tokio::select! {
            _ = shutdown.cancelled() => break,
            b = fetch => match b {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "fetch failed; retrying");
                    tokio::time::sleep(cfg.retry_delay).await;
                    continue;
                }
            },
        };
        let mut messages = Vec::with_capacity(cfg.batch);
        while let Some(m) = batch.next().await {
            match m {
                Ok(m) => messages.push(m),
                Err(e) => {
                    tracing::warn!(error = %e, "message error in fetch");
                    break;
                }
            }
        }
        if messages.is_empty() {
            continue;
        }
        // The batch in hand is always finished, even if shutdown is requested meanwhile.
        process(&client, &store, &cfg, messages).await?;
    }
    tracing::info!("intake stopped");
    Ok(())
}

async fn process(
    client: &async_nats::Client,
    store: &Arc<SledStore>,
    cfg: &BusConfig,
    messages: Vec<jetstream::Message>,
) -> Result<(), BusError> {
    // Decode; remember for every message whether its verdict comes from the append (index into
    // the items) or from decoding.
    let mut items = Vec::new();
    let mut undecodable = Vec::new();
    let mut slots: Vec<Result<usize, Rejection>> = Vec::with_capacity(messages.len());
    for m in &messages {
        let origin = format!("nats:{}", m.subject);
        match touchledger_proto::decode_event(&m.payload) {
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
    let s = store.clone();
    let result = tokio::task::spawn_blocking(
        move || -> Result<Vec<AppendOutcome>, touchledger_store::StoreError> {
            s.record_rejections(undecodable)?;
            s.append(items)
        },
    )
    .await
    .map_err(|e| nats_err("append task", e))?;
    let outcomes = match result {
        Ok(o) => o,
        Err(e) => {
            // Nothing of this batch is acknowledged: JetStream redelivers it later.
            tracing::error!(error = %e, messages = messages.len(), "store failed; naking the batch");
            for m in &messages {
                let _ = m.ack_with(AckKind::Nak(Some(cfg.retry_delay))).await;
            }
            return match e {
                touchledger_store::StoreError::NeedsReopen => Err(e.into()),
                _ => Ok(()),
            };
        }
    };
    for (m, slot) in messages.iter().zip(slots) {
        let verdict = match slot {
            Err(r) => Verdict::DeadLetter(r),
            Ok(i) => match &outcomes[i] {
                AppendOutcome::Appended { .. } | AppendOutcome::Duplicate { .. } => Verdict::Ack,
                AppendOutcome::Rejected(r) => Verdict::DeadLetter(r.clone()),
                // Intake never sends an expected version; treat defensively as bad input.
                AppendOutcome::VersionConflict { expected, actual } => {
                    Verdict::DeadLetter(Rejection::new(
                        touchledger_domain::RejectCode::DecodeFailed,
                        "",
                        format!("unexpected version conflict {expected}/{actual}"),
                    ))
                }
            },
        };
        match verdict {
            // An ack lost to a connection problem only causes a redelivery, which the ledger
            // answers as a duplicate: log it and go on.
            Verdict::Ack => {
                if let Err(e) = m.ack().await {
                    tracing::warn!(error = %e, "ack failed; the message will be redelivered");
                }
            }
            Verdict::DeadLetter(r) => {
                let mut h = HeaderMap::new();
                if let Some(orig) = &m.headers {
                    for (k, vs) in orig.iter() {
                        for v in vs {
                            h.append(k.clone(), v.clone());
                        }
                    }
                }
                h.insert(headers::REJECT_CODE, r.code.as_str());
                h.insert(headers::REJECT_FIELD, r.field.as_str());
                h.insert(
                    headers::REJECT_REASON,
                    r.reason.replace(['\r', '\n'], " ").as_str(),
                );
                h.insert(headers::ORIGINAL_SUBJECT, m.subject.as_str());
                // The rejection is already durable in the store's record. If the dead-letter
                // publish fails the message is not terminated: it is redelivered, dead-lettered
                // and recorded again rather than lost.
                let subject = cfg.subjects.deadletter(r.code.as_str());
                if let Err(e) = client
                    .publish_with_headers(subject, h, m.payload.clone())
                    .await
                {
                    tracing::warn!(error = %e, "dead-letter publish failed; leaving the message for redelivery");
                    continue;
                }
                if let Err(e) = m.ack_with(AckKind::Term).await {
                    tracing::warn!(error = %e, "term failed; the message will be redelivered");
                }
            }
        }
    }
    Ok(())
}
