//! Publishing the committed-event feed: the ledger's scheme against nats-server 2.12's atomic
//! batch publish (ADR-50), same records, same server, same run.
//!
//! * **pipelined** (what `run_feed` does): chunks of 1,000 records; every record carries
//!   `Nats-Msg-Id` = `position:hash` and `Nats-Expected-Last-Sequence` = position − 1; all but
//!   the chunk's last go out as plain publishes, the last asks for JetStream's ack, which
//!   confirms the chunk (a lost record makes every later one refused).
//! * **atomic**: the same chunks as atomic batches (`allow_atomic` stream; `Nats-Batch-Id`,
//!   `Nats-Batch-Sequence`; the first as a request the server answers once the batch is open, the
//!   last with `Nats-Batch-Commit: 1` and the PubAck), the first record carrying
//!   `Nats-Expected-Last-Sequence`: either the whole chunk is stored or none of it.
//!
//! Each variant publishes into its own fresh stream; the variants alternate, three rounds. On
//! one server (R1) and, with `BENCH_CLUSTER=1`, on a 3-node cluster as deploy/nats/cluster
//! ships it (R3, `sync_interval: always`).
//!
//! Run: `cargo bench -p touchledger-bus --bench feed_publish` (env BENCH_EVENTS, default 100000).

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use touchledger_proto::encode_event;

mod common;
use common::event;

const CUSTOMERS: u64 = 20_000;
const CHUNK: usize = 1000;

/// A feed-shaped record: an event's bytes, its position and a hash-sized id.
struct Record {
    position: u64,
    hash: String,
    subject: String,
    bytes: Vec<u8>,
}

fn records(n: u64) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let e = event(i, CUSTOMERS);
            let bytes = encode_event(&e);
            // A record hash's length (64 hex digits); its value does not matter here.
            let hash = format!("{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).repeat(4);
            Record {
                position: i + 1,
                hash,
                subject: format!("bench.feed.purchase.{}", e.customer_id),
                bytes,
            }
        })
        .collect()
}

async fn fresh_stream(js: &jetstream::Context, name: &str, atomic: bool, replicas: usize) {
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("bench.{}.>", name.to_lowercase())],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        num_replicas: replicas,
        allow_atomic_publish: atomic,
        ..Default::default()
    })
    .await
    .expect("stream");
}

fn headers(r: &Record, expected_last: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", format!("{}:{}", r.position, r.hash).as_str());
    if expected_last {
        h.insert(
            "Nats-Expected-Last-Sequence",
            (r.position - 1).to_string().as_str(),
        );
    }
    h.insert("Touchledger-Position", r.position.to_string().as_str());
    h.insert("Touchledger-Hash", r.hash.as_str());
    h
}

fn subject(stream: &str, r: &Record) -> String {
    r.subject
        .replacen("bench.feed", &format!("bench.{}", stream.to_lowercase()), 1)
}

/// Publish `r` and wait for JetStream's ack: the stream sequence it was stored at.
async fn publish_acked(js: &jetstream::Context, subject: String, r: &Record, h: HeaderMap) -> u64 {
    js.send_publish(
        subject,
        PublishMessage::build()
            .payload(r.bytes.clone().into())
            .headers(h),
    )
    .await
    .expect("publish")
    .await
    .expect("ack")
    .sequence
}

async fn pipelined(js: &jetstream::Context, stream: &str, records: &[Record]) -> Duration {
    let client = js.client();
    let start = Instant::now();
    for chunk in records.chunks(CHUNK) {
        let last = chunk.len() - 1;
        for (i, r) in chunk.iter().enumerate() {
            let h = headers(r, true);
            if i < last {
                client
                    .publish_with_headers(subject(stream, r), h, r.bytes.clone().into())
                    .await
                    .expect("publish");
            } else {
                let sequence = publish_acked(js, subject(stream, r), r, h).await;
                assert_eq!(sequence, r.position, "pipelined chunk stored whole");
            }
        }
    }
    start.elapsed()
}

async fn atomic(js: &jetstream::Context, stream: &str, records: &[Record]) -> Duration {
    let client = js.client();
    let start = Instant::now();
    for (b, chunk) in records.chunks(CHUNK).enumerate() {
        let id = format!("feed-{b}");
        let last = chunk.len() - 1;
        for (i, r) in chunk.iter().enumerate() {
            let mut h = headers(r, i == 0);
            h.insert("Nats-Batch-Id", id.as_str());
            h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            if i == last {
                h.insert("Nats-Batch-Commit", "1");
                let sequence = publish_acked(js, subject(stream, r), r, h).await;
                assert_eq!(sequence, r.position, "atomic batch stored whole");
            } else if i == 0 {
                // The server answers the first message once the batch is open (an error
                // otherwise: a stream without allow_atomic, too many batches).
                let reply = client
                    .request_with_headers(subject(stream, r), h, r.bytes.clone().into())
                    .await
                    .expect("batch start");
                assert!(
                    reply.payload.is_empty(),
                    "batch start refused: {}",
                    String::from_utf8_lossy(&reply.payload)
                );
            } else {
                client
                    .publish_with_headers(subject(stream, r), h, r.bytes.clone().into())
                    .await
                    .expect("publish");
            }
        }
    }
    start.elapsed()
}

fn measure(rt: &tokio::runtime::Runtime, urls: &str, records: &[Record], replicas: usize) {
    let rate = |d: Duration| records.len() as f64 / d.as_secs_f64();
    rt.block_on(async {
        let client = async_nats::connect(urls.split(',').collect::<Vec<_>>())
            .await
            .expect("connect");
        let js = jetstream::new(client);
        while js.query_account().await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for round in 1..=3 {
            fresh_stream(&js, "PIPE", false, replicas).await;
            let p = pipelined(&js, "PIPE", records).await;
            fresh_stream(&js, "ATOM", true, replicas).await;
            let a = atomic(&js, "ATOM", records).await;
            for name in ["PIPE", "ATOM"] {
                let mut s = js.get_stream(name).await.expect("stream");
                let info = s.info().await.expect("info");
                assert_eq!(info.state.messages, records.len() as u64, "{name} holds every record");
            }
            println!(
                "  R{replicas} round {round}: pipelined {:>8.0} records/s ({:.2} s)   atomic batches {:>8.0} records/s ({:.2} s)   atomic / pipelined {:.2}",
                rate(p),
                p.as_secs_f64(),
                rate(a),
                a.as_secs_f64(),
                rate(a) / rate(p)
            );
        }
    });
}

fn main() {
    let Some(n) = common::bench_events(100_000) else {
        return;
    };
    let rt = common::runtime();
    let records = records(n);
    println!("feed publish of {n} records in chunks of {CHUNK}");
    if std::env::var("BENCH_CLUSTER").is_ok_and(|v| v == "1") {
        let deploy =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats/cluster");
        let cluster = touchledger_testkit::NatsCluster::start_with_configs(&[
            deploy.join("n1.conf"),
            deploy.join("n2.conf"),
            deploy.join("n3.conf"),
        ]);
        measure(&rt, &cluster.urls(), &records, 3);
    } else {
        let server = touchledger_testkit::NatsServer::start();
        measure(&rt, &server.url(), &records, 1);
    }
}
