//! Churn warning (brief §4.3): named, configurable rules evaluated at an explicit `as_of`, each
//! carrying its evidence and threshold, combined into a level, a score and a probable cause.
//!
//! Key decisions:
//! * Every rule is a pure function of the customer's facts, the model fitted at the time (if
//!   any) and `as_of`; there is no hidden state, so the assessor, a query and a replay at a past
//!   instant give the same verdict.
//! * The probable cause is never invented: a stated reason first, else *disappointment* when
//!   complaints or dissatisfaction are on record, else unknown (`None`).
//! * `since` is the earliest instant from which the rules that set the level are known to have
//!   held (their onsets: a threshold crossing of silence or P(alive), or the event that tipped a
//!   count). It is exact for silence-driven rules and a safe lower bound of certainty otherwise.
//! * Score: 1 − P(active) from the model when one is fitted, raised to the floor of the level
//!   (watch 0.25, warning 0.5, critical 0.75, lost 1.0).

use serde::{Deserialize, Serialize};

use crate::bgnbd::{self, Rfm};
use crate::count::{CountKind, CountParams};
use crate::event::{ChurnLevel, LeavingReason, ModelFitted, RiskReason};
use crate::facts::{AsOf, CustomerFacts, NANOS_PER_DAY, day_of, day_start};
use crate::loyalty::Behaviour;
use crate::satisfaction::{NpsCategory, SatisfactionRules, c_index};
use crate::time::Timestamp;

/// Rule codes.
pub mod codes {
    /// BG/NBD P(alive) (or P(purchase) for one-time buyers) is low.
    pub const ALIVE_PROB_LOW: &str = "ALIVE_PROB_LOW";
    /// Silent well past the customer's rhythm.
    pub const OVERDUE_VISIT: &str = "OVERDUE_VISIT";
    /// Fewer purchase-days lately than the customer's average.
    pub const FREQUENCY_DROP: &str = "FREQUENCY_DROP";
    /// Open complaints past SLA, or many complaints.
    pub const COMPLAINT_BURDEN: &str = "COMPLAINT_BURDEN";
    /// A recent low C, low CSAT or NPS detractor.
    pub const DISSATISFIED: &str = "DISSATISFIED";
    /// The customer said why they are leaving.
    pub const STATED_REASON: &str = "STATED_REASON";
    /// Silent beyond `lost_after_days`.
    pub const SILENT_LOST: &str = "SILENT_LOST";
}

/// Configurable churn rules; defaults follow the brief (§4.3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChurnRules {
    /// ALIVE_PROB_LOW: P < this → watch. Default 0.5.
    pub alive_watch_below: f64,
    /// ALIVE_PROB_LOW: P < this → warning. Default 0.3.
    pub alive_warning_below: f64,
    /// One-time buyers: P(active) = P(some purchase in the next this many days). Default 365
    /// (90 ranks the CDNOW cohort better, but flags every new buyer on their first day:
    /// docs/read-models.md, "Tuning").
    pub one_time_horizon_days: i64,
    /// OVERDUE_VISIT: silence ≥ k × interval → watch. Default 1.5.
    pub overdue_watch_k: f64,
    /// OVERDUE_VISIT: silence ≥ k × interval → warning. Default 3.
    pub overdue_warning_k: f64,
    /// Textbook rule: customers expected this many visits a year or more… Default 5.
    pub textbook_visits_per_year: f64,
    /// …silent this many days → warning. Default 90.
    pub textbook_silent_days: i64,
    /// FREQUENCY_DROP: recent window, days. Default 90.
    pub frequency_recent_days: i64,
    /// FREQUENCY_DROP: reference window, days. Default 365.
    pub frequency_window_days: i64,
    /// FREQUENCY_DROP: recent < this × the reference average per recent window. Default 0.5.
    pub frequency_drop_below: f64,
    /// FREQUENCY_DROP: purchase-days needed in the reference window. Default 2.
    pub frequency_min_days: u32,
    /// COMPLAINT_BURDEN: SLA for an open complaint, hours. Default 72.
    pub complaint_sla_hours: i64,
    /// COMPLAINT_BURDEN: an open complaint past SLA with severity ≥ this → critical. Default 4.
    pub complaint_critical_severity: u32,
    /// COMPLAINT_BURDEN: window for counting complaints, days. Default 90.
    pub complaint_window_days: i64,
    /// COMPLAINT_BURDEN: this many complaints in the window → warning. Default 4.
    pub complaints_warning: u64,
    /// COMPLAINT_BURDEN: this many complaints in the window → watch. Default 2.
    pub complaints_watch: u64,
    /// DISSATISFIED: window, days. Default 180.
    pub dissatisfied_window_days: i64,
    /// DISSATISFIED: C below this. Default 0.95.
    pub dissatisfied_c_below: f64,
    /// DISSATISFIED: CSAT at most this. Default 2.
    pub dissatisfied_csat_at_most: u32,
    /// Lost after this many silent days. Default 365.
    pub lost_after_days: i64,
    /// The churn view's expected purchases E[Y(t)] are over the next this many days. Default
    /// 365.
    pub expected_purchases_days: i64,
    /// The count model behind ALIVE_PROB_LOW and the expectations: `bgnbd` (default) or
    /// `paretonbd`. Reads use the latest fit of this model; `fit` and the scheduled refits fit
    /// it. Under Pareto/NBD a one-time buyer's P(active) is their P(alive), which that model
    /// (unlike BG/NBD) lets fall with silence, so `one_time_horizon_days` does not apply.
    pub count_model: CountKind,
    /// What a customer at watch or worse puts at risk: `revenue` (default), their value in
    /// the trailing 365 days; or `clv`, their customer lifetime value.
    pub value_at_risk: ValueAtRisk,
    /// Customer lifetime value (the loyalty view's `value`, and the value at risk under
    /// `clv`): the horizon, months (1 … 1200). Default 12.
    pub clv_horizon_months: u32,
    /// Customer lifetime value: the discount rate per month, 0 ≤ d < 1. Default 0.01 (≈ 12.7 %
    /// a year), as in `lifetimes` and PyMC-Marketing.
    pub clv_monthly_discount: f64,
}

/// What a customer at watch or worse puts at risk ([`ChurnRules::value_at_risk`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueAtRisk {
    /// Their value in the trailing 365 days, in their main currency: what they have been
    /// spending.
    #[default]
    Revenue,
    /// Their customer lifetime value (the discounted residual value the models expect, in the
    /// spend model's currency): what their leaving would cost. None without a spend model, or
    /// for a customer who paid in another currency. It falls day by day while they are silent,
    /// so such customers are due for a re-evaluation every day.
    Clv,
}

impl Default for ChurnRules {
    fn default() -> Self {
        ChurnRules {
            alive_watch_below: 0.5,
            alive_warning_below: 0.3,
            one_time_horizon_days: 365,
            overdue_watch_k: 1.5,
            overdue_warning_k: 3.0,
            textbook_visits_per_year: 5.0,
            textbook_silent_days: 90,
            frequency_recent_days: 90,
            frequency_window_days: 365,
            frequency_drop_below: 0.5,
            frequency_min_days: 2,
            complaint_sla_hours: 72,
            complaint_critical_severity: 4,
            complaint_window_days: 90,
            complaints_warning: 4,
            complaints_watch: 2,
            dissatisfied_window_days: 180,
            dissatisfied_c_below: 0.95,
            dissatisfied_csat_at_most: 2,
            lost_after_days: 365,
            expected_purchases_days: 365,
            count_model: CountKind::BgNbd,
            value_at_risk: ValueAtRisk::Revenue,
            clv_horizon_months: 12,
            clv_monthly_discount: 0.01,
        }
    }
}

/// The churn-warning read model of one customer at `as_of`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChurnView {
    /// The instant and axis evaluated.
    pub as_of: AsOf,
    /// Level.
    pub level: ChurnLevel,
    /// Score in [0, 1].
    pub score: f64,
    /// Every rule that fired.
    pub reasons: Vec<RiskReason>,
    /// Probable cause; `None` = unknown.
    pub probable_cause: Option<LeavingReason>,
    /// At this level since.
    pub since: Option<Timestamp>,
    /// Last purchase-day + the mean interval.
    pub expected_next_purchase: Option<Timestamp>,
    /// The value of the trailing year in the main currency (minor units); 0 at level none.
    pub value_at_risk_minor: i64,
    /// Currency of the value at risk.
    pub currency: String,
    /// P(alive) (or P(purchase in the horizon) for one-time buyers) from the model.
    pub p_active: Option<f64>,
    /// The count model's P(alive) itself (under BG/NBD 1 for a one-time buyer: the model has
    /// seen no sign of them dropping out), when a model applies; in a customer's own view only
    /// ([`ChurnRules::evaluate_with_expectation`]).
    pub p_alive: Option<f64>,
    /// The count model's E[Y(t) | x, tₓ, T]: the purchase-days expected in the next
    /// `expected_purchases_days`, when a model applies; in a customer's own view only.
    pub expected_purchases: Option<f64>,
    /// The horizon of `expected_purchases`, days.
    pub expected_purchases_days: i64,
    /// The `model_version` of the fit used, if any.
    pub model_version: Option<String>,
}

/// A fired rule with its onset.
struct Fired {
    reason: RiskReason,
    onset: Option<Timestamp>,
}

fn fired(
    code: &str,
    level: ChurnLevel,
    evidence: String,
    threshold: String,
    onset: Option<Timestamp>,
) -> Fired {
    Fired {
        reason: RiskReason {
            code: code.to_owned(),
            level,
            evidence,
            threshold,
        },
        onset,
    }
}

/// The model's parameters and unit length in days.
fn model_params(m: &ModelFitted) -> Option<(CountParams, f64)> {
    CountParams::of(m)
}

/// BG/NBD statistics of purchase days `days` (ascending, non-empty) at day `today`, in units of
/// `unit` days.
pub fn rfm_of(days: &[i64], today: i64, unit: f64) -> Option<Rfm> {
    let first = *days.first()?;
    let last = *days.last()?;
    Some(Rfm {
        x: (days.len() - 1) as f64,
        t_x: (last - first) as f64 / unit,
        t: (today.max(last) - first) as f64 / unit,
    })
}

impl ChurnRules {
    /// The customer's lifetime value at `as_of` under `model` over `clv_horizon_months`,
    /// discounted by `clv_monthly_discount` ([`crate::clv::customer_value`]).
    pub fn clv(
        &self,
        facts: &CustomerFacts,
        model: &ModelFitted,
        as_of: AsOf,
    ) -> Option<crate::clv::CustomerValue> {
        crate::clv::customer_value(
            facts,
            model,
            as_of,
            crate::clv::Months(self.clv_horizon_months),
            crate::clv::MonthlyDiscount::new(self.clv_monthly_discount)?,
        )
    }

    /// The rules' ranges, and each pair of thresholds in the order of its levels.
    pub fn check(&self) -> Result<(), crate::population::RulesError> {
        let bad = |field: &'static str, detail: String| {
            Err(crate::population::RulesError::Value { field, detail })
        };
        if !(1..=1200).contains(&self.clv_horizon_months) {
            return bad(
                "churn.clv_horizon_months",
                format!("{}: need 1 … 1200 months", self.clv_horizon_months),
            );
        }
        if crate::clv::MonthlyDiscount::new(self.clv_monthly_discount).is_none() {
            return bad(
                "churn.clv_monthly_discount",
                format!("{}: a monthly rate is 0 ≤ d < 1", self.clv_monthly_discount),
            );
        }
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !unit(self.alive_watch_below) || !unit(self.alive_warning_below) {
            return bad(
                "churn.alive_watch_below",
                "the P(alive) thresholds are probabilities (0 … 1)".into(),
            );
        }
        if self.alive_warning_below > self.alive_watch_below {
            return bad(
                "churn.alive_warning_below",
                format!(
                    "{} is above alive_watch_below ({}): a warning needs a lower P(alive) than a watch",
                    self.alive_warning_below, self.alive_watch_below
                ),
            );
        }
        if !(self.overdue_watch_k > 0.0 && self.overdue_watch_k <= self.overdue_warning_k) {
            return bad(
                "churn.overdue_watch_k",
                format!(
                    "need 0 < overdue_watch_k ≤ overdue_warning_k, have {} and {}",
                    self.overdue_watch_k, self.overdue_warning_k
                ),
            );
        }
        if !(self.frequency_recent_days > 0
            && self.frequency_recent_days < self.frequency_window_days)
        {
            return bad(
                "churn.frequency_recent_days",
                format!(
                    "need 0 < frequency_recent_days < frequency_window_days, have {} and {}",
                    self.frequency_recent_days, self.frequency_window_days
                ),
            );
        }
        for (field, days) in [
            ("churn.one_time_horizon_days", self.one_time_horizon_days),
            ("churn.textbook_silent_days", self.textbook_silent_days),
            ("churn.frequency_recent_days", self.frequency_recent_days),
            ("churn.frequency_window_days", self.frequency_window_days),
            ("churn.complaint_window_days", self.complaint_window_days),
            (
                "churn.dissatisfied_window_days",
                self.dissatisfied_window_days,
            ),
            ("churn.lost_after_days", self.lost_after_days),
            (
                "churn.expected_purchases_days",
                self.expected_purchases_days,
            ),
            (
                "churn.complaint_sla_hours",
                self.complaint_sla_hours.saturating_add(23) / 24,
            ),
        ] {
            crate::population::check_days(field, days)?;
        }
        for (field, v) in [
            (
                "churn.textbook_visits_per_year",
                self.textbook_visits_per_year,
            ),
            ("churn.frequency_drop_below", self.frequency_drop_below),
            ("churn.dissatisfied_c_below", self.dissatisfied_c_below),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(field, format!("{v}: need a finite value > 0"));
            }
        }
        if !(1..=5).contains(&self.dissatisfied_csat_at_most) {
            return bad(
                "churn.dissatisfied_csat_at_most",
                format!("{}: CSAT is 1 … 5", self.dissatisfied_csat_at_most),
            );
        }
        if self.complaints_watch > self.complaints_warning {
            return bad(
                "churn.complaints_watch",
                format!(
                    "{} is above complaints_warning ({})",
                    self.complaints_watch, self.complaints_warning
                ),
            );
        }
        Ok(())
    }

    /// P(active) at day `today`: P(alive) for repeat buyers, P(a purchase within the one-time
    /// horizon) for one-time buyers.
    fn p_active(&self, p: &CountParams, unit: f64, days: &[i64], today: i64) -> Option<f64> {
        let rfm = rfm_of(days, today, unit)?;
        rfm.check().ok()?;
        Some(match p {
            CountParams::BgNbd(b) if rfm.x < 1.0 => {
                1.0 - bgnbd::p_no_purchase(b, &rfm, self.one_time_horizon_days as f64 / unit)
            }
            _ => p.p_alive(&rfm),
        })
    }

    /// The first day in `[lo, hi]` at which P(active) fell below `threshold` (it only falls
    /// during a silence), found by bisection.
    fn alive_onset(
        &self,
        p: &CountParams,
        unit: f64,
        days: &[i64],
        threshold: f64,
        hi: i64,
    ) -> i64 {
        let mut lo = *days.last().unwrap_or(&hi);
        let mut hi = hi;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self
                .p_active(p, unit, days, mid)
                .is_some_and(|v| v < threshold)
            {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        hi
    }

    /// [`ChurnRules::evaluate`] with what the model says about the customer beyond the
    /// warning: BG/NBD P(alive) and the purchase-days it expects over
    /// `expected_purchases_days` ([`ChurnView::p_alive`], [`ChurnView::expected_purchases`]).
    /// For a customer's own view (query, 360, the churn view on NATS); population passes and
    /// the at-risk list use [`ChurnRules::evaluate`], which leaves them out (a hypergeometric
    /// series per customer that no population figure uses).
    pub fn evaluate_with_expectation(
        &self,
        facts: &CustomerFacts,
        model: Option<&ModelFitted>,
        as_of: AsOf,
    ) -> ChurnView {
        let mut view = self.evaluate(facts, model, as_of);
        if let Some((p, unit)) = model.and_then(model_params)
            && let Some(rfm) = rfm_of(&facts.purchase_days(as_of), day_of(as_of.at), unit)
            && rfm.check().is_ok()
        {
            view.p_alive = Some(p.p_alive(&rfm));
            view.expected_purchases =
                p.expected_purchases(&rfm, self.expected_purchases_days as f64 / unit);
        }
        view
    }

    /// Evaluate the churn warning of `facts` at `as_of`, with the model fitted at the time
    /// (`None` when no fit exists yet: ALIVE_PROB_LOW is then silent).
    pub fn evaluate(
        &self,
        facts: &CustomerFacts,
        model: Option<&ModelFitted>,
        as_of: AsOf,
    ) -> ChurnView {
        let today = day_of(as_of.at);
        let days = facts.purchase_days(as_of);
        let behaviour = Behaviour::of(facts, as_of, self.frequency_window_days);
        let mut rules: Vec<Fired> = Vec::new();
        let last_day = days.last().copied();

        // ALIVE_PROB_LOW
        let mut p_active = None;
        let params = model.and_then(model_params);
        if let Some((p, unit)) = params
            && let Some(v) = self.p_active(&p, unit, &days, today)
        {
            p_active = Some(v);
            let what = if p.kind() == CountKind::ParetoNbd {
                "Pareto/NBD P(alive)".to_owned()
            } else if days.len() > 1 {
                "P(alive)".to_owned()
            } else {
                format!("P(purchase in {} d)", self.one_time_horizon_days)
            };
            let hit = if v < self.alive_warning_below {
                Some((ChurnLevel::Warning, self.alive_warning_below))
            } else if v < self.alive_watch_below {
                Some((ChurnLevel::Watch, self.alive_watch_below))
            } else {
                None
            };
            if let Some((level, th)) = hit {
                let onset = self.alive_onset(&p, unit, &days, th, today);
                rules.push(fired(
                    codes::ALIVE_PROB_LOW,
                    level,
                    format!("{what} = {v:.3}"),
                    format!("< {th:.2}"),
                    Some(day_start(onset)),
                ));
            }
        }

        // OVERDUE_VISIT and the silence itself
        let silence = last_day.map(|l| today - l);
        if let (Some(s), Some(interval), Some(l)) =
            (silence, behaviour.mean_interval_days, last_day)
        {
            let visits = 365.0 / interval;
            let evidence =
                format!("silent {s} d; expected every {interval:.1} d ({visits:.1} visits/yr)");
            let warn_at = (self.overdue_warning_k * interval).ceil() as i64;
            let watch_at = (self.overdue_watch_k * interval).ceil() as i64;
            if s >= warn_at {
                rules.push(fired(
                    codes::OVERDUE_VISIT,
                    ChurnLevel::Warning,
                    evidence.clone(),
                    format!(">= {:.1} x interval = {warn_at} d", self.overdue_warning_k),
                    Some(day_start(l + warn_at)),
                ));
            } else if visits >= self.textbook_visits_per_year && s >= self.textbook_silent_days {
                rules.push(fired(
                    codes::OVERDUE_VISIT,
                    ChurnLevel::Warning,
                    evidence.clone(),
                    format!(
                        ">= {:.0} visits/yr and >= {} d silent",
                        self.textbook_visits_per_year, self.textbook_silent_days
                    ),
                    Some(day_start(l + self.textbook_silent_days)),
                ));
            } else if s >= watch_at {
                rules.push(fired(
                    codes::OVERDUE_VISIT,
                    ChurnLevel::Watch,
                    evidence,
                    format!(">= {:.1} x interval = {watch_at} d", self.overdue_watch_k),
                    Some(day_start(l + watch_at)),
                ));
            }
        }

        // FREQUENCY_DROP
        if let Some(first) = days.first() {
            let window = self.frequency_window_days.min(today - first + 1).max(1);
            let in_window = days.iter().filter(|d| **d > today - window).count() as u32;
            let recent = days
                .iter()
                .filter(|d| **d > today - self.frequency_recent_days)
                .count() as f64;
            if in_window >= self.frequency_min_days && window > self.frequency_recent_days {
                let avg = f64::from(in_window) * self.frequency_recent_days as f64 / window as f64;
                if recent < self.frequency_drop_below * avg {
                    rules.push(fired(
                        codes::FREQUENCY_DROP,
                        ChurnLevel::Watch,
                        format!(
                            "{recent} purchase-days in the last {} d vs an average of {avg:.2} per {} d over {window} d",
                            self.frequency_recent_days, self.frequency_recent_days
                        ),
                        format!("< {:.0}% of the average", self.frequency_drop_below * 100.0),
                        None,
                    ));
                }
            }
        }

        // COMPLAINT_BURDEN
        let sat = SatisfactionRules {
            complaint_window_days: self.complaint_window_days,
            ..SatisfactionRules::default()
        };
        let complaints = sat.complaints(facts, as_of);
        let sla = self.complaint_sla_hours * 3600 * crate::time::NANOS_PER_SEC;
        for (id, raised, severity) in &complaints.open_items {
            let due = raised.unix_nanos().saturating_add(sla);
            if as_of.at.unix_nanos() >= due {
                let level = if *severity >= self.complaint_critical_severity {
                    ChurnLevel::Critical
                } else {
                    ChurnLevel::Warning
                };
                rules.push(fired(
                    codes::COMPLAINT_BURDEN,
                    level,
                    format!("complaint {id} (severity {severity}) open since {raised}"),
                    format!(
                        "open > {} h; severity >= {} is critical",
                        self.complaint_sla_hours, self.complaint_critical_severity
                    ),
                    Some(Timestamp::from_unix_nanos(due)),
                ));
            }
        }
        let window_start = as_of
            .at
            .unix_nanos()
            .saturating_sub(self.complaint_window_days.saturating_mul(NANOS_PER_DAY));
        let recent: Vec<Timestamp> = facts
            .complaints_at(as_of)
            .map(|c| c.stamp.occurred_at)
            .filter(|t| t.unix_nanos() > window_start)
            .collect();
        let n = recent.len() as u64;
        let count_hit = if n >= self.complaints_warning {
            Some((ChurnLevel::Warning, self.complaints_warning))
        } else if n >= self.complaints_watch {
            Some((ChurnLevel::Watch, self.complaints_watch))
        } else {
            None
        };
        if let Some((level, th)) = count_hit {
            rules.push(fired(
                codes::COMPLAINT_BURDEN,
                level,
                format!(
                    "{n} complaints in the last {} d",
                    self.complaint_window_days
                ),
                format!(">= {th}"),
                recent.get(th as usize - 1).copied(),
            ));
        }

        // DISSATISFIED
        let dis_start = as_of
            .at
            .unix_nanos()
            .saturating_sub(self.dissatisfied_window_days.saturating_mul(NANOS_PER_DAY));
        let mut last_c = None;
        let mut last_csat = None;
        let mut last_nps = None;
        for s in facts.surveys_at(as_of) {
            if s.stamp.occurred_at.unix_nanos() <= dis_start {
                continue;
            }
            if let (Some(a), Some(b)) = (s.expectation, s.performance)
                && let Some(c) = c_index(a, b)
            {
                last_c = Some((a, b, c, s.stamp.occurred_at));
            }
            if let Some(v) = s.csat {
                last_csat = Some((v, s.stamp.occurred_at));
            }
            if let Some(v) = s.nps {
                last_nps = Some((v, s.stamp.occurred_at));
            }
        }
        let window = format!("within {} d", self.dissatisfied_window_days);
        if let Some((a, b, c, at)) = last_c
            && c < self.dissatisfied_c_below
        {
            rules.push(fired(
                codes::DISSATISFIED,
                ChurnLevel::Watch,
                format!("last C = {b}/{a} = {c:.3}"),
                format!("C < {:.2} {window}", self.dissatisfied_c_below),
                Some(at),
            ));
        }
        if let Some((v, at)) = last_csat
            && v <= self.dissatisfied_csat_at_most
        {
            rules.push(fired(
                codes::DISSATISFIED,
                ChurnLevel::Watch,
                format!("last CSAT = {v}"),
                format!("CSAT <= {} {window}", self.dissatisfied_csat_at_most),
                Some(at),
            ));
        }
        if let Some((v, at)) = last_nps
            && NpsCategory::of(v) == NpsCategory::Detractor
        {
            rules.push(fired(
                codes::DISSATISFIED,
                ChurnLevel::Watch,
                format!("last NPS = {v} (detractor)"),
                format!("NPS <= 6 {window}"),
                Some(at),
            ));
        }

        // STATED_REASON: the latest reason stated since the last purchase-day.
        let stated = facts
            .stated_reasons(as_of)
            .into_iter()
            .rfind(|(at, _)| last_day.is_none_or(|l| day_of(*at) >= l));
        if let Some((at, reason)) = stated {
            let level = match reason {
                LeavingReason::Natural | LeavingReason::NeedChange => ChurnLevel::Lost,
                LeavingReason::Competitor | LeavingReason::Disappointment => ChurnLevel::Warning,
            };
            rules.push(fired(
                codes::STATED_REASON,
                level,
                format!("stated reason {reason:?} on {at}"),
                "natural or need change: lost; otherwise warning".into(),
                Some(at),
            ));
        }
        if let (Some(s), Some(l)) = (silence, last_day)
            && s >= self.lost_after_days
        {
            rules.push(fired(
                codes::SILENT_LOST,
                ChurnLevel::Lost,
                format!("silent {s} d"),
                format!(">= {} d", self.lost_after_days),
                Some(day_start(l + self.lost_after_days)),
            ));
        }

        self.decide(rules, p_active, model, &behaviour, as_of, facts)
    }

    /// The next instant after `as_of` at which this customer's verdict can change without a
    /// new event — a silence threshold, an SLA expiring, a complaint or survey leaving its
    /// window, a purchase leaving a frequency window, P(active) falling below a threshold —
    /// capped at `as_of + max_recheck_days`. The assessor's due-time index is keyed by it, so a
    /// sweep visits only the customers whose verdict may have changed.
    pub fn next_due(
        &self,
        facts: &CustomerFacts,
        model: Option<&ModelFitted>,
        as_of: AsOf,
        max_recheck_days: i64,
    ) -> Timestamp {
        let now = as_of.at.unix_nanos();
        let today = day_of(as_of.at);
        let cap = day_start(today + max_recheck_days.max(1));
        let mut best = cap;
        let mut consider = |t: Timestamp| {
            if t.unix_nanos() > now && t < best {
                best = t;
            }
        };
        let days = facts.purchase_days(as_of);
        if self.value_at_risk == ValueAtRisk::Clv
            && let Some(spend) = model.and_then(|m| m.spend.as_ref())
            && !days.is_empty()
            && facts
                .purchases_at(as_of)
                .all(|p| p.currency.as_str() == spend.currency)
        {
            // A CLV changes with every day of T: the value at risk is re-evaluated daily (a
            // buyer who paid in another currency has none, and nothing to re-evaluate).
            consider(day_start(today + 1));
        }
        if let (Some(&first), Some(&last)) = (days.first(), days.last()) {
            consider(day_start(last + self.lost_after_days));
            if days.len() > 1 {
                let interval = (last - first) as f64 / (days.len() - 1) as f64;
                consider(day_start(
                    last + (self.overdue_watch_k * interval).ceil() as i64,
                ));
                consider(day_start(
                    last + (self.overdue_warning_k * interval).ceil() as i64,
                ));
                consider(day_start(last + self.textbook_silent_days));
            }
            for d in &days {
                consider(day_start(d + self.frequency_recent_days));
                consider(day_start(d + self.frequency_window_days));
            }
            if let Some((p, unit)) = model.and_then(model_params)
                && let Some(v) = self.p_active(&p, unit, &days, today)
            {
                let next = [self.alive_watch_below, self.alive_warning_below]
                    .into_iter()
                    .find(|th| v >= *th);
                if let Some(th) = next {
                    let horizon = today + max_recheck_days.max(1);
                    if self
                        .p_active(&p, unit, &days, horizon)
                        .is_some_and(|x| x < th)
                    {
                        let mut lo = today + 1;
                        let mut hi = horizon;
                        while lo < hi {
                            let mid = lo + (hi - lo) / 2;
                            if self.p_active(&p, unit, &days, mid).is_some_and(|x| x < th) {
                                hi = mid;
                            } else {
                                lo = mid + 1;
                            }
                        }
                        consider(day_start(hi));
                    }
                }
            }
        }
        let sla = self.complaint_sla_hours * 3600 * crate::time::NANOS_PER_SEC;
        for c in facts.complaints_at(as_of) {
            let t = c.stamp.occurred_at.unix_nanos();
            consider(Timestamp::from_unix_nanos(t.saturating_add(sla)));
            consider(Timestamp::from_unix_nanos(t.saturating_add(
                self.complaint_window_days.saturating_mul(NANOS_PER_DAY),
            )));
        }
        for s in facts.surveys_at(as_of) {
            consider(Timestamp::from_unix_nanos(
                s.stamp
                    .occurred_at
                    .unix_nanos()
                    .saturating_add(self.dissatisfied_window_days.saturating_mul(NANOS_PER_DAY)),
            ));
        }
        best
    }

    fn decide(
        &self,
        rules: Vec<Fired>,
        p_active: Option<f64>,
        model: Option<&ModelFitted>,
        behaviour: &Behaviour,
        as_of: AsOf,
        facts: &CustomerFacts,
    ) -> ChurnView {
        let is = |code: &'static str| rules.iter().filter(move |r| r.reason.code == code);
        let alive_warning =
            is(codes::ALIVE_PROB_LOW).any(|r| r.reason.level >= ChurnLevel::Warning);
        let burden: Vec<&Fired> = is(codes::COMPLAINT_BURDEN)
            .chain(is(codes::DISSATISFIED))
            .collect();
        let max_level = rules
            .iter()
            .map(|r| r.reason.level)
            .max()
            .unwrap_or(ChurnLevel::None);
        let level = if max_level == ChurnLevel::Lost {
            ChurnLevel::Lost
        } else if alive_warning && !burden.is_empty() {
            ChurnLevel::Critical
        } else {
            max_level
        };
        // since: for a combined critical, both sides must hold; otherwise the earliest onset
        // among the rules at the final level.
        let earliest = |it: &mut dyn Iterator<Item = &Fired>| it.filter_map(|r| r.onset).min();
        let since = if level == ChurnLevel::None {
            None
        } else {
            let onset = if level == ChurnLevel::Critical
                && !rules.iter().any(|r| r.reason.level == ChurnLevel::Critical)
            {
                let a = earliest(&mut is(codes::ALIVE_PROB_LOW));
                let b = earliest(&mut burden.iter().copied());
                a.zip(b).map(|(a, b)| a.max(b))
            } else {
                earliest(&mut rules.iter().filter(|r| r.reason.level == level))
            };
            Some(onset.unwrap_or(as_of.at).min(as_of.at))
        };
        let probable_cause = if level == ChurnLevel::None {
            None
        } else if let Some(r) = facts
            .stated_reasons(as_of)
            .into_iter()
            .rfind(|(at, _)| behaviour.last.is_none_or(|l| *at >= l))
        {
            Some(r.1)
        } else if !burden.is_empty()
            || facts.complaints_at(as_of).any(|c| {
                c.stamp.occurred_at.unix_nanos()
                    > as_of
                        .at
                        .unix_nanos()
                        .saturating_sub(self.complaint_window_days.saturating_mul(NANOS_PER_DAY))
            })
        {
            Some(LeavingReason::Disappointment)
        } else {
            None
        };
        let floor = match level {
            ChurnLevel::None => 0.0,
            ChurnLevel::Watch => 0.25,
            ChurnLevel::Warning => 0.5,
            ChurnLevel::Critical => 0.75,
            ChurnLevel::Lost => 1.0,
        };
        let score = p_active
            .map_or(floor, |p| (1.0 - p).max(floor))
            .clamp(0.0, 1.0);

        let mut currency = behaviour.main_currency().unwrap_or_default().to_owned();
        let value_at_risk_minor = match (level, self.value_at_risk) {
            (ChurnLevel::None, _) => 0,
            (_, ValueAtRisk::Revenue) => behaviour
                .monetary_window
                .get(&currency)
                .copied()
                .unwrap_or(0),
            (_, ValueAtRisk::Clv) => match model.and_then(|m| self.clv(facts, m, as_of)) {
                Some(v) => {
                    currency = v.currency;
                    // Rounded to whole minor units, never below 0 (a sum of non-negative
                    // terms; rounding error must not make a value at risk negative, which
                    // validation refuses); `as` saturates far above any CLV.
                    v.clv_minor.max(0.0).round() as i64
                }
                None => 0,
            },
        };
        let expected_next_purchase = behaviour
            .last
            .zip(behaviour.mean_interval_days)
            .map(|(l, i)| day_start(day_of(l) + i.round() as i64));
        ChurnView {
            as_of,
            level,
            score,
            reasons: rules.into_iter().map(|r| r.reason).collect(),
            probable_cause,
            since,
            expected_next_purchase,
            value_at_risk_minor,
            currency,
            p_active,
            p_alive: None,
            expected_purchases: None,
            expected_purchases_days: self.expected_purchases_days,
            model_version: model.map(|m| m.model_version.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Survey;
    use crate::facts::test_support::{Log, day};

    fn paper_model() -> ModelFitted {
        ModelFitted {
            model: "bgnbd".into(),
            model_version: "v1".into(),
            r: 0.2426,
            alpha: 4.4135,
            a: 0.7929,
            b: 2.4258,
            log_likelihood: -9582.4,
            customers: 2357,
            time_unit: crate::event::TimeUnit::Weeks,
            calibration_end: day(0),
            spend: None,
        }
    }

    #[test]
    fn a_value_at_risk_by_clv_is_the_clv_and_is_due_daily() {
        let model = ModelFitted {
            spend: Some(crate::event::SpendModel {
                currency: "USD".into(),
                p: 6.25,
                q: 3.74,
                gamma: 1544.0,
                log_likelihood: -8412.4,
                customers: 946,
            }),
            ..paper_model()
        };
        let mut l = Log::default();
        l.purchase("a", 0, 2_000)
            .purchase("b", 30, 3_000)
            .purchase("c", 70, 1_500);
        let at = AsOf::business(day(400));
        let by_clv = ChurnRules {
            value_at_risk: ValueAtRisk::Clv,
            ..ChurnRules::default()
        };
        let v = by_clv.evaluate(&l.facts, Some(&model), at);
        assert_ne!(v.level, ChurnLevel::None, "{v:#?}");
        let clv = by_clv.clv(&l.facts, &model, at).expect("a CLV");
        assert_eq!(v.value_at_risk_minor, clv.clv_minor.round() as i64);
        assert!(v.value_at_risk_minor > 0);
        // By revenue (the default) the trailing 365 days: only day 70's purchase.
        let by_revenue = ChurnRules::default().evaluate(&l.facts, Some(&model), at);
        assert_eq!(by_revenue.value_at_risk_minor, 1_500);
        // A CLV changes daily: due tomorrow; by revenue nothing is due before the cap.
        let tomorrow = crate::facts::day_start(401);
        assert_eq!(by_clv.next_due(&l.facts, Some(&model), at, 30), tomorrow);
        assert!(ChurnRules::default().next_due(&l.facts, Some(&model), at, 30) > tomorrow);
        // Without a spend model there is no CLV and nothing at risk by it.
        let v = by_clv.evaluate(&l.facts, Some(&paper_model()), at);
        assert_eq!(v.value_at_risk_minor, 0);
    }

    #[test]
    fn a_pareto_nbd_fit_speaks_for_one_time_buyers_with_its_own_p_alive() {
        // The published CDNOW Pareto/NBD (s and β recorded as a and b), in weeks.
        let pareto = ModelFitted {
            model: "paretonbd".into(),
            model_version: "p1".into(),
            r: 0.553,
            alpha: 10.578,
            a: 0.606,
            b: 11.669,
            log_likelihood: -9595.0,
            ..paper_model()
        };
        let rules = ChurnRules {
            count_model: CountKind::ParetoNbd,
            ..ChurnRules::default()
        };
        let q = crate::paretonbd::Params {
            r: 0.553,
            alpha: 10.578,
            s: 0.606,
            beta: 11.669,
        };
        for (days, at) in [(vec![0], 140), (vec![0, 30, 70], 300)] {
            let mut l = Log::default();
            for (i, d) in days.iter().enumerate() {
                l.purchase(&format!("p{i}"), *d, 1_000);
            }
            let v =
                rules.evaluate_with_expectation(&l.facts, Some(&pareto), AsOf::business(day(at)));
            let rfm = rfm_of(&days, at, 7.0).expect("buyer");
            let alive = crate::paretonbd::p_alive(&q, &rfm);
            assert_eq!(v.p_active, Some(alive), "{days:?}: P(active) is P(alive)");
            assert_eq!(v.p_alive, Some(alive));
            assert_eq!(
                v.expected_purchases,
                crate::paretonbd::expected_purchases(&q, &rfm, 365.0 / 7.0)
            );
            assert_eq!(v.model_version.as_deref(), Some("p1"));
            if alive < rules.alive_watch_below {
                assert!(
                    v.reasons.iter().any(|r| r.code == codes::ALIVE_PROB_LOW
                        && r.evidence.starts_with("Pareto/NBD P(alive) = ")),
                    "{v:#?}"
                );
            }
        }
        // A fit of an unknown model applies no alive rule.
        let other = ModelFitted {
            model: "other".into(),
            ..paper_model()
        };
        let mut l = Log::default();
        l.purchase("p", 0, 1_000);
        let v = rules.evaluate(&l.facts, Some(&other), AsOf::business(day(140)));
        assert_eq!(v.p_active, None);
    }

    fn codes_of(v: &ChurnView) -> Vec<(&str, ChurnLevel)> {
        v.reasons
            .iter()
            .map(|r| (r.code.as_str(), r.level))
            .collect()
    }

    fn rhythm_73() -> Log {
        let mut l = Log::default();
        for (i, d) in [0, 73, 146, 219, 292].into_iter().enumerate() {
            l.purchase(&format!("p{i}"), d, 1000);
        }
        l
    }

    #[test]
    fn textbook_overdue_rule_89_vs_90_days() {
        let rules = ChurnRules::default();
        let l = rhythm_73();
        // Expected 5 visits a year (every 73 d). 89 days silent: 1.5 × 73 = 110 d not reached,
        // textbook 90 d not reached → nothing from OVERDUE_VISIT.
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(292 + 89)));
        assert!(
            !codes_of(&v).iter().any(|c| c.0 == codes::OVERDUE_VISIT),
            "{v:#?}"
        );
        assert_eq!(v.level, ChurnLevel::None);
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(292 + 90)));
        assert_eq!(
            codes_of(&v),
            vec![
                (codes::OVERDUE_VISIT, ChurnLevel::Warning),
                // A full quarter without a visit is also a frequency drop.
                (codes::FREQUENCY_DROP, ChurnLevel::Watch)
            ]
        );
        assert_eq!(v.level, ChurnLevel::Warning);
        assert_eq!(v.reasons[0].threshold, ">= 5 visits/yr and >= 90 d silent");
        assert_eq!(v.since.map(day_of), Some(292 + 90));
        // No complaint, no survey, no stated reason → cause unknown, never invented.
        assert_eq!(v.probable_cause, None);
        assert_eq!(v.expected_next_purchase.map(day_of), Some(292 + 73));
        // The trailing year (days 18..=382) holds 4 of the 5 purchases.
        assert_eq!(v.value_at_risk_minor, 4000);
        // The k rule: 3 × 73 = 219 d → still warning; 1.5× rule alone for a slower customer.
        let mut slow = Log::default();
        slow.purchase("a", 0, 1).purchase("b", 100, 1);
        let v = rules.evaluate(&slow.facts, None, AsOf::business(day(100 + 150)));
        assert!(
            codes_of(&v).contains(&(codes::OVERDUE_VISIT, ChurnLevel::Watch)),
            "{v:#?}"
        );
        let v = rules.evaluate(&slow.facts, None, AsOf::business(day(100 + 300)));
        assert!(codes_of(&v).contains(&(codes::OVERDUE_VISIT, ChurnLevel::Warning)));
    }

    #[test]
    fn complaint_burden_and_critical_disappointment() {
        let rules = ChurnRules::default();
        let at = AsOf::business(day(440));
        // One purchase (no rhythm, no model) and 4 complaints within 90 days, each resolved
        // (so the SLA rule is silent): COMPLAINT_BURDEN alone → warning.
        let mut l = Log::default();
        l.purchase("p0", 380, 1000);
        for i in 0..4 {
            let d = 400 + 10 * i;
            l.complaint(&format!("c{i}"), d, 2);
            l.resolve(&format!("cb{i}"), d + 1, &format!("c{i}"), Some(5));
        }
        let v = rules.evaluate(&l.facts, None, at);
        assert_eq!(
            codes_of(&v),
            vec![(codes::COMPLAINT_BURDEN, ChurnLevel::Warning)]
        );
        assert_eq!(v.level, ChurnLevel::Warning);
        assert_eq!(v.probable_cause, Some(LeavingReason::Disappointment));
        // The 4th complaint tipped it.
        assert_eq!(v.since, Some(day(430)));
        // Three complaints → watch only.
        let mut three = Log::default();
        three.purchase("p0", 380, 1);
        for i in 0..3 {
            three.complaint(&format!("c{i}"), 400 + i, 1);
            three.resolve(&format!("cb{i}"), 401 + i, &format!("c{i}"), None);
        }
        assert_eq!(
            rules.evaluate(&three.facts, None, at).level,
            ChurnLevel::Watch
        );

        // A burst of purchases then silence, under the paper's model: P(alive) ≈ 0.25.
        // With 4 complaints and C = 8/10 → critical, cause disappointment.
        let mut l = Log::default();
        l.purchase("p0", 300, 1000)
            .purchase("p1", 303, 1000)
            .purchase("p2", 307, 1000);
        for i in 0..4 {
            let d = 320 + 10 * i;
            l.complaint(&format!("c{i}"), d, 2);
            l.resolve(&format!("cb{i}"), d + 1, &format!("c{i}"), Some(5));
        }
        l.survey(
            "s",
            360,
            Survey {
                expectation: Some(10),
                performance: Some(8),
                ..Default::default()
            },
        );
        let model = paper_model();
        let v = rules.evaluate(&l.facts, Some(&model), AsOf::business(day(388)));
        let p = v.p_active.expect("model applies");
        assert!((0.2..0.3).contains(&p), "P(alive) = {p}");
        let c = codes_of(&v);
        assert!(
            c.contains(&(codes::ALIVE_PROB_LOW, ChurnLevel::Warning)),
            "{v:#?}"
        );
        assert!(c.contains(&(codes::COMPLAINT_BURDEN, ChurnLevel::Warning)));
        assert!(c.contains(&(codes::DISSATISFIED, ChurnLevel::Watch)));
        assert_eq!(v.level, ChurnLevel::Critical);
        assert_eq!(v.probable_cause, Some(LeavingReason::Disappointment));
        assert_eq!(v.model_version.as_deref(), Some("v1"));
        assert!(v.score >= 0.75);
        // Without the model, the same customer is "only" at warning.
        assert_eq!(
            rules
                .evaluate(&l.facts, None, AsOf::business(day(388)))
                .level,
            ChurnLevel::Warning
        );
    }

    #[test]
    fn open_complaint_past_sla() {
        let rules = ChurnRules::default();
        let mut l = Log::default();
        l.purchase("p", 0, 1).complaint("c1", 10, 3);
        // 72 h later exactly: warning; severity 4 → critical.
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(12)));
        assert_eq!(v.level, ChurnLevel::None);
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(13)));
        assert_eq!(v.level, ChurnLevel::Warning);
        l.complaint("c2", 11, 4);
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(14)));
        assert_eq!(v.level, ChurnLevel::Critical);
        assert_eq!(v.probable_cause, Some(LeavingReason::Disappointment));
        // Resolving both clears the SLA rule; 2 complaints in 90 d remain a watch.
        l.resolve("r1", 15, "c1", Some(4))
            .resolve("r2", 15, "c2", Some(2));
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(16)));
        assert_eq!(
            codes_of(&v),
            vec![(codes::COMPLAINT_BURDEN, ChurnLevel::Watch)]
        );
    }

    #[test]
    fn stated_reasons_set_the_cause() {
        let rules = ChurnRules::default();
        let mut l = Log::default();
        l.purchase("p", 0, 1)
            .complaint("c", 5, 1)
            .stated("cb", 6, LeavingReason::Competitor);
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(7)));
        assert_eq!(v.level, ChurnLevel::Warning);
        // Stated first, even with a complaint on record.
        assert_eq!(v.probable_cause, Some(LeavingReason::Competitor));
        l.stated("cb2", 8, LeavingReason::Natural);
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(9)));
        assert_eq!(v.level, ChurnLevel::Lost);
        assert_eq!(v.probable_cause, Some(LeavingReason::Natural));
        // A purchase after the statement: the customer came back.
        l.purchase("p2", 20, 1);
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(21)));
        assert_ne!(v.level, ChurnLevel::Lost);
    }

    #[test]
    fn silence_beyond_lost_after_is_lost() {
        let rules = ChurnRules::default();
        let mut l = Log::default();
        l.purchase("p", 0, 1);
        assert_eq!(
            rules
                .evaluate(&l.facts, None, AsOf::business(day(364)))
                .level,
            ChurnLevel::None
        );
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(365)));
        assert_eq!(v.level, ChurnLevel::Lost);
        assert_eq!(v.since.map(day_of), Some(365));
        assert_eq!(v.score, 1.0);
    }

    #[test]
    fn frequency_drop() {
        let rules = ChurnRules::default();
        let mut l = Log::default();
        for d in [0, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200, 220] {
            l.purchase(&format!("p{d}"), d, 1);
        }
        // At day 300: 12 purchase-days over 301 d → 3.6 per 90 d; 0 in the last 90 d.
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(300)));
        assert!(
            codes_of(&v).contains(&(codes::FREQUENCY_DROP, ChurnLevel::Watch)),
            "{v:#?}"
        );
        // At day 230 the rhythm holds.
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(230)));
        assert!(!codes_of(&v).iter().any(|c| c.0 == codes::FREQUENCY_DROP));
    }

    #[test]
    fn one_time_buyers_use_the_purchase_probability() {
        let rules = ChurnRules::default();
        let mut l = Log::default();
        l.purchase("p", 0, 1);
        let m = paper_model();
        let v = rules.evaluate(&l.facts, Some(&m), AsOf::business(day(300)));
        let p = v.p_active.expect("p");
        assert!(p > 0.0 && p < 1.0, "{p}");
        assert!(
            v.reasons
                .iter()
                .any(|r| r.evidence.starts_with("P(purchase in 365 d)")),
            "{v:#?}"
        );
        // The onset is the first day P fell below the threshold: at that day, P is below; the
        // day before, it was not.
        let r = v
            .reasons
            .iter()
            .find(|r| r.code == codes::ALIVE_PROB_LOW)
            .expect("fired");
        let th = if r.level == ChurnLevel::Warning {
            0.3
        } else {
            0.5
        };
        let onset = day_of(v.since.expect("since"));
        let at = |d: i64| {
            rules
                .evaluate(&l.facts, Some(&m), AsOf::business(day(d)))
                .p_active
                .expect("p")
        };
        assert!(at(onset) < th && at(onset - 1) >= th, "onset {onset}");
    }

    #[test]
    fn next_due_is_the_next_threshold() {
        let rules = ChurnRules::default();
        let l = rhythm_73();
        // At day 300 the next change point is the purchase of day 219 leaving the 90-day
        // frequency window (day 309); at day 381 it is the textbook rule (292 + 90 = 382).
        let due = rules.next_due(&l.facts, None, AsOf::business(day(300)), 30);
        assert_eq!(day_of(due), 309);
        let due = rules.next_due(&l.facts, None, AsOf::business(day(381)), 30);
        assert_eq!(day_of(due), 382);
        // And the verdict does change there.
        assert_eq!(
            rules
                .evaluate(&l.facts, None, AsOf::business(day(381)))
                .level,
            ChurnLevel::None
        );
        assert_eq!(
            rules.evaluate(&l.facts, None, AsOf::business(due)).level,
            ChurnLevel::Warning
        );
        // Nothing pending: the cap.
        let empty = Log::default();
        assert_eq!(
            day_of(rules.next_due(&empty.facts, None, AsOf::business(day(10)), 30)),
            40
        );
        // An open complaint: due when its SLA expires.
        let mut c = Log::default();
        c.complaint("k", 10, 2);
        let due = rules.next_due(&c.facts, None, AsOf::business(day(10)), 30);
        assert_eq!(
            due,
            Timestamp::from_unix_nanos(day(10).unix_nanos() + 72 * 3_600_000_000_000)
        );
    }

    #[test]
    fn no_evidence_no_level() {
        let rules = ChurnRules::default();
        let l = Log::default();
        let v = rules.evaluate(&l.facts, None, AsOf::business(day(10)));
        assert_eq!(v.level, ChurnLevel::None);
        assert_eq!(v.probable_cause, None);
        assert!(v.reasons.is_empty());
    }
}
