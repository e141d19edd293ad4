//! `touchledger evaluate`: how well the churn model and the churn warnings predicted what
//! happened, on the ledger's own history (issue #13).
//!
//! With a calibration end T1 and a holdout end T2: BG/NBD is fitted on every buyer's purchases
//! that had occurred by T1 (the business axis, as `fit --as-of T1` does), each buyer's churn
//! warning is evaluated at T1 with that fit and the configured rules (what the ledger would
//! have said at T1 had it been fitted then), and each buyer's purchase-days in (T1, T2] are
//! counted. [`touchledger_domain::evaluation::evaluate`] compares them.
//!
//! The business axis, not the knowledge axis: history imported later (CDNOW) was not *known*
//! at T1 at all, yet what happened by T1 is exactly what the model should have been given. A
//! ledger that wants "as known then" replays the knowledge axis instead; not offered yet.

use serde::{Deserialize, Serialize};
use touchledger_domain::evaluation::{self, Buyer, Evaluation};
use touchledger_domain::facts::{AsOf, day_of};
use touchledger_domain::{
    EvaluatedThreshold, Event, LEDGER_SOURCE, MODEL_CUSTOMER, ModelEvaluated, ModelFitted, Payload,
    SCHEMA_VERSION, TimeUnit, Timestamp,
};

use crate::ReadModels;
use crate::model::{FitError, fitted_event, unit_days};

/// Why an evaluation could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    /// The periods are not calibration end < holdout end.
    #[error(
        "the holdout end ({holdout_end}) must be after the calibration end ({calibration_end})"
    )]
    Periods {
        /// T1.
        calibration_end: Timestamp,
        /// T2.
        holdout_end: Timestamp,
    },
    /// Reading the projections or fitting failed (e.g. no buyer by the calibration end).
    #[error(transparent)]
    Fit(#[from] FitError),
}

/// An evaluation and the model it evaluated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelEvaluation {
    /// The model fitted at the calibration end (not recorded: `evaluate` appends nothing).
    pub model: ModelFitted,
    /// The calibration end.
    pub calibration_end: Timestamp,
    /// The holdout end.
    pub holdout_end: Timestamp,
    /// The figures.
    pub evaluation: Evaluation,
}

/// Evaluate on `models` with calibration end `calibration_end` and holdout end `holdout_end`,
/// the model in `unit`. One pass over every customer; the fit is the unpartitioned ledger's
/// fit at T1 (same customer order, so the same parameters and model version).
pub fn evaluate(
    models: &ReadModels,
    calibration_end: Timestamp,
    holdout_end: Timestamp,
    unit: TimeUnit,
) -> Result<ModelEvaluation, EvaluateError> {
    if holdout_end <= calibration_end {
        return Err(EvaluateError::Periods {
            calibration_end,
            holdout_end,
        });
    }
    let (t1, t2) = (AsOf::business(calibration_end), AsOf::business(holdout_end));
    let (d1, d2) = (day_of(calibration_end), day_of(holdout_end));
    let u = unit_days(unit);
    // Statistics first (the fit needs all of them), facts kept only as far as the warning needs.
    let mut stats = Vec::new();
    let mut partial = Vec::new();
    for r in models.customers() {
        let (_, facts) = r.map_err(FitError::from)?;
        let days = facts.purchase_days(t1);
        let Some(rfm) = touchledger_domain::churn::rfm_of(&days, d1, u) else {
            continue;
        };
        let later = facts.purchase_days(t2);
        let holdout = later.iter().filter(|d| **d > d1).count() as u32;
        stats.push(rfm);
        partial.push((facts, days, later, holdout));
    }
    let (model, _) = fitted_event(&stats, calibration_end, unit)?;
    let params = touchledger_domain::bgnbd::Params {
        r: model.r,
        alpha: model.alpha,
        a: model.a,
        b: model.b,
    };
    let rules = &models.rules.churn;
    let buyers: Vec<Buyer> = partial
        .into_iter()
        .zip(stats)
        .map(|((facts, days, later, holdout), calibration)| {
            let view = rules.evaluate(&facts, Some(&model), t1);
            let first_day = days[0];
            Buyer {
                calibration,
                first_day,
                repeat_days: later.into_iter().skip(1).collect(),
                holdout,
                level: view.level,
                score: view.score,
                days_since_last: d1 - days[days.len() - 1],
            }
        })
        .collect();
    Ok(ModelEvaluation {
        evaluation: evaluation::evaluate(&params, u, &buyers, d1, d2),
        model,
        calibration_end,
        holdout_end,
    })
}

impl ModelEvaluation {
    /// The `ModelEvaluated` event that records this evaluation: the model version, the periods
    /// and the summary figures (not the per-bin and weekly series, which `evaluate` recomputes).
    /// Its id is derived from the model version and the holdout end, so recording the same
    /// evaluation twice is a duplicate; `occurred_at` is the holdout end.
    pub fn event(&self) -> Event {
        let v = &self.evaluation;
        let w = &v.warnings;
        let recorded = ModelEvaluated {
            model_version: self.model.model_version.clone(),
            calibration_end: self.calibration_end,
            holdout_end: self.holdout_end,
            customers: v.customers,
            holdout_actual: v.holdout_actual,
            holdout_predicted: v.holdout_predicted,
            churned: w.churned,
            thresholds: w
                .thresholds
                .iter()
                .map(|t| EvaluatedThreshold {
                    at_least: t.at_least,
                    flagged: t.flagged,
                    precision: t.rules.precision,
                    recall: t.rules.recall,
                    lift: t.rules.lift,
                })
                .collect(),
            auc_score: w.auc.rules_score,
            auc_recency: w.auc.recency,
            auc_model: w.auc.model,
        };
        let end = self.holdout_end.to_string();
        Event {
            event_id: format!(
                "evaluation-{}-{}",
                self.model.model_version,
                end.get(..10).unwrap_or(&end)
            ),
            customer_id: MODEL_CUSTOMER.into(),
            occurred_at: self.holdout_end,
            source: LEDGER_SOURCE.into(),
            schema_version: SCHEMA_VERSION,
            correlation_id: None,
            causation_id: None,
            payload: Payload::ModelEvaluated(recorded),
        }
    }
}
