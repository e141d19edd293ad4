//! Synchronous append over request/reply: an `AppendRequest` (protobuf) in, an `AppendReply`
//! with one outcome per item out — sent only after the batch is flushed.

use std::sync::Arc;

use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use touchledger_domain::{RejectCode, Rejection};
use touchledger_proto::v1;
use touchledger_store::{AppendItem, AppendOutcome, EventStore, SledStore, rejection_record};

use crate::{BusConfig, BusError, nats_err};

/// Answer append requests until `shutdown`.
pub async fn serve_append(
    client: async_nats::Client,
    store: Arc<SledStore>,
    cfg: BusConfig,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut sub = client
        .queue_subscribe(cfg.subjects.append(), cfg.queue_group.clone())
        .await
        .map_err(|e| nats_err("subscribe append", e))?;
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply) = msg.reply.clone() else {
            tracing::warn!(subject = %msg.subject, "append request without reply subject ignored");
            continue;
        };
        let origin = format!("nats:{}", msg.subject);
        let answer = match handle(&store, &cfg, &shutdown, &msg.payload, origin).await {
            Ok(a) => a,
            // Only a store that must be reopened stops the ledger. Any other failure is this
            // request's: it gets no reply (nothing was committed), and the caller retries.
            Err(BusError::Store(touchledger_store::StoreError::NeedsReopen)) => {
                return Err(BusError::Store(touchledger_store::StoreError::NeedsReopen));
            }
            // The lease ran out: no reply (the caller retries and reaches the new owner).
            Err(e @ BusError::Fenced(_)) => return Err(e),
            // Nothing was written: a typed answer, so the caller knows to retry later.
            Err(BusError::Store(
                ref e @ touchledger_store::StoreError::StorageFull {
                    available, reserve, ..
                },
            )) => {
                tracing::warn!(
                    available,
                    reserve,
                    "synchronous append refused: storage full"
                );
                v1::AppendReply {
                    outcomes: Vec::new(),
                    unavailable: Some(v1::Unavailable {
                        code: "STORAGE_FULL".into(),
                        reason: e.to_string(),
                        available_bytes: available,
                        reserve_bytes: reserve,
                    }),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "append request failed; not answered");
                continue;
            }
        };
        // The outcome is durable whether or not the reply arrives; a caller that retries gets
        // `duplicate` with the original position.
        if let Err(e) = client.publish(reply, answer.encode_to_vec().into()).await {
            tracing::warn!(error = %e, "append reply failed");
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(())
}

fn to_wire(o: &AppendOutcome) -> v1::AppendOutcome {
    use v1::append_outcome::Outcome;
    let outcome = match o {
        AppendOutcome::Appended {
            position,
            customer_version,
            hash,
        } => Outcome::Appended(v1::Appended {
            position: *position,
            customer_version: *customer_version,
            hash: hash.0.to_vec(),
        }),
        AppendOutcome::Duplicate { position } => Outcome::Duplicate(v1::Duplicate {
            position: *position,
        }),
        AppendOutcome::VersionConflict { expected, actual } => {
            Outcome::VersionConflict(v1::VersionConflict {
                expected: *expected,
                actual: *actual,
            })
        }
        AppendOutcome::Rejected(r) => Outcome::Rejected(v1::Rejection::from(r)),
    };
    v1::AppendOutcome {
        outcome: Some(outcome),
    }
}

/// Decode, append, and build the reply. A request that does not decode gets one rejected outcome.
async fn handle(
    store: &Arc<SledStore>,
    cfg: &BusConfig,
    shutdown: &CancellationToken,
    payload: &[u8],
    origin: String,
) -> Result<v1::AppendReply, BusError> {
    let request = match v1::AppendRequest::decode(payload) {
        Ok(r) => r,
        Err(e) => {
            let r = Rejection::new(
                RejectCode::DecodeFailed,
                "",
                format!("not a touchledger.v1.AppendRequest: {e}"),
            );
            let rec = rejection_record(r.code, r.reason.clone(), payload.to_vec(), origin);
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.record_rejections(vec![rec]))
                .await
                .map_err(|e| nats_err("append task", e))??;
            return Ok(v1::AppendReply {
                outcomes: vec![to_wire(&AppendOutcome::Rejected(r))],
                unavailable: None,
            });
        }
    };
    let mut slots: Vec<Result<usize, Rejection>> = Vec::with_capacity(request.items.len());
    let mut items = Vec::new();
    let mut undecodable = Vec::new();
    for (i, item) in request.items.into_iter().enumerate() {
        let raw = item
            .event
            .as_ref()
            .map(|e| e.encode_to_vec())
            .unwrap_or_default();
        let decoded = match item.event {
            Some(env) => touchledger_domain::Event::try_from(env),
            None => Err(Rejection::new(
                RejectCode::FieldMissing,
                "items.event",
                "item without event",
            )),
        };
        match decoded {
            Ok(event) => {
                slots.push(Ok(items.len()));
                items.push(AppendItem {
                    event,
                    expected_customer_version: item.expected_customer_version,
                    raw: Some(raw),
                    origin: format!("{origin}#{i}"),
                });
            }
            Err(r) => {
                let mut rec =
                    rejection_record(r.code, r.reason.clone(), raw, format!("{origin}#{i}"));
                rec.rejection.field = r.field.clone();
                undecodable.push(rec);
                slots.push(Err(r));
            }
        }
    }
    cfg.fence.check("synchronous append")?;
    let s = store.clone();
    let outcomes = tokio::task::spawn_blocking(
        move || -> Result<Vec<AppendOutcome>, touchledger_store::StoreError> {
            s.record_rejections(undecodable)?;
            s.append(items)
        },
    )
    .await
    .map_err(|e| nats_err("append task", e))??;
    cfg.fence.check("synchronous append reply")?;
    // In a partition owned by lease, the reply waits until the records are in the feed stream.
    let last = crate::feed::last_position(&outcomes);
    if !cfg.feed.reached(last, &cfg.fence, shutdown).await? {
        return Err(nats_err(
            "append reply",
            "shut down before the feed held the records (durable; a retry answers duplicate)",
        ));
    }
    crate::count_outcomes("append", &outcomes);
    for r in slots.iter().filter_map(|s| s.as_ref().err()) {
        metrics::counter!("touchledger_rejections_total", "path" => "append", "code" => r.code.as_str()).increment(1);
    }
    let outcomes = slots
        .into_iter()
        .map(|slot| match slot {
            Ok(i) => to_wire(&outcomes[i]),
            Err(r) => to_wire(&AppendOutcome::Rejected(r)),
        })
        .collect();
    Ok(v1::AppendReply {
        outcomes,
        unavailable: None,
    })
}
