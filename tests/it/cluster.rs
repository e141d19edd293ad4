//! A partitioned ledger on a 3-node JetStream cluster (loopback): replicated streams and lease
//! bucket (R3), a NATS node killed and restarted under load, a ledger process killed and its
//! partitions taken over by the other.

use std::time::Duration;

use async_nats::jetstream;
use touchledger_proto::encode_event;
use touchledger_testkit::NatsCluster;

use crate::partition::{
    Pair, held_by, per_partition, signal, spawn_partition_serve_with, wait_leases,
};
use crate::support::purchase;

/// Publish `n` purchases `{tag}-{i}` of 120 customers, each until JetStream acknowledges it
/// (re-sent with the same message id after a failure: a node may be down meanwhile).
async fn publish_acked(js: &jetstream::Context, tag: &str, n: u32) -> Vec<(String, String)> {
    let mut sent = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut pending: Vec<u32> = chunk.to_vec();
        let mut attempts = 0;
        while !pending.is_empty() {
            attempts += 1;
            assert!(
                attempts <= 60,
                "{tag}: publishes not acknowledged after 60 attempts"
            );
            let mut acks = Vec::new();
            for &i in &pending {
                let id = format!("{tag}-{i}");
                let customer = crate::partition::customer_id(i * 7 % 120);
                let msg = jetstream::message::PublishMessage::build()
                    .payload(encode_event(&purchase(&id, &customer, 100)).into())
                    .message_id(id.clone());
                let ack = js
                    .send_publish(format!("crm.touchpoint.purchase.{customer}"), msg)
                    .await;
                acks.push((i, id, customer, ack));
            }
            let mut failed = Vec::new();
            for (i, id, customer, ack) in acks {
                match ack {
                    Ok(a) => match a.await {
                        Ok(_) => sent.push((id, customer)),
                        Err(_) => failed.push(i),
                    },
                    Err(_) => failed.push(i),
                }
            }
            if !failed.is_empty() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            pending = failed;
        }
    }
    sent
}

/// Until every partition's feed holds `want[n]` records and its intake consumer has nothing
/// pending; on timeout the failure shows where each partition stands and the logs.
async fn drained(
    js: &jetstream::Context,
    want: &[u64],
    timeout: Duration,
    logs: &dyn Fn() -> String,
) {
    use async_nats::jetstream::consumer;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut state = Vec::new();
        for (n, &w) in want.iter().enumerate() {
            let last = match js.get_stream(format!("CRM_LEDGER_EVENTS_P{n}")).await {
                Ok(mut f) => f.info().await.map(|i| i.state.last_sequence).ok(),
                Err(_) => None,
            };
            let pending = match js.get_stream("CRM_TOUCHPOINTS").await {
                Ok(s) => match s
                    .get_consumer::<consumer::pull::Config>(&format!("touchledger-ledger-p{n}"))
                    .await
                {
                    Ok(mut c) => c
                        .info()
                        .await
                        .map(|i| (i.num_pending, i.num_ack_pending))
                        .ok(),
                    Err(_) => None,
                },
                Err(_) => None,
            };
            state.push((w, last, pending));
        }
        if state
            .iter()
            .all(|(w, last, p)| *last == Some(*w) && *p == Some((0, 0)))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained within {timeout:?}: (want, feed last, (pending, unacked)) {state:?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Until the cluster's JetStream answers (its meta leader is elected).
async fn jetstream_ready(js: &jetstream::Context) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while js.query_account().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "JetStream not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_ledger_on_a_3_node_cluster_survives_a_node_and_a_process_loss() {
    // The cluster as deploy/nats/cluster ships it (sync_interval: always), on the test's ports.
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/cluster");
    let mut cluster = NatsCluster::start_with_configs(&[
        deploy.join("n1.conf"),
        deploy.join("n2.conf"),
        deploy.join("n3.conf"),
    ]);
    let urls = cluster.urls();
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(urls.split(',').collect::<Vec<_>>())
        .await
        .expect("connect");
    let mut js = jetstream::new(client.clone());
    // A publish whose node went away is re-sent soon rather than after the default 5 s.
    js.set_timeout(Duration::from_secs(2));
    jetstream_ready(&js).await;

    let started = tokio::time::Instant::now();
    let phase = |what: &str| eprintln!("cluster test: {what} at {:?}", started.elapsed());
    let pair = Pair::new();
    let extra = [
        "--replicas",
        "3",
        // Longer than the lease bucket's leader election after a node loss on this 2-core
        // machine: a lease churned mid-append leaves the old owner's store ending in records
        // that never reached the feed, which that owner then refuses to serve (docs/partitions.md).
        "--lease-ttl-secs",
        "6",
        "--ack-wait-secs",
        "2",
    ];
    let mut first = spawn_partition_serve_with(&pair.a, &urls, "auto", &extra, &pair.log_a);
    let mut second = spawn_partition_serve_with(&pair.b, &urls, "auto", &extra, &pair.log_b);
    let (a, b) = (first.id(), second.id());
    let logs = || pair.logs();
    wait_leases(&js, "two partitions each", Duration::from_secs(90), |h| {
        h.iter().filter(|x| held_by(x, a)).count() == 2
            && h.iter().filter(|x| held_by(x, b)).count() == 2
    })
    .await;
    // Every stream of the ledger is replicated three times.
    for name in ["CRM_TOUCHPOINTS", "CRM_LEDGER_EVENTS_P0", "KV_CRM_LEASES"] {
        let mut s = js.get_stream(name).await.expect(name);
        let info = s.info().await.expect("info");
        assert_eq!(info.config.num_replicas, 3, "{name}");
    }

    phase("balanced");
    let mut sent = publish_acked(&js, "before", 400).await;
    drained(&js, &per_partition(&sent), Duration::from_secs(120), &logs).await;

    // A NATS node dies while touchpoints arrive, and comes back.
    phase("first batch stored");
    cluster.node(1).kill();
    sent.extend(publish_acked(&js, "node-down", 400).await);
    phase("published with a node down");
    cluster.node(1).restart();
    sent.extend(publish_acked(&js, "node-back", 400).await);
    drained(&js, &per_partition(&sent), Duration::from_secs(180), &logs).await;

    phase("node back, everything stored");
    // A ledger process dies: the other takes its partitions after the lease TTL.
    signal(&second, "-KILL");
    let _ = second.wait();
    let killed = tokio::time::Instant::now();
    sent.extend(publish_acked(&js, "process-down", 400).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let holders = crate::partition::lease_holders(&js).await;
        if holders.iter().all(|h| held_by(h, a)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the survivor {a} did not take every partition: {holders:?}\n{}\n{}",
            pair.logs(),
            tail(&cluster.logs(), 60)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let takeover = killed.elapsed();
    drained(&js, &per_partition(&sent), Duration::from_secs(180), &logs).await;
    eprintln!(
        "cluster: partitions owned again {takeover:?} after the SIGKILL (TTL 6 s), all stored {:?} after it",
        killed.elapsed()
    );

    // `cluster status` shows it: every partition owned by the survivor, every feed stream and
    // intake consumer a 3-replica Raft group with a leader, nothing waiting.
    let (code, out, err) = crate::cli::cli_blocking(&[
        "cluster",
        "status",
        "--nats-url",
        &urls,
        "--partitions",
        "4",
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(status["cluster"].as_str(), Some("touchledger"), "{out}");
    assert_eq!(status["intake"]["replicas"].as_u64(), Some(3), "{out}");
    let parts = status["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 4, "{out}");
    for p in parts {
        assert!(held_by(&p["owner"].as_str().map(str::to_owned), a), "{p}");
        for group in ["feed", "consumer"] {
            assert_eq!(p[group]["replicas"].as_u64(), Some(3), "{group}: {p}");
            assert!(p[group]["leader"].is_string(), "{group}: {p}");
        }
        assert_eq!(p["intake_pending"].as_u64(), Some(0), "{p}");
        assert_eq!(p["problems"], serde_json::json!([]), "{p}");
    }
    assert_eq!(status["problems"], serde_json::json!([]), "{out}");

    signal(&first, "-TERM");
    let exit = first.wait().expect("wait");
    assert!(exit.success(), "first: {exit}\n{}", pair.logs());

    // Every acknowledged publish stored exactly once, in its partition; the killed process's
    // stores are a prefix of the survivor's.
    crate::partition::assert_survivor_holds_everything(&pair, &sent);
    let compared = crate::partition::assert_rebuilt_identical(&js, &pair).await;
    assert!(
        compared > 0,
        "no record of the killed owner reached the feed"
    );
}
