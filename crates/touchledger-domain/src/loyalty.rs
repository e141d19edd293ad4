//! Loyalty (brief §4.2): attitude and behaviour, the Dick & Basu matrix, the Knox diamond and
//! the textbook lifecycle stages, evaluated from a customer's facts at an explicit `as_of`.
//!
//! Key decisions:
//! * Purchases count by **purchase-day** (UTC calendar days), as in BG/NBD: three orders on one
//!   day are one visit.
//! * Nothing is guessed: without a survey the attitude is unknown, and so are the Dick & Basu
//!   class and the Knox position. Population-relative scores (RFM quintiles, pyramid tiers) are
//!   computed by [`crate::population`], which sees every customer.
//! * The lifecycle history is re-derived from the purchase days, so every transition (including
//!   a decline that happened during a silence) is reported with its instant, on either axis.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::facts::{AsOf, CustomerFacts, day_of, day_start};
use crate::satisfaction::Reason;
use crate::time::Timestamp;

/// Configurable loyalty rules; defaults documented per field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoyaltyRules {
    /// Attitude A at or above this is "high". Default 0.7 (NPS 7/10, intent ≈ 4/5).
    pub attitude_high_at: f64,
    /// Purchase-days in the trailing window at or above this is "high repeat patronage".
    /// Default 3.
    pub repeat_high_days: u32,
    /// The trailing behaviour window, days. Default 365.
    pub window_days: i64,
    /// Knox: at most this many other suppliers is "few". Default 1.
    pub knox_few_max: u32,
    /// Lifecycle: repeat purchase-days needed for "stable". Default 3.
    pub stable_min_repeat: u32,
    /// Lifecycle: silence ≥ this × the mean inter-purchase interval is "decline". Default 1.5.
    pub decline_k: f64,
    /// Lifecycle: a one-time buyer silent this many days is in "decline". Default 180.
    pub decline_one_time_days: i64,
}

impl Default for LoyaltyRules {
    fn default() -> Self {
        LoyaltyRules {
            attitude_high_at: 0.7,
            repeat_high_days: 3,
            window_days: 365,
            knox_few_max: 1,
            stable_min_repeat: 3,
            decline_k: 1.5,
            decline_one_time_days: 180,
        }
    }
}

/// Dick & Basu (1994): relative attitude × repeat patronage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DickBasu {
    /// High attitude, high repeat.
    TrueLoyalty,
    /// High attitude, low repeat.
    LatentLoyalty,
    /// Low attitude, high repeat.
    SpuriousLoyalty,
    /// Low attitude, low repeat.
    NoLoyalty,
    /// No attitude data: never guessed.
    Unknown,
}

impl DickBasu {
    /// The class of (attitude high?, repeat high?); `None` attitude → unknown.
    pub fn of(attitude_high: Option<bool>, repeat_high: bool) -> DickBasu {
        match (attitude_high, repeat_high) {
            (None, _) => DickBasu::Unknown,
            (Some(true), true) => DickBasu::TrueLoyalty,
            (Some(true), false) => DickBasu::LatentLoyalty,
            (Some(false), true) => DickBasu::SpuriousLoyalty,
            (Some(false), false) => DickBasu::NoLoyalty,
        }
    }
}

/// Knox's loyalty diamond: involvement × number of suppliers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Knox {
    /// Involved, few suppliers.
    Loyal,
    /// Not involved, few suppliers.
    Habitual,
    /// Involved, many suppliers.
    MultiBrand,
    /// Not involved, many suppliers.
    Switcher,
    /// Suppliers or involvement unknown.
    Unknown,
}

impl DickBasu {
    /// The class's name, as JSON spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            DickBasu::TrueLoyalty => "true_loyalty",
            DickBasu::LatentLoyalty => "latent_loyalty",
            DickBasu::SpuriousLoyalty => "spurious_loyalty",
            DickBasu::NoLoyalty => "no_loyalty",
            DickBasu::Unknown => "unknown",
        }
    }
}

impl Stage {
    /// The stage's name, as JSON spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Prospect => "prospect",
            Stage::Acquisition => "acquisition",
            Stage::Formation => "formation",
            Stage::Stable => "stable",
            Stage::Decline => "decline",
        }
    }
}

/// Textbook lifecycle stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// No purchase yet.
    Prospect,
    /// One purchase-day: the customer is trying the business.
    Acquisition,
    /// Repeat purchases, fewer than `stable_min_repeat`.
    Formation,
    /// At least `stable_min_repeat` repeat purchase-days, buying on rhythm.
    Stable,
    /// Silent well past the customer's own rhythm.
    Decline,
}

/// Purchase behaviour at `as_of`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Behaviour {
    /// Distinct purchase days, ever.
    pub purchase_days: u32,
    /// Repeat purchase-days x = purchase_days − 1.
    pub repeat_days: u32,
    /// First purchase day.
    pub first: Option<Timestamp>,
    /// Last purchase day.
    pub last: Option<Timestamp>,
    /// Days since the last purchase-day.
    pub recency_days: Option<i64>,
    /// Purchase-days in the trailing window.
    pub frequency_window: u32,
    /// Purchase-days in the last 90 days.
    pub frequency_90: u32,
    /// Lifetime value per currency, minor units.
    pub monetary: BTreeMap<String, i64>,
    /// Value in the trailing window per currency.
    pub monetary_window: BTreeMap<String, i64>,
    /// Days from the first purchase to `as_of`.
    pub tenure_days: Option<i64>,
    /// Mean days between purchase-days, (last − first) / x, when x ≥ 1.
    pub mean_interval_days: Option<f64>,
}

impl Behaviour {
    /// Behaviour of `facts` at `as_of` with a trailing window of `window_days`.
    pub fn of(facts: &CustomerFacts, as_of: AsOf, window_days: i64) -> Behaviour {
        let today = day_of(as_of.at);
        let mut b = Behaviour::default();
        let mut prev_day = None;
        let mut first = None;
        for p in facts.purchases_at(as_of) {
            let d = day_of(p.stamp.occurred_at);
            // Amounts are at most `max_amount_minor` each (validation); the sums saturate
            // instead of wrapping, so no history can turn a customer's value negative.
            let m = b
                .monetary
                .entry(p.currency.as_str().to_owned())
                .or_default();
            *m = m.saturating_add(p.amount_minor);
            if d > today - window_days {
                let w = b
                    .monetary_window
                    .entry(p.currency.as_str().to_owned())
                    .or_default();
                *w = w.saturating_add(p.amount_minor);
            }
            if prev_day == Some(d) {
                continue;
            }
            prev_day = Some(d);
            first.get_or_insert(d);
            b.purchase_days += 1;
            if d > today - window_days {
                b.frequency_window += 1;
            }
            if d > today - 90 {
                b.frequency_90 += 1;
            }
        }
        if let (Some(f), Some(l)) = (first, prev_day) {
            b.repeat_days = b.purchase_days - 1;
            b.first = Some(day_start(f));
            b.last = Some(day_start(l));
            b.recency_days = Some(today - l);
            b.tenure_days = Some(today - f);
            if b.repeat_days > 0 {
                b.mean_interval_days = Some((l - f) as f64 / f64::from(b.repeat_days));
            }
        }
        b
    }

    /// The currency with the largest lifetime value (ties: alphabetical), if any purchase.
    pub fn main_currency(&self) -> Option<&str> {
        self.monetary
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(c, _)| c.as_str())
    }
}

/// The loyalty read model of one customer at `as_of`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoyaltyView {
    /// The instant and axis evaluated.
    pub as_of: AsOf,
    /// Attitudinal score A ∈ [0, 1]; unknown without a survey.
    pub attitude: Option<f64>,
    /// Purchase behaviour.
    pub behaviour: Behaviour,
    /// Dick & Basu class.
    pub dick_basu: DickBasu,
    /// Knox position.
    pub knox: Knox,
    /// Other suppliers, from the latest survey that says.
    pub other_suppliers: Option<u32>,
    /// Lifecycle stage now.
    pub stage: Stage,
    /// Every lifecycle transition up to `as_of`: (when, new stage).
    pub stage_history: Vec<(Timestamp, Stage)>,
    /// Why.
    pub reasons: Vec<Reason>,
    /// Expected value from the fitted models (CLV); only in a customer's own view
    /// ([`LoyaltyRules::with_value`]), `None` in population passes and without a spend model.
    #[serde(default)]
    pub value: Option<crate::clv::CustomerValue>,
}

impl LoyaltyRules {
    /// Attitude A from the latest NPS (NPS/10) and the latest repurchase intent ((i − 1)/4),
    /// averaged over those present; `None` when neither is.
    pub fn attitude(&self, facts: &CustomerFacts, as_of: AsOf) -> Option<(f64, String)> {
        let mut nps = None;
        let mut intent = None;
        for s in facts.surveys_at(as_of) {
            if let Some(n) = s.nps {
                nps = Some(n);
            }
            if let Some(i) = s.repurchase_intent {
                intent = Some(i);
            }
        }
        let parts: Vec<(f64, String)> = [
            nps.map(|n| (f64::from(n) / 10.0, format!("NPS {n}/10"))),
            intent.map(|i| {
                (
                    f64::from(i.saturating_sub(1)) / 4.0,
                    format!("intent {i}/5"),
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        if parts.is_empty() {
            return None;
        }
        let a = parts.iter().map(|p| p.0).sum::<f64>() / parts.len() as f64;
        let evidence = parts
            .into_iter()
            .map(|p| p.1)
            .collect::<Vec<_>>()
            .join(", ");
        Some((a, evidence))
    }

    /// The stage after purchase days `days` (ascending, non-empty) with `silence` days since the
    /// last one, and the silence at which decline begins.
    pub(crate) fn stage_of(&self, days: &[i64], silence: i64) -> (Stage, i64) {
        let x = days.len().saturating_sub(1) as u32;
        if days.is_empty() {
            return (Stage::Prospect, i64::MAX);
        }
        let decline_after = if x == 0 {
            self.decline_one_time_days
        } else {
            let interval = (days[days.len() - 1] - days[0]) as f64 / f64::from(x);
            (self.decline_k * interval).ceil() as i64
        };
        let stage = if silence >= decline_after {
            Stage::Decline
        } else if x == 0 {
            Stage::Acquisition
        } else if x < self.stable_min_repeat {
            Stage::Formation
        } else {
            Stage::Stable
        };
        (stage, decline_after)
    }

    /// Every lifecycle transition of a customer with these purchase days, up to day `today`.
    pub fn stage_history(&self, days: &[i64], today: i64) -> Vec<(Timestamp, Stage)> {
        let mut out: Vec<(Timestamp, Stage)> = Vec::new();
        let push = |at: i64, s: Stage, out: &mut Vec<(Timestamp, Stage)>| {
            if out.last().map(|l| l.1) != Some(s) {
                out.push((day_start(at), s));
            }
        };
        for i in 0..days.len() {
            let (s, decline_after) = self.stage_of(&days[..=i], 0);
            push(days[i], s, &mut out);
            let next = days.get(i + 1).copied().unwrap_or(today + 1);
            let decline_day = days[i].saturating_add(decline_after);
            if decline_day < next && decline_day <= today {
                push(decline_day, Stage::Decline, &mut out);
            }
        }
        out
    }

    /// Evaluate the loyalty read model of `facts` at `as_of`.
    pub fn evaluate(&self, facts: &CustomerFacts, as_of: AsOf) -> LoyaltyView {
        let behaviour = Behaviour::of(facts, as_of, self.window_days);
        let mut reasons = Vec::new();
        let attitude = self.attitude(facts, as_of);
        let attitude_high = attitude.as_ref().map(|(a, _)| *a >= self.attitude_high_at);
        if let Some((a, ev)) = &attitude {
            reasons.push(Reason {
                code: "ATTITUDE".into(),
                evidence: format!("A = {a:.2} from {ev}"),
                threshold: format!("high if A >= {:.2}", self.attitude_high_at),
            });
        }
        let repeat_high = behaviour.frequency_window >= self.repeat_high_days;
        reasons.push(Reason {
            code: "REPEAT_PATRONAGE".into(),
            evidence: format!(
                "{} purchase-days in the last {} d",
                behaviour.frequency_window, self.window_days
            ),
            threshold: format!("high if >= {}", self.repeat_high_days),
        });
        let dick_basu = DickBasu::of(attitude_high, repeat_high);
        let other_suppliers = facts
            .surveys_at(as_of)
            .filter_map(|s| s.other_suppliers)
            .last();
        let knox = match (attitude_high, other_suppliers) {
            (Some(inv), Some(n)) => {
                reasons.push(Reason {
                    code: "KNOX".into(),
                    evidence: format!(
                        "{n} other suppliers, involvement {}",
                        if inv { "high" } else { "low" }
                    ),
                    threshold: format!("few if <= {}", self.knox_few_max),
                });
                match (inv, n <= self.knox_few_max) {
                    (true, true) => Knox::Loyal,
                    (false, true) => Knox::Habitual,
                    (true, false) => Knox::MultiBrand,
                    (false, false) => Knox::Switcher,
                }
            }
            _ => Knox::Unknown,
        };
        let days = facts.purchase_days(as_of);
        let today = day_of(as_of.at);
        let stage_history = self.stage_history(&days, today);
        let stage = stage_history.last().map_or(Stage::Prospect, |s| s.1);
        if let (Some(r), Some(i)) = (behaviour.recency_days, behaviour.mean_interval_days) {
            reasons.push(Reason {
                code: "LIFECYCLE".into(),
                evidence: format!(
                    "{} repeat purchase-days, silent {r} d, mean interval {i:.1} d",
                    behaviour.repeat_days
                ),
                threshold: format!(
                    "stable if >= {} repeats; decline if silent >= {:.1} x interval",
                    self.stable_min_repeat, self.decline_k
                ),
            });
        }
        LoyaltyView {
            as_of,
            attitude: attitude.map(|a| a.0),
            behaviour,
            dick_basu,
            knox,
            other_suppliers,
            stage,
            stage_history,
            reasons,
            value: None,
        }
    }

    /// [`LoyaltyRules::evaluate`] with the customer's expected value under `model`
    /// ([`crate::clv::customer_value`] over the churn rules' CLV horizon and discount,
    /// [`crate::churn::ChurnRules::clv`]): a customer's own read. Population passes leave it
    /// out: no population figure uses it, and it costs a series per month of the horizon.
    pub fn with_value(
        &self,
        facts: &CustomerFacts,
        model: Option<&crate::event::ModelFitted>,
        as_of: AsOf,
        clv: &crate::churn::ChurnRules,
    ) -> LoyaltyView {
        let mut view = self.evaluate(facts, as_of);
        view.value = model.and_then(|m| clv.clv(facts, m, as_of));
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Survey;
    use crate::facts::test_support::{Log, day};

    #[test]
    fn names_are_the_json_names() {
        for d in [
            DickBasu::TrueLoyalty,
            DickBasu::LatentLoyalty,
            DickBasu::SpuriousLoyalty,
            DickBasu::NoLoyalty,
            DickBasu::Unknown,
        ] {
            assert_eq!(serde_json::to_value(d).ok(), Some(d.as_str().into()));
        }
        for st in [
            Stage::Prospect,
            Stage::Acquisition,
            Stage::Formation,
            Stage::Stable,
            Stage::Decline,
        ] {
            assert_eq!(serde_json::to_value(st).ok(), Some(st.as_str().into()));
        }
    }

    #[test]
    fn dick_basu_truth_table_plus_unknown() {
        let table = [
            (Some(true), true, DickBasu::TrueLoyalty),
            (Some(true), false, DickBasu::LatentLoyalty),
            (Some(false), true, DickBasu::SpuriousLoyalty),
            (Some(false), false, DickBasu::NoLoyalty),
            (None, true, DickBasu::Unknown),
            (None, false, DickBasu::Unknown),
        ];
        for (att, rep, want) in table {
            assert_eq!(DickBasu::of(att, rep), want, "{att:?} {rep}");
        }
    }

    #[test]
    fn dick_basu_through_the_fold() {
        let rules = LoyaltyRules::default();
        let mut l = Log::default();
        l.purchase("p1", 100, 1000)
            .purchase("p2", 130, 1000)
            .purchase("p3", 160, 500);
        let at = AsOf::business(day(170));
        // No survey: unknown, never guessed.
        assert_eq!(rules.evaluate(&l.facts, at).dick_basu, DickBasu::Unknown);
        assert_eq!(rules.evaluate(&l.facts, at).attitude, None);
        // NPS 9 and intent 5 → A = (0.9 + 1.0)/2 = 0.95, high; 3 purchase-days → true loyalty.
        l.survey(
            "s1",
            165,
            Survey {
                nps: Some(9),
                repurchase_intent: Some(5),
                ..Default::default()
            },
        );
        let v = rules.evaluate(&l.facts, at);
        assert_eq!(v.attitude, Some(0.95));
        assert_eq!(v.dick_basu, DickBasu::TrueLoyalty);
        // A detractor later → low attitude, high repeat → spurious.
        l.survey(
            "s2",
            168,
            Survey {
                nps: Some(2),
                repurchase_intent: Some(1),
                ..Default::default()
            },
        );
        assert_eq!(
            rules.evaluate(&l.facts, at).dick_basu,
            DickBasu::SpuriousLoyalty
        );
        // A year later, no purchases in the window → no loyalty.
        assert_eq!(
            rules.evaluate(&l.facts, AsOf::business(day(600))).dick_basu,
            DickBasu::NoLoyalty
        );
        // Retracting the detractor survey restores true loyalty (business axis).
        l.retract("r", 169, "s2");
        assert_eq!(
            rules.evaluate(&l.facts, at).dick_basu,
            DickBasu::TrueLoyalty
        );
    }

    #[test]
    fn knox_diamond() {
        let rules = LoyaltyRules::default();
        let cases = [
            (9, 0, Knox::Loyal),
            (9, 1, Knox::Loyal),
            (3, 1, Knox::Habitual),
            (9, 2, Knox::MultiBrand),
            (3, 4, Knox::Switcher),
        ];
        for (nps, suppliers, want) in cases {
            let mut l = Log::default();
            l.survey(
                "s",
                1,
                Survey {
                    nps: Some(nps),
                    other_suppliers: Some(suppliers),
                    ..Default::default()
                },
            );
            assert_eq!(
                rules.evaluate(&l.facts, AsOf::business(day(2))).knox,
                want,
                "{nps} {suppliers}"
            );
        }
        let mut l = Log::default();
        l.survey(
            "s",
            1,
            Survey {
                other_suppliers: Some(0),
                csat: Some(5),
                ..Default::default()
            },
        );
        assert_eq!(
            rules.evaluate(&l.facts, AsOf::business(day(2))).knox,
            Knox::Unknown
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 200, ..Default::default() })]

        /// Money sums at the validation ceiling are exact; beyond anything validation lets
        /// through they saturate, never wrap (two purchases of i64::MAX once showed as −2).
        #[test]
        fn money_sums_are_exact_at_the_ceiling_and_never_wrap(
            at_ceiling in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(0i64),
                    proptest::strategy::Just(crate::ValidationPolicy::default().max_amount_minor),
                    0..=crate::ValidationPolicy::default().max_amount_minor,
                ],
                1..300,
            ),
            huge in proptest::collection::vec(0..=i64::MAX, 1..8),
        ) {
            for (amounts, tag) in [(&at_ceiling, "c"), (&huge, "h")] {
                let mut l = Log::default();
                for (i, a) in amounts.iter().enumerate() {
                    l.purchase(&format!("{tag}{i}"), 1 + (i % 50) as i64, *a);
                }
                let b = Behaviour::of(&l.facts, AsOf::business(day(100)), 365);
                let exact: i128 = amounts.iter().map(|a| i128::from(*a)).sum();
                let got = b.monetary.get("USD").copied().unwrap_or(0);
                proptest::prop_assert!(got >= 0);
                proptest::prop_assert_eq!(i128::from(got), exact.min(i128::from(i64::MAX)));
                let window = b.monetary_window.get("USD").copied().unwrap_or(0);
                proptest::prop_assert_eq!(i128::from(window), exact.min(i128::from(i64::MAX)));
            }
        }
    }

    #[test]
    fn behaviour_counts_purchase_days_and_money() {
        let mut l = Log::default();
        l.purchase("a", 10, 100)
            .purchase("b", 10, 50)
            .purchase("c", 40, 25);
        let b = Behaviour::of(&l.facts, AsOf::business(day(100)), 365);
        assert_eq!(b.purchase_days, 2);
        assert_eq!(b.repeat_days, 1);
        assert_eq!(b.recency_days, Some(60));
        assert_eq!(b.tenure_days, Some(90));
        assert_eq!(b.mean_interval_days, Some(30.0));
        assert_eq!(b.monetary.get("USD"), Some(&175));
        assert_eq!(b.frequency_90, 1);
    }

    #[test]
    fn lifecycle_records_every_transition() {
        let rules = LoyaltyRules::default();
        // Purchases every 30 days: acquisition, formation ×2, stable, then silence → decline at
        // last + ceil(1.5 × 30) = +45, then a purchase brings the customer back to stable.
        let days = [0, 30, 60, 90, 200];
        let h = rules.stage_history(&days, 400);
        let got: Vec<(i64, Stage)> = h.iter().map(|(t, s)| (day_of(*t), *s)).collect();
        assert_eq!(
            got,
            vec![
                (0, Stage::Acquisition),
                (30, Stage::Formation),
                (90, Stage::Stable),
                (135, Stage::Decline),
                (200, Stage::Stable),
                // interval now 50 → decline at 200 + 75
                (275, Stage::Decline),
            ]
        );
        // Before the second decline.
        let h = rules.stage_history(&days, 274);
        assert_eq!(h.last().map(|x| x.1), Some(Stage::Stable));
        // A one-time buyer declines after 180 days.
        let h = rules.stage_history(&[10], 190);
        assert_eq!(
            h.last().map(|x| (day_of(x.0), x.1)),
            Some((190, Stage::Decline))
        );
        assert!(rules.stage_history(&[], 10).is_empty());
    }
}
