//! Population read models (brief §4.1–§4.3): NPS, CSAT %, mean C, complaint and recovery
//! rates, churn and retention per month, cohort retention, the customer pyramid with the real
//! revenue share of the top 20 %, RFM quintiles, and the Dick & Basu, lifecycle, churn-level and
//! probable-cause distributions — all at one `as_of`.
//!
//! Key decisions:
//! * Survey and complaint figures are kept as **additive monthly counters** (business month of
//!   the answer), so shards and periods merge by addition ([`PopulationBuilder::merge`]).
//! * Rank-based figures (pyramid, RFM quintiles) are not additive by nature: they are computed
//!   in [`PopulationBuilder::finish`] from one value per customer.
//! * Churn per month follows the brief: churn rate = lost ÷ customers at period start; retention
//!   = retained ÷ customers at period start. A customer is *active* at an instant once they have
//!   bought and until they are lost (silent ≥ `lost_after_days`, or a stated natural /
//!   need-change reason since their last purchase-day); *won back* = lost at the period start,
//!   active at its end.
//! * Cohort retention is the standard table: the share of a first-purchase-month cohort with a
//!   purchase-day in each later month.

use std::collections::BTreeMap;

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

use crate::churn::{ChurnRules, ChurnView};
use crate::event::{ChurnLevel, LeavingReason};
use crate::facts::{AsOf, CustomerFacts, day_of};
use crate::loyalty::{DickBasu, LoyaltyRules, LoyaltyView, Stage};
use crate::satisfaction::{SatisfactionRules, SatisfactionView, SurveyCounters, c_index};

/// Days between 0001-01-01 (CE day 1) and 1970-01-01.
const EPOCH_CE_DAYS: i64 = 719_163;

/// Month index (year × 12 + month − 1) of day number `d`.
pub fn month_of(d: i64) -> i32 {
    let date =
        NaiveDate::from_num_days_from_ce_opt((d + EPOCH_CE_DAYS) as i32).unwrap_or(NaiveDate::MIN);
    date.year() * 12 + date.month0() as i32
}

/// Day number of the first day of month index `m`.
pub fn month_start(m: i32) -> i64 {
    NaiveDate::from_ymd_opt(m.div_euclid(12), m.rem_euclid(12) as u32 + 1, 1)
        .map_or(0, |d| i64::from(d.num_days_from_ce()) - EPOCH_CE_DAYS)
}

/// `YYYY-MM` of month index `m`.
pub fn month_label(m: i32) -> String {
    format!("{:04}-{:02}", m.div_euclid(12), m.rem_euclid(12) + 1)
}

/// Configurable population rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PopulationRules {
    /// Months reported (ending with the month of `as_of`). Default 12.
    pub months: u32,
    /// Currency for value rankings; `None` = the currency with the largest total.
    pub reporting_currency: Option<String>,
}

impl Default for PopulationRules {
    fn default() -> Self {
        PopulationRules {
            months: 12,
            reporting_currency: None,
        }
    }
}

/// Additive counters of one month.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MonthCounters {
    /// NPS / CSAT / CES.
    pub surveys: SurveyCounters,
    /// Number of C readings.
    pub c_readings: u64,
    /// Sum of C readings (exact: see [`CSum`]).
    pub c_sum: CSum,
    /// Complaints raised.
    pub complaints: u64,
    /// Distinct customers who complained.
    pub complaining_customers: u64,
    /// Complaints resolved (by the resolution's month).
    pub resolved: u64,
    /// Resolutions rated as recovered.
    pub recovered: u64,
}

impl MonthCounters {
    fn count_survey(&mut self, s: &crate::facts::SurveyFact) {
        if let Some(v) = s.nps {
            self.surveys.nps(v, 1);
        }
        if let Some(v) = s.csat {
            self.surveys.csat(v, 1);
        }
        if let Some(v) = s.ces {
            self.surveys.ces(v, 1);
        }
        if let (Some(a), Some(b)) = (s.expectation, s.performance)
            && c_index(a, b).is_some()
        {
            self.c_readings += 1;
            self.c_sum.add(a, b);
        }
    }

    /// Add another month's (or customer's) counters.
    pub fn merge(&mut self, o: &MonthCounters) {
        self.merge_signed(o, 1);
    }

    /// Take out counters added before with [`MonthCounters::merge`].
    pub fn unmerge(&mut self, o: &MonthCounters) {
        self.merge_signed(o, -1);
    }

    fn merge_signed(&mut self, o: &MonthCounters, sign: i64) {
        if sign >= 0 {
            self.surveys.merge(&o.surveys);
        } else {
            self.surveys.unmerge(&o.surveys);
        }
        signed(&mut self.c_readings, o.c_readings, sign);
        self.c_sum.0 += sign * o.c_sum.0;
        signed(&mut self.complaints, o.complaints, sign);
        signed(
            &mut self.complaining_customers,
            o.complaining_customers,
            sign,
        );
        signed(&mut self.resolved, o.resolved, sign);
        signed(&mut self.recovered, o.recovered, sign);
    }
}

/// A sum of C readings, kept exactly in units of 1/2520 (the least common multiple of the
/// expectation scale 1–10), so that it is the same whatever the order of additions and
/// removals (the full pass adds customers in id order; the current materialisation adds and
/// takes out customers as they change). Serialised as the plain number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CSum(i64);

const C_UNIT: i64 = 2520;

impl CSum {
    fn add(&mut self, expectation: u32, performance: u32) {
        let a = i64::from(expectation.max(1));
        self.0 += (i64::from(performance) * C_UNIT + a / 2) / a;
    }

    /// The sum.
    pub fn value(self) -> f64 {
        self.0 as f64 / C_UNIT as f64
    }
}

impl Serialize for CSum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.value())
    }
}

impl<'de> Deserialize<'de> for CSum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Ok(CSum((v * C_UNIT as f64).round() as i64))
    }
}

/// Churn accounting of one month.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonthChurn {
    /// Active at the month's start.
    pub at_start: u64,
    /// Active at the start, lost by the end (or by `as_of` for the current month).
    pub lost: u64,
    /// Active at the start and at the end.
    pub retained: u64,
    /// First purchase in the month.
    pub new: u64,
    /// Lost at the start, active at the end.
    pub won_back: u64,
}

/// One month of the population report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonthRow {
    /// `YYYY-MM`.
    pub month: String,
    /// Churn accounting.
    pub churn: MonthChurn,
    /// lost ÷ at_start × 100.
    pub churn_rate_pct: Option<f64>,
    /// retained ÷ at_start × 100.
    pub retention_rate_pct: Option<f64>,
    /// Counters.
    pub counters: MonthCounters,
    /// NPS of the month's answers.
    pub nps: Option<f64>,
    /// CSAT % of the month's answers.
    pub csat_pct: Option<f64>,
    /// complaining customers ÷ active at start × 100.
    pub complaint_rate_pct: Option<f64>,
}

/// One pyramid tier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    /// `vip`, `major`, `ordinary`, `small`.
    pub tier: String,
    /// Customers in the tier.
    pub customers: u64,
    /// Their value, minor units of the reporting currency.
    pub revenue_minor: i64,
    /// Share of all revenue, %.
    pub revenue_share_pct: f64,
}

/// A first-purchase-month cohort.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cohort {
    /// `YYYY-MM` of the first purchase.
    pub cohort: String,
    /// Customers in it.
    pub size: u64,
    /// % of the cohort with a purchase-day in month 0, 1, 2, … after acquisition.
    pub retention_pct: Vec<f64>,
}

/// The population read model at `as_of`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PopulationView {
    /// The instant and axis evaluated.
    pub as_of: AsOf,
    /// Customers with any visible fact.
    pub customers: u64,
    /// Customers with a purchase.
    pub buyers: u64,
    /// Buyers active at `as_of` (bought, and not lost).
    pub active: u64,
    /// NPS over the reported months.
    pub nps: Option<f64>,
    /// CSAT % over the reported months.
    pub csat_pct: Option<f64>,
    /// Mean CES over the reported months.
    pub mean_ces: Option<f64>,
    /// Mean C over the reported months.
    pub mean_c: Option<f64>,
    /// Customers with a complaint in the complaint window ÷ customers × 100.
    pub complaint_rate_pct: Option<f64>,
    /// Resolved and satisfied ÷ resolved, all visible complaints, %.
    pub recovery_rate_pct: Option<f64>,
    /// Per month, oldest first.
    pub months: Vec<MonthRow>,
    /// Cohorts, oldest first.
    pub cohorts: Vec<Cohort>,
    /// The reporting currency of value figures.
    pub currency: String,
    /// The customer pyramid.
    pub pyramid: Vec<Tier>,
    /// Revenue share of the top 20 % of customers, %.
    pub top20_revenue_share_pct: Option<f64>,
    /// Customers per RFM cell (`"RFM"`, each 1–5).
    pub rfm_cells: BTreeMap<String, u64>,
    /// Dick & Basu distribution.
    pub dick_basu: BTreeMap<DickBasu, u64>,
    /// Lifecycle distribution.
    pub lifecycle: BTreeMap<Stage, u64>,
    /// Churn levels.
    pub churn_levels: BTreeMap<ChurnLevel, u64>,
    /// Probable causes of customers at watch or worse (`unknown` when none).
    pub churn_causes: BTreeMap<String, u64>,
    /// Satisfaction per segment over the reported months (additive): `tier:<pyramid tier>`
    /// (`tier:none` for customers without a purchase), `stage:<lifecycle stage>`,
    /// `dick_basu:<class>`.
    pub segments: BTreeMap<String, SegmentFigures>,
}

/// One customer's part of the population figures at an instant ([`Contribution::of`]). The
/// full pass adds every customer's ([`PopulationBuilder`]); the current materialisation keeps
/// each customer's and updates the sums by difference ([`Aggregate`]: take out the old part,
/// add the new), so both give the same figures by construction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    /// Survey and complaint counters per business month (reported months only).
    pub months: BTreeMap<i32, MonthCounters>,
    /// Churn accounting per reported month (months where the customer counts).
    pub churn: BTreeMap<i32, MonthChurn>,
    /// First purchase month and every month with a purchase-day (cohorts).
    pub cohort: Option<(i32, Vec<i32>)>,
    /// Active at `as_of` (bought, not lost).
    pub active: bool,
    /// A complaint in the satisfaction complaint window.
    pub recent_complainer: bool,
    /// Complaints resolved.
    pub resolved: u64,
    /// Resolutions rated as recovered.
    pub recovered: u64,
    /// Dick & Basu class.
    pub dick_basu: DickBasu,
    /// Lifecycle stage.
    pub stage: Stage,
    /// Churn level.
    pub level: ChurnLevel,
    /// Probable cause (`unknown` when none), at watch or worse only.
    pub cause: Option<String>,
    /// The customer's own counters over the reported months (segments).
    pub own: MonthCounters,
    /// Lifetime value per currency, minor units.
    pub value: BTreeMap<String, i64>,
    /// Purchase-days.
    pub purchase_days: u32,
    /// The last purchase-day.
    pub last_purchase_day: Option<i64>,
}

/// Whether a customer with purchase-days `days` and natural / need-change leaving reasons
/// stated on `leave_days` is active (has bought and is not lost) on day `t`.
pub fn active_at(days: &[i64], leave_days: &[i64], t: i64, lost_after_days: i64) -> bool {
    let last = match days.iter().rev().find(|d| **d <= t) {
        Some(l) => *l,
        None => return false,
    };
    if t - last >= lost_after_days {
        return false;
    }
    !leave_days.iter().any(|d| *d >= last && *d <= t)
}

impl Contribution {
    /// The contribution of a customer with these facts and views (evaluated at `as_of`).
    pub fn of(
        facts: &CustomerFacts,
        views: &CustomerViews,
        sat: &SatisfactionRules,
        rules: &PopulationRules,
        lost_after_days: i64,
        as_of: AsOf,
    ) -> Contribution {
        let today = day_of(as_of.at);
        let this_month = month_of(today);
        let first_month = this_month - rules.months.saturating_sub(1) as i32;
        let mut months: BTreeMap<i32, MonthCounters> = BTreeMap::new();
        let mut own = MonthCounters::default();
        for s in facts.surveys_at(as_of) {
            let month = month_of(day_of(s.stamp.occurred_at));
            if month >= first_month {
                months.entry(month).or_default().count_survey(s);
                own.count_survey(s);
            }
        }
        let mut complained_in: Vec<i32> = Vec::new();
        for c in facts.complaints_at(as_of) {
            let month = month_of(day_of(c.stamp.occurred_at));
            if month >= first_month {
                own.complaints += 1;
                own.complaining_customers = 1;
                let m = months.entry(month).or_default();
                m.complaints += 1;
                if !complained_in.contains(&month) {
                    complained_in.push(month);
                    m.complaining_customers += 1;
                }
            }
            if let Some(cb) = facts.resolution(&c.complaint_id, as_of) {
                let rm = month_of(day_of(cb.stamp.occurred_at));
                if rm >= first_month {
                    let m = months.entry(rm).or_default();
                    m.resolved += 1;
                    if cb
                        .resolution_satisfaction
                        .is_some_and(|s| s >= sat.recovered_at)
                    {
                        m.recovered += 1;
                    }
                }
            }
        }
        let days = facts.purchase_days(as_of);
        let leave_days: Vec<i64> = facts
            .stated_reasons(as_of)
            .into_iter()
            .filter(|(_, r)| matches!(r, LeavingReason::Natural | LeavingReason::NeedChange))
            .map(|(t, _)| day_of(t))
            .collect();
        // Status at the end of the day before each month, and at the end of its last day (or
        // `as_of`): every transition falls in exactly one month.
        let active = |t: i64| active_at(&days, &leave_days, t, lost_after_days);
        let mut churn = BTreeMap::new();
        if !days.is_empty() {
            for m in first_month..=this_month {
                let start = month_start(m) - 1;
                let end = (month_start(m + 1) - 1).min(today);
                let mut c = MonthChurn::default();
                let (a0, a1) = (active(start), active(end));
                if a0 {
                    c.at_start = 1;
                    if a1 {
                        c.retained = 1;
                    } else {
                        c.lost = 1;
                    }
                } else if a1 && days[0] <= start {
                    c.won_back = 1;
                }
                if days[0] > start && days[0] <= end {
                    c.new = 1;
                }
                if c != MonthChurn::default() {
                    churn.insert(m, c);
                }
            }
        }
        let cohort = days.first().map(|f| {
            let mut ms: Vec<i32> = days.iter().map(|d| month_of(*d)).collect();
            ms.dedup();
            (month_of(*f), ms)
        });
        let st = &views.satisfaction.complaints;
        let cause = (views.churn.level >= ChurnLevel::Watch).then(|| {
            views
                .churn
                .probable_cause
                .map_or_else(|| "unknown".to_owned(), |c| cause_name(c).to_owned())
        });
        Contribution {
            months,
            churn,
            cohort,
            active: active(today),
            recent_complainer: st.recent > 0,
            resolved: st.resolved,
            recovered: st.recovered,
            dick_basu: views.loyalty.dick_basu,
            stage: views.loyalty.stage,
            level: views.churn.level,
            cause,
            own,
            value: views.loyalty.behaviour.monetary.clone(),
            purchase_days: days.len() as u32,
            last_purchase_day: days.last().copied(),
        }
    }

    /// Whether the customer has bought.
    pub fn buyer(&self) -> bool {
        self.purchase_days > 0
    }
}

fn bump_map<K: Ord>(m: &mut BTreeMap<K, u64>, k: K, sign: i64) {
    if sign > 0 {
        *m.entry(k).or_default() += 1;
    } else if let Some(n) = m.get_mut(&k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(&k);
        }
    }
}

fn signed(a: &mut u64, b: u64, sign: i64) {
    *a = if sign >= 0 {
        *a + b
    } else {
        a.saturating_sub(b)
    };
}

impl MonthChurn {
    fn merge_signed(&mut self, o: &MonthChurn, sign: i64) {
        signed(&mut self.at_start, o.at_start, sign);
        signed(&mut self.lost, o.lost, sign);
        signed(&mut self.retained, o.retained, sign);
        signed(&mut self.new, o.new, sign);
        signed(&mut self.won_back, o.won_back, sign);
    }
}

/// The rank-based figures, computed apart from the additive ones: by [`PopulationBuilder`]
/// from one value per customer, by the current materialisation from its order indexes.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranked {
    /// The reporting currency.
    pub currency: String,
    /// The pyramid.
    pub pyramid: Vec<Tier>,
    /// Revenue share of the top 20 %.
    pub top20: Option<f64>,
    /// Customers per RFM cell.
    pub rfm_cells: BTreeMap<String, u64>,
    /// `tier:<vip|major|ordinary|small>` → buyers in the tier and their own counters.
    pub tier_segments: BTreeMap<String, (u64, MonthCounters)>,
}

/// The additive part of the population: the sum of customers' [`Contribution`]s, updated by
/// difference. [`Aggregate::view`] turns it (with the [`Ranked`] figures) into the population
/// read model; cost O(reported months + cohorts × months + segments).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    customers: u64,
    buyers: u64,
    active: u64,
    months: BTreeMap<i32, MonthCounters>,
    churn: BTreeMap<i32, MonthChurn>,
    cohort_sizes: BTreeMap<i32, u64>,
    cohort_active: BTreeMap<(i32, i32), u64>,
    recent_complainers: u64,
    resolved: u64,
    recovered: u64,
    dick_basu: BTreeMap<DickBasu, u64>,
    lifecycle: BTreeMap<Stage, u64>,
    levels: BTreeMap<ChurnLevel, u64>,
    causes: BTreeMap<String, u64>,
    /// `stage:<s>`, `dick_basu:<c>` and `tier:none`: customers and their counters.
    segments: BTreeMap<String, (u64, MonthCounters)>,
}

impl Aggregate {
    /// Add a customer's contribution.
    pub fn add(&mut self, c: &Contribution) {
        self.apply(c, 1);
    }

    /// Take a customer's (earlier) contribution out.
    pub fn remove(&mut self, c: &Contribution) {
        self.apply(c, -1);
    }

    /// Customers counted.
    pub fn customers(&self) -> u64 {
        self.customers
    }

    /// Add another set of customers' sums (another partition's): the sums of the union.
    pub fn merge(&mut self, o: &Aggregate) {
        self.customers += o.customers;
        self.buyers += o.buyers;
        self.active += o.active;
        for (m, k) in &o.months {
            self.months.entry(*m).or_default().merge_signed(k, 1);
        }
        for (m, k) in &o.churn {
            self.churn.entry(*m).or_default().merge_signed(k, 1);
        }
        for (k, n) in &o.cohort_sizes {
            *self.cohort_sizes.entry(*k).or_default() += n;
        }
        for (k, n) in &o.cohort_active {
            *self.cohort_active.entry(*k).or_default() += n;
        }
        self.recent_complainers += o.recent_complainers;
        self.resolved += o.resolved;
        self.recovered += o.recovered;
        for (k, n) in &o.dick_basu {
            *self.dick_basu.entry(*k).or_default() += n;
        }
        for (k, n) in &o.lifecycle {
            *self.lifecycle.entry(*k).or_default() += n;
        }
        for (k, n) in &o.levels {
            *self.levels.entry(*k).or_default() += n;
        }
        for (k, n) in &o.causes {
            *self.causes.entry(k.clone()).or_default() += n;
        }
        for (k, (n, c)) in &o.segments {
            let e = self.segments.entry(k.clone()).or_default();
            e.0 += n;
            e.1.merge_signed(c, 1);
        }
    }

    fn apply(&mut self, c: &Contribution, sign: i64) {
        signed(&mut self.customers, 1, sign);
        signed(&mut self.buyers, u64::from(c.buyer()), sign);
        signed(&mut self.active, u64::from(c.active), sign);
        for (m, k) in &c.months {
            let e = self.months.entry(*m).or_default();
            e.merge_signed(k, sign);
            if *e == MonthCounters::default() {
                self.months.remove(m);
            }
        }
        for (m, k) in &c.churn {
            let e = self.churn.entry(*m).or_default();
            e.merge_signed(k, sign);
            if *e == MonthChurn::default() {
                self.churn.remove(m);
            }
        }
        if let Some((first, months)) = &c.cohort {
            bump_map(&mut self.cohort_sizes, *first, sign);
            for k in months {
                bump_map(&mut self.cohort_active, (*first, *k), sign);
            }
        }
        signed(
            &mut self.recent_complainers,
            u64::from(c.recent_complainer),
            sign,
        );
        signed(&mut self.resolved, c.resolved, sign);
        signed(&mut self.recovered, c.recovered, sign);
        bump_map(&mut self.dick_basu, c.dick_basu, sign);
        bump_map(&mut self.lifecycle, c.stage, sign);
        bump_map(&mut self.levels, c.level, sign);
        if let Some(cause) = &c.cause {
            bump_map(&mut self.causes, cause.clone(), sign);
        }
        let stage = ["stage:", c.stage.as_str()].concat();
        let class = ["dick_basu:", c.dick_basu.as_str()].concat();
        let none = (!c.buyer()).then_some("tier:none");
        for key in [Some(stage.as_str()), Some(class.as_str()), none]
            .into_iter()
            .flatten()
        {
            let e = match self.segments.get_mut(key) {
                Some(e) => e,
                None => self.segments.entry(key.to_owned()).or_default(),
            };
            signed(&mut e.0, 1, sign);
            e.1.merge_signed(&c.own, sign);
            if e.0 == 0 {
                self.segments.remove(key);
            }
        }
    }

    /// The population read model at `as_of` from these sums and the rank-based figures.
    pub fn view(&self, as_of: AsOf, rules: &PopulationRules, ranked: Ranked) -> PopulationView {
        let today = day_of(as_of.at);
        let this_month = month_of(today);
        let first_month = this_month - rules.months.saturating_sub(1) as i32;
        let mut totals = MonthCounters::default();
        let pct = |n: u64, d: u64| (d > 0).then(|| 100.0 * n as f64 / d as f64);
        let mut months = Vec::new();
        for m in first_month..=this_month {
            let churn = self.churn.get(&m).cloned().unwrap_or_default();
            let counters = self.months.get(&m).cloned().unwrap_or_default();
            totals.merge(&counters);
            months.push(MonthRow {
                month: month_label(m),
                churn_rate_pct: pct(churn.lost, churn.at_start),
                retention_rate_pct: pct(churn.retained, churn.at_start),
                complaint_rate_pct: pct(counters.complaining_customers, churn.at_start),
                nps: counters.surveys.nps_score(),
                csat_pct: counters.surveys.csat_pct(),
                counters,
                churn,
            });
        }
        let cohorts = self
            .cohort_sizes
            .iter()
            .map(|(m, size)| Cohort {
                cohort: month_label(*m),
                size: *size,
                retention_pct: (*m..=this_month)
                    .map(|k| {
                        let n = self.cohort_active.get(&(*m, k)).copied().unwrap_or(0);
                        100.0 * n as f64 / *size as f64
                    })
                    .collect(),
            })
            .collect();
        let mut segments: BTreeMap<String, SegmentFigures> = BTreeMap::new();
        for (key, (n, counters)) in self.segments.iter().chain(ranked.tier_segments.iter()) {
            if *n == 0 {
                continue;
            }
            let c = counters;
            segments.insert(
                key.clone(),
                SegmentFigures {
                    customers: *n,
                    counters: c.clone(),
                    nps: c.surveys.nps_score(),
                    csat_pct: c.surveys.csat_pct(),
                    mean_c: (c.c_readings > 0).then(|| c.c_sum.value() / c.c_readings as f64),
                    complaint_rate_pct: (*n > 0)
                        .then(|| 100.0 * c.complaining_customers as f64 / *n as f64),
                },
            );
        }
        PopulationView {
            as_of,
            customers: self.customers,
            buyers: self.buyers,
            active: self.active,
            nps: totals.surveys.nps_score(),
            csat_pct: totals.surveys.csat_pct(),
            mean_ces: totals.surveys.mean_ces(),
            mean_c: (totals.c_readings > 0)
                .then(|| totals.c_sum.value() / totals.c_readings as f64),
            complaint_rate_pct: (self.customers > 0)
                .then(|| 100.0 * self.recent_complainers as f64 / self.customers as f64),
            recovery_rate_pct: (self.resolved > 0)
                .then(|| 100.0 * self.recovered as f64 / self.resolved as f64),
            months,
            cohorts,
            currency: ranked.currency,
            pyramid: ranked.pyramid,
            top20_revenue_share_pct: ranked.top20,
            rfm_cells: ranked.rfm_cells,
            dick_basu: self.dick_basu.clone(),
            lifecycle: self.lifecycle.clone(),
            churn_levels: self.levels.clone(),
            churn_causes: self.causes.clone(),
            segments,
        }
    }
}

/// Satisfaction figures of one segment over the reported months.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentFigures {
    /// Customers in the segment.
    pub customers: u64,
    /// Additive counters of the segment.
    pub counters: MonthCounters,
    /// NPS of the segment's answers.
    pub nps: Option<f64>,
    /// CSAT % of the segment's answers.
    pub csat_pct: Option<f64>,
    /// Mean C of the segment's readings.
    pub mean_c: Option<f64>,
    /// Customers who complained ÷ customers × 100.
    pub complaint_rate_pct: Option<f64>,
}

/// The stable (serde) name of a class.
pub fn name<T: Serialize>(t: &T) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Accumulates customers, then computes the population figures (the full pass).
#[derive(Clone, Debug)]
pub struct PopulationBuilder {
    as_of: AsOf,
    rules: PopulationRules,
    lost_after_days: i64,
    aggregate: Aggregate,
    rows: Vec<(String, Contribution)>,
}

/// The three per-customer views.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CustomerViews {
    /// Satisfaction.
    pub satisfaction: SatisfactionView,
    /// Loyalty.
    pub loyalty: LoyaltyView,
    /// Churn warning.
    pub churn: ChurnView,
}

impl PopulationBuilder {
    /// An empty population at `as_of`.
    pub fn new(as_of: AsOf, rules: PopulationRules, churn: &ChurnRules) -> Self {
        PopulationBuilder {
            as_of,
            rules,
            lost_after_days: churn.lost_after_days,
            aggregate: Aggregate::default(),
            rows: Vec::new(),
        }
    }

    /// Add one customer: `facts` holds everything the projections keep of them (any of the
    /// three projections' facts will do for the kinds it keeps), `views` their evaluation at
    /// this builder's `as_of`.
    pub fn add(
        &mut self,
        customer: &str,
        facts: &CustomerFacts,
        views: &CustomerViews,
        sat: &SatisfactionRules,
    ) {
        let c = Contribution::of(
            facts,
            views,
            sat,
            &self.rules,
            self.lost_after_days,
            self.as_of,
        );
        self.aggregate.add(&c);
        self.rows.push((customer.to_owned(), c));
    }

    /// Add one customer's contribution at this builder's `as_of`, computed elsewhere (by the
    /// partition that holds the customer: a partitioned ledger's population is the customers of
    /// every partition, added here in any order).
    pub fn add_contribution(&mut self, customer: String, c: Contribution) {
        self.aggregate.add(&c);
        self.rows.push((customer, c));
    }

    /// The reporting currency: configured, or the one with the largest total.
    fn currency(&self) -> String {
        // 128 bits: a sum over every customer cannot overflow.
        let mut totals: BTreeMap<String, i128> = BTreeMap::new();
        if self.rules.reporting_currency.is_none() {
            for (_, r) in &self.rows {
                for (c, v) in &r.value {
                    *totals.entry(c.clone()).or_default() += i128::from(*v);
                }
            }
        }
        reporting_currency(&self.rules, &totals)
    }

    /// Customers ranked by value (descending, ties by id) with their pyramid tier names.
    pub fn pyramid_ranking(&self) -> Vec<(String, i64, &'static str)> {
        self.pyramid_ranking_in(&self.currency())
    }

    fn pyramid_ranking_in(&self, currency: &str) -> Vec<(String, i64, &'static str)> {
        self.pyramid_rows(currency)
            .into_iter()
            .map(|(i, v, t)| (self.rows[i].0.clone(), v, t))
            .collect()
    }

    /// The buyers (row indexes) ranked by value in `currency` (descending, ties by customer
    /// id) with their values and tiers.
    fn pyramid_rows(&self, currency: &str) -> Vec<(usize, i64, &'static str)> {
        let mut ranked: Vec<(usize, i64)> = self
            .rows
            .iter()
            .enumerate()
            .filter(|(_, (_, r))| r.buyer())
            .map(|(i, (_, r))| (i, r.value.get(currency).copied().unwrap_or(0)))
            .collect();
        ranked.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| self.rows[a.0].0.cmp(&self.rows[b.0].0))
        });
        let n = ranked.len();
        ranked
            .into_iter()
            .enumerate()
            .map(|(p, (i, v))| (i, v, tier_at(p, n)))
            .collect()
    }

    /// RFM quintile scores (1–5, 5 best) per buyer: recency (days since the last purchase-day,
    /// fewer is better), frequency (purchase-days) and monetary (value in the reporting
    /// currency). Equal values share a score.
    pub fn rfm_scores(&self) -> BTreeMap<String, (u8, u8, u8)> {
        self.rfm_scores_in(&self.currency())
    }

    fn rfm_scores_in(&self, currency: &str) -> BTreeMap<String, (u8, u8, u8)> {
        self.rfm_rows(currency)
            .into_iter()
            .map(|(i, s)| (self.rows[i].0.clone(), s))
            .collect()
    }

    /// Every buyer's (row index) RFM scores under the reporting currency `currency`.
    fn rfm_rows(&self, currency: &str) -> Vec<(usize, (u8, u8, u8))> {
        let buyers: Vec<(usize, &Contribution)> = self
            .rows
            .iter()
            .enumerate()
            .filter(|(_, (_, r))| r.buyer())
            .map(|(i, (_, r))| (i, r))
            .collect();
        let quintiles = |keys: Vec<i64>| -> Vec<u8> {
            // score by the rank of the first equal key, ascending: higher key → higher score.
            let n = keys.len();
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by_key(|i| keys[*i]);
            let mut out = vec![0u8; n];
            let mut first_rank = 0;
            for (rank, i) in idx.iter().enumerate() {
                if rank > 0 && keys[idx[rank - 1]] != keys[*i] {
                    first_rank = rank;
                }
                out[*i] = quintile_score(first_rank, n);
            }
            out
        };
        // Recency ranks by the last purchase-day: the same order as "days since" on any day.
        let r = quintiles(
            buyers
                .iter()
                .map(|(_, b)| b.last_purchase_day.unwrap_or(i64::MIN))
                .collect(),
        );
        let f = quintiles(
            buyers
                .iter()
                .map(|(_, b)| i64::from(b.purchase_days))
                .collect(),
        );
        let m = quintiles(
            buyers
                .iter()
                .map(|(_, b)| b.value.get(currency).copied().unwrap_or(0))
                .collect(),
        );
        buyers
            .iter()
            .enumerate()
            .map(|(k, (i, _))| (*i, (r[k], f[k], m[k])))
            .collect()
    }

    /// Merge another builder at the same `as_of` (a shard's partial).
    pub fn merge(&mut self, o: PopulationBuilder) {
        for (id, c) in o.rows {
            self.add_contribution(id, c);
        }
    }

    /// The customers added, with their contributions, in the order added.
    pub fn into_rows(self) -> Vec<(String, Contribution)> {
        self.rows
    }

    /// The rank-based figures of the customers added.
    pub fn ranked(&self) -> Ranked {
        let currency = self.currency();
        let ranking = self.pyramid_rows(&currency);
        let total: i64 = ranking.iter().fold(0i64, |t, r| t.saturating_add(r.1));
        let share = |v: i64| {
            if total > 0 {
                100.0 * v as f64 / total as f64
            } else {
                0.0
            }
        };
        let pyramid = ["vip", "major", "ordinary", "small"]
            .into_iter()
            .map(|t| {
                let (n, v) = ranking
                    .iter()
                    .filter(|r| r.2 == t)
                    .fold((0u64, 0i64), |(n, v), r| (n + 1, v.saturating_add(r.1)));
                Tier {
                    tier: t.to_owned(),
                    customers: n,
                    revenue_minor: v,
                    revenue_share_pct: share(v),
                }
            })
            .collect::<Vec<_>>();
        let top20 = (total > 0).then(|| {
            share(
                ranking
                    .iter()
                    .filter(|r| r.2 == "vip" || r.2 == "major")
                    .fold(0i64, |t, r| t.saturating_add(r.1)),
            )
        });
        let mut tier_segments: BTreeMap<String, (u64, MonthCounters)> = BTreeMap::new();
        for t in ["vip", "major", "ordinary", "small"] {
            let mut e = (0u64, MonthCounters::default());
            for (i, _, _) in ranking.iter().filter(|r| r.2 == t) {
                e.0 += 1;
                e.1.merge(&self.rows[*i].1.own);
            }
            if e.0 > 0 {
                tier_segments.insert(format!("tier:{t}"), e);
            }
        }
        let mut cells = [0u64; 125];
        for (_, (r, f, m)) in self.rfm_rows(&currency) {
            cells[usize::from(r - 1) * 25 + usize::from(f - 1) * 5 + usize::from(m - 1)] += 1;
        }
        let mut rfm_cells = BTreeMap::new();
        for (k, n) in cells.iter().enumerate().filter(|(_, n)| **n > 0) {
            rfm_cells.insert(format!("{}{}{}", k / 25 + 1, k / 5 % 5 + 1, k % 5 + 1), *n);
        }
        Ranked {
            currency,
            pyramid,
            top20,
            rfm_cells,
            tier_segments,
        }
    }

    /// Compute the population figures.
    pub fn finish(self) -> PopulationView {
        let ranked = self.ranked();
        self.aggregate.view(self.as_of, &self.rules, ranked)
    }
}

/// The reporting currency of value rankings: the configured one, or the currency with the
/// largest total over all customers (ties: alphabetical first); empty without purchases.
/// `totals` is only read when none is configured.
pub fn reporting_currency(rules: &PopulationRules, totals: &BTreeMap<String, i128>) -> String {
    if let Some(c) = &rules.reporting_currency {
        return c.clone();
    }
    totals
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(c, _)| c.clone())
        .unwrap_or_default()
}

/// The pyramid's cut positions among `n` ranked buyers: the ends of the top 1 %, 20 % and
/// 50 % (rounded up).
pub fn tier_cuts(n: usize) -> [usize; 3] {
    let cut = |pct: usize| (n * pct).div_ceil(100);
    [cut(1), cut(20), cut(50)]
}

/// The pyramid tier of the buyer at 0-based position `i` of `n` ranked by value (descending,
/// ties by customer id).
pub fn tier_at(i: usize, n: usize) -> &'static str {
    let [vip, major, ordinary] = tier_cuts(n);
    if i < vip {
        "vip"
    } else if i < major {
        "major"
    } else if i < ordinary {
        "ordinary"
    } else {
        "small"
    }
}

/// An RFM quintile score (1–5): `first_rank` of `n` keys are strictly smaller than this one,
/// so equal keys share a score.
pub fn quintile_score(first_rank: usize, n: usize) -> u8 {
    (1 + first_rank * 5 / n.max(1)) as u8
}

/// Stable name of a churn cause.
pub fn cause_name(c: LeavingReason) -> &'static str {
    match c {
        LeavingReason::Natural => "natural",
        LeavingReason::NeedChange => "need_change",
        LeavingReason::Competitor => "competitor",
        LeavingReason::Disappointment => "disappointment",
    }
}

/// Rules of all three read models and the population, evaluated together.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    /// §4.1.
    pub satisfaction: SatisfactionRules,
    /// §4.2.
    pub loyalty: LoyaltyRules,
    /// §4.3.
    pub churn: ChurnRules,
    /// Population figures.
    pub population: PopulationRules,
}

/// The longest span a rule may give in days (100 years): day counts are multiplied into
/// nanoseconds, which must not overflow.
pub const MAX_DAYS: i64 = 36_500;

/// `days` is a usable number of days for `field`: 1 ..= [`MAX_DAYS`].
pub(crate) fn check_days(field: &'static str, days: i64) -> Result<(), RulesError> {
    if (1..=MAX_DAYS).contains(&days) {
        Ok(())
    } else {
        Err(RulesError::Value {
            field,
            detail: format!("{days}: a number of days must be 1 … {MAX_DAYS}"),
        })
    }
}

/// Why a rules file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Not JSON of the rules' shape (an unknown rule name is refused, not ignored).
    #[error("not a rules file: {0}")]
    Shape(String),
    /// A rule's value is out of its range or contradicts another.
    #[error("rule {field}: {detail}")]
    Value {
        /// The rule, as `model.field`.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
}

impl Rules {
    /// Rules from JSON: any subset of the rules, grouped by read model (`satisfaction`,
    /// `loyalty`, `churn`, `population`); what is left out keeps its default. Unknown names are
    /// refused (a misspelt rule must not silently keep its default), and the values are
    /// [`Rules::check`]ed.
    pub fn from_json(text: &str) -> Result<Rules, RulesError> {
        let rules: Rules =
            serde_json::from_str(text).map_err(|e| RulesError::Shape(e.to_string()))?;
        rules.check()?;
        Ok(rules)
    }

    /// Whether the thresholds are usable: ranges (every number of days in 1 ..= 36,500), and
    /// the pairs that set two levels in order.
    pub fn check(&self) -> Result<(), RulesError> {
        let bad = |field: &'static str, detail: String| Err(RulesError::Value { field, detail });
        let (s, l, p) = (&self.satisfaction, &self.loyalty, &self.population);
        for (field, d) in [
            ("satisfaction.trend_lag_days", s.trend_lag_days),
            (
                "satisfaction.complaint_window_days",
                s.complaint_window_days,
            ),
            ("loyalty.window_days", l.window_days),
            ("loyalty.decline_one_time_days", l.decline_one_time_days),
        ] {
            check_days(field, d)?;
        }
        if !(s.met_at.is_finite()
            && s.met_at > 0.0
            && s.met_at <= s.delighted_at
            && s.delighted_at.is_finite())
        {
            return bad(
                "satisfaction.met_at",
                format!(
                    "need 0 < met_at ≤ delighted_at, have {} and {}",
                    s.met_at, s.delighted_at
                ),
            );
        }
        if !(s.half_life_days.is_finite()
            && s.half_life_days > 0.0
            && s.half_life_days <= MAX_DAYS as f64)
        {
            return bad(
                "satisfaction.half_life_days",
                format!("{}: need 0 < days ≤ {MAX_DAYS}", s.half_life_days),
            );
        }
        if !(s.trend_flat_within.is_finite() && s.trend_flat_within >= 0.0) {
            return bad(
                "satisfaction.trend_flat_within",
                format!("{}: need a finite value ≥ 0", s.trend_flat_within),
            );
        }
        if !(1..=5).contains(&s.recovered_at) {
            return bad(
                "satisfaction.recovered_at",
                format!("{}: a resolution is rated 1 … 5", s.recovered_at),
            );
        }
        if !(0.0..=1.0).contains(&l.attitude_high_at) {
            return bad(
                "loyalty.attitude_high_at",
                format!("{}: attitude is 0 … 1", l.attitude_high_at),
            );
        }
        if !(l.decline_k.is_finite() && l.decline_k > 0.0) {
            return bad(
                "loyalty.decline_k",
                format!("{}: need a finite value > 0", l.decline_k),
            );
        }
        if !(1..=1200).contains(&p.months) {
            return bad(
                "population.months",
                format!("{}: need 1 … 1200 months", p.months),
            );
        }
        if p.reporting_currency.as_deref().is_some_and(str::is_empty) {
            return bad(
                "population.reporting_currency",
                "empty: leave it out for the currency with the largest total".into(),
            );
        }
        self.churn.check()
    }
}

impl Rules {
    /// The next instant after `as_of` at which a customer's views or population
    /// [`Contribution`] can change without a new event: the churn rules' next change
    /// ([`ChurnRules::next_due`], capped at `max_recheck_days`), a complaint leaving the
    /// satisfaction complaint window, a purchase-day leaving the loyalty window, the lifecycle's
    /// decline, and the first instant of the next month (the reported months move).
    pub fn next_due(
        &self,
        facts: &CustomerFacts,
        model: Option<&crate::event::ModelFitted>,
        as_of: AsOf,
        max_recheck_days: i64,
    ) -> crate::time::Timestamp {
        use crate::facts::{NANOS_PER_DAY, day_start};
        use crate::time::Timestamp;
        let mut best = self.churn.next_due(facts, model, as_of, max_recheck_days);
        let now = as_of.at.unix_nanos();
        let mut consider = |t: Timestamp| {
            if t.unix_nanos() > now && t < best {
                best = t;
            }
        };
        let today = day_of(as_of.at);
        consider(day_start(month_start(month_of(today) + 1)));
        for c in facts.complaints_at(as_of) {
            consider(Timestamp::from_unix_nanos(
                c.stamp.occurred_at.unix_nanos().saturating_add(
                    self.satisfaction
                        .complaint_window_days
                        .saturating_mul(NANOS_PER_DAY),
                ),
            ));
        }
        let days = facts.purchase_days(as_of);
        for d in &days {
            consider(day_start(d + self.loyalty.window_days));
        }
        if let Some(&last) = days.last() {
            let (_, decline_after) = self.loyalty.stage_of(&days, 0);
            consider(day_start(last.saturating_add(decline_after)));
        }
        best
    }

    /// One customer's three views from the projections' facts, the churn view with the model's
    /// expectation ([`ChurnRules::evaluate_with_expectation`]) and the loyalty view with the
    /// customer's expected value ([`LoyaltyRules::with_value`]): a customer's own read.
    pub fn customer_views(
        &self,
        satisfaction: &CustomerFacts,
        loyalty: &CustomerFacts,
        churn: &CustomerFacts,
        model: Option<&crate::event::ModelFitted>,
        as_of: AsOf,
    ) -> CustomerViews {
        CustomerViews {
            satisfaction: self.satisfaction.evaluate(satisfaction, as_of),
            loyalty: self.loyalty.with_value(loyalty, model, as_of, &self.churn),
            churn: self.churn.evaluate_with_expectation(churn, model, as_of),
        }
    }

    /// Evaluate one customer's three views from the projections' facts (the churn view without
    /// the model's expectation: what population passes fold).
    pub fn customer(
        &self,
        satisfaction: &CustomerFacts,
        loyalty: &CustomerFacts,
        churn: &CustomerFacts,
        model: Option<&crate::event::ModelFitted>,
        as_of: AsOf,
    ) -> CustomerViews {
        CustomerViews {
            satisfaction: self.satisfaction.evaluate(satisfaction, as_of),
            loyalty: self.loyalty.evaluate(loyalty, as_of),
            churn: self.churn.evaluate(churn, model, as_of),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Survey;
    use crate::facts::test_support::{Log, day};

    #[test]
    fn rules_files_keep_defaults_and_refuse_bad_values_by_name() {
        assert_eq!(Rules::from_json("{}").expect("empty"), Rules::default());
        let partial = Rules::from_json(r#"{"loyalty": {"window_days": 180}}"#).expect("partial");
        assert_eq!(partial.loyalty.window_days, 180);
        assert_eq!(partial.churn, ChurnRules::default());
        for (json, field) in [
            (
                r#"{"satisfaction": {"half_life_days": 0}}"#,
                "satisfaction.half_life_days",
            ),
            (
                r#"{"satisfaction": {"met_at": 1.2}}"#,
                "satisfaction.met_at",
            ),
            (
                r#"{"satisfaction": {"recovered_at": 6}}"#,
                "satisfaction.recovered_at",
            ),
            (r#"{"loyalty": {"window_days": -1}}"#, "loyalty.window_days"),
            (
                r#"{"loyalty": {"attitude_high_at": 1.5}}"#,
                "loyalty.attitude_high_at",
            ),
            (
                r#"{"churn": {"clv_horizon_months": 0}}"#,
                "churn.clv_horizon_months",
            ),
            (
                r#"{"churn": {"clv_monthly_discount": 1.0}}"#,
                "churn.clv_monthly_discount",
            ),
            (r#"{"population": {"months": 0}}"#, "population.months"),
            (
                r#"{"churn": {"complaint_window_days": 200000}}"#,
                "churn.complaint_window_days",
            ),
            (
                r#"{"churn": {"complaint_sla_hours": 0}}"#,
                "churn.complaint_sla_hours",
            ),
            (
                r#"{"churn": {"alive_watch_below": 1.5}}"#,
                "churn.alive_watch_below",
            ),
            (
                r#"{"churn": {"overdue_watch_k": 4}}"#,
                "churn.overdue_watch_k",
            ),
        ] {
            match Rules::from_json(json) {
                Err(RulesError::Value { field: f, .. }) => assert_eq!(f, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
        assert!(matches!(
            Rules::from_json(r#"{"churn": {"lost_after_dayz": 10}}"#),
            Err(RulesError::Shape(m)) if m.contains("lost_after_dayz")
        ));
    }

    #[test]
    fn months() {
        assert_eq!(month_label(month_of(0)), "1970-01");
        assert_eq!(month_start(month_of(40)), 31);
        assert_eq!(month_label(month_of(9769)), "1996-09");
        assert_eq!(
            month_start(month_of(10_000) + 1),
            month_start(month_of(10_000)) + 31
        );
    }

    fn add(b: &mut PopulationBuilder, rules: &Rules, id: &str, l: &Log) {
        let v = rules.customer(&l.facts, &l.facts, &l.facts, None, b.as_of);
        b.add(id, &l.facts, &v, &rules.satisfaction);
    }

    #[test]
    fn pyramid_nps_churn_and_cohorts() {
        let rules = Rules::default();
        let as_of = AsOf::business(day(400));
        let mut b = PopulationBuilder::new(as_of, PopulationRules::default(), &rules.churn);
        // 100 buyers: customer i spends (i+1) × 100 once on day 10 + i; customer 0 is the
        // smallest. NPS: 30 promoters, 50 passives, 20 detractors.
        for i in 0..100i64 {
            let mut l = Log::default();
            l.purchase("p", 10 + i, (i + 1) * 100);
            if i >= 20 {
                l.purchase("q", 380, 1);
            }
            let nps = if i < 30 {
                10
            } else if i < 80 {
                7
            } else {
                3
            };
            l.survey(
                "s",
                390,
                Survey {
                    nps: Some(nps),
                    ..Default::default()
                },
            );
            add(&mut b, &rules, &format!("c{i:03}"), &l);
        }
        let v = b.finish();
        assert_eq!(v.customers, 100);
        assert_eq!(v.nps, Some(10.0));
        let tiers: Vec<(String, u64)> = v
            .pyramid
            .iter()
            .map(|t| (t.tier.clone(), t.customers))
            .collect();
        assert_eq!(
            tiers,
            vec![
                ("vip".into(), 1),
                ("major".into(), 19),
                ("ordinary".into(), 30),
                ("small".into(), 50)
            ]
        );
        // Top 20 = customers 80..99 (plus 1 cent each from the day-380 purchases in USD).
        let total: i64 = (1..=100).map(|i| i * 100).sum::<i64>() + 80;
        let top: i64 = (81..=100).map(|i| i * 100).sum::<i64>() + 20;
        let want = 100.0 * top as f64 / total as f64;
        assert!((v.top20_revenue_share_pct.expect("share") - want).abs() < 1e-9);
        // The 20 customers who never came back were lost on day 10 + i + 365 (i < 20:
        // days 375..394) → in the month containing those days.
        let lost: u64 = v.months.iter().map(|m| m.churn.lost).sum();
        assert_eq!(lost, 20);
        assert_eq!(v.churn_levels.get(&ChurnLevel::Lost), Some(&20));
        // One cohort (all first purchases in January/February/March/April 1970).
        let sizes: u64 = v.cohorts.iter().map(|c| c.size).sum();
        assert_eq!(sizes, 100);
        assert!(v.cohorts.iter().all(|c| c.retention_pct[0] == 100.0));
        assert_eq!(v.rfm_cells.values().sum::<u64>(), 100);
        // Segments: the top 20 % (vip + major) are customers 80..99, all detractors.
        let vip = &v.segments["tier:vip"];
        let major = &v.segments["tier:major"];
        assert_eq!(vip.customers + major.customers, 20);
        assert_eq!(major.nps, Some(-100.0));
        // Customers 0..29 are promoters and in the small tier.
        assert_eq!(v.segments["tier:small"].counters.surveys.promoters, 30);
        let stages: u64 = v
            .segments
            .iter()
            .filter(|(k, _)| k.starts_with("stage:"))
            .map(|(_, s)| s.customers)
            .sum();
        assert_eq!(stages, 100);
    }
}
