//! Owning partitions over time: per partition, take its lease, catch the store up from the
//! feed, run the partition's ledger while the lease is kept, and go back to standby when it is
//! lost (docs/partitions.md, "Ownership").
//!
//! With `--own auto` a process also balances: every member keeps a `member-…` key alive in
//! the lease bucket, and a process holds at most its share, ⌈P / members⌉, of the partitions.
//! It takes free partitions while below its share and gives one up per round while above it (a
//! clean handover: the lease is released, a member below its share takes it). The sum of the
//! shares is at least P, so every partition has an owner once the members have settled; a
//! member that dies stops renewing its key and its lease, both expire after the TTL, and the
//! survivors' shares grow to cover its partitions.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use touchledger_store::SledStore;

use crate::{Acquire, BusConfig, BusError, Lease, Subjects, js_err};

/// How this process holds partitions.
#[derive(Clone)]
pub struct Ownership {
    /// The process's main connection (the global checkpoints are published on it).
    pub client: async_nats::Client,
    /// The lease bucket ([`crate::lease_bucket`]).
    pub leases: kv::Store,
    /// Its TTL.
    pub ttl: Duration,
    /// This process's name in it ([`owner_name`]).
    pub owner: String,
    /// How often the holder of partition 0 publishes the global checkpoint.
    pub global_every: Duration,
    /// `Some` with `--own auto`: the share this process may hold.
    pub balance: Option<Arc<Balance>>,
    /// `Some`: each owned partition also runs its read models (projectors, current views,
    /// assessor, the partition's queries) under these settings, scoped to the partition and
    /// fenced by its lease.
    pub views: Option<crate::ViewConfig>,
}

/// This process's name in the lease bucket: host, process id and start instant.
pub fn owner_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{host}/{}/{started:x}", std::process::id())
}

/// The partitions a balancing process holds now, and the number of live members.
#[derive(Debug)]
pub struct Balance {
    partitions: u32,
    members: AtomicU32,
    /// Held partitions and the token that stops each one's tenure.
    held: Mutex<BTreeMap<u32, CancellationToken>>,
}

impl Balance {
    /// A balancer for a ledger of `partitions`, counting itself as the only member until
    /// [`run_balancer`] has looked.
    pub fn new(partitions: u32) -> Arc<Self> {
        Arc::new(Balance {
            partitions,
            members: AtomicU32::new(1),
            held: Mutex::new(BTreeMap::new()),
        })
    }

    /// ⌈P / members⌉.
    pub fn share(&self) -> u32 {
        let m = self.members.load(Ordering::Acquire).max(1);
        self.partitions.div_ceil(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, CancellationToken>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn room(&self) -> bool {
        (self.lock().len() as u32) < self.share()
    }
}

fn member_key(owner: &str) -> String {
    let safe: String = owner
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("member-{safe}")
}

/// Keep this process's member key alive, count the members, and give up one partition per
/// round (every quarter TTL) while holding more than the share. Ends at `shutdown`, deleting
/// the member key.
pub async fn run_balancer(own: Ownership, shutdown: CancellationToken) -> Result<(), BusError> {
    let Some(balance) = own.balance.clone() else {
        return Ok(());
    };
    let key = member_key(&own.owner);
    loop {
        if let Err(e) = own.leases.put(&key, own.owner.clone().into()).await {
            tracing::warn!(error = %e, "member key renewal failed; retrying");
        }
        match count_members(&own.leases).await {
            Ok(m) => {
                let before = balance.members.swap(m.max(1), Ordering::AcqRel);
                if before != m {
                    tracing::info!(members = m, share = balance.share(), "members changed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "counting members failed"),
        }
        let over = {
            let held = balance.lock();
            (held.len() as u32 > balance.share())
                .then(|| held.iter().next_back().map(|(n, t)| (*n, t.clone())))
                .flatten()
        };
        if let Some((n, stop)) = over {
            tracing::info!(
                partition = n,
                share = balance.share(),
                "above the share: handing a partition over"
            );
            stop.cancel();
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(own.ttl / 4) => {}
        }
    }
    let _ = own.leases.delete(&key).await;
    Ok(())
}

async fn count_members(leases: &kv::Store) -> Result<u32, BusError> {
    let mut keys = leases
        .keys()
        .await
        .map_err(|e| js_err("lease bucket keys")(&e))?;
    let mut n = 0;
    while let Some(k) = keys.next().await {
        let k = k.map_err(|e| js_err("lease bucket keys")(&e))?;
        n += u32::from(k.starts_with("member-"));
    }
    Ok(n)
}

/// Take the lease of `index`: waiting while another process holds it (and, when balancing,
/// while this process is at its share). `None` at shutdown.
async fn take(
    own: &Ownership,
    index: u32,
    shutdown: &CancellationToken,
) -> Result<Option<Lease>, BusError> {
    let Some(balance) = &own.balance else {
        return Lease::acquire(&own.leases, own.ttl, index, &own.owner, shutdown).await;
    };
    loop {
        if balance.room() {
            match Lease::try_acquire(&own.leases, own.ttl, index, &own.owner).await {
                Ok(Acquire::Acquired(l)) => {
                    tracing::info!(partition = index, owner = own.owner, "lease taken");
                    return Ok(Some(*l));
                }
                Ok(Acquire::Held { .. }) => {}
                Err(e) => {
                    tracing::warn!(partition = index, error = %e, "lease attempt failed; retrying")
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(own.ttl / 4) => {}
        }
    }
}

/// Own partition `cfg.partition` for as long as this process runs: take its lease (waiting while
/// another process holds it), bring the store up to the partition's feed, run the partition's
/// ledger (and, for partition 0, the global checkpoints) while renewing the lease; if the lease
/// is lost (this process was paused past it, or another took it) or handed over by the
/// balancer, stop the partition and wait to own it again. A partition stopped while its lease is
/// held releases it, so that a standby takes over at once. `connect` opens the connection each
/// tenure's ledger runs on (and drains when it stops).
pub async fn own_partition<C, F>(
    connect: C,
    mut store: Arc<SledStore>,
    cfg: BusConfig,
    own: &Ownership,
    shutdown: &CancellationToken,
) -> Result<(), BusError>
where
    C: Fn() -> F,
    F: Future<Output = Result<async_nats::Client, BusError>>,
{
    let index = cfg.partition.index;
    let label = index.to_string();
    loop {
        let Some(mut lease) = take(own, index, shutdown).await? else {
            return Ok(());
        };
        // The balancer hands the partition over by cancelling `handover`; the tenure's own
        // tasks stop on `stop` (also cancelled when the ledger ends by itself).
        let handover = shutdown.child_token();
        let stop = handover.child_token();
        if let Some(b) = &own.balance {
            b.lock().insert(index, handover.clone());
        }
        let fence = lease.fence();
        metrics::gauge!("touchledger_partition_owned", "partition" => label.clone()).set(1.0);
        // Set when the store is refused by the catch-up: its history differs from the feed's.
        let diverged = std::sync::atomic::AtomicBool::new(false);
        let tenure = async {
            // Until the ledger runs, a handover or shutdown simply abandons the preparation.
            let prepare = async {
                let client = connect().await?;
                let js = jetstream::new(client.clone());
                let restored = match crate::catch_up_from_feed(&js, &store, &cfg).await {
                    Err(e @ BusError::FeedMismatch { .. }) => {
                        diverged.store(true, Ordering::Release);
                        return Err(e);
                    }
                    r => r?,
                };
                metrics::counter!("touchledger_partition_restored_records_total", "partition" => label.clone())
                    .increment(restored);
                fence.check("taking the partition")?;
                Ok::<_, BusError>(client)
            };
            let client = tokio::select! {
                c = prepare => c?,
                _ = stop.cancelled() => return Ok(()),
            };
            // Acknowledged only once in the feed: the next owner starts from the feed.
            let feed = crate::FeedProgress::tracked();
            let ledger_cfg = BusConfig {
                fence: fence.clone(),
                feed: feed.clone(),
                ..cfg.clone()
            };
            // The holder of partition 0's lease publishes the global checkpoints, on the main
            // connection (the ledger drains its own when it stops).
            let global = async {
                if index != 0 {
                    return Ok(());
                }
                let r = crate::run_global_checkpoints(
                    jetstream::new(own.client.clone()),
                    Subjects::new(cfg.subjects.prefix().to_owned()),
                    (cfg.partition.count, cfg.replicas),
                    own.global_every,
                    stop.clone(),
                )
                .await;
                if r.is_err() {
                    stop.cancel();
                }
                r
            };
            // The partition's read models, on its own store and subjects, for as long as the
            // partition is owned here.
            // The feed publishes the store's last records once the ledger's writers and the
            // views (whose assessors append) have stopped.
            let views_done = CancellationToken::new();
            let views = async {
                let _done = views_done.clone().drop_guard();
                let Some(v) = &own.views else {
                    return Ok(());
                };
                let view_cfg = crate::ViewConfig {
                    subjects: cfg.subjects.in_partition(index),
                    fence: fence.clone(),
                    fits: false,
                    feed: feed.clone(),
                    refit_every: None,
                    current: None,
                    month_ends: None,
                    ..v.clone()
                };
                let r =
                    crate::run_views(client.clone(), store.clone(), view_cfg, stop.clone()).await;
                stop.cancel();
                r
            };
            let ledger = async {
                let r = crate::run_ledger_until(
                    client.clone(),
                    store.clone(),
                    ledger_cfg,
                    stop.clone(),
                    Some(views_done.clone()),
                )
                .await;
                stop.cancel();
                r
            };
            let (r, g, v) = tokio::join!(ledger, global, views);
            r.and(g).and(v)
        };
        let (r, held) = tokio::join!(
            async {
                let r = tenure.await;
                stop.cancel();
                r
            },
            lease.keep(&stop)
        );
        if let Some(b) = &own.balance {
            b.lock().remove(&index);
        }
        let handed_over = handover.is_cancelled() && !shutdown.is_cancelled();
        metrics::gauge!("touchledger_partition_owned", "partition" => label.clone()).set(0.0);
        if held {
            // Stopped while still the owner (shutdown, a handover, or the ledger failed): give
            // the lease up so that another process takes over at once.
            lease.release().await;
            match r {
                Err(BusError::FeedMismatch { detail, .. })
                    if diverged.load(Ordering::Acquire) && !shutdown.is_cancelled() =>
                {
                    store = set_aside_diverged(own, store, &cfg, &detail).await?;
                    continue;
                }
                Ok(()) if handed_over => {
                    tracing::info!(partition = index, "partition handed over");
                    continue;
                }
                // NATS trouble (a node or the connection lost while taking the partition, say):
                // another process may take it; this one tries again after a pause.
                Err(e @ (BusError::Nats { .. } | BusError::JetStream { .. }))
                    if !shutdown.is_cancelled() =>
                {
                    tracing::warn!(partition = index, error = %e, "partition stopped by NATS trouble; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(own.ttl) => {}
                    }
                    continue;
                }
                r => return r,
            }
        }
        if shutdown.is_cancelled() {
            return match r {
                Err(BusError::Fenced(_)) | Ok(()) => Ok(()),
                Err(e) => Err(e),
            };
        }
        // Whatever the partition's tasks reported (a refused feed publish, say) followed from
        // no longer being the owner: not a failure of this process.
        metrics::counter!("touchledger_partition_leases_lost_total", "partition" => label.clone())
            .increment(1);
        tracing::warn!(
            partition = index,
            stopped_with = r.err().map(|e| e.to_string()),
            "lease lost: the partition stopped here; waiting to own it again"
        );
    }
}

/// A partition's store that the catch-up refused (its history differs from the feed's): move it
/// aside (`p<n>.diverged-<nanos>`, kept whole for an auditor) and open an empty store in its
/// place, which the next tenure rebuilds from the feed. Safe because in a leased partition
/// nothing is acknowledged before it is in the feed: the records only the store has were never
/// acknowledged, and their touchpoints are redelivered from the intake. Refused (the error is
/// returned, the process stops, the store stays) when the feed ends before the head the newest
/// global checkpoint certified for the partition: then the feed, not the store, lost history.
async fn set_aside_diverged(
    own: &Ownership,
    store: Arc<SledStore>,
    cfg: &BusConfig,
    detail: &str,
) -> Result<Arc<SledStore>, BusError> {
    let index = cfg.partition.index;
    let stream = cfg.clone().scoped().subjects.feed_stream();
    let js = jetstream::new(own.client.clone());
    let certified =
        crate::certified_head(&js, &Subjects::new(cfg.subjects.prefix().to_owned()), index).await?;
    let mut feed = js
        .get_stream(&stream)
        .await
        .map_err(|e| js_err("feed stream")(&e))?;
    let feed_last = crate::feed::last_message(&mut feed)
        .await?
        .map_or(0, |h| h.sequence);
    if let Some((position, _)) = certified
        && feed_last < position
    {
        return Err(BusError::FeedMismatch {
            stream,
            detail: format!(
                "{detail}; the feed ends at {feed_last}, before position {position} that the last \
                 global checkpoint certified: the feed lost acknowledged history, the store is kept"
            ),
        });
    }
    let config = store.config().clone();
    drop(store);
    let (moved, reopened) = tokio::task::spawn_blocking(move || {
        let moved = touchledger_store::set_aside(&config.path).map_err(|e| {
            BusError::Store(touchledger_store::StoreError::Prepare {
                path: config.path.clone(),
                source: e,
            })
        })?;
        Ok::<_, BusError>((moved, SledStore::open(config)?))
    })
    .await
    .map_err(|e| crate::nats_err("set-aside task", e))??;
    metrics::counter!("touchledger_partition_set_aside_total", "partition" => index.to_string())
        .increment(1);
    tracing::error!(
        partition = index,
        moved_to = %moved.display(),
        why = detail,
        "the partition's store diverged from its feed (records that never reached the feed were never acknowledged): set aside, rebuilding the partition from the feed"
    );
    Ok(Arc::new(reopened))
}

/// Scheduled model refits of a partitioned ledger: every `every`, the process that holds
/// partition 0's lease fits the churn model on every partition's buyers (through `router`) and
/// records it in every partition's log. One process refits, whichever it is; a refit that fails
/// (a partition without an owner, say) is logged and made again at the next tick.
pub async fn run_scheduled_refits(
    router: crate::Router,
    own: Ownership,
    every: Duration,
    unit: touchledger_domain::TimeUnit,
    clock: Arc<dyn Fn() -> touchledger_domain::Timestamp + Send + Sync>,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let holder = own
            .leases
            .get(crate::lease_key(0))
            .await
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        if holder.as_deref() != Some(own.owner.as_str()) {
            continue;
        }
        let now = clock();
        let refit =
            async {
                let (m, event) = router
                    .fit(now, unit, router.rules.churn.count_model)
                    .await
                    .map_err(|e| e.to_string())?;
                router.record(&event).await.map(|_| m).map_err(|e| {
                    format!("{e} (not recorded everywhere; made again at the next tick)")
                })
            };
        // A refit waits on every partition: shutdown does not wait for it.
        let done = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = refit => r,
        };
        match done {
            Ok(m) => tracing::info!(
                version = %m.model_version,
                customers = m.customers,
                "churn model refitted on every partition's buyers"
            ),
            Err(e) => tracing::warn!(error = %e, "scheduled refit skipped"),
        }
    }
}
