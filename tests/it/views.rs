//! Read models through NATS (issue 4, "publishing touchpoints for a customer changes its three
//! read models and raises a churn alert with reasons and a probable cause"): a real
//! `nats-server`, the ledger service and the read-model service in-process on a real sled
//! directory, touchpoints published to JetStream, views and alerts received on their subjects,
//! queries answered, and a time-driven escalation found by the assessor's due-time sweep.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use touchledger_bus::{BusConfig, ViewConfig};
use touchledger_domain::{
    Callback, CallbackOutcome, CallbackPurpose, Complaint, ComplaintCategory, Event, EventKind,
    Payload, Timestamp,
};
use touchledger_proto::v1;
use touchledger_store::{EventStore, ReadFilter};
use touchledger_testkit::NatsServer;

use crate::support::{fixed_clock_store, purchase};

fn at(s: &str) -> Timestamp {
    s.parse().expect("time")
}

fn complaint(id: &str, when: &str, severity: u32) -> Event {
    let mut e = purchase(id, "alice", 0);
    e.occurred_at = at(when);
    e.payload = Payload::Complaint(Complaint {
        complaint_id: id.into(),
        category: ComplaintCategory::Delivery,
        severity,
        channel: None,
        text: "late again".into(),
    });
    e
}

fn resolved(id: &str, when: &str, complaint: &str) -> Event {
    let mut e = purchase(id, "alice", 0);
    e.occurred_at = at(when);
    e.payload = Payload::Callback(Callback {
        callback_id: id.into(),
        purpose: CallbackPurpose::ComplaintFollowUp,
        related_complaint_id: Some(complaint.into()),
        outcome: CallbackOutcome::ComplaintResolved,
        resolution_satisfaction: Some(5),
        leaving_reason: None,
        note: String::new(),
    });
    e
}

/// Receive messages until one satisfies `pred`; returns it.
async fn until<T: Message + Default>(
    sub: &mut async_nats::Subscriber,
    what: &str,
    pred: impl Fn(&T) -> bool,
) -> T {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let m = sub.next().await.expect("subscription open");
            let v = T::decode(m.payload.as_ref()).expect("decodes");
            if pred(&v) {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within 20 s"))
}

fn assessed(e: &v1::Envelope) -> v1::ChurnRiskAssessed {
    match &e.payload {
        Some(v1::envelope::Payload::ChurnRiskAssessed(c)) => c.clone(),
        other => panic!("alert is not a ChurnRiskAssessed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touchpoints_update_the_three_read_models_and_raise_churn_alerts() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(fixed_clock_store(dir.path()));
    let client = async_nats::connect(server.url()).await.expect("connect");
    let shutdown = CancellationToken::new();
    // The service clock is ours to move.
    let now = Arc::new(AtomicI64::new(at("2026-05-20T12:00:00Z").unix_nanos()));
    let clock = now.clone();
    let cfg = ViewConfig {
        sweep_interval: Duration::from_millis(100),
        refit_every: None,
        clock: Arc::new(move || Timestamp::from_unix_nanos(clock.load(Ordering::SeqCst))),
        ..ViewConfig::default()
    };
    let ledger = tokio::spawn(touchledger_bus::run_ledger(
        client.clone(),
        store.clone(),
        BusConfig {
            fetch_wait: Duration::from_millis(20),
            ..BusConfig::default()
        },
        shutdown.clone(),
    ));
    let views = tokio::spawn(touchledger_bus::run_views(
        client.clone(),
        store.clone(),
        cfg,
        shutdown.clone(),
    ));
    let mut alerts = client
        .subscribe("crm.alert.churn.alice")
        .await
        .expect("sub");
    let mut sat_views = client
        .subscribe("crm.view.satisfaction.alice")
        .await
        .expect("sub");
    let mut loy_views = client
        .subscribe("crm.view.loyalty.alice")
        .await
        .expect("sub");
    let mut churn_views = client.subscribe("crm.view.churn.alice").await.expect("sub");
    client.flush().await.expect("flush");

    // Two purchases, then four complaints in three weeks, each resolved the next day.
    let publisher = touchledger_client::Ledger::new(client.clone(), "crm");
    let mut events = Vec::new();
    for (i, d) in ["2026-05-01", "2026-05-10"].iter().enumerate() {
        let mut p = purchase(&format!("buy-{i}"), "alice", 2500);
        p.occurred_at = at(&format!("{d}T10:00:00Z"));
        events.push(p);
    }
    for (i, d) in ["02", "04", "06", "08"].iter().enumerate() {
        events.push(complaint(
            &format!("k{i}"),
            &format!("2026-05-{d}T10:00:00Z"),
            2,
        ));
        events.push(resolved(
            &format!("cb{i}"),
            &format!("2026-05-{d}T20:00:00Z"),
            &format!("k{i}"),
        ));
    }
    for e in &events {
        // Wait for JetStream's ack before the next one.
        let ack_wait = tokio::time::timeout(Duration::from_secs(10), publisher.publish(e));
        ack_wait.await.expect("publish in time").expect("published");
    }

    // The churn alert: none → … → warning, with reasons and the probable cause.
    let warning = until::<v1::Envelope>(&mut alerts, "warning alert", |e| {
        assessed(e).level == v1::ChurnLevel::Warning as i32
    })
    .await;
    let w = assessed(&warning);
    assert_eq!(warning.customer_id, "alice");
    assert_eq!(warning.source, "ledger");
    assert!(
        w.reasons
            .iter()
            .any(|r| r.code == "COMPLAINT_BURDEN" && r.level == v1::ChurnLevel::Warning as i32),
        "{w:?}"
    );
    assert_eq!(w.probable_cause, v1::LeavingReason::Disappointment as i32);
    assert_eq!(w.model_version, "none");
    assert!(w.previous_level < w.level);

    // The three read models were published.
    let s = until::<v1::SatisfactionView>(&mut sat_views, "satisfaction view", |v| {
        v.complaints_resolved == 4
    })
    .await;
    assert_eq!(
        (
            s.complaints_total,
            s.complaints_open,
            s.complaints_recovered
        ),
        (4, 0, 4)
    );
    let l =
        until::<v1::LoyaltyView>(&mut loy_views, "loyalty view", |v| v.purchase_days == 2).await;
    assert_eq!(l.dick_basu, "unknown");
    assert_eq!(l.stage, "formation");
    let c = until::<v1::ChurnView>(&mut churn_views, "churn view", |v| {
        v.level == v1::ChurnLevel::Warning as i32
    })
    .await;
    assert_eq!(c.probable_cause, v1::LeavingReason::Disappointment as i32);

    // Queries by request/reply.
    let ask = |model: &'static str, customer: &'static str| {
        let client = client.clone();
        async move {
            let req = v1::QueryRequest {
                customer_id: customer.into(),
                as_of: None,
                axis: v1::Axis::Business as i32,
            };
            let reply = client
                .request(format!("crm.query.{model}"), req.encode_to_vec().into())
                .await
                .expect("reply");
            v1::QueryReply::decode(reply.payload.as_ref()).expect("decodes")
        }
    };
    match ask("churn", "alice").await.result {
        Some(v1::query_reply::Result::Churn(v)) => {
            assert_eq!(v.level, v1::ChurnLevel::Warning as i32)
        }
        other => panic!("{other:?}"),
    }
    match ask("churn", "nobody").await.result {
        Some(v1::query_reply::Result::Error(e)) => assert_eq!(e.code, "NOT_FOUND"),
        other => panic!("{other:?}"),
    }
    match ask("population", "").await.result {
        Some(v1::query_reply::Result::Population(p)) => {
            assert_eq!(p.customers, 1);
            assert!(
                p.churn_levels
                    .iter()
                    .any(|c| c.key == "warning" && c.count == 1),
                "{p:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    match ask("nonsense", "alice").await.result {
        Some(v1::query_reply::Result::Error(e)) => assert_eq!(e.code, "UNKNOWN_MODEL"),
        other => panic!("{other:?}"),
    }

    // A severe complaint left open: nothing changes until its 72 h SLA expires; then the
    // assessor's sweep (due-time index, no new event) escalates to critical.
    let open = complaint("k-open", "2026-05-19T10:00:00Z", 5);
    publisher.publish(&open).await.expect("published");
    until::<v1::SatisfactionView>(&mut sat_views, "open complaint", |v| v.complaints_open == 1)
        .await;
    now.store(at("2026-05-22T10:00:01Z").unix_nanos(), Ordering::SeqCst);
    let critical = until::<v1::Envelope>(&mut alerts, "critical alert", |e| {
        assessed(e).level == v1::ChurnLevel::Critical as i32
    })
    .await;
    let cr = assessed(&critical);
    assert_eq!(cr.previous_level, v1::ChurnLevel::Warning as i32);
    assert!(
        cr.reasons
            .iter()
            .any(|r| r.code == "COMPLAINT_BURDEN" && r.level == v1::ChurnLevel::Critical as i32)
    );

    // Every alert is in the ledger as a ChurnRiskAssessed event, chained from → to.
    shutdown.cancel();
    views.await.expect("join").expect("views ran cleanly");
    ledger.await.expect("join").expect("ledger ran cleanly");
    let recorded: Vec<_> = store
        .read(&ReadFilter {
            kind: Some(EventKind::ChurnRiskAssessed),
            customer: Some("alice".into()),
            ..Default::default()
        })
        .collect::<Result<_, _>>()
        .expect("read");
    let levels: Vec<_> = recorded
        .iter()
        .map(|c| match &c.event.payload {
            Payload::ChurnRiskAssessed(a) => (a.previous_level, a.level),
            _ => unreachable!(),
        })
        .collect();
    assert!(levels.len() >= 2, "{levels:?}");
    for w in levels.windows(2) {
        assert_eq!(w[0].1, w[1].0, "levels chain: {levels:?}");
    }
    assert_eq!(
        levels.last().map(|l| l.1),
        Some(touchledger_domain::ChurnLevel::Critical)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_projectors_follow_the_feed_and_equal_a_rebuild() {
    use touchledger_projector::{ALL, Opened, Projector};
    use touchledger_store::ProjectionDb;

    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(crate::projector::populated_store(dir.path(), 1500));
    let head = store.head().position;
    let client = async_nats::connect(server.url()).await.expect("connect");
    let shutdown = CancellationToken::new();
    let ledger = tokio::spawn(touchledger_bus::run_ledger(
        client.clone(),
        store.clone(),
        BusConfig::default(),
        shutdown.clone(),
    ));
    let remote_dir = tempfile::tempdir().expect("tmp");
    let js = async_nats::jetstream::new(client.clone());
    // Wait for the feed stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while js.get_stream("CRM_LEDGER_EVENTS").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no feed stream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Run the remote projectors twice: stopped half-way, then resumed from their checkpoints.
    for (round, stop_at) in [(0, head / 2), (1, head)] {
        let db = ProjectionDb::open(remote_dir.path()).expect("db");
        let mut ps = Vec::new();
        for s in ALL {
            let (p, opened) =
                Projector::open(s, db.projection(s.name).expect("tree")).expect("open");
            if round == 1 {
                assert!(
                    matches!(opened, Opened::Resumed { checkpoint } if checkpoint > 0),
                    "{opened:?}"
                );
            }
            ps.push(p);
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let stop = CancellationToken::new();
        let task = tokio::spawn(touchledger_bus::run_remote_projectors(
            js.clone(),
            touchledger_bus::Subjects::new("crm"),
            ps,
            200,
            Some(tx),
            stop.clone(),
        ));
        let mut reached = std::collections::BTreeMap::new();
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(c) = rx.recv().await {
                reached.insert(c.projection, c.checkpoint);
                if reached.len() == 3 && reached.values().all(|c| *c >= stop_at) {
                    break;
                }
            }
        })
        .await
        .expect("remote projectors reached the target");
        stop.cancel();
        drop(rx);
        task.await
            .expect("join")
            .expect("remote projectors ran cleanly");
        drop(db);
    }
    let db = ProjectionDb::open(remote_dir.path()).expect("db");
    let (_d, reference) = crate::projector::fresh_rebuild(&store, head);
    for r in &reference {
        let remote = db.projection(r.spec().name).expect("tree");
        assert_eq!(
            crate::projector::snapshot(&remote),
            crate::projector::snapshot(r.tree()),
            "{}",
            r.spec().name
        );
    }
    shutdown.cancel();
    ledger.await.expect("join").expect("ledger ran cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_refit_and_evaluation_over_nats_are_recorded_and_used() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tmp");
    // The CDNOW sample, imported offline before the ledger starts.
    let data = dir.path().to_str().expect("utf8").to_owned();
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/data/cdnow/CDNOW_sample.txt");
    assert_eq!(
        crate::cli::cli(&["import", "cdnow", "--data", &data, "--file", sample]).0,
        0
    );
    let store = Arc::new(fixed_clock_store(dir.path()));
    let client = async_nats::connect(server.url()).await.expect("connect");
    let shutdown = CancellationToken::new();
    let now = crate::support::now();
    let tasks = vec![
        tokio::spawn(touchledger_bus::run_ledger(
            client.clone(),
            store.clone(),
            BusConfig::default(),
            shutdown.clone(),
        )),
        tokio::spawn(touchledger_bus::run_views(
            client.clone(),
            store.clone(),
            ViewConfig {
                refit_every: None,
                clock: Arc::new(move || now),
                ..ViewConfig::default()
            },
            shutdown.clone(),
        )),
    ];
    // The CLI, as an operator would run it while the ledger holds the data directory (in a
    // thread of its own: it builds its own runtime).
    let url = server.url();
    let cli = std::thread::spawn(move || {
        crate::cli::cli(&[
            "fit",
            "--remote",
            "--nats-url",
            &url,
            "--as-of",
            "1997-09-30",
            "--unit",
            "weeks",
        ])
    });
    let (code, out, err) = tokio::task::spawn_blocking(move || cli.join().expect("cli thread"))
        .await
        .expect("join");
    assert_eq!(code, 0, "{out}{err}");
    // The published values (FHL 2005): r = 0.2426, b = 2.4258; the optimiser stops within
    // 1e-4 of them.
    let param = |name: &str| crate::cli::printed(&out, name);
    assert!((param("r") - 0.2426).abs() <= 1e-4, "{out}");
    assert!((param("b") - 2.4258).abs() <= 1e-4, "{out}");
    let position: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("recorded as ModelFitted at position "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no position in {out}"));
    let version = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("model_version  = "))
        .expect("version line")
        .to_owned();
    let stored = store.get(position).expect("read").expect("stored");
    assert_eq!(stored.event.kind(), EventKind::ModelFitted);
    assert_eq!(stored.event.source, "ledger");
    // A dry run records nothing; a repeat is a duplicate of the same position.
    let as_of = Some(touchledger_proto::to_pb_time(at("1997-09-30")));
    let req = v1::FitRequest {
        as_of,
        unit: v1::TimeUnit::Weeks as i32,
        dry_run: true,
        model: String::new(),
    };
    let reply = client
        .request("crm.model.fit", req.encode_to_vec().into())
        .await
        .expect("reply");
    let reply = v1::FitReply::decode(reply.payload.as_ref()).expect("decodes");
    assert_eq!(
        (reply.position, reply.duplicate, reply.error),
        (0, false, None)
    );
    let req = v1::FitRequest {
        dry_run: false,
        ..req
    };
    let reply = client
        .request("crm.model.fit", req.encode_to_vec().into())
        .await
        .expect("reply");
    let reply = v1::FitReply::decode(reply.payload.as_ref()).expect("decodes");
    assert!(reply.duplicate && reply.position == position, "{reply:?}");
    // Churn reads at the calibration end name the new model once it is folded (the projector
    // follows the head; a short bounded retry).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let q = v1::QueryRequest {
            customer_id: "cdnow-1".into(),
            as_of,
            axis: v1::Axis::Business as i32,
        };
        let r = client
            .request("crm.query.churn", q.encode_to_vec().into())
            .await
            .expect("reply");
        match v1::QueryReply::decode(r.payload.as_ref())
            .expect("decodes")
            .result
        {
            Some(v1::query_reply::Result::Churn(v)) if v.model_version == version => {
                assert!(v.p_active.is_some(), "{v:?}");
                break;
            }
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "model never used: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // The evaluation over NATS (`evaluate --remote`, `<prefix>.model.evaluate`) is the
    // evaluation of the same projections in this process, figure for figure.
    let remote = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "evaluate",
            "--remote",
            "--nats-url",
            &server.url(),
            "--calibration-end",
            "1997-09-30",
        ]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect();
        if !extra.contains(&"--holdout-end") {
            args.extend(["--holdout-end".into(), "1998-06-30".into()]);
        }
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::cli::cli(&args)
        })
    };
    let join = |t: std::thread::JoinHandle<(i32, String, String)>| async move {
        tokio::task::spawn_blocking(move || t.join().expect("cli thread"))
            .await
            .expect("join")
    };
    let (code, out, err) = join(remote(&["--json"])).await;
    assert_eq!(code, 0, "{out}{err}");
    let over_nats: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let reads = touchledger_projector::ReadModels::open(&store, Default::default()).expect("reads");
    let here = touchledger_projector::evaluate::evaluate(
        &reads,
        at("1997-09-30"),
        at("1998-06-30"),
        touchledger_domain::TimeUnit::Weeks,
    )
    .expect("evaluate");
    assert_eq!(over_nats, serde_json::to_value(&here).expect("JSON"));
    assert_eq!(over_nats["evaluation"]["holdout_actual"], 1882);
    // Recorded when asked, once: a repeat is the same record.
    let (code, out, err) = join(remote(&["--record"])).await;
    assert_eq!(code, 0, "{out}{err}");
    let position: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("recorded as ModelEvaluated at position "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no position in {out}"));
    assert_eq!(
        store
            .get(position)
            .expect("read")
            .expect("stored")
            .event
            .kind(),
        EventKind::ModelEvaluated
    );
    let (code, out, _) = join(remote(&["--record"])).await;
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("already recorded at position {position}")),
        "{out}"
    );
    // A holdout that has not ended is refused with the reason, as offline.
    let (code, out, _) = join(remote(&["--holdout-end", "2261-01-01"])).await;
    assert_ne!(code, 0);
    assert!(out.contains("has not passed"), "{out}");
    shutdown.cancel();
    for t in tasks {
        t.await.expect("join").expect("clean");
    }
}
