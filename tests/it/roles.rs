//! NATS roles (issue #17): a real nats-server with `deploy/nats/roles.conf` exactly as shipped,
//! `touchledger serve` as the `ledger` user, and each other role doing its job and being
//! refused the rest. A refusal is the server's "Permissions Violation" error, awaited on the
//! client's event channel (no sleeps); the ledger itself must cause none.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use prost::Message;
use tokio::sync::mpsc;
use touchledger_client::{Ledger, ReplayFilter};
use touchledger_proto::{encode_event, v1};
use touchledger_testkit::{NatsServer, free_port};

use crate::service_crash::CHILD_ENV;
use crate::support::purchase;

const PASSWORDS: [(&str, &str); 4] = [
    ("TOUCHLEDGER_LEDGER_PASSWORD", "l-pw"),
    ("TOUCHLEDGER_PUBLISHER_PASSWORD", "p-pw"),
    ("TOUCHLEDGER_DASHBOARD_PASSWORD", "d-pw"),
    ("TOUCHLEDGER_AUDITOR_PASSWORD", "a-pw"),
];

/// A connection as `user`, with the server's errors (permission violations) on a channel.
async fn connect_as(
    server: &NatsServer,
    user: &str,
    password: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = e {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(server.url())
        .await
        .expect("connect");
    (client, rx)
}

/// The next server error must be a permissions violation naming `subject`.
async fn refused(errors: &mut mpsc::UnboundedReceiver<String>, subject: &str) {
    let e = tokio::time::timeout(Duration::from_secs(10), errors.recv())
        .await
        .unwrap_or_else(|_| panic!("{subject}: no refusal within 10 s"))
        .expect("error channel");
    assert!(
        e.to_lowercase().contains("permissions violation") && e.contains(subject),
        "{subject}: {e}"
    );
}

/// serve as the `ledger` user, its credentials inside the URL (`nats://ledger:l-pw@…`).
fn spawn_serve(data: &std::path::Path, url: &str) -> Child {
    spawn_serve_with(data, url, &[])
}

fn spawn_serve_with(data: &std::path::Path, url: &str, extra: &[&str]) -> Child {
    let http = format!("127.0.0.1:{}", free_port());
    let url = url.replacen("nats://", "nats://ledger:l-pw@", 1);
    let mut args = vec![
        "--data",
        data.to_str().expect("utf8"),
        "--nats-url",
        &url,
        "--fetch-wait-ms",
        "20",
        "--http-addr",
        &http,
    ];
    args.extend_from_slice(extra);
    let args = args.join("\u{1f}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_does_its_job_and_is_refused_the_rest() {
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/roles.conf");
    let server = NatsServer::start_with_config(&conf, &PASSWORDS);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut serve = spawn_serve(&dir.path().join("ledger"), &server.url());

    // Publisher: a touchpoint through JetStream (waiting until the ledger made its streams),
    // then a synchronous append.
    let (publisher, mut publisher_errors) = connect_as(&server, "publisher", "p-pw").await;
    let js = jetstream::new(publisher.clone());
    let e = purchase("roles-1", "c1", 1299);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let sent = js
            .publish("crm.touchpoint.purchase.c1", encode_event(&e).into())
            .await
            .expect("publish");
        match tokio::time::timeout(Duration::from_secs(2), sent).await {
            Ok(Ok(_)) => break,
            _ if tokio::time::Instant::now() < deadline => {}
            other => panic!("the touchpoint was never acknowledged: {other:?}"),
        }
    }
    let ledger = Ledger::new(publisher.clone(), "crm");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let appended = loop {
        match ledger
            .append(vec![(purchase("roles-2", "c1", 500), None)])
            .await
        {
            Ok(o) => break o,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("synchronous append as publisher: {e}"),
        }
    };
    assert!(
        matches!(
            appended[0],
            touchledger_client::AppendOutcome::Appended { .. }
                | touchledger_client::AppendOutcome::Duplicate { .. }
        ),
        "{appended:?}"
    );
    for subject in [
        "crm.ledger.event.purchase.c1",
        "crm.view.churn.c1",
        "crm.alert.churn.c1",
    ] {
        publisher
            .publish(subject, "forged".into())
            .await
            .expect("publish");
        publisher.flush().await.expect("flush");
        refused(&mut publisher_errors, subject).await;
    }
    let _sub = publisher.subscribe("crm.view.>").await.expect("subscribe");
    refused(&mut publisher_errors, "crm.view.>").await;

    // Auditor: replays the history (both events, once the intake stored the first).
    let (auditor, mut auditor_errors) = connect_as(&server, "auditor", "a-pw").await;
    let audit = Ledger::new(auditor.clone(), "crm");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut ids = Vec::new();
        audit
            .replay(&ReplayFilter::default(), |r| {
                ids.push(r.event.event_id.clone());
                Ok(())
            })
            .await
            .expect("replay as auditor");
        if ids.len() == 2 {
            ids.sort();
            assert_eq!(ids, ["roles-1", "roles-2"]);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "replay saw {ids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    auditor
        .publish("crm.touchpoint.purchase.c9", "x".into())
        .await
        .expect("publish");
    auditor.flush().await.expect("flush");
    refused(&mut auditor_errors, "crm.touchpoint.purchase.c9").await;
    auditor
        .publish("crm.ledger.append", "x".into())
        .await
        .expect("publish");
    auditor.flush().await.expect("flush");
    refused(&mut auditor_errors, "crm.ledger.append").await;

    // Dashboard: a query, alerts and views; no touchpoints, no appends.
    let (dashboard, mut dashboard_errors) = connect_as(&server, "dashboard", "d-pw").await;
    let _views = dashboard.subscribe("crm.view.>").await.expect("subscribe");
    let _alerts = dashboard.subscribe("crm.alert.>").await.expect("subscribe");
    let req = v1::QueryRequest {
        customer_id: "c1".into(),
        ..Default::default()
    };
    let reply = dashboard
        .request("crm.query.loyalty", req.encode_to_vec().into())
        .await
        .expect("query as dashboard");
    let reply = v1::QueryReply::decode(reply.payload.as_ref()).expect("reply");
    assert!(
        matches!(reply.result, Some(v1::query_reply::Result::Loyalty(_))),
        "{reply:?}"
    );
    dashboard
        .publish("crm.touchpoint.purchase.c1", "x".into())
        .await
        .expect("publish");
    dashboard.flush().await.expect("flush");
    refused(&mut dashboard_errors, "crm.touchpoint.purchase.c1").await;
    let _sub = dashboard
        .subscribe("crm.ledger.event.>")
        .await
        .expect("subscribe");
    refused(&mut dashboard_errors, "crm.ledger.event.>").await;

    // A wrong password in the URL fails with an error that never shows it.
    let wrong = server
        .url()
        .replacen("nats://", "nats://auditor:wr0ng-s3cret@", 1);
    let (code, out, err) = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = touchledger_cli::run(
            [
                "touchledger",
                "replay",
                "--remote",
                "--nats-url",
                wrong.as_str(),
            ],
            &mut out,
            &mut err,
        );
        (
            code,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    })
    .join()
    .expect("cli thread");
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        !err.contains("wr0ng-s3cret") && !out.contains("wr0ng-s3cret"),
        "{err}"
    );
    assert!(err.contains("***@"), "the URL is shown redacted: {err}");

    // The ledger itself ran on its grants alone: the server logged no violation for it.
    stopped_without_violations(&mut serve, &server);
}

/// A partitioned ledger on the same grants: `serve --partitions 2` as the `ledger` user takes
/// its partition leases, stores a publisher's touchpoints, and answers a dashboard's queries
/// through the router (forwarded to the customer's partition, merged across both), with no
/// violation logged for the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_ledger_runs_and_answers_dashboards_on_the_same_roles() {
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/roles.conf");
    let server = NatsServer::start_with_config(&conf, &PASSWORDS);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut serve = spawn_serve_with(
        &dir.path().join("ledger"),
        &server.url(),
        &["--partitions", "2"],
    );
    let (publisher, _) = connect_as(&server, "publisher", "p-pw").await;
    let js = jetstream::new(publisher.clone());
    let customers = ["c1", "c2", "c3", "c4"];
    for (i, c) in customers.iter().enumerate() {
        let e = purchase(&format!("roles-p{i}"), c, 100 + i as i64);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let sent = js
                .publish(
                    format!("crm.touchpoint.purchase.{c}"),
                    encode_event(&e).into(),
                )
                .await
                .expect("publish");
            match tokio::time::timeout(Duration::from_secs(2), sent).await {
                Ok(Ok(_)) => break,
                _ if tokio::time::Instant::now() < deadline => {}
                other => panic!("the touchpoint was never acknowledged: {other:?}"),
            }
        }
    }
    let (dashboard, _) = connect_as(&server, "dashboard", "d-pw").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let reply = dashboard
            .request(
                "crm.query.population",
                v1::QueryRequest::default().encode_to_vec().into(),
            )
            .await
            .expect("population as dashboard");
        let reply = v1::QueryReply::decode(reply.payload.as_ref()).expect("reply");
        if let Some(v1::query_reply::Result::Population(p)) = &reply.result
            && p.customers == customers.len() as u64
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "population never counted every customer: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in customers {
        let req = v1::QueryRequest {
            customer_id: c.into(),
            ..Default::default()
        };
        let reply = dashboard
            .request("crm.query.loyalty", req.encode_to_vec().into())
            .await
            .expect("query as dashboard");
        let reply = v1::QueryReply::decode(reply.payload.as_ref()).expect("reply");
        assert!(
            matches!(&reply.result, Some(v1::query_reply::Result::Loyalty(l)) if l.customer_id == c),
            "{reply:?}"
        );
    }
    stopped_without_violations(&mut serve, &server);
}

/// Stop `serve` (SIGTERM): it must exit cleanly, and the server must have logged no
/// permissions violation for the `ledger` user.
fn stopped_without_violations(serve: &mut Child, server: &NatsServer) {
    let pid = serve.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let exit = serve.wait().expect("wait");
    assert!(exit.success(), "serve as the ledger user: {exit}");
    let log = server.log();
    let ledger_violations: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Violation") && l.contains("\"ledger\""))
        .collect();
    assert!(ledger_violations.is_empty(), "{ledger_violations:#?}");
}
