//! Global checkpoints of a partitioned ledger: every `every`, read each partition's feed stream
//! head (the position and hash headers of its last message), and when any changed, publish the
//! [`GlobalCheckpoint`] text on `<prefix>.ledger.global_checkpoint` into the stream
//! `<PREFIX>_GLOBAL_CHECKPOINTS`, kept without limit as the audit trail (a few hundred bytes
//! per checkpoint). One process publishes them: the owner of partition 0.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio_util::sync::CancellationToken;
use touchledger_store::{GlobalCheckpoint, Hash};

use crate::{BusError, Subjects, js_err, nats_err};

/// `<prefix>.ledger.global_checkpoint`.
pub fn global_checkpoint_subject(subjects: &Subjects) -> String {
    format!("{}.ledger.global_checkpoint", subjects.prefix())
}

/// The stream of global checkpoints, e.g. `CRM_GLOBAL_CHECKPOINTS`.
pub fn global_checkpoint_stream(subjects: &Subjects) -> String {
    subjects.stream_name("GLOBAL_CHECKPOINTS")
}

/// The heads of partitions `0..partitions` as their feed streams hold them now, or `None` while a
/// partition's feed stream does not exist yet (its ledger never started).
pub async fn feed_heads(
    js: &jetstream::Context,
    subjects: &Subjects,
    partitions: u32,
) -> Result<Option<GlobalCheckpoint>, BusError> {
    let mut heads = Vec::with_capacity(partitions as usize);
    for n in 0..partitions {
        let name = subjects.in_partition(n).feed_stream();
        let Ok(mut feed) = js.get_stream(&name).await else {
            return Ok(None);
        };
        let Some(head) = crate::feed::last_message(&mut feed).await? else {
            heads.push((0, Hash::ZERO));
            continue;
        };
        let hash = hex::decode(&head.hash)
            .ok()
            .and_then(|b| Hash::from_slice(&b));
        match (head.position, hash) {
            (Some(p), Some(h)) if p == head.sequence => heads.push((p, h)),
            _ => {
                return Err(BusError::FeedMismatch {
                    stream: name,
                    detail: format!(
                        "message {} lacks a matching position or hash header",
                        head.sequence
                    ),
                });
            }
        }
    }
    Ok(Some(GlobalCheckpoint { heads }))
}

/// Publish global checkpoints of a ledger of `partitions` every `every` until `shutdown` (only
/// when a head moved), into a stream of `replicas` copies.
pub async fn run_global_checkpoints(
    js: jetstream::Context,
    subjects: Subjects,
    (partitions, replicas): (u32, usize),
    every: Duration,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let name = global_checkpoint_stream(&subjects);
    let subject = global_checkpoint_subject(&subjects);
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    })
    .await
    .map_err(|e| js_err("global checkpoint stream")(&e))?;
    let mut last: Option<GlobalCheckpoint> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        let heads = match feed_heads(&js, &subjects, partitions).await {
            Ok(Some(h)) => h,
            Ok(None) => continue,
            Err(e @ BusError::FeedMismatch { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "global checkpoint: reading the feed heads failed; retrying");
                continue;
            }
        };
        if last.as_ref() == Some(&heads) {
            continue;
        }
        let text = heads.to_text();
        match js.publish(subject.clone(), text.into()).await {
            Ok(ack) => match ack.await {
                Ok(_) => {
                    tracing::info!(hash = %heads.hash(), "global checkpoint published");
                    metrics::counter!("touchledger_global_checkpoints_total").increment(1);
                    last = Some(heads);
                }
                Err(e) => tracing::warn!(error = %nats_err("global checkpoint ack", e), "retrying"),
            },
            Err(e) => tracing::warn!(error = %nats_err("global checkpoint publish", e), "retrying"),
        }
    }
}
