//! The BG/NBD model (Fader, Hardie & Lee 2005, "Counting Your Customers the Easy Way"):
//! per-customer sufficient statistics, the log-likelihood, the maximum-likelihood fit, and the
//! quantities the churn assessor needs — P(alive), expected purchases in the next t,
//! P(X(t) = n), and the probability of no purchase in the next t.
//!
//! Key decisions:
//! * Everything is computed in log space (`ln Γ`, `ln B` from statrs, log-sum-exp), so the
//!   likelihood stays finite for customers with many purchases or long histories.
//! * The fit optimises over `ln r, ln α, ln a, ln b` with Nelder–Mead (argmin): parameters stay
//!   positive without constraints, and no gradient is needed.
//! * No NaN escapes: inputs and parameters are validated ([`ModelError`]); functions of valid
//!   inputs return finite values (probabilities clamped to [0, 1]).
//! * Time is in whatever unit the caller chooses (days or weeks) — consistently for t_x, T and t.

use argmin::core::CostFunction;
use statrs::function::beta::ln_beta;
use statrs::function::gamma::ln_gamma;

/// A customer's sufficient statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rfm {
    /// Repeat purchase-days (purchase-days − 1).
    pub x: f64,
    /// Time from the first to the last purchase.
    pub t_x: f64,
    /// Time from the first purchase to the end of observation (`as_of`).
    pub t: f64,
}

/// Population parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Shape of the Gamma purchase-rate heterogeneity.
    pub r: f64,
    /// Scale of the Gamma purchase-rate heterogeneity.
    pub alpha: f64,
    /// Beta dropout heterogeneity, a.
    pub a: f64,
    /// Beta dropout heterogeneity, b.
    pub b: f64,
}

/// Invalid inputs to the model.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// Parameters must be finite and > 0.
    #[error("BG/NBD parameters must be finite and > 0: {0:?}")]
    Params(Params),
    /// Statistics must satisfy x ≥ 0, 0 ≤ t_x ≤ T, finite; x > 0 requires t_x > 0.
    #[error("invalid customer statistics {0:?} (need x >= 0, 0 <= t_x <= T, finite)")]
    Rfm(Rfm),
    /// No customers to fit.
    #[error("no customers to fit")]
    Empty,
    /// The optimiser failed.
    #[error("fit failed: {0}")]
    Fit(String),
    /// The likelihood has no interior maximum: the parameters run off to 0 or infinity (for
    /// example, nobody in the data shows any sign of dropping out). Such a "fit" is not
    /// recorded; gather more history or fit on a later calibration end.
    #[error(
        "the BG/NBD likelihood has no interior maximum on these data (parameters diverge to {0:?}); not a usable model"
    )]
    Degenerate(Params),
}

impl Params {
    /// Check the parameters are usable.
    pub fn check(&self) -> Result<(), ModelError> {
        let ok = [self.r, self.alpha, self.a, self.b]
            .iter()
            .all(|v| v.is_finite() && *v > 0.0);
        if ok {
            Ok(())
        } else {
            Err(ModelError::Params(*self))
        }
    }
}

impl Rfm {
    /// Check the statistics are usable.
    pub fn check(&self) -> Result<(), ModelError> {
        let ok = [self.x, self.t_x, self.t].iter().all(|v| v.is_finite())
            && self.x >= 0.0
            && self.t_x >= 0.0
            && self.t_x <= self.t
            && (self.x == 0.0 || self.t_x > 0.0);
        if ok {
            Ok(())
        } else {
            Err(ModelError::Rfm(*self))
        }
    }
}

fn log_add_exp(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        m
    } else {
        m + ((a - m).exp() + (b - m).exp()).ln()
    }
}

/// Log-likelihood of one customer (paper eq. 6, in log space).
pub fn customer_log_likelihood(p: &Params, c: &Rfm) -> f64 {
    let Params { r, alpha, a, b } = *p;
    let Rfm { x, t_x, t } = *c;
    let a1 = ln_gamma(r + x) - ln_gamma(r) + r * alpha.ln();
    let a2 = ln_beta(a, b + x) - ln_beta(a, b);
    let a3 = -(r + x) * (alpha + t).ln();
    let tail = if x > 0.0 {
        // ln[ B(a+1, b+x−1) / B(a, b+x) ] = ln a − ln(b+x−1)
        a.ln() - (b + x - 1.0).ln() - (r + x) * (alpha + t_x).ln()
    } else {
        f64::NEG_INFINITY
    };
    a1 + a2 + log_add_exp(a3, tail)
}

/// Total log-likelihood of a population.
pub fn log_likelihood(p: &Params, customers: &[Rfm]) -> f64 {
    customers
        .iter()
        .map(|c| customer_log_likelihood(p, c))
        .sum()
}

/// A fitted model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// The maximum-likelihood parameters.
    pub params: Params,
    /// The maximised log-likelihood.
    pub log_likelihood: f64,
    /// Optimiser iterations used.
    pub iterations: u64,
}

/// Customers with identical statistics contribute identical terms: the fit evaluates each
/// distinct (x, t_x, T) once, weighted by its count. (On CDNOW most one-time buyers share T.)
///
/// The cost is the negative log-likelihood **per customer**: the optimiser's stopping rule (the
/// spread of the simplex's costs) then means the same relative precision for 2,357 customers
/// as for a million. On the total, a fixed tolerance is unreachable in floating point once the
/// likelihood is large (−1.8·10⁷ at a million customers), and the fit ran its 5,000 iterations.
struct NegLl {
    distinct: Vec<(Rfm, f64)>,
    customers: f64,
}

impl NegLl {
    fn new(customers: &[Rfm]) -> Self {
        let mut keyed: Vec<([u64; 3], Rfm)> = customers
            .iter()
            .map(|c| ([c.x.to_bits(), c.t_x.to_bits(), c.t.to_bits()], *c))
            .collect();
        keyed.sort_unstable_by_key(|(k, _)| *k);
        let mut distinct: Vec<(Rfm, f64)> = Vec::new();
        let mut last: Option<[u64; 3]> = None;
        for (k, c) in keyed {
            match distinct.last_mut() {
                Some((_, w)) if last == Some(k) => *w += 1.0,
                _ => distinct.push((c, 1.0)),
            }
            last = Some(k);
        }
        NegLl {
            distinct,
            customers: customers.len() as f64,
        }
    }
}

impl CostFunction for NegLl {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, p: &Self::Param) -> Result<f64, argmin::core::Error> {
        let params = Params {
            r: p[0].exp(),
            alpha: p[1].exp(),
            a: p[2].exp(),
            b: p[3].exp(),
        };
        // `distinct` is sorted by x first: the terms that depend on x alone (four ln Γ / ln B
        // and ln(b+x−1)) are computed once per distinct x, and each customer costs two
        // logarithms and a log-sum-exp. Same operations in the same order as
        // `customer_log_likelihood`, so the same bits per customer.
        let Params { r, alpha, a, b } = params;
        let (ln_gamma_r, ln_alpha, ln_beta_ab, ln_a) =
            (ln_gamma(r), alpha.ln(), ln_beta(a, b), a.ln());
        let mut ll = 0.0;
        let mut by_x = (f64::NAN, 0.0, 0.0);
        for (c, w) in &self.distinct {
            let Rfm { x, t_x, t } = *c;
            if by_x.0.to_bits() != x.to_bits() {
                let a1 = ln_gamma(r + x) - ln_gamma_r + r * ln_alpha;
                let a2 = ln_beta(a, b + x) - ln_beta_ab;
                by_x = (x, a1 + a2, ln_a - (b + x - 1.0).ln());
            }
            let a3 = -(r + x) * (alpha + t).ln();
            let tail = if x > 0.0 {
                by_x.2 - (r + x) * (alpha + t_x).ln()
            } else {
                f64::NEG_INFINITY
            };
            ll += w * (by_x.1 + log_add_exp(a3, tail));
        }
        // Outside the numerically valid region the simplex is pushed back, never given NaN.
        Ok(if ll.is_finite() {
            -ll / self.customers
        } else {
            f64::MAX
        })
    }
}

/// Something to fit, and every customer's statistics usable.
pub(crate) fn check_all(customers: &[Rfm]) -> Result<(), ModelError> {
    if customers.is_empty() {
        return Err(ModelError::Empty);
    }
    customers.iter().try_for_each(Rfm::check)
}

/// Maximum-likelihood fit over all customers.
pub fn fit(customers: &[Rfm]) -> Result<Fit, ModelError> {
    check_all(customers)?;
    // Start from r = α = a = b = 1 (in log space: 0) with a unit simplex.
    let (best, iterations) =
        crate::simplex::minimise(NegLl::new(customers), vec![0.0; 4]).map_err(ModelError::Fit)?;
    let params = Params {
        r: best[0].exp(),
        alpha: best[1].exp(),
        a: best[2].exp(),
        b: best[3].exp(),
    };
    params.check()?;
    // Beyond e^±13 (≈ 4.5e5 / 2.3e-6) the optimiser is walking along a ridge towards the
    // boundary, not converging on a maximum.
    if best.iter().any(|v| v.abs() > 13.0) {
        return Err(ModelError::Degenerate(params));
    }
    Ok(Fit {
        params,
        log_likelihood: log_likelihood(&params, customers),
        iterations,
    })
}

/// The odds term a/(b+x−1) · ((α+T)/(α+t_x))^(r+x), in log space, for x > 0.
fn ln_dead_odds(p: &Params, c: &Rfm) -> Option<f64> {
    (c.x > 0.0).then(|| {
        p.a.ln() - (p.b + c.x - 1.0).ln()
            + (p.r + c.x) * ((p.alpha + c.t).ln() - (p.alpha + c.t_x).ln())
    })
}

/// P(alive at T | x, t_x, T). Customers with no repeat purchase get 1 (a BG/NBD property: they
/// cannot have dropped out yet) — use [`p_no_purchase`] for them.
pub fn p_alive(p: &Params, c: &Rfm) -> f64 {
    match ln_dead_odds(p, c) {
        None => 1.0,
        // 1 / (1 + e^z), computed stably.
        Some(z) => {
            if z > 0.0 {
                (-z).exp() / (1.0 + (-z).exp())
            } else {
                1.0 / (1.0 + z.exp())
            }
        }
    }
    .clamp(0.0, 1.0)
}

/// Gauss hypergeometric 2F1(a, b; c; z) for 0 ≤ z < 1 by its power series; NaN when the
/// series has not converged in 100,000 terms (z very near 1), never a silently short sum.
pub(crate) fn hyp2f1(a: f64, b: f64, c: f64, z: f64) -> f64 {
    let mut term = 1.0;
    let mut sum = 1.0;
    for k in 0..100_000u32 {
        let k = f64::from(k);
        term *= (a + k) * (b + k) / ((c + k) * (k + 1.0)) * z;
        sum += term;
        if term.abs() <= 1e-15 * sum.abs() {
            return sum;
        }
    }
    f64::NAN
}

/// E[Y(t) | x, t_x, T]: expected purchases in the next `t` (paper eq. 10). The closed form is
/// undefined at a = 1 exactly (and for t < 0): `None` then.
pub fn expected_purchases(p: &Params, c: &Rfm, t: f64) -> Option<f64> {
    let Params { r, alpha, a, b } = *p;
    let Rfm { x, t: big_t, .. } = *c;
    if (a - 1.0).abs() < 1e-12 || t < 0.0 {
        return None;
    }
    let z = t / (alpha + big_t + t);
    let head = (a + b + x - 1.0) / (a - 1.0);
    let body = 1.0
        - ((alpha + big_t) / (alpha + big_t + t)).powf(r + x)
            * hyp2f1(r + x, b + x, a + b + x - 1.0, z);
    let denom = 1.0 + ln_dead_odds(p, c).map_or(0.0, f64::exp);
    let v = head * body / denom;
    v.is_finite().then_some(v.max(0.0))
}

/// E[X(t)]: the expected purchases of a new customer in a period of length `t` after their
/// first purchase (paper eq. 9); what the "tracking" plot sums over a cohort. `None` at a = 1
/// exactly, for t < 0, or when the series does not converge.
pub fn expected_transactions(p: &Params, t: f64) -> Option<f64> {
    let Params { r, alpha, a, b } = *p;
    if (a - 1.0).abs() < 1e-12 || t < 0.0 {
        return None;
    }
    if t == 0.0 {
        return Some(0.0);
    }
    let z = t / (alpha + t);
    let v = (a + b - 1.0) / (a - 1.0)
        * (1.0 - (alpha / (alpha + t)).powf(r) * hyp2f1(r, b, a + b - 1.0, z));
    v.is_finite().then_some(v.max(0.0))
}

/// P(X(t) = n): the probability that a new customer makes `n` purchases in a period of length
/// `t` (paper eq. 8).
pub fn p_purchases(p: &Params, t: f64, n: u32) -> f64 {
    let Params { r, alpha, a, b } = *p;
    let nf = f64::from(n);
    let ln_q = (alpha / (alpha + t)).ln();
    let ln_z = (t / (alpha + t)).ln();
    // Γ(r+n) / (Γ(r) n!) (α/(α+t))^r (t/(α+t))^n
    let ln_nbd = |j: f64| {
        ln_gamma(r + j) - ln_gamma(r) - ln_gamma(j + 1.0)
            + r * ln_q
            + if j > 0.0 { j * ln_z } else { 0.0 }
    };
    let first = (ln_beta(a, b + nf) - ln_beta(a, b) + ln_nbd(nf)).exp();
    let second = if n > 0 {
        let cdf: f64 = (0..n).map(|j| ln_nbd(f64::from(j)).exp()).sum();
        (ln_beta(a + 1.0, b + nf - 1.0) - ln_beta(a, b)).exp() * (1.0 - cdf)
    } else {
        0.0
    };
    (first + second).clamp(0.0, 1.0)
}

/// P(no purchase in the next `t` | x, t_x, T): dead already, or alive and silent. Dropout can
/// only follow a purchase, so an alive customer who buys nothing cannot drop out meanwhile:
/// P = (1 − P(alive)) + P(alive) · ((α+T)/(α+T+t))^(r+x). Correct for x = 0 (P(alive) = 1).
pub fn p_no_purchase(p: &Params, c: &Rfm, t: f64) -> f64 {
    let alive = p_alive(p, c);
    let silent = ((p.alpha + c.t) / (p.alpha + c.t + t)).powf(p.r + c.x);
    ((1.0 - alive) + alive * silent).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_cost_equals_the_sum_of_customer_likelihoods_bit_for_bit() {
        // Several customers per x (the cost groups them) and some exact duplicates (weights).
        let mut customers = Vec::new();
        let mut s = 0x2545_f491_4f6c_dd1d_u64;
        for i in 0..3000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = (s % 9) as f64;
            let t = 1.0 + (s >> 8) as f64 % 70.0;
            let t_x = if x > 0.0 {
                t * ((s >> 20) % 100 + 1) as f64 / 101.0
            } else {
                0.0
            };
            customers.push(Rfm { x, t_x, t });
            if i % 10 == 0 {
                customers.push(Rfm { x, t_x, t });
            }
        }
        let nll = NegLl::new(&customers);
        for p in [
            [0.0f64, 0.0, 0.0, 0.0],
            [-1.4, 1.5, -0.2, 0.9],
            [0.3, -2.0, 1.1, -0.5],
        ] {
            let params = Params {
                r: p[0].exp(),
                alpha: p[1].exp(),
                a: p[2].exp(),
                b: p[3].exp(),
            };
            let want: f64 = nll
                .distinct
                .iter()
                .map(|(c, w)| w * customer_log_likelihood(&params, c))
                .sum();
            let got = nll.cost(&p.to_vec()).expect("cost");
            assert_eq!(
                got.to_bits(),
                (-want / customers.len() as f64).to_bits(),
                "{p:?}"
            );
        }
    }

    #[test]
    fn data_without_dropout_signal_is_refused_not_fitted() {
        // Everyone bought steadily right up to the end of observation: nothing suggests
        // dropout, and the likelihood increases without bound towards a → 0.
        let customers: Vec<Rfm> = (0..200)
            .map(|i| {
                let t = 40.0 + f64::from(i % 13);
                Rfm {
                    x: 8.0 + f64::from(i % 5),
                    t_x: t,
                    t,
                }
            })
            .collect();
        match fit(&customers) {
            Err(ModelError::Degenerate(p)) => assert!(p.check().is_ok()),
            other => panic!("expected a degenerate fit, got {other:?}"),
        }
    }

    /// The published MLE on the CDNOW sample (Fader, Hardie & Lee 2005).
    const PAPER: Params = Params {
        r: 0.2426,
        alpha: 4.4135,
        a: 0.7929,
        b: 2.4258,
    };

    #[test]
    fn closed_forms_match_the_published_values() {
        // E[Y(39) | x = 2, t_x = 30.43, T = 38.86] = 1.226 (the paper's worked example).
        let c = Rfm {
            x: 2.0,
            t_x: 30.43,
            t: 38.86,
        };
        let ey = expected_purchases(&PAPER, &c, 39.0).expect("defined");
        assert!((ey - 1.226).abs() < 0.0015, "E[Y(39)] = {ey}");
        // The reference values of R's BTYD package (its vignette), computed with the parameters
        // rounded to three decimals: r = 0.243, α = 4.414, a = 0.793, b = 2.426.
        let btyd = Params {
            r: 0.243,
            alpha: 4.414,
            a: 0.793,
            b: 2.426,
        };
        let p0 = p_purchases(&btyd, 39.0, 0);
        assert!((p0 - 0.5737864).abs() < 5e-7, "P(X(39)=0) = {p0}");
        let p10 = p_purchases(&btyd, 2.0, 10);
        assert!(
            (p10 - 1.07869e-07).abs() / 1.07869e-07 < 1e-3,
            "P(X(2)=10) = {p10}"
        );
    }

    #[test]
    fn probabilities_are_bounded_and_sum_to_one() {
        let s: f64 = (0..200).map(|n| p_purchases(&PAPER, 39.0, n)).sum();
        assert!((s - 1.0).abs() < 1e-6, "{s}");
        for c in [
            Rfm {
                x: 0.0,
                t_x: 0.0,
                t: 30.0,
            },
            Rfm {
                x: 5.0,
                t_x: 2.0,
                t: 60.0,
            },
            Rfm {
                x: 50.0,
                t_x: 59.0,
                t: 60.0,
            },
        ] {
            let a = p_alive(&PAPER, &c);
            let z = p_no_purchase(&PAPER, &c, 10.0);
            assert!(
                (0.0..=1.0).contains(&a) && (0.0..=1.0).contains(&z),
                "{c:?}: {a} {z}"
            );
        }
        // One-time buyers: P(alive) = 1, but P(no purchase in the next period) is informative.
        let one = Rfm {
            x: 0.0,
            t_x: 0.0,
            t: 30.0,
        };
        assert_eq!(p_alive(&PAPER, &one), 1.0);
        assert!(p_no_purchase(&PAPER, &one, 39.0) > 0.5);
    }

    #[test]
    fn invalid_inputs_are_refused() {
        assert!(Params { r: -1.0, ..PAPER }.check().is_err());
        assert!(
            Params {
                alpha: f64::NAN,
                ..PAPER
            }
            .check()
            .is_err()
        );
        assert!(
            Rfm {
                x: 1.0,
                t_x: 5.0,
                t: 4.0
            }
            .check()
            .is_err()
        );
        assert!(
            Rfm {
                x: 1.0,
                t_x: 0.0,
                t: 4.0
            }
            .check()
            .is_err()
        );
        assert_eq!(fit(&[]), Err(ModelError::Empty));
    }
}
