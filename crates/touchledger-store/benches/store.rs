//! Store benchmarks: append throughput at batch sizes 1, 100 and 1000 (one flush per batch),
//! and replay throughput — each against baselines measured in the same run:
//! * append baselines, raw sled inserts with one flush per batch of the same encoded record
//!   bytes: (1) one key per event holding only the record (the engine's limit for any layout
//!   with a key per event), and (2) the write set of the previous on-disk format (format 1: the
//!   record plus four index entries, five keys per event), for comparison with what format 2
//!   writes;
//! * append with a fresh customer for every event (the customer index cannot group anything),
//!   against baseline (1);
//! * replay baseline: a raw sled scan of the same record bytes stored one key per record.
//!
//! Run: `cargo bench -p touchledger-store --bench store`. Results go in BENCHMARKS.md.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use touchledger_domain::{Channel, Event, Payload, Purchase, Timestamp};
use touchledger_store::{AppendItem, EventStore, ReadFilter, SledStore, StoreConfig};

/// Purchase `n`, by one of `customers` customers.
fn event_of(n: u64, customers: u64) -> Event {
    Event {
        event_id: format!("bench-{n:012}-0000-4000-8000-000000000000"),
        customer_id: format!("cust-{:07}", n % customers),
        occurred_at: Timestamp::from_unix_nanos(
            1_700_000_000_000_000_000 + n as i64 * 1_000_000_000,
        ),
        source: "bench".into(),
        schema_version: 1,
        correlation_id: None,
        causation_id: None,
        payload: Payload::Purchase(Purchase {
            order_id: format!("ord-{n}"),
            amount_minor: 1299 + (n % 1000) as i64,
            currency: "EUR".into(),
            item_count: 1 + (n % 3) as u32,
            channel: Some(Channel::Web),
            category: "music".into(),
        }),
    }
}

fn event(n: u64) -> Event {
    event_of(n, 5000)
}

fn raw_db(dir: &tempfile::TempDir) -> (sled::Db, sled::Tree) {
    let db = sled::Config::new()
        .path(dir.path().join("raw"))
        .cache_capacity(256 * 1024 * 1024)
        .mode(sled::Mode::HighThroughput)
        .open()
        .expect("open raw");
    let tree = db.open_tree("raw").expect("tree");
    (db, tree)
}

/// Real record bytes (hash ‖ StoredRecord), taken from a scratch store.
fn record_values(n: u64) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let scratch = SledStore::open(StoreConfig::new(dir.path())).expect("open");
    scratch
        .append((0..n).map(|n| AppendItem::new(event(n))).collect())
        .expect("append");
    scratch
        .read_raw(1, None)
        .map(|r| {
            let r = r.expect("raw");
            let mut v = r.hash.0.to_vec();
            v.extend_from_slice(&r.record);
            v
        })
        .collect()
}

fn key(prefix: u8, n: u64) -> Vec<u8> {
    let mut k = vec![prefix];
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// Time `iters` appends of `batch` fresh events by `customers` customers.
fn bench_store(
    b: &mut criterion::Bencher<'_>,
    store: &SledStore,
    next: &mut u64,
    batch: u64,
    customers: u64,
) {
    b.iter_custom(|iters| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let items: Vec<_> = (*next..*next + batch)
                .map(|n| AppendItem::new(event_of(n, customers)))
                .collect();
            *next += batch;
            let t = Instant::now();
            let out = store.append(items).expect("append");
            total += t.elapsed();
            assert_eq!(out.len() as u64, batch);
        }
        total
    })
}

/// Time `iters` raw inserts of `batch` records, one key each, plus a flush.
fn bench_raw_records(
    b: &mut criterion::Bencher<'_>,
    db: &sled::Db,
    tree: &sled::Tree,
    values: &[Vec<u8>],
    pos: &mut u64,
    batch: u64,
) {
    b.iter_custom(|iters| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let vals: Vec<(u64, &Vec<u8>)> = (*pos..*pos + batch)
                .map(|p| (p, &values[(p % values.len() as u64) as usize]))
                .collect();
            *pos += batch;
            let t = Instant::now();
            for (p, v) in vals {
                tree.insert(key(b'e', p), v.as_slice()).expect("insert");
            }
            db.flush().expect("flush");
            total += t.elapsed();
        }
        total
    })
}

fn append(c: &mut Criterion) {
    let values = record_values(1000);
    let mut g = c.benchmark_group("append");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1));
    for batch in [1u64, 100, 1000] {
        g.throughput(Throughput::Elements(batch));
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(StoreConfig::new(dir.path().join("ledger"))).expect("open");
        let mut next = 0u64;
        g.bench_function(BenchmarkId::new("touchledger", batch), |b| {
            bench_store(b, &store, &mut next, batch, 5000)
        });

        let dir = tempfile::tempdir().expect("tempdir");
        let (db, tree) = raw_db(&dir);
        let mut pos = 0u64;
        g.bench_function(BenchmarkId::new("raw_sled_records", batch), |b| {
            bench_raw_records(b, &db, &tree, &values, &mut pos, batch)
        });

        // Baseline 2: format 1's write set for the same events — the record plus event-id,
        // customer, kind and business-time entries shaped as format 1 wrote them.
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, tree) = raw_db(&dir);
        let mut pos = 1u64;
        g.bench_function(BenchmarkId::new("raw_sled_format1_write_set", batch), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut writes: Vec<(Vec<u8>, Vec<u8>)> =
                        Vec::with_capacity(5 * batch as usize);
                    for p in pos..pos + batch {
                        let e = event(p + 1_000_000_000);
                        let v = &values[(p % values.len() as u64) as usize];
                        writes.push((key(b'e', p), v.clone()));
                        let mut id = vec![b'i'];
                        id.extend_from_slice(e.event_id.as_bytes());
                        writes.push((id, v[..40].to_vec()));
                        let mut ck = vec![b'c', 0, e.customer_id.len() as u8];
                        ck.extend_from_slice(e.customer_id.as_bytes());
                        ck.extend_from_slice(&p.to_be_bytes());
                        writes.push((ck, p.to_be_bytes().to_vec()));
                        let mut kk = vec![b'k', 1];
                        kk.extend_from_slice(&p.to_be_bytes());
                        writes.push((kk, Vec::new()));
                        let mut tk = vec![b't'];
                        tk.extend_from_slice(&e.occurred_at.to_key_bytes());
                        tk.extend_from_slice(&p.to_be_bytes());
                        writes.push((tk, Vec::new()));
                    }
                    pos += batch;
                    let t = Instant::now();
                    for (k, v) in writes {
                        tree.insert(k, v).expect("insert");
                    }
                    db.flush().expect("flush");
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();

    // Every event by a new customer: the customer index writes one run per event.
    let mut g = c.benchmark_group("append_distinct_customers");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(1000));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(StoreConfig::new(dir.path().join("ledger"))).expect("open");
    let mut next = 0u64;
    g.bench_function(BenchmarkId::new("touchledger", 1000), |b| {
        bench_store(b, &store, &mut next, 1000, u64::MAX)
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, tree) = raw_db(&dir);
    let mut pos = 0u64;
    g.bench_function(BenchmarkId::new("raw_sled_records", 1000), |b| {
        bench_raw_records(b, &db, &tree, &values, &mut pos, 1000)
    });
    g.finish();
}

fn replay(c: &mut Criterion) {
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(StoreConfig::new(dir.path())).expect("open");
    for chunk in (0..N).collect::<Vec<_>>().chunks(5000) {
        store
            .append(chunk.iter().map(|n| AppendItem::new(event(*n))).collect())
            .expect("append");
    }
    // Baseline: the same record bytes, one sled key per record.
    let raw_dir = tempfile::tempdir().expect("tempdir");
    let (raw, tree) = raw_db(&raw_dir);
    for r in store.read_raw(1, None) {
        let r = r.expect("raw");
        let mut v = r.hash.0.to_vec();
        v.extend_from_slice(&r.record);
        tree.insert(key(b'e', r.position), v).expect("insert");
    }
    raw.flush().expect("flush");
    let mut g = c.benchmark_group("replay");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(N));
    g.bench_function("touchledger_read_all", |b| {
        b.iter(|| {
            let n = store.read(&ReadFilter::default()).fold(0u64, |n, r| {
                std::hint::black_box(r.expect("read"));
                n + 1
            });
            assert_eq!(n, N);
        })
    });
    g.bench_function("touchledger_read_raw", |b| {
        b.iter(|| {
            let n = store.read_raw(1, None).fold(0u64, |n, r| {
                std::hint::black_box(r.expect("read"));
                n + 1
            });
            assert_eq!(n, N);
        })
    });
    g.bench_function("raw_sled_scan", |b| {
        b.iter(|| {
            let n = tree.iter().fold(0u64, |n, kv| {
                std::hint::black_box(kv.expect("kv"));
                n + 1
            });
            assert_eq!(n, N);
        })
    });
    g.finish();
}

criterion_group!(benches, append, replay);
criterion_main!(benches);
