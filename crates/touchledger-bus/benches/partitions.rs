//! Ingest with P = 1, 2, 4 partitions, one ledger process owning all of them (what
//! `touchledger serve --partitions P` runs), against a real nats-server started on a free port:
//! N purchase events of 20,000 customers published with async publish; timed from the first
//! publish until every partition's store holds its events and its intake consumer has nothing
//! pending or unacked. The baseline, measured first in the same run against the same server: a
//! plain durable pull consumer on an identically configured stream, fetching 500 and acking
//! each message with no processing (the broker's limit). Each P is also measured with the
//! acknowledgement a leased partition gives (`serve --partitions`): only once the record is in
//! the feed stream (`FeedProgress::tracked`).
//!
//! Run: `cargo bench -p touchledger-bus --bench partitions` (env BENCH_EVENTS, default 100000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use tokio_util::sync::CancellationToken;
use touchledger_bus::{BusConfig, Subjects};
use touchledger_domain::partition::{PartitionId, partition_of};
use touchledger_proto::encode_event;
use touchledger_store::{EventStore, SledStore, StoreConfig};

mod common;
use common::{event, plain_baseline, publish_all};

const CUSTOMERS: u64 = 20_000;

/// One process owning all `p` partitions: returns the time to store and ack everything
/// (acknowledged once flushed, or with `after_feed` once in the feed stream).
async fn partitioned(
    url: &str,
    p: u32,
    events: &[(String, String, Vec<u8>)],
    want: &[u64],
    after_feed: bool,
) -> Duration {
    partitioned_replicated(url, p, events, want, after_feed, 1).await
}

/// The same with the ledger's streams in `replicas` copies; `url` may list several servers
/// (comma-separated).
async fn partitioned_replicated(
    url: &str,
    p: u32,
    events: &[(String, String, Vec<u8>)],
    want: &[u64],
    after_feed: bool,
    replicas: usize,
) -> Duration {
    let connect = || async_nats::connect(url.split(',').collect::<Vec<_>>());
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let mut stores = Vec::new();
    let mut tasks = Vec::new();
    for n in 0..p {
        let mut sc = StoreConfig::new(dir.path().join(format!("p{n}")));
        sc.partition = PartitionId::new(n, p).expect("layout");
        let store = Arc::new(SledStore::open(sc).expect("store"));
        let client = connect().await.expect("connect");
        let cfg = BusConfig {
            subjects: Subjects::new("crm"),
            partition: PartitionId::new(n, p).expect("layout"),
            replicas,
            feed: if after_feed {
                touchledger_bus::FeedProgress::tracked()
            } else {
                touchledger_bus::FeedProgress::default()
            },
            ..BusConfig::default()
        };
        tasks.push(tokio::spawn(touchledger_bus::run_ledger(
            client,
            store.clone(),
            cfg,
            shutdown.clone(),
        )));
        stores.push(store);
    }
    let client = connect().await.expect("connect");
    let js = jetstream::new(client);
    let intake_ready = |js: jetstream::Context| async move {
        loop {
            if let Ok(s) = js.get_stream("CRM_TOUCHPOINTS").await {
                let mut all = true;
                for n in 0..p {
                    let name = if p > 1 {
                        format!("touchledger-ledger-p{n}")
                    } else {
                        "touchledger-ledger".into()
                    };
                    all &= s.get_consumer::<pull::Config>(&name).await.is_ok();
                }
                if all {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    intake_ready(js.clone()).await;
    let start = Instant::now();
    let publisher = tokio::spawn({
        let js = js.clone();
        let events = events.to_vec();
        async move { publish_all(&js, "crm", &events).await }
    });
    for (store, &w) in stores.iter().zip(want) {
        let mut head = store.subscribe();
        while head.borrow_and_update().position < w {
            head.changed().await.expect("store");
        }
    }
    let intake = js.get_stream("CRM_TOUCHPOINTS").await.expect("intake");
    for n in 0..p {
        let name = if p > 1 {
            format!("touchledger-ledger-p{n}")
        } else {
            "touchledger-ledger".into()
        };
        loop {
            let mut c: jetstream::consumer::PullConsumer =
                intake.get_consumer(&name).await.expect("consumer");
            let info = c.info().await.expect("info");
            if info.num_ack_pending == 0 && info.num_pending == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let took = start.elapsed();
    publisher.await.expect("publisher");
    shutdown.cancel();
    for t in tasks {
        let _ = t.await;
    }
    took
}

fn main() {
    let Some(n) = common::bench_events(100_000) else {
        return;
    };
    let rt = common::runtime();
    let events: Vec<(String, String, Vec<u8>)> = (0..n)
        .map(|i| {
            let e = event(i, CUSTOMERS);
            (e.customer_id.clone(), e.event_id.clone(), encode_event(&e))
        })
        .collect();
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    if std::env::var("BENCH_CLUSTER").is_ok_and(|v| v == "1") {
        cluster(&rt, &events);
        return;
    }
    println!(
        "ingest of {n} events of {CUSTOMERS} customers (publish with async ack -> stored, flushed and acked)"
    );
    for p in [1u32, 2, 4] {
        let mut want = vec![0u64; p as usize];
        for (customer, _, _) in &events {
            want[partition_of(customer, p) as usize] += 1;
        }
        // A fresh server per P and variant: each run starts from empty streams.
        let run = |after_feed: bool| {
            let server = touchledger_testkit::NatsServer::start();
            rt.block_on(async {
                let client = async_nats::connect(server.url()).await.expect("connect");
                let js = jetstream::new(client);
                let plain = plain_baseline(&js, &events).await;
                let ours = partitioned(&server.url(), p, &events, &want, after_feed).await;
                (plain, ours)
            })
        };
        let (plain, ours) = run(false);
        let (plain2, leased) = run(true);
        println!(
            "  P = {p}: touchledger {:>8.0} events/s ({:.2} s)   plain fetch+ack {:>8.0} events/s   ratio {:.2}",
            rate(ours),
            ours.as_secs_f64(),
            rate(plain),
            rate(ours) / rate(plain)
        );
        println!(
            "         acked after the feed {:>8.0} events/s ({:.2} s)   plain fetch+ack {:>8.0} events/s   ratio {:.2}",
            rate(leased),
            leased.as_secs_f64(),
            rate(plain2),
            rate(leased) / rate(plain2)
        );
    }
}

/// `BENCH_CLUSTER=1`: P = 4 partitions, acknowledged once in the feed (what leased partitions
/// do), on a 3-node cluster of this machine's loopback: the ledger's streams in 1 and in 3
/// copies, on nodes as deploy/nats/cluster ships them (`sync_interval: always`) and on nodes
/// with the server's default (sync every 2 minutes); each against the plain fetch+ack baseline
/// on a stream of as many copies on the same cluster, measured just before.
fn cluster(rt: &tokio::runtime::Runtime, events: &[(String, String, Vec<u8>)]) {
    let p = 4u32;
    let mut want = vec![0u64; p as usize];
    for (customer, _, _) in events {
        want[partition_of(customer, p) as usize] += 1;
    }
    let rate = |d: Duration| events.len() as f64 / d.as_secs_f64();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats/cluster");
    println!(
        "ingest of {} events on a 3-node cluster, P = {p}, acknowledged once in the feed",
        events.len()
    );
    for sync in [true, false] {
        for replicas in [1usize, 3] {
            let cluster = if sync {
                touchledger_testkit::NatsCluster::start_with_configs(&[
                    deploy.join("n1.conf"),
                    deploy.join("n2.conf"),
                    deploy.join("n3.conf"),
                ])
            } else {
                touchledger_testkit::NatsCluster::start(3)
            };
            let urls = cluster.urls();
            let (plain, ours) = rt.block_on(async {
                let client = async_nats::connect(urls.split(',').collect::<Vec<_>>())
                    .await
                    .expect("connect");
                let js = jetstream::new(client);
                // JetStream answers once the cluster has elected its meta leader.
                while js.query_account().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let plain = common::plain_baseline_replicated(&js, events, replicas).await;
                let ours = partitioned_replicated(&urls, p, events, &want, true, replicas).await;
                (plain, ours)
            });
            println!(
                "  sync_interval {:<7} R{replicas}: touchledger {:>8.0} events/s ({:.2} s)   plain fetch+ack {:>8.0} events/s   ratio {:.2}",
                if sync { "always" } else { "default" },
                rate(ours),
                ours.as_secs_f64(),
                rate(plain),
                rate(ours) / rate(plain)
            );
        }
    }
}
