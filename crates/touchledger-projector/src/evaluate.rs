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
use touchledger_domain::count::CountKind;
use touchledger_domain::evaluation::{self, Buyer, CountModelCheck, Evaluation, WarningEvaluation};
use touchledger_domain::facts::{AsOf, CustomerFacts, day_of};
use touchledger_domain::paretonbd;
use touchledger_domain::{
    ChurnLevel, EvaluatedThreshold, Event, LEDGER_SOURCE, MODEL_CUSTOMER, ModelEvaluated,
    ModelFitted, Payload, SCHEMA_VERSION, TimeUnit, Timestamp,
};

use crate::model::{FitError, FitRow, fitted_event, unit_days};
use crate::{ProjectorError, ReadModels};

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
    /// The model fitted at the calibration end (not recorded: `evaluate` appends nothing): BG/NBD,
    /// whose figures the fit plots and the holdout prediction are.
    pub model: ModelFitted,
    /// The fit the warnings were evaluated with when it is not `model`: Pareto/NBD, when the
    /// rules select it (`churn.count_model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning_model: Option<ModelFitted>,
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
    /// Pareto/NBD fitted on the same statistics: the comparison, and the warnings' model when
    /// the rules select it (`None`: it could not be fitted, and BG/NBD is the warnings' model).
    pareto: Option<ModelFitted>,
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

impl PreparedBuyer {
    /// The buyer with `facts` at the calibration end; `None` for a customer without a purchase
    /// by then.
    fn of(
        facts: CustomerFacts,
        calibration_end: Timestamp,
        holdout_end: Timestamp,
        unit: TimeUnit,
    ) -> Option<PreparedBuyer> {
        let d1 = day_of(calibration_end);
        let days = facts.purchase_days(AsOf::business(calibration_end));
        let calibration = touchledger_domain::churn::rfm_of(&days, d1, unit_days(unit))?;
        let later = facts.purchase_days(AsOf::business(holdout_end));
        let holdout = later.iter().filter(|d| **d > d1).count() as u32;
        Some(PreparedBuyer {
            facts,
            days,
            later,
            holdout,
            calibration,
        })
    }

    /// The buyer with their warning at the calibration end under `rules` and `model`.
    fn buyer(&self, rules: &ChurnRules, model: &ModelFitted, calibration_end: Timestamp) -> Buyer {
        let view = rules.evaluate(&self.facts, Some(model), AsOf::business(calibration_end));
        Buyer {
            calibration: self.calibration,
            first_day: self.days[0],
            repeat_days: self.later.iter().skip(1).copied().collect(),
            holdout: self.holdout,
            level: view.level,
            score: view.score,
            days_since_last: day_of(calibration_end) - self.days[self.days.len() - 1],
        }
    }
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
        let t1 = AsOf::business(calibration_end);
        let u = unit_days(unit);
        let (mut buyers, mut rows) = (Vec::new(), Vec::new());
        for r in models.customers() {
            let (_, facts) = r.map_err(FitError::from)?;
            let Some(b) = PreparedBuyer::of(facts, calibration_end, holdout_end, unit) else {
                continue;
            };
            rows.push(FitRow {
                rfm: b.calibration,
                spend: b.facts.repeat_spend(t1).map(|s| (s.currency, s.mean_minor)),
            });
            buyers.push(b);
        }
        let (model, _) = fitted_event(&rows, calibration_end, unit, CountKind::BgNbd)?;
        // Pareto/NBD beside it: for the comparison, and required when the warnings use it.
        let pareto = match fitted_event(&rows, calibration_end, unit, CountKind::ParetoNbd) {
            Ok((m, _)) => Some(m),
            Err(e) if models.rules.churn.count_model == CountKind::ParetoNbd => {
                return Err(e.into());
            }
            Err(e) => {
                tracing::warn!(error = %e, "Pareto/NBD not fitted for the comparison");
                None
            }
        };
        let params = Params {
            r: model.r,
            alpha: model.alpha,
            a: model.a,
            b: model.b,
        };
        Ok(Prepared {
            model,
            params,
            pareto,
            unit_days: u,
            calibration_end,
            holdout_end,
            buyers,
        })
    }

    /// The fit the warnings of `rules` use: BG/NBD's, or Pareto/NBD's when the rules select it
    /// and it was fitted.
    fn warning_model(&self, rules: &ChurnRules) -> &ModelFitted {
        match (rules.count_model, &self.pareto) {
            (CountKind::ParetoNbd, Some(p)) => p,
            _ => &self.model,
        }
    }

    /// The buyers with their warnings at the calibration end under `rules`.
    fn buyers(&self, rules: &ChurnRules) -> Vec<Buyer> {
        let model = self.warning_model(rules);
        self.buyers
            .iter()
            .map(|b| b.buyer(rules, model, self.calibration_end))
            .collect()
    }

    fn holdout_length(&self) -> f64 {
        (day_of(self.holdout_end) - day_of(self.calibration_end)) as f64 / self.unit_days
    }

    /// The whole evaluation with the warnings of `rules`, and BG/NBD against Pareto/NBD (fitted
    /// here on the same calibration statistics) on the same holdout. A Pareto/NBD fit that
    /// fails (a degenerate likelihood) leaves BG/NBD alone in the comparison, logged.
    pub fn evaluate(&self, rules: &ChurnRules) -> ModelEvaluation {
        assemble(
            &self.model,
            self.pareto.as_ref(),
            self.warning_model(rules),
            &self.buyers(rules),
            self.calibration_end,
            self.holdout_end,
        )
    }

    /// Only the warnings' figures under `rules` (no model-fit figures: what tuning compares).
    pub fn warnings(&self, rules: &ChurnRules) -> WarningEvaluation {
        evaluation::warnings(&self.params, &self.buyers(rules), self.holdout_length())
    }
}

/// An evaluation from its parts: the BG/NBD fit at the calibration end (the fit figures'
/// model), Pareto/NBD's beside it when fitted, the fit the warnings used, and every buyer at the
/// calibration end in customer order (an unpartitioned ledger's [`Prepared`], or the buyers of
/// every partition merged by a router: the same figures either way).
pub fn assemble(
    model: &ModelFitted,
    pareto: Option<&ModelFitted>,
    warning_model: &ModelFitted,
    buyers: &[Buyer],
    calibration_end: Timestamp,
    holdout_end: Timestamp,
) -> ModelEvaluation {
    let u = unit_days(model.time_unit);
    let p = Params {
        r: model.r,
        alpha: model.alpha,
        a: model.a,
        b: model.b,
    };
    let mut evaluation =
        evaluation::evaluate(&p, u, buyers, day_of(calibration_end), day_of(holdout_end));
    let length = (day_of(holdout_end) - day_of(calibration_end)) as f64 / u;
    let named = |pairs: [(&str, f64); 4]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect::<Vec<_>>()
    };
    // BG/NBD's holdout figures are the evaluation's own.
    let bgnbd = CountModelCheck::from_conditional(
        "BG/NBD",
        named([("r", p.r), ("alpha", p.alpha), ("a", p.a), ("b", p.b)]),
        model.log_likelihood,
        evaluation.holdout_predicted,
        &evaluation.conditional,
    );
    evaluation.count_models.push(bgnbd);
    if let Some(m) = pareto {
        let q = paretonbd::Params {
            r: m.r,
            alpha: m.alpha,
            s: m.a,
            beta: m.b,
        };
        evaluation.count_models.push(CountModelCheck::of(
            "Pareto/NBD",
            named([("r", q.r), ("alpha", q.alpha), ("s", q.s), ("beta", q.beta)]),
            m.log_likelihood,
            buyers,
            |c| paretonbd::expected_purchases(&q, c, length),
        ));
    }
    ModelEvaluation {
        evaluation,
        warning_model: (warning_model.model_version != model.model_version)
            .then(|| warning_model.clone()),
        model: model.clone(),
        calibration_end,
        holdout_end,
    }
}

/// A reader's request for one partition's part of an evaluation across partitions: its
/// buyers at the calibration end, each with their warning under the partition's rules and
/// `warning_model` (fitted by the reader on every partition's buyers), a page at a time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuyersRequest {
    /// Calibration end T1.
    pub calibration_end: Timestamp,
    /// Holdout end T2.
    pub holdout_end: Timestamp,
    /// The model's unit.
    pub unit: TimeUnit,
    /// The fit the warnings use.
    pub warning_model: ModelFitted,
    /// Continue after this customer (`None`: from the first).
    pub after: Option<String>,
    /// The page's size limit in bytes.
    pub max_bytes: usize,
}

impl BuyersRequest {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        crate::partial::encode_request(self)
    }

    /// A request from its bytes.
    pub fn decode(bytes: &[u8]) -> Result<BuyersRequest, String> {
        crate::partial::decode_request(bytes, "evaluation buyers")
    }
}

/// A [`Buyer`] on the wire: x, tₓ, T, first day, repeat days, holdout, level, score, days
/// since the last purchase.
type WireBuyer = (f64, f64, f64, i64, Vec<i64>, u32, ChurnLevel, f64, i64);

/// Answer `req` from this partition's projections: the encoded page of its buyers.
pub fn buyers_page(models: &ReadModels, req: &BuyersRequest) -> Result<Vec<u8>, ProjectorError> {
    let rules = &models.rules.churn;
    crate::partial::encode_page(
        models
            .customers_after(req.after.as_deref())
            .filter_map(|r| match r {
                Err(e) => Some(Err(e)),
                Ok((id, facts)) => {
                    PreparedBuyer::of(facts, req.calibration_end, req.holdout_end, req.unit).map(
                        |b| {
                            let b = b.buyer(rules, &req.warning_model, req.calibration_end);
                            let c = b.calibration;
                            let row: WireBuyer = (
                                c.x,
                                c.t_x,
                                c.t,
                                b.first_day,
                                b.repeat_days,
                                b.holdout,
                                b.level,
                                b.score,
                                b.days_since_last,
                            );
                            Ok((id, row))
                        },
                    )
                }
            }),
        req.max_bytes,
    )
}

/// A page of buyers and the customer to continue after.
pub fn decode_buyers(bytes: &[u8]) -> Result<crate::partial::Page<Buyer>, String> {
    let (rows, next) = crate::partial::decode_page::<WireBuyer>(bytes, "evaluation buyers")?;
    Ok((
        rows.into_iter()
            .map(
                |(id, (x, t_x, t, first_day, repeat_days, holdout, level, score, since))| {
                    (
                        id,
                        Buyer {
                            calibration: Rfm { x, t_x, t },
                            first_day,
                            repeat_days,
                            holdout,
                            level,
                            score,
                            days_since_last: since,
                        },
                    )
                },
            )
            .collect(),
        next,
    ))
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
    // Under Pareto/NBD a one-time buyer's P(active) is their P(alive): the horizon does not
    // apply, and trying it would only repeat rule sets.
    let horizons = match rules.count_model {
        CountKind::ParetoNbd => std::slice::from_ref(&rules.one_time_horizon_days),
        CountKind::BgNbd => grid.one_time_horizon_days.as_slice(),
    };
    let mut tried = Vec::new();
    for &(alive_watch_below, alive_warning_below) in &grid.alive {
        for &(overdue_watch_k, overdue_warning_k) in &grid.overdue {
            for &lost_after_days in &grid.lost_after_days {
                for &one_time_horizon_days in horizons {
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
    /// Its id is derived from the model version behind the warnings, the holdout end and a
    /// digest of the recorded figures, so recording the same evaluation twice is a duplicate
    /// and one under other rules is a record of its own; `occurred_at` is the holdout end.
    pub fn event(&self) -> Event {
        let v = &self.evaluation;
        let w = &v.warnings;
        let recorded = ModelEvaluated {
            // The model behind the warnings evaluated (BG/NBD unless the rules select another).
            model_version: self
                .warning_model
                .as_ref()
                .unwrap_or(&self.model)
                .model_version
                .clone(),
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
        // Identified by what it says: the same evaluation recorded again is a duplicate; another
        // one of the same model and holdout end (other rules, another count model behind the
        // warnings) is a record of its own, not a conflict.
        let digest = blake3::hash(
            serde_json::to_string(&recorded)
                .unwrap_or_default()
                .as_bytes(),
        );
        Event {
            event_id: format!(
                "evaluation-{}-{}-{}",
                recorded.model_version,
                end.get(..10).unwrap_or(&end),
                &digest.to_hex()[..12]
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
