//! Replay over NATS (`<prefix>.ledger.replay`): the requested history streams back in position
//! order as `ReplayChunk`s, each waiting for the requester's "next" before the following one is
//! read from the store — memory stays bounded on both sides for any range.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use touchledger_domain::{RejectCode, Rejection};
use touchledger_proto::v1;
use touchledger_store::{EventStore, ReadFilter, SledStore};

use crate::{BusConfig, BusError, nats_err};

/// How long a replay waits for the requester to ask for the next chunk before giving up.
const CREDIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Serve replay requests until `shutdown`; each replay runs in its own task.
pub async fn serve_replay(
    client: async_nats::Client,
    store: Arc<SledStore>,
    cfg: BusConfig,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut sub = client
        .queue_subscribe(cfg.subjects.replay(), cfg.queue_group.clone())
        .await
        .map_err(|e| nats_err("subscribe replay", e))?;
    let mut running = tokio::task::JoinSet::new();
    // Replays beyond the cap wait for a slot (bounded memory and store load).
    let slots = Arc::new(tokio::sync::Semaphore::new(
        cfg.max_concurrent_replays.max(1),
    ));
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let (client, store, stop) = (client.clone(), store.clone(), shutdown.clone());
        let slots = slots.clone();
        running.spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            if let Err(e) = replay_one(&client, store, &msg.payload, reply.to_string(), stop).await
            {
                tracing::warn!(error = %e, "replay aborted");
            }
        });
        while running.try_join_next().is_some() {}
    }
    running.abort_all();
    let _ = sub.unsubscribe().await;
    Ok(())
}

fn parse(req: &v1::ReplayRequest) -> Result<ReadFilter, Rejection> {
    let kind = if req.kind.is_empty() {
        None
    } else {
        Some(
            req.kind
                .parse()
                .map_err(|e: touchledger_domain::event::UnknownKind| {
                    Rejection::new(RejectCode::EnumInvalid, "kind", e.to_string())
                })?,
        )
    };
    let time = |f: &str, t: &Option<prost_types::Timestamp>| {
        (*t).map(|t| touchledger_proto::from_pb_time(f, Some(t)))
            .transpose()
    };
    Ok(ReadFilter {
        from_position: req.from_position,
        to_position: (req.to_position > 0).then_some(req.to_position),
        customer: (!req.customer.is_empty()).then(|| req.customer.clone()),
        kind,
        occurred_since: time("occurred_since", &req.occurred_since)?,
        occurred_until: time("occurred_until", &req.occurred_until)?,
    })
}

async fn replay_one(
    client: &async_nats::Client,
    store: Arc<SledStore>,
    payload: &[u8],
    reply: String,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let fail = |r: Rejection| v1::ReplayChunk {
        end: true,
        error: Some(v1::Rejection::from(&r)),
        ..Default::default()
    };
    let req = match v1::ReplayRequest::decode(payload) {
        Ok(r) => r,
        Err(e) => {
            let r = Rejection::new(
                RejectCode::DecodeFailed,
                "",
                format!("not a touchledger.v1.ReplayRequest: {e}"),
            );
            return publish(client, &reply, None, fail(r)).await;
        }
    };
    let mut filter = match parse(&req) {
        Ok(f) => f,
        Err(r) => return publish(client, &reply, None, fail(r)).await,
    };
    let head = store.head();
    // A replay is a snapshot: it ends at the head as of the request.
    filter.to_position = Some(
        filter
            .to_position
            .map_or(head.position, |t| t.min(head.position)),
    );
    let chunk = if req.chunk_size == 0 {
        500
    } else {
        req.chunk_size.min(5000)
    } as usize;
    let unfiltered = filter.customer.is_none()
        && filter.kind.is_none()
        && filter.occurred_since.is_none()
        && filter.occurred_until.is_none();

    // Leave room for the protobuf framing and headers within the server's payload limit.
    let byte_budget = (client.server_info().max_payload / 2).max(64 * 1024);
    let credit_inbox = client.new_inbox();
    let mut credits = client
        .subscribe(credit_inbox.clone())
        .await
        .map_err(|e| nats_err("subscribe credits", e))?;
    let mut next_from = filter.from_position.max(1);
    let to = filter.to_position.unwrap_or(0);
    let mut count = 0u64;
    loop {
        // Read the next chunk on a blocking thread, resuming after the last position sent.
        let s = store.clone();
        let mut f = filter.clone();
        f.from_position = next_from;
        let budget = byte_budget;
        let records = tokio::task::spawn_blocking(
            move || -> Result<Vec<v1::CommittedRecord>, touchledger_store::StoreError> {
                let iter: Box<
                    dyn Iterator<Item = Result<v1::CommittedRecord, touchledger_store::StoreError>>
                        + Send,
                > = if unfiltered {
                    Box::new(s.read_raw(f.from_position, f.to_position).map(|r| {
                        r.map(|r| v1::CommittedRecord {
                            position: r.position,
                            hash: r.hash.0.to_vec(),
                            record: r.record,
                        })
                    }))
                } else {
                    Box::new(s.read(&f).map(|c| {
                        c.map(|c| v1::CommittedRecord {
                            position: c.position,
                            hash: c.hash.0.to_vec(),
                            record: c.record_bytes(),
                        })
                    }))
                };
                // A chunk ends at `chunk` records or when the next would pass the byte budget
                // (a chunk must fit in one NATS message); it always holds at least one record.
                let mut out = Vec::new();
                let mut bytes = 0usize;
                for r in iter {
                    let r = r?;
                    let size = r.record.len() + 48;
                    if !out.is_empty() && (out.len() >= chunk || bytes + size > budget) {
                        break;
                    }
                    bytes += size;
                    out.push(r);
                    if out.len() >= chunk {
                        break;
                    }
                }
                Ok(out)
            },
        )
        .await
        .map_err(|e| nats_err("replay read task", e))?;
        let records = match records {
            Ok(r) => r,
            Err(e) => {
                let r = Rejection::new(
                    RejectCode::DecodeFailed,
                    "",
                    format!("store failure during replay: {e}"),
                );
                return publish(client, &reply, None, fail(r)).await;
            }
        };
        let last = records.last().map(|r| r.position);
        count += records.len() as u64;
        let end = last.is_none_or(|p| p >= to);
        let msg = v1::ReplayChunk {
            records,
            end,
            count: if end { count } else { 0 },
            head_position: if end { head.position } else { 0 },
            head_hash: if end {
                head.hash.0.to_vec()
            } else {
                Vec::new()
            },
            error: None,
        };
        if end {
            return publish(client, &reply, None, msg).await;
        }
        publish(client, &reply, Some(credit_inbox.clone()), msg).await?;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            c = tokio::time::timeout(CREDIT_TIMEOUT, credits.next()) => match c {
                Ok(Some(_)) => {}
                _ => return Err(nats_err("replay", "requester stopped asking for chunks")),
            },
        }
        next_from = last.unwrap_or(to) + 1;
    }
}

async fn publish(
    client: &async_nats::Client,
    subject: &str,
    reply: Option<String>,
    chunk: v1::ReplayChunk,
) -> Result<(), BusError> {
    let body = chunk.encode_to_vec().into();
    match reply {
        Some(r) => client.publish_with_reply(subject.to_owned(), r, body).await,
        None => client.publish(subject.to_owned(), body).await,
    }
    .map_err(|e| nats_err("replay publish", e))
}
