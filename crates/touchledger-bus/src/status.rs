//! What a ledger looks like from NATS (`touchledger cluster status`): per partition its owner
//! (the lease holder), its feed head, how far its owner is behind the intake, and for the
//! streams and consumers on a cluster the Raft leader and how many replicas are in sync. Read
//! from JetStream alone, so it answers from any machine while the ledger processes run, and
//! names what is missing (a partition without an owner, a stream not yet made) rather than
//! failing.

use async_nats::jetstream::{self, consumer::pull, stream::ClusterInfo};
use futures::StreamExt;
use serde::Serialize;

use crate::{BusError, Subjects, js_err};

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
    let mut intake = js.get_stream(subjects.intake_stream()).await.ok();
    let intake_info = match &mut intake {
        Some(s) => Some(
            s.info()
                .await
                .map_err(|e| js_err("intake stream info")(&e))?
                .clone(),
        ),
        None => None,
    };
    let leases = js
        .get_key_value(crate::lease::bucket_name(subjects.prefix()))
        .await
        .ok();
    let mut members = Vec::new();
    if let Some(kv) = &leases
        && let Ok(mut keys) = kv.keys().await
    {
        while let Some(Ok(k)) = keys.next().await {
            if k.starts_with("member-")
                && let Ok(Some(v)) = kv.get(&k).await
            {
                members.push(String::from_utf8_lossy(&v).into_owned());
            }
        }
    }
    members.sort();
    let mut out = Vec::new();
    for n in 0..partitions.max(1) {
        let scoped = if partitions > 1 {
            subjects.in_partition(n)
        } else {
            subjects.clone()
        };
        let owner = match &leases {
            Some(kv) if partitions > 1 => kv
                .get(crate::lease_key(n))
                .await
                .ok()
                .flatten()
                .map(|v| String::from_utf8_lossy(&v).into_owned()),
            _ => None,
        };
        let (feed_head, feed) = match js.get_stream(scoped.feed_stream()).await {
            Ok(mut s) => {
                let i = s.info().await.map_err(|e| js_err("feed stream info")(&e))?;
                (
                    Some(i.state.last_sequence),
                    GroupStatus::of(i.cluster.as_ref()),
                )
            }
            Err(_) => (None, None),
        };
        let name = if partitions > 1 {
            format!("touchledger-ledger-p{n}")
        } else {
            "touchledger-ledger".to_owned()
        };
        let (intake_pending, intake_unacked, consumer) = match &intake {
            Some(s) => match s.get_consumer::<pull::Config>(&name).await {
                Ok(mut c) => {
                    let i = c
                        .info()
                        .await
                        .map_err(|e| js_err("intake consumer info")(&e))?;
                    (
                        Some(i.num_pending),
                        Some(i.num_ack_pending as u64),
                        GroupStatus::of(i.cluster.as_ref()),
                    )
                }
                Err(_) => (None, None, None),
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
    })
}
