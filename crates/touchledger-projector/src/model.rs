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
    let at = AsOf::business(as_of);
    let today = day_of(as_of);
    let mut out = Vec::new();
    for r in models.customers() {
        let (_, f) = r?;
        let days = f.purchase_days(at);
        if let Some(rfm) = rfm_of(&days, today, unit_days(unit)) {
            out.push(rfm);
        }
    }
    Ok(out)
}

/// Fit BG/NBD on the population at `as_of` and build the `ModelFitted` event to append.
pub fn fit_event(
    models: &ReadModels,
    as_of: Timestamp,
    unit: TimeUnit,
) -> Result<(ModelFitted, Event), FitError> {
    let stats = population_rfm(models, as_of, unit)?;
    let fit = bgnbd::fit(&stats)?;
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
