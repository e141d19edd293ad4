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
    /// Sum of C readings.
    pub c_sum: f64,
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
            && let Some(c) = c_index(a, b)
        {
            self.c_readings += 1;
            self.c_sum += c;
        }
    }

    fn merge(&mut self, o: &MonthCounters) {
        self.surveys.merge(&o.surveys);
        self.c_readings += o.c_readings;
        self.c_sum += o.c_sum;
        self.complaints += o.complaints;
        self.complaining_customers += o.complaining_customers;
        self.resolved += o.resolved;
        self.recovered += o.recovered;
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

/// Per-customer inputs kept for the rank-based and monthly figures.
#[derive(Clone, Debug)]
struct Row {
    customer: String,
    days: Vec<i64>,
    /// Days of stated natural / need-change reasons.
    leave_days: Vec<i64>,
    value: BTreeMap<String, i64>,
    /// The customer's own counters over the reported months (for segments).
    own: MonthCounters,
    /// Segment keys known per customer: `stage:<s>`, `dick_basu:<c>`.
    segments: [String; 2],
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
fn name<T: Serialize>(t: &T) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Accumulates customers, then computes the population figures.
#[derive(Clone, Debug)]
pub struct PopulationBuilder {
    as_of: AsOf,
    rules: PopulationRules,
    lost_after_days: i64,
    month_counters: BTreeMap<i32, MonthCounters>,
    customers: u64,
    recent_complainers: u64,
    resolved: u64,
    recovered: u64,
    dick_basu: BTreeMap<DickBasu, u64>,
    lifecycle: BTreeMap<Stage, u64>,
    levels: BTreeMap<ChurnLevel, u64>,
    causes: BTreeMap<String, u64>,
    rows: Vec<Row>,
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
            month_counters: BTreeMap::new(),
            customers: 0,
            recent_complainers: 0,
            resolved: 0,
            recovered: 0,
            dick_basu: BTreeMap::new(),
            lifecycle: BTreeMap::new(),
            levels: BTreeMap::new(),
            causes: BTreeMap::new(),
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
        let as_of = self.as_of;
        self.customers += 1;
        // Additive monthly counters, and the customer's own over the reported months.
        let first_month = month_of(day_of(as_of.at)) - self.rules.months.saturating_sub(1) as i32;
        let mut own = MonthCounters::default();
        for s in facts.surveys_at(as_of) {
            let month = month_of(day_of(s.stamp.occurred_at));
            self.month_counters
                .entry(month)
                .or_default()
                .count_survey(s);
            if month >= first_month {
                own.count_survey(s);
            }
        }
        let mut complained_in: Vec<i32> = Vec::new();
        for c in facts.complaints_at(as_of) {
            let month = month_of(day_of(c.stamp.occurred_at));
            if month >= first_month {
                own.complaints += 1;
                own.complaining_customers = 1;
            }
            self.month_counters.entry(month).or_default().complaints += 1;
            if !complained_in.contains(&month) {
                complained_in.push(month);
                self.month_counters
                    .entry(month)
                    .or_default()
                    .complaining_customers += 1;
            }
            if let Some(cb) = facts.resolution(&c.complaint_id, as_of) {
                let m = self
                    .month_counters
                    .entry(month_of(day_of(cb.stamp.occurred_at)))
                    .or_default();
                m.resolved += 1;
                if cb
                    .resolution_satisfaction
                    .is_some_and(|s| s >= sat.recovered_at)
                {
                    m.recovered += 1;
                }
            }
        }
        let st = &views.satisfaction.complaints;
        if st.recent > 0 {
            self.recent_complainers += 1;
        }
        self.resolved += st.resolved;
        self.recovered += st.recovered;
        *self.dick_basu.entry(views.loyalty.dick_basu).or_default() += 1;
        *self.lifecycle.entry(views.loyalty.stage).or_default() += 1;
        *self.levels.entry(views.churn.level).or_default() += 1;
        if views.churn.level >= ChurnLevel::Watch {
            let cause = views
                .churn
                .probable_cause
                .map_or_else(|| "unknown".to_owned(), |c| cause_name(c).to_owned());
            *self.causes.entry(cause).or_default() += 1;
        }
        let leave_days = facts
            .stated_reasons(as_of)
            .into_iter()
            .filter(|(_, r)| matches!(r, LeavingReason::Natural | LeavingReason::NeedChange))
            .map(|(t, _)| day_of(t))
            .collect();
        self.rows.push(Row {
            customer: customer.to_owned(),
            days: facts.purchase_days(as_of),
            leave_days,
            value: views.loyalty.behaviour.monetary.clone(),
            own,
            segments: [
                format!("stage:{}", name(&views.loyalty.stage)),
                format!("dick_basu:{}", name(&views.loyalty.dick_basu)),
            ],
        });
    }

    /// Whether a customer is active (has bought and is not lost) at day `t`.
    fn active(&self, row: &Row, t: i64) -> bool {
        let last = match row.days.iter().rev().find(|d| **d <= t) {
            Some(l) => *l,
            None => return false,
        };
        if t - last >= self.lost_after_days {
            return false;
        }
        !row.leave_days.iter().any(|d| *d >= last && *d <= t)
    }

    /// The reporting currency: configured, or the one with the largest total.
    fn currency(&self) -> String {
        let mut totals: BTreeMap<String, i64> = BTreeMap::new();
        if self.rules.reporting_currency.is_none() {
            for r in &self.rows {
                for (c, v) in &r.value {
                    *totals.entry(c.clone()).or_default() += v;
                }
            }
        }
        reporting_currency(&self.rules, &totals)
    }

    /// Customers ranked by value (descending, ties by id) with their pyramid tier names.
    pub fn pyramid_ranking(&self) -> Vec<(String, i64, &'static str)> {
        let currency = self.currency();
        let mut ranked: Vec<(String, i64)> = self
            .rows
            .iter()
            .filter(|r| !r.days.is_empty())
            .map(|r| {
                (
                    r.customer.clone(),
                    r.value.get(&currency).copied().unwrap_or(0),
                )
            })
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let n = ranked.len();
        ranked
            .into_iter()
            .enumerate()
            .map(|(i, (c, v))| (c, v, tier_at(i, n)))
            .collect()
    }

    /// RFM quintile scores (1–5, 5 best) per buyer: recency (days since the last purchase-day,
    /// fewer is better), frequency (purchase-days) and monetary (value in the reporting
    /// currency). Equal values share a score.
    pub fn rfm_scores(&self) -> BTreeMap<String, (u8, u8, u8)> {
        let today = day_of(self.as_of.at);
        let currency = self.currency();
        let buyers: Vec<&Row> = self.rows.iter().filter(|r| !r.days.is_empty()).collect();
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
        let r = quintiles(
            buyers
                .iter()
                .map(|b| -(today - b.days.last().copied().unwrap_or(today)))
                .collect(),
        );
        let f = quintiles(buyers.iter().map(|b| b.days.len() as i64).collect());
        let m = quintiles(
            buyers
                .iter()
                .map(|b| b.value.get(&currency).copied().unwrap_or(0))
                .collect(),
        );
        buyers
            .iter()
            .enumerate()
            .map(|(i, b)| (b.customer.clone(), (r[i], f[i], m[i])))
            .collect()
    }

    /// Merge another builder at the same `as_of` (a shard's partial).
    pub fn merge(&mut self, o: PopulationBuilder) {
        for (m, c) in &o.month_counters {
            self.month_counters.entry(*m).or_default().merge(c);
        }
        self.customers += o.customers;
        self.recent_complainers += o.recent_complainers;
        self.resolved += o.resolved;
        self.recovered += o.recovered;
        for (k, v) in o.dick_basu {
            *self.dick_basu.entry(k).or_default() += v;
        }
        for (k, v) in o.lifecycle {
            *self.lifecycle.entry(k).or_default() += v;
        }
        for (k, v) in o.levels {
            *self.levels.entry(k).or_default() += v;
        }
        for (k, v) in o.causes {
            *self.causes.entry(k).or_default() += v;
        }
        self.rows.extend(o.rows);
    }

    /// Compute the population figures.
    pub fn finish(mut self) -> PopulationView {
        self.rows.sort_by(|a, b| a.customer.cmp(&b.customer));
        let today = day_of(self.as_of.at);
        let this_month = month_of(today);
        let first_month = this_month - self.rules.months.saturating_sub(1) as i32;
        let mut totals = MonthCounters::default();
        let mut months = Vec::new();
        for m in first_month..=this_month {
            // Status at the end of the day before the month, and at the end of its last day
            // (or `as_of`): every transition falls in exactly one month.
            let start = month_start(m) - 1;
            let end = (month_start(m + 1) - 1).min(today);
            let mut churn = MonthChurn::default();
            for r in &self.rows {
                let (a0, a1) = (self.active(r, start), self.active(r, end));
                if a0 {
                    churn.at_start += 1;
                    if a1 {
                        churn.retained += 1;
                    } else {
                        churn.lost += 1;
                    }
                } else if a1 && r.days.first().is_some_and(|f| *f <= start) {
                    churn.won_back += 1;
                }
                if r.days.first().is_some_and(|f| *f > start && *f <= end) {
                    churn.new += 1;
                }
            }
            let counters = self.month_counters.get(&m).cloned().unwrap_or_default();
            totals.merge(&counters);
            let pct = |n: u64, d: u64| (d > 0).then(|| 100.0 * n as f64 / d as f64);
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
        // Cohorts.
        let mut cohort_rows: BTreeMap<i32, Vec<&Row>> = BTreeMap::new();
        for r in self.rows.iter().filter(|r| !r.days.is_empty()) {
            cohort_rows.entry(month_of(r.days[0])).or_default().push(r);
        }
        let cohorts = cohort_rows
            .into_iter()
            .map(|(m, rows)| {
                let size = rows.len() as u64;
                let retention_pct = (m..=this_month)
                    .map(|k| {
                        let active = rows
                            .iter()
                            .filter(|r| r.days.iter().any(|d| month_of(*d) == k))
                            .count();
                        100.0 * active as f64 / size as f64
                    })
                    .collect();
                Cohort {
                    cohort: month_label(m),
                    size,
                    retention_pct,
                }
            })
            .collect();
        // Pyramid.
        let ranking = self.pyramid_ranking();
        let total: i64 = ranking.iter().map(|r| r.1).sum();
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
                    .fold((0u64, 0i64), |(n, v), r| (n + 1, v + r.1));
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
                    .map(|r| r.1)
                    .sum(),
            )
        });
        let tiers: BTreeMap<&str, &str> =
            ranking.iter().map(|(c, _, t)| (c.as_str(), *t)).collect();
        let mut segments: BTreeMap<String, SegmentFigures> = BTreeMap::new();
        for r in &self.rows {
            let tier = format!(
                "tier:{}",
                tiers.get(r.customer.as_str()).copied().unwrap_or("none")
            );
            for key in [tier, r.segments[0].clone(), r.segments[1].clone()] {
                let seg = segments.entry(key).or_default();
                seg.customers += 1;
                seg.counters.merge(&r.own);
            }
        }
        for seg in segments.values_mut() {
            let c = &seg.counters;
            seg.nps = c.surveys.nps_score();
            seg.csat_pct = c.surveys.csat_pct();
            seg.mean_c = (c.c_readings > 0).then(|| c.c_sum / c.c_readings as f64);
            seg.complaint_rate_pct = (seg.customers > 0)
                .then(|| 100.0 * c.complaining_customers as f64 / seg.customers as f64);
        }
        let mut rfm_cells = BTreeMap::new();
        for (r, f, m) in self.rfm_scores().into_values() {
            *rfm_cells.entry(format!("{r}{f}{m}")).or_default() += 1;
        }
        let buyers = self.rows.iter().filter(|r| !r.days.is_empty()).count() as u64;
        let active = self.rows.iter().filter(|r| self.active(r, today)).count() as u64;
        PopulationView {
            as_of: self.as_of,
            customers: self.customers,
            buyers,
            active,
            nps: totals.surveys.nps_score(),
            csat_pct: totals.surveys.csat_pct(),
            mean_ces: totals.surveys.mean_ces(),
            mean_c: (totals.c_readings > 0).then(|| totals.c_sum / totals.c_readings as f64),
            complaint_rate_pct: (self.customers > 0)
                .then(|| 100.0 * self.recent_complainers as f64 / self.customers as f64),
            recovery_rate_pct: (self.resolved > 0)
                .then(|| 100.0 * self.recovered as f64 / self.resolved as f64),
            months,
            cohorts,
            currency: self.currency(),
            pyramid,
            top20_revenue_share_pct: top20,
            rfm_cells,
            dick_basu: self.dick_basu,
            lifecycle: self.lifecycle,
            churn_levels: self.levels,
            churn_causes: self.causes,
            segments,
        }
    }
}

/// The reporting currency of value rankings: the configured one, or the currency with the
/// largest total over all customers (ties: alphabetical first); empty without purchases.
/// `totals` is only read when none is configured.
pub fn reporting_currency(rules: &PopulationRules, totals: &BTreeMap<String, i64>) -> String {
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

impl Rules {
    /// Evaluate one customer's three views from the projections' facts.
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
