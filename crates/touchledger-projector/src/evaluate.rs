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
use touchledger_domain::bgnbd::{Params, Rfm};
use touchledger_domain::churn::ChurnRules;
use touchledger_domain::evaluation::{self, Buyer, CountModelCheck, Evaluation, WarningEvaluation};
use touchledger_domain::facts::{AsOf, CustomerFacts, day_of};
use touchledger_domain::paretonbd;
use touchledger_domain::{
    ChurnLevel, EvaluatedThreshold, Event, LEDGER_SOURCE, MODEL_CUSTOMER, ModelEvaluated,
    ModelFitted, Payload, SCHEMA_VERSION, TimeUnit, Timestamp,
};

use crate::ReadModels;
use crate::model::{FitError, FitRow, fitted_event, unit_days};

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
/// the model in `unit`, the warnings by `models`' churn rules. One pass over every customer;
/// the fit is the unpartitioned ledger's fit at T1 (same customer order, so the same parameters
/// and model version).
pub fn evaluate(
    models: &ReadModels,
    calibration_end: Timestamp,
    holdout_end: Timestamp,
    unit: TimeUnit,
) -> Result<ModelEvaluation, EvaluateError> {
    let prepared = Prepared::new(models, calibration_end, holdout_end, unit)?;
    Ok(prepared.evaluate(&models.rules.churn))
}

/// Every buyer at the calibration end with the facts their warning is evaluated on, and the
/// model fitted then: what an evaluation needs before the warning rules are applied, so that
/// several rule sets can be evaluated on one fit ([`tune`]).
pub struct Prepared {
    model: ModelFitted,
    params: Params,
    unit_days: f64,
    calibration_end: Timestamp,
    holdout_end: Timestamp,
    buyers: Vec<PreparedBuyer>,
}

struct PreparedBuyer {
    facts: CustomerFacts,
    /// Purchase-days by the calibration end.
    days: Vec<i64>,
    /// Purchase-days by the holdout end.
    later: Vec<i64>,
    holdout: u32,
    calibration: Rfm,
}

impl Prepared {
    /// Read every customer's facts and fit BG/NBD at the calibration end.
    pub fn new(
        models: &ReadModels,
        calibration_end: Timestamp,
        holdout_end: Timestamp,
        unit: TimeUnit,
    ) -> Result<Prepared, EvaluateError> {
        if holdout_end <= calibration_end {
            return Err(EvaluateError::Periods {
                calibration_end,
                holdout_end,
            });
        }
        let (t1, t2) = (AsOf::business(calibration_end), AsOf::business(holdout_end));
        let d1 = day_of(calibration_end);
        let u = unit_days(unit);
        let (mut buyers, mut rows) = (Vec::new(), Vec::new());
        for r in models.customers() {
            let (_, facts) = r.map_err(FitError::from)?;
            let days = facts.purchase_days(t1);
            let Some(calibration) = touchledger_domain::churn::rfm_of(&days, d1, u) else {
                continue;
            };
            rows.push(FitRow {
                rfm: calibration,
                spend: facts.repeat_spend(t1).map(|s| (s.currency, s.mean_minor)),
            });
            let later = facts.purchase_days(t2);
            let holdout = later.iter().filter(|d| **d > d1).count() as u32;
            buyers.push(PreparedBuyer {
                facts,
                days,
                later,
                holdout,
                calibration,
            });
        }
        let (model, _) = fitted_event(&rows, calibration_end, unit)?;
        let params = Params {
            r: model.r,
            alpha: model.alpha,
            a: model.a,
            b: model.b,
        };
        Ok(Prepared {
            model,
            params,
            unit_days: u,
            calibration_end,
            holdout_end,
            buyers,
        })
    }

    /// The buyers with their warnings at the calibration end under `rules`.
    fn buyers(&self, rules: &ChurnRules) -> Vec<Buyer> {
        let t1 = AsOf::business(self.calibration_end);
        let d1 = day_of(self.calibration_end);
        self.buyers
            .iter()
            .map(|b| {
                let view = rules.evaluate(&b.facts, Some(&self.model), t1);
                Buyer {
                    calibration: b.calibration,
                    first_day: b.days[0],
                    repeat_days: b.later.iter().skip(1).copied().collect(),
                    holdout: b.holdout,
                    level: view.level,
                    score: view.score,
                    days_since_last: d1 - b.days[b.days.len() - 1],
                }
            })
            .collect()
    }

    fn holdout_length(&self) -> f64 {
        (day_of(self.holdout_end) - day_of(self.calibration_end)) as f64 / self.unit_days
    }

    /// The whole evaluation with the warnings of `rules`, and BG/NBD against Pareto/NBD (fitted
    /// here on the same calibration statistics) on the same holdout. A Pareto/NBD fit that
    /// fails (a degenerate likelihood) leaves BG/NBD alone in the comparison, logged.
    pub fn evaluate(&self, rules: &ChurnRules) -> ModelEvaluation {
        let buyers = self.buyers(rules);
        let mut evaluation = evaluation::evaluate(
            &self.params,
            self.unit_days,
            &buyers,
            day_of(self.calibration_end),
            day_of(self.holdout_end),
        );
        let length = self.holdout_length();
        let named = |pairs: [(&str, f64); 4]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect::<Vec<_>>()
        };
        let p = &self.params;
        // BG/NBD's holdout figures are the evaluation's own.
        let bgnbd = CountModelCheck::from_conditional(
            "BG/NBD",
            named([("r", p.r), ("alpha", p.alpha), ("a", p.a), ("b", p.b)]),
            self.model.log_likelihood,
            evaluation.holdout_predicted,
            &evaluation.conditional,
        );
        evaluation.count_models.push(bgnbd);
        let stats: Vec<Rfm> = buyers.iter().map(|b| b.calibration).collect();
        match paretonbd::fit(&stats) {
            Ok(fit) => {
                let q = fit.params;
                evaluation.count_models.push(CountModelCheck::of(
                    "Pareto/NBD",
                    named([("r", q.r), ("alpha", q.alpha), ("s", q.s), ("beta", q.beta)]),
                    fit.log_likelihood,
                    &buyers,
                    |c| paretonbd::expected_purchases(&q, c, length),
                ));
            }
            Err(e) => tracing::warn!(error = %e, "Pareto/NBD not fitted for the comparison"),
        }
        ModelEvaluation {
            evaluation,
            model: self.model.clone(),
            calibration_end: self.calibration_end,
            holdout_end: self.holdout_end,
        }
    }

    /// Only the warnings' figures under `rules` (no model-fit figures: what tuning compares).
    pub fn warnings(&self, rules: &ChurnRules) -> WarningEvaluation {
        evaluation::warnings(&self.params, &self.buyers(rules), self.holdout_length())
    }
}

/// The values [`tune`] tries for the churn thresholds that depend on a customer's purchases
/// (the others — complaints, dissatisfaction, frequency drop — are rarely or never on record
/// in a purchase log, so a purchase history cannot tune them). Every combination is tried.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuningGrid {
    /// (`alive_watch_below`, `alive_warning_below`) pairs.
    pub alive: Vec<(f64, f64)>,
    /// (`overdue_watch_k`, `overdue_warning_k`) pairs.
    pub overdue: Vec<(f64, f64)>,
    /// `lost_after_days`.
    pub lost_after_days: Vec<i64>,
    /// `one_time_horizon_days`.
    pub one_time_horizon_days: Vec<i64>,
}

impl Default for TuningGrid {
    /// Around the brief's defaults (which are in it): 5 × 5 × 4 × 4 = 400 rule sets.
    fn default() -> Self {
        TuningGrid {
            alive: vec![(0.7, 0.5), (0.6, 0.4), (0.5, 0.3), (0.4, 0.2), (0.3, 0.15)],
            overdue: vec![(1.0, 2.0), (1.5, 3.0), (2.0, 4.0), (3.0, 6.0), (4.0, 8.0)],
            lost_after_days: vec![180, 270, 365, 540],
            one_time_horizon_days: vec![90, 180, 365, 730],
        }
    }
}

/// One rule set tried by [`tune`] and how its warnings did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tried {
    /// The rules (the given ones with the grid's values set).
    pub rules: ChurnRules,
    /// The warnings against the holdout.
    pub warnings: WarningEvaluation,
}

impl Tried {
    /// What [`tune`] ranks by: the ROC AUC of the churn score (0 when it has none).
    pub fn auc(&self) -> f64 {
        self.warnings.auc.rules_score.unwrap_or(0.0)
    }
}

/// What [`tune`] found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tuning {
    /// The model fitted at the calibration end (the same for every rule set).
    pub model: ModelFitted,
    /// The calibration end.
    pub calibration_end: Timestamp,
    /// The holdout end.
    pub holdout_end: Timestamp,
    /// Buyers at the calibration end.
    pub customers: u64,
    /// The rules given (the ledger's), as they did.
    pub given: Tried,
    /// Every rule set of the grid, best first: by the AUC of the churn score, then by the lift
    /// of the warning threshold, then in the grid's order.
    pub tried: Vec<Tried>,
}

/// Try every combination of `grid` on `rules` (the other thresholds as given), each with its
/// warnings evaluated at the calibration end against the holdout, on one fit. The ranking is by
/// the ROC AUC of the churn score: a threshold-free measure of how well the score orders
/// customers by risk, which is what the at-risk list is sorted by.
pub fn tune(
    models: &ReadModels,
    calibration_end: Timestamp,
    holdout_end: Timestamp,
    unit: TimeUnit,
    rules: &ChurnRules,
    grid: &TuningGrid,
) -> Result<Tuning, EvaluateError> {
    let prepared = Prepared::new(models, calibration_end, holdout_end, unit)?;
    let try_rules = |r: ChurnRules| Tried {
        warnings: prepared.warnings(&r),
        rules: r,
    };
    let mut tried = Vec::new();
    for &(alive_watch_below, alive_warning_below) in &grid.alive {
        for &(overdue_watch_k, overdue_warning_k) in &grid.overdue {
            for &lost_after_days in &grid.lost_after_days {
                for &one_time_horizon_days in &grid.one_time_horizon_days {
                    let r = ChurnRules {
                        alive_watch_below,
                        alive_warning_below,
                        overdue_watch_k,
                        overdue_warning_k,
                        lost_after_days,
                        one_time_horizon_days,
                        ..rules.clone()
                    };
                    if r.check().is_ok() {
                        tried.push(try_rules(r));
                    }
                }
            }
        }
    }
    let warning_lift = |t: &Tried| {
        t.warnings
            .thresholds
            .iter()
            .find(|r| r.at_least == ChurnLevel::Warning)
            .map_or(0.0, |r| r.rules.lift)
    };
    // Stable: equal rule sets keep the grid's order.
    tried.sort_by(|a, b| {
        b.auc()
            .total_cmp(&a.auc())
            .then(warning_lift(b).total_cmp(&warning_lift(a)))
    });
    Ok(Tuning {
        model: prepared.model.clone(),
        calibration_end,
        holdout_end,
        customers: prepared.buyers.len() as u64,
        given: try_rules(rules.clone()),
        tried,
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
