//! Shared by the NATS benchmarks: generated events, async publishing, and the plain
//! stream-and-consumer baseline.

use std::time::{Duration, Instant};

use futures::StreamExt;

use async_nats::jetstream::{self, consumer::pull, message::PublishMessage, stream};
use touchledger_domain::{Channel, Event, Payload, Purchase, Timestamp};

/// Purchase `n` of customer `n mod customers`.
pub fn event(n: u64, customers: u64) -> Event {
    Event {
        event_id: format!("bench-{n:012}"),
        customer_id: format!("cust-{:06}", n % customers),
        occurred_at: Timestamp::from_unix_nanos(1_700_000_000_000_000_000 + n as i64 * 1_000_000),
        source: "bench".into(),
        schema_version: 1,
        correlation_id: None,
        causation_id: None,
        payload: Payload::Purchase(Purchase {
            order_id: format!("o-{n}"),
            amount_minor: 1000 + (n % 500) as i64,
            currency: "EUR".into(),
            item_count: 1,
            channel: Some(Channel::Web),
            category: "music".into(),
        }),
    }
}

/// Publish every event with async publish (1,024 acks in flight).
pub async fn publish_all(
    js: &jetstream::Context,
    prefix: &str,
    events: &[(String, String, Vec<u8>)],
) {
    let mut acks = Vec::with_capacity(1024);
    for (customer, id, bytes) in events {
        let subject = format!("{prefix}.touchpoint.purchase.{customer}");
        let msg = PublishMessage::build()
            .payload(bytes.clone().into())
            .message_id(touchledger_client::nats_msg_id(id, bytes));
        acks.push(js.send_publish(subject, msg).await.expect("publish"));
        if acks.len() == 1024 {
            for a in acks.drain(..) {
                a.await.expect("ack");
            }
        }
    }
    for a in acks {
        a.await.expect("ack");
    }
}

/// A file stream configured like the intake stream.
#[allow(dead_code)]
pub async fn plain_stream(js: &jetstream::Context, name: &str, subjects: &str) {
    plain_stream_replicated(js, name, subjects, 1).await;
}

/// The same with `replicas` copies (on a cluster).
pub async fn plain_stream_replicated(
    js: &jetstream::Context,
    name: &str,
    subjects: &str,
    replicas: usize,
) {
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        num_replicas: replicas.max(1),
        ..Default::default()
    })
    .await
    .expect("stream");
}

/// Such a stream with a durable pull consumer on it.
#[allow(dead_code)]
pub async fn plain_consumer(
    js: &jetstream::Context,
    name: &str,
    subjects: &str,
    durable: &str,
) -> jetstream::consumer::PullConsumer {
    plain_consumer_replicated(js, name, subjects, durable, 1).await
}

/// The same on a stream of `replicas` copies.
pub async fn plain_consumer_replicated(
    js: &jetstream::Context,
    name: &str,
    subjects: &str,
    durable: &str,
    replicas: usize,
) -> jetstream::consumer::PullConsumer {
    plain_stream_replicated(js, name, subjects, replicas).await;
    js.get_stream(name)
        .await
        .expect("stream")
        .get_or_create_consumer(
            durable,
            pull::Config {
                durable_name: Some(durable.into()),
                max_ack_pending: 2000,
                ..Default::default()
            },
        )
        .await
        .expect("consumer")
}

/// The baseline: a plain durable pull consumer on a stream configured like the intake stream,
/// fetching 500 and acking each message with no processing, while `events` are published.
/// Returns the time from the first publish to the last ack.
#[allow(dead_code)]
pub async fn plain_baseline(
    js: &jetstream::Context,
    events: &[(String, String, Vec<u8>)],
) -> Duration {
    plain_baseline_replicated(js, events, 1).await
}

/// The same on a stream of `replicas` copies (on a cluster).
#[allow(dead_code)]
pub async fn plain_baseline_replicated(
    js: &jetstream::Context,
    events: &[(String, String, Vec<u8>)],
    replicas: usize,
) -> Duration {
    let consumer = plain_consumer_replicated(
        js,
        "PLAIN_TOUCHPOINTS",
        "plain.touchpoint.>",
        "plain",
        replicas,
    )
    .await;
    let n = events.len() as u64;
    let start = Instant::now();
    let consume = tokio::spawn(async move {
        let mut acked = 0u64;
        while acked < n {
            let mut batch = consumer
                .fetch()
                .max_messages(500)
                .expires(Duration::from_millis(50))
                .messages()
                .await
                .expect("fetch");
            while let Some(m) = batch.next().await {
                m.expect("msg").ack().await.expect("ack");
                acked += 1;
            }
        }
    });
    publish_all(js, "plain", events).await;
    consume.await.expect("consumer task");
    start.elapsed()
}

/// `BENCH_EVENTS` (else `default`), or `None` when the harness only lists benchmarks
/// (`--list`: nothing to run).
#[allow(dead_code)]
pub fn bench_events(default: u64) -> Option<u64> {
    if std::env::args().any(|a| a == "--list") {
        return None;
    }
    Some(
        std::env::var("BENCH_EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// The benchmarks' runtime: two workers, like the machine's cores.
#[allow(dead_code)]
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
