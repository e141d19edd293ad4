//! The service under fire (brief §5): `touchledger serve` killed with SIGKILL mid-ingest and
//! restarted, and the NATS server killed and restarted mid-ingest. Every published event must be
//! stored exactly once, positions gapless, `verify` passing, and the feed stream without a gap.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use tokio_util::sync::CancellationToken;
use touchledger_bus::BusConfig;
use touchledger_proto::encode_event;
use touchledger_store::{EventStore, ReadFilter};
use touchledger_testkit::NatsServer;

use crate::support::{fixed_clock_store, purchase};

pub(crate) const CHILD_ENV: &str = "TOUCHLEDGER_SERVE_CHILD_ARGS";
/// Log level of a serve child (its standard error), e.g. `info`; unset: no logging.
pub(crate) const CHILD_LOG_ENV: &str = "TOUCHLEDGER_SERVE_CHILD_LOG";

/// Not a test on its own: runs `touchledger serve` with the arguments in the environment (the
/// child side of `serve_killed_mid_ingest_loses_nothing`). Returns at once without them.
#[test]
fn serve_child_helper() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    // The binary's main sets up logging; a child that should log says at what level.
    if let Ok(level) = std::env::var(CHILD_LOG_ENV) {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let mut argv = vec!["touchledger".to_owned(), "serve".to_owned()];
    argv.extend(args.split('\u{1f}').map(str::to_owned));
    let code = touchledger_cli::run(argv, &mut std::io::stdout(), &mut std::io::stderr());
    assert_eq!(code, 0, "serve exited with {code}");
}

fn spawn_serve(data: &std::path::Path, url: &str) -> Child {
    let args = [
        "--data",
        data.to_str().expect("utf8"),
        "--nats-url",
        url,
        "--batch",
        "100",
        "--fetch-wait-ms",
        "20",
        "--ack-wait-secs",
        "2",
    ]
    .join("\u{1f}");
    Command::new(std::env::current_exe().expect("exe"))
        .args([
            "service_crash::serve_child_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve")
}

pub(crate) async fn publish_all(js: &jetstream::Context, range: std::ops::Range<u64>) {
    let mut acks = Vec::new();
    for i in range {
        let id = format!("ev-{i}");
        let e = purchase(&id, &format!("cust-{}", i % 101), i as i64);
        let ack = js
            .send_publish(
                format!("crm.touchpoint.purchase.cust-{}", i % 101),
                PublishMessage::build()
                    .payload(encode_event(&e).into())
                    .message_id(id),
            )
            .await
            .expect("publish");
        acks.push(ack);
        if acks.len() >= 1000 {
            for a in acks.drain(..) {
                a.await.expect("ack");
            }
        }
    }
    for a in acks {
        a.await.expect("ack");
    }
}

/// Wait until the intake consumer has nothing pending or unacked, and the feed holds `n`.
pub(crate) async fn wait_drained(js: &jetstream::Context, n: u64, timeout: Duration) {
    let r = tokio::time::timeout(timeout, async {
        loop {
            let mut feed = js.get_stream("CRM_LEDGER_EVENTS").await.expect("feed");
            let last = feed.info().await.expect("info").state.last_sequence;
            let mut intake = js.get_stream("CRM_TOUCHPOINTS").await.expect("intake");
            let c: jetstream::consumer::PullConsumer = intake
                .get_consumer("touchledger-ledger")
                .await
                .expect("consumer");
            let _ = &mut intake;
            let mut c = c;
            let info = c.info().await.expect("consumer info");
            if last == n && info.num_pending == 0 && info.num_ack_pending == 0 {
                return;
            }
            // The ledger runs in another process: its progress can only be observed here.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(r.is_ok(), "ledger did not drain within {timeout:?}");
}

pub(crate) fn check_store(dir: &std::path::Path, n: u64) {
    let store = fixed_clock_store(dir);
    assert_eq!(store.head().position, n);
    let mut ids = HashSet::new();
    for (i, c) in store.read(&ReadFilter::default()).enumerate() {
        let c = c.expect("read");
        assert_eq!(c.position, i as u64 + 1);
        assert!(
            ids.insert(c.event.event_id.clone()),
            "{} stored twice",
            c.event.event_id
        );
    }
    assert_eq!(ids.len() as u64, n);
    let report = store.verify().expect("verify");
    assert!(report.is_ok(), "{report:?}");
}

pub(crate) async fn check_feed(js: &jetstream::Context, n: u64) {
    let mut feed = js.get_stream("CRM_LEDGER_EVENTS").await.expect("feed");
    let state = feed.info().await.expect("info").state.clone();
    assert_eq!(
        (state.first_sequence, state.last_sequence, state.messages),
        (1, n, n),
        "feed has a gap or a duplicate"
    );
    for seq in [1, n / 2, n] {
        let m = feed.get_raw_message(seq).await.expect("feed message");
        let pos = m
            .headers
            .get(touchledger_bus::headers::POSITION)
            .map(|v| v.to_string());
        assert_eq!(pos.as_deref(), Some(seq.to_string().as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_mid_ingest_loses_nothing() {
    const N: u64 = 12_000;
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("ledger");
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());

    // The first child creates the streams; publish while children are being killed.
    let mut child = spawn_serve(&data, &server.url());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while js.get_stream("CRM_TOUCHPOINTS").await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve never created its streams"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publisher = tokio::spawn({
        let js = js.clone();
        async move { publish_all(&js, 0..N).await }
    });
    let mut seed = 0x9e37_79b9_u64;
    let mut mid_ingest = 0;
    for trial in 0..6 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(150 + (seed >> 33) % 450);
        tokio::time::sleep(delay).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        // Between kill and restart, look at what the killed process left behind.
        let head = {
            let store = fixed_clock_store(&data);
            assert!(
                store.verify().expect("verify").is_ok(),
                "trial {trial}: damaged after SIGKILL"
            );
            store.head().position
        };
        if head > 0 && head < N {
            mid_ingest += 1;
        }
        eprintln!("trial {trial}: serve killed after {delay:?} at head {head}");
        child = spawn_serve(&data, &server.url());
    }
    publisher.await.expect("publisher");
    assert!(
        mid_ingest >= 3,
        "only {mid_ingest} kills landed mid-ingest: the test proved too little"
    );
    // One more event, so that the last child is known to be up (and its signal handler
    // installed) before it is asked to stop.
    publish_all(&js, N..N + 1).await;
    const N1: u64 = N + 1;
    wait_drained(&js, N1, Duration::from_secs(180)).await;
    // Graceful stop of the last child: SIGTERM, then it must exit 0.
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(
        exit.success(),
        "serve did not stop cleanly on SIGTERM: {exit}"
    );

    check_store(&data, N1);
    check_feed(&js, N1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_mid_ingest_loses_nothing() {
    const N: u64 = 8_000;
    let mut server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(fixed_clock_store(dir.path()));
    let ledger_client = async_nats::connect(server.url()).await.expect("connect");
    let shutdown = CancellationToken::new();
    let cfg = BusConfig {
        batch: 100,
        fetch_wait: Duration::from_millis(20),
        retry_delay: Duration::from_millis(200),
        ..BusConfig::default()
    };
    let ledger = tokio::spawn(touchledger_bus::run_ledger(
        ledger_client,
        store.clone(),
        cfg,
        shutdown.clone(),
    ));
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while js.get_stream("CRM_TOUCHPOINTS").await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "streams never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publish_all(&js, 0..N / 2).await;
    // Kill the server while the ledger is ingesting the first half.
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    // Publishers retry until acked; the second half goes to the restarted server.
    let r = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if client.connection_state() == async_nats::connection::State::Connected
                && js.get_stream("CRM_TOUCHPOINTS").await.is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(r.is_ok(), "client did not reconnect");
    publish_all(&js, N / 2..N).await;

    let mut rx = store.subscribe();
    let r = tokio::time::timeout(Duration::from_secs(120), async {
        while rx.borrow_and_update().position < N {
            rx.changed().await.expect("store alive");
        }
    })
    .await;
    assert!(r.is_ok(), "head stuck at {} of {N}", store.head().position);
    wait_drained(&js, N, Duration::from_secs(60)).await;
    shutdown.cancel();
    ledger
        .await
        .expect("join")
        .expect("ledger survived the outage");
    drop(store);
    check_store(dir.path(), N);
    check_feed(&js, N).await;
}
