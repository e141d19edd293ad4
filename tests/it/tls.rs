//! TLS (issue #17): a TLS-only nats-server with a certificate from a CA made in the test;
//! `touchledger serve`, a publisher and a dashboard connect with that CA and do their jobs; a
//! client without the CA is refused.

use std::process::{Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use prost::Message;
use touchledger_client::{Ledger, ReplayFilter};
use touchledger_proto::{encode_event, v1};
use touchledger_testkit::{NatsServer, free_port};

use crate::service_crash::CHILD_ENV;
use crate::support::purchase;

/// A CA and a server certificate for 127.0.0.1 and localhost, as PEM files in `dir`:
/// (ca.pem, server.pem, server.key).
fn make_pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "touchledger test CA");
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("server params");
    let key = rcgen::KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).expect("write");
    std::fs::write(&paths.1, cert.pem()).expect("write");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write");
    paths
}

async fn tls_client(url: &str, ca: &std::path::Path) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .add_root_certificates(ca.to_path_buf())
        .require_tls(true)
        .connect(url)
        .await
        .expect("TLS connect with the CA")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_publisher_and_dashboard_work_over_tls_and_a_client_without_the_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = make_pki(dir.path());
    let conf = dir.path().join("tls.conf");
    std::fs::write(
        &conf,
        format!(
            "jetstream {{}}\ntls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: 5\n}}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .expect("write conf");
    let server = NatsServer::start_with_config(&conf, &[]);
    let url = server.url();

    // A client that does not trust the CA is refused.
    let untrusting = async_nats::ConnectOptions::new()
        .require_tls(true)
        .connect(url.as_str())
        .await;
    assert!(untrusting.is_err(), "a client without the CA connected");
    // Nor can anyone talk to it in plain text.
    let plain = async_nats::ConnectOptions::new()
        .connect(url.as_str())
        .await;
    assert!(
        plain.is_err(),
        "a plain-text client connected to a TLS-only server"
    );

    // serve, trusting the CA.
    let http = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("ledger");
    let args = [
        "--data",
        data.to_str().expect("utf8"),
        "--nats-url",
        &url,
        "--tls-ca",
        ca.to_str().expect("utf8"),
        "--fetch-wait-ms",
        "20",
        "--http-addr",
        &http,
    ]
    .join("\u{1f}");
    let mut serve = Command::new(std::env::current_exe().expect("exe"))
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
        .expect("spawn serve");

    // A publisher: one touchpoint through JetStream, once the ledger's stream exists.
    let publisher = tls_client(&url, &ca).await;
    let js = jetstream::new(publisher.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while js.get_stream("CRM_TOUCHPOINTS").await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve never made its streams over TLS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    js.publish(
        "crm.touchpoint.purchase.c1",
        encode_event(&purchase("tls-1", "c1", 700)).into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    // It is stored (read back through replay over TLS).
    let ledger = Ledger::new(publisher.clone(), "crm");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // serve makes its streams before it subscribes to replay requests: until it does, a
        // replay meets no responder (a clear error, retried here until the deadline).
        let mut n = 0;
        let replayed = ledger
            .replay(&ReplayFilter::default(), |_| {
                n += 1;
                Ok(())
            })
            .await;
        if replayed.is_ok() && n == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the touchpoint was not stored: {replayed:?}, {n} records"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A dashboard: a query over TLS.
    let dashboard = tls_client(&url, &ca).await;
    let req = v1::QueryRequest {
        customer_id: "c1".into(),
        ..Default::default()
    };
    let reply = dashboard
        .request("crm.query.loyalty", req.encode_to_vec().into())
        .await
        .expect("query");
    let reply = v1::QueryReply::decode(reply.payload.as_ref()).expect("reply");
    assert!(
        matches!(reply.result, Some(v1::query_reply::Result::Loyalty(_))),
        "{reply:?}"
    );

    let pid = serve.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let exit = serve.wait().expect("wait");
    assert!(exit.success(), "serve over TLS: {exit}");
}
