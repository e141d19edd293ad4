//! Partitions: the server routes each touchpoint to its customer's partition with the same
//! function auditors recompute (`partition_of`), a partition's ledger takes only its own
//! customers (and refuses a subject that names another customer), and a store keeps the
//! partition it was created for.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use touchledger_bus::BusConfig;
use touchledger_domain::RejectCode;
use touchledger_domain::partition::{PartitionId, partition_of};
use touchledger_proto::encode_event;
use touchledger_store::{
    AppendItem, AppendOutcome, EventStore, SledStore, StoreConfig, StoreError,
};
use touchledger_testkit::NatsServer;

use crate::support::{now, purchase};

fn partitioned(index: u32, count: u32) -> BusConfig {
    BusConfig {
        batch: 200,
        fetch_wait: Duration::from_millis(20),
        partition: PartitionId::new(index, count).expect("layout"),
        ..BusConfig::default()
    }
}

/// Ids of several shapes: short, long, numeric, non-ASCII (the hash is over UTF-8 bytes).
fn customer_id(i: u32) -> String {
    match i % 4 {
        0 => format!("c{i}"),
        1 => format!("cust-{i:08}"),
        2 => format!("{}", u64::from(i) * 7_919),
        _ => format!("kunde-ü{i}-名"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_routes_100000_customers_to_the_partition_auditors_compute() {
    const N: u32 = 100_000;
    const P: u32 = 8;
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    // The product's own intake stream, as `serve` creates it for a ledger of 8 partitions.
    let cfg = partitioned(0, P);
    let stream = js
        .create_stream(touchledger_bus::intake_stream_config(&cfg))
        .await
        .expect("intake stream with the partition transform");
    for i in 0..N {
        client
            .publish(
                format!("crm.touchpoint.purchase.{}", customer_id(i)),
                "x".into(),
            )
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");

    // Read back what the server stored: every subject names the partition that
    // `partition_of` gives for its customer token.
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .expect("ordered consumer");
    let mut messages = reader.messages().await.expect("messages");
    let mut per_partition = [0u32; P as usize];
    let mut seen = 0u32;
    while seen < N {
        let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .unwrap_or_else(|_| panic!("only {seen} of {N} messages were stored"))
            .expect("message")
            .expect("ok");
        let tokens: Vec<&str> = m.subject.split('.').collect();
        assert_eq!(tokens.len(), 5, "{}", m.subject);
        let (routed, customer) = (tokens[2], tokens[4]);
        let expected = partition_of(customer, P);
        assert_eq!(
            routed.parse::<u32>().ok(),
            Some(expected),
            "server put {customer} in partition {routed}, partition_of says {expected}"
        );
        assert_eq!(customer, customer_id(seen), "order");
        per_partition[expected as usize] += 1;
        seen += 1;
    }
    // Every partition got its share (the spread a uniform hash gives).
    for c in per_partition {
        assert!((11_500..=13_500).contains(&c), "{per_partition:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitions_ledger_takes_only_its_customers_and_refuses_a_misfiled_subject() {
    const P: u32 = 4;
    const MINE: u32 = 3;
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store_cfg = StoreConfig::new(dir.path());
    store_cfg.clock = Arc::new(now);
    store_cfg.cache_capacity = 16 * 1024 * 1024;
    store_cfg.partition = PartitionId::new(MINE, P).expect("layout");
    let store = Arc::new(SledStore::open(store_cfg).expect("open"));
    let client = async_nats::connect(server.url()).await.expect("connect");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(touchledger_bus::run_ledger(
        client.clone(),
        store.clone(),
        partitioned(MINE, P),
        shutdown.clone(),
    ));
    let js = jetstream::new(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while js.get_stream("CRM_TOUCHPOINTS").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no intake stream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 400 purchases of 80 customers, published as any producer does.
    let mut mine = Vec::new();
    for i in 0..400u32 {
        let customer = customer_id(i % 80);
        let e = purchase(&format!("p-{i}"), &customer, 100 + i64::from(i));
        if partition_of(&customer, P) == MINE {
            mine.push(e.event_id.clone());
        }
        js.publish(
            format!("crm.touchpoint.purchase.{customer}"),
            encode_event(&e).into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    }
    // A purchase of one of this partition's customers published on another customer's subject
    // (also of this partition): routed here, refused, never filed under the wrong customer.
    let ours: Vec<String> = (0..80)
        .map(customer_id)
        .filter(|c| partition_of(c, P) == MINE)
        .collect();
    let misfiled = purchase("misfiled-1", &ours[0], 999);
    js.publish(
        format!("crm.touchpoint.purchase.{}", ours[1]),
        encode_event(&misfiled).into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");

    let want = mine.len() as u64;
    let mut rx = store.subscribe();
    tokio::time::timeout(Duration::from_secs(30), async {
        while rx.borrow_and_update().position < want {
            rx.changed().await.expect("store alive");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("head stuck at {} of {want}", store.head().position));
    // The rejection is recorded once its batch is done: wait for it without sleeping blindly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let rejected = loop {
        let found: Vec<_> = store
            .rejections()
            .collect::<Result<Vec<_>, _>>()
            .expect("rejections");
        if !found.is_empty() {
            break found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rejection recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].rejection.code, RejectCode::SubjectMismatch);
    assert_eq!(rejected[0].rejection.field, "subject");

    shutdown.cancel();
    task.await.expect("join").expect("ledger ran cleanly");
    // (run_ledger drained its connection: look at the stream through another.)
    let js = jetstream::new(async_nats::connect(server.url()).await.expect("connect"));
    // Exactly this partition's events, each once; the other partitions' touchpoints are still
    // waiting in the stream for their own ledgers.
    let mut stored: Vec<String> = store
        .read(&Default::default())
        .map(|r| r.expect("record").event.event_id)
        .collect();
    stored.sort();
    mine.sort();
    assert_eq!(stored, mine);
    assert!(
        stored.iter().all(|id| id != "misfiled-1"),
        "a misfiled event was stored"
    );
    let stream = js.get_stream("CRM_TOUCHPOINTS").await.expect("stream");
    let info = stream.get_info().await.expect("info");
    assert_eq!(info.state.messages, 401);
}

#[test]
fn a_store_keeps_its_partition_and_refuses_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = |p: PartitionId| {
        let mut cfg = StoreConfig::new(dir.path());
        cfg.clock = Arc::new(now);
        cfg.cache_capacity = 8 * 1024 * 1024;
        cfg.partition = p;
        SledStore::open(cfg)
    };
    let p14 = PartitionId::new(1, 4).expect("layout");
    let store = open(p14).expect("new store for partition 1 of 4");
    // An event of this partition's customer is stored; one of another partition is refused.
    let customers: Vec<String> = (0..40).map(customer_id).collect();
    let here = customers.iter().find(|c| p14.owns(c)).expect("one here");
    let there = customers
        .iter()
        .find(|c| !p14.owns(c))
        .expect("one elsewhere");
    let out = store
        .append(vec![
            AppendItem::new(purchase("e-here", here, 100)),
            AppendItem::new(purchase("e-there", there, 100)),
        ])
        .expect("append");
    assert!(matches!(out[0], AppendOutcome::Appended { .. }), "{out:?}");
    match &out[1] {
        AppendOutcome::Rejected(r) => assert_eq!(r.code, RejectCode::WrongPartition, "{r:?}"),
        other => panic!("{other:?}"),
    }
    drop(store);

    for other in [
        PartitionId::SINGLE,
        PartitionId::new(2, 4).expect("layout"),
        PartitionId::new(1, 8).expect("layout"),
    ] {
        match open(other) {
            Err(StoreError::PartitionMismatch {
                found, expected, ..
            }) => {
                assert_eq!((found, expected), (p14, other));
            }
            Err(e) => panic!("{other}: {e}"),
            Ok(_) => panic!("{other}: a store of partition 1 of 4 opened as {other}"),
        }
    }
    let store = open(p14).expect("reopen as itself");
    assert_eq!(store.head().position, 1);
    assert_eq!(store.partition(), p14);
    drop(store);

    // The CLI opens unpartitioned ledgers: it names the mismatch and exits 5.
    let (code, _out, err) =
        crate::cli::cli(&["verify", "--data", dir.path().to_str().expect("utf-8")]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("partition 1 of 4"), "{err}");
}

#[test]
fn an_unpartitioned_store_stays_partition_0_of_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = crate::support::fixed_clock_store(dir.path());
    store
        .append(vec![AppendItem::new(purchase("e1", "anyone", 1))])
        .expect("append");
    drop(store);
    let mut cfg = StoreConfig::new(dir.path());
    cfg.partition = PartitionId::new(0, 2).expect("layout");
    assert!(matches!(
        SledStore::open(cfg),
        Err(StoreError::PartitionMismatch { .. })
    ));
    let store = crate::support::fixed_clock_store(dir.path());
    assert_eq!(store.partition(), PartitionId::SINGLE);
}
