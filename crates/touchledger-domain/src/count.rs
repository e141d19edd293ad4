//! The count model behind the churn warning, the model's expectations and CLV: BG/NBD (the
//! default) or Pareto/NBD, as recorded by a `ModelFitted` event, whose `model` says which.
//!
//! Both models share their parameters' roles: (r, α) are the shape and scale of the Gamma
//! heterogeneity of purchase rates; (a, b) that of dropout — BG/NBD's Beta(a, b) of the
//! dropout probability after each purchase, Pareto/NBD's Gamma(s, β) of the dropout rate (a
//! Pareto/NBD fit records s as `a` and β as `b`).
//!
//! Key decision: which model the warnings use is a rule (`churn.count_model`), and a read uses
//! the latest fit *of that model*; fits of the other stay in the ledger for comparison.

use serde::{Deserialize, Serialize};

use crate::bgnbd::{self, Rfm};
use crate::event::{ModelFitted, TimeUnit};
use crate::paretonbd;

/// Which count model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CountKind {
    /// Fader, Hardie & Lee (2005), "Counting Your Customers the Easy Way".
    #[default]
    #[serde(rename = "bgnbd")]
    BgNbd,
    /// Schmittlein, Morrison & Colombo (1987).
    #[serde(rename = "paretonbd")]
    ParetoNbd,
}

impl CountKind {
    /// The name a `ModelFitted` event records (`model`) and model versions start with.
    pub fn name(self) -> &'static str {
        match self {
            CountKind::BgNbd => "bgnbd",
            CountKind::ParetoNbd => "paretonbd",
        }
    }

    /// The kind of a recorded model name; `None` for another model.
    pub fn of_name(name: &str) -> Option<CountKind> {
        match name {
            "bgnbd" => Some(CountKind::BgNbd),
            "paretonbd" => Some(CountKind::ParetoNbd),
            _ => None,
        }
    }

    /// The name people read (`BG/NBD`, `Pareto/NBD`).
    pub fn label(self) -> &'static str {
        match self {
            CountKind::BgNbd => "BG/NBD",
            CountKind::ParetoNbd => "Pareto/NBD",
        }
    }
}

/// A fitted count model's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CountParams {
    /// BG/NBD.
    BgNbd(bgnbd::Params),
    /// Pareto/NBD.
    ParetoNbd(paretonbd::Params),
}

impl CountParams {
    /// The parameters of a recorded fit and its unit's length in days; `None` for another
    /// model or unusable parameters.
    pub fn of(m: &ModelFitted) -> Option<(CountParams, f64)> {
        let params = match CountKind::of_name(&m.model)? {
            CountKind::BgNbd => {
                let p = bgnbd::Params {
                    r: m.r,
                    alpha: m.alpha,
                    a: m.a,
                    b: m.b,
                };
                p.check().ok()?;
                CountParams::BgNbd(p)
            }
            CountKind::ParetoNbd => {
                let p = paretonbd::Params {
                    r: m.r,
                    alpha: m.alpha,
                    s: m.a,
                    beta: m.b,
                };
                p.usable().then_some(())?;
                CountParams::ParetoNbd(p)
            }
        };
        let unit = match m.time_unit {
            TimeUnit::Days => 1.0,
            TimeUnit::Weeks => 7.0,
        };
        Some((params, unit))
    }

    /// Which model.
    pub fn kind(&self) -> CountKind {
        match self {
            CountParams::BgNbd(_) => CountKind::BgNbd,
            CountParams::ParetoNbd(_) => CountKind::ParetoNbd,
        }
    }

    /// P(alive at T | x, tₓ, T).
    pub fn p_alive(&self, c: &Rfm) -> f64 {
        match self {
            CountParams::BgNbd(p) => bgnbd::p_alive(p, c),
            CountParams::ParetoNbd(p) => paretonbd::p_alive(p, c),
        }
    }

    /// E[Y(t) | x, tₓ, T]: the purchases expected in the next `t` (the model's unit); `None`
    /// where undefined.
    pub fn expected_purchases(&self, c: &Rfm, t: f64) -> Option<f64> {
        match self {
            CountParams::BgNbd(p) => bgnbd::expected_purchases(p, c, t),
            CountParams::ParetoNbd(p) => paretonbd::expected_purchases(p, c, t),
        }
    }
}
