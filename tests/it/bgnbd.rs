//! BG/NBD on the real CDNOW sample (vendored in tests/data/cdnow with its provenance): the
//! maximum-likelihood fit must reproduce Fader, Hardie & Lee (2005).

use touchledger_domain::bgnbd::{self, Params, Rfm};

fn cdnow_sample() -> Vec<Rfm> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/cdnow/cdnow_customers_summary.csv"
    );
    let mut rdr = csv::Reader::from_path(path).expect("vendored CDNOW summary");
    rdr.records()
        .map(|r| {
            let r = r.expect("row");
            let f = |i: usize| r[i].parse::<f64>().expect("number");
            Rfm {
                x: f(1),
                t_x: f(2),
                t: f(3),
            }
        })
        .collect()
}

#[test]
fn fit_reproduces_the_published_cdnow_estimates() {
    let customers = cdnow_sample();
    assert_eq!(customers.len(), 2357);
    let fit = bgnbd::fit(&customers).expect("fit");
    let published = Params {
        r: 0.2426,
        alpha: 4.4135,
        a: 0.7929,
        b: 2.4258,
    };
    for (name, got, want) in [
        ("r", fit.params.r, published.r),
        ("alpha", fit.params.alpha, published.alpha),
        ("a", fit.params.a, published.a),
        ("b", fit.params.b, published.b),
    ] {
        assert!(
            (got - want).abs() / want < 0.005,
            "{name} = {got}, published {want} ({fit:?})"
        );
    }
    assert!(
        (fit.log_likelihood - -9582.4).abs() < 0.5,
        "LL = {}",
        fit.log_likelihood
    );
    // With the fitted parameters, the paper's worked example.
    let ey = bgnbd::expected_purchases(
        &fit.params,
        &Rfm {
            x: 2.0,
            t_x: 30.43,
            t: 38.86,
        },
        39.0,
    )
    .expect("defined");
    assert!((ey - 1.226).abs() < 0.002, "E[Y(39)] = {ey}");
}
