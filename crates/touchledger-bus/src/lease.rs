//! Partition ownership: a lease per partition in a NATS KV bucket, taken with compare-and-set
//! and kept alive by renewing it before its TTL runs out (docs/partitions.md, "Ownership").
//!
//! Key decisions:
//! * The bucket's `max_age` is the lease TTL. Taking a lease is `create` (it succeeds only if the
//!   key is absent, deleted or expired); renewing is `update` with the revision this owner last
//!   wrote, so a renewal after another process took the key fails with a wrong last revision.
//!   The server enforces both; the ledger adds no protocol of its own.
//! * The owner's own view of its lease is a [`Fence`]: valid until the instant the last
//!   successful renewal was *sent* plus three quarters of the TTL, by the owner's monotonic
//!   clock. The server cannot let anyone else take the key before the renewal's message is a
//!   full TTL old, so a quarter of the TTL is the margin for clock-rate differences and for the
//!   time between a check and the act it guards. Intake checks the fence before it appends a
//!   batch and again before it acknowledges it; the synchronous append before appending and
//!   before replying. A process that was paused (SIGSTOP, a long GC-like stall, a VM freeze)
//!   wakes with its fence expired and does nothing more for the partition.
//! * What a lease cannot fence is a process paused *between* the check and the act for longer
//!   than the margin. The committed-event feed closes that gap for the partition's history:
//!   every feed publish carries `Nats-Expected-Last-Sequence`, so a stale owner cannot add to
//!   the feed once the new owner has, and a store that has records the feed does not is
//!   refused when it wants the partition again ([`crate::catch_up_from_feed`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tokio_util::sync::CancellationToken;

use crate::{BusError, js_err};

/// Whether this process may still act for a partition. Cheap to clone and to check. The
/// default fence always holds (an unpartitioned ledger has no lease).
#[derive(Clone, Debug, Default)]
pub struct Fence(Option<Arc<FenceState>>);

/// The clock leases are measured on: `CLOCK_BOOTTIME`, which (unlike the monotonic clock
/// behind `Instant`) keeps counting while the machine is suspended, so a process that wakes
/// from a suspend finds its lease run out as the server does.
pub(crate) fn lease_clock() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

#[derive(Debug)]
struct FenceState {
    /// Valid until this instant of [`lease_clock`], in nanoseconds.
    valid_nanos: AtomicU64,
    /// Set once the lease is known lost (another owner wrote the key).
    lost: AtomicBool,
}

impl Fence {
    fn leased(valid_until: Duration) -> Self {
        let f = Fence(Some(Arc::new(FenceState {
            valid_nanos: AtomicU64::new(0),
            lost: AtomicBool::new(false),
        })));
        f.extend(valid_until);
        f
    }

    /// True while the lease is held: not lost, and its local validity has not run out.
    pub fn holds(&self) -> bool {
        match &self.0 {
            None => true,
            Some(s) => {
                !s.lost.load(Ordering::Acquire)
                    && (lease_clock().as_nanos() as u64) < s.valid_nanos.load(Ordering::Acquire)
            }
        }
    }

    /// `Err(BusError::Fenced)` unless the lease is held.
    pub fn check(&self, what: &'static str) -> Result<(), BusError> {
        if self.holds() {
            Ok(())
        } else {
            Err(BusError::Fenced(what))
        }
    }

    fn extend(&self, until: Duration) {
        if let Some(s) = &self.0 {
            s.valid_nanos
                .fetch_max(until.as_nanos() as u64, Ordering::AcqRel);
        }
    }

    fn lose(&self) {
        if let Some(s) = &self.0 {
            s.lost.store(true, Ordering::Release);
        }
    }
}

/// The lease bucket's name: `<PREFIX>_LEASES`.
pub(crate) fn bucket_name(prefix: &str) -> String {
    format!(
        "{}_LEASES",
        prefix.to_uppercase().replace(['.', '*', '>'], "_")
    )
}

/// The lease bucket of a ledger (`<PREFIX>_LEASES`), created with `ttl` as its `max_age` (and
/// `replicas` copies on a cluster) if it does not exist. An existing bucket keeps its own TTL (every process must use the same one);
/// it is returned with the bucket, and a differing `ttl` is logged.
pub async fn lease_bucket(
    js: &jetstream::Context,
    prefix: &str,
    ttl: Duration,
    replicas: usize,
) -> Result<(kv::Store, Duration), BusError> {
    let bucket = bucket_name(prefix);
    let store = match js.get_key_value(&bucket).await {
        Ok(s) => s,
        Err(_) => match js
            .create_key_value(kv::Config {
                bucket: bucket.clone(),
                description: "touchledger partition leases (key partition-N, TTL = max_age)".into(),
                history: 1,
                max_age: ttl,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
        {
            Ok(s) => s,
            // Another process created it meanwhile (perhaps with another TTL): use that one.
            Err(create) => js
                .get_key_value(&bucket)
                .await
                .map_err(|_| js_err("lease bucket create")(&create))?,
        },
    };
    let actual = store
        .status()
        .await
        .map_err(|e| js_err("lease bucket status")(&e))?
        .max_age();
    if actual != ttl {
        tracing::warn!(bucket, requested = ?ttl, actual = ?actual, "the lease bucket exists with another TTL; using its TTL");
    }
    Ok((store, actual))
}

/// A lease this process holds on one partition.
#[derive(Debug)]
pub struct Lease {
    kv: kv::Store,
    key: String,
    value: bytes::Bytes,
    revision: u64,
    ttl: Duration,
    fence: Fence,
    /// When a renewal whose answer never came was sent: it may have landed.
    unconfirmed: Option<Duration>,
}

/// What an attempt to take a lease found.
#[derive(Debug)]
pub enum Acquire {
    /// This process holds it now.
    Acquired(Box<Lease>),
    /// Another process holds it; its recorded owner.
    Held {
        /// The holder's value (`host/pid/nuid`).
        holder: String,
    },
}

/// The key of a partition's lease.
pub fn lease_key(partition: u32) -> String {
    format!("partition-{partition}")
}

impl Lease {
    /// Try once to take the lease of `partition` for `owner`.
    pub async fn try_acquire(
        kv: &kv::Store,
        ttl: Duration,
        partition: u32,
        owner: &str,
    ) -> Result<Acquire, BusError> {
        let key = lease_key(partition);
        let value = bytes::Bytes::from(owner.to_owned());
        let sent = lease_clock();
        match kv.create(&key, value.clone()).await {
            Ok(revision) => Ok(Acquire::Acquired(Box::new(Lease {
                kv: kv.clone(),
                key,
                value,
                revision,
                ttl,
                fence: Fence::leased(sent + ttl * 3 / 4),
                unconfirmed: None,
            }))),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let holder = kv
                    .get(&key)
                    .await
                    .ok()
                    .flatten()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|| "(just released)".into());
                Ok(Acquire::Held { holder })
            }
            Err(e) => Err(js_err("lease create")(&e)),
        }
    }

    /// Take the lease of `partition`, waiting while another process holds it (checking every
    /// quarter TTL). `None` if `shutdown` came first.
    pub async fn acquire(
        kv: &kv::Store,
        ttl: Duration,
        partition: u32,
        owner: &str,
        shutdown: &CancellationToken,
    ) -> Result<Option<Lease>, BusError> {
        let mut said = None;
        loop {
            match Lease::try_acquire(kv, ttl, partition, owner).await {
                Ok(Acquire::Acquired(l)) => {
                    tracing::info!(partition, owner, revision = l.revision, "lease taken");
                    return Ok(Some(*l));
                }
                Ok(Acquire::Held { holder }) => {
                    if said.as_deref() != Some(holder.as_str()) {
                        tracing::info!(
                            partition,
                            holder,
                            "partition owned by another process; waiting for its lease"
                        );
                        said = Some(holder);
                    }
                }
                Err(e) => tracing::warn!(partition, error = %e, "lease attempt failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(ttl / 4) => {}
            }
        }
    }

    /// The fence guarding this lease's partition.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// The revision this owner wrote last (the fencing token).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Renew once: `Ok` with the validity extended, or `Err(BusError::Fenced)` if another
    /// process wrote the key (the fence is then lost for good). Other failures (connection
    /// trouble) are returned as they are; the fence runs out by itself if they persist.
    pub async fn renew(&mut self) -> Result<(), BusError> {
        let sent = lease_clock();
        match self
            .kv
            .update(&self.key, self.value.clone(), self.revision)
            .await
        {
            Ok(r) => {
                self.revision = r;
                self.unconfirmed = None;
                self.fence.extend(sent + self.ttl * 3 / 4);
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // An earlier renewal whose answer was lost may have landed: then the key holds
                // this owner's value at a newer revision, written no earlier than that renewal
                // was sent. Anything else is another owner.
                if let Some(earlier) = self.unconfirmed.take()
                    && let Ok(Some(entry)) = self.kv.entry(&self.key).await
                    && entry.operation == kv::Operation::Put
                    && entry.value == self.value
                {
                    self.revision = entry.revision;
                    self.fence.extend(earlier + self.ttl * 3 / 4);
                    return Ok(());
                }
                self.fence.lose();
                Err(BusError::Fenced("lease renewal"))
            }
            Err(e) => {
                self.unconfirmed.get_or_insert(sent);
                Err(js_err("lease renew")(&e))
            }
        }
    }

    /// Renew every quarter TTL until `stop` is cancelled or the lease is lost; when lost (or run
    /// out locally), cancel `stop` so that the partition's tasks end. Returns whether the lease
    /// is still held.
    pub async fn keep(&mut self, stop: &CancellationToken) -> bool {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return self.fence.holds(),
                _ = tokio::time::sleep(self.ttl / 4) => {}
            }
            if !self.fence.holds() {
                // Paused past the validity (or renewals kept failing): whatever the server
                // says now, this process has stopped being the owner.
                self.fence.lose();
                tracing::error!(key = %self.key, "lease ran out before it was renewed; stopping the partition");
                stop.cancel();
                return false;
            }
            match self.renew().await {
                Ok(()) => {}
                Err(BusError::Fenced(_)) => {
                    tracing::error!(key = %self.key, "lease taken by another process; stopping the partition");
                    stop.cancel();
                    return false;
                }
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "lease renewal failed; retrying")
                }
            }
        }
    }

    /// Give the lease up (a clean shutdown), so that another process may take the partition
    /// at once instead of after the TTL. Only this owner's revision is deleted.
    pub async fn release(self) {
        self.fence.lose();
        if let Err(e) = self
            .kv
            .delete_expect_revision(&self.key, Some(self.revision))
            .await
        {
            tracing::warn!(key = %self.key, error = %e, "lease release failed; it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_holds_until_its_validity_runs_out_or_it_is_lost() {
        assert!(Fence::default().holds(), "no lease: always holds");
        let now = lease_clock();
        assert!(!Fence::leased(now).holds(), "valid until now: already out");
        let f = Fence::leased(now + Duration::from_secs(3600));
        assert!(f.holds());
        assert!(f.check("x").is_ok());
        // A renewal never shortens the validity.
        f.extend(now);
        assert!(f.holds());
        let copy = f.clone();
        f.lose();
        assert!(!copy.holds(), "every clone sees the loss");
        assert!(matches!(
            copy.check("append"),
            Err(BusError::Fenced("append"))
        ));
        // Extending a lost fence does not revive it.
        copy.extend(now + Duration::from_secs(7200));
        assert!(!copy.holds());
    }
}
