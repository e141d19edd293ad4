//! Spreading the Raft leaders of a partitioned ledger over the nodes of a JetStream cluster.
//!
//! Each replicated stream and consumer is its own Raft group, and its leader does the group's
//! writes (a stream's leader stores and replicates every message; a consumer's leader tracks
//! deliveries and acks). JetStream elects them where it happens to, and in a fresh cluster
//! one node often ends up leading most of a ledger's feeds (4/3/1 or 5/3/0 of eight in the
//! tests), so it does most of the ledger's writing.
//!
//! The rule is a documented function of the partition index, so an operator can predict it:
//! the group's peers sorted by server name, and partition `n` preferring peer `n mod peers`.
//! When a partition's feed stream or intake consumer is *created*, and its leader is not that
//! peer, the leader is asked to step down in the preferred peer's favour
//! (`$JS.API.STREAM.LEADER.STEPDOWN` / `$JS.API.CONSUMER.LEADER.STEPDOWN` with a placement,
//! nats-server 2.11 or newer).
//!
//! Only at creation, not at every start of a partition or after a node comes back: a leader
//! change interrupts the group's writes for an election, and during a failover that cost lands
//! on a partition being taken over (leases lost mid-append, seen when this ran at every start).
//! After a node loss, JetStream moves the lost leaders to the survivors and nothing moves
//! them back; `touchledger cluster status` shows where they are. A failed or refused
//! stepdown is logged and costs nothing else: the group keeps its leader.

use std::time::Duration;

use async_nats::jetstream::{self, stream::ClusterInfo};
use serde::{Deserialize, Serialize};

use crate::{BusError, parse_server_version};

/// The first nats-server whose leader stepdown takes a preferred peer.
const PREFERRED_STEPDOWN_VERSION: (u32, u32, u32) = (2, 11, 0);

/// How long a new group may take to elect its first leader, and then the preferred peer,
/// before spreading gives up on it.
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// A Raft group of the ledger whose leader can be placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Group {
    /// A stream, by name.
    Stream(String),
    /// A consumer of a stream: (stream, durable consumer name).
    Consumer(String, String),
}

impl Group {
    fn stepdown_subject(&self) -> String {
        match self {
            Group::Stream(s) => format!("STREAM.LEADER.STEPDOWN.{s}"),
            Group::Consumer(s, c) => format!("CONSUMER.LEADER.STEPDOWN.{s}.{c}"),
        }
    }

    async fn cluster(&self, js: &jetstream::Context) -> Result<Option<ClusterInfo>, BusError> {
        let detail = |e: &dyn std::fmt::Display| BusError::JetStream {
            what: "leader placement: info",
            detail: e.to_string(),
        };
        match self {
            Group::Stream(s) => {
                let mut stream = js.get_stream(s).await.map_err(|e| detail(&e))?;
                Ok(stream.info().await.map_err(|e| detail(&e))?.cluster.clone())
            }
            Group::Consumer(s, c) => {
                let stream = js.get_stream(s).await.map_err(|e| detail(&e))?;
                let info = stream.consumer_info(c).await.map_err(|e| detail(&e))?;
                Ok(info.cluster.clone())
            }
        }
    }
}

/// The peer partition `index` prefers among a group's peers: sorted by server name, the
/// `index mod peers`-th. `None` for a group without replicas.
pub fn preferred_peer(peers: &[String], index: u32) -> Option<String> {
    let mut sorted: Vec<&String> = peers.iter().collect();
    sorted.sort();
    sorted.dedup();
    if sorted.len() < 2 {
        return None;
    }
    Some(sorted[index as usize % sorted.len()].clone())
}

/// What [`place_leader`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Not a replicated group, or a server too old to take a preferred peer.
    NotApplicable,
    /// The leader already was the preferred peer.
    AlreadyThere(String),
    /// The leader (first) was asked to step down for the preferred peer (second).
    Moved(String, String),
}

#[derive(Serialize)]
struct StepdownRequest<'a> {
    placement: PreferredPlacement<'a>,
}

#[derive(Serialize)]
struct PreferredPlacement<'a> {
    preferred: &'a str,
}

#[derive(Deserialize)]
struct StepdownReply {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    description: String,
}

/// Ask `group`'s leader to step down for the peer partition `index` prefers
/// ([`preferred_peer`]), once the group has elected a first leader, and wait until the
/// preferred peer leads it. Each wait (the first election, the move) lasts up to 10 s; does
/// nothing on an unreplicated group or a server older than 2.11.
pub async fn place_leader(
    js: &jetstream::Context,
    group: &Group,
    index: u32,
) -> Result<Placement, BusError> {
    if parse_server_version(&js.client().server_info().version) < PREFERRED_STEPDOWN_VERSION {
        return Ok(Placement::NotApplicable);
    }
    let Some((leader, peers)) = wait_for_leader(js, group, |_| true).await? else {
        return Ok(Placement::NotApplicable);
    };
    let Some(preferred) = preferred_peer(&peers, index) else {
        return Ok(Placement::NotApplicable);
    };
    if preferred == leader {
        return Ok(Placement::AlreadyThere(leader));
    }
    let reply: StepdownReply = js
        .request(
            group.stepdown_subject(),
            &StepdownRequest {
                placement: PreferredPlacement {
                    preferred: &preferred,
                },
            },
        )
        .await
        .map_err(|e| BusError::JetStream {
            what: "leader stepdown",
            detail: e.to_string(),
        })?;
    match reply.error {
        Some(e) => {
            return Err(BusError::JetStream {
                what: "leader stepdown",
                detail: format!("{group:?} to {preferred}: {} ({})", e.description, e.code),
            });
        }
        None if !reply.success => {
            return Err(BusError::JetStream {
                what: "leader stepdown",
                detail: format!("{group:?} to {preferred}: not done"),
            });
        }
        None => {}
    }
    // The stepdown's reply comes before the election: the move is done when the preferred
    // peer leads.
    match wait_for_leader(js, group, |l| l == preferred).await? {
        Some(_) => Ok(Placement::Moved(leader, preferred)),
        None => Ok(Placement::NotApplicable),
    }
}

/// Wait (up to 10 s) until `group` has a leader that `wanted` accepts; the leader and every
/// peer. `None`: the group is not replicated. Errors of the info requests (a leader being
/// elected answers none) are retried until the deadline.
async fn wait_for_leader(
    js: &jetstream::Context,
    group: &Group,
    wanted: impl Fn(&str) -> bool,
) -> Result<Option<(String, Vec<String>)>, BusError> {
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        let last = match group.cluster(js).await {
            Ok(None) => return Ok(None),
            Ok(Some(cluster)) => {
                let mut peers: Vec<String> =
                    cluster.replicas.iter().map(|p| p.name.clone()).collect();
                match cluster.leader {
                    Some(leader) if wanted(&leader) => {
                        peers.push(leader.clone());
                        return Ok(Some((leader, peers)));
                    }
                    Some(leader) => format!("led by {leader}"),
                    None => "no leader".to_owned(),
                }
            }
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(BusError::JetStream {
                what: "leader placement",
                detail: format!("{group:?}: not led as wanted within {LEADER_WAIT:?} ({last})"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`place_leader`], whose outcome is logged rather than returned: a group whose leader could
/// not be placed keeps the leader it has, which is correct, only less spread.
pub async fn spread_leader(js: &jetstream::Context, group: &Group, index: u32) {
    match place_leader(js, group, index).await {
        Ok(Placement::Moved(from, to)) => {
            tracing::info!(?group, %from, %to, "raft leader moved to the partition's preferred peer")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(?group, error = %e, "raft leader not placed; it stays where it is")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_take_the_sorted_peers_in_turn() {
        let peers: Vec<String> = ["n3", "n1", "n2"].map(String::from).to_vec();
        let chosen: Vec<String> = (0..8)
            .map(|i| preferred_peer(&peers, i).expect("replicated"))
            .collect();
        assert_eq!(chosen, ["n1", "n2", "n3", "n1", "n2", "n3", "n1", "n2"]);
    }

    #[test]
    fn an_unreplicated_group_has_no_preference() {
        assert_eq!(preferred_peer(&["n1".to_owned()], 3), None);
        assert_eq!(preferred_peer(&["n1".to_owned(), "n1".to_owned()], 3), None);
        assert_eq!(preferred_peer(&[], 0), None);
    }
}
