//! The Gamma-Gamma spend model (Fader, Hardie & Lee 2005, "RFM and CLV: Using Iso-Value Curves
//! for Customer Base Analysis", JMR 42(4); Fader & Hardie 2013, "The Gamma-Gamma Model of
//! Monetary Value"): the value of a customer's transactions varies around their own mean, and
//! that mean varies across customers. It gives each customer's expected average transaction
//! value, shrunk from their observed mean towards the population's by how few transactions
//! the observation rests on.
//!
//! The model: a customer's transaction values z_i are Gamma(p, ν) with ν itself Gamma(q, γ)
//! across customers. For a customer with x transactions of mean m (x ≥ 1), the marginal density
//! of m is
//!
//! ```text
//!   f(m | p, q, γ, x) = Γ(px + q) / (Γ(px) Γ(q)) · γ^q · m^(px−1) · x^(px) / (γ + x m)^(px+q)
//! ```
//!
//! and the conditional expectation of the customer's mean value is
//!
//! ```text
//!   E[Z | p, q, γ, m, x] = p (γ + x m) / (px + q − 1)
//!                        = (q − 1)/(px + q − 1) · pγ/(q − 1)  +  px/(px + q − 1) · m
//! ```
//!
//! Key decisions:
//! * Fitted, like the paper, on **repeat** transactions (the first purchase is excluded by the
//!   caller: x is the count of repeat purchase-days, m their mean value); customers without a
//!   repeat transaction carry no information about their own mean and are not fitted. They get
//!   the population mean pγ/(q − 1).
//! * Values are in whatever money unit the caller chooses; γ is in the same unit (the model is
//!   scale-equivariant: values ×k give γ ×k, p and q unchanged).
//! * The fit optimises the mean log-likelihood per customer over ln p, ln q, ln γ with
//!   Nelder–Mead (argmin), as the BG/NBD fit does; the population mean exists only for q > 1,
//!   which is checked ([`SpendError::NoMean`]), never returned as a negative or infinite value.

use statrs::function::gamma::ln_gamma;

/// A customer's repeat transactions: how many, and their mean value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spend {
    /// Number of repeat transactions (≥ 1).
    pub x: f64,
    /// Mean value of those transactions (> 0).
    pub mean: f64,
}

/// The model's population parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Shape of a customer's transaction values around their own mean.
    pub p: f64,
    /// Shape of the heterogeneity of the customers' means.
    pub q: f64,
    /// Scale of the heterogeneity of the customers' means (a money amount).
    pub gamma: f64,
}

/// Invalid inputs to, or an unusable result of, the spend model.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SpendError {
    /// Parameters must be finite and > 0.
    #[error("Gamma-Gamma parameters must be finite and > 0: {0:?}")]
    Params(Params),
    /// Statistics must be finite with x ≥ 1 and a mean > 0.
    #[error("invalid spend statistics {0:?} (need x >= 1 repeat transactions and a mean > 0)")]
    Spend(Spend),
    /// No customer with a repeat transaction to fit.
    #[error("no customers with repeat transactions to fit")]
    Empty,
    /// The optimiser failed.
    #[error("Gamma-Gamma fit failed: {0}")]
    Fit(String),
    /// The likelihood has no interior maximum on these data.
    #[error(
        "the Gamma-Gamma likelihood has no interior maximum on these data (parameters diverge to {0:?}); not a usable model"
    )]
    Degenerate(Params),
    /// With q ≤ 1 the population's mean transaction value is infinite.
    #[error("q = {0} <= 1: the fitted spend distribution has no finite mean")]
    NoMean(f64),
}

impl Params {
    /// Check the parameters are usable.
    pub fn check(&self) -> Result<(), SpendError> {
        if [self.p, self.q, self.gamma]
            .iter()
            .all(|v| v.is_finite() && *v > 0.0)
        {
            Ok(())
        } else {
            Err(SpendError::Params(*self))
        }
    }

    /// The population's mean transaction value, pγ/(q − 1): what a customer without repeat
    /// transactions is expected to spend per transaction.
    pub fn population_mean(&self) -> Result<f64, SpendError> {
        self.check()?;
        if self.q <= 1.0 {
            return Err(SpendError::NoMean(self.q));
        }
        Ok(self.p * self.gamma / (self.q - 1.0))
    }

    /// The expected mean transaction value of a customer with `spend` (`None`: no repeat
    /// transaction yet, the population mean).
    pub fn expected_average_value(&self, spend: Option<&Spend>) -> Result<f64, SpendError> {
        let population = self.population_mean()?;
        let Some(s) = spend else {
            return Ok(population);
        };
        s.check()?;
        let px = self.p * s.x;
        let denominator = px + self.q - 1.0;
        Ok((self.q - 1.0) / denominator * population + px / denominator * s.mean)
    }
}

impl Spend {
    /// Check the statistics are usable.
    pub fn check(&self) -> Result<(), SpendError> {
        if self.x.is_finite() && self.x >= 1.0 && self.mean.is_finite() && self.mean > 0.0 {
            Ok(())
        } else {
            Err(SpendError::Spend(*self))
        }
    }
}

/// Log-likelihood of one customer's mean value.
pub fn customer_log_likelihood(params: &Params, s: &Spend) -> f64 {
    let Params { p, q, gamma } = *params;
    let Spend { x, mean } = *s;
    let px = p * x;
    ln_gamma(px + q) - ln_gamma(px) - ln_gamma(q)
        + q * gamma.ln()
        + (px - 1.0) * mean.ln()
        + px * x.ln()
        - (px + q) * (gamma + x * mean).ln()
}

/// Total log-likelihood of a population.
pub fn log_likelihood(params: &Params, customers: &[Spend]) -> f64 {
    customers
        .iter()
        .map(|s| customer_log_likelihood(params, s))
        .sum()
}

/// A fitted spend model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// The maximum-likelihood parameters.
    pub params: Params,
    /// The maximised log-likelihood.
    pub log_likelihood: f64,
    /// Customers fitted (those with a repeat transaction).
    pub customers: usize,
    /// Optimiser iterations used.
    pub iterations: u64,
}

fn params_of(v: &[f64]) -> Params {
    Params {
        p: v[0].exp(),
        q: v[1].exp(),
        gamma: v[2].exp(),
    }
}

/// Maximum-likelihood fit over the customers with repeat transactions.
pub fn fit(customers: &[Spend]) -> Result<Fit, SpendError> {
    if customers.is_empty() {
        return Err(SpendError::Empty);
    }
    for s in customers {
        s.check()?;
    }
    // Start from p = q = 1 and γ = the overall mean value (the scale of the data), in log space,
    // with a unit simplex.
    let overall = customers.iter().map(|s| s.mean).sum::<f64>() / customers.len() as f64;
    let cost = crate::simplex::MeanNegLl {
        data: customers,
        ll: |v, data| log_likelihood(&params_of(v), data),
    };
    let (best, iterations) =
        crate::simplex::minimise(cost, vec![0.0, 0.0, overall.ln()]).map_err(SpendError::Fit)?;
    let params = params_of(&best);
    params.check()?;
    // The shapes off beyond e^±13 (or γ beyond e^13 times the data's scale): the simplex walks
    // a ridge towards the boundary (e.g. every customer spends exactly the same), no maximum.
    if best[0].abs() > 13.0 || best[1].abs() > 13.0 || (best[2] - overall.ln()).abs() > 13.0 {
        return Err(SpendError::Degenerate(params));
    }
    Ok(Fit {
        params,
        log_likelihood: log_likelihood(&params, customers),
        customers: customers.len(),
        iterations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLISHED: Params = Params {
        p: 6.25,
        q: 3.74,
        gamma: 15.44,
    };

    #[test]
    fn the_expectation_is_a_weighted_mean_of_the_population_and_the_customer() {
        let population = PUBLISHED.population_mean().expect("mean");
        // pγ/(q−1) = 6.25 · 15.44 / 2.74
        assert!((population - 35.218_978).abs() < 1e-5, "{population}");
        // The closed form p(γ + x m)/(px + q − 1), computed directly.
        for (x, mean) in [(1.0, 10.0), (2.0, 35.0), (7.0, 120.0), (40.0, 3.5)] {
            let s = Spend { x, mean };
            let direct =
                PUBLISHED.p * (PUBLISHED.gamma + x * mean) / (PUBLISHED.p * x + PUBLISHED.q - 1.0);
            let got = PUBLISHED.expected_average_value(Some(&s)).expect("value");
            assert!((got - direct).abs() < 1e-9, "{got} vs {direct}");
            // Between the population mean and the customer's own.
            let (lo, hi) = (population.min(mean), population.max(mean));
            assert!(lo <= got && got <= hi, "{got} not in [{lo}, {hi}]");
        }
        // More transactions at the same mean pull the estimate closer to the customer's mean.
        let few = PUBLISHED
            .expected_average_value(Some(&Spend {
                x: 1.0,
                mean: 100.0,
            }))
            .expect("few");
        let many = PUBLISHED
            .expected_average_value(Some(&Spend {
                x: 20.0,
                mean: 100.0,
            }))
            .expect("many");
        assert!(few < many && many < 100.0, "{few} {many}");
        assert_eq!(
            PUBLISHED.expected_average_value(None).expect("none"),
            population
        );
    }

    #[test]
    fn the_density_integrates_to_one() {
        // f(m | x) over m ∈ (0, ∞), by the trapezoid rule on a log grid.
        for x in [1.0, 3.0] {
            let s = |m: f64| customer_log_likelihood(&PUBLISHED, &Spend { x, mean: m }).exp();
            let (mut total, steps) = (0.0, 200_000);
            let (lo, hi) = (1e-4f64.ln(), 1e5f64.ln());
            let h = (hi - lo) / steps as f64;
            for i in 0..=steps {
                let u = lo + h * i as f64;
                let w = if i == 0 || i == steps { 0.5 } else { 1.0 };
                total += w * s(u.exp()) * u.exp() * h;
            }
            assert!((total - 1.0).abs() < 1e-6, "x = {x}: ∫f = {total}");
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        assert_eq!(fit(&[]), Err(SpendError::Empty));
        let bad = Spend { x: 0.0, mean: 10.0 };
        assert_eq!(fit(&[bad]), Err(SpendError::Spend(bad)));
        let heavy = Params {
            q: 0.8,
            ..PUBLISHED
        };
        assert_eq!(heavy.population_mean(), Err(SpendError::NoMean(0.8)));
        let nan = Params {
            p: f64::NAN,
            ..PUBLISHED
        };
        assert!(matches!(nan.check(), Err(SpendError::Params(_))));
    }

    #[test]
    fn means_that_do_not_settle_with_more_transactions_are_degenerate() {
        // The spread of these customers' means does not shrink with their number of
        // transactions: the likelihood rises without end as p → ∞ (no variation of a
        // customer's values around their own mean). Not a usable model, and said so.
        let data: Vec<Spend> = [
            (1.0, 12.0),
            (2.0, 30.5),
            (4.0, 18.25),
            (1.0, 60.0),
            (3.0, 9.0),
        ]
        .iter()
        .cycle()
        .take(200)
        .enumerate()
        .map(|(i, &(x, m))| Spend {
            x,
            mean: m * (1.0 + (i % 7) as f64 / 10.0),
        })
        .collect();
        assert!(
            matches!(fit(&data), Err(SpendError::Degenerate(p)) if p.p > 1e5),
            "{:?}",
            fit(&data)
        );
    }
}
