//! End-to-end ingest benchmark against a real nats-server (started on a free port):
//! * touchledger: N events published with async publish → all stored (flushed) and acked by the
//!   ledger's intake;
//! * baseline, same run, same server: a plain pull consumer on an identically configured stream
//!   that only fetches and acks the same messages (the broker's own limit);
//! * a reference, not the ratio's baseline: the same plain consumer that also republishes each
//!   message into a second stream the way the ledger's feed does (the broker's limit for intake
//!   plus feed, with no store);
//! * synchronous append latency (p50/p99) of single-event requests, next to a bare NATS
//!   request/reply echo on the same connection.
//!
//! Run: `cargo bench -p touchledger-bus --bench ingest` (env BENCH_EVENTS, default 50000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use touchledger_bus::{BusConfig, Subjects};
use touchledger_proto::encode_event;
use touchledger_store::{EventStore, SledStore, StoreConfig};

mod common;
use common::{event, plain_baseline, plain_consumer, plain_stream, publish_all};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let Some(n) = common::bench_events(50_000) else {
        return;
    };
    let server = touchledger_testkit::NatsServer::start();
    let rt = common::runtime();
    rt.block_on(async {
        let events: Vec<(String, String, Vec<u8>)> = (0..n)
            .map(|i| {
                let e = event(i, 5000);
                (e.customer_id.clone(), e.event_id.clone(), encode_event(&e))
            })
            .collect();
        let client = async_nats::connect(server.url()).await.expect("connect");
        let js = jetstream::new(client.clone());

        // Baseline: plain pull consumer, fetch 500 + ack each, on a stream configured like intake.
        let plain = plain_baseline(&js, &events).await;

        // Reference (not the ratio's baseline): the same plain consumer that also republishes
        // every message into a second stream the way the ledger's feed does (the same four
        // headers, sequence = position, one acknowledged publish per batch). It is the broker's
        // limit for intake plus feed, with no store.
        let consumer = plain_consumer(&js, "RELAY_TOUCHPOINTS", "relay.touchpoint.>", "relay").await;
        plain_stream(&js, "RELAY_FEED", "relayfeed.>").await;
        let start = Instant::now();
        let relay = tokio::spawn({
            let js = js.clone();
            let client = client.clone();
            async move {
                let mut acked = 0u64;
                while acked < n {
                    let mut batch = consumer
                        .fetch()
                        .max_messages(500)
                        .expires(Duration::from_millis(50))
                        .messages()
                        .await
                        .expect("fetch");
                    let mut msgs = Vec::new();
                    while let Some(m) = batch.next().await {
                        msgs.push(m.expect("msg"));
                    }
                    let last = msgs.len().saturating_sub(1);
                    for (i, m) in msgs.iter().enumerate() {
                        let position = acked + i as u64 + 1;
                        let mut h = async_nats::HeaderMap::new();
                        h.insert("Nats-Msg-Id", position.to_string().as_str());
                        h.insert(
                            "Nats-Expected-Last-Sequence",
                            (position - 1).to_string().as_str(),
                        );
                        h.insert("Touchledger-Position", position.to_string().as_str());
                        h.insert("Touchledger-Hash", hex::encode([7u8; 32]).as_str());
                        let subject = format!("relayfeed.{}", m.subject);
                        if i < last {
                            client
                                .publish_with_headers(subject, h, m.payload.clone())
                                .await
                                .expect("relay publish");
                        } else {
                            js.send_publish(
                                subject,
                                PublishMessage::build().payload(m.payload.clone()).headers(h),
                            )
                            .await
                            .expect("relay publish")
                            .await
                            .expect("relay ack");
                        }
                    }
                    for m in &msgs {
                        m.ack().await.expect("ack");
                    }
                    acked += msgs.len() as u64;
                }
            }
        });
        publish_all(&js, "relay", &events).await;
        relay.await.expect("relay task");
        let relayed = start.elapsed();

        // touchledger: the real intake on a fresh store, one flush per batch of 500.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open(StoreConfig::new(dir.path())).expect("store"));
        let shutdown = CancellationToken::new();
        let cfg = BusConfig {
            subjects: Subjects::new("crm"),
            batch: std::env::var("BENCH_BATCH")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(500),
            ..BusConfig::default()
        };
        let ledger = tokio::spawn(touchledger_bus::run_ledger(
            client.clone(),
            store.clone(),
            cfg,
            shutdown.clone(),
        ));
        while js.get_stream("CRM_TOUCHPOINTS").await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut head = store.subscribe();
        let start = Instant::now();
        let publisher = tokio::spawn({
            let js = js.clone();
            let events = events.clone();
            async move { publish_all(&js, "crm", &events).await }
        });
        while head.borrow_and_update().position < n {
            head.changed().await.expect("store");
        }
        // "Acked": the intake consumer has nothing pending.
        let mut intake = js.get_stream("CRM_TOUCHPOINTS").await.expect("intake");
        let _ = intake.info().await;
        loop {
            let mut c: jetstream::consumer::PullConsumer = intake
                .get_consumer("touchledger-ledger")
                .await
                .expect("consumer");
            let info = c.info().await.expect("info");
            if info.num_ack_pending == 0 && info.num_pending == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ours = start.elapsed();
        // Not part of the ratio: when the committed-event feed (which competes for the same
        // broker and cores during the run) has every event too.
        let mut feed = js.get_stream("CRM_LEDGER_EVENTS").await.expect("feed");
        while feed.info().await.expect("feed info").state.last_sequence < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let fed = start.elapsed();
        publisher.await.expect("publisher");

        // Synchronous append latency, one event per request, vs a bare request/reply echo.
        let ledger_client = touchledger_client::Ledger::new(client.clone(), "crm");
        let mut lat = Vec::with_capacity(2000);
        for i in 0..2000 {
            let e = event(10_000_000 + i, 5000);
            let t = Instant::now();
            ledger_client.append(vec![(e, None)]).await.expect("append");
            lat.push(t.elapsed());
        }
        lat.sort();
        let mut echo_sub = client.subscribe("bench.echo").await.expect("sub");
        let echo_client = client.clone();
        let echo = tokio::spawn(async move {
            while let Some(m) = echo_sub.next().await {
                if let Some(r) = m.reply {
                    let _ = echo_client.publish(r, m.payload).await;
                }
            }
        });
        let mut echo_lat = Vec::with_capacity(2000);
        let body = encode_event(&event(1, 5000));
        for _ in 0..2000 {
            let t = Instant::now();
            client
                .request("bench.echo", body.clone().into())
                .await
                .expect("echo");
            echo_lat.push(t.elapsed());
        }
        echo_lat.sort();
        echo.abort();
        shutdown.cancel();
        let _ = ledger.await;

        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        println!("ingest of {n} events (publish with async ack -> stored, flushed and acked):");
        println!(
            "  touchledger intake   {:>10.0} events/s  ({:.2} s)",
            rate(ours),
            ours.as_secs_f64()
        );
        println!(
            "  plain fetch+ack      {:>10.0} events/s  ({:.2} s)",
            rate(plain),
            plain.as_secs_f64()
        );
        println!("  ratio                {:>10.2}", rate(ours) / rate(plain));
        println!(
            "  feed stream complete {:>10.0} events/s  ({:.2} s after the first publish)",
            rate(fed),
            fed.as_secs_f64()
        );
        println!(
            "  reference: fetch+ack+republish as the feed does {:>8.0} events/s  ({:.2} s; touchledger / this = {:.2})",
            rate(relayed),
            relayed.as_secs_f64(),
            rate(ours) / rate(relayed)
        );
        println!("synchronous append, 1 event per request, 2000 requests:");
        println!(
            "  p50 {:?}  p99 {:?}  (bare request/reply echo: p50 {:?}  p99 {:?})",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&echo_lat, 0.5),
            percentile(&echo_lat, 0.99)
        );
        println!("store head after the run: {}", store.head().position);
    });
}
