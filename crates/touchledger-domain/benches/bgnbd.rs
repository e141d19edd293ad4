//! BG/NBD fit time on the full CDNOW master log (23,570 customers, calibration to 1997-09-30,
//! weeks), with one log-likelihood evaluation over the same customers as the in-run reference.
//!
//! Run: `cargo bench -p touchledger-domain --bench bgnbd` (reads ../shared/data/cdnow/CDNOW_master.txt
//! beside the repository, or the path in CDNOW_MASTER).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use touchledger_domain::bgnbd::{self, Params, Rfm};

/// Days since 1970-01-01 of a YYYYMMDD date (proleptic Gregorian).
fn days(yyyymmdd: u32) -> i64 {
    let (y, m, d) = (
        (yyyymmdd / 10000) as i64,
        ((yyyymmdd / 100) % 100) as i64,
        (yyyymmdd % 100) as i64,
    );
    let (y, m) = if m <= 2 { (y - 1, m + 12) } else { (y, m) };
    365 * y + y / 4 - y / 100 + y / 400 + (153 * (m - 3) + 2) / 5 + d - 719469
}

fn load() -> Vec<Rfm> {
    let path = std::env::var("CDNOW_MASTER").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/data/cdnow/CDNOW_master.txt"
        )
        .to_owned()
    });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let end = days(19970930);
    let mut per: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let mut f = line.split_whitespace();
        let (Some(id), Some(date)) = (f.next(), f.next()) else {
            continue;
        };
        let (id, d): (u32, i64) = (id.parse().expect("id"), days(date.parse().expect("date")));
        if d <= end {
            per.entry(id).or_default().push(d);
        }
    }
    per.into_values()
        .map(|mut ds| {
            ds.sort_unstable();
            ds.dedup();
            let (first, last) = (ds[0], ds[ds.len() - 1]);
            Rfm {
                x: (ds.len() - 1) as f64,
                t_x: (last - first) as f64 / 7.0,
                t: (end - first) as f64 / 7.0,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let customers = load();
    assert_eq!(customers.len(), 23_570);
    let fit = bgnbd::fit(&customers).expect("fit");
    eprintln!("CDNOW master ({} customers): {:?}", customers.len(), fit);
    let p = Params {
        r: 0.24,
        alpha: 4.4,
        a: 0.79,
        b: 2.4,
    };
    let mut g = c.benchmark_group("bgnbd_cdnow_master");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("fit", |b| {
        b.iter(|| black_box(bgnbd::fit(black_box(&customers)).expect("fit")))
    });
    g.bench_function("log_likelihood_once", |b| {
        b.iter(|| black_box(bgnbd::log_likelihood(&p, black_box(&customers))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
