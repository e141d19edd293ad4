//! The Pareto/NBD model (Schmittlein, Morrison & Colombo 1987), the count model BG/NBD was made
//! to approximate: purchases Poisson(λ) while alive, an exponential(μ) lifetime, λ ~ Gamma(r, α)
//! and μ ~ Gamma(s, β) across customers. Here as the alternative to compare BG/NBD with: the
//! likelihood of the same sufficient statistics ([`Rfm`]), the maximum-likelihood fit, and
//! P(alive).
//!
//! The likelihood follows Fader & Hardie (2005), "A Note on Deriving the Pareto/NBD Model and
//! Related Expressions", eq. (22):
//!
//! ```text
//!   L = Γ(r+x) α^r β^s / Γ(r) · { 1 / ((α+T)^(r+x) (β+T)^s) + s/(r+s+x) · A₀ }
//!   A₀ = F(t_x) − F(T),  F(t) = ₂F₁(r+s+x, b'; r+s+x+1; |α−β| / (m+t)) / (m+t)^(r+s+x)
//! ```
//!
//! with m = α, b' = s+1 when α ≥ β and m = β, b' = r+x otherwise, so that the hypergeometric
//! argument lies in [0, 1) and its power series converges.
//!
//! Key decisions: as in [`crate::bgnbd`], log space throughout (A₀ as ln F(t_x) plus
//! ln(1 − F(T)/F(t_x)), so the difference of two close terms loses no more than it must), and
//! the fit by Nelder–Mead over the logarithms of the four parameters.

use statrs::function::gamma::ln_gamma;

use crate::bgnbd::{ModelError, Rfm, hyp2f1};

/// Pareto/NBD population parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Shape of the Gamma purchase-rate heterogeneity.
    pub r: f64,
    /// Scale of the Gamma purchase-rate heterogeneity.
    pub alpha: f64,
    /// Shape of the Gamma dropout-rate heterogeneity.
    pub s: f64,
    /// Scale of the Gamma dropout-rate heterogeneity.
    pub beta: f64,
}

impl Params {
    /// Every parameter finite and > 0.
    pub fn usable(&self) -> bool {
        [self.r, self.alpha, self.s, self.beta]
            .iter()
            .all(|v| v.is_finite() && *v > 0.0)
    }

    /// The same numbers as BG/NBD parameters, for [`ModelError`] (r, α, s → a, β → b).
    fn as_error(&self) -> ModelError {
        let p = crate::bgnbd::Params {
            r: self.r,
            alpha: self.alpha,
            a: self.s,
            b: self.beta,
        };
        if self.usable() {
            ModelError::Degenerate(p)
        } else {
            ModelError::Params(p)
        }
    }
}

/// ln F(t) of the module's formula.
fn ln_f(p: &Params, x: f64, t: f64) -> f64 {
    let Params { r, alpha, s, beta } = *p;
    let (m, b2) = if alpha >= beta {
        (alpha, s + 1.0)
    } else {
        (beta, r + x)
    };
    let z = (alpha - beta).abs() / (m + t);
    let rsx = r + s + x;
    hyp2f1(rsx, b2, rsx + 1.0, z).ln() - rsx * (m + t).ln()
}

/// ln A₀ (−∞ when t_x = T: the customer cannot have died between the last purchase and T).
fn ln_a0(p: &Params, c: &Rfm) -> f64 {
    let (hi, lo) = (ln_f(p, c.x, c.t_x), ln_f(p, c.x, c.t));
    let d = lo - hi;
    if d.is_nan() {
        return f64::NAN;
    }
    if d >= 0.0 {
        return f64::NEG_INFINITY;
    }
    // ln(1 − e^d), accurate on both sides of d = −ln 2.
    let ln_1m = if d > -std::f64::consts::LN_2 {
        (-d.exp_m1()).ln()
    } else {
        (-d.exp()).ln_1p()
    };
    hi + ln_1m
}

/// The two terms of the braces, in logs: alive at T, and died in (t_x, T].
fn ln_terms(p: &Params, c: &Rfm) -> (f64, f64) {
    let Params { r, alpha, s, beta } = *p;
    let alive = -(r + c.x) * (alpha + c.t).ln() - s * (beta + c.t).ln();
    let died = (s / (r + s + c.x)).ln() + ln_a0(p, c);
    (alive, died)
}

/// Log-likelihood of one customer.
pub fn customer_log_likelihood(p: &Params, c: &Rfm) -> f64 {
    let Params { r, alpha, s, beta } = *p;
    let (alive, died) = ln_terms(p, c);
    let m = alive.max(died);
    ln_gamma(r + c.x) - ln_gamma(r)
        + r * alpha.ln()
        + s * beta.ln()
        + m
        + ((alive - m).exp() + (died - m).exp()).ln()
}

/// Total log-likelihood of a population.
pub fn log_likelihood(p: &Params, customers: &[Rfm]) -> f64 {
    customers
        .iter()
        .map(|c| customer_log_likelihood(p, c))
        .sum()
}

/// P(alive at T | x, t_x, T): the "alive" term's share of the braces.
pub fn p_alive(p: &Params, c: &Rfm) -> f64 {
    let (alive, died) = ln_terms(p, c);
    let odds = (died - alive).exp();
    (1.0 / (1.0 + odds)).clamp(0.0, 1.0)
}

/// E[Y(t) | x, t_x, T]: expected purchases in the next `t` (Schmittlein, Morrison & Colombo
/// 1987; Fader & Hardie 2005, eq. (26)):
///
/// ```text
///   (r+x)(β+T) / ((α+T)(s−1)) · [1 − ((β+T)/(β+T+t))^(s−1)] · P(alive)
/// ```
///
/// with its limit (r+x)(β+T)/(α+T) · ln((β+T+t)/(β+T)) · P(alive) at s = 1. `None` for t < 0
/// or unusable parameters.
pub fn expected_purchases(p: &Params, c: &Rfm, t: f64) -> Option<f64> {
    if t < 0.0 || !p.usable() {
        return None;
    }
    let Params { r, alpha, s, beta } = *p;
    let ratio = (beta + c.t) / (beta + c.t + t);
    // [1 − ratio^(s−1)] / (s−1), continuous through s = 1 (−ln ratio there).
    let k = s - 1.0;
    let growth = if k.abs() < 1e-9 {
        -ratio.ln()
    } else {
        -(k * ratio.ln()).exp_m1() / k
    };
    let e = (r + c.x) * (beta + c.t) / (alpha + c.t) * growth * p_alive(p, c);
    e.is_finite().then_some(e)
}

/// A fitted Pareto/NBD model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// The maximum-likelihood parameters.
    pub params: Params,
    /// The maximised log-likelihood.
    pub log_likelihood: f64,
    /// Optimiser iterations used.
    pub iterations: u64,
}

fn params_of(v: &[f64]) -> Params {
    Params {
        r: v[0].exp(),
        alpha: v[1].exp(),
        s: v[2].exp(),
        beta: v[3].exp(),
    }
}

/// Maximum-likelihood fit over all customers (typed errors as BG/NBD's: [`ModelError`]).
pub fn fit(customers: &[Rfm]) -> Result<Fit, ModelError> {
    crate::bgnbd::check_all(customers)?;
    let cost = crate::simplex::MeanNegLl {
        data: customers,
        ll: |v, data| log_likelihood(&params_of(v), data),
    };
    let (best, iterations) =
        crate::simplex::minimise(cost, vec![0.0; 4]).map_err(ModelError::Fit)?;
    let params = params_of(&best);
    if !params.usable() || best.iter().any(|v| v.abs() > 13.0) {
        return Err(params.as_error());
    }
    Ok(Fit {
        params,
        log_likelihood: log_likelihood(&params, customers),
        iterations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The likelihood by direct numerical integration over the lifetime τ (given λ, μ the
    /// customer is alive at T with e^(−μT), else died at τ ∈ (t_x, T]), then over λ and μ —
    /// an independent check of the closed form with its hypergeometric terms.
    fn integrated(p: &Params, c: &Rfm) -> f64 {
        use statrs::distribution::{Continuous, Gamma};
        let lam = Gamma::new(p.r, p.alpha).expect("gamma");
        let mu = Gamma::new(p.s, p.beta).expect("gamma");
        // Given λ, μ: λ^x e^(−λT) e^(−μT) + λ^x μ/(λ+μ) (e^(−(λ+μ)t_x) − e^(−(λ+μ)T)).
        let given = |l: f64, m: f64| {
            l.powf(c.x)
                * ((-(l + m) * c.t).exp()
                    + m / (l + m) * ((-(l + m) * c.t_x).exp() - (-(l + m) * c.t).exp()))
        };
        // Midpoint rule in log space for each rate: u = ln rate over [−32, 4] (shapes below 1
        // put real mass at tiny rates).
        let (n, lo, hi) = (1200, -32.0f64, 4.0f64);
        let h = (hi - lo) / n as f64;
        let mut total = 0.0;
        for i in 0..n {
            let l = (lo + h * (i as f64 + 0.5)).exp();
            let wl = lam.pdf(l) * l * h;
            for j in 0..n {
                let m = (lo + h * (j as f64 + 0.5)).exp();
                total += wl * mu.pdf(m) * m * h * given(l, m);
            }
        }
        total
    }

    #[test]
    fn the_closed_form_equals_the_integral_on_both_branches() {
        for p in [
            Params {
                r: 0.553,
                alpha: 10.578,
                s: 0.606,
                beta: 11.669,
            },
            Params {
                r: 1.2,
                alpha: 8.0,
                s: 0.9,
                beta: 3.0,
            },
        ] {
            for c in [
                Rfm {
                    x: 0.0,
                    t_x: 0.0,
                    t: 38.86,
                },
                Rfm {
                    x: 2.0,
                    t_x: 30.43,
                    t: 38.86,
                },
                Rfm {
                    x: 5.0,
                    t_x: 12.0,
                    t: 30.0,
                },
            ] {
                let closed = customer_log_likelihood(&p, &c).exp();
                let numeric = integrated(&p, &c);
                assert!(
                    (closed / numeric - 1.0).abs() < 1e-4,
                    "{p:?} {c:?}: closed {closed}, integral {numeric}"
                );
                let alive = p_alive(&p, &c);
                assert!((0.0..=1.0).contains(&alive), "{alive}");
            }
        }
    }

    /// E[Y(t) | data] by the same integration: alive at T given (λ, μ) with weight
    /// λ^x e^(−(λ+μ)T), then expecting λ/μ (1 − e^(−μt)) purchases; over the likelihood.
    #[test]
    fn expected_purchases_equal_the_integral() {
        use statrs::distribution::{Continuous, Gamma};
        for p in [
            Params {
                r: 0.553,
                alpha: 10.578,
                s: 0.606,
                beta: 11.669,
            },
            Params {
                r: 1.2,
                alpha: 8.0,
                s: 1.0,
                beta: 3.0,
            },
            Params {
                r: 1.2,
                alpha: 8.0,
                s: 2.5,
                beta: 3.0,
            },
        ] {
            let lam = Gamma::new(p.r, p.alpha).expect("gamma");
            let mu = Gamma::new(p.s, p.beta).expect("gamma");
            for (c, t) in [
                (
                    Rfm {
                        x: 2.0,
                        t_x: 30.43,
                        t: 38.86,
                    },
                    39.0,
                ),
                (
                    Rfm {
                        x: 0.0,
                        t_x: 0.0,
                        t: 20.0,
                    },
                    10.0,
                ),
            ] {
                let (n, lo, hi) = (900, -32.0f64, 4.0f64);
                let h = (hi - lo) / n as f64;
                let (mut num, mut den) = (0.0, 0.0);
                for i in 0..n {
                    let l = (lo + h * (i as f64 + 0.5)).exp();
                    let wl = lam.pdf(l) * l * h;
                    for j in 0..n {
                        let m = (lo + h * (j as f64 + 0.5)).exp();
                        let w = wl * mu.pdf(m) * m * h;
                        let alive = l.powf(c.x) * (-(l + m) * c.t).exp();
                        let died = l.powf(c.x) * m / (l + m)
                            * ((-(l + m) * c.t_x).exp() - (-(l + m) * c.t).exp());
                        den += w * (alive + died);
                        num += w * alive * l / m * (1.0 - (-m * t).exp());
                    }
                }
                let closed = expected_purchases(&p, &c, t).expect("E[Y]");
                assert!(
                    (closed / (num / den) - 1.0).abs() < 1e-3,
                    "{p:?} {c:?}: closed {closed}, integral {}",
                    num / den
                );
            }
        }
    }

    #[test]
    fn a_customer_without_repeat_purchases_is_alive_only_by_the_first_term() {
        let p = Params {
            r: 0.553,
            alpha: 10.578,
            s: 0.606,
            beta: 11.669,
        };
        // A long silence after the last purchase lowers P(alive); a purchase at T means alive.
        let recent = Rfm {
            x: 3.0,
            t_x: 38.0,
            t: 38.86,
        };
        let silent = Rfm {
            x: 3.0,
            t_x: 5.0,
            t: 38.86,
        };
        assert!(p_alive(&p, &recent) > p_alive(&p, &silent));
        let now = Rfm {
            x: 3.0,
            t_x: 38.86,
            t: 38.86,
        };
        assert_eq!(p_alive(&p, &now), 1.0);
        assert_eq!(fit(&[]), Err(ModelError::Empty));
    }
}
