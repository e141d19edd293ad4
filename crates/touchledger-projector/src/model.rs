//! Fitting the churn model (BG/NBD) over the population and recording the fit as a
//! `ModelFitted` event.
//!
//! Key decision: a fit is identified by what it was fitted on and what it found:
//! `model_version = bgnbd-<as_of>-<unit>-<digest of the parameters>`, and the event id is
//! derived from it. Fitting the same data twice appends nothing new (a duplicate), and a refit
//! on new data is a new version: earlier assessments keep naming the version they used.
//! * The Gamma-Gamma spend model is fitted with BG/NBD, on the same buyers, and recorded in the
//!   same event: the buyers with a repeat purchase-day who paid in one currency, in the
//!   currency most of them paid in (ties: the first code alphabetically); values are never
//!   converted. A population without a usable spend fit (no repeat buyer, no interior maximum,
//!   q ≤ 1) records the count model alone.

use std::collections::BTreeMap;

use touchledger_domain::bgnbd::{self, Rfm};
use touchledger_domain::churn::rfm_of;
use touchledger_domain::count::CountKind;
use touchledger_domain::facts::{AsOf, Currency, CustomerFacts, day_of};
use touchledger_domain::gammagamma::{self, Spend};
use touchledger_domain::paretonbd;
use touchledger_domain::{
    Event, LEDGER_SOURCE, MODEL_CUSTOMER, ModelFitted, Payload, SCHEMA_VERSION, SpendModel,
    TimeUnit, Timestamp,
};

use serde::{Deserialize, Serialize};

use crate::{ProjectorError, ReadModels};

/// Why a fit could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// Reading the projections failed.
    #[error(transparent)]
    Projector(#[from] ProjectorError),
    /// The model refused the data (e.g. no customers) or the optimiser failed.
    #[error(transparent)]
    Model(#[from] bgnbd::ModelError),
}

/// The unit's length in days.
pub fn unit_days(unit: TimeUnit) -> f64 {
    match unit {
        TimeUnit::Days => 1.0,
        TimeUnit::Weeks => 7.0,
    }
}

/// What a fit sees of one buyer: the BG/NBD statistics and, for the spend model, the mean
/// value of the repeat purchase-days when they were paid in one currency.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FitRow {
    /// x, tₓ and T.
    pub rfm: Rfm,
    /// The currency and mean value (minor units) of the repeat purchase-days.
    pub spend: Option<(Currency, f64)>,
}

impl FitRow {
    /// The row of `facts` at `as_of` (business axis) in `unit`; `None` for a non-buyer.
    pub fn of(facts: &CustomerFacts, as_of: Timestamp, unit: TimeUnit) -> Option<FitRow> {
        let at = AsOf::business(as_of);
        let rfm = rfm_of(&facts.purchase_days(at), day_of(as_of), unit_days(unit))?;
        let spend = facts.repeat_spend(at).map(|s| (s.currency, s.mean_minor));
        Some(FitRow { rfm, spend })
    }
}

/// Every buyer's fit statistics at `as_of` (business axis: what had happened by then), in
/// `unit`.
pub fn population_rows(
    models: &ReadModels,
    as_of: Timestamp,
    unit: TimeUnit,
) -> Result<Vec<FitRow>, ProjectorError> {
    rows_after(models, as_of, unit, None)
        .map(|r| r.map(|(_, x)| x))
        .collect()
}

/// The fit statistics of the buyers after customer `after` at `as_of`, in customer order.
fn rows_after<'a>(
    models: &'a ReadModels,
    as_of: Timestamp,
    unit: TimeUnit,
    after: Option<&str>,
) -> impl Iterator<Item = Result<(String, FitRow), ProjectorError>> + 'a {
    models.customers_after(after).filter_map(move |r| match r {
        Err(e) => Some(Err(e)),
        Ok((id, f)) => FitRow::of(&f, as_of, unit).map(|x| Ok((id, x))),
    })
}

/// A reader's request for one partition's part of a fit: its buyers' statistics at `as_of`
/// in `unit`, a page at a time (a partitioned ledger's model is fitted on every partition's
/// buyers, in customer order, so that it is the fit a single log of the same events gives).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitStatsRequest {
    /// Calibration end.
    pub as_of: Timestamp,
    /// Time unit of the statistics.
    pub unit: TimeUnit,
    /// Continue after this customer (`None`: from the first).
    pub after: Option<String>,
    /// The page's size limit in bytes.
    pub max_bytes: usize,
}

impl FitStatsRequest {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        crate::partial::encode_request(self)
    }

    /// A request from its bytes.
    pub fn decode(bytes: &[u8]) -> Result<FitStatsRequest, String> {
        crate::partial::decode_request(bytes, "fit statistics")
    }
}

/// A [`FitRow`] on the wire: x, tₓ, T and the repeat spend.
type WireRow = (f64, f64, f64, Option<(Currency, f64)>);

/// Answer `req` from this partition's projections: the encoded page of `(customer, (x, t_x,
/// T, spend))`.
pub fn fit_stats_page(
    models: &ReadModels,
    req: &FitStatsRequest,
) -> Result<Vec<u8>, ProjectorError> {
    crate::partial::encode_page(
        rows_after(models, req.as_of, req.unit, req.after.as_deref()).map(|r| {
            r.map(|(id, x)| -> (String, WireRow) { (id, (x.rfm.x, x.rfm.t_x, x.rfm.t, x.spend)) })
        }),
        req.max_bytes,
    )
}

/// A page of fit statistics and the customer to continue after.
pub fn decode_fit_stats(bytes: &[u8]) -> Result<crate::partial::Page<FitRow>, String> {
    let (rows, next) = crate::partial::decode_page::<WireRow>(bytes, "fit statistics")?;
    Ok((
        rows.into_iter()
            .map(|(id, (x, t_x, t, spend))| {
                (
                    id,
                    FitRow {
                        rfm: Rfm { x, t_x, t },
                        spend,
                    },
                )
            })
            .collect(),
        next,
    ))
}

/// Fit the spend model on `rows`: the repeat buyers of the currency most of them paid in.
/// `None` when no usable fit exists (no repeat buyer; no interior maximum; q ≤ 1, which has no
/// mean).
pub fn fit_spend(rows: &[FitRow]) -> Option<SpendModel> {
    let mut by_currency: BTreeMap<Currency, usize> = BTreeMap::new();
    for (c, _) in rows.iter().filter_map(|r| r.spend) {
        *by_currency.entry(c).or_default() += 1;
    }
    // The most repeat buyers; on a tie the first code (the map iterates in code order and
    // `max_by_key` keeps the last maximum, hence the reverse).
    let currency = by_currency
        .iter()
        .rev()
        .max_by_key(|(_, n)| **n)
        .map(|(c, _)| *c)?;
    let spends: Vec<Spend> = rows
        .iter()
        .filter_map(|r| match r.spend {
            Some((c, mean)) if c == currency => Some(Spend { x: r.rfm.x, mean }),
            _ => None,
        })
        .collect();
    let fit = gammagamma::fit(&spends).ok()?;
    fit.params.population_mean().ok()?;
    Some(SpendModel {
        currency: currency.as_str().to_owned(),
        p: fit.params.p,
        q: fit.params.q,
        gamma: fit.params.gamma,
        log_likelihood: fit.log_likelihood,
        customers: fit.customers as u64,
    })
}

/// Fit `kind` (BG/NBD or Pareto/NBD) and the spend model on the population at `as_of` and
/// build the `ModelFitted` event to append.
pub fn fit_event(
    models: &ReadModels,
    as_of: Timestamp,
    unit: TimeUnit,
    kind: CountKind,
) -> Result<(ModelFitted, Event), FitError> {
    let rows = population_rows(models, as_of, unit)?;
    fitted_event(&rows, as_of, unit, kind)
}

/// Fit `kind` and the spend model on `rows` (every buyer at `as_of`, in customer order) and
/// build the `ModelFitted` event to append. A Pareto/NBD fit records s as `a` and β as `b`
/// ([`touchledger_domain::count`]).
pub fn fitted_event(
    rows: &[FitRow],
    as_of: Timestamp,
    unit: TimeUnit,
    kind: CountKind,
) -> Result<(ModelFitted, Event), FitError> {
    let stats: Vec<Rfm> = rows.iter().map(|r| r.rfm).collect();
    let (p, log_likelihood) = match kind {
        CountKind::BgNbd => {
            let fit = bgnbd::fit(&stats)?;
            (fit.params, fit.log_likelihood)
        }
        CountKind::ParetoNbd => {
            let fit = paretonbd::fit(&stats)?;
            let q = fit.params;
            (
                bgnbd::Params {
                    r: q.r,
                    alpha: q.alpha,
                    a: q.s,
                    b: q.beta,
                },
                fit.log_likelihood,
            )
        }
    };
    let spend = fit_spend(rows);
    let mut identity = format!(
        "{:.9e} {:.9e} {:.9e} {:.9e} {}",
        p.r,
        p.alpha,
        p.a,
        p.b,
        stats.len()
    );
    // A fit without a spend model keeps the identity it had before spend models existed.
    if let Some(s) = &spend {
        identity.push_str(&format!(
            " spend {} {:.9e} {:.9e} {:.9e} {}",
            s.currency, s.p, s.q, s.gamma, s.customers
        ));
    }
    let digest = blake3::hash(identity.as_bytes());
    let unit_name = match unit {
        TimeUnit::Days => "days",
        TimeUnit::Weeks => "weeks",
    };
    let date = as_of.to_string();
    let model_version = format!(
        "{}-{}-{unit_name}-{}",
        kind.name(),
        date.get(..10).unwrap_or(&date),
        &digest.to_hex()[..12]
    );
    let fitted = ModelFitted {
        model: kind.name().into(),
        model_version: model_version.clone(),
        r: p.r,
        alpha: p.alpha,
        a: p.a,
        b: p.b,
        log_likelihood,
        customers: stats.len() as u64,
        time_unit: unit,
        calibration_end: as_of,
        spend,
    };
    let event = Event {
        event_id: format!("model-{model_version}"),
        customer_id: MODEL_CUSTOMER.into(),
        // The model describes the population as of its calibration end: that is when it
        // "happened" on the business axis; when it was recorded is the knowledge axis.
        occurred_at: as_of,
        source: LEDGER_SOURCE.into(),
        schema_version: SCHEMA_VERSION,
        correlation_id: None,
        causation_id: None,
        payload: Payload::ModelFitted(fitted.clone()),
    };
    Ok((fitted, event))
}
