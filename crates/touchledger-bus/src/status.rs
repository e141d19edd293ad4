//! What a ledger looks like from NATS (`touchledger cluster status`): per partition its owner
//! (the lease holder), its feed head, how far its owner is behind the intake, and for the
//! streams and consumers on a cluster the Raft leader and how many replicas are in sync. Read
//! from JetStream alone, so it answers from any machine while the ledger processes run, and
//! names what is missing (a partition without an owner, a stream not yet made) rather than
//! failing.

use async_nats::jetstream::{self, stream::ClusterInfo};
use futures::StreamExt;
use serde::Serialize;

use crate::{BusError, Subjects};

/// A stream's or consumer's Raft group on a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupStatus {
    /// The server that leads it (`None` while there is no leader).
    pub leader: Option<String>,
    /// Its replicas, the leader included.
    pub replicas: usize,
    /// Replicas up to date with the leader (the leader included).
    pub in_sync: usize,
    /// Replicas the group considers offline.
    pub offline: Vec<String>,
}

impl GroupStatus {
    fn of(info: Option<&ClusterInfo>) -> Option<GroupStatus> {
        let c = info?;
        Some(GroupStatus {
            leader: c.leader.clone(),
            replicas: 1 + c.replicas.len(),
            in_sync: usize::from(c.leader.is_some())
                + c.replicas
                    .iter()
                    .filter(|r| r.current && !r.offline)
                    .count(),
            offline: c
                .replicas
                .iter()
                .filter(|r| r.offline)
                .map(|r| r.name.clone())
                .collect(),
        })
    }
}

/// One partition (of an unpartitioned ledger: its only one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: u32,
    /// Its lease holder (`host/pid/start`); `None`: no owner now (or not leased: unpartitioned).
    pub owner: Option<String>,
    /// The last position in its feed stream; `None`: no feed stream yet.
    pub feed_head: Option<u64>,
    /// The feed stream's Raft group.
    pub feed: Option<GroupStatus>,
    /// Touchpoints waiting in the intake for this partition (not yet delivered to its owner).
    pub intake_pending: Option<u64>,
    /// Touchpoints delivered to its owner and not yet acknowledged.
    pub intake_unacked: Option<u64>,
    /// The intake consumer's Raft group.
    pub consumer: Option<GroupStatus>,
    /// What could not be read about this partition (e.g. a stream whose Raft group has no
    /// leader does not answer `info`), as the server said it. Missing things are not problems:
    /// they are `None` above.
    pub problems: Vec<String>,
}

/// The whole ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// The server answering, and its version.
    pub server: String,
    /// The NATS cluster's name (`None`: a single server).
    pub cluster: Option<String>,
    /// The intake stream's Raft group and the touchpoints it holds.
    pub intake: Option<GroupStatus>,
    /// Touchpoints in the intake stream (kept for its max age).
    pub intake_messages: Option<u64>,
    /// `--own auto` processes alive (their member keys).
    pub members: Vec<String>,
    /// Every partition.
    pub partitions: Vec<PartitionStatus>,
    /// What could not be read about the ledger as a whole (the intake stream, the leases).
    pub problems: Vec<String>,
}

/// `Ok(None)` when JetStream says the thing does not exist (`not_found`), the error otherwise.
fn found<T, K>(
    r: Result<T, async_nats::error::Error<K>>,
    not_found: impl Fn(&K) -> bool,
) -> Result<Option<T>, String>
where
    K: Clone + std::fmt::Debug + std::fmt::Display + PartialEq,
{
    match r {
        Ok(t) => Ok(Some(t)),
        Err(e) if not_found(&e.kind()) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

pub(crate) fn stream_missing(k: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(k, jetstream::context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

pub(crate) fn consumer_missing(k: &jetstream::context::ConsumerInfoErrorKind) -> bool {
    use jetstream::context::ConsumerInfoErrorKind as K;
    match k {
        K::NotFound => true,
        K::JetStream(e) => e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND,
        _ => false,
    }
}

/// The status of the ledger under `subjects` (not scoped to a partition) with `partitions`
/// partitions.
pub async fn cluster_status(
    client: &async_nats::Client,
    subjects: &Subjects,
    partitions: u32,
) -> Result<ClusterStatus, BusError> {
    let js = jetstream::new(client.clone());
    let info = client.server_info();
    let mut problems = Vec::new();
    let mut intake = match found(
        js.get_stream(subjects.intake_stream()).await,
        stream_missing,
    ) {
        Ok(s) => s,
        Err(e) => {
            problems.push(format!("intake stream: {e}"));
            None
        }
    };
    let intake_info = match &mut intake {
        Some(s) => match s.info().await {
            Ok(i) => Some(i.clone()),
            Err(e) => {
                problems.push(format!("intake stream info: {e}"));
                None
            }
        },
        None => None,
    };
    let leases = if partitions > 1 {
        match js
            .get_key_value(crate::lease::bucket_name(subjects.prefix()))
            .await
        {
            Ok(kv) => Some(kv),
            Err(e) => {
                problems.push(format!("lease bucket: {e}"));
                None
            }
        }
    } else {
        None
    };
    let mut members = Vec::new();
    if let Some(kv) = &leases {
        match kv.keys().await {
            Ok(mut keys) => {
                while let Some(k) = keys.next().await {
                    match k {
                        Ok(k) if k.starts_with("member-") => match kv.get(&k).await {
                            Ok(Some(v)) => members.push(String::from_utf8_lossy(&v).into_owned()),
                            Ok(None) => {}
                            Err(e) => problems.push(format!("lease {k}: {e}")),
                        },
                        Ok(_) => {}
                        Err(e) => problems.push(format!("lease keys: {e}")),
                    }
                }
            }
            Err(e) => problems.push(format!("lease keys: {e}")),
        }
    }
    members.sort();
    let base = crate::BusConfig::default().consumer;
    let mut out = Vec::new();
    for n in 0..partitions.max(1) {
        let mut problems = Vec::new();
        let scoped = if partitions > 1 {
            subjects.in_partition(n)
        } else {
            subjects.clone()
        };
        let owner = match &leases {
            Some(kv) => match kv.get(crate::lease_key(n)).await {
                Ok(v) => v.map(|v| String::from_utf8_lossy(&v).into_owned()),
                Err(e) => {
                    problems.push(format!("lease: {e}"));
                    None
                }
            },
            None => None,
        };
        let (feed_head, feed) =
            match found(js.get_stream(scoped.feed_stream()).await, stream_missing) {
                Ok(Some(mut s)) => match s.info().await {
                    Ok(i) => (
                        Some(i.state.last_sequence),
                        GroupStatus::of(i.cluster.as_ref()),
                    ),
                    Err(e) => {
                        problems.push(format!("feed stream info: {e}"));
                        (None, None)
                    }
                },
                Ok(None) => (None, None),
                Err(e) => {
                    problems.push(format!("feed stream: {e}"));
                    (None, None)
                }
            };
        let name = crate::intake::consumer_name(&base, partitions, n);
        let (intake_pending, intake_unacked, consumer) = match &intake {
            Some(s) => match found(s.consumer_info(&name).await, consumer_missing) {
                Ok(Some(i)) => (
                    Some(i.num_pending),
                    Some(i.num_ack_pending as u64),
                    GroupStatus::of(i.cluster.as_ref()),
                ),
                Ok(None) => (None, None, None),
                Err(e) => {
                    problems.push(format!("intake consumer {name}: {e}"));
                    (None, None, None)
                }
            },
            None => (None, None, None),
        };
        out.push(PartitionStatus {
            partition: n,
            owner,
            feed_head,
            feed,
            intake_pending,
            intake_unacked,
            consumer,
            problems,
        });
    }
    Ok(ClusterStatus {
        server: format!("{} {}", info.server_name, info.version),
        cluster: info.cluster.clone(),
        intake: intake_info
            .as_ref()
            .and_then(|i| GroupStatus::of(i.cluster.as_ref())),
        intake_messages: intake_info.as_ref().map(|i| i.state.messages),
        members,
        partitions: out,
        problems,
    })
}
