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
pub(crate) fn customer_id(i: u32) -> String {
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
    // The ledger's own path (derived events, restore) is held to the same rule.
    let out = store
        .append_ledger_events(vec![AppendItem::new(purchase("e-there-2", there, 100))])
        .expect("append");
    match &out[0] {
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

/// A `serve` child process, killed (SIGKILL) when the test is done with it, also when the test
/// fails: a leftover would keep retrying its NATS URLs and could join a later test's server
/// that happens to get the same port.
pub(crate) struct ServeChild(std::process::Child, u16);

impl ServeChild {
    /// The port of its HTTP API.
    pub(crate) fn http_port(&self) -> u16 {
        self.1
    }
}

impl std::ops::Deref for ServeChild {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for ServeChild {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `touchledger serve --partitions 4 --own …` as a child process.
fn spawn_partition_serve(data: &std::path::Path, url: &str, own: &str) -> ServeChild {
    spawn_partition_serve_with(
        data,
        url,
        own,
        &[],
        &data.with_extension(format!("{own}.log")),
    )
}

/// The same with more flags and its standard error written to `log`.
pub(crate) fn spawn_partition_serve_with(
    data: &std::path::Path,
    url: &str,
    own: &str,
    extra: &[&str],
    log: &std::path::Path,
) -> ServeChild {
    let mut args = vec!["--partitions", "4"];
    args.extend_from_slice(extra);
    spawn_serve(data, url, own, &args, log)
}

/// `touchledger serve` of a partitioned ledger in `data` as a child process owning `own`, with
/// `args` (which give `--partitions`), its standard error written to `log`.
pub(crate) fn spawn_serve(
    data: &std::path::Path,
    url: &str,
    own: &str,
    extra: &[&str],
    log: &std::path::Path,
) -> ServeChild {
    let mut args = vec![
        "--data",
        data.to_str().expect("utf8"),
        "--nats-url",
        url,
        "--own",
        own,
        "--batch",
        "200",
        "--fetch-wait-ms",
        "20",
        "--global-checkpoint-secs",
        "1",
    ];
    // Every process serves HTTP: on a free port unless the test names one.
    let port = touchledger_testkit::free_port();
    let http = format!("127.0.0.1:{port}");
    if !extra.contains(&"--http-addr") {
        args.extend_from_slice(&["--http-addr", &http]);
    }
    args.extend_from_slice(extra);
    let args = args.join("\u{1f}");
    std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "service_crash::serve_child_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(crate::service_crash::CHILD_ENV, args)
        .env(crate::service_crash::CHILD_LOG_ENV, "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .map(|c| ServeChild(c, port))
        .expect("spawn serve")
}

/// One task per list, each publishing its messages (subject, message id, payload) through
/// JetStream in order, at most 1,000 acks outstanding; returns once every message is acked.
pub(crate) async fn publish_concurrently(
    client: &async_nats::Client,
    lists: Vec<Vec<(String, String, Vec<u8>)>>,
) {
    let mut tasks = Vec::new();
    for msgs in lists {
        // A context of its own per publisher: a context bounds the acks in flight (5,000).
        let js = jetstream::new(client.clone());
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for (subject, id, bytes) in msgs {
                let ack = js
                    .send_publish(
                        subject,
                        jetstream::message::PublishMessage::build()
                            .payload(bytes.into())
                            .message_id(id),
                    )
                    .await
                    .expect("publish");
                acks.push(ack);
                if acks.len() >= 1000 {
                    for a in acks.drain(..) {
                        a.await.expect("publish ack");
                    }
                }
            }
            for a in acks {
                a.await.expect("publish ack");
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
}

/// Until every partition's feed stream holds `want[n]` records and the partition's intake
/// consumer has nothing pending or unacked (the ledgers run in other processes: their progress
/// can only be observed through NATS).
pub(crate) async fn wait_partitions_drained(
    js: &jetstream::Context,
    want: &[u64],
    timeout: Duration,
) {
    let r = tokio::time::timeout(timeout, async {
        'poll: loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            for (n, &w) in want.iter().enumerate() {
                let Ok(mut feed) = js.get_stream(format!("CRM_LEDGER_EVENTS_P{n}")).await else {
                    continue 'poll;
                };
                let last = feed.info().await.expect("info").state.last_sequence;
                let intake = js.get_stream("CRM_TOUCHPOINTS").await.expect("intake");
                let Ok(mut c) = intake
                    .get_consumer::<consumer::pull::Config>(&format!("touchledger-ledger-p{n}"))
                    .await
                else {
                    continue 'poll;
                };
                let info = c.info().await.expect("consumer info");
                if last != w || info.num_pending != 0 || info.num_ack_pending != 0 {
                    continue 'poll;
                }
            }
            return;
        }
    })
    .await;
    assert!(r.is_ok(), "partitions did not drain within {timeout:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_share_a_ledger_of_4_partitions_and_store_everything_once() {
    const P: u32 = 4;
    const PUBLISHERS: u32 = 4;
    const PER: u32 = 2_500;
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("ledger");
    let mut first = spawn_partition_serve(&data, &server.url(), "0-1");
    let mut second = spawn_partition_serve(&data, &server.url(), "2,3");

    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while js.get_stream("CRM_TOUCHPOINTS").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no intake stream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Four publishers: unique valid events of 240 customers, 10 % re-sent under a new message
    // id (only the ledger can tell), 2 % undecodable.
    let mut outgoing = Vec::new();
    let mut unique: Vec<(String, String)> = Vec::new();
    let mut bad = 0u64;
    for p in 0..PUBLISHERS {
        let mut mine: Vec<(String, String)> = Vec::new();
        let mut msgs = Vec::new();
        for i in 0..PER {
            msgs.push(if i % 10 == 9 && !mine.is_empty() {
                let (id, customer) = mine[(i as usize * 7) % mine.len()].clone();
                let e = purchase(&id, &customer, 100);
                (
                    format!("crm.touchpoint.purchase.{customer}"),
                    format!("{id}-again-{i}"),
                    encode_event(&e),
                )
            } else if i % 50 == 25 {
                bad += 1;
                (
                    format!("crm.touchpoint.purchase.{}", customer_id(i % 240)),
                    format!("p{p}-bad-{i}"),
                    b"\xff\x00not protobuf".to_vec(),
                )
            } else {
                let id = format!("p{p}-e{i}");
                let customer = customer_id((p * 61 + i) % 240);
                mine.push((id.clone(), customer.clone()));
                (
                    format!("crm.touchpoint.purchase.{customer}"),
                    id.clone(),
                    encode_event(&purchase(&id, &customer, 100)),
                )
            });
        }
        unique.extend(mine);
        outgoing.push(msgs);
    }
    publish_concurrently(&client, outgoing).await;
    let mut want = vec![0u64; P as usize];
    for (_, customer) in &unique {
        want[partition_of(customer, P) as usize] += 1;
    }
    wait_partitions_drained(&js, &want, Duration::from_secs(180)).await;

    // Each partition's synchronous append and replay answer on its own subjects.
    let ledger = touchledger_client::Ledger::new(client.clone(), "crm");
    for n in 0..P {
        let customer = (0..240)
            .map(customer_id)
            .find(|c| partition_of(c, P) == n)
            .expect("a customer of the partition");
        let part = ledger.in_partition(n);
        let out = part
            .append(vec![(purchase(&format!("sync-{n}"), &customer, 5), None)])
            .await
            .expect("append");
        assert!(
            matches!(
                out[0],
                touchledger_client::AppendOutcome::Appended { position, .. } if position == want[n as usize] + 1
            ),
            "partition {n}: {out:?}"
        );
        want[n as usize] += 1;
        let mut count = 0u64;
        let summary = part
            .replay(&touchledger_client::ReplayFilter::default(), |r| {
                assert_eq!(partition_of(&r.event.customer_id, P), n);
                count += 1;
                Ok(())
            })
            .await
            .expect("replay");
        assert_eq!(
            (count, summary.head_position),
            (want[n as usize], want[n as usize])
        );
    }

    // The owner of partition 0 publishes a global checkpoint once the heads moved: wait for the
    // one that pins every partition's head.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let global_text = loop {
        if let Ok(stream) = js.get_stream("CRM_GLOBAL_CHECKPOINTS").await
            && let Ok(m) = stream
                .get_last_raw_message_by_subject("crm.ledger.global_checkpoint")
                .await
        {
            let text = String::from_utf8(m.payload.to_vec()).expect("utf-8");
            let g = touchledger_store::GlobalCheckpoint::parse(&text).expect("well-formed");
            if g.heads.iter().map(|(p, _)| *p).collect::<Vec<_>>() == want {
                break text;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no global checkpoint at the heads {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // An auditor replays one partition remotely through the CLI.
    let url = server.url();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        crate::cli::cli(&[
            "replay",
            "--remote",
            "--nats-url",
            &url,
            "--partitions",
            "4",
            "--partition",
            "2",
        ])
    })
    .await
    .expect("cli");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count() as u64, want[2], "{err}");

    for child in [&mut first, &mut second] {
        let pid = child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let exit = child.wait().expect("wait");
        if !exit.success() {
            let logs: Vec<String> = ["0-1", "2,3"]
                .iter()
                .map(|own| {
                    std::fs::read_to_string(data.with_extension(format!("{own}.log")))
                        .unwrap_or_default()
                })
                .collect();
            panic!("serve: {exit}\n{}", logs.join("\n---\n"));
        }
    }

    // Every unique valid event exactly once, in its customer's partition; every undecodable
    // message in the rejections record of the partition its subject routed it to.
    let mut stored = std::collections::HashSet::new();
    let mut rejected = 0;
    for n in 0..P {
        let mut cfg = StoreConfig::new(data.join(format!("p{n}")));
        cfg.partition = PartitionId::new(n, P).expect("layout");
        let store = SledStore::open(cfg).expect("open partition");
        assert_eq!(store.head().position, want[n as usize], "partition {n}");
        for r in store.read(&Default::default()) {
            let r = r.expect("record");
            assert_eq!(partition_of(&r.event.customer_id, P), n);
            assert!(
                stored.insert(r.event.event_id.clone()),
                "{} twice",
                r.event.event_id
            );
        }
        rejected += store.rejections().count() as u64;
    }
    assert_eq!(stored.len(), unique.len() + P as usize);
    for (id, _) in &unique {
        assert!(stored.contains(id), "{id} lost");
    }
    assert_eq!(rejected, bad);

    // `verify` checks every partition's chain.
    let d = data.to_str().expect("utf8");
    let (code, out, err) = crate::cli::cli(&["verify", "--data", d, "--partitions", "4"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches(": OK: ").count(), 4, "{out}");
    // The global checkpoint pins all four; a forged one (heads changed, hash recomputed) or a
    // tampered one (hash line no longer matching) is refused.
    let file = dir.path().join("global.txt");
    std::fs::write(&file, &global_text).expect("write");
    let f = file.to_str().expect("utf8");
    let (code, out, err) =
        crate::cli::cli(&["verify", "--data", d, "--partitions", "4", "--global", f]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("matches every partition here"), "{out}");
    check_partitioned_export(d, &dir.path().join("all"), f, &want);
    let mut forged = touchledger_store::GlobalCheckpoint::parse(&global_text).expect("parse");
    forged.heads[2].1 = forged.heads[1].1;
    std::fs::write(&file, forged.to_text()).expect("write");
    let (code, out, _) =
        crate::cli::cli(&["verify", "--data", d, "--partitions", "4", "--global", f]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("partition 2: FAILED"), "{out}");
    let tampered = global_text.replacen(
        &format!("\n3 {} ", want[3]),
        &format!("\n3 {} ", want[3] - 1),
        1,
    );
    assert_ne!(tampered, global_text);
    std::fs::write(&file, tampered).expect("write");
    let (code, out, _) =
        crate::cli::cli(&["verify", "--data", d, "--partitions", "4", "--global", f]);
    assert_eq!(code, 3, "{out}");

    // The directory is a partitioned ledger: opening it as an unpartitioned one is refused.
    let (code, _, err) = crate::cli::cli(&["verify", "--data", d]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("partitioned ledger"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_of_another_partition_count_does_not_reroute_the_intake() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client);
    touchledger_bus::ensure_streams(&js, &partitioned(0, 4).scoped())
        .await
        .expect("the first ledger makes the streams");
    // The same layout again is fine (an update of the same routing).
    touchledger_bus::ensure_streams(&js, &partitioned(3, 4).scoped())
        .await
        .expect("same layout");
    for other in [BusConfig::default(), partitioned(0, 8)] {
        let p = other.partition.count;
        match touchledger_bus::ensure_streams(&js, &other.scoped()).await {
            Err(touchledger_bus::BusError::PartitionLayout(detail)) => {
                assert!(detail.contains("CRM_TOUCHPOINTS"), "{detail}");
            }
            r => panic!("P = {p} against a ledger of 4: {r:?}"),
        }
    }
    // Nothing was changed on the server: still routed for 4.
    let info = js
        .get_stream("CRM_TOUCHPOINTS")
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info");
    assert_eq!(info.config.subjects, ["crm.touchpoint.*.*"]);
    assert!(
        info.config
            .subject_transform
            .expect("routed")
            .destination
            .contains("partition(4,2)")
    );
}

/// Publish `n` purchases with ids `{tag}-{i}` of 120 customers and wait for JetStream's acks.
async fn publish_purchases(js: &jetstream::Context, tag: &str, n: u32) -> Vec<(String, String)> {
    // The first ledger to own a partition creates the intake stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while js.get_stream("CRM_TOUCHPOINTS").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no intake stream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sent = Vec::new();
    let mut acks = Vec::new();
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let customer = customer_id(i * 7 % 120);
        let ack = js
            .publish(
                format!("crm.touchpoint.purchase.{customer}"),
                encode_event(&purchase(&id, &customer, 100)).into(),
            )
            .await
            .expect("publish");
        acks.push(ack);
        sent.push((id, customer));
    }
    for a in acks {
        a.await.expect("publish ack");
    }
    sent
}

/// The holder of each of `p` partitions' lease (its value: `host/pid/start`), `None` while free.
pub(crate) async fn lease_holders(js: &jetstream::Context, p: u32) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let Ok(kv) = js.get_key_value("CRM_LEASES").await else {
        return vec![None; p as usize];
    };
    for n in 0..p {
        let holder = kv.get(touchledger_bus::lease_key(n)).await.ok().flatten();
        out.push(holder.map(|h| String::from_utf8_lossy(&h).into_owned()));
    }
    out
}

/// Whether `holder` names the process `pid`.
pub(crate) fn held_by(holder: &Option<String>, pid: u32) -> bool {
    holder
        .as_deref()
        .is_some_and(|h| h.contains(&format!("/{pid}/")))
}

/// Until the lease holders of `p` partitions satisfy `done`; returns how long it took.
pub(crate) async fn wait_leases(
    js: &jetstream::Context,
    p: u32,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[Option<String>]) -> bool,
) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        let holders = lease_holders(js, p).await;
        if done(&holders) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}; holders {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Until every partition's lease names the process `pid` as its holder; returns how long it took.
pub(crate) async fn wait_leases_held_by(
    js: &jetstream::Context,
    pid: u32,
    timeout: Duration,
) -> Duration {
    wait_leases(
        js,
        4,
        &format!("process {pid} holds every lease"),
        timeout,
        |h| h.iter().all(|x| held_by(x, pid)),
    )
    .await
}

/// A failed-over partition's store, rebuilt from the feed, is byte-identical to the dead
/// owner's up to the last record the dead owner got into the feed (the last it could have
/// acknowledged): every record of the dead owner's store that the feed holds (same position and
/// hash) is, in the survivor's store, the same record — position, customer version, recorded_at,
/// both hashes and the event — and those records are a prefix of the dead owner's store.
/// Returns how many records were compared.
pub(crate) async fn assert_rebuilt_identical(js: &jetstream::Context, pair: &Pair) -> u64 {
    let mut compared = 0;
    for n in 0..4u32 {
        if pair.b.join(format!("p{n}")).exists() {
            compared += assert_partition_rebuilt_identical(js, 4, n, &pair.a, &pair.b).await;
        }
    }
    compared
}

/// The same for partition `n` of `p`, taken over by the process with data directory
/// `survivor` from the one with `dead`; returns how many records were compared.
pub(crate) async fn assert_partition_rebuilt_identical(
    js: &jetstream::Context,
    p: u32,
    n: u32,
    survivor: &std::path::Path,
    dead: &std::path::Path,
) -> u64 {
    let mut compared = 0;
    let mut feed = js
        .get_stream(format!("CRM_LEDGER_EVENTS_P{n}"))
        .await
        .expect("feed stream");
    let last = feed.info().await.expect("info").state.last_sequence;
    let survivor = open_partition_store_of(survivor, n, p);
    let dead = open_partition_store_of(dead, n, p);
    let mut reached_all = true;
    for r in dead.read(&Default::default()) {
        let r = r.expect("dead owner's record");
        let in_feed = r.position <= last
            && feed
                .get_raw_message(r.position)
                .await
                .ok()
                .and_then(|m| {
                    m.headers
                        .get(touchledger_bus::headers::HASH)
                        .map(|h| h.as_str() == r.hash.to_hex())
                })
                .unwrap_or(false);
        if !in_feed {
            reached_all = false;
            continue;
        }
        assert!(
            reached_all,
            "partition {n}: position {} is in the feed after one that is not",
            r.position
        );
        let s = survivor
            .get(r.position)
            .expect("survivor read")
            .unwrap_or_else(|| panic!("partition {n}: survivor lacks {}", r.position));
        assert_eq!(s, r, "partition {n}, position {}", r.position);
        assert_eq!(
            touchledger_proto::encode_event(&s.event),
            touchledger_proto::encode_event(&r.event)
        );
        compared += 1;
    }
    compared
}

/// Two `serve` processes' data directories and logs, in one temporary directory.
pub(crate) struct Pair {
    _dir: tempfile::TempDir,
    pub(crate) a: std::path::PathBuf,
    pub(crate) b: std::path::PathBuf,
    pub(crate) log_a: std::path::PathBuf,
    pub(crate) log_b: std::path::PathBuf,
}

impl Pair {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |name: &str| dir.path().join(name);
        Pair {
            a: at("a"),
            b: at("b"),
            log_a: at("a.log"),
            log_b: at("b.log"),
            _dir: dir,
        }
    }

    /// Both processes' logs, for a failure message.
    pub(crate) fn logs(&self) -> String {
        format!(
            "--- first\n{}\n--- second\n{}",
            std::fs::read_to_string(&self.log_a).unwrap_or_default(),
            std::fs::read_to_string(&self.log_b).unwrap_or_default()
        )
    }
}

/// How many of `sent` (event id, customer) belong to each of 4 partitions.
pub(crate) fn per_partition(sent: &[(String, String)]) -> Vec<u64> {
    let mut want = vec![0u64; 4];
    for (_, c) in sent {
        want[partition_of(c, 4) as usize] += 1;
    }
    want
}

/// The store of partition `n` of 4 in a partitioned data directory.
pub(crate) fn open_partition_store(data: &std::path::Path, n: u32) -> SledStore {
    open_partition_store_of(data, n, 4)
}

/// The store of partition `n` of `p` in a partitioned data directory.
pub(crate) fn open_partition_store_of(data: &std::path::Path, n: u32, p: u32) -> SledStore {
    let mut cfg = StoreConfig::new(data.join(format!("p{n}")));
    cfg.partition = PartitionId::new(n, p).expect("layout");
    SledStore::open(cfg).expect("open partition")
}

/// After a failover from the second process of `pair` to the first: the first's stores hold
/// every event of `sent` exactly once, in its partition, their chains verify, and every event
/// the second stored is among them.
pub(crate) fn assert_survivor_holds_everything(pair: &Pair, sent: &[(String, String)]) {
    let want = per_partition(sent);
    let mut stored = std::collections::HashSet::new();
    for n in 0..4u32 {
        let survivor = open_partition_store(&pair.a, n);
        assert_eq!(
            survivor.head().position,
            want[n as usize],
            "partition {n}\n{}",
            pair.logs()
        );
        let all: Vec<_> = survivor
            .read(&Default::default())
            .map(|r| r.expect("survivor record"))
            .collect();
        for r in &all {
            assert_eq!(partition_of(&r.event.customer_id, 4), n);
            assert!(
                stored.insert(r.event.event_id.clone()),
                "{} twice",
                r.event.event_id
            );
        }
        // The second's store (where it held the partition) may end in records that never
        // reached the feed: appended, not acknowledged, redelivered to the first. So nothing it
        // stored is missing from the first's (nothing it could have acknowledged is lost);
        // where the two differ, its store is stale and would be refused on its return.
        if pair.b.join(format!("p{n}")).exists() {
            let ids: std::collections::HashSet<&str> =
                all.iter().map(|r| r.event.event_id.as_str()).collect();
            let mut same_prefix = true;
            for r in open_partition_store(&pair.b, n).read(&Default::default()) {
                let r = r.expect("killed record");
                assert!(
                    ids.contains(r.event.event_id.as_str()),
                    "partition {n}: {} stored by the killed process only",
                    r.event.event_id
                );
                same_prefix &= all
                    .get(r.position as usize - 1)
                    .is_some_and(|s| s.hash == r.hash);
            }
            if !same_prefix {
                eprintln!(
                    "partition {n}: the killed process's store ends in records that never reached the feed"
                );
            }
        }
    }
    assert_eq!(stored.len(), sent.len());
    let (code, out, err) = crate::cli::cli(&[
        "verify",
        "--data",
        pair.a.to_str().expect("utf8"),
        "--partitions",
        "4",
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

/// Until a child's log says `needle` `times` times (60 s at most; `logs` for the failure).
async fn wait_logged(log: &std::path::Path, needle: &str, times: usize, logs: &dyn Fn() -> String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
        < times
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{needle:?} not logged {times} times\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn signal(child: &std::process::Child, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig}");
}

/// Ownership by lease: a second process asked for owned partitions waits; when the owner is
/// paused (SIGSTOP) past its lease, the second takes every partition, catches its empty store
/// up from the feed and carries on; the first, resumed, appends and acknowledges nothing more
/// (the touchpoints its server had already pushed to it go to the new owner), waits, and takes
/// the partitions back when the second shuts down, catching its stale store up the same way.
/// Afterwards both stores of each partition hold the same records (same positions and hashes),
/// every published event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_loses_its_partitions_to_a_standby_and_acts_no_more() {
    const P: u32 = 4;
    let server = NatsServer::start();
    let pair = Pair::new();
    let (data_a, data_b, log_a, log_b) = (&pair.a, &pair.b, &pair.log_a, &pair.log_b);
    let extra = ["--lease-ttl-secs", "3", "--ack-wait-secs", "2"];
    let logs = || pair.logs();
    let mut first = spawn_partition_serve_with(data_a, &server.url(), "all", &extra, log_a);
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    wait_leases_held_by(&js, first.id(), Duration::from_secs(60)).await;
    let mut second = spawn_partition_serve_with(data_b, &server.url(), "all", &extra, log_b);
    // The second waits for the leases (it says so), and stores nothing meanwhile.
    wait_logged(log_b, "waiting for its lease", P as usize, &logs).await;

    let mut sent = publish_purchases(&js, "before", 800).await;
    wait_partitions_drained(&js, &per_partition(&sent), Duration::from_secs(120)).await;

    // Pause the owner: its pending pulls still get touchpoints pushed into its socket.
    signal(&first, "-STOP");
    let paused = tokio::time::Instant::now();
    sent.extend(publish_purchases(&js, "paused", 800).await);
    let took = wait_leases_held_by(&js, second.id(), Duration::from_secs(60)).await;
    let takeover = paused.elapsed();
    eprintln!("lease takeover {takeover:?} after SIGSTOP (waited {took:?} after publishing)");
    // The owner's last renewal may have been up to a quarter TTL before the pause: the key
    // expires no earlier than three quarters of the TTL after it.
    assert!(
        takeover >= Duration::from_millis(2_250),
        "taken after {takeover:?}, before the lease could have run out (TTL 3 s)"
    );
    signal(&first, "-CONT");
    sent.extend(publish_purchases(&js, "resumed", 400).await);
    wait_partitions_drained(&js, &per_partition(&sent), Duration::from_secs(120)).await;
    // The first noticed, stopped its partitions and waits for them again.
    wait_logged(log_a, "waiting to own it again", P as usize, &logs).await;

    // A clean shutdown releases the leases at once: the first takes them back (before any TTL
    // could run out) and catches its stale stores up from the feed.
    signal(&second, "-TERM");
    let exit = second.wait().expect("wait");
    assert!(exit.success(), "second: {exit}\n{}", logs());
    wait_leases_held_by(&js, first.id(), Duration::from_secs(2)).await;
    wait_partitions_drained(&js, &per_partition(&sent), Duration::from_secs(60)).await;
    signal(&first, "-TERM");
    let exit = first.wait().expect("wait");
    assert!(exit.success(), "first: {exit}\n{}", logs());

    let want = per_partition(&sent);
    let mut stored = std::collections::HashSet::new();
    for n in 0..P {
        let open = |data: &std::path::Path| open_partition_store(data, n);
        let (a, b) = (open(data_a), open(data_b));
        assert_eq!(a.head(), b.head(), "partition {n}\n{}", logs());
        assert_eq!(a.head().position, want[n as usize], "partition {n}");
        let ra: Vec<_> = a.read(&Default::default()).map(|r| r.expect("a")).collect();
        let rb: Vec<_> = b.read(&Default::default()).map(|r| r.expect("b")).collect();
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!((x.position, x.hash), (y.position, y.hash), "partition {n}");
        }
        for r in &rb {
            assert_eq!(partition_of(&r.event.customer_id, P), n);
            assert!(
                stored.insert(r.event.event_id.clone()),
                "{} twice",
                r.event.event_id
            );
        }
    }
    assert_eq!(stored.len(), sent.len());
    for d in [&data_a, &data_b] {
        let (code, out, err) = crate::cli::cli(&[
            "verify",
            "--data",
            d.to_str().expect("utf8"),
            "--partitions",
            "4",
        ]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(out.matches(": OK: ").count(), 4, "{out}");
    }
}

/// `export --partitions 4` of every partition into one file (JSON lines and CSV), checked from
/// the file alone against the global checkpoint; a changed record, a wrong checkpoint kind and
/// a global checkpoint the file does not reach are refused; one partition restored from it.
fn check_partitioned_export(data: &str, stem: &std::path::Path, global: &str, want: &[u64]) {
    use crate::cli::cli;
    for format in ["jsonl", "csv"] {
        let file = stem.with_extension(format);
        let file = file.to_str().expect("utf8");
        let (code, out, err) = cli(&[
            "export",
            "--data",
            data,
            "--partitions",
            "4",
            "--format",
            format,
            "--out",
            file,
        ]);
        assert_eq!(code, 0, "{out}{err}");
        let text = std::fs::read_to_string(file).expect("export");
        let header = u64::from(format == "csv");
        assert_eq!(
            text.lines().count() as u64,
            want.iter().sum::<u64>() + header,
            "{format}"
        );
        let (code, out, err) = cli(&[
            "verify", "--export", file, "--format", format, "--global", global,
        ]);
        assert_eq!(code, 0, "{format}: {out}{err}");
        assert!(out.contains("of 4 partitions recompute"), "{out}");
        assert!(out.contains("matches global checkpoint"), "{out}");
        for (n, w) in want.iter().enumerate() {
            assert!(out.contains(&format!(" {n}:{w}:")), "{n}: {out}");
        }
    }
    let jsonl = stem.with_extension("jsonl");
    let text = std::fs::read_to_string(&jsonl).expect("export");
    let t = jsonl.to_str().expect("utf8");

    // One record of partition 2 changed (its amount): that partition's chain breaks.
    let tampered_file = stem.with_extension("tampered.jsonl");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with("{\"partition\":2,\"position\":3,"))
        .expect("partition 2, position 3");
    let changed = lines[i].replacen("\"amount_minor\":100", "\"amount_minor\":101", 1);
    assert_ne!(changed, lines[i], "{}", lines[i]);
    lines[i] = changed;
    std::fs::write(&tampered_file, lines.join("\n")).expect("write");
    let tf = tampered_file.to_str().expect("utf8");
    let (code, out, _) = cli(&["verify", "--export", tf, "--global", global]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("partition 2: content does not match its hash"),
        "{out}"
    );

    // A single chain's checkpoint does not describe a file of partitions.
    let (code, out, _) = cli(&[
        "verify",
        "--export",
        t,
        "--checkpoint",
        "1:0000000000000000000000000000000000000000000000000000000000000000",
    ]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("check it with --global"), "{out}");

    // A file without partition 3's records does not reach the global checkpoint.
    let short_file = stem.with_extension("short.jsonl");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("{\"partition\":3,"))
        .collect();
    std::fs::write(&short_file, kept.join("\n")).expect("write");
    let (code, out, _) = cli(&[
        "verify",
        "--export",
        short_file.to_str().expect("utf8"),
        "--global",
        global,
    ]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("partition 3: the export ends at position 0"),
        "{out}"
    );

    // Partition 2 restored from the file of all partitions; an unpartitioned store refuses it.
    let restored = stem.with_extension("restored");
    let r = restored.to_str().expect("utf8");
    let (code, out, err) = cli(&[
        "restore",
        "--data",
        r,
        "--partitions",
        "4",
        "--partition",
        "2",
        "--from",
        t,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let mut cfg = StoreConfig::new(restored.join("p2"));
    cfg.partition = PartitionId::new(2, 4).expect("layout");
    let store = SledStore::open(cfg).expect("restored partition");
    assert_eq!(store.head().position, want[2]);
    drop(store);
    let plain = stem.with_extension("plain");
    let (code, out, _) = cli(&[
        "restore",
        "--data",
        plain.to_str().expect("utf8"),
        "--from",
        t,
    ]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("restore each with --partitions P --partition N"),
        "{out}"
    );
}

/// `--own auto`: two processes share four partitions two and two; when one is killed
/// (SIGKILL), the other takes its partitions after the lease TTL, catches their stores up from
/// the feeds and goes on; every event published before and after is stored exactly once, and
/// the killed process's stores are a prefix of the survivor's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_owners_share_the_partitions_and_the_survivor_takes_a_killed_ones() {
    let server = NatsServer::start();
    let pair = Pair::new();
    let (data_a, data_b, log_a, log_b) = (&pair.a, &pair.b, &pair.log_a, &pair.log_b);
    let extra = ["--lease-ttl-secs", "2", "--ack-wait-secs", "2"];
    let logs = || pair.logs();
    let mut first = spawn_partition_serve_with(data_a, &server.url(), "auto", &extra, log_a);
    let mut second = spawn_partition_serve_with(data_b, &server.url(), "auto", &extra, log_b);
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    let (a, b) = (first.id(), second.id());
    let settled = wait_leases(
        &js,
        4,
        "two partitions each",
        Duration::from_secs(60),
        |h| {
            h.iter().filter(|x| held_by(x, a)).count() == 2
                && h.iter().filter(|x| held_by(x, b)).count() == 2
        },
    )
    .await;
    eprintln!("balanced two and two after {settled:?}");

    let mut sent = publish_purchases(&js, "before", 600).await;
    wait_partitions_drained(&js, &per_partition(&sent), Duration::from_secs(120)).await;

    signal(&second, "-KILL");
    let _ = second.wait();
    let killed = tokio::time::Instant::now();
    sent.extend(publish_purchases(&js, "after", 600).await);
    wait_leases_held_by(&js, a, Duration::from_secs(60)).await;
    let takeover = killed.elapsed();
    wait_partitions_drained(&js, &per_partition(&sent), Duration::from_secs(120)).await;
    eprintln!(
        "every partition owned by the survivor {takeover:?} after the SIGKILL (TTL 2 s), all drained {:?} after it",
        killed.elapsed()
    );
    assert!(
        takeover >= Duration::from_secs(1),
        "{takeover:?}: before the lease could expire"
    );

    signal(&first, "-TERM");
    let exit = first.wait().expect("wait");
    assert!(exit.success(), "first: {exit}\n{}", logs());

    assert_survivor_holds_everything(&pair, &sent);
    let compared = assert_rebuilt_identical(&js, &pair).await;
    assert!(
        compared > 0,
        "no record of the killed owner reached the feed"
    );
}

/// Own the unpartitioned ledger's partition with the store in `dir`, as `owner`, until the
/// returned token is cancelled.
fn own_with(
    server: &NatsServer,
    own: touchledger_bus::Ownership,
    dir: std::path::PathBuf,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), touchledger_bus::BusError>>,
) {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let url = server.url();
    let store = Arc::new(crate::support::fixed_clock_store(&dir));
    let task = tokio::spawn(async move {
        let connect = || {
            let url = url.clone();
            async move {
                async_nats::connect(url)
                    .await
                    .map_err(|e| touchledger_bus::BusError::Nats {
                        what: "connect",
                        detail: e.to_string(),
                    })
            }
        };
        touchledger_bus::own_partition(connect, store, partitioned(0, 1), &own, &stop).await
    });
    (shutdown, task)
}

/// Append `events` synchronously once a ledger answers (retrying while none owns the
/// partition); the positions they were given.
async fn append_when_owned(
    client: &async_nats::Client,
    events: Vec<touchledger_domain::Event>,
) -> Vec<u64> {
    use prost::Message;
    use touchledger_proto::v1;
    let body = v1::AppendRequest {
        items: events
            .iter()
            .map(|e| v1::AppendItem {
                event: Some(v1::Envelope::from(e)),
                expected_customer_version: None,
            })
            .collect(),
    }
    .encode_to_vec();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            client.request("crm.ledger.append", body.clone().into()),
        )
        .await;
        if let Ok(Ok(reply)) = reply {
            let reply = v1::AppendReply::decode(reply.payload.as_ref()).expect("reply decodes");
            return reply
                .outcomes
                .into_iter()
                .map(|o| match o.outcome {
                    Some(v1::append_outcome::Outcome::Appended(a)) => a.position,
                    other => panic!("not appended: {other:?}"),
                })
                .collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ledger answered: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The directories `dir` was set aside as (`<dir>.diverged-…`).
fn set_aside_dirs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let name = dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let mut found: Vec<_> = std::fs::read_dir(dir.parent().expect("parent"))
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy()
                    .starts_with(&format!("{name}.diverged-"))
            })
        })
        .collect();
    found.sort();
    found
}

/// A process coming back with a stale store that diverges from the partition's feed (it holds a
/// record at a position where the feed, written by another owner meanwhile, holds another)
/// does not stop, and does not merge: the store is set aside whole (still verifiable, with the
/// record the feed lacks), the partition is rebuilt from the feed into a new store and takes
/// appends again. When the feed itself ends before the head the last global checkpoint
/// certified (the feed lost acknowledged history), the store is kept and the partition refused
/// with `FeedMismatch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_stale_store_is_set_aside_and_the_partition_rebuilt_from_the_feed() {
    let server = NatsServer::start();
    let root = tempfile::tempdir().expect("tempdir");
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir_all(&a).expect("mkdir");
    std::fs::create_dir_all(&b).expect("mkdir");
    let (a, b) = (a.join("p0"), b.join("p0"));
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    let (leases, ttl) = touchledger_bus::lease_bucket(&js, "crm", Duration::from_secs(2), 1)
        .await
        .expect("lease bucket");
    let owner = |name: &str| touchledger_bus::Ownership {
        client: client.clone(),
        leases: leases.clone(),
        ttl,
        owner: name.into(),
        global_every: Duration::from_secs(3600),
        balance: None,
        views: None,
    };
    let first: Vec<_> = (1..=3)
        .map(|i| purchase(&format!("e{i}"), "c1", 100 * i64::from(i)))
        .collect();

    // A appends three; B takes over (catching up from the feed) and appends a fourth.
    let (stop, task) = own_with(&server, owner("A"), a.clone());
    assert_eq!(append_when_owned(&client, first).await, vec![1, 2, 3]);
    stop.cancel();
    task.await.expect("join").expect("A stops cleanly");
    let (stop, task) = own_with(&server, owner("B"), b.clone());
    assert_eq!(
        append_when_owned(&client, vec![purchase("b4", "c2", 40)]).await,
        vec![4]
    );
    stop.cancel();
    task.await.expect("join").expect("B stops cleanly");

    // A's store, offline, gets another record at position 4: it never reaches the feed.
    {
        let store = crate::support::fixed_clock_store(&a);
        let out = store
            .append(vec![AppendItem::new(purchase("a4", "c3", 7))])
            .expect("append");
        assert!(
            matches!(out[0], AppendOutcome::Appended { position: 4, .. }),
            "{out:?}"
        );
    }

    // A comes back: its store is set aside, the partition rebuilt from the feed, and it appends.
    let (stop, task) = own_with(&server, owner("A"), a.clone());
    assert_eq!(
        append_when_owned(&client, vec![purchase("a5", "c1", 50)]).await,
        vec![5]
    );
    assert!(!task.is_finished(), "the partition's owner stopped");
    stop.cancel();
    task.await.expect("join").expect("A stops cleanly");

    let aside = set_aside_dirs(&a);
    assert_eq!(aside.len(), 1, "{aside:?}");
    let kept = crate::support::fixed_clock_store(&aside[0]);
    assert_eq!(kept.head().position, 4);
    assert_eq!(kept.get(4).expect("get").expect("a4").event.event_id, "a4");
    assert!(kept.verify().expect("verify").is_ok());
    let rebuilt = crate::support::fixed_clock_store(&a);
    let other = crate::support::fixed_clock_store(&b);
    assert_eq!(rebuilt.head().position, 5);
    assert!(rebuilt.verify().expect("verify").is_ok());
    for p in 1..=4 {
        let (x, y) = (
            rebuilt.get(p).expect("get").expect("rebuilt"),
            other.get(p).expect("get").expect("B's"),
        );
        assert_eq!(
            (x.hash, &x.event.event_id),
            (y.hash, &y.event.event_id),
            "position {p}"
        );
    }
    assert_eq!(
        rebuilt.get(5).expect("get").expect("a5").event.event_id,
        "a5"
    );
    drop((kept, rebuilt));

    // B's store, offline, diverges at 5; the last global checkpoint says the partition reached
    // position 9, which the feed (ending at 5) lacks: B refuses and keeps its store.
    let out = other
        .append(vec![AppendItem::new(purchase("b5", "c3", 9))])
        .expect("append");
    assert!(
        matches!(out[0], AppendOutcome::Appended { position: 5, .. }),
        "{out:?}"
    );
    drop(other);
    js.get_or_create_stream(jetstream::stream::Config {
        name: "CRM_GLOBAL_CHECKPOINTS".into(),
        subjects: vec!["crm.ledger.global_checkpoint".into()],
        ..Default::default()
    })
    .await
    .expect("checkpoint stream");
    let certified = touchledger_store::GlobalCheckpoint {
        heads: vec![(9, touchledger_store::Hash([7; 32]))],
    };
    js.publish("crm.ledger.global_checkpoint", certified.to_text().into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let (_stop, task) = own_with(&server, owner("B"), b.clone());
    let err = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("B must refuse, not hang")
        .expect("join")
        .expect_err("B must refuse the partition");
    assert!(
        matches!(&err, touchledger_bus::BusError::FeedMismatch { detail, .. }
            if detail.contains("lost acknowledged history")),
        "{err}"
    );
    assert!(set_aside_dirs(&b).is_empty());
    assert_eq!(crate::support::fixed_clock_store(&b).head().position, 5);
}
