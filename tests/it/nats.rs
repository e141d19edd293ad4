//! The NATS service against a real `nats-server` (started by the test kit on a free port) and a
//! real sled directory: intake with duplicates and malformed input, synchronous append outcomes,
//! and the committed-event feed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use touchledger_bus::{BusConfig, headers};
use touchledger_domain::{EventKind, Payload, Survey};
use touchledger_proto::{encode_event, v1};
use touchledger_store::{EventStore, SledStore};
use touchledger_testkit::NatsServer;

use crate::support::{fixed_clock_store, purchase};

struct Ledger {
    store: Arc<SledStore>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), touchledger_bus::BusError>>,
    client: async_nats::Client,
    _dir: tempfile::TempDir,
}

async fn start_ledger(server: &NatsServer) -> Ledger {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(fixed_clock_store(dir.path()));
    let client = async_nats::connect(server.url()).await.expect("connect");
    let shutdown = CancellationToken::new();
    let cfg = BusConfig {
        batch: 200,
        fetch_wait: Duration::from_millis(20),
        ..BusConfig::default()
    };
    let task = tokio::spawn(touchledger_bus::run_ledger(
        client.clone(),
        store.clone(),
        cfg,
        shutdown.clone(),
    ));
    // The streams exist once the feed stream can be looked up.
    let js = jetstream::new(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while js.get_stream("CRM_LEDGER_EVENTS").await.is_err()
        || js.get_stream("CRM_TOUCHPOINTS").await.is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ledger streams never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The synchronous-append responder subscribes in its own task, after the streams exist: an
    // empty request (which commits nothing) is answered once it listens.
    loop {
        match client
            .request("crm.ledger.append", request(vec![]).into())
            .await
        {
            Ok(_) => break,
            Err(e) if matches!(e.kind(), async_nats::RequestErrorKind::NoResponders) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "append responder never appeared"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("append probe: {e}"),
        }
    }
    Ledger {
        store,
        shutdown,
        task,
        client,
        _dir: dir,
    }
}

impl Ledger {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("ledger ran cleanly");
    }

    /// Wait (without polling sleeps) until the head reaches `n`.
    async fn wait_head(&self, n: u64, timeout: Duration) {
        let mut rx = self.store.subscribe();
        let r = tokio::time::timeout(timeout, async {
            while rx.borrow_and_update().position < n {
                rx.changed().await.expect("store alive");
            }
        })
        .await;
        assert!(
            r.is_ok(),
            "head stuck at {} (want {n})",
            self.store.head().position
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_stores_each_valid_event_once_and_dead_letters_the_rest() {
    const PUBLISHERS: usize = 4;
    const PER: usize = 5000;
    let server = NatsServer::start();
    let ledger = start_ledger(&server).await;
    let mut dead = ledger
        .client
        .subscribe("crm.deadletter.>")
        .await
        .expect("subscribe");
    ledger.client.flush().await.expect("flush");

    // Each publisher: 10 % re-sent duplicates (half with the same Nats-Msg-Id, which JetStream
    // may drop in its window; half under a new message id, which only the ledger catches),
    // 2 % malformed of three sorts, the rest unique valid events.
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let js = jetstream::new(ledger.client.clone());
        tasks.push(tokio::spawn(async move {
            let mut unique = 0u64;
            let mut malformed: BTreeMap<&'static str, u64> = BTreeMap::new();
            let mut sent: Vec<(String, String, Vec<u8>)> = Vec::new();
            let mut acks = Vec::new();
            for i in 0..PER {
                let (subject, msg_id, bytes) = if i % 10 == 9 && !sent.is_empty() {
                    let (s, id, b) = sent[(i * 7) % sent.len()].clone();
                    let id = if i % 20 == 9 {
                        id
                    } else {
                        format!("{id}-retry-{i}")
                    };
                    (s, id, b)
                } else if i % 50 == 25 {
                    let (code, bytes) = match (i / 50) % 3 {
                        0 => ("DECODE_FAILED", b"\xff\x00not protobuf".to_vec()),
                        1 => {
                            let mut e =
                                purchase(&format!("p{p}-bad-{i}"), &format!("cust-{p}"), 100);
                            e.payload = Payload::Survey(Survey {
                                survey_id: "s".into(),
                                nps: Some(11),
                                ..Survey::default()
                            });
                            ("SCORE_OUT_OF_RANGE", encode_event(&e))
                        }
                        _ => (
                            "CUSTOMER_ID_INVALID",
                            encode_event(&purchase(&format!("p{p}-bad-{i}"), "has space", 100)),
                        ),
                    };
                    *malformed.entry(code).or_default() += 1;
                    (
                        format!("crm.touchpoint.purchase.p{p}"),
                        format!("p{p}-bad-{i}"),
                        bytes,
                    )
                } else {
                    let id = format!("p{p}-e{i}");
                    let customer = format!("cust-{p}-{}", i % 37);
                    let e = purchase(&id, &customer, i as i64);
                    let s = format!("crm.touchpoint.{}.{customer}", EventKind::Purchase.as_str());
                    let b = encode_event(&e);
                    sent.push((s.clone(), id.clone(), b.clone()));
                    unique += 1;
                    (s, id, b)
                };
                let ack = js
                    .send_publish(
                        subject,
                        PublishMessage::build()
                            .payload(bytes.into())
                            .message_id(msg_id),
                    )
                    .await
                    .expect("publish");
                acks.push(ack);
            }
            for a in acks {
                a.await.expect("publish ack");
            }
            (unique, malformed)
        }));
    }
    let mut unique = 0;
    let mut malformed: BTreeMap<&'static str, u64> = BTreeMap::new();
    for t in tasks {
        let (u, m) = t.await.expect("publisher");
        unique += u;
        for (k, v) in m {
            *malformed.entry(k).or_default() += v;
        }
    }
    let total_bad: u64 = malformed.values().sum();
    assert_eq!(total_bad, (PUBLISHERS * PER / 50) as u64);

    ledger.wait_head(unique, Duration::from_secs(120)).await;
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    let r = tokio::time::timeout(Duration::from_secs(30), async {
        while got.values().sum::<u64>() < total_bad {
            let m = dead.next().await.expect("dead letters");
            let h = m.headers.as_ref().expect("headers");
            let code = h.get(headers::REJECT_CODE).expect("code").to_string();
            assert_eq!(m.subject.as_str(), format!("crm.deadletter.{code}"));
            assert!(h.get(headers::ORIGINAL_SUBJECT).is_some());
            *got.entry(code).or_default() += 1;
        }
    })
    .await;
    assert!(r.is_ok(), "dead letters so far: {got:?}");
    let want: BTreeMap<String, u64> = malformed.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(got, want);

    // Exactly the unique valid events, once each; the rejections record has every malformed one.
    let store = ledger.store.clone();
    assert_eq!(store.head().position, unique);
    let mut ids = std::collections::HashSet::new();
    for c in store.read(&Default::default()) {
        assert!(
            ids.insert(c.expect("read").event.event_id),
            "an event was stored twice"
        );
    }
    let mut kept: BTreeMap<String, u64> = BTreeMap::new();
    for r in store.rejections() {
        *kept
            .entry(r.expect("rejection").rejection.code.as_str().to_owned())
            .or_default() += 1;
    }
    assert_eq!(kept, want);
    assert!(store.verify().expect("verify").is_ok());

    // The feed stream holds every position once, sequence = position.
    let js = jetstream::new(ledger.client.clone());
    let mut feed = js.get_stream("CRM_LEDGER_EVENTS").await.expect("feed");
    let r = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if feed.info().await.expect("info").state.last_sequence == unique {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(r.is_ok(), "feed did not catch up");
    let info = feed.info().await.expect("info");
    assert_eq!(info.state.messages, unique);
    let last = feed
        .get_raw_message(unique)
        .await
        .expect("last feed message");
    let rec = v1::StoredRecord::decode(last.payload.as_ref()).expect("record");
    assert_eq!(rec.position, unique);
    ledger.stop().await;
}

fn request(items: Vec<(touchledger_domain::Event, Option<u64>)>) -> Vec<u8> {
    v1::AppendRequest {
        items: items
            .into_iter()
            .map(|(e, v)| v1::AppendItem {
                event: Some(v1::Envelope::from(&e)),
                expected_customer_version: v,
            })
            .collect(),
    }
    .encode_to_vec()
}

async fn append(client: &async_nats::Client, body: Vec<u8>) -> Vec<v1::append_outcome::Outcome> {
    let reply = client
        .request("crm.ledger.append", body.into())
        .await
        .expect("append request");
    v1::AppendReply::decode(reply.payload.as_ref())
        .expect("reply decodes")
        .outcomes
        .into_iter()
        .map(|o| o.outcome.expect("outcome"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_append_outcomes() {
    use v1::append_outcome::Outcome;
    let server = NatsServer::start();
    let ledger = start_ledger(&server).await;
    let c = &ledger.client;

    let out = append(
        c,
        request(vec![
            (purchase("a1", "c1", 10), Some(0)),
            (purchase("a2", "c1", 20), Some(1)),
        ]),
    )
    .await;
    match &out[..] {
        [Outcome::Appended(x), Outcome::Appended(y)] => {
            assert_eq!(
                (
                    x.position,
                    x.customer_version,
                    y.position,
                    y.customer_version
                ),
                (1, 1, 2, 2)
            );
            assert_eq!(
                ledger
                    .store
                    .get(2)
                    .expect("get")
                    .expect("stored")
                    .hash
                    .0
                    .to_vec(),
                y.hash
            );
        }
        other => panic!("{other:?}"),
    }
    // The reply came after the flush: the events are readable right away.
    assert_eq!(ledger.store.head().position, 2);

    let out = append(c, request(vec![(purchase("a1", "c1", 10), None)])).await;
    assert!(
        matches!(&out[..], [Outcome::Duplicate(d)] if d.position == 1),
        "{out:?}"
    );

    let out = append(c, request(vec![(purchase("a3", "c1", 30), Some(1))])).await;
    assert!(
        matches!(&out[..], [Outcome::VersionConflict(v)] if v.expected == 1 && v.actual == 2),
        "{out:?}"
    );

    let mut bad = purchase("a4", "c1", 30);
    bad.source = String::new();
    let out = append(c, request(vec![(bad, None)])).await;
    assert!(
        matches!(&out[..], [Outcome::Rejected(r)] if r.code == "FIELD_MISSING" && r.field == "source"),
        "{out:?}"
    );

    let out = append(c, b"\x0a\xff garbage".to_vec()).await;
    assert!(
        matches!(&out[..], [Outcome::Rejected(r)] if r.code == "DECODE_FAILED"),
        "{out:?}"
    );
    ledger.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_replay_equals_offline_replay_and_follow_sees_commits() {
    use touchledger_client::{AppendOutcome, ChainCheck, Ledger as Client, ReplayFilter};
    let server = NatsServer::start();
    let ledger = start_ledger(&server).await;
    let client = Client::new(ledger.client.clone(), "crm");

    // A replay nobody serves (a wrong prefix, a ledger still starting) fails at once with a
    // clear error rather than after the request timeout.
    let nobody = Client::new(ledger.client.clone(), "nobody");
    let started = std::time::Instant::now();
    let err = nobody
        .replay(&ReplayFilter::default(), |_| Ok(()))
        .await
        .expect_err("no ledger serves the prefix");
    assert!(err.to_string().contains("no responders"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // 3,000 generated events appended through the client in batches of 250.
    let mut buf = Vec::new();
    let spec = touchledger_cli::generate::GenSpec {
        events: 3000,
        duplicates: 0,
        conflicts: 0,
        invalid: 0,
        customers: 40,
        seed: 11,
        start: "2024-01-01".parse().expect("time"),
    };
    touchledger_cli::generate::generate(&spec, &mut buf).expect("generate");
    let events: Vec<_> = buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| touchledger_domain::json::parse_event(l).expect("valid"))
        .collect();
    // Generated times lie in 2024-2026; the test store's clock is 2026-06-01.
    let events: Vec<_> = events
        .into_iter()
        .filter(|e| e.occurred_at < crate::support::now())
        .collect();
    let mut live = client
        .follow(Some(EventKind::Complaint), None)
        .await
        .expect("follow");
    for chunk in events.chunks(250) {
        let out = client
            .append(chunk.iter().cloned().map(|e| (e, None)).collect())
            .await
            .expect("append");
        assert!(
            out.iter()
                .all(|o| matches!(o, AppendOutcome::Appended { .. })),
            "{out:?}"
        );
    }
    let n = events.len() as u64;
    assert_eq!(ledger.store.head().position, n);

    // Live: the first committed complaint arrives on the follow subscription.
    let first = tokio::time::timeout(Duration::from_secs(10), live.next())
        .await
        .expect("a complaint")
        .expect("item")
        .expect("record");
    assert_eq!(first.event.kind(), EventKind::Complaint);

    let filters = [
        ReplayFilter {
            chunk_size: 97,
            ..Default::default()
        },
        ReplayFilter {
            customer: Some("cust-000007".into()),
            ..Default::default()
        },
        ReplayFilter {
            kind: Some(EventKind::Survey),
            from_position: 200,
            to_position: Some(2500),
            chunk_size: 50,
            ..Default::default()
        },
        ReplayFilter {
            occurred_since: Some("2024-06-01".parse().expect("t")),
            occurred_until: Some("2024-09-01".parse().expect("t")),
            ..Default::default()
        },
    ];
    for f in filters {
        let mut got = Vec::new();
        let mut chain = ChainCheck::default();
        let summary = client
            .replay(&f, |r| {
                assert!(chain.check(&r), "record {} fails its hash", r.position);
                got.push((r.position, r.hash, r.event));
                Ok(())
            })
            .await
            .expect("replay");
        let offline: Vec<_> = ledger
            .store
            .read(&touchledger_store::ReadFilter {
                from_position: f.from_position,
                to_position: f.to_position,
                customer: f.customer.clone(),
                kind: f.kind,
                occurred_since: f.occurred_since,
                occurred_until: f.occurred_until,
            })
            .map(|c| c.expect("read"))
            .map(|c| (c.position, c.hash.0, c.event))
            .collect();
        assert!(
            !offline.is_empty(),
            "{f:?} selects nothing: the comparison would prove nothing"
        );
        assert_eq!(got, offline, "{f:?}");
        assert_eq!(summary.count, offline.len() as u64);
        assert_eq!(summary.head_position, n);
    }
    ledger.stop().await;
}

fn cli(args: Vec<String>) -> (i32, String, String) {
    // The CLI builds its own runtime, so it runs on a plain thread.
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut argv = vec!["touchledger".to_owned()];
        argv.extend(args);
        let code = touchledger_cli::run(argv, &mut out, &mut err);
        (
            code,
            String::from_utf8(out).expect("utf8"),
            String::from_utf8(err).expect("utf8"),
        )
    })
    .join()
    .expect("cli thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_publish_is_reflected_exactly_by_remote_replay_and_verify() {
    let server = NatsServer::start();
    let ledger = start_ledger(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir
        .path()
        .join("events.jsonl")
        .to_str()
        .expect("utf8")
        .to_owned();
    let (code, _, err) = cli([
        "generate",
        "--out",
        &file,
        "--events",
        "2000",
        "--duplicates",
        "20",
        "--conflicts",
        "5",
        "--invalid",
        "10",
        "--start",
        "2024-01-01",
        "--seed",
        "3",
    ]
    .map(String::from)
    .to_vec());
    assert_eq!(code, 0, "{err}");
    let mut dead = ledger
        .client
        .subscribe("crm.deadletter.>")
        .await
        .expect("subscribe");
    ledger.client.flush().await.expect("flush");

    let (code, out, err) = cli(vec![
        "publish".into(),
        "--nats-url".into(),
        server.url(),
        "--file".into(),
        file.clone(),
        "--json".into(),
    ]);
    // Two invalid lines in ten do not parse (not JSON; no payload): rejected locally (exit 4)
    // and never published.
    assert_eq!(code, touchledger_cli::EXIT_REJECTED, "{out}{err}");
    let s: touchledger_cli::remote::PublishSummary = serde_json::from_str(&out).expect("summary");
    assert_eq!(s.read, 2035);
    assert_eq!(s.rejected_by_code.get("DECODE_FAILED"), Some(&1));
    assert_eq!(s.rejected_by_code.get("PAYLOAD_MISSING"), Some(&1));
    assert_eq!(s.acked + s.duplicate, 2033);

    ledger.wait_head(2000, Duration::from_secs(60)).await;
    // Conflicts (5) and the other invalid lines (8) are the ledger's to reject.
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        while codes.values().sum::<u64>() < 13 {
            let m = dead.next().await.expect("dead letter");
            let code = m
                .headers
                .as_ref()
                .and_then(|h| h.get(headers::REJECT_CODE))
                .expect("code")
                .to_string();
            *codes.entry(code).or_default() += 1;
        }
    })
    .await;
    assert!(r.is_ok(), "dead letters: {codes:?}");
    assert_eq!(codes.get("EVENT_ID_CONFLICT"), Some(&5));
    assert_eq!(ledger.store.head().position, 2000, "duplicates were stored");

    let (code, out, err) = cli(vec![
        "replay".into(),
        "--remote".into(),
        "--nats-url".into(),
        server.url(),
    ]);
    assert_eq!(code, 0, "{err}");
    let remote: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let offline: Vec<_> = ledger
        .store
        .read(&Default::default())
        .map(|c| c.expect("read"))
        .collect();
    assert_eq!(remote.len(), offline.len());
    for (r, c) in remote.iter().zip(&offline) {
        assert_eq!(r["position"], c.position);
        assert_eq!(r["hash"], c.hash.to_hex());
        assert_eq!(r["prev_hash"], c.prev_hash.to_hex());
        assert_eq!(r["event"], serde_json::to_value(&c.event).expect("json"));
    }
    assert!(ledger.store.verify().expect("verify").is_ok());
    ledger.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_refuses_a_stream_that_does_not_continue_the_store() {
    let server = NatsServer::start();
    let ledger = start_ledger(&server).await;
    let out = append(
        &ledger.client,
        request(vec![
            (purchase("f1", "c1", 1), None),
            (purchase("f2", "c1", 2), None),
        ]),
    )
    .await;
    assert_eq!(out.len(), 2);
    let js = jetstream::new(ledger.client.clone());
    // Wait for the feed to publish both, then stop the ledger.
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        let mut feed = js.get_stream("CRM_LEDGER_EVENTS").await.expect("feed");
        while feed.info().await.expect("info").state.last_sequence < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(r.is_ok(), "feed did not publish");
    let Ledger {
        store,
        shutdown,
        task,
        client: _,
        _dir,
    } = ledger;
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");

    // Someone else writes into the feed subjects while the ledger is down. (The ledger drained
    // its connection on the way out: use new ones.)
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    js.publish("crm.ledger.event.purchase.intruder", "not a record".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let restarted = touchledger_bus::run_ledger(
        client,
        store,
        BusConfig::default(),
        CancellationToken::new(),
    );
    let err = tokio::time::timeout(Duration::from_secs(10), restarted)
        .await
        .expect("the ledger must stop, not hang")
        .expect_err("the ledger must refuse the feed stream");
    assert!(
        matches!(err, touchledger_bus::BusError::FeedMismatch { .. }),
        "{err}"
    );
}

/// The ledger's own events, forged by an outside publisher: `source = "ledger"` and a derived
/// kind, otherwise valid (issue #17).
fn forgeries(tag: &str) -> Vec<touchledger_domain::Event> {
    let model = format!(
        r#"{{"event_id":"forged-model-{tag}","customer_id":"_model","occurred_at":"2026-01-01T00:00:00Z","source":"ledger","schema_version":1,
        "model_fitted":{{"model":"bgnbd","model_version":"forged","r":0.24,"alpha":4.4,"a":0.79,"b":2.4,"log_likelihood":-9582.4,"customers":2357,"time_unit":"weeks","calibration_end":"1997-09-30"}}}}"#
    );
    let churn = format!(
        r#"{{"event_id":"forged-churn-{tag}","customer_id":"c1","occurred_at":"2026-01-01T00:00:00Z","source":"ledger","schema_version":1,
        "churn_risk_assessed":{{"level":"lost","previous_level":"none","score":0.99,"value_at_risk_minor":100,"currency":"EUR","model_version":"forged","as_of":"2026-01-01T00:00:00Z"}}}}"#
    );
    [model, churn]
        .iter()
        .map(|j| touchledger_domain::json::parse_event(j.as_bytes()).expect("forgery decodes"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_ledger_events_are_refused_on_every_path() {
    use touchledger_domain::RejectCode;
    let server = NatsServer::start();
    let ledger = start_ledger(&server).await;
    let js = jetstream::new(ledger.client.clone());

    // Synchronous append.
    let out = append(
        &ledger.client,
        request(forgeries("sync").into_iter().map(|e| (e, None)).collect()),
    )
    .await;
    assert_eq!(out.len(), 2);
    for o in &out {
        match o {
            v1::append_outcome::Outcome::Rejected(r) => {
                assert_eq!(r.code, "SOURCE_RESERVED", "{r:?}")
            }
            other => panic!("a forgery was not refused: {other:?}"),
        }
    }
    // JetStream intake: forgeries first, then one real event to know when they were processed.
    for e in forgeries("intake") {
        js.publish(
            format!("crm.touchpoint.{}.{}", e.kind().as_str(), e.customer_id),
            encode_event(&e).into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    }
    let real = purchase("real-1", "c1", 100);
    js.publish("crm.touchpoint.purchase.c1", encode_event(&real).into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    ledger.wait_head(1, Duration::from_secs(20)).await;
    let stored: Vec<_> = ledger
        .store
        .read(&touchledger_store::ReadFilter::default())
        .map(|c| c.expect("read").event.event_id)
        .collect();
    assert_eq!(stored, ["real-1"], "only the real event is stored");
    let codes: Vec<RejectCode> = ledger
        .store
        .rejections()
        .map(|r| r.expect("rejection").rejection.code)
        .collect();
    assert_eq!(
        codes,
        [RejectCode::SourceReserved; 4],
        "two sync + two intake rejections, each recorded once"
    );
    ledger.stop().await;

    // The offline append of a file.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("forged.jsonl");
    let lines: Vec<String> = forgeries("file")
        .iter()
        .map(|e| serde_json::to_string(e).expect("json"))
        .collect();
    std::fs::write(&file, lines.join("\n")).expect("write");
    let data = dir.path().join("ledger");
    let (code, out, err) = cli(vec![
        "append".into(),
        "--data".into(),
        data.display().to_string(),
        "--file".into(),
        file.display().to_string(),
    ]);
    assert_eq!(code, touchledger_cli::EXIT_REJECTED, "{out}{err}");
    assert!(
        out.contains("SOURCE_RESERVED") && out.contains("appended          0"),
        "{out}"
    );
}

/// A producer that sets publish preconditions (`Nats-Expected-Stream`, as nats-py does for a
/// named stream) used to put every malformed message of it into an endless loop: the headers
/// were copied to the dead-letter publish, which always failed. Now the message is dead-lettered
/// once with the headers kept under another name, terminated, and recorded once; a retraction
/// retried until its attempts run out is also recorded once (issue #17).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_with_publish_preconditions_is_dead_lettered_once() {
    use async_nats::HeaderMap;
    let server = NatsServer::start();
    let ledger = start_ledger(&server).await;
    let js = jetstream::new(ledger.client.clone());
    let mut dead = ledger
        .client
        .subscribe("crm.deadletter.>")
        .await
        .expect("subscribe");
    ledger.client.flush().await.expect("flush");

    let mut h = HeaderMap::new();
    h.insert("Nats-Expected-Stream", "CRM_TOUCHPOINTS");
    h.insert("Nats-Msg-Id", "poison-1");
    js.send_publish(
        "crm.touchpoint.purchase.c1",
        PublishMessage::build()
            .payload(b"\xff\x00not protobuf".to_vec().into())
            .headers(h),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    let m = tokio::time::timeout(Duration::from_secs(20), dead.next())
        .await
        .expect("a dead letter within 20 s")
        .expect("message");
    let hs = m.headers.expect("headers");
    assert_eq!(
        hs.get("Touchledger-Original-Nats-Expected-Stream")
            .map(|v| v.as_str()),
        Some("CRM_TOUCHPOINTS")
    );
    assert!(hs.get("Nats-Expected-Stream").is_none());

    // A retraction of an unknown event: retried, then dead-lettered; one record.
    let mut r = purchase("retract-1", "c1", 0);
    r.payload = Payload::Retraction(touchledger_domain::Retraction {
        retracted_event_id: "never-stored".into(),
        reason: String::new(),
    });
    js.publish("crm.touchpoint.retraction.c1", encode_event(&r).into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let m = tokio::time::timeout(Duration::from_secs(60), dead.next())
        .await
        .expect("the retraction dead-lettered within 60 s")
        .expect("message");
    assert!(
        m.subject.ends_with("RETRACTION_TARGET_UNKNOWN"),
        "{}",
        m.subject
    );

    // Both are terminated: nothing pending, nothing redelivered.
    let mut intake = js.get_stream("CRM_TOUCHPOINTS").await.expect("intake");
    let mut c: jetstream::consumer::PullConsumer = intake
        .get_consumer("touchledger-ledger")
        .await
        .expect("consumer");
    let info = c.info().await.expect("info");
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{info:?}");
    let _ = &mut intake;
    let codes: Vec<String> = ledger
        .store
        .rejections()
        .map(|r| r.expect("rejection").rejection.code.as_str().to_owned())
        .collect();
    assert_eq!(codes, ["DECODE_FAILED", "RETRACTION_TARGET_UNKNOWN"]);
    ledger.stop().await;
}
