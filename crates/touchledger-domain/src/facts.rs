//! Per-customer facts: the state every read-model projection folds the log into.
//!
//! Key decisions:
//! * A projection's state is the *facts* it needs (a purchase's day and amount, a survey's
//!   scores, …), each stamped with where and when it entered the ledger, kept sorted by business
//!   time. Scores are not stored: they are evaluated from the facts at an explicit `as_of` by the
//!   pure functions in [`crate::satisfaction`], [`crate::loyalty`] and [`crate::churn`].
//!   Arrival order therefore cannot change an answer (facts sort by `(occurred_at, position)`),
//!   a rebuild from the log yields byte-identical state (no floating-point accumulators), and any
//!   past instant can be read back exactly.
//! * A retraction does not delete: it stamps the retracted fact with the retraction's
//!   `recorded_at`. Reads on the *business* axis drop retracted facts altogether (the corrected
//!   history); reads on the *knowledge* axis drop them only from the retraction's recording on
//!   (what the ledger knew then), see [`AsOf`].
//! * Memory per customer grows with that customer's touchpoints, which is what time travel
//!   requires; states live in sled and are loaded per customer, never all at once.

use serde::{Deserialize, Serialize};

use crate::event::{
    CallbackOutcome, CallbackPurpose, ChurnLevel, ComplaintCategory, Event, EventKind,
    LeavingReason, ModelFitted, Payload,
};
use crate::time::Timestamp;

/// Nanoseconds per day.
pub const NANOS_PER_DAY: i64 = 86_400 * crate::time::NANOS_PER_SEC;

/// The UTC calendar day (days since the epoch) of an instant.
pub fn day_of(t: Timestamp) -> i64 {
    t.unix_nanos().div_euclid(NANOS_PER_DAY)
}

/// Midnight UTC of day number `d`.
pub fn day_start(d: i64) -> Timestamp {
    Timestamp::from_unix_nanos(d.saturating_mul(NANOS_PER_DAY))
}

/// Which of the two time axes a read is on (brief §2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// What had *happened* by `as_of` (`occurred_at ≤ as_of`), with every retraction known
    /// today applied: the corrected history, for analysts.
    #[default]
    Business,
    /// What the ledger *knew* at `as_of`: facts recorded by then (and that had happened by
    /// then), retracted only if the retraction was recorded by then. For auditors.
    Knowledge,
}

/// An instant on an axis: every read-model evaluation takes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsOf {
    /// The instant.
    pub at: Timestamp,
    /// The axis.
    pub axis: Axis,
}

impl AsOf {
    /// `at` on the business axis.
    pub fn business(at: Timestamp) -> Self {
        AsOf {
            at,
            axis: Axis::Business,
        }
    }

    /// `at` on the knowledge axis.
    pub fn knowledge(at: Timestamp) -> Self {
        AsOf {
            at,
            axis: Axis::Knowledge,
        }
    }

    /// The same axis at another instant.
    pub fn at(self, at: Timestamp) -> Self {
        AsOf { at, ..self }
    }

    /// Whether a fact with this stamp is part of the read.
    pub fn sees(&self, s: &Stamp) -> bool {
        if s.occurred_at > self.at {
            return false;
        }
        match self.axis {
            Axis::Business => s.retracted_at.is_none(),
            Axis::Knowledge => {
                s.recorded_at <= self.at && s.retracted_at.is_none_or(|r| r > self.at)
            }
        }
    }
}

/// Where and when a fact entered the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// The event's id (retractions name it).
    pub event_id: String,
    /// Global position.
    pub position: u64,
    /// Business time.
    pub occurred_at: Timestamp,
    /// Knowledge time.
    pub recorded_at: Timestamp,
    /// `recorded_at` of the retraction that neutralised it, if any.
    pub retracted_at: Option<Timestamp>,
}

/// An ISO 4217 code kept inline (validation guarantees three ASCII upper-case letters), so a
/// purchase fact costs no allocation for it: the fold is allocation-bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    /// From a validated code; anything else (never stored) maps to `XXX`, ISO's "no currency".
    pub fn new(code: &str) -> Currency {
        match <[u8; 3]>::try_from(code.as_bytes()) {
            Ok(b) if b.iter().all(u8::is_ascii_uppercase) => Currency(b),
            _ => Currency(*b"XXX"),
        }
    }

    /// The code.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Currency::new(&s))
    }
}

/// A purchase, as the read models need it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseFact {
    /// Provenance.
    pub stamp: Stamp,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// ISO currency.
    pub currency: Currency,
}

/// A buyer's repeat purchase-days as the spend model sees them ([`CustomerFacts::repeat_spend`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RepeatSpend {
    /// The one currency the buyer paid in.
    pub currency: Currency,
    /// Repeat purchase-days (the first purchase-day excluded).
    pub days: u32,
    /// Their mean value, in the currency's minor units.
    pub mean_minor: f64,
}

/// A complaint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComplaintFact {
    /// Provenance.
    pub stamp: Stamp,
    /// The complaint's id (callbacks refer to it).
    pub complaint_id: String,
    /// Category.
    pub category: ComplaintCategory,
    /// 1..=5.
    pub severity: u32,
}

/// A callback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackFact {
    /// Provenance.
    pub stamp: Stamp,
    /// Why the business called.
    pub purpose: CallbackPurpose,
    /// The complaint followed up.
    pub related_complaint_id: Option<String>,
    /// How it went.
    pub outcome: CallbackOutcome,
    /// Satisfaction with the resolution, 1..=5.
    pub resolution_satisfaction: Option<u32>,
    /// A stated reason for leaving.
    pub leaving_reason: Option<LeavingReason>,
}

/// A survey answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurveyFact {
    /// Provenance.
    pub stamp: Stamp,
    /// Expectation a.
    pub expectation: Option<u32>,
    /// Perceived performance b.
    pub performance: Option<u32>,
    /// CSAT 1..=5.
    pub csat: Option<u32>,
    /// NPS 0..=10.
    pub nps: Option<u32>,
    /// CES 1..=7.
    pub ces: Option<u32>,
    /// Repurchase intent 1..=5.
    pub repurchase_intent: Option<u32>,
    /// Other suppliers.
    pub other_suppliers: Option<u32>,
    /// A stated reason for leaving.
    pub leaving_reason: Option<LeavingReason>,
}

/// A fitted churn model (kept under [`crate::MODEL_CUSTOMER`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitFact {
    /// Provenance.
    pub stamp: Stamp,
    /// The fit.
    pub fit: ModelFitted,
}

/// A recorded churn assessment (the warning history auditors ask for).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssessmentFact {
    /// Provenance.
    pub stamp: Stamp,
    /// Level assessed.
    pub level: ChurnLevel,
    /// Level before.
    pub previous_level: ChurnLevel,
    /// The model version used.
    pub model_version: String,
}

/// Which event kinds a projection keeps (the others are skipped, retractions always apply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindSet(u8);

impl KindSet {
    /// Every kind.
    pub const ALL: KindSet = KindSet(0xff);

    /// From a list of kinds.
    pub const fn of(kinds: &[EventKind]) -> KindSet {
        let mut bits = 0u8;
        let mut i = 0;
        while i < kinds.len() {
            bits |= 1 << kinds[i] as u8;
            i += 1;
        }
        KindSet(bits)
    }

    /// Whether `k` is kept.
    pub fn contains(self, k: EventKind) -> bool {
        self.0 & (1 << k as u8) != 0
    }
}

/// What applying one event did to a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A fact was added.
    Added,
    /// A fact was marked retracted.
    Retracted,
    /// Nothing this projection keeps (or a retraction of such a thing, or a repeat).
    Ignored,
}

/// All the facts one projection keeps about one customer, each list sorted by
/// `(occurred_at, position)`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerFacts {
    /// Purchases.
    pub purchases: Vec<PurchaseFact>,
    /// Complaints.
    pub complaints: Vec<ComplaintFact>,
    /// Callbacks.
    pub callbacks: Vec<CallbackFact>,
    /// Surveys.
    pub surveys: Vec<SurveyFact>,
    /// Model fits (only under the model customer).
    pub fits: Vec<FitFact>,
    /// Churn assessments.
    pub assessments: Vec<AssessmentFact>,
    /// Highest position that changed this state: a repeat delivery of an older position is
    /// ignored, so a redelivered event never counts twice even outside the checkpoint.
    pub last_position: u64,
}

fn stamp(e: &Event, position: u64, recorded_at: Timestamp) -> Stamp {
    Stamp {
        event_id: e.event_id.clone(),
        position,
        occurred_at: e.occurred_at,
        recorded_at,
        retracted_at: None,
    }
}

/// Insert keeping `(occurred_at, position)` order.
fn insert_sorted<T>(v: &mut Vec<T>, item: T, key: impl Fn(&T) -> &Stamp) {
    let k = key(&item);
    let at = v.partition_point(|x| {
        let s = key(x);
        (s.occurred_at, s.position) <= (k.occurred_at, k.position)
    });
    v.insert(at, item);
}

/// Mark the fact with `event_id` retracted; true if found.
fn retract<T>(
    v: &mut [T],
    event_id: &str,
    at: Timestamp,
    key: impl Fn(&mut T) -> &mut Stamp,
) -> bool {
    for item in v.iter_mut() {
        let s = key(item);
        if s.event_id == event_id && s.retracted_at.is_none() {
            s.retracted_at = Some(at);
            return true;
        }
    }
    false
}

impl CustomerFacts {
    /// Fold one committed event (its ledger `position` and `recorded_at`) into the state,
    /// keeping only `kinds`.
    pub fn apply(
        &mut self,
        e: &Event,
        position: u64,
        recorded_at: Timestamp,
        kinds: KindSet,
    ) -> Applied {
        if position <= self.last_position {
            return Applied::Ignored;
        }
        let applied = self.apply_new(e, position, recorded_at, kinds);
        // Only a change moves the mark, so the state never depends on how the log was batched
        // (found by the rebuild == incremental property test).
        if applied != Applied::Ignored {
            self.last_position = position;
        }
        applied
    }

    fn apply_new(
        &mut self,
        e: &Event,
        position: u64,
        recorded_at: Timestamp,
        kinds: KindSet,
    ) -> Applied {
        if !kinds.contains(e.kind()) && e.kind() != EventKind::Retraction {
            return Applied::Ignored;
        }
        let st = || stamp(e, position, recorded_at);
        match &e.payload {
            Payload::Purchase(p) => insert_sorted(
                &mut self.purchases,
                PurchaseFact {
                    stamp: st(),
                    amount_minor: p.amount_minor,
                    currency: Currency::new(&p.currency),
                },
                |f| &f.stamp,
            ),
            Payload::Complaint(c) => insert_sorted(
                &mut self.complaints,
                ComplaintFact {
                    stamp: st(),
                    complaint_id: c.complaint_id.clone(),
                    category: c.category,
                    severity: c.severity,
                },
                |f| &f.stamp,
            ),
            Payload::Callback(c) => insert_sorted(
                &mut self.callbacks,
                CallbackFact {
                    stamp: st(),
                    purpose: c.purpose,
                    related_complaint_id: c.related_complaint_id.clone(),
                    outcome: c.outcome,
                    resolution_satisfaction: c.resolution_satisfaction,
                    leaving_reason: c.leaving_reason,
                },
                |f| &f.stamp,
            ),
            Payload::Survey(s) => insert_sorted(
                &mut self.surveys,
                SurveyFact {
                    stamp: st(),
                    expectation: s.expectation,
                    performance: s.performance,
                    csat: s.csat,
                    nps: s.nps,
                    ces: s.ces,
                    repurchase_intent: s.repurchase_intent,
                    other_suppliers: s.other_suppliers,
                    leaving_reason: s.leaving_reason,
                },
                |f| &f.stamp,
            ),
            Payload::ModelFitted(m) => insert_sorted(
                &mut self.fits,
                FitFact {
                    stamp: st(),
                    fit: m.clone(),
                },
                |f| &f.stamp,
            ),
            // An evaluation is an audit record: no read model depends on it.
            Payload::ModelEvaluated(_) => {}
            Payload::ChurnRiskAssessed(a) => insert_sorted(
                &mut self.assessments,
                AssessmentFact {
                    stamp: st(),
                    level: a.level,
                    previous_level: a.previous_level,
                    model_version: a.model_version.clone(),
                },
                |f| &f.stamp,
            ),
            Payload::Retraction(r) => {
                let id = r.retracted_event_id.as_str();
                let at = recorded_at;
                let found = retract(&mut self.purchases, id, at, |f| &mut f.stamp)
                    || retract(&mut self.complaints, id, at, |f| &mut f.stamp)
                    || retract(&mut self.callbacks, id, at, |f| &mut f.stamp)
                    || retract(&mut self.surveys, id, at, |f| &mut f.stamp)
                    || retract(&mut self.fits, id, at, |f| &mut f.stamp)
                    || retract(&mut self.assessments, id, at, |f| &mut f.stamp);
                return if found {
                    Applied::Retracted
                } else {
                    Applied::Ignored
                };
            }
        }
        Applied::Added
    }

    /// Purchases visible at `as_of`.
    pub fn purchases_at(&self, as_of: AsOf) -> impl Iterator<Item = &PurchaseFact> {
        self.purchases.iter().filter(move |f| as_of.sees(&f.stamp))
    }

    /// Complaints visible at `as_of`.
    pub fn complaints_at(&self, as_of: AsOf) -> impl Iterator<Item = &ComplaintFact> {
        self.complaints.iter().filter(move |f| as_of.sees(&f.stamp))
    }

    /// Callbacks visible at `as_of`.
    pub fn callbacks_at(&self, as_of: AsOf) -> impl Iterator<Item = &CallbackFact> {
        self.callbacks.iter().filter(move |f| as_of.sees(&f.stamp))
    }

    /// Surveys visible at `as_of`.
    pub fn surveys_at(&self, as_of: AsOf) -> impl Iterator<Item = &SurveyFact> {
        self.surveys.iter().filter(move |f| as_of.sees(&f.stamp))
    }

    /// The callback that resolved complaint `complaint_id`, as visible at `as_of`: the first
    /// with outcome `complaint_resolved` naming it.
    pub fn resolution(&self, complaint_id: &str, as_of: AsOf) -> Option<&CallbackFact> {
        self.callbacks_at(as_of).find(|cb| {
            cb.outcome == CallbackOutcome::ComplaintResolved
                && cb.related_complaint_id.as_deref() == Some(complaint_id)
        })
    }

    /// Whether any touchpoint (purchase, complaint, callback, survey) is visible at `as_of`.
    pub fn has_touchpoints(&self, as_of: AsOf) -> bool {
        self.purchases_at(as_of).next().is_some()
            || self.complaints_at(as_of).next().is_some()
            || self.callbacks_at(as_of).next().is_some()
            || self.surveys_at(as_of).next().is_some()
    }

    /// The earliest business time after `after` at which one of the touchpoints becomes
    /// visible (a future-dated event): a view evaluated at `after` may change then.
    pub fn next_visible(&self, after: Timestamp) -> Option<Timestamp> {
        fn first<T>(v: &[T], after: Timestamp, s: impl Fn(&T) -> &Stamp) -> Option<Timestamp> {
            let i = v.partition_point(|x| s(x).occurred_at <= after);
            v.get(i).map(|x| s(x).occurred_at)
        }
        [
            first(&self.purchases, after, |x| &x.stamp),
            first(&self.complaints, after, |x| &x.stamp),
            first(&self.callbacks, after, |x| &x.stamp),
            first(&self.surveys, after, |x| &x.stamp),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The latest fit of `model` (e.g. `bgnbd`) visible at `as_of` (the one with the highest
    /// position).
    pub fn latest_fit(&self, as_of: AsOf, model: &str) -> Option<&FitFact> {
        self.fits
            .iter()
            .filter(|f| f.fit.model == model && as_of.sees(&f.stamp))
            .max_by_key(|f| f.stamp.position)
    }

    /// Distinct purchase days (UTC day numbers) visible at `as_of`, ascending.
    pub fn purchase_days(&self, as_of: AsOf) -> Vec<i64> {
        let mut days: Vec<i64> = self
            .purchases_at(as_of)
            .map(|p| day_of(p.stamp.occurred_at))
            .collect();
        days.dedup(); // already sorted by occurred_at
        days
    }

    /// What the spend model (Gamma-Gamma) sees of a buyer at `as_of`: the currency they paid in
    /// and the mean value, in its minor units, of their repeat purchase-days (a day's purchases
    /// summed; the first purchase-day is not a repeat, as in Fader, Hardie & Lee 2005).
    /// `None` without a repeat purchase-day, for a buyer who paid in more than one currency
    /// (values are never converted), or when that mean is not above zero.
    pub fn repeat_spend(&self, as_of: AsOf) -> Option<RepeatSpend> {
        let mut purchases = self.purchases_at(as_of);
        let first = purchases.next()?;
        let (currency, first_day) = (first.currency, day_of(first.stamp.occurred_at));
        let (mut days, mut total, mut day) = (0u32, 0i128, first_day);
        for p in purchases {
            if p.currency != currency {
                return None;
            }
            let d = day_of(p.stamp.occurred_at);
            if d == first_day {
                continue;
            }
            if d != day {
                days += 1;
                day = d;
            }
            total += i128::from(p.amount_minor);
        }
        (days > 0 && total > 0).then(|| RepeatSpend {
            currency,
            days,
            mean_minor: total as f64 / f64::from(days),
        })
    }

    /// The stated reasons for leaving visible at `as_of` (callbacks and surveys), in business
    /// time order: (when, reason).
    pub fn stated_reasons(&self, as_of: AsOf) -> Vec<(Timestamp, LeavingReason)> {
        let mut v: Vec<(Timestamp, u64, LeavingReason)> = self
            .callbacks_at(as_of)
            .filter_map(|c| {
                c.leaving_reason
                    .map(|r| (c.stamp.occurred_at, c.stamp.position, r))
            })
            .chain(self.surveys_at(as_of).filter_map(|s| {
                s.leaving_reason
                    .map(|r| (s.stamp.occurred_at, s.stamp.position, r))
            }))
            .collect();
        v.sort_by_key(|(t, p, _)| (*t, *p));
        v.into_iter().map(|(t, _, r)| (t, r)).collect()
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Builders for table tests.
    use super::*;
    use crate::event::{Callback, Complaint, Purchase, Retraction, Survey};

    /// Day `d` at noon UTC.
    pub fn day(d: i64) -> Timestamp {
        Timestamp::from_unix_nanos(d * NANOS_PER_DAY + NANOS_PER_DAY / 2)
    }

    /// A builder that appends events with increasing positions, recorded when they occurred.
    #[derive(Default)]
    pub struct Log {
        pub facts: CustomerFacts,
        pos: u64,
    }

    impl Log {
        pub fn event(&mut self, id: &str, at: Timestamp, payload: Payload) -> &mut Self {
            self.event_recorded(id, at, at, payload)
        }

        pub fn event_recorded(
            &mut self,
            id: &str,
            at: Timestamp,
            recorded: Timestamp,
            payload: Payload,
        ) -> &mut Self {
            self.pos += 1;
            let e = Event {
                event_id: id.to_owned(),
                customer_id: "c1".to_owned(),
                occurred_at: at,
                source: "test".to_owned(),
                schema_version: 1,
                correlation_id: None,
                causation_id: None,
                payload,
            };
            self.facts.apply(&e, self.pos, recorded, KindSet::ALL);
            self
        }

        pub fn purchase(&mut self, id: &str, d: i64, cents: i64) -> &mut Self {
            self.event(
                id,
                day(d),
                Payload::Purchase(Purchase {
                    order_id: id.to_owned(),
                    amount_minor: cents,
                    currency: "USD".to_owned(),
                    item_count: 1,
                    channel: None,
                    category: String::new(),
                }),
            )
        }

        pub fn complaint(&mut self, id: &str, d: i64, severity: u32) -> &mut Self {
            self.event(
                id,
                day(d),
                Payload::Complaint(Complaint {
                    complaint_id: id.to_owned(),
                    category: ComplaintCategory::Delivery,
                    severity,
                    channel: None,
                    text: String::new(),
                }),
            )
        }

        pub fn resolve(
            &mut self,
            id: &str,
            d: i64,
            complaint: &str,
            sat: Option<u32>,
        ) -> &mut Self {
            self.event(
                id,
                day(d),
                Payload::Callback(Callback {
                    callback_id: id.to_owned(),
                    purpose: CallbackPurpose::ComplaintFollowUp,
                    related_complaint_id: Some(complaint.to_owned()),
                    outcome: CallbackOutcome::ComplaintResolved,
                    resolution_satisfaction: sat,
                    leaving_reason: None,
                    note: String::new(),
                }),
            )
        }

        pub fn stated(&mut self, id: &str, d: i64, reason: LeavingReason) -> &mut Self {
            self.event(
                id,
                day(d),
                Payload::Callback(Callback {
                    callback_id: id.to_owned(),
                    purpose: CallbackPurpose::WinBack,
                    related_complaint_id: None,
                    outcome: CallbackOutcome::Reached,
                    resolution_satisfaction: None,
                    leaving_reason: Some(reason),
                    note: String::new(),
                }),
            )
        }

        pub fn survey(&mut self, id: &str, d: i64, s: Survey) -> &mut Self {
            self.event(
                id,
                day(d),
                Payload::Survey(Survey {
                    survey_id: id.to_owned(),
                    ..s
                }),
            )
        }

        pub fn retract(&mut self, id: &str, d: i64, target: &str) -> &mut Self {
            self.event(
                id,
                day(d),
                Payload::Retraction(Retraction {
                    retracted_event_id: target.to_owned(),
                    reason: "mistake".to_owned(),
                }),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn facts_sort_by_business_time_whatever_the_arrival_order() {
        let mut a = Log::default();
        a.purchase("p1", 10, 100).purchase("p2", 5, 200);
        let mut b = Log::default();
        b.purchase("p2", 5, 200).purchase("p1", 10, 100);
        let days = |l: &Log| l.facts.purchase_days(AsOf::business(day(100)));
        assert_eq!(days(&a), vec![5, 10]);
        assert_eq!(days(&a), days(&b));
    }

    #[test]
    fn retraction_axes() {
        let mut l = Log::default();
        l.purchase("p1", 10, 100);
        // retracted on day 20
        l.retract("r1", 20, "p1");
        let f = &l.facts;
        // Business axis: the corrected history never had it, even before day 20.
        assert_eq!(f.purchases_at(AsOf::business(day(15))).count(), 0);
        // Knowledge axis: the ledger believed it between day 10 and day 20.
        assert_eq!(f.purchases_at(AsOf::knowledge(day(15))).count(), 1);
        assert_eq!(f.purchases_at(AsOf::knowledge(day(25))).count(), 0);
        assert_eq!(f.purchases_at(AsOf::knowledge(day(5))).count(), 0);
    }

    #[test]
    fn a_late_event_is_invisible_on_the_knowledge_axis_before_it_was_recorded() {
        let mut l = Log::default();
        l.event_recorded(
            "p1",
            day(10),
            day(40),
            Payload::Purchase(crate::event::Purchase {
                order_id: "o".into(),
                amount_minor: 1,
                currency: "USD".into(),
                item_count: 1,
                channel: None,
                category: String::new(),
            }),
        );
        assert_eq!(l.facts.purchases_at(AsOf::business(day(20))).count(), 1);
        assert_eq!(l.facts.purchases_at(AsOf::knowledge(day(20))).count(), 0);
        assert_eq!(l.facts.purchases_at(AsOf::knowledge(day(40))).count(), 1);
    }

    #[test]
    fn redelivered_positions_are_ignored() {
        let mut l = Log::default();
        l.purchase("p1", 1, 100);
        let before = l.facts.clone();
        let e = Event {
            event_id: "p1".into(),
            customer_id: "c1".into(),
            occurred_at: day(1),
            source: "t".into(),
            schema_version: 1,
            correlation_id: None,
            causation_id: None,
            payload: Payload::Retraction(crate::event::Retraction {
                retracted_event_id: "x".into(),
                reason: String::new(),
            }),
        };
        assert_eq!(l.facts.apply(&e, 1, day(1), KindSet::ALL), Applied::Ignored);
        assert_eq!(l.facts, before);
    }

    #[test]
    fn repeat_spend_is_the_mean_of_repeat_purchase_days() {
        let at = AsOf::business(day(100));
        let mut l = Log::default();
        assert_eq!(l.facts.repeat_spend(at), None, "no purchase");
        // First day (two orders) excluded; day 20 has two orders summed; day 30 one.
        l.purchase("a", 10, 500)
            .purchase("b", 10, 700)
            .purchase("c", 20, 1_000)
            .purchase("d", 20, 2_000)
            .purchase("e", 30, 1_500);
        assert_eq!(
            l.facts.repeat_spend(at),
            Some(RepeatSpend {
                currency: Currency::new("USD"),
                days: 2,
                mean_minor: 2_250.0,
            })
        );
        // Only what was visible then: at day 25 one repeat day.
        assert_eq!(
            l.facts
                .repeat_spend(AsOf::business(day(25)))
                .map(|s| (s.days, s.mean_minor)),
            Some((2 - 1, 3_000.0))
        );
        // A one-time buyer has none, whatever they spent on their first day.
        let mut one = Log::default();
        one.purchase("a", 10, 500).purchase("b", 10, 700);
        assert_eq!(one.facts.repeat_spend(at), None);
        // A buyer who also paid in another currency is not comparable: none.
        let mut mixed = Log::default();
        mixed.purchase("a", 10, 500).purchase("b", 20, 700);
        mixed.event(
            "c",
            day(30),
            Payload::Purchase(crate::event::Purchase {
                order_id: "c".into(),
                amount_minor: 900,
                currency: "EUR".into(),
                item_count: 1,
                channel: None,
                category: String::new(),
            }),
        );
        assert_eq!(mixed.facts.repeat_spend(at), None);
        // Repeat days worth nothing have no spend to model.
        let mut free = Log::default();
        free.purchase("a", 10, 500).purchase("b", 20, 0);
        assert_eq!(free.facts.repeat_spend(at), None);
    }
}
