//! The population read of a partitioned ledger (the router merging every partition's pages of
//! contributions) against the same read of an unpartitioned ledger of the same events, over NATS
//! in the same run: `crm.query.population` "now" (unpartitioned: the current materialisation's
//! sums, O(months); partitioned: every customer's materialised contribution moved and ranked)
//! at an explicit instant (a pass over every customer in both; in parallel over the
//! partitions), and at the last month end (unpartitioned over NATS a pass; routed, the first
//! read merges and the router keeps the population, later reads check the partitions' logs).
//!
//! Built in the run: BENCH_CUSTOMERS customers (default 50,000) with 1–9 purchases each over the
//! last two years (about 5 per customer), appended to one store and to P = BENCH_PARTITIONS
//! (default 8) partition stores, projections folded, then each store's read models served
//! (`run_views`, as `serve` runs them) on a real nats-server and, for the partitions, the router.
//! Each read is asked BENCH_READS times (default 15) one after another; the median and the
//! slowest are reported.
//!
//! Run: `cargo bench -p touchledger-bus --bench population_reads`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio_util::sync::CancellationToken;
use touchledger_bus::{Router, Subjects, ViewConfig};
use touchledger_domain::partition::{PartitionId, partition_of};
use touchledger_domain::population::Rules;
use touchledger_domain::{Channel, Event, Payload, Purchase, Timestamp};
use touchledger_proto::v1;
use touchledger_store::{AppendItem, EventStore, SledStore, StoreConfig};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const DAY: i64 = 86_400_000_000_000;

/// Every customer's purchases, in time order per customer.
fn events(customers: u64, now: Timestamp) -> Vec<Event> {
    let mut rng = Rng(7);
    let mut out = Vec::new();
    for c in 0..customers {
        let n = 1 + rng.below(9);
        let first = rng.below(700) as i64;
        let mut day = first;
        for k in 0..n {
            let at =
                now.unix_nanos() - (730 - day) * DAY + (rng.below(86_000) as i64) * 1_000_000_000;
            out.push(Event {
                event_id: format!("b-{c}-{k}"),
                customer_id: format!("cust-{c:07}"),
                occurred_at: Timestamp::from_unix_nanos(at),
                source: "bench".into(),
                schema_version: 1,
                correlation_id: None,
                causation_id: None,
                payload: Payload::Purchase(Purchase {
                    order_id: format!("o-{c}-{k}"),
                    amount_minor: 500 + rng.below(20_000) as i64,
                    currency: "EUR".into(),
                    item_count: 1,
                    channel: Some(Channel::Web),
                    category: "music".into(),
                }),
            });
            day += 1 + rng.below(60) as i64;
            if day >= 729 {
                break;
            }
        }
    }
    out
}

/// A store of `events` (those of partition `p` when partitioned), projections folded.
fn build(dir: &std::path::Path, p: PartitionId, events: &[Event]) -> Arc<SledStore> {
    let mut cfg = StoreConfig::new(dir);
    cfg.partition = p;
    let store = SledStore::open(cfg).expect("store");
    let mine: Vec<&Event> = events.iter().filter(|e| p.owns(&e.customer_id)).collect();
    for chunk in mine.chunks(10_000) {
        store
            .append(
                chunk
                    .iter()
                    .map(|e| AppendItem::new((*e).clone()))
                    .collect(),
            )
            .expect("append");
    }
    let mut projectors: Vec<_> = touchledger_projector::open_all(&store)
        .expect("projectors")
        .into_iter()
        .map(|x| x.0)
        .collect();
    touchledger_projector::catch_up(&store, &mut projectors, 10_000).expect("fold");
    Arc::new(store)
}

/// Serve `store`'s read models under `subjects`; returns once its current view is ready.
async fn serve_views(
    url: &str,
    store: Arc<SledStore>,
    subjects: Subjects,
    shutdown: &CancellationToken,
) {
    let rules = Rules::default();
    let current = touchledger_bus::open_current(&store, &rules, Duration::from_secs(86_400))
        .expect("current");
    let cfg = ViewConfig {
        subjects,
        fits: false,
        refit_every: None,
        current: Some(current.clone()),
        ..ViewConfig::default()
    };
    let client = async_nats::connect(url).await.expect("connect");
    tokio::spawn(touchledger_bus::run_views(
        client,
        store,
        cfg,
        shutdown.clone(),
    ));
    while !current.is_ready() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ask `subject` for the population `reads` times; (median, slowest, reply bytes).
async fn time_reads(
    client: &async_nats::Client,
    subject: &str,
    as_of: Option<Timestamp>,
    reads: u64,
) -> (Duration, Duration, usize) {
    let req = v1::QueryRequest {
        as_of: as_of.map(touchledger_proto::to_pb_time),
        ..Default::default()
    }
    .encode_to_vec();
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..reads {
        let t = Instant::now();
        let m = client
            .request(subject.to_owned(), req.clone().into())
            .await
            .expect("request");
        times.push(t.elapsed());
        let r = v1::QueryReply::decode(m.payload.as_ref()).expect("reply");
        assert!(
            matches!(r.result, Some(v1::query_reply::Result::Population(_))),
            "{r:?}"
        );
        size = m.payload.len();
    }
    times.sort();
    (times[times.len() / 2], times[times.len() - 1], size)
}

fn main() {
    let customers = env("BENCH_CUSTOMERS", 50_000);
    let p = env("BENCH_PARTITIONS", 8) as u32;
    let reads = env("BENCH_READS", 15).max(1);
    let now = Timestamp::now();
    let events = events(customers, now);
    println!(
        "population reads: {customers} customers, {} purchases, P = {p}",
        events.len()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let single = build(&dir.path().join("single"), PartitionId::SINGLE, &events);
    println!(
        "  built the unpartitioned store in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let parts: Vec<Arc<SledStore>> = (0..p)
        .map(|n| {
            build(
                &dir.path().join(format!("p{n}")),
                PartitionId::new(n, p).expect("layout"),
                &events,
            )
        })
        .collect();
    println!(
        "  built {p} partition stores in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let per: Vec<u64> = (0..p)
        .map(|n| {
            events
                .iter()
                .filter(|e| partition_of(&e.customer_id, p) == n)
                .count() as u64
        })
        .collect();
    println!("  purchases per partition: {per:?}");
    drop(events);

    let server = touchledger_testkit::NatsServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let t = Instant::now();
        serve_views(&server.url(), single, Subjects::new("single"), &shutdown).await;
        let base = Subjects::new("crm");
        for (n, store) in parts.into_iter().enumerate() {
            serve_views(&server.url(), store, base.in_partition(n as u32), &shutdown).await;
        }
        println!(
            "  read models served and current views ready in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let client = async_nats::connect(server.url()).await.expect("connect");
        let router = Router::new(client.clone(), base, p, Rules::default());
        tokio::spawn(touchledger_bus::run_router(
            router,
            "touchledger-router".into(),
            Arc::new(Timestamp::now),
            shutdown.clone(),
        ));
        // The router's subscription is live once it answers.
        let probe = v1::QueryRequest::default().encode_to_vec();
        while client
            .request("crm.query.population", probe.clone().into())
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let at = Some(Timestamp::from_unix_nanos(now.unix_nanos() - 30 * DAY));
        let cases = [
            ("now", None, "single.query.population", "crm.query.population"),
            ("at an instant", at, "single.query.population", "crm.query.population"),
            // The router keeps a passed month end's population: its first read is the merge
            // (the slowest), the others P checks of the logs since. Unpartitioned, a NATS
            // query at a month end is a full pass (the HTTP overview keeps a snapshot).
            (
                "at the last month end",
                Some(touchledger_projector::monthend::last_month_end(now)),
                "single.query.population",
                "crm.query.population",
            ),
        ];
        for (what, as_of, single, routed) in cases {
            let (s_med, s_max, size) = time_reads(&client, single, as_of, reads).await;
            let (r_med, r_max, _) = time_reads(&client, routed, as_of, reads).await;
            println!(
                "  {what}: unpartitioned median {:.1} ms (slowest {:.1}); P = {p} routed median {:.1} ms (slowest {:.1}); routed / unpartitioned = {:.1}x; reply {size} B",
                s_med.as_secs_f64() * 1e3,
                s_max.as_secs_f64() * 1e3,
                r_med.as_secs_f64() * 1e3,
                r_max.as_secs_f64() * 1e3,
                r_med.as_secs_f64() / s_med.as_secs_f64().max(1e-9),
            );
        }
        shutdown.cancel();
    });
}
