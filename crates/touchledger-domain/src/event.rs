//! The event model: one envelope (§3.1) around one of seven payload kinds (§3.2).
//!
//! Key decision: these plain structs are both what producers build and what the store keeps;
//! an `Event` is not valid by construction. Validity is decided in one place,
//! [`Event::validate`](crate::validate), which the store calls on every append, so that the
//! protobuf path, the JSON path and in-process callers cannot disagree about what is accepted.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// The schema version this build writes and accepts.
pub const SCHEMA_VERSION: u32 = 1;

/// The `source` reserved for events the ledger derives itself.
pub const LEDGER_SOURCE: &str = "ledger";

/// The `customer_id` of population-level derived events (`ModelFitted`).
pub const MODEL_CUSTOMER: &str = "_model";

/// One touchpoint, as published by a producer (or derived by the ledger).
///
/// Its JSON form is documented in `docs/json-events.md`: the envelope fields, plus exactly one
/// payload field named after the kind (`"purchase": {...}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "crate::json::JsonEvent", into = "crate::json::JsonEvent")]
pub struct Event {
    /// Producer-assigned unique id: the idempotency key, forever.
    pub event_id: String,
    /// The customer concerned; one NATS subject token.
    pub customer_id: String,
    /// When it happened (business time, producer clock).
    pub occurred_at: Timestamp,
    /// Producing system.
    pub source: String,
    /// Schema version the producer wrote.
    pub schema_version: u32,
    /// Optional tracing link: the conversation this event belongs to.
    pub correlation_id: Option<String>,
    /// Optional tracing link: the event that caused this one.
    pub causation_id: Option<String>,
    /// What happened.
    pub payload: Payload,
}

impl Event {
    /// The payload's kind.
    pub fn kind(&self) -> EventKind {
        self.payload.kind()
    }
}

/// The seven payload kinds.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// A purchase.
    Purchase(Purchase),
    /// A complaint.
    Complaint(Complaint),
    /// The business called the customer back.
    Callback(Callback),
    /// A survey answer.
    Survey(Survey),
    /// Neutralises an earlier event.
    Retraction(Retraction),
    /// Derived: fitted churn-model parameters.
    ModelFitted(ModelFitted),
    /// Derived: the assessor's churn verdict for a customer.
    ChurnRiskAssessed(ChurnRiskAssessed),
    /// Derived: how well a churn model and the warnings predicted a holdout.
    ModelEvaluated(ModelEvaluated),
}

impl Payload {
    /// The kind of this payload.
    pub fn kind(&self) -> EventKind {
        match self {
            Payload::Purchase(_) => EventKind::Purchase,
            Payload::Complaint(_) => EventKind::Complaint,
            Payload::Callback(_) => EventKind::Callback,
            Payload::Survey(_) => EventKind::Survey,
            Payload::Retraction(_) => EventKind::Retraction,
            Payload::ModelFitted(_) => EventKind::ModelFitted,
            Payload::ChurnRiskAssessed(_) => EventKind::ChurnRiskAssessed,
            Payload::ModelEvaluated(_) => EventKind::ModelEvaluated,
        }
    }
}

/// Event kinds, with stable names (subject tokens, JSON keys) and stable byte codes (indexes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// `purchase`
    Purchase,
    /// `complaint`
    Complaint,
    /// `callback`
    Callback,
    /// `survey`
    Survey,
    /// `retraction`
    Retraction,
    /// `model_fitted` (derived)
    ModelFitted,
    /// `churn_risk_assessed` (derived)
    ChurnRiskAssessed,
    /// `model_evaluated` (derived)
    ModelEvaluated,
}

impl EventKind {
    /// All kinds, in code order.
    pub const ALL: [EventKind; 8] = [
        EventKind::Purchase,
        EventKind::Complaint,
        EventKind::Callback,
        EventKind::Survey,
        EventKind::Retraction,
        EventKind::ModelFitted,
        EventKind::ChurnRiskAssessed,
        EventKind::ModelEvaluated,
    ];

    /// Stable name: the NATS subject token and the JSON payload key.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Purchase => "purchase",
            EventKind::Complaint => "complaint",
            EventKind::Callback => "callback",
            EventKind::Survey => "survey",
            EventKind::Retraction => "retraction",
            EventKind::ModelFitted => "model_fitted",
            EventKind::ChurnRiskAssessed => "churn_risk_assessed",
            EventKind::ModelEvaluated => "model_evaluated",
        }
    }

    /// Stable one-byte code used in on-disk index keys. Never renumber.
    pub fn code(self) -> u8 {
        match self {
            EventKind::Purchase => 1,
            EventKind::Complaint => 2,
            EventKind::Callback => 3,
            EventKind::Survey => 4,
            EventKind::Retraction => 5,
            EventKind::ModelFitted => 6,
            EventKind::ChurnRiskAssessed => 7,
            EventKind::ModelEvaluated => 8,
        }
    }

    /// Inverse of [`EventKind::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        EventKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// Derived kinds are written by the ledger itself, with `source = "ledger"`.
    pub fn is_derived(self) -> bool {
        matches!(
            self,
            EventKind::ModelFitted | EventKind::ChurnRiskAssessed | EventKind::ModelEvaluated
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown kind name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown event kind {0:?} (expected one of purchase, complaint, callback, survey, retraction, model_fitted, churn_risk_assessed)"
)]
pub struct UnknownKind(pub String);

impl FromStr for EventKind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// Contact channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Channel {
    Web,
    App,
    Store,
    Phone,
    Email,
    Chat,
    Social,
    Other,
}

/// A purchase (§3.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purchase {
    /// The shop's order id.
    pub order_id: String,
    /// Amount in minor units (cents); >= 0.
    pub amount_minor: i64,
    /// ISO 4217 currency, three upper-case letters.
    pub currency: String,
    /// Number of items; >= 1.
    pub item_count: u32,
    /// Where it was bought, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    /// Free product category; may be empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub category: String,
}

/// Complaint categories of the textbooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum ComplaintCategory {
    ProductQuality,
    ServiceAttitude,
    Delivery,
    Price,
    Billing,
    Other,
}

/// A complaint (§3.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Complaint {
    /// The complaint's id (callbacks refer to it).
    pub complaint_id: String,
    /// What it is about.
    pub category: ComplaintCategory,
    /// 1 (minor) ..= 5 (severe).
    pub severity: u32,
    /// Where it was raised, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    /// The customer's words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
}

/// Why the business called back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum CallbackPurpose {
    ComplaintFollowUp,
    RoutineCare,
    SatisfactionCheck,
    WinBack,
}

/// How the callback went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum CallbackOutcome {
    Reached,
    NoAnswer,
    Refused,
    ComplaintResolved,
    ComplaintUnresolved,
}

/// The textbooks' four churn causes, as a reason stated by the customer (§4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeavingReason {
    /// Moved away, business closed, deceased.
    Natural,
    /// No longer needs the product.
    NeedChange,
    /// Lured by a rival's offer.
    Competitor,
    /// Product or service failures, complaints.
    Disappointment,
}

/// A callback (§3.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Callback {
    /// The callback's id.
    pub callback_id: String,
    /// Why the business called.
    pub purpose: CallbackPurpose,
    /// The complaint followed up, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related_complaint_id: Option<String>,
    /// How it went.
    pub outcome: CallbackOutcome,
    /// Satisfaction with the resolution, 1..=5, if asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution_satisfaction: Option<u32>,
    /// A stated reason for leaving, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaving_reason: Option<LeavingReason>,
    /// Agent's note.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// A survey answer (§3.2). At least one score is present.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Survey {
    /// The survey's id.
    pub survey_id: String,
    /// Expectation *a*, 1..=10 (with `performance`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expectation: Option<u32>,
    /// Perceived performance *b*, 1..=10 (with `expectation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performance: Option<u32>,
    /// CSAT 1..=5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csat: Option<u32>,
    /// NPS likelihood to recommend 0..=10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nps: Option<u32>,
    /// Customer effort score 1..=7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ces: Option<u32>,
    /// Repurchase intent 1..=5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repurchase_intent: Option<u32>,
    /// Number of other suppliers the customer also buys from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_suppliers: Option<u32>,
    /// A stated reason for leaving, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaving_reason: Option<LeavingReason>,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
}

/// Neutralises an earlier event of the same customer (§3.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retraction {
    /// `event_id` of the event retracted.
    pub retracted_event_id: String,
    /// Why.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// Time unit of a fitted model's rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum TimeUnit {
    Days,
    Weeks,
}

/// Derived: fitted BG/NBD population parameters (§4.4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFitted {
    /// Model name, e.g. `bgnbd`.
    pub model: String,
    /// The version assessments refer to.
    pub model_version: String,
    /// BG/NBD r.
    pub r: f64,
    /// BG/NBD α.
    pub alpha: f64,
    /// BG/NBD a.
    pub a: f64,
    /// BG/NBD b.
    pub b: f64,
    /// Maximised log-likelihood.
    pub log_likelihood: f64,
    /// Customers in the fit.
    pub customers: u64,
    /// Unit of t_x and T.
    pub time_unit: TimeUnit,
    /// Calibration end used for T.
    pub calibration_end: Timestamp,
    /// The Gamma-Gamma spend model fitted with the count model (`None`: none could be fitted,
    /// or the fit was recorded before spend models existed). Always written, as `null` when
    /// absent, so that the state that keeps fits has one encoding.
    #[serde(default)]
    pub spend: Option<SpendModel>,
}

/// Derived, inside [`ModelFitted`]: the Gamma-Gamma spend model (Fader, Hardie & Lee 2005,
/// "RFM and CLV"; `touchledger_domain::gammagamma`), fitted on the mean value of the repeat
/// purchase-days (the first purchase-day excluded) of the buyers who paid in `currency` only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendModel {
    /// ISO 4217 code of the values fitted.
    pub currency: String,
    /// Shape of a customer's values around their own mean.
    pub p: f64,
    /// Shape of the customers' means.
    pub q: f64,
    /// Scale of the customers' means, in the currency's minor units.
    pub gamma: f64,
    /// Maximised log-likelihood.
    pub log_likelihood: f64,
    /// Repeat buyers fitted.
    pub customers: u64,
}

impl SpendModel {
    /// The model's parameters.
    pub fn params(&self) -> crate::gammagamma::Params {
        crate::gammagamma::Params {
            p: self.p,
            q: self.q,
            gamma: self.gamma,
        }
    }
}

/// Derived: a calibration/holdout evaluation of a churn model and of the warnings it raised
/// (`touchledger evaluate --record`; `touchledger_domain::evaluation`), recorded so that an
/// auditor sees how well the model behind the warnings performed. `customer_id` is
/// [`MODEL_CUSTOMER`]; `occurred_at` is the holdout end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEvaluated {
    /// The `model_version` of the fit evaluated (fitted at the calibration end).
    pub model_version: String,
    /// Calibration end T1.
    pub calibration_end: Timestamp,
    /// Holdout end T2.
    pub holdout_end: Timestamp,
    /// Buyers at T1.
    pub customers: u64,
    /// Repeat purchase-days in the holdout.
    pub holdout_actual: u64,
    /// Σ E[Y(T2 − T1) | x, tₓ, T].
    pub holdout_predicted: f64,
    /// Buyers with no purchase in the holdout.
    pub churned: u64,
    /// The warning rules flagging at each level and above (watch … lost).
    pub thresholds: Vec<EvaluatedThreshold>,
    /// ROC AUC of the churn score (`None`: only one class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auc_score: Option<f64>,
    /// ROC AUC of days since the last purchase alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auc_recency: Option<f64>,
    /// ROC AUC of BG/NBD's P(no purchase in the holdout length) alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auc_model: Option<f64>,
}

/// One threshold of a [`ModelEvaluated`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluatedThreshold {
    /// Flagged: level ≥ this.
    pub at_least: ChurnLevel,
    /// Buyers flagged.
    pub flagged: u64,
    /// Churned among the flagged, of the flagged.
    pub precision: f64,
    /// Churned among the flagged, of all churned.
    pub recall: f64,
    /// Precision over the base rate.
    pub lift: f64,
}

/// Churn warning levels (§4.3), in increasing order of severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum ChurnLevel {
    None,
    Watch,
    Warning,
    Critical,
    Lost,
}

/// Why a churn rule fired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskReason {
    /// Rule code, e.g. `OVERDUE_VISIT`.
    pub code: String,
    /// The level this rule alone implies.
    pub level: ChurnLevel,
    /// The evidence, e.g. `silent 120 d`.
    pub evidence: String,
    /// The threshold crossed, e.g. `>= 90 d`.
    pub threshold: String,
}

/// Derived: the assessor's churn verdict (§4.4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChurnRiskAssessed {
    /// New level.
    pub level: ChurnLevel,
    /// Level before this assessment.
    pub previous_level: ChurnLevel,
    /// Score in 0..=1.
    pub score: f64,
    /// The rules that fired.
    #[serde(default)]
    pub reasons: Vec<RiskReason>,
    /// Probable cause; `None` = unknown (never invented).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probable_cause: Option<LeavingReason>,
    /// At risk since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// Expected next purchase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_next_purchase: Option<Timestamp>,
    /// Value at risk, minor units.
    pub value_at_risk_minor: i64,
    /// Currency of `value_at_risk_minor` (empty when the value is 0).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub currency: String,
    /// `model_version` of the `ModelFitted` used.
    pub model_version: String,
    /// The instant assessed.
    pub as_of: Timestamp,
}
