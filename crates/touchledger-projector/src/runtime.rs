//! The in-process run loop: wait for the ledger's head to move, fold the new events into every
//! projector, report which customers changed.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use touchledger_domain::Payload;
use touchledger_store::{Committed, EventStore};

use crate::{Projector, ProjectorError};

/// Run-loop settings.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Events folded per batch (one atomic commit per projection per batch). Default 1000.
    pub batch: u64,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig { batch: 1000 }
    }
}

/// Customers whose state changed in one batch of one projection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The projection's name.
    pub projection: &'static str,
    /// The projection's checkpoint after the batch.
    pub checkpoint: u64,
    /// Customers whose state changed.
    pub customers: Vec<String>,
    /// Those of `customers` whose only events in the batch were audit records of the ledger's
    /// own (`ChurnRiskAssessed`, `ModelEvaluated`): no view and no population figure depends on
    /// them, so there is nothing to re-evaluate or republish for these customers (and an
    /// evaluation of the model does not make every customer due, as a new fit does).
    pub assessed_only: BTreeSet<String>,
}

impl Change {
    /// The change of `projector` after folding `events`, which changed `customers`.
    pub fn after(projector: &Projector, customers: Vec<String>, events: &[Committed]) -> Change {
        let mut others = HashSet::new();
        let mut assessed = HashSet::new();
        for c in events {
            let e = &c.event;
            if matches!(
                e.payload,
                Payload::ChurnRiskAssessed(_) | Payload::ModelEvaluated(_)
            ) {
                assessed.insert(e.customer_id.as_str());
            } else {
                others.insert(e.customer_id.as_str());
            }
        }
        let assessed_only = customers
            .iter()
            .filter(|c| assessed.contains(c.as_str()) && !others.contains(c.as_str()))
            .cloned()
            .collect();
        Change {
            projection: projector.spec().name,
            checkpoint: projector.checkpoint(),
            customers,
            assessed_only,
        }
    }
}

/// Fold the ledger into `projectors` until `shutdown`: catch up from their checkpoints, then
/// follow the head (woken by the store's commit notifications, no polling). Each batch's
/// changes (one per projection, with its new checkpoint, possibly no customers) are sent on
/// `changes` (if given; a full channel applies back-pressure).
pub async fn run_in_process<S: EventStore + 'static>(
    store: Arc<S>,
    mut projectors: Vec<Projector>,
    cfg: RunConfig,
    changes: Option<mpsc::Sender<Change>>,
    shutdown: CancellationToken,
) -> Result<(), ProjectorError> {
    let mut head_rx = store.subscribe();
    for p in &projectors {
        tracing::info!(
            projection = p.spec().name,
            checkpoint = p.checkpoint(),
            "projector started"
        );
    }
    loop {
        let head = head_rx.borrow_and_update().position;
        let from = projectors
            .iter()
            .map(|p| p.checkpoint())
            .min()
            .unwrap_or(head)
            + 1;
        if from > head {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = head_rx.changed() => if r.is_err() { break },
            }
            continue;
        }
        if shutdown.is_cancelled() {
            break;
        }
        let to = head.min(from + cfg.batch.max(1) - 1);
        let st = store.clone();
        let (back, result) = tokio::task::spawn_blocking(move || {
            let r = (|| {
                let events = crate::read_range(st.as_ref(), from, to)?;
                let mut out = Vec::new();
                for p in projectors.iter_mut() {
                    let customers = p.apply(&events)?;
                    out.push(Change::after(p, customers, &events));
                }
                Ok::<_, ProjectorError>(out)
            })();
            (projectors, r)
        })
        .await
        .map_err(|e| ProjectorError::Task(e.to_string()))?;
        projectors = back;
        let batch_changes = match result {
            Ok(c) => c,
            Err(e) => {
                // The state is consistent with its checkpoint; report and stop (the caller
                // decides whether to restart).
                tracing::error!(error = %e, "projector batch failed");
                return Err(e);
            }
        };
        if let Some(tx) = &changes {
            // Empty changes too: they carry the new checkpoint (projection lag metrics). A full
            // channel whose reader has stopped reading must not hold the projector past a
            // shutdown: the batch is folded and checkpointed, only its report is not sent.
            for c in batch_changes {
                tokio::select! {
                    r = tx.send(c) => if r.is_err() { break },
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    for p in &projectors {
        p.tree().flush()?;
        tracing::info!(
            projection = p.spec().name,
            checkpoint = p.checkpoint(),
            "projector stopped"
        );
    }
    Ok(())
}
