//! Customer lifetime value: the discounted value a customer is expected to bring over a horizon
//! from now, from a count model (BG/NBD or Pareto/NBD: how many purchases) and the Gamma-Gamma
//! spend model
//! (what each is worth) — Fader, Hardie & Lee (2005), "RFM and CLV", with the monthly
//! discounting of the `lifetimes` and PyMC-Marketing CLV functions:
//!
//! ```text
//!   CLV = Σ_{m=1..H} v · (E[Y(m)] − E[Y(m−1)]) / (1 + d)^m
//! ```
//!
//! where E[Y(t)] is the customer's expected purchases in the next t, v their expected average
//! value and d the monthly discount rate.
//!
//! Key decision: the units are types. The horizon is [`Months`], the discount a
//! [`MonthlyDiscount`], and the count model carries the [`TimeUnit`] it was fitted in; the
//! conversion (a month is 365.25 / 12 days) is done here, once. Passing a horizon in weeks to a
//! model fitted in days — the classic `lifetimes` pitfall — cannot be written.

use serde::{Deserialize, Serialize};

use crate::bgnbd::Rfm;
use crate::count::CountParams;
use crate::event::{ModelFitted, TimeUnit};
use crate::facts::{AsOf, CustomerFacts, day_of};
use crate::gammagamma::Spend;

/// A horizon, in whole months.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Months(pub u32);

/// A discount rate per month (0.01 = 1 % a month, ≈ 12.7 % a year).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MonthlyDiscount(f64);

impl MonthlyDiscount {
    /// A monthly rate in [0, 1); anything else is not a discount rate.
    pub fn new(rate: f64) -> Option<MonthlyDiscount> {
        (rate.is_finite() && (0.0..1.0).contains(&rate)).then_some(MonthlyDiscount(rate))
    }

    /// The monthly rate equivalent to an annual one: (1 + annual)^(1/12) − 1.
    pub fn from_annual(annual: f64) -> Option<MonthlyDiscount> {
        if !annual.is_finite() || annual <= -1.0 {
            return None;
        }
        MonthlyDiscount::new((1.0 + annual).powf(1.0 / 12.0) - 1.0)
    }

    /// The rate per month.
    pub fn rate(self) -> f64 {
        self.0
    }
}

/// One month in a model's time unit.
pub fn month_in(unit: TimeUnit) -> f64 {
    const DAYS: f64 = 365.25 / 12.0;
    match unit {
        TimeUnit::Days => DAYS,
        TimeUnit::Weeks => DAYS / 7.0,
    }
}

/// A fitted count model with the unit its statistics and rates are in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CountModel {
    /// The parameters.
    pub params: CountParams,
    /// The unit of t_x, T and the rates.
    pub unit: TimeUnit,
}

/// The discounted expected value of `customer` (statistics in `model.unit`) over `horizon`,
/// each purchase worth `average_value` (e.g. the Gamma-Gamma expectation; the result is in its
/// money unit). `None` where the count model's expectation is undefined (a = 1 exactly).
pub fn residual_value(
    model: &CountModel,
    customer: &Rfm,
    average_value: f64,
    horizon: Months,
    discount: MonthlyDiscount,
) -> Option<f64> {
    let month = month_in(model.unit);
    let (mut before, mut total) = (0.0, 0.0);
    for m in 1..=horizon.0 {
        let by = model
            .params
            .expected_purchases(customer, f64::from(m) * month)?;
        total += average_value * (by - before) / (1.0 + discount.0).powi(m as i32);
        before = by;
    }
    total.is_finite().then_some(total)
}

/// A customer's expected value from the fitted models (the loyalty view's `value`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CustomerValue {
    /// The currency of the spend model, which the customer paid in.
    pub currency: String,
    /// Gamma-Gamma's expected value of one purchase-day, minor units.
    pub expected_average_value_minor: f64,
    /// The count model's expected purchase-days over the horizon.
    pub expected_purchases: f64,
    /// Discounted expected residual value over the horizon, minor units.
    pub clv_minor: f64,
    /// The horizon, months.
    pub horizon_months: u32,
    /// The discount rate per month.
    pub monthly_discount: f64,
    /// The fit used.
    pub model_version: String,
}

/// The expected value of the buyer with `facts` at `as_of` under `model` (its count model with
/// its Gamma-Gamma spend model) over `horizon`, discounted monthly. `None` without a spend model,
/// for a non-buyer, for a buyer who paid in any currency other than the spend model's (values
/// are never converted), or where an expectation is undefined.
pub fn customer_value(
    facts: &CustomerFacts,
    model: &ModelFitted,
    as_of: AsOf,
    horizon: Months,
    discount: MonthlyDiscount,
) -> Option<CustomerValue> {
    let spend_model = model.spend.as_ref()?;
    if facts
        .purchases_at(as_of)
        .any(|p| p.currency.as_str() != spend_model.currency)
    {
        return None;
    }
    let (params, unit_days) = CountParams::of(model)?;
    let count = CountModel {
        params,
        unit: model.time_unit,
    };
    let rfm = crate::churn::rfm_of(&facts.purchase_days(as_of), day_of(as_of.at), unit_days)?;
    rfm.check().ok()?;
    let spend = facts.repeat_spend(as_of).map(|s| Spend {
        x: f64::from(s.days),
        mean: s.mean_minor,
    });
    let average = spend_model
        .params()
        .expected_average_value(spend.as_ref())
        .ok()?;
    let clv = residual_value(&count, &rfm, average, horizon, discount)?;
    let purchases = count
        .params
        .expected_purchases(&rfm, f64::from(horizon.0) * month_in(model.time_unit))?;
    Some(CustomerValue {
        currency: spend_model.currency.clone(),
        expected_average_value_minor: average,
        expected_purchases: purchases,
        clv_minor: clv,
        horizon_months: horizon.0,
        monthly_discount: discount.rate(),
        model_version: model.model_version.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CDNOW: crate::bgnbd::Params = crate::bgnbd::Params {
        r: 0.2426,
        alpha: 4.4135,
        a: 0.7929,
        b: 2.4258,
    };
    const CDNOW_WEEKS: CountModel = CountModel {
        params: CountParams::BgNbd(CDNOW),
        unit: TimeUnit::Weeks,
    };
    const CUSTOMER: Rfm = Rfm {
        x: 2.0,
        t_x: 30.43,
        t: 38.86,
    };

    #[test]
    fn undiscounted_value_is_expected_purchases_times_value() {
        let none = MonthlyDiscount::new(0.0).expect("rate");
        let v = residual_value(&CDNOW_WEEKS, &CUSTOMER, 35.0, Months(9), none).expect("clv");
        // Nine months are 39.13 weeks: E[Y(39)] ≈ 1.226 in the paper's worked example.
        let ey =
            crate::bgnbd::expected_purchases(&CDNOW, &CUSTOMER, 9.0 * 365.25 / 84.0).expect("ey");
        assert!((v - 35.0 * ey).abs() < 1e-9, "{v} vs {}", 35.0 * ey);
        assert!((ey - 1.23).abs() < 0.01, "{ey}");
    }

    #[test]
    fn discounting_lowers_and_a_longer_horizon_raises_the_value() {
        let d = MonthlyDiscount::from_annual(0.10).expect("rate");
        assert!((d.rate() - 0.007_974).abs() < 1e-6, "{d:?}");
        let none = MonthlyDiscount::new(0.0).expect("rate");
        let v12 = residual_value(&CDNOW_WEEKS, &CUSTOMER, 35.0, Months(12), d).expect("clv");
        let v12_flat =
            residual_value(&CDNOW_WEEKS, &CUSTOMER, 35.0, Months(12), none).expect("clv");
        let v24 = residual_value(&CDNOW_WEEKS, &CUSTOMER, 35.0, Months(24), d).expect("clv");
        assert!(
            0.0 < v12 && v12 < v12_flat && v12 < v24,
            "{v12} {v12_flat} {v24}"
        );
        assert_eq!(
            residual_value(&CDNOW_WEEKS, &CUSTOMER, 35.0, Months(0), d),
            Some(0.0)
        );
    }

    #[test]
    fn the_same_model_in_days_gives_the_same_value() {
        // Rates per day are rates per week / 7: α scales by 7, shapes are unchanged.
        let days = CountModel {
            params: CountParams::BgNbd(crate::bgnbd::Params {
                alpha: CDNOW.alpha * 7.0,
                ..CDNOW
            }),
            unit: TimeUnit::Days,
        };
        let in_days = Rfm {
            x: CUSTOMER.x,
            t_x: CUSTOMER.t_x * 7.0,
            t: CUSTOMER.t * 7.0,
        };
        let d = MonthlyDiscount::new(0.01).expect("rate");
        let w = residual_value(&CDNOW_WEEKS, &CUSTOMER, 35.0, Months(18), d).expect("weeks");
        let dd = residual_value(&days, &in_days, 35.0, Months(18), d).expect("days");
        assert!((w / dd - 1.0).abs() < 1e-9, "{w} vs {dd}");
    }

    #[test]
    fn a_discount_rate_is_checked() {
        assert!(MonthlyDiscount::new(-0.1).is_none());
        assert!(MonthlyDiscount::new(1.0).is_none());
        assert!(MonthlyDiscount::new(f64::NAN).is_none());
        assert!(MonthlyDiscount::from_annual(-1.0).is_none());
    }
}
