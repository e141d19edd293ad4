//! The current materialisation: every customer's churn view evaluated *now* (at the service
//! clock) kept in the projection database, with in-memory order indexes over it, so that the
//! dashboard's "now" reads — a customer's RFM quintiles and pyramid tier, the pyramid itself,
//! the at-risk list under any offered filter and sort — cost O(log n) (plus the page), not a
//! pass over every customer.
//!
//! Key decisions:
//! * This is a **cache of evaluations**, never a source of truth: a row is
//!   `ChurnRules::evaluate(facts, model, AsOf::business(at))` at its materialisation instant
//!   `at` plus the rank keys of the same facts (purchase-days, last purchase-day, value per
//!   currency), and can always be recomputed. The domain crate stays pure; the fold is
//!   untouched (ADR 0006).
//! * A row is rewritten when the customer's facts change and when it comes due: at the next
//!   instant a verdict can change without a new event (`ChurnRules::next_due`), when a
//!   future-dated touchpoint becomes visible, and at the latest after `refresh` (default one
//!   day), which keeps the continuous figures (score, P(alive), recency) at most that old. The
//!   caller (the assessor) owns the due-time index, so a sweep costs O(due customers).
//! * The rank keys (last purchase-day, purchase-days, value) change only with visible facts,
//!   so ranks read from the indexes equal a full pass at any instant up to the next due.
//! * Rows live in the sled tree `proj.current` with a checkpoint (the churn projection's
//!   position they reflect) and a version that combines the row layout with a digest of the
//!   rules: a rule change in the settings re-evaluates every row at start-up; a checkpoint behind
//!   the churn projection re-evaluates the customers of the missing positions; one ahead of it
//!   (the projection was rebuilt) resets the rows.
//! * The indexes are in memory, rebuilt from the rows on open (O(n log n)), and hold a
//!   reference-counted id per customer and a few integers per index.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use touchledger_domain::churn::{ChurnView, codes};
use touchledger_domain::facts::{AsOf, CustomerFacts};
use touchledger_domain::population::{
    Aggregate, Contribution, CustomerViews, MonthCounters, PopulationView, Ranked, Rules, Tier,
    quintile_score, reporting_currency, tier_at, tier_cuts,
};
use touchledger_domain::{ChurnLevel, LeavingReason, MODEL_CUSTOMER, Timestamp};
use touchledger_store::{EventStore, ProjectionMeta, ProjectionTree, ReadFilter};

use crate::order::OrderIndex;
use crate::read::Ranks;
use crate::{ProjectorError, ReadModels};

/// The tree's name (`proj.current`).
pub const TREE: &str = "current";

/// Bump when [`CurrentRow`] or its encoding changes.
const LAYOUT: u32 = 3;

/// The rule codes of the churn view, in the order of the reason bit mask.
pub const REASON_CODES: [&str; 7] = [
    codes::ALIVE_PROB_LOW,
    codes::OVERDUE_VISIT,
    codes::FREQUENCY_DROP,
    codes::COMPLAINT_BURDEN,
    codes::DISSATISFIED,
    codes::STATED_REASON,
    codes::SILENT_LOST,
];

/// Probable-cause names as the API spells them, in index order (`unknown` = none).
pub const CAUSES: [&str; 5] = [
    "natural",
    "need_change",
    "competitor",
    "disappointment",
    "unknown",
];

fn cause_index(c: Option<LeavingReason>) -> usize {
    match c {
        Some(LeavingReason::Natural) => 0,
        Some(LeavingReason::NeedChange) => 1,
        Some(LeavingReason::Competitor) => 2,
        Some(LeavingReason::Disappointment) => 3,
        None => 4,
    }
}

fn level_index(l: ChurnLevel) -> usize {
    match l {
        ChurnLevel::None => 0,
        ChurnLevel::Watch => 1,
        ChurnLevel::Warning => 2,
        ChurnLevel::Critical => 3,
        ChurnLevel::Lost => 4,
    }
}

const LEVELS: [ChurnLevel; 5] = [
    ChurnLevel::None,
    ChurnLevel::Watch,
    ChurnLevel::Warning,
    ChurnLevel::Critical,
    ChurnLevel::Lost,
];

/// An `f64` as an `i64` with the same total order (`f64::total_cmp`).
fn ordered(x: f64) -> i64 {
    let b = x.to_bits() as i64;
    b ^ ((((b >> 63) as u64) >> 1) as i64)
}

/// What is kept per customer (bincode 2, like the projections' state).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurrentRow {
    /// The churn view at the materialisation instant (`churn.as_of`, business axis).
    pub churn: ChurnView,
    /// The customer's part of the population figures then (rank keys included).
    pub population: Contribution,
}

impl CurrentRow {
    /// The row of a customer with these facts and views, evaluated at `now` (business axis).
    pub fn of(facts: &CustomerFacts, views: CustomerViews, rules: &Rules, now: Timestamp) -> Self {
        let population = Contribution::of(
            facts,
            &views,
            &rules.satisfaction,
            &rules.population,
            rules.churn.lost_after_days,
            AsOf::business(now),
        );
        CurrentRow {
            churn: views.churn,
            population,
        }
    }
}

/// Which list order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtRiskSort {
    /// Score, then level, then customer id.
    Score,
    /// Value at risk, then customer id.
    Value,
    /// Since, then customer id (no onset sorts first).
    Since,
    /// Customer id.
    Customer,
    /// Level, then score, then customer id.
    Level,
}

/// One page of the at-risk list.
#[derive(Clone, Debug)]
pub struct AtRiskQuery {
    /// Lowest level listed.
    pub min_level: ChurnLevel,
    /// Only this level.
    pub level: Option<ChurnLevel>,
    /// Only this probable cause (one of [`CAUSES`]).
    pub cause: Option<String>,
    /// Only customers for whom this rule fired.
    pub reason: Option<String>,
    /// Order.
    pub sort: AtRiskSort,
    /// Ascending instead of descending.
    pub ascending: bool,
    /// Rows skipped.
    pub offset: usize,
    /// Rows returned at most.
    pub limit: usize,
}

/// A page: the number of matching customers and the page's rows.
#[derive(Clone, Debug)]
pub struct AtRiskPage {
    /// Customers matching the filters.
    pub total: u64,
    /// The page, each with its materialised churn view.
    pub items: Vec<(String, ChurnView)>,
}

/// A buyer's keys in the rank orders of the current views ([`Current::rank_keys`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RankKeys {
    /// The customer (ties in value are ranked by id).
    pub customer: String,
    /// The reporting currency of `value`.
    pub currency: String,
    /// Value (minor units of `currency`).
    pub value: i64,
    /// Last purchase-day (days since the epoch).
    pub last_day: i64,
    /// Purchase-days.
    pub days: u32,
}

/// Counts of current buyers below a buyer's keys ([`Current::rank_counts`]); added up over
/// partitions they give the ranks among every buyer of the ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RankCounts {
    /// Whether the current views were ready (their start-up re-evaluation done).
    pub ready: bool,
    /// The reporting currency the value counts are in (of one partition; empty once added).
    pub currency: String,
    /// Value per currency (what the ledger's reporting currency is chosen from).
    pub totals: BTreeMap<String, i128>,
    /// Current buyers.
    pub buyers: u64,
    /// Buyers whose last purchase-day is earlier.
    pub less_recent: u64,
    /// Buyers with fewer purchase-days.
    pub less_frequent: u64,
    /// Buyers before this one in the pyramid (more value, or as much and a smaller id).
    pub ranked_before: u64,
    /// Buyers with less value.
    pub cheaper: u64,
}

impl RankCounts {
    /// Add another partition's counts.
    pub fn add(&mut self, o: &RankCounts) {
        self.ready &= o.ready;
        for (c, v) in &o.totals {
            *self.totals.entry(c.clone()).or_default() += v;
        }
        self.buyers += o.buyers;
        self.less_recent += o.less_recent;
        self.less_frequent += o.less_frequent;
        self.ranked_before += o.ranked_before;
        self.cheaper += o.cheaper;
    }

    /// The ranks these counts give (as [`Current::ranks`] computes them on one index).
    pub fn ranks(&self) -> Ranks {
        let n = self.buyers as usize;
        Ranks {
            recency: quintile_score(self.less_recent as usize, n),
            frequency: quintile_score(self.less_frequent as usize, n),
            monetary: quintile_score(self.cheaper as usize, n),
            tier: tier_at(self.ranked_before as usize, n),
        }
    }
}

/// A partition's rank keys in summary, the first step of a "now" population read across
/// partitions ([`Current::rank_stats`]): enough to place the RFM thresholds of recency and
/// frequency (their keys are days: few distinct values) and to search those of value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankStats {
    /// Whether the current views are ready.
    pub ready: bool,
    /// The reporting currency of `value` keys here.
    pub currency: String,
    /// Value per currency (the ledger's reporting currency is chosen from their sum).
    pub totals: BTreeMap<String, i128>,
    /// Current buyers.
    pub buyers: u64,
    /// Buyers per last purchase-day.
    pub recency: BTreeMap<i64, u64>,
    /// Buyers per number of purchase-days.
    pub frequency: BTreeMap<i64, u64>,
    /// The smallest and largest value (`None` without buyers).
    pub values: Option<(i64, i64)>,
}

/// A partition's part of a "now" population read across partitions, under the ledger's RFM
/// thresholds and pyramid cut keys ([`Current::population_part`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PopulationPart {
    /// The additive sums of every customer here.
    pub aggregate: Aggregate,
    /// Buyers per RFM cell (125).
    pub cells: Vec<u64>,
    /// Per pyramid tier: buyers, their value, and the sum of their own counters.
    pub tiers: Vec<(u64, i128, MonthCounters)>,
}

impl PopulationPart {
    /// Binary form (bincode; the aggregate's maps have tuple and enum keys).
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard()).unwrap_or_default()
    }

    /// Read [`PopulationPart::encode`]'s form.
    pub fn decode(bytes: &[u8]) -> Result<PopulationPart, String> {
        bincode::serde::decode_from_slice(bytes, bincode::config::standard())
            .map(|(p, _)| p)
            .map_err(|e| format!("undecodable population part: {e}"))
    }
}

#[derive(Clone, Debug)]
struct Buyer {
    last_day: i64,
    days: u32,
    /// Value per currency (a boxed slice: a map per buyer would cost a tree node each).
    monetary: Box<[(Code, i64)]>,
    /// Own counters over the reported months (tier segments); `None` when all zero.
    own: Option<Box<MonthCounters>>,
    /// Value in the index's reporting currency.
    value: i64,
    /// RFM cell (0–124: (R − 1)·25 + (F − 1)·5 + M − 1) under the index's thresholds;
    /// [`UNSET`] until placed.
    cell: u8,
    /// Pyramid tier (index into [`TIERS`]); [`UNSET`] until placed.
    tier: u8,
}

/// A currency code without an allocation: three upper-case letters, as validation requires
/// of every purchase. Anything not three bytes long (a mistyped reporting currency in the
/// settings) is `[0; 3]`, which no purchase has.
type Code = [u8; 3];

fn code(c: &str) -> Code {
    <[u8; 3]>::try_from(c.as_bytes()).unwrap_or([0; 3])
}

fn code_name(c: &Code) -> String {
    String::from_utf8_lossy(c).trim_end_matches('\0').to_owned()
}

/// A buyer not yet counted in the rank figures.
const UNSET: u8 = u8::MAX;

/// The pyramid tiers, best first, as [`tier_at`] names them.
const TIERS: [&str; 4] = ["vip", "major", "ordinary", "small"];

fn tier_index(p: usize, n: usize) -> u8 {
    let t = tier_at(p, n);
    TIERS.iter().position(|x| *x == t).unwrap_or(3) as u8
}

/// Quintile thresholds per RFM dimension (recency, frequency, monetary).
pub type Thresholds = [[Option<i64>; 4]; 3];

/// An RFM score: 1 + the thresholds the key is above (`None`: no buyer, every key above).
fn score(t: &[Option<i64>; 4], k: i64) -> u8 {
    1 + t.iter().filter(|x| x.is_none_or(|x| k > x)).count() as u8
}

impl Buyer {
    /// Value in `currency` (0 without purchases in it).
    fn value_in(&self, currency: Code) -> i64 {
        self.monetary
            .iter()
            .find(|(c, _)| *c == currency)
            .map_or(0, |(_, v)| *v)
    }

    /// The rank key in RFM dimension `d`.
    fn key(&self, d: usize) -> i64 {
        match d {
            0 => self.last_day,
            1 => i64::from(self.days),
            _ => self.value,
        }
    }

    fn cell_under(&self, t: &Thresholds) -> u8 {
        let [r, f, m] = [0, 1, 2].map(|d| score(&t[d], self.key(d)) - 1);
        r * 25 + f * 5 + m
    }
}

/// The rank-based population figures, kept by difference (see [`Index::repair`]).
#[derive(Clone, Debug, PartialEq)]
struct RankFigures {
    thresholds: Thresholds,
    /// Buyers per RFM cell.
    cells: [u64; 125],
    /// Per tier: buyers and the sum of their own counters.
    tiers: [(u64, MonthCounters); 4],
}

impl RankFigures {
    fn new() -> RankFigures {
        RankFigures {
            thresholds: [[None; 4]; 3],
            cells: [0; 125],
            tiers: Default::default(),
        }
    }

    fn count_tier(&mut self, tier: u8, own: Option<&MonthCounters>, add: bool) {
        let t = &mut self.tiers[usize::from(tier)];
        if add {
            t.0 += 1;
            if let Some(o) = own {
                t.1.merge(o);
            }
        } else {
            t.0 -= 1;
            if let Some(o) = own {
                t.1.unmerge(o);
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    level: usize,
    score: i64,
    value_at_risk: i64,
    since: i64,
    cause: usize,
    reasons: u8,
    buyer: Option<Buyer>,
}

impl Entry {
    fn of(row: &CurrentRow) -> Entry {
        let c = &row.churn;
        let mut reasons = 0u8;
        for r in &c.reasons {
            if let Some(i) = REASON_CODES.iter().position(|code| *code == r.code) {
                reasons |= 1 << i;
            }
        }
        Entry {
            level: level_index(c.level),
            score: ordered(c.score),
            value_at_risk: c.value_at_risk_minor,
            since: c.since.map_or(i64::MIN, |t| t.unix_nanos()),
            cause: cause_index(c.probable_cause),
            reasons,
            buyer: row.population.last_purchase_day.map(|last_day| Buyer {
                last_day,
                days: row.population.purchase_days,
                monetary: row
                    .population
                    .value
                    .iter()
                    .map(|(c, v)| (code(c), *v))
                    .collect(),
                own: (row.population.own != MonthCounters::default())
                    .then(|| Box::new(row.population.own.clone())),
                value: 0,
                cell: UNSET,
                tier: UNSET,
            }),
        }
    }

    fn key(&self, sort: AtRiskSort) -> i64 {
        match sort {
            AtRiskSort::Score | AtRiskSort::Level => self.score,
            AtRiskSort::Value => self.value_at_risk,
            AtRiskSort::Since => self.since,
            AtRiskSort::Customer => 0,
        }
    }
}

type Keyed = (i64, Arc<str>);

/// A merge position: sort key, level (score order only) and customer id.
type MergeKey = (i64, usize, Arc<str>);

/// The at-risk orders of one level.
#[derive(Clone, Debug, Default)]
struct LevelIndex {
    score: OrderIndex<Keyed>,
    value: OrderIndex<Keyed>,
    since: OrderIndex<Keyed>,
    customer: OrderIndex<Keyed>,
}

impl LevelIndex {
    fn get(&self, sort: AtRiskSort) -> &OrderIndex<Keyed> {
        match sort {
            AtRiskSort::Score | AtRiskSort::Level => &self.score,
            AtRiskSort::Value => &self.value,
            AtRiskSort::Since => &self.since,
            AtRiskSort::Customer => &self.customer,
        }
    }

    fn each(&mut self, e: &Entry, id: &Arc<str>, insert: bool) {
        for (ix, sort) in [
            (&mut self.score, AtRiskSort::Score),
            (&mut self.value, AtRiskSort::Value),
            (&mut self.since, AtRiskSort::Since),
            (&mut self.customer, AtRiskSort::Customer),
        ] {
            let k = (e.key(sort), id.clone());
            if insert {
                ix.insert(k);
            } else {
                ix.remove(&k);
            }
        }
    }
}

fn pyramid_weight(x: &(Reverse<i64>, Arc<str>)) -> i64 {
    x.0.0
}

/// The in-memory indexes.
#[derive(Clone, Debug)]
struct Index {
    entries: HashMap<Arc<str>, Entry>,
    /// Per currency: total value and how many customers have it.
    totals: BTreeMap<Code, (i128, u64)>,
    /// The reporting currency the value indexes use.
    currency: String,
    /// Buyers by (last purchase-day, id).
    recency: OrderIndex<Keyed>,
    /// Buyers by (purchase-days, id).
    frequency: OrderIndex<Keyed>,
    /// Buyers by value (descending), then id: the pyramid and the monetary dimension.
    pyramid: OrderIndex<(Reverse<i64>, Arc<str>)>,
    levels: [LevelIndex; 5],
    /// Customers per level, cause and fired rule (index 7: any).
    counts: [[[u64; 8]; 5]; 5],
    /// The additive population figures.
    aggregate: Aggregate,
    /// The rank-based ones.
    ranks: RankFigures,
    /// Whether `ranks` is kept up to date. Not while the start-up re-evaluation fills the
    /// index (readers do not use it then, and keeping quintile cells while the population
    /// grows from nothing would re-cell whole groups of equal keys again and again): one
    /// recount when it is done.
    live: bool,
}

impl Index {
    fn new() -> Index {
        Index {
            entries: HashMap::new(),
            totals: BTreeMap::new(),
            currency: String::new(),
            recency: OrderIndex::new(),
            frequency: OrderIndex::new(),
            pyramid: OrderIndex::weighted(pyramid_weight),
            levels: Default::default(),
            counts: [[[0; 8]; 5]; 5],
            aggregate: Aggregate::default(),
            ranks: RankFigures::new(),
            live: true,
        }
    }

    fn count(&mut self, e: &Entry, delta: i64) {
        let c = &mut self.counts[e.level][e.cause];
        c[7] = c[7].wrapping_add_signed(delta);
        for (bit, slot) in c.iter_mut().enumerate().take(7) {
            if e.reasons & (1 << bit) != 0 {
                *slot = slot.wrapping_add_signed(delta);
            }
        }
    }

    fn unindex(&mut self, id: &Arc<str>, e: &Entry) {
        self.levels[e.level].each(e, id, false);
        self.count(e, -1);
        if let Some(b) = &e.buyer {
            if b.cell != UNSET {
                self.ranks.cells[usize::from(b.cell)] -= 1;
            }
            if b.tier != UNSET {
                self.ranks.count_tier(b.tier, b.own.as_deref(), false);
            }
            self.recency.remove(&(b.last_day, id.clone()));
            self.frequency.remove(&(i64::from(b.days), id.clone()));
            self.pyramid.remove(&(Reverse(b.value), id.clone()));
            for (c, v) in b.monetary.iter() {
                if let Some(t) = self.totals.get_mut(c) {
                    t.0 -= i128::from(*v);
                    t.1 -= 1;
                    if t.1 == 0 {
                        self.totals.remove(c);
                    }
                }
            }
        }
    }

    fn index(&mut self, id: &Arc<str>, e: &mut Entry) {
        self.levels[e.level].each(e, id, true);
        self.count(e, 1);
        if let Some(b) = &mut e.buyer {
            for (c, v) in b.monetary.iter() {
                let t = self.totals.entry(*c).or_default();
                t.0 += i128::from(*v);
                t.1 += 1;
            }
            b.value = b.value_in(code(&self.currency));
            b.cell = UNSET;
            b.tier = UNSET;
            self.recency.insert((b.last_day, id.clone()));
            self.frequency.insert((i64::from(b.days), id.clone()));
            self.pyramid.insert((Reverse(b.value), id.clone()));
        }
    }

    /// Value per currency, by name.
    fn value_totals(&self) -> BTreeMap<String, i128> {
        self.totals
            .iter()
            .map(|(c, (v, _))| (code_name(c), *v))
            .collect()
    }

    /// Re-rank every buyer's value when the reporting currency changed; whether it did.
    fn follow_currency(&mut self, rules: &Rules) -> bool {
        let totals = self.value_totals();
        let currency = reporting_currency(&rules.population, &totals);
        if currency == self.currency {
            return false;
        }
        self.currency = currency;
        let mut pyramid = Vec::new();
        let c = code(&self.currency);
        for (id, e) in self.entries.iter_mut() {
            if let Some(b) = &mut e.buyer {
                b.value = b.value_in(c);
                pyramid.push((Reverse(b.value), id.clone()));
            }
        }
        self.pyramid = OrderIndex::from_unsorted(pyramid, pyramid_weight);
        true
    }

    fn put(
        &mut self,
        customer: &str,
        old: Option<&CurrentRow>,
        row: Option<&CurrentRow>,
        rules: &Rules,
    ) {
        if let Some(o) = old {
            self.aggregate.remove(&o.population);
        }
        if let Some(r) = row {
            self.aggregate.add(&r.population);
        }
        self.put_entry(customer, row.map(Entry::of), rules);
    }

    /// Replace (or remove) a customer's entry and bring the rank figures up to date: O(log n)
    /// plus the buyers whose RFM score moves with a quintile threshold (see
    /// [`Index::repair`]).
    fn put_entry(&mut self, customer: &str, entry: Option<Entry>, rules: &Rules) {
        let id: Arc<str> = match self.entries.remove_entry(customer) {
            Some((id, old)) => {
                self.unindex(&id, &old);
                id
            }
            None => Arc::from(customer),
        };
        let buyer = entry.as_ref().is_some_and(|e| e.buyer.is_some());
        if let Some(mut e) = entry {
            self.index(&id, &mut e);
            self.entries.insert(id.clone(), e);
        }
        if self.follow_currency(rules) {
            if self.live {
                self.rerank_all();
            }
            return;
        }
        if self.live {
            self.repair();
            if buyer {
                self.place(&id);
            }
        }
    }

    /// The quintile thresholds of the current buyers: a score is 1 + ⌊first rank × 5 / n⌋,
    /// and it is ≥ s + 2 exactly when the key is above the element at position
    /// ⌈(s + 1) n / 5⌉ − 1, so four thresholds per dimension (`None` only with no buyer).
    fn thresholds(&self) -> Thresholds {
        let n = self.recency.len();
        let at = |s: usize| ((s + 1) * n).div_ceil(5).checked_sub(1);
        [
            [0, 1, 2, 3].map(|s| at(s).and_then(|j| self.recency.get(j)).map(|x| x.0)),
            [0, 1, 2, 3].map(|s| at(s).and_then(|j| self.frequency.get(j)).map(|x| x.0)),
            [0, 1, 2, 3].map(|s| {
                at(s)
                    .and_then(|j| self.pyramid.get(n - 1 - j))
                    .map(|x| x.0.0)
            }),
        ]
    }

    /// The buyers whose key in RFM dimension `d` lies in `(lo, hi]`.
    fn buyers_between(&self, d: usize, lo: i64, hi: i64) -> Vec<Arc<str>> {
        let range = |ix: &OrderIndex<Keyed>| {
            let a = ix.partition_point(|x| x.0 <= lo);
            let b = ix.partition_point(|x| x.0 <= hi);
            ix.iter_from(a).take(b - a).map(|x| x.1.clone()).collect()
        };
        match d {
            0 => range(&self.recency),
            1 => range(&self.frequency),
            _ => {
                // Descending by value: (lo, hi] is the run from the first value ≤ hi to the
                // first value ≤ lo.
                let p = &self.pyramid;
                let a = p.partition_point(|x| x.0.0 > hi);
                let b = p.partition_point(|x| x.0.0 > lo);
                p.iter_from(a).take(b - a).map(|x| x.1.clone()).collect()
            }
        }
    }

    /// Move a placed buyer to the RFM cell of the current thresholds.
    fn recell(&mut self, id: &Arc<str>) {
        let t = self.ranks.thresholds;
        let Some(b) = self.entries.get_mut(id).and_then(|e| e.buyer.as_mut()) else {
            return;
        };
        if b.cell == UNSET {
            return;
        }
        let c = b.cell_under(&t);
        if c != b.cell {
            self.ranks.cells[usize::from(b.cell)] -= 1;
            self.ranks.cells[usize::from(c)] += 1;
            b.cell = c;
        }
    }

    /// Move the placed buyer at pyramid position `p` to the tier of that position.
    fn retier(&mut self, p: usize) {
        let n = self.pyramid.len();
        let Some((_, id)) = self.pyramid.get(p) else {
            return;
        };
        let t = tier_index(p, n);
        let Some(b) = self.entries.get_mut(id).and_then(|e| e.buyer.as_mut()) else {
            return;
        };
        if b.tier == UNSET || b.tier == t {
            return;
        }
        self.ranks.count_tier(b.tier, b.own.as_deref(), false);
        self.ranks.count_tier(t, b.own.as_deref(), true);
        b.tier = t;
    }

    /// After one buyer left or entered the order indexes, move the placed buyers whose RFM
    /// cell or tier changed with it. A quintile threshold that moved from `a` to `b` changes
    /// the score of exactly the buyers with a key between them (`(min, max]`), so only those
    /// are visited: usually a handful, a whole group of equal keys when the threshold crosses
    /// it. A tier changes only for a buyer whose position moved by one across a cut, or a cut
    /// that moved by one (the pyramid count changed by one): at most two positions either
    /// side of each cut, and a few more are checked.
    fn repair(&mut self) {
        let before = self.ranks.thresholds;
        let after = self.thresholds();
        if before != after {
            self.ranks.thresholds = after;
            for d in 0..3 {
                for s in 0..4 {
                    match (before[d][s], after[d][s]) {
                        (Some(a), Some(b)) if a != b => {
                            for id in self.buyers_between(d, a.min(b), a.max(b)) {
                                self.recell(&id);
                            }
                        }
                        (Some(_), None) | (None, Some(_)) => {
                            // From or to no buyer at all: at most the new one, placed after.
                            let ids: Vec<Arc<str>> =
                                self.recency.iter().map(|x| x.1.clone()).collect();
                            for id in ids {
                                self.recell(&id);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let n = self.pyramid.len();
        for c in tier_cuts(n) {
            for p in c.saturating_sub(3)..(c + 3).min(n) {
                self.retier(p);
            }
        }
    }

    /// Count a buyer not yet placed in its RFM cell and tier.
    fn place(&mut self, id: &Arc<str>) {
        let n = self.pyramid.len();
        let t = self.ranks.thresholds;
        let Some(b) = self.entries.get(id).and_then(|e| e.buyer.as_ref()) else {
            return;
        };
        let tier = tier_index(self.pyramid.count_less(&(Reverse(b.value), id.clone())), n);
        let cell = b.cell_under(&t);
        let own = b.own.clone();
        self.ranks.cells[usize::from(cell)] += 1;
        self.ranks.count_tier(tier, own.as_deref(), true);
        if let Some(b) = self.entries.get_mut(id).and_then(|e| e.buyer.as_mut()) {
            b.cell = cell;
            b.tier = tier;
        }
    }

    /// Recompute every buyer's RFM cell and tier: O(n), at start-up and when the reporting
    /// currency changes.
    fn rerank_all(&mut self) {
        let mut ranks = RankFigures::new();
        ranks.thresholds = self.thresholds();
        let n = self.pyramid.len();
        for (p, (_, id)) in self.pyramid.iter().enumerate() {
            if let Some(b) = self.entries.get_mut(id).and_then(|e| e.buyer.as_mut()) {
                b.cell = b.cell_under(&ranks.thresholds);
                b.tier = tier_index(p, n);
                ranks.cells[usize::from(b.cell)] += 1;
                ranks.count_tier(b.tier, b.own.as_deref(), true);
            }
        }
        self.ranks = ranks;
    }

    /// The rank-based population figures from the kept counts (the pyramid's share figures
    /// are prefix weights): O(log n).
    fn ranked(&self) -> Ranked {
        let (currency, pyramid, top20) = self.pyramid_figures();
        Ranked {
            currency,
            pyramid,
            top20,
            rfm_cells: cell_names(&self.ranks.cells),
            tier_segments: tier_segments(self.ranks.tiers.iter().map(|t| (t.0, &t.1))),
        }
    }

    /// The customer pyramid (reporting currency, tiers, top-20 % share): O(log n).
    fn pyramid_figures(&self) -> (String, Vec<Tier>, Option<f64>) {
        let p = &self.pyramid;
        let [vip, major, ordinary] = tier_cuts(p.len());
        let bounds = [0, vip, major, ordinary, p.len()];
        let revenue =
            [0, 1, 2, 3].map(|i| p.prefix_weight(bounds[i + 1]) - p.prefix_weight(bounds[i]));
        let (tiers, top20) = pyramid_of(p.len(), revenue);
        (self.currency.clone(), tiers, top20)
    }
}

/// The pyramid's tiers and top-20 % share of `buyers` ranked by value, from each tier's value.
fn pyramid_of(buyers: usize, revenue: [i128; 4]) -> (Vec<Tier>, Option<f64>) {
    let total = revenue.iter().sum::<i128>() as i64;
    let share = |v: i64| {
        if total > 0 {
            100.0 * v as f64 / total as f64
        } else {
            0.0
        }
    };
    let [vip, major, ordinary] = tier_cuts(buyers);
    let bounds = [0, vip, major, ordinary, buyers];
    let tiers = TIERS
        .into_iter()
        .enumerate()
        .map(|(i, t)| Tier {
            tier: t.to_owned(),
            customers: (bounds[i + 1] - bounds[i]) as u64,
            revenue_minor: revenue[i] as i64,
            revenue_share_pct: share(revenue[i] as i64),
        })
        .collect();
    let top20 = (total > 0).then(|| share((revenue[0] + revenue[1]) as i64));
    (tiers, top20)
}

/// The named RFM cells (`"RFM"`, 1–5 each) with buyers.
fn cell_names(cells: &[u64]) -> BTreeMap<String, u64> {
    cells
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| (format!("{}{}{}", i / 25 + 1, i / 5 % 5 + 1, i % 5 + 1), *c))
        .collect()
}

/// The tier segments (`tier:<name>`) with buyers, from each tier's buyers and counters.
fn tier_segments<'a>(
    tiers: impl Iterator<Item = (u64, &'a MonthCounters)>,
) -> BTreeMap<String, (u64, MonthCounters)> {
    TIERS
        .iter()
        .zip(tiers)
        .filter(|(_, t)| t.0 > 0)
        .map(|(name, t)| (format!("tier:{name}"), (t.0, t.1.clone())))
        .collect()
}

/// The current materialisation (see the module docs). Shared by the writer (the assessor) and
/// the readers (HTTP, queries).
#[derive(Debug)]
pub struct Current {
    tree: ProjectionTree,
    rules: Rules,
    /// Upper bound of a row's age.
    refresh: std::time::Duration,
    index: RwLock<Index>,
    /// The churn projection position the rows reflect.
    checkpoint: AtomicU64,
    /// Whether the start-up re-evaluation is done.
    ready: AtomicBool,
    /// What the start-up re-evaluation must cover (taken once).
    catchup: std::sync::Mutex<Option<Catchup>>,
}

/// How the rows were found on open: what the caller must re-evaluate before the
/// materialisation is current.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Catchup {
    /// Nothing: the rows reflect the churn projection's checkpoint.
    None,
    /// The customers touched by positions `from..=to` of the log.
    Positions {
        /// First position.
        from: u64,
        /// Last position.
        to: u64,
    },
    /// Every customer (new tree, other layout or rules, or the projection was rebuilt).
    Everyone {
        /// Why.
        reason: String,
    },
}

/// The version of state evaluated with `rules`: the row layout and a digest of the rules.
pub(crate) fn version(rules: &Rules) -> u32 {
    let json = serde_json::to_vec(rules).unwrap_or_default();
    let d = blake3::hash(&json);
    let b = d.as_bytes();
    (LAYOUT << 24) | (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2])
}

fn encode(row: &CurrentRow) -> Vec<u8> {
    bincode::serde::encode_to_vec(row, bincode::config::standard()).unwrap_or_default()
}

fn decode(key: &str, bytes: &[u8]) -> Result<CurrentRow, ProjectorError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(r, _)| r)
        .map_err(|e| ProjectorError::Decode {
            projection: TREE,
            key: key.to_owned(),
            detail: e.to_string(),
        })
}

impl Current {
    /// Open the rows in `tree` for `rules`, given the churn projection's checkpoint, and
    /// rebuild the indexes. Returns what must be re-evaluated (see [`Catchup`]); until
    /// [`Current::set_ready`], readers should fall back to full passes.
    pub fn open(
        tree: ProjectionTree,
        rules: Rules,
        refresh: std::time::Duration,
        churn_checkpoint: u64,
    ) -> Result<(Current, Catchup), ProjectorError> {
        let want = version(&rules);
        let catchup = match tree.meta()? {
            None => Catchup::Everyone {
                reason: "new".into(),
            },
            Some(m) if m.version != want => Catchup::Everyone {
                reason: format!(
                    "version {:#x} -> {want:#x} (layout or rules changed)",
                    m.version
                ),
            },
            Some(m) if m.checkpoint > churn_checkpoint => Catchup::Everyone {
                reason: format!(
                    "the churn projection was rebuilt ({} < {})",
                    churn_checkpoint, m.checkpoint
                ),
            },
            Some(m) if m.checkpoint < churn_checkpoint => Catchup::Positions {
                from: m.checkpoint + 1,
                to: churn_checkpoint,
            },
            Some(_) => Catchup::None,
        };
        let checkpoint = match &catchup {
            Catchup::Everyone { .. } => {
                tree.reset(want)?;
                0
            }
            _ => tree.meta()?.map_or(0, |m| m.checkpoint),
        };
        let mut index = Index::new();
        index.live = catchup == Catchup::None;
        let mut entries = Vec::new();
        for r in tree.states() {
            let (k, v) = r?;
            let row = decode(&k, &v)?;
            index.aggregate.add(&row.population);
            entries.push((Arc::<str>::from(k), Entry::of(&row)));
        }
        index.bulk(entries, &rules);
        let current = Current {
            tree,
            rules,
            refresh,
            index: RwLock::new(index),
            checkpoint: AtomicU64::new(checkpoint),
            ready: AtomicBool::new(catchup == Catchup::None),
            catchup: std::sync::Mutex::new(Some(catchup.clone())),
        };
        Ok((current, catchup))
    }

    /// What the start-up re-evaluation must cover; `Catchup::None` after the first call.
    pub fn take_catchup(&self) -> Catchup {
        self.catchup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(Catchup::None)
    }

    /// The churn projection was folded to `churn_checkpoint` without its changes passing
    /// through [`Current::refresh`] (a synchronous catch-up at start-up, before the
    /// re-evaluation ran): widen what the start-up re-evaluation must cover, and count as not
    /// ready until it has run.
    pub fn projection_advanced(&self, churn_checkpoint: u64) {
        let mut catchup = self.catchup.lock().unwrap_or_else(|p| p.into_inner());
        let from = self.checkpoint.load(Ordering::Acquire) + 1;
        let widened = match catchup.take() {
            Some(Catchup::Everyone { reason }) => Catchup::Everyone { reason },
            _ if churn_checkpoint < from => Catchup::None,
            Some(Catchup::Positions { from, .. }) => Catchup::Positions {
                from,
                to: churn_checkpoint,
            },
            _ if from == 1 => Catchup::Everyone {
                reason: "the churn projection was rebuilt at start-up".into(),
            },
            _ => Catchup::Positions {
                from,
                to: churn_checkpoint,
            },
        };
        if widened != Catchup::None {
            self.ready.store(false, Ordering::Release);
            // As on an open with work to do: the figures are counted once, when ready.
            self.index.write().unwrap_or_else(|p| p.into_inner()).live = false;
        }
        *catchup = Some(widened);
    }

    /// The rules the rows were evaluated with.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The churn projection position the rows reflect.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint.load(Ordering::Acquire)
    }

    /// Whether the start-up re-evaluation is done (reads may use the indexes).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Mark the start-up re-evaluation done (and count the rank figures once, if they were
    /// not kept while it ran: O(n)).
    pub fn set_ready(&self) {
        {
            let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
            if !ix.live {
                ix.rerank_all();
                ix.live = true;
            }
        }
        self.ready.store(true, Ordering::Release);
    }

    /// Record that the rows reflect the churn projection up to `checkpoint`.
    pub fn commit(&self, checkpoint: u64) -> Result<(), ProjectorError> {
        self.tree.apply(
            std::iter::empty(),
            std::iter::empty(),
            Some(ProjectionMeta {
                version: version(&self.rules),
                checkpoint,
            }),
        )?;
        self.checkpoint.fetch_max(checkpoint, Ordering::AcqRel);
        Ok(())
    }

    /// Materialise `customer` at `now` from their churn facts and their three views there
    /// (`AsOf::business(now)`); `next_due` is the rules' next change point
    /// ([`Rules::next_due`]). Returns when the row must be evaluated again.
    pub fn materialise(
        &self,
        customer: &str,
        facts: &CustomerFacts,
        views: CustomerViews,
        now: Timestamp,
        next_due: Timestamp,
    ) -> Result<Timestamp, ProjectorError> {
        let cap = Timestamp::from_unix_nanos(
            now.unix_nanos()
                .saturating_add(self.refresh.as_nanos().min(i64::MAX as u128) as i64),
        );
        let mut due = next_due.min(cap);
        if let Some(t) = facts.next_visible(now) {
            due = due.min(t);
        }
        if customer == MODEL_CUSTOMER {
            return Ok(due);
        }
        let old = self.row(customer)?;
        let row = facts
            .has_touchpoints(AsOf::business(now))
            .then(|| CurrentRow::of(facts, views, &self.rules, now));
        match &row {
            Some(r) => {
                let bytes = encode(r);
                self.tree
                    .apply([(customer, bytes.as_slice())], std::iter::empty(), None)?;
            }
            None if old.is_some() => self.tree.apply(std::iter::empty(), [customer], None)?,
            None => {}
        }
        self.index.write().unwrap_or_else(|p| p.into_inner()).put(
            customer,
            old.as_ref(),
            row.as_ref(),
            &self.rules,
        );
        Ok(due)
    }

    /// Evaluate `customer`'s views now from the churn projection (business axis, the model in
    /// force) and materialise them. Returns their facts, the view and when the row must
    /// be evaluated again; `max_recheck_days` caps `ChurnRules::next_due`.
    pub fn refresh(
        &self,
        reads: &ReadModels,
        customer: &str,
        now: Timestamp,
        max_recheck_days: i64,
    ) -> Result<(CustomerFacts, ChurnView, Timestamp), ProjectorError> {
        let as_of = AsOf::business(now);
        let facts = reads.facts_in("churn", customer)?.unwrap_or_default();
        let model = reads.model(as_of)?;
        // As the full pass does: all three views from the churn projection's facts.
        let views = self
            .rules
            .customer(&facts, &facts, &facts, model.as_ref(), as_of);
        let view = views.churn.clone();
        let next = self
            .rules
            .next_due(&facts, model.as_ref(), as_of, max_recheck_days);
        let due = self.materialise(customer, &facts, views, now, next)?;
        Ok((facts, view, due))
    }

    /// The customers to re-evaluate for `catchup` (see [`Current::open`]): every customer of
    /// the churn projection, or those touched by the missing positions.
    pub fn catchup_customers(
        catchup: &Catchup,
        reads: &ReadModels,
        store: &dyn EventStore,
    ) -> Result<Vec<String>, ProjectorError> {
        match catchup {
            Catchup::None => Ok(Vec::new()),
            Catchup::Everyone { .. } => reads.customer_ids().collect(),
            Catchup::Positions { from, to } => {
                let mut ids = std::collections::BTreeSet::new();
                for c in store.read(&ReadFilter {
                    from_position: *from,
                    to_position: Some(*to),
                    ..Default::default()
                }) {
                    let id = c?.event.customer_id;
                    if id != MODEL_CUSTOMER {
                        ids.insert(id);
                    }
                }
                Ok(ids.into_iter().collect())
            }
        }
    }

    /// A customer's materialised row.
    pub fn row(&self, customer: &str) -> Result<Option<CurrentRow>, ProjectorError> {
        match self.tree.get(customer)? {
            None => Ok(None),
            Some(b) => decode(customer, &b).map(Some),
        }
    }

    /// Every materialised row, in customer order.
    pub fn rows(&self) -> impl Iterator<Item = Result<(String, CurrentRow), ProjectorError>> + '_ {
        self.rows_after(None)
    }

    /// The materialised rows after customer `after` (all with `None`), in customer order.
    pub fn rows_after(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = Result<(String, CurrentRow), ProjectorError>> + '_ {
        self.tree.states_after(after).map(|r| {
            let (k, v) = r?;
            let row = decode(&k, &v)?;
            Ok((k, row))
        })
    }

    /// Customers with a row.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// Whether no customer has a row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// This partition's rank keys in summary ([`RankStats`]): O(distinct days × log n).
    pub fn rank_stats(&self) -> RankStats {
        let ix = self.read();
        let histogram = |o: &OrderIndex<Keyed>| {
            let mut h = BTreeMap::new();
            let mut i = 0;
            while let Some(x) = o.get(i) {
                let key = x.0;
                let j = o.partition_point(|y| y.0 <= key);
                h.insert(key, (j - i) as u64);
                i = j;
            }
            h
        };
        let n = ix.pyramid.len();
        RankStats {
            ready: self.is_ready(),
            currency: ix.currency.clone(),
            totals: ix.value_totals(),
            buyers: n as u64,
            recency: histogram(&ix.recency),
            frequency: histogram(&ix.frequency),
            values: ix
                .pyramid
                .get(n.saturating_sub(1))
                .zip(ix.pyramid.get(0))
                .map(|(lo, hi)| (lo.0.0, hi.0.0)),
        }
    }

    /// Per probe, the buyers here whose value is greater: O(probes × log n).
    pub fn values_above(&self, probes: &[i64]) -> Vec<u64> {
        let ix = self.read();
        probes
            .iter()
            .map(|v| ix.pyramid.partition_point(|x| x.0.0 > *v) as u64)
            .collect()
    }

    /// The first `limit` buyers here whose value is `value`, by id.
    pub fn buyers_valued(&self, value: i64, limit: usize) -> Vec<String> {
        let ix = self.read();
        let a = ix.pyramid.partition_point(|x| x.0.0 > value);
        ix.pyramid
            .iter_from(a)
            .take_while(|x| x.0.0 == value)
            .take(limit)
            .map(|x| x.1.to_string())
            .collect()
    }

    /// This partition's part of a population under the ledger's RFM `thresholds` and pyramid
    /// `cuts` (the keys, value and id, at the ledger's tier cut positions; `None`: the cut is
    /// past the last buyer): one pass over the buyers here, in memory.
    pub fn population_part(
        &self,
        thresholds: &Thresholds,
        cuts: &[Option<(i64, String)>; 3],
    ) -> PopulationPart {
        let ix = self.read();
        let mut cells = vec![0u64; 125];
        let mut tiers: Vec<(u64, i128, MonthCounters)> = vec![Default::default(); 4];
        let cuts: Vec<(Reverse<i64>, &str)> = cuts
            .iter()
            .flatten()
            .map(|(v, id)| (Reverse(*v), id.as_str()))
            .collect();
        for (Reverse(value), id) in ix.pyramid.iter() {
            let Some(b) = ix.entries.get(id).and_then(|e| e.buyer.as_ref()) else {
                continue;
            };
            cells[usize::from(b.cell_under(thresholds))] += 1;
            let key = (Reverse(*value), id.as_ref());
            let t = &mut tiers[cuts.iter().filter(|c| key >= **c).count()];
            t.0 += 1;
            t.1 += i128::from(*value);
            if let Some(o) = &b.own {
                t.2.merge(o);
            }
        }
        PopulationPart {
            aggregate: ix.aggregate.clone(),
            cells,
            tiers,
        }
    }

    /// The rank-based figures of a population from its partitions' parts (in the reporting
    /// `currency`, `buyers` in all): as [`Current::population`] computes them on one index.
    pub fn ranked_from_parts(currency: String, buyers: usize, parts: &[PopulationPart]) -> Ranked {
        let mut cells = [0u64; 125];
        let mut tiers: Vec<(u64, i128, MonthCounters)> = vec![Default::default(); 4];
        for p in parts {
            for (c, n) in cells.iter_mut().zip(&p.cells) {
                *c += n;
            }
            for (t, o) in tiers.iter_mut().zip(&p.tiers) {
                t.0 += o.0;
                t.1 += o.1;
                t.2.merge(&o.2);
            }
        }
        let (pyramid, top20) = pyramid_of(buyers, [0, 1, 2, 3].map(|i| tiers[i].1));
        Ranked {
            currency,
            pyramid,
            top20,
            rfm_cells: cell_names(&cells),
            tier_segments: tier_segments(tiers.iter().map(|t| (t.0, &t.2))),
        }
    }

    /// A customer's RFM quintiles and pyramid tier among the current buyers, O(log n).
    pub fn ranks(&self, customer: &str) -> Option<Ranks> {
        let keys = self.rank_keys(customer)?;
        Some(self.rank_counts(&keys).ranks())
    }

    /// A buyer's keys in the rank orders (`None`: not a current buyer), O(1).
    pub fn rank_keys(&self, customer: &str) -> Option<RankKeys> {
        let ix = self.read();
        let b = ix.entries.get(customer)?.buyer.as_ref()?;
        Some(RankKeys {
            customer: customer.to_owned(),
            currency: ix.currency.clone(),
            value: b.value,
            last_day: b.last_day,
            days: b.days,
        })
    }

    /// How many current buyers rank below `keys` in each order, O(log n): additive over the
    /// partitions of a ledger, so that ranks across partitions are exact
    /// ([`RankCounts::add`]). The value counts are in this index's reporting currency
    /// (`currency`); the caller checks it is the ledger's.
    pub fn rank_counts(&self, keys: &RankKeys) -> RankCounts {
        let ix = self.read();
        let below = |o: &OrderIndex<Keyed>, k: i64| o.partition_point(|x| x.0 < k) as u64;
        let id: Arc<str> = Arc::from(keys.customer.as_str());
        RankCounts {
            ready: self.is_ready(),
            currency: ix.currency.clone(),
            totals: ix.value_totals(),
            buyers: ix.recency.len() as u64,
            less_recent: below(&ix.recency, keys.last_day),
            less_frequent: below(&ix.frequency, i64::from(keys.days)),
            ranked_before: ix.pyramid.count_less(&(Reverse(keys.value), id)) as u64,
            cheaper: (ix.pyramid.len() - ix.pyramid.partition_point(|x| x.0.0 >= keys.value))
                as u64,
        }
    }

    /// The customer pyramid of the current buyers (reporting currency, tiers, top-20 % share),
    /// O(log n).
    pub fn pyramid(&self) -> (String, Vec<Tier>, Option<f64>) {
        self.read().pyramid_figures()
    }

    /// The population figures of the current views at `now` (business axis), all kept by
    /// difference: O(reported months + cohorts × months + segments + log n). Exact at `now`
    /// once every customer due by `now` has been swept.
    pub fn population(&self, now: Timestamp) -> PopulationView {
        let ix = self.read();
        ix.aggregate
            .view(AsOf::business(now), &self.rules.population, ix.ranked())
    }

    /// Customers per churn level (of the materialised views).
    pub fn level_counts(&self) -> BTreeMap<ChurnLevel, u64> {
        let ix = self.read();
        LEVELS
            .iter()
            .enumerate()
            .map(|(i, l)| (*l, ix.counts[i].iter().map(|c| c[7]).sum()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// One page of the at-risk list: cost O(log n + rows visited), where the rows visited are
    /// `offset + limit` without a cause or reason filter (more with one: the non-matching
    /// rows in between are skipped one by one, up to the page's last row; an empty page is
    /// known from the counts and costs nothing). `None` when the query names an unknown cause.
    pub fn at_risk(&self, q: &AtRiskQuery) -> Result<AtRiskPage, ProjectorError> {
        let cause = match &q.cause {
            None => None,
            Some(c) => match CAUSES.iter().position(|x| x == c) {
                Some(i) => Some(i),
                None => {
                    return Ok(AtRiskPage {
                        total: 0,
                        items: Vec::new(),
                    });
                }
            },
        };
        let reason = match &q.reason {
            None => 7,
            Some(r) => match REASON_CODES.iter().position(|x| x == r) {
                Some(i) => i,
                None => {
                    return Ok(AtRiskPage {
                        total: 0,
                        items: Vec::new(),
                    });
                }
            },
        };
        let levels: Vec<usize> = (0..5)
            .filter(|&l| LEVELS[l] >= q.min_level && q.level.is_none_or(|want| LEVELS[l] == want))
            .collect();
        let ids: Vec<Arc<str>>;
        let total;
        {
            let ix = self.read();
            total = levels
                .iter()
                .map(|&l| {
                    (0..5)
                        .filter(|c| cause.is_none_or(|want| want == *c))
                        .map(|c| ix.counts[l][c][reason])
                        .sum::<u64>()
                })
                .sum();
            let keep = |id: &Arc<str>| {
                let Some(e) = ix.entries.get(id) else {
                    return false;
                };
                cause.is_none_or(|c| e.cause == c)
                    && (reason == 7 || e.reasons & (1 << reason) != 0)
            };
            // The counts say how many rows the page holds: the scan stops at the last one (and
            // never starts for an empty page, however selective the filter).
            let wanted = usize::try_from(total)
                .unwrap_or(usize::MAX)
                .saturating_sub(q.offset)
                .min(q.limit);
            let mut out = Vec::with_capacity(wanted);
            let skipped = std::cell::Cell::new(0usize);
            let mut take = |id: &Arc<str>| -> bool {
                if !keep(id) {
                    return true;
                }
                if skipped.get() < q.offset {
                    skipped.set(skipped.get() + 1);
                    return true;
                }
                out.push(id.clone());
                out.len() < wanted
            };
            let filtered = cause.is_some() || reason != 7;
            if wanted > 0 {
                if q.sort == AtRiskSort::Level {
                    let mut order = levels.clone();
                    if !q.ascending {
                        order.reverse();
                    }
                    'levels: for l in order {
                        let idx = ix.levels[l].get(AtRiskSort::Score);
                        // Whole levels before the offset are skipped by count.
                        if !filtered && skipped.get() + idx.len() <= q.offset {
                            skipped.set(skipped.get() + idx.len());
                            continue;
                        }
                        let it: Box<dyn Iterator<Item = &Keyed>> = if q.ascending {
                            Box::new(idx.iter())
                        } else {
                            Box::new(idx.iter().rev())
                        };
                        for (_, id) in it {
                            if !take(id) {
                                break 'levels;
                            }
                        }
                    }
                } else {
                    merge(&ix, &levels, q.sort, q.ascending, &mut take);
                }
            }
            ids = out;
        }
        let mut items = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(row) = self.row(&id)? {
                items.push((id.to_string(), row.churn));
            }
        }
        Ok(AtRiskPage { total, items })
    }
}

/// Visit the customers of `levels` in `sort` order (a k-way merge of the levels' indexes)
/// until `take` returns false.
fn merge(
    ix: &Index,
    levels: &[usize],
    sort: AtRiskSort,
    ascending: bool,
    take: &mut dyn FnMut(&Arc<str>) -> bool,
) {
    type It<'a> = std::iter::Peekable<Box<dyn Iterator<Item = &'a Keyed> + 'a>>;
    let mut streams: Vec<(usize, It<'_>)> = levels
        .iter()
        .map(|&l| {
            let idx = ix.levels[l].get(sort);
            let it: Box<dyn Iterator<Item = &Keyed>> = if ascending {
                Box::new(idx.iter())
            } else {
                Box::new(idx.iter().rev())
            };
            (l, it.peekable())
        })
        .collect();
    // Ties on the key: by level for the score order, then by customer id.
    let key = |l: usize, k: &Keyed| {
        let level = if sort == AtRiskSort::Score { l } else { 0 };
        (k.0, level, k.1.clone())
    };
    loop {
        let mut best: Option<(usize, MergeKey)> = None;
        for (i, (l, s)) in streams.iter_mut().enumerate() {
            if let Some(k) = s.peek() {
                let kk = key(*l, k);
                let better = match &best {
                    None => true,
                    Some((_, b)) => {
                        if ascending {
                            kk < *b
                        } else {
                            kk > *b
                        }
                    }
                };
                if better {
                    best = Some((i, kk));
                }
            }
        }
        let Some((i, _)) = best else {
            return;
        };
        let Some((_, id)) = streams[i].1.next() else {
            return;
        };
        if !take(id) {
            return;
        }
    }
}

impl Index {
    /// Index `entries` all at once (start-up): O(n log n).
    fn bulk(&mut self, entries: Vec<(Arc<str>, Entry)>, rules: &Rules) {
        for (_, e) in &entries {
            self.count(e, 1);
            if let Some(b) = &e.buyer {
                for (c, v) in b.monetary.iter() {
                    let t = self.totals.entry(*c).or_default();
                    t.0 += i128::from(*v);
                    t.1 += 1;
                }
            }
        }
        let totals = self.value_totals();
        self.currency = reporting_currency(&rules.population, &totals);
        let reporting = code(&self.currency);
        let mut per_level: [[Vec<Keyed>; 4]; 5] = Default::default();
        let (mut rec, mut freq, mut pyr) = (Vec::new(), Vec::new(), Vec::new());
        for (id, mut e) in entries {
            for (j, sort) in [
                AtRiskSort::Score,
                AtRiskSort::Value,
                AtRiskSort::Since,
                AtRiskSort::Customer,
            ]
            .into_iter()
            .enumerate()
            {
                per_level[e.level][j].push((e.key(sort), id.clone()));
            }
            if let Some(b) = &mut e.buyer {
                b.value = b.value_in(reporting);
                rec.push((b.last_day, id.clone()));
                freq.push((i64::from(b.days), id.clone()));
                pyr.push((Reverse(b.value), id.clone()));
            }
            self.entries.insert(id, e);
        }
        for (l, lists) in per_level.into_iter().enumerate() {
            let [score, value, since, customer] = lists;
            self.levels[l] = LevelIndex {
                score: OrderIndex::from_unsorted(score, |_| 0),
                value: OrderIndex::from_unsorted(value, |_| 0),
                since: OrderIndex::from_unsorted(since, |_| 0),
                customer: OrderIndex::from_unsorted(customer, |_| 0),
            };
        }
        self.recency = OrderIndex::from_unsorted(rec, |_| 0);
        self.frequency = OrderIndex::from_unsorted(freq, |_| 0);
        self.pyramid = OrderIndex::from_unsorted(pyr, pyramid_weight);
        if self.live {
            self.rerank_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (no dependency needed for a unit test).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }
        fn below(&mut self, n: u64) -> i64 {
            (self.next() % n) as i64
        }
    }

    fn entry(rng: &mut Lcg, spans: [u64; 3]) -> Entry {
        let mut monetary = vec![(code("EUR"), rng.below(spans[2]))];
        // Now and then a large other-currency buyer, which can flip the reporting currency.
        if rng.next().is_multiple_of(97) {
            monetary.push((code("USD"), rng.below(40 * spans[2])));
        }
        let own = rng.next().is_multiple_of(3).then(|| {
            Box::new(MonthCounters {
                complaints: rng.next() % 4,
                resolved: rng.next() % 2,
                ..MonthCounters::default()
            })
        });
        Entry {
            level: (rng.next() % 5) as usize,
            score: rng.below(100),
            value_at_risk: 0,
            since: i64::MIN,
            cause: 4,
            reasons: 0,
            buyer: (!rng.next().is_multiple_of(10)).then(|| Buyer {
                last_day: rng.below(spans[0]),
                days: 1 + rng.below(spans[1]) as u32,
                monetary: monetary.into_boxed_slice(),
                own,
                value: 0,
                cell: UNSET,
                tier: UNSET,
            }),
        }
    }

    /// The figures kept by difference equal a recount from scratch after every change, and
    /// every buyer's cell equals the quintile scores of its first ranks, with many equal keys
    /// (thresholds crossing whole groups) and with nearly distinct ones.
    #[test]
    fn rank_figures_kept_by_difference_equal_a_recount() {
        let rules = Rules::default();
        for (seed, spans) in [
            (1u64, [40u64, 3, 50]),
            (2, [5000, 60, 1 << 30]),
            (3, [3, 2, 4]),
        ] {
            let mut rng = Lcg(seed);
            let mut ix = Index::new();
            // The last seed fills the index first without keeping the figures, as the
            // start-up re-evaluation does, and counts them once.
            ix.live = seed != 3;
            let customers = 1500u64;
            for step in 0..12_000u32 {
                if step == 4000 && !ix.live {
                    ix.rerank_all();
                    ix.live = true;
                }
                let id = format!("c{}", rng.next() % customers);
                let e = if rng.next().is_multiple_of(6) {
                    None
                } else {
                    Some(entry(&mut rng, spans))
                };
                ix.put_entry(&id, e, &rules);
                if ix.live && (step.is_multiple_of(101) || step < 60 || step == 4000) {
                    let mut full = ix.clone();
                    full.rerank_all();
                    assert_eq!(full.ranks, ix.ranks, "seed {seed} step {step}");
                    let n = ix.recency.len();
                    for (id, e) in &ix.entries {
                        let Some(b) = &e.buyer else { continue };
                        let want = full.entries[id].buyer.as_ref().expect("buyer");
                        assert_eq!((b.cell, b.tier), (want.cell, want.tier), "{id}");
                        let below = |o: &OrderIndex<Keyed>, k: i64| o.partition_point(|x| x.0 < k);
                        let cheaper = n - ix.pyramid.partition_point(|x| x.0.0 >= b.value);
                        let r = quintile_score(below(&ix.recency, b.last_day), n);
                        let f = quintile_score(below(&ix.frequency, i64::from(b.days)), n);
                        let m = quintile_score(cheaper, n);
                        assert_eq!(b.cell, (r - 1) * 25 + (f - 1) * 5 + (m - 1), "{id}");
                    }
                }
            }
        }
    }
}
