//! Projection benchmarks, each against a baseline measured in the same run:
//! * `fold`: 1,000,000 committed events (60 % purchases, 20 % surveys, 10 % complaints, 10 %
//!   callbacks; 50,000 customers; business time mostly in order with some late arrivals)
//!   folded in memory into per-customer facts, vs the minimal fold over the same events (a
//!   per-customer counter in the same kind of map) — the cost of the map and the iteration.
//! * `rebuild`: the full pipeline on a sled ledger of 200,000 such events — read from the
//!   store, fold, encode and commit the three projections — vs reading (and decoding) the
//!   same events alone.
//!
//! Run: `cargo bench -p touchledger-projector --bench fold`. Results go in BENCHMARKS.md.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use touchledger_domain::facts::{CustomerFacts, KindSet};
use touchledger_domain::{
    Callback, CallbackOutcome, CallbackPurpose, Complaint, ComplaintCategory, Event, Payload,
    Purchase, Survey, Timestamp,
};
use touchledger_store::{AppendItem, Committed, EventStore, ReadFilter, SledStore, StoreConfig};

const CUSTOMERS: u64 = 50_000;

fn event(n: u64) -> Event {
    let day = 86_400_000_000_000i64;
    // Mostly in business-time order; every 7th event is up to 30 days late.
    let late = if n.is_multiple_of(7) {
        (n % 30) as i64 * day
    } else {
        0
    };
    let customer = (n.wrapping_mul(2_654_435_761)) % CUSTOMERS;
    let payload = match n % 10 {
        0..=5 => Payload::Purchase(Purchase {
            order_id: format!("o{n}"),
            amount_minor: 500 + (n % 5000) as i64,
            currency: "EUR".into(),
            item_count: 1,
            channel: None,
            category: String::new(),
        }),
        6 | 7 => Payload::Survey(Survey {
            survey_id: format!("s{n}"),
            expectation: Some(1 + (n % 10) as u32),
            performance: Some(1 + (n / 10 % 10) as u32),
            nps: Some((n % 11) as u32),
            csat: Some(1 + (n % 5) as u32),
            ..Default::default()
        }),
        8 => Payload::Complaint(Complaint {
            complaint_id: format!("k{n}"),
            category: ComplaintCategory::Delivery,
            severity: 1 + (n % 5) as u32,
            channel: None,
            text: String::new(),
        }),
        _ => Payload::Callback(Callback {
            callback_id: format!("c{n}"),
            purpose: CallbackPurpose::ComplaintFollowUp,
            related_complaint_id: Some(format!("k{}", n - 1)),
            outcome: CallbackOutcome::ComplaintResolved,
            resolution_satisfaction: Some(4),
            leaving_reason: None,
            note: String::new(),
        }),
    };
    Event {
        event_id: format!("ev-{n:012}"),
        customer_id: format!("cust-{customer:06}"),
        occurred_at: Timestamp::from_unix_nanos(
            1_700_000_000_000_000_000 + n as i64 * 60_000_000_000 - late,
        ),
        source: "bench".into(),
        schema_version: 1,
        correlation_id: None,
        causation_id: None,
        payload,
    }
}

fn fold(c: &mut Criterion) {
    let n = 1_000_000u64;
    let events: Vec<(u64, Timestamp, Event)> = (1..=n)
        .map(|p| {
            let e = event(p);
            (p, e.occurred_at, e)
        })
        .collect();
    let mut g = c.benchmark_group("fold");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(n));
    g.bench_function("facts", |b| {
        b.iter(|| {
            let mut states: HashMap<&str, CustomerFacts> =
                HashMap::with_capacity(CUSTOMERS as usize);
            for (p, at, e) in &events {
                states
                    .entry(e.customer_id.as_str())
                    .or_default()
                    .apply(e, *p, *at, KindSet::ALL);
            }
            assert_eq!(states.len() as u64, CUSTOMERS);
            states
        });
    });
    g.bench_function("baseline_count", |b| {
        b.iter(|| {
            let mut states: HashMap<&str, u64> = HashMap::with_capacity(CUSTOMERS as usize);
            for (_, _, e) in &events {
                *states.entry(e.customer_id.as_str()).or_default() += 1;
            }
            assert_eq!(states.len() as u64, CUSTOMERS);
            states
        });
    });
    g.finish();
}

fn rebuild(c: &mut Criterion) {
    let n = 200_000u64;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(StoreConfig::new(dir.path().join("ledger"))).expect("open");
    for chunk in (1..=n).collect::<Vec<_>>().chunks(5000) {
        store
            .append(chunk.iter().map(|i| AppendItem::new(event(*i))).collect())
            .expect("append");
    }
    let mut g = c.benchmark_group("rebuild");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .throughput(Throughput::Elements(n));
    g.bench_function("three_projections", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut ps: Vec<_> = touchledger_projector::open_all(&store)
                    .expect("open")
                    .into_iter()
                    .map(|p| p.0)
                    .collect();
                for p in ps.iter_mut() {
                    p.reset().expect("reset");
                }
                let t = Instant::now();
                let read = touchledger_projector::catch_up(&store, &mut ps, 10_000).expect("fold");
                total += t.elapsed();
                assert_eq!(read, n);
            }
            total
        });
    });
    g.bench_function("baseline_read_decoded", |b| {
        b.iter(|| {
            let all: Vec<Committed> = store
                .read(&ReadFilter::default())
                .collect::<Result<_, _>>()
                .expect("read");
            assert_eq!(all.len() as u64, n);
            all.len()
        });
    });
    g.finish();
}

criterion_group!(benches, fold, rebuild);
criterion_main!(benches);
