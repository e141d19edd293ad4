//! Satisfaction primitives (brief §4.1): the textbook index C = b/a and its classes, the
//! time-decayed mean, NPS categories and the additive population counters (NPS, CSAT %, mean CES).
//!
//! Key decisions:
//! * The decayed mean is kept as (W, S, reference time) with every weight expressed relative to
//!   the *latest* observation time. A value that arrives late (older than the reference) is added
//!   with its own discount, so the state does not depend on arrival order, and a retraction
//!   subtracts exactly what was added. The mean at any `as_of` after the reference is S/W, because
//!   decaying both sums by the same factor leaves the ratio unchanged.
//! * Rules are named, configurable ([`SatisfactionRules`]), and their verdicts carry a
//!   [`Reason`] (code, evidence, threshold).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::facts::{AsOf, CustomerFacts, NANOS_PER_DAY as DAY_NANOS};
use crate::time::{NANOS_PER_SEC, Timestamp};

/// Nanoseconds per day.
const NANOS_PER_DAY: f64 = 86_400.0 * NANOS_PER_SEC as f64;

/// Configurable satisfaction rules. Defaults follow the brief (§4.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SatisfactionRules {
    /// C at or above this is "delighted". Default 1.10.
    pub delighted_at: f64,
    /// C at or above this (and below `delighted_at`) is "met"; below is "dissatisfied". Default 0.95.
    pub met_at: f64,
    /// Half-life of the decayed means, in days. Default 180.
    pub half_life_days: f64,
    /// The trend compares the decayed mean now with the one this many days earlier. Default 90.
    pub trend_lag_days: i64,
    /// A change of the decayed C mean smaller than this is "flat". Default 0.02.
    pub trend_flat_within: f64,
    /// Window of "complaints in the last N days". Default 90.
    pub complaint_window_days: i64,
    /// A resolution rated at least this (1–5) counts as a recovery. Default 4.
    pub recovered_at: u32,
}

impl Default for SatisfactionRules {
    fn default() -> Self {
        SatisfactionRules {
            delighted_at: 1.10,
            met_at: 0.95,
            half_life_days: 180.0,
            trend_lag_days: 90,
            trend_flat_within: 0.02,
            complaint_window_days: 90,
            recovered_at: 4,
        }
    }
}

/// Why a verdict was reached: a stable rule code, the evidence and the threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// Stable rule code, e.g. `C_INDEX_CLASS`.
    pub code: String,
    /// The evidence, e.g. `C = 8/10 = 0.800`.
    pub evidence: String,
    /// The threshold applied, e.g. `C < 0.95`.
    pub threshold: String,
}

/// The textbook satisfaction classes of C = b/a.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SatisfactionClass {
    /// C ≥ 1.10: performance beyond expectation.
    Delighted,
    /// 0.95 ≤ C < 1.10.
    Met,
    /// C < 0.95.
    Dissatisfied,
}

impl fmt::Display for SatisfactionClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SatisfactionClass::Delighted => "delighted",
            SatisfactionClass::Met => "met",
            SatisfactionClass::Dissatisfied => "dissatisfied",
        })
    }
}

/// C = b / a. `None` when a = 0 (validation rejects such surveys with `EXPECTATION_ZERO`).
pub fn c_index(expectation: u32, performance: u32) -> Option<f64> {
    (expectation > 0).then(|| f64::from(performance) / f64::from(expectation))
}

impl SatisfactionRules {
    /// Classify a survey's (a, b) pair, with the reason.
    pub fn classify(
        &self,
        expectation: u32,
        performance: u32,
    ) -> Option<(SatisfactionClass, Reason)> {
        let c = c_index(expectation, performance)?;
        let (class, threshold) = if c >= self.delighted_at {
            (
                SatisfactionClass::Delighted,
                format!("C >= {:.2}", self.delighted_at),
            )
        } else if c >= self.met_at {
            (
                SatisfactionClass::Met,
                format!("{:.2} <= C < {:.2}", self.met_at, self.delighted_at),
            )
        } else {
            (
                SatisfactionClass::Dissatisfied,
                format!("C < {:.2}", self.met_at),
            )
        };
        Some((
            class,
            Reason {
                code: "C_INDEX_CLASS".into(),
                evidence: format!("C = {performance}/{expectation} = {c:.3}"),
                threshold,
            },
        ))
    }

    /// An empty decayed mean under these rules' half-life.
    pub fn decayed_mean(&self) -> DecayedMean {
        DecayedMean::new(self.half_life_days)
    }
}

/// A time-decayed mean with O(1) updates: k = 2^(−Δt/H), W = k·W + 1, S = k·S + v, mean = S/W.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecayedMean {
    half_life_days: f64,
    /// Sum of weights, relative to `reference`.
    w: f64,
    /// Weighted sum of values, relative to `reference`.
    s: f64,
    /// The latest observation time (weights are 1 there).
    reference: Option<Timestamp>,
    /// Number of values currently included.
    n: u64,
}

impl DecayedMean {
    /// Empty, with half-life `half_life_days`.
    pub fn new(half_life_days: f64) -> Self {
        DecayedMean {
            half_life_days,
            w: 0.0,
            s: 0.0,
            reference: None,
            n: 0,
        }
    }

    fn factor(&self, older: Timestamp, newer: Timestamp) -> f64 {
        let days = (newer.unix_nanos() - older.unix_nanos()) as f64 / NANOS_PER_DAY;
        (-days / self.half_life_days).exp2()
    }

    /// Add value `v` observed at `at` (any order of arrival).
    pub fn add(&mut self, v: f64, at: Timestamp) {
        self.apply(v, at, 1.0);
        self.n += 1;
    }

    /// Remove a value previously added (a retraction).
    pub fn remove(&mut self, v: f64, at: Timestamp) {
        self.apply(v, at, -1.0);
        self.n = self.n.saturating_sub(1);
        if self.n == 0 {
            self.w = 0.0;
            self.s = 0.0;
        }
    }

    fn apply(&mut self, v: f64, at: Timestamp, sign: f64) {
        match self.reference {
            Some(r) if at <= r => {
                let k = self.factor(at, r);
                self.w += sign * k;
                self.s += sign * k * v;
            }
            Some(r) => {
                // A newer observation: re-base the sums on it.
                let k = self.factor(r, at);
                self.w = k * self.w + sign;
                self.s = k * self.s + sign * v;
                self.reference = Some(at);
            }
            None => {
                self.w = sign;
                self.s = sign * v;
                self.reference = Some(at);
            }
        }
    }

    /// The decayed mean (the same at every instant after the latest observation), or `None`
    /// when empty.
    pub fn mean(&self) -> Option<f64> {
        (self.n > 0 && self.w > 0.0).then(|| self.s / self.w)
    }

    /// Number of values included.
    pub fn count(&self) -> u64 {
        self.n
    }
}

/// NPS category of a 0–10 answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NpsCategory {
    /// 9–10.
    Promoter,
    /// 7–8.
    Passive,
    /// 0–6.
    Detractor,
}

impl NpsCategory {
    /// Categorise a likelihood-to-recommend answer.
    pub fn of(score: u32) -> NpsCategory {
        match score {
            9.. => NpsCategory::Promoter,
            7 | 8 => NpsCategory::Passive,
            _ => NpsCategory::Detractor,
        }
    }
}

/// Additive population counters (fully incremental; merge by addition, e.g. across shards).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurveyCounters {
    /// NPS promoters.
    pub promoters: u64,
    /// NPS passives.
    pub passives: u64,
    /// NPS detractors.
    pub detractors: u64,
    /// CSAT answers.
    pub csat_answers: u64,
    /// CSAT answers of 4 or 5.
    pub csat_satisfied: u64,
    /// CES answers.
    pub ces_answers: u64,
    /// Sum of CES answers.
    pub ces_sum: u64,
}

impl SurveyCounters {
    /// Count one NPS answer (`sign` −1 to un-count a retracted one).
    pub fn nps(&mut self, score: u32, sign: i8) {
        let c = match NpsCategory::of(score) {
            NpsCategory::Promoter => &mut self.promoters,
            NpsCategory::Passive => &mut self.passives,
            NpsCategory::Detractor => &mut self.detractors,
        };
        bump(c, sign);
    }

    /// Count one CSAT answer.
    pub fn csat(&mut self, score: u32, sign: i8) {
        bump(&mut self.csat_answers, sign);
        if score >= 4 {
            bump(&mut self.csat_satisfied, sign);
        }
    }

    /// Count one CES answer.
    pub fn ces(&mut self, score: u32, sign: i8) {
        bump(&mut self.ces_answers, sign);
        if sign >= 0 {
            self.ces_sum += u64::from(score);
        } else {
            self.ces_sum = self.ces_sum.saturating_sub(u64::from(score));
        }
    }

    /// Take out counters added before (the reverse of [`SurveyCounters::merge`]).
    pub fn unmerge(&mut self, o: &SurveyCounters) {
        self.promoters = self.promoters.saturating_sub(o.promoters);
        self.passives = self.passives.saturating_sub(o.passives);
        self.detractors = self.detractors.saturating_sub(o.detractors);
        self.csat_answers = self.csat_answers.saturating_sub(o.csat_answers);
        self.csat_satisfied = self.csat_satisfied.saturating_sub(o.csat_satisfied);
        self.ces_answers = self.ces_answers.saturating_sub(o.ces_answers);
        self.ces_sum = self.ces_sum.saturating_sub(o.ces_sum);
    }

    /// Add another set of counters.
    pub fn merge(&mut self, o: &SurveyCounters) {
        self.promoters += o.promoters;
        self.passives += o.passives;
        self.detractors += o.detractors;
        self.csat_answers += o.csat_answers;
        self.csat_satisfied += o.csat_satisfied;
        self.ces_answers += o.ces_answers;
        self.ces_sum += o.ces_sum;
    }

    /// NPS = %promoters − %detractors, in −100..=100; `None` without answers.
    pub fn nps_score(&self) -> Option<f64> {
        let n = self.promoters + self.passives + self.detractors;
        (n > 0).then(|| 100.0 * (self.promoters as f64 - self.detractors as f64) / n as f64)
    }

    /// CSAT % = share of 4–5 answers.
    pub fn csat_pct(&self) -> Option<f64> {
        (self.csat_answers > 0)
            .then(|| 100.0 * self.csat_satisfied as f64 / self.csat_answers as f64)
    }

    /// Mean CES.
    pub fn mean_ces(&self) -> Option<f64> {
        (self.ces_answers > 0).then(|| self.ces_sum as f64 / self.ces_answers as f64)
    }
}

/// Direction of the decayed C mean over the trend lag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trend {
    /// Up by at least the flat band.
    Up,
    /// Within the flat band.
    Flat,
    /// Down by at least the flat band.
    Down,
    /// No C readings at one of the two instants.
    Unknown,
}

/// The latest C reading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CReading {
    /// C = b/a.
    pub c: f64,
    /// Its class.
    pub class: SatisfactionClass,
    /// When it was given.
    pub at: Timestamp,
}

/// A customer's complaint record at `as_of`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ComplaintStats {
    /// Complaints ever (visible).
    pub total: u64,
    /// Not yet resolved.
    pub open: u64,
    /// Raised in the complaint window (default 90 days).
    pub recent: u64,
    /// Resolved (a callback with outcome `complaint_resolved` naming it).
    pub resolved: u64,
    /// Resolved with a resolution rating ≥ `recovered_at`.
    pub recovered: u64,
    /// Sum of resolution times in hours (for means and population merges).
    pub resolution_hours_sum: f64,
    /// Open complaints: (complaint id, raised at, severity), oldest first.
    pub open_items: Vec<(String, Timestamp, u32)>,
}

impl ComplaintStats {
    /// Resolved and satisfied ÷ resolved.
    pub fn recovery_rate(&self) -> Option<f64> {
        (self.resolved > 0).then(|| self.recovered as f64 / self.resolved as f64)
    }

    /// Mean time to resolution, hours.
    pub fn mean_resolution_hours(&self) -> Option<f64> {
        (self.resolved > 0).then(|| self.resolution_hours_sum / self.resolved as f64)
    }
}

/// The satisfaction read model of one customer at `as_of` (brief §4.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SatisfactionView {
    /// The instant and axis evaluated.
    pub as_of: AsOf,
    /// The latest C reading.
    pub last_c: Option<CReading>,
    /// Decayed mean of C.
    pub c_mean: Option<f64>,
    /// Decayed mean of C `trend_lag_days` earlier.
    pub c_mean_before: Option<f64>,
    /// Trend of the decayed C mean.
    pub trend: Trend,
    /// Decayed mean of CSAT.
    pub csat_mean: Option<f64>,
    /// The latest NPS answer and its category.
    pub last_nps: Option<(u32, NpsCategory)>,
    /// The latest CSAT answer.
    pub last_csat: Option<(u32, Timestamp)>,
    /// The customer's own survey counters (merge into population counters).
    pub counters: SurveyCounters,
    /// Number of C readings.
    pub c_readings: u64,
    /// Complaints.
    pub complaints: ComplaintStats,
    /// Why: one reason per verdict above.
    pub reasons: Vec<Reason>,
}

impl SatisfactionRules {
    fn c_mean(&self, facts: &CustomerFacts, as_of: AsOf) -> (Option<f64>, u64) {
        let mut m = self.decayed_mean();
        for s in facts.surveys_at(as_of) {
            if let (Some(a), Some(b)) = (s.expectation, s.performance)
                && let Some(c) = c_index(a, b)
            {
                m.add(c, s.stamp.occurred_at);
            }
        }
        (m.mean(), m.count())
    }

    /// Evaluate the satisfaction read model of `facts` at `as_of`.
    pub fn evaluate(&self, facts: &CustomerFacts, as_of: AsOf) -> SatisfactionView {
        let mut reasons = Vec::new();
        let mut last_c = None;
        let mut last_nps = None;
        let mut last_csat = None;
        let mut counters = SurveyCounters::default();
        let mut csat = self.decayed_mean();
        for s in facts.surveys_at(as_of) {
            if let (Some(a), Some(b)) = (s.expectation, s.performance)
                && let Some((class, _)) = self.classify(a, b)
            {
                last_c = Some((a, b, class, s.stamp.occurred_at));
            }
            if let Some(n) = s.nps {
                counters.nps(n, 1);
                last_nps = Some((n, NpsCategory::of(n)));
            }
            if let Some(v) = s.csat {
                counters.csat(v, 1);
                csat.add(f64::from(v), s.stamp.occurred_at);
                last_csat = Some((v, s.stamp.occurred_at));
            }
            if let Some(v) = s.ces {
                counters.ces(v, 1);
            }
        }
        let last_c = last_c.map(|(a, b, class, at)| {
            if let Some((_, reason)) = self.classify(a, b) {
                reasons.push(reason);
            }
            CReading {
                c: f64::from(b) / f64::from(a),
                class,
                at,
            }
        });
        let (c_mean, c_readings) = self.c_mean(facts, as_of);
        let before = as_of.at(Timestamp::from_unix_nanos(
            as_of.at.unix_nanos() - self.trend_lag_days * DAY_NANOS,
        ));
        let (c_mean_before, _) = self.c_mean(facts, before);
        let trend = match (c_mean, c_mean_before) {
            (Some(now), Some(then)) => {
                let d = now - then;
                let t = if d >= self.trend_flat_within {
                    Trend::Up
                } else if d <= -self.trend_flat_within {
                    Trend::Down
                } else {
                    Trend::Flat
                };
                reasons.push(Reason {
                    code: "C_TREND".into(),
                    evidence: format!(
                        "decayed C {now:.3} now vs {then:.3} {} d earlier",
                        self.trend_lag_days
                    ),
                    threshold: format!("|change| < {:.2} is flat", self.trend_flat_within),
                });
                t
            }
            _ => Trend::Unknown,
        };
        let complaints = self.complaints(facts, as_of);
        if complaints.total > 0 {
            reasons.push(Reason {
                code: "COMPLAINTS".into(),
                evidence: format!(
                    "{} open, {} in the last {} d, {} of {} resolutions satisfied",
                    complaints.open,
                    complaints.recent,
                    self.complaint_window_days,
                    complaints.recovered,
                    complaints.resolved
                ),
                threshold: format!("recovered = resolution rated >= {}", self.recovered_at),
            });
        }
        SatisfactionView {
            as_of,
            last_c,
            c_mean,
            c_mean_before,
            trend,
            csat_mean: csat.mean(),
            last_nps,
            last_csat,
            counters,
            c_readings,
            complaints,
            reasons,
        }
    }

    /// Complaint statistics at `as_of`: a complaint is resolved by the first visible callback
    /// naming it with outcome `complaint_resolved`.
    pub fn complaints(&self, facts: &CustomerFacts, as_of: AsOf) -> ComplaintStats {
        let mut st = ComplaintStats::default();
        let window_start = as_of.at.unix_nanos() - self.complaint_window_days * DAY_NANOS;
        for c in facts.complaints_at(as_of) {
            st.total += 1;
            if c.stamp.occurred_at.unix_nanos() > window_start {
                st.recent += 1;
            }
            let resolution = facts.resolution(&c.complaint_id, as_of);
            match resolution {
                Some(cb) => {
                    st.resolved += 1;
                    if cb
                        .resolution_satisfaction
                        .is_some_and(|s| s >= self.recovered_at)
                    {
                        st.recovered += 1;
                    }
                    let hours = (cb.stamp.occurred_at.unix_nanos()
                        - c.stamp.occurred_at.unix_nanos())
                    .max(0) as f64
                        / (3600.0 * NANOS_PER_SEC as f64);
                    st.resolution_hours_sum += hours;
                }
                None => {
                    st.open += 1;
                    st.open_items
                        .push((c.complaint_id.clone(), c.stamp.occurred_at, c.severity));
                }
            }
        }
        st
    }
}

fn bump(c: &mut u64, sign: i8) {
    if sign >= 0 {
        *c += 1;
    } else {
        *c = c.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(d: i64) -> Timestamp {
        Timestamp::from_unix_nanos(d * 86_400 * NANOS_PER_SEC)
    }

    #[test]
    fn customer_view_complaints_recovery_and_trend() {
        use crate::event::Survey;
        use crate::facts::test_support::{Log, day as d};
        let r = SatisfactionRules::default();
        let mut l = Log::default();
        let c = |a, b| Survey {
            expectation: Some(a),
            performance: Some(b),
            ..Default::default()
        };
        l.survey("s1", 0, c(10, 11));
        l.survey("s2", 100, c(10, 12));
        l.complaint("k1", 110, 3)
            .complaint("k2", 120, 2)
            .complaint("k3", 125, 5);
        l.resolve("cb1", 111, "k1", Some(5))
            .resolve("cb2", 122, "k2", Some(2));
        l.survey(
            "s3",
            150,
            Survey {
                nps: Some(3),
                csat: Some(2),
                ..c(10, 8)
            },
        );
        let v = r.evaluate(&l.facts, AsOf::business(d(160)));
        let last = v.last_c.as_ref().expect("C");
        assert_eq!(last.class, SatisfactionClass::Dissatisfied);
        assert!((last.c - 0.8).abs() < 1e-12);
        assert_eq!(v.c_readings, 3);
        // 90 days earlier only s1 (C = 1.1) was known; now the mean is lower → down.
        assert_eq!(v.c_mean_before, Some(1.1));
        assert_eq!(v.trend, Trend::Down);
        assert_eq!(v.last_nps, Some((3, NpsCategory::Detractor)));
        assert_eq!(v.complaints.total, 3);
        assert_eq!(v.complaints.open, 1);
        assert_eq!(v.complaints.resolved, 2);
        assert_eq!(v.complaints.recovered, 1);
        assert_eq!(v.complaints.recovery_rate(), Some(0.5));
        // k1: 24 h; k2: 48 h.
        assert_eq!(v.complaints.mean_resolution_hours(), Some(36.0));
        assert_eq!(v.complaints.recent, 3);
        // Time travel: before the second resolution, k2 was open.
        let then = r.evaluate(&l.facts, AsOf::business(d(121)));
        assert_eq!(then.complaints.open, 1);
        assert_eq!(then.complaints.resolved, 1);
        // Retracting the bad survey: the trend turns up (1.1 → ~1.15).
        l.retract("x", 155, "s3");
        let v = r.evaluate(&l.facts, AsOf::business(d(160)));
        assert_eq!(v.trend, Trend::Up);
        assert_eq!(v.last_nps, None);
    }

    #[test]
    fn c_index_classes_with_reasons() {
        let r = SatisfactionRules::default();
        let (class, reason) = r.classify(10, 8).expect("defined");
        assert_eq!(class, SatisfactionClass::Dissatisfied);
        assert_eq!(reason.evidence, "C = 8/10 = 0.800");
        assert_eq!(reason.threshold, "C < 0.95");
        // Boundaries: 0.95 is met, 1.10 is delighted.
        assert_eq!(
            r.classify(20, 19).map(|x| x.0),
            Some(SatisfactionClass::Met)
        );
        assert_eq!(
            r.classify(10, 11).map(|x| x.0),
            Some(SatisfactionClass::Delighted)
        );
        assert_eq!(
            r.classify(10, 10).map(|x| x.0),
            Some(SatisfactionClass::Met)
        );
        assert_eq!(r.classify(0, 5), None);
    }

    #[test]
    fn nps_csat_ces_from_the_issue() {
        let mut c = SurveyCounters::default();
        for (score, n) in [(10, 30), (7, 50), (3, 20)] {
            for _ in 0..n {
                c.nps(score, 1);
            }
        }
        assert_eq!(c.nps_score(), Some(10.0));
        let mut d = SurveyCounters::default();
        for (score, n) in [(5, 10), (4, 20), (3, 10), (2, 5), (1, 5)] {
            for _ in 0..n {
                d.csat(score, 1);
            }
        }
        assert_eq!(d.csat_pct(), Some(60.0));
        d.ces(2, 1);
        d.ces(5, 1);
        assert_eq!(d.mean_ces(), Some(3.5));
        // Retraction un-counts; merge adds.
        c.nps(10, -1);
        assert_eq!(c.promoters, 29);
        c.merge(&d);
        assert_eq!(c.csat_answers, 50);
        assert_eq!(NpsCategory::of(9), NpsCategory::Promoter);
        assert_eq!(NpsCategory::of(8), NpsCategory::Passive);
        assert_eq!(NpsCategory::of(6), NpsCategory::Detractor);
    }

    #[test]
    fn a_value_180_days_old_weighs_half_a_new_one() {
        let mut m = DecayedMean::new(180.0);
        m.add(0.0, day(0));
        m.add(1.0, day(180));
        // weights 0.5 and 1 → mean = 1 / 1.5
        let mean = m.mean().expect("values");
        assert!((mean - 2.0 / 3.0).abs() < 1e-12, "{mean}");
    }

    #[test]
    fn decayed_mean_is_independent_of_arrival_order_and_retractable() {
        let values = [(0.8, 10), (1.2, 50), (0.9, 200), (1.0, 120), (0.7, 400)];
        let mut forward = DecayedMean::new(180.0);
        for (v, d) in values {
            forward.add(v, day(d));
        }
        let mut backward = DecayedMean::new(180.0);
        for (v, d) in values.iter().rev() {
            backward.add(*v, day(*d));
        }
        let (f, b) = (forward.mean().expect("f"), backward.mean().expect("b"));
        assert!((f - b).abs() < 1e-12, "{f} vs {b}");
        // Retracting one value equals never having added it.
        let mut without = DecayedMean::new(180.0);
        for (v, d) in values.iter().filter(|(_, d)| *d != 50) {
            without.add(*v, day(*d));
        }
        forward.remove(1.2, day(50));
        assert!((forward.mean().expect("f") - without.mean().expect("w")).abs() < 1e-12);
        assert_eq!(forward.count(), 4);
    }
}
