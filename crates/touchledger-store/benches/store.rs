//! Store benchmarks: append throughput at batch sizes 1, 100 and 1000 (one flush per batch),
//! and replay throughput — each against its baseline measured in the same run:
//! * append baselines: raw sled inserts, one flush per batch, of (1) the same encoded record
//!   bytes only, and (2) the store's whole write set for those events (record + four index
//!   entries) — the engine's own limit without validation, lookups or hashing;
//! * replay baseline: a raw sled scan of the same records (no decoding).
//!
//! Run: `cargo bench -p touchledger-store --bench store`. Results go in BENCHMARKS.md.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use touchledger_domain::{Channel, Event, Payload, Purchase, Timestamp};
use touchledger_store::{AppendItem, EventStore, ReadFilter, SledStore, StoreConfig, layout};

fn event(n: u64) -> Event {
    Event {
        event_id: format!("bench-{n:012}-0000-4000-8000-000000000000"),
        customer_id: format!("cust-{:06}", n % 5000),
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

fn append(c: &mut Criterion) {
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
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let items: Vec<_> = (next..next + batch)
                        .map(|n| AppendItem::new(event(n)))
                        .collect();
                    next += batch;
                    let t = Instant::now();
                    let out = store.append(items).expect("append");
                    total += t.elapsed();
                    assert_eq!(out.len() as u64, batch);
                }
                total
            })
        });

        // Baseline: the same record bytes (as the store encodes them), raw inserts + flush.
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path().join("raw"))
            .cache_capacity(256 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()
            .expect("open raw");
        let tree = db.open_tree("raw").expect("tree");
        // Take real record bytes from a scratch store so the baseline writes the same bytes.
        let scratch_dir = tempfile::tempdir().expect("tempdir");
        let scratch = SledStore::open(StoreConfig::new(scratch_dir.path())).expect("open");
        scratch
            .append((0..1000).map(|n| AppendItem::new(event(n))).collect())
            .expect("append");
        let values: Vec<Vec<u8>> = {
            let t = scratch_tree(&scratch);
            t.scan_prefix([layout::EVENT])
                .map(|kv| kv.expect("kv").1.to_vec())
                .collect()
        };
        let mut pos = 0u64;
        g.bench_function(BenchmarkId::new("raw_sled_records", batch), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let vals: Vec<(u64, &Vec<u8>)> = (pos..pos + batch)
                        .map(|p| (p, &values[(p % values.len() as u64) as usize]))
                        .collect();
                    pos += batch;
                    let t = Instant::now();
                    for (p, v) in vals {
                        tree.insert(layout::event_key(p), v.as_slice())
                            .expect("insert");
                    }
                    db.flush().expect("flush");
                    total += t.elapsed();
                }
                total
            })
        });

        // Baseline 2: the store's whole write set for the same events — the record plus the
        // four index entries, keys and values shaped as `layout` writes them — as raw inserts.
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path().join("raw"))
            .cache_capacity(256 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()
            .expect("open raw");
        let tree = db.open_tree("raw").expect("tree");
        let mut pos = 1u64;
        g.bench_function(BenchmarkId::new("raw_sled_write_set", batch), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut writes: Vec<(Vec<u8>, Vec<u8>)> =
                        Vec::with_capacity(5 * batch as usize);
                    for p in pos..pos + batch {
                        let e = event(p + 1_000_000_000);
                        let v = &values[(p % values.len() as u64) as usize];
                        writes.push((layout::event_key(p).to_vec(), v.clone()));
                        writes.push((layout::event_id_key(&e.event_id), v[..40].to_vec()));
                        writes.push((
                            layout::customer_key(&e.customer_id, p),
                            p.to_be_bytes().to_vec(),
                        ));
                        writes.push((layout::kind_key(e.kind(), p).to_vec(), Vec::new()));
                        writes.push((layout::time_key(e.occurred_at, p).to_vec(), Vec::new()));
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
}

fn scratch_tree(store: &SledStore) -> sled::Tree {
    store.raw_tree_for_benchmarks()
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
    let tree = store.raw_tree_for_benchmarks();
    g.bench_function("raw_sled_scan", |b| {
        b.iter(|| {
            let n = tree.scan_prefix([layout::EVENT]).fold(0u64, |n, kv| {
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
