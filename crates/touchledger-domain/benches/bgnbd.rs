//! The count and spend models' fit times on the full CDNOW master log (23,570 customers,
//! calibration to 1997-09-30, weeks): BG/NBD, Pareto/NBD and Gamma-Gamma (on the repeat buyers'
//! mean repeat purchase-day value, the first purchase-day excluded), each with one scalar
//! log-likelihood evaluation over the same customers (a plain per-customer sum) as the in-run
//! reference.
//!
//! Run: `cargo bench -p touchledger-domain --bench bgnbd` (reads ../shared/data/cdnow/CDNOW_master.txt
//! beside the repository, or the path in CDNOW_MASTER).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use touchledger_domain::bgnbd::{self, Params, Rfm};
use touchledger_domain::gammagamma::{self, Spend};
use touchledger_domain::paretonbd;

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

/// Every customer's BG/NBD statistics and, for repeat buyers, their repeat spend (dollars).
fn load() -> (Vec<Rfm>, Vec<Spend>) {
    let path = std::env::var("CDNOW_MASTER").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/data/cdnow/CDNOW_master.txt"
        )
        .to_owned()
    });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let end = days(19970930);
    // Customer → day → value (a day's orders summed).
    let mut per: BTreeMap<u32, BTreeMap<i64, f64>> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [id, date, _, value] = f[..] else {
            continue;
        };
        let (id, d): (u32, i64) = (id.parse().expect("id"), days(date.parse().expect("date")));
        if d <= end {
            *per.entry(id).or_default().entry(d).or_default() +=
                value.parse::<f64>().expect("value");
        }
    }
    let mut spends = Vec::new();
    let rfm = per
        .into_values()
        .map(|by_day| {
            let ds: Vec<i64> = by_day.keys().copied().collect();
            let (first, last) = (ds[0], ds[ds.len() - 1]);
            let repeat: Vec<f64> = by_day.values().skip(1).copied().collect();
            let total: f64 = repeat.iter().sum();
            if !repeat.is_empty() && total > 0.0 {
                spends.push(Spend {
                    x: repeat.len() as f64,
                    mean: total / repeat.len() as f64,
                });
            }
            Rfm {
                x: (ds.len() - 1) as f64,
                t_x: (last - first) as f64 / 7.0,
                t: (end - first) as f64 / 7.0,
            }
        })
        .collect();
    (rfm, spends)
}

fn bench(c: &mut Criterion) {
    let (customers, spends) = load();
    assert_eq!(customers.len(), 23_570);
    let fit = bgnbd::fit(&customers).expect("fit");
    eprintln!("CDNOW master ({} customers): {:?}", customers.len(), fit);
    let pareto = paretonbd::fit(&customers).expect("Pareto/NBD fit");
    eprintln!("Pareto/NBD: {pareto:?}");
    let spend = gammagamma::fit(&spends).expect("Gamma-Gamma fit");
    eprintln!("Gamma-Gamma ({} repeat buyers): {spend:?}", spends.len());
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
    let mut g = c.benchmark_group("paretonbd_cdnow_master");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("fit", |b| {
        b.iter(|| black_box(paretonbd::fit(black_box(&customers)).expect("fit")))
    });
    g.bench_function("log_likelihood_once", |b| {
        b.iter(|| {
            black_box(paretonbd::log_likelihood(
                &pareto.params,
                black_box(&customers),
            ))
        })
    });
    g.finish();
    let mut g = c.benchmark_group("gammagamma_cdnow_master");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("fit", |b| {
        b.iter(|| black_box(gammagamma::fit(black_box(&spends)).expect("fit")))
    });
    g.bench_function("log_likelihood_once", |b| {
        b.iter(|| {
            black_box(gammagamma::log_likelihood(
                &spend.params,
                black_box(&spends),
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
