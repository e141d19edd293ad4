//! The HTTP API against a real nats-server and sled directory (issue 5): customer 360 with the
//! timeline, the at-risk list with filters and 400s for bad parameters, the overview, the SSE
//! feed bridged from NATS, the bearer token, health/readiness and Prometheus metrics.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;
use touchledger_bus::{BusConfig, ViewConfig};
use touchledger_domain::{Complaint, ComplaintCategory, Payload, Timestamp};
use touchledger_http::HttpConfig;
use touchledger_testkit::{NatsServer, free_port};

use crate::support::{fixed_clock_store, purchase};

fn metrics_handle() -> Arc<dyn Fn() -> String + Send + Sync> {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    let h = HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("recorder")
        })
        .clone();
    Arc::new(move || h.render())
}

/// A plain HTTP/1.1 GET: (status, body).
pub(crate) async fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let (status, _, body) = get_with_head(port, path, token).await;
    (status, body)
}

/// The value of header `name` (any case) in a response head from [`get_with_head`], trimmed;
/// `None` when absent.
pub(crate) fn header(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// A plain HTTP/1.1 GET: (status, head, body).
pub(crate) async fn get_with_head(
    port: u16,
    path: &str,
    token: Option<&str>,
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // De-chunk.
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        body.to_owned()
    };
    (status, head.to_owned(), body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_serves_read_models_live_feed_and_metrics() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(fixed_clock_store(dir.path()));
    let client = async_nats::connect(server.url()).await.expect("connect");
    let shutdown = CancellationToken::new();
    let now = || "2026-05-20T12:00:00Z".parse::<Timestamp>().expect("time");
    let mut view_cfg = ViewConfig {
        refit_every: None,
        sweep_interval: Duration::from_millis(200),
        clock: Arc::new(now),
        ..ViewConfig::default()
    };
    // As `serve` does: one current materialisation, maintained by the views, read by HTTP.
    let current = touchledger_bus::open_current(&store, &view_cfg.rules, view_cfg.current_refresh)
        .expect("current");
    view_cfg.current = Some(current.clone());
    let port = free_port();
    let reads = Arc::new(
        touchledger_projector::ReadModels::open(&store, view_cfg.rules.clone()).expect("reads"),
    );
    let http_cfg = HttpConfig {
        addr: ([127, 0, 0, 1], port).into(),
        token: Some("s3cret".into()),
        metrics: Some(metrics_handle()),
        clock: Arc::new(now),
        current: Some(current),
        ..HttpConfig::default()
    };
    let tasks = vec![
        tokio::spawn(touchledger_bus::run_ledger(
            client.clone(),
            store.clone(),
            BusConfig {
                fetch_wait: Duration::from_millis(20),
                ..BusConfig::default()
            },
            shutdown.clone(),
        )),
        tokio::spawn(touchledger_bus::run_views(
            client.clone(),
            store.clone(),
            view_cfg,
            shutdown.clone(),
        )),
    ];
    let http = tokio::spawn(touchledger_http::run_http(
        store.clone(),
        reads,
        client.clone(),
        http_cfg,
        shutdown.clone(),
    ));
    let tok = Some("s3cret");
    // Up: health is open, everything else needs the token.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "HTTP never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(port, "/healthz", None).await.0, 200);
    assert_eq!(get(port, "/api/v1/overview", None).await.0, 401);
    assert_eq!(get(port, "/api/v1/overview", Some("wrong")).await.0, 401);
    // The query token is taken only where a browser cannot send a header (the page, the live
    // feed); the API wants the header, whose scheme is case-insensitive.
    assert_eq!(
        get(port, "/api/v1/overview?access_token=s3cret", None)
            .await
            .0,
        401
    );
    let raw_get = |auth: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        s.write_all(
            format!("GET /api/v1/overview HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        String::from_utf8_lossy(&raw)
            .split(' ')
            .nth(1)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(raw_get("bearer s3cret").await, "200");
    assert_eq!(raw_get("BEARER  s3cret").await, "200");
    assert_eq!(raw_get("Basic s3cret").await, "401");
    assert_eq!(raw_get("Bearer s3cre").await, "401");
    // Percent-decoded on the page: `%73` is `s`.
    assert_eq!(get(port, "/?access_token=%73%33cret", None).await.0, 200);

    // The live feed, opened before anything is published.
    let mut sse = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    sse.write_all(
        b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n",
    )
    .await
    .expect("write");
    let mut sse = BufReader::new(sse);
    let mut status_line = String::new();
    sse.read_line(&mut status_line).await.expect("status");
    assert!(status_line.contains("200"), "{status_line}");
    // Give the bridge a moment to subscribe (it subscribes before answering headers, but the
    // subscription reaches the server asynchronously): wait for the server to see it.
    client.flush().await.expect("flush");

    // Touchpoints: a purchase and four complaints in May → COMPLAINT_BURDEN warning.
    let publisher = touchledger_client::Ledger::new(client.clone(), "crm");
    let mut p = purchase("h-buy", "alice", 4200);
    p.occurred_at = "2026-05-01T10:00:00Z".parse().expect("time");
    publisher.publish(&p).await.expect("publish");
    for i in 0..4 {
        let mut e = purchase(&format!("h-k{i}"), "alice", 0);
        e.occurred_at = format!("2026-05-1{i}T10:00:00Z").parse().expect("time");
        e.payload = Payload::Complaint(Complaint {
            complaint_id: format!("h-k{i}"),
            category: ComplaintCategory::Delivery,
            severity: 2,
            channel: None,
            text: String::new(),
        });
        publisher.publish(&e).await.expect("publish");
    }
    // The SSE feed shows the alert (bridged from crm.alert.churn.alice).
    let alert = tokio::time::timeout(Duration::from_secs(20), async {
        let mut line = String::new();
        let mut event = String::new();
        loop {
            line.clear();
            sse.read_line(&mut line).await.expect("sse line");
            if let Some(e) = line.trim().strip_prefix("event: ") {
                event = e.to_owned();
            }
            if let Some(d) = line.trim().strip_prefix("data: ")
                && event == "alert"
            {
                let a = json(d);
                // The first alert may be none → watch (two complaints); wait for warning.
                if a["churn_risk_assessed"]["level"] == "warning" {
                    return a;
                }
            }
        }
    })
    .await
    .expect("an alert on the SSE feed");
    assert_eq!(alert["customer_id"], "alice");
    assert_eq!(alert["churn_risk_assessed"]["level"], "warning", "{alert}");

    // Customer 360.
    let (code, body) = get(port, "/api/v1/customers/alice", tok).await;
    assert_eq!(code, 200, "{body}");
    let c = json(&body);
    assert_eq!(c["churn"]["level"], "warning");
    assert_eq!(c["satisfaction"]["complaints"]["total"], 4);
    assert_eq!(c["loyalty"]["behaviour"]["purchase_days"], 1);
    // Timeline: the 5 touchpoints and the assessment(s), newest business time first.
    assert!(c["timeline_total"].as_u64().expect("n") >= 6, "{c}");
    assert_eq!(c["timeline"][0]["kind"], "churn_risk_assessed");
    // As of 2026-05-12 only two complaints had happened: watch.
    let (_, body) = get(
        port,
        "/api/v1/customers/alice?as_of=2026-05-12T12:00:00Z",
        tok,
    )
    .await;
    assert_eq!(json(&body)["churn"]["level"], "watch");
    assert_eq!(get(port, "/api/v1/customers/nobody", tok).await.0, 404);

    // At-risk list with filters.
    let (code, body) = get(
        port,
        "/api/v1/at-risk?level=warning&cause=disappointment&reason=COMPLAINT_BURDEN",
        tok,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let r = json(&body);
    assert_eq!(r["total"], 1);
    assert_eq!(r["items"][0]["customer_id"], "alice");
    // A "now" read is served from the current materialisation's indexes...
    assert_eq!(r["source"], "current", "{r}");
    // ...and agrees with the full pass at the same instant (an explicit as_of).
    let (_, body) = get(
        port,
        "/api/v1/at-risk?level=warning&cause=disappointment&reason=COMPLAINT_BURDEN&as_of=2026-05-20T12:00:00Z",
        tok,
    )
    .await;
    let full = json(&body);
    assert_eq!(full["source"], "full_pass");
    assert_eq!(full["items"], r["items"], "{full}");
    // The customer page's ranks come from the indexes and equal the full pass's.
    let (_, now_body) = get(port, "/api/v1/customers/alice", tok).await;
    let (_, then_body) = get(
        port,
        "/api/v1/customers/alice?as_of=2026-05-20T12:00:00Z",
        tok,
    )
    .await;
    assert!(json(&now_body)["ranks"].is_object(), "{now_body}");
    assert_eq!(json(&now_body)["ranks"], json(&then_body)["ranks"]);
    // A path that does not decode gets the JSON error, not plain text.
    let (code, body) = get(port, "/api/v1/customers/%ff", tok).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .expect("message")
            .starts_with("id"),
        "{body}"
    );
    let (_, body) = get(port, "/api/v1/at-risk?as_of=2300-01-01", tok).await;
    assert!(body.contains("supported range"), "{body}");
    let (_, body) = get(port, "/api/v1/at-risk?cause=competitor", tok).await;
    assert_eq!(json(&body)["total"], 0);
    for bad in [
        "sort=bogus",
        "per_page=0",
        "level=red",
        "axis=sideways",
        "as_of=yesterday",
        "cause=boredom",
        // (page − 1) × per_page wrapped to 0 once and answered page 1.
        "page=72057594037927937&per_page=256",
        // A valid date outside the 64-bit nanosecond range says so.
        "as_of=1600-01-01",
    ] {
        let (code, body) = get(port, &format!("/api/v1/at-risk?{bad}"), tok).await;
        assert_eq!(code, 400, "{bad}: {body}");
        let param = bad.split('=').next().expect("param");
        assert!(
            json(&body)["error"]
                .as_str()
                .expect("message")
                .starts_with(param),
            "{body}"
        );
    }

    // Overview.
    let (_, body) = get(port, "/api/v1/overview", tok).await;
    let o = json(&body);
    assert_eq!(o["customers"], 1);
    assert_eq!(o["churn_levels"]["warning"], 1);
    // Served from the current materialisation, and equal to the full pass at the same instant.
    let (_, full) = get(port, "/api/v1/overview?as_of=2026-05-20T12:00:00Z", tok).await;
    assert_eq!(json(&full), o);

    // Readiness, OpenAPI, metrics, the dashboard page.
    let (code, body) = get(port, "/readyz", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["ready"], true);
    let (code, body) = get(port, "/api/v1/openapi.json", tok).await;
    assert_eq!(code, 200);
    assert!(json(&body)["paths"]["/api/v1/at-risk"].is_object());
    let (code, body) = get(port, "/metrics", tok).await;
    assert_eq!(code, 200);
    assert!(body.contains("touchledger_ingest_events_total"), "{body}");
    assert!(body.contains("touchledger_churn_alerts_total"), "{body}");
    let (code, body) = get(port, "/?access_token=s3cret", None).await;
    assert_eq!(code, 200);
    assert!(body.contains("<title>touchledger</title>"));

    // The timeline is ordered by instant, not by the instant's text ("…:00.5Z" < "…:00Z" as
    // strings), and capped by `limit` after ordering.
    for (id, when) in [
        ("t-whole", "2026-05-20T10:00:00Z"),
        ("t-half", "2026-05-20T10:00:00.500Z"),
    ] {
        let mut e = purchase(id, "bob", 100);
        e.occurred_at = when.parse().expect("time");
        publisher.publish(&e).await.expect("publish");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let bob = loop {
        let (code, body) = get(port, "/api/v1/customers/bob?limit=1", tok).await;
        if code == 200 && json(&body)["timeline_total"] == 2 {
            break json(&body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob's purchases never stored: {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        bob["timeline"].as_array().expect("timeline").len(),
        1,
        "{bob}"
    );
    assert_eq!(bob["timeline"][0]["event"]["event_id"], "t-half", "{bob}");

    shutdown.cancel();
    for t in tasks {
        t.await.expect("join").expect("clean");
    }
    http.await.expect("join").expect("clean http");
}
