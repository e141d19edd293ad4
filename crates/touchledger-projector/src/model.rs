//! Fitting the churn model (BG/NBD) over the population and recording the fit as a
//! `ModelFitted` event.
//!
//! Key decision: a fit is identified by what it was fitted on and what it found:
//! `model_version = bgnbd-<as_of>-<unit>-<digest of the parameters>`, and the event id is
//! derived from it. Fitting the same data twice appends nothing new (a duplicate), and a refit
//! on new data is a new version: earlier assessments keep naming the version they used.

use touchledger_domain::bgnbd::{self, Rfm};
use touchledger_domain::churn::rfm_of;
use touchledger_domain::facts::{AsOf, day_of};
use touchledger_domain::{
    Event, LEDGER_SOURCE, MODEL_CUSTOMER, ModelFitted, Payload, SCHEMA_VERSION, TimeUnit, Timestamp,
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

/// Every buyer's BG/NBD statistics at `as_of` (business axis: what had happened by then), in
/// `unit`.
pub fn population_rfm(
    models: &ReadModels,
    as_of: Timestamp,
    unit: TimeUnit,
) -> Result<Vec<Rfm>, ProjectorError> {
    rfm_after(models, as_of, unit, None)
        .map(|r| r.map(|(_, x)| x))
        .collect()
}

/// The BG/NBD statistics of the buyers after customer `after` at `as_of`, in customer order.
fn rfm_after<'a>(
    models: &'a ReadModels,
    as_of: Timestamp,
    unit: TimeUnit,
    after: Option<&str>,
) -> impl Iterator<Item = Result<(String, Rfm), ProjectorError>> + 'a {
    let at = AsOf::business(as_of);
    let today = day_of(as_of);
    models.customers_after(after).filter_map(move |r| match r {
        Err(e) => Some(Err(e)),
        Ok((id, f)) => rfm_of(&f.purchase_days(at), today, unit_days(unit)).map(|x| Ok((id, x))),
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

/// Answer `req` from this partition's projections: the encoded page of `(customer, (x, t_x,
/// T))`.
pub fn fit_stats_page(
    models: &ReadModels,
    req: &FitStatsRequest,
) -> Result<Vec<u8>, ProjectorError> {
    crate::partial::encode_page(
        rfm_after(models, req.as_of, req.unit, req.after.as_deref())
            .map(|r| r.map(|(id, x)| (id, (x.x, x.t_x, x.t)))),
        req.max_bytes,
    )
}

/// A page of fit statistics and the customer to continue after.
pub fn decode_fit_stats(bytes: &[u8]) -> Result<crate::partial::Page<Rfm>, String> {
    let (rows, next) = crate::partial::decode_page::<(f64, f64, f64)>(bytes, "fit statistics")?;
    Ok((
        rows.into_iter()
            .map(|(id, (x, t_x, t))| (id, Rfm { x, t_x, t }))
            .collect(),
        next,
    ))
}

/// Fit BG/NBD on the population at `as_of` and build the `ModelFitted` event to append.
pub fn fit_event(
    models: &ReadModels,
    as_of: Timestamp,
    unit: TimeUnit,
) -> Result<(ModelFitted, Event), FitError> {
    let stats = population_rfm(models, as_of, unit)?;
    fitted_event(&stats, as_of, unit)
}

/// Fit BG/NBD on `stats` (every buyer at `as_of`, in customer order) and build the
/// `ModelFitted` event to append.
pub fn fitted_event(
    stats: &[Rfm],
    as_of: Timestamp,
    unit: TimeUnit,
) -> Result<(ModelFitted, Event), FitError> {
    let fit = bgnbd::fit(stats)?;
    let p = fit.params;
    let digest = blake3::hash(
        format!(
            "{:.9e} {:.9e} {:.9e} {:.9e} {}",
            p.r,
            p.alpha,
            p.a,
            p.b,
            stats.len()
        )
        .as_bytes(),
    );
    let unit_name = match unit {
        TimeUnit::Days => "days",
        TimeUnit::Weeks => "weeks",
    };
    let date = as_of.to_string();
    let model_version = format!(
        "bgnbd-{}-{unit_name}-{}",
        date.get(..10).unwrap_or(&date),
        &digest.to_hex()[..12]
    );
    let fitted = ModelFitted {
        model: "bgnbd".into(),
        model_version: model_version.clone(),
        r: p.r,
        alpha: p.alpha,
        a: p.a,
        b: p.b,
        log_likelihood: fit.log_likelihood,
        customers: stats.len() as u64,
        time_unit: unit,
        calibration_end: as_of,
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
