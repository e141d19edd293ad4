//! Validation (§3.3): every rule has a stable error code.
//!
//! Key decision: the codes are a closed enum whose `as_str` names are a public contract (they
//! appear in NATS dead-letter subjects, in replies and in the rejections record); a new rule gets
//! a new code, and a code is never renamed or reused. `docs/error-codes.md` documents each one.
//! Validation needs "now" for the future-skew rule; it is passed in, never read from a clock, so
//! that the same input always gets the same verdict.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::{
    Callback, ChurnRiskAssessed, Complaint, Event, LEDGER_SOURCE, MODEL_CUSTOMER, ModelEvaluated,
    ModelFitted, Payload, Purchase, Retraction, SCHEMA_VERSION, Survey,
};
use crate::time::Timestamp;

/// Stable rejection codes. The string form (`as_str`) is the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectCode {
    /// The bytes are not a decodable event (bad protobuf, bad JSON syntax).
    DecodeFailed,
    /// JSON only: a field this schema does not have (typo?).
    FieldUnknown,
    /// A required field is absent or empty.
    FieldMissing,
    /// No payload, or a payload kind this ledger does not know.
    PayloadMissing,
    /// JSON only: more than one payload field.
    PayloadAmbiguous,
    /// An enum value that is unspecified or unknown.
    EnumInvalid,
    /// An id (event, order, complaint, ...) too long or with whitespace/control characters.
    IdInvalid,
    /// `customer_id` is not a safe NATS subject token or is too long.
    CustomerIdInvalid,
    /// `customer_id` starts with `_` (reserved for the ledger) on an event that may not use it.
    CustomerIdReserved,
    /// A timestamp that is not a valid instant.
    TimeInvalid,
    /// `occurred_at` before 1970-01-01.
    TimeBeforeEpoch,
    /// `occurred_at` further in the future than the configured clock skew.
    TimeInFuture,
    /// `source` too long or with whitespace/control characters.
    SourceInvalid,
    /// `source = "ledger"` on an upstream event, or a derived event from another source.
    SourceReserved,
    /// `schema_version` other than the supported one.
    SchemaVersionUnsupported,
    /// A negative money amount.
    AmountNegative,
    /// A money amount above the policy's ceiling (`max_amount_minor`).
    AmountTooLarge,
    /// A currency that is not three upper-case letters.
    CurrencyInvalid,
    /// A count out of range (e.g. `item_count` 0).
    CountInvalid,
    /// A score outside its scale.
    ScoreOutOfRange,
    /// Survey expectation *a* = 0: C = b/a is undefined.
    ExpectationZero,
    /// Survey has only one of expectation *a* and performance *b*.
    SurveyPairIncomplete,
    /// Survey with no score at all.
    SurveyEmpty,
    /// A free-text field longer than allowed.
    TextTooLong,
    /// A number that is not finite or not in its domain (model parameters).
    ValueInvalid,
    /// A retraction naming an event the ledger does not have.
    RetractionTargetUnknown,
    /// A retraction naming a retraction, or an event of another customer.
    RetractionTargetInvalid,
    /// The `event_id` was already stored with different content.
    EventIdConflict,
    /// A touchpoint published on a subject that names another customer or kind than the event
    /// (`<prefix>.touchpoint.<kind>.<customer>`): NATS routes by the subject, so the event would
    /// land in the wrong customer's partition.
    SubjectMismatch,
    /// The event's customer belongs to another partition of a partitioned ledger than the store
    /// it was sent to (a routing error of the caller: the partition is a function of
    /// `customer_id`).
    WrongPartition,
}

impl RejectCode {
    /// Every code, for documentation and exhaustive tests.
    pub const ALL: [RejectCode; 30] = [
        RejectCode::DecodeFailed,
        RejectCode::FieldUnknown,
        RejectCode::FieldMissing,
        RejectCode::PayloadMissing,
        RejectCode::PayloadAmbiguous,
        RejectCode::EnumInvalid,
        RejectCode::IdInvalid,
        RejectCode::CustomerIdInvalid,
        RejectCode::CustomerIdReserved,
        RejectCode::TimeInvalid,
        RejectCode::TimeBeforeEpoch,
        RejectCode::TimeInFuture,
        RejectCode::SourceInvalid,
        RejectCode::SourceReserved,
        RejectCode::SchemaVersionUnsupported,
        RejectCode::AmountNegative,
        RejectCode::AmountTooLarge,
        RejectCode::CurrencyInvalid,
        RejectCode::CountInvalid,
        RejectCode::ScoreOutOfRange,
        RejectCode::ExpectationZero,
        RejectCode::SurveyPairIncomplete,
        RejectCode::SurveyEmpty,
        RejectCode::TextTooLong,
        RejectCode::ValueInvalid,
        RejectCode::RetractionTargetUnknown,
        RejectCode::RetractionTargetInvalid,
        RejectCode::EventIdConflict,
        RejectCode::SubjectMismatch,
        RejectCode::WrongPartition,
    ];

    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::DecodeFailed => "DECODE_FAILED",
            RejectCode::FieldUnknown => "FIELD_UNKNOWN",
            RejectCode::FieldMissing => "FIELD_MISSING",
            RejectCode::PayloadMissing => "PAYLOAD_MISSING",
            RejectCode::PayloadAmbiguous => "PAYLOAD_AMBIGUOUS",
            RejectCode::EnumInvalid => "ENUM_INVALID",
            RejectCode::IdInvalid => "ID_INVALID",
            RejectCode::CustomerIdInvalid => "CUSTOMER_ID_INVALID",
            RejectCode::CustomerIdReserved => "CUSTOMER_ID_RESERVED",
            RejectCode::TimeInvalid => "TIME_INVALID",
            RejectCode::TimeBeforeEpoch => "TIME_BEFORE_EPOCH",
            RejectCode::TimeInFuture => "TIME_IN_FUTURE",
            RejectCode::SourceInvalid => "SOURCE_INVALID",
            RejectCode::SourceReserved => "SOURCE_RESERVED",
            RejectCode::SchemaVersionUnsupported => "SCHEMA_VERSION_UNSUPPORTED",
            RejectCode::AmountNegative => "AMOUNT_NEGATIVE",
            RejectCode::AmountTooLarge => "AMOUNT_TOO_LARGE",
            RejectCode::CurrencyInvalid => "CURRENCY_INVALID",
            RejectCode::CountInvalid => "COUNT_INVALID",
            RejectCode::ScoreOutOfRange => "SCORE_OUT_OF_RANGE",
            RejectCode::ExpectationZero => "EXPECTATION_ZERO",
            RejectCode::SurveyPairIncomplete => "SURVEY_PAIR_INCOMPLETE",
            RejectCode::SurveyEmpty => "SURVEY_EMPTY",
            RejectCode::TextTooLong => "TEXT_TOO_LONG",
            RejectCode::ValueInvalid => "VALUE_INVALID",
            RejectCode::RetractionTargetUnknown => "RETRACTION_TARGET_UNKNOWN",
            RejectCode::RetractionTargetInvalid => "RETRACTION_TARGET_INVALID",
            RejectCode::EventIdConflict => "EVENT_ID_CONFLICT",
            RejectCode::SubjectMismatch => "SUBJECT_MISMATCH",
            RejectCode::WrongPartition => "WRONG_PARTITION",
        }
    }

    /// Parse a stable name.
    pub fn parse(s: &str) -> Option<Self> {
        RejectCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for RejectCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RejectCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RejectCode::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown code {s}")))
    }
}

/// A machine-readable refusal: stable code, the field concerned (dotted path, may be empty),
/// and a reason for humans.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}{}: {reason}", if field.is_empty() { String::new() } else { format!(" ({field})") })]
pub struct Rejection {
    /// Stable code.
    pub code: RejectCode,
    /// Offending field, e.g. `survey.nps`; empty when not about one field.
    pub field: String,
    /// Human explanation.
    pub reason: String,
}

impl Rejection {
    /// Build a rejection.
    pub fn new(code: RejectCode, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Rejection {
            code,
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Configurable limits of validation. Defaults are documented on each field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationPolicy {
    /// How far `occurred_at` may lie ahead of the ledger's clock. Default 24 h.
    pub max_future_skew: Duration,
    /// Maximum byte length of ids (event, customer, order, ...). Default 128.
    pub max_id_len: usize,
    /// Maximum byte length of `source`. Default 64.
    pub max_source_len: usize,
    /// Maximum byte length of free-text fields. Default 4096.
    pub max_text_len: usize,
    /// Largest money amount of one event, in minor units. Default 10^12 (ten billion of a
    /// currency with cents): far above any real purchase, and low enough that the sums the
    /// read models keep in 64 bits hold millions of such amounts per customer.
    pub max_amount_minor: i64,
}

impl Default for ValidationPolicy {
    fn default() -> Self {
        ValidationPolicy {
            max_future_skew: Duration::from_secs(24 * 3600),
            max_id_len: 128,
            max_source_len: 64,
            max_text_len: 4096,
            max_amount_minor: 1_000_000_000_000,
        }
    }
}

type Check = Result<(), Rejection>;

fn fail(code: RejectCode, field: &str, reason: impl Into<String>) -> Check {
    Err(Rejection::new(code, field, reason))
}

impl ValidationPolicy {
    fn id(&self, field: &str, v: &str) -> Check {
        if v.is_empty() {
            return fail(
                RejectCode::FieldMissing,
                field,
                format!("{field} is required"),
            );
        }
        if v.len() > self.max_id_len {
            return fail(
                RejectCode::IdInvalid,
                field,
                format!(
                    "{field} is {} bytes, at most {} allowed",
                    v.len(),
                    self.max_id_len
                ),
            );
        }
        if let Some(c) = v.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return fail(
                RejectCode::IdInvalid,
                field,
                format!(
                    "{field} contains {c:?}; whitespace and control characters are not allowed"
                ),
            );
        }
        Ok(())
    }

    fn optional_id(&self, field: &str, v: Option<&str>) -> Check {
        match v {
            Some(v) => self.id(field, v),
            None => Ok(()),
        }
    }

    fn text(&self, field: &str, v: &str) -> Check {
        if v.len() > self.max_text_len {
            return fail(
                RejectCode::TextTooLong,
                field,
                format!(
                    "{field} is {} bytes, at most {} allowed",
                    v.len(),
                    self.max_text_len
                ),
            );
        }
        Ok(())
    }

    fn customer(&self, v: &str) -> Check {
        const F: &str = "customer_id";
        if v.is_empty() {
            return fail(RejectCode::FieldMissing, F, "customer_id is required");
        }
        if v.len() > self.max_id_len {
            return fail(
                RejectCode::CustomerIdInvalid,
                F,
                format!(
                    "customer_id is {} bytes, at most {} allowed",
                    v.len(),
                    self.max_id_len
                ),
            );
        }
        if let Some(c) = v
            .chars()
            .find(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
        {
            return fail(
                RejectCode::CustomerIdInvalid,
                F,
                format!(
                    "customer_id contains {c:?}; it must be one NATS subject token (no '.', '*', '>', whitespace or control characters)"
                ),
            );
        }
        Ok(())
    }
}

fn score(field: &str, v: Option<u32>, lo: u32, hi: u32) -> Check {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => fail(
            RejectCode::ScoreOutOfRange,
            field,
            format!("{field} = {x} is outside {lo}..={hi}"),
        ),
        _ => Ok(()),
    }
}

fn finite_positive(field: &str, v: f64) -> Check {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        fail(
            RejectCode::ValueInvalid,
            field,
            format!("{field} = {v} must be finite and > 0"),
        )
    }
}

impl Event {
    /// Check every value rule of §3.3 that needs only the event itself and `now` (the ledger's
    /// clock at receipt). Rules that need the store (retraction targets, id conflicts) are
    /// checked at append.
    pub fn validate(&self, policy: &ValidationPolicy, now: Timestamp) -> Check {
        policy.id("event_id", &self.event_id)?;
        policy.customer(&self.customer_id)?;
        if self.schema_version != SCHEMA_VERSION {
            return fail(
                RejectCode::SchemaVersionUnsupported,
                "schema_version",
                format!(
                    "schema_version {} is not supported (this ledger reads {SCHEMA_VERSION})",
                    self.schema_version
                ),
            );
        }
        if self.source.is_empty() {
            return fail(RejectCode::FieldMissing, "source", "source is required");
        }
        if self.source.len() > policy.max_source_len
            || self
                .source
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return fail(
                RejectCode::SourceInvalid,
                "source",
                format!(
                    "source must be 1..={} bytes without whitespace or control characters",
                    policy.max_source_len
                ),
            );
        }
        let derived = self.kind().is_derived();
        if derived != (self.source == LEDGER_SOURCE) {
            return fail(
                RejectCode::SourceReserved,
                "source",
                if derived {
                    format!(
                        "{} events are written by the ledger itself (source \"{LEDGER_SOURCE}\")",
                        self.kind()
                    )
                } else {
                    format!("source \"{LEDGER_SOURCE}\" is reserved for events the ledger derives")
                },
            );
        }
        match (&self.payload, self.customer_id.starts_with('_')) {
            (Payload::ModelFitted(_) | Payload::ModelEvaluated(_), _)
                if self.customer_id != MODEL_CUSTOMER =>
            {
                return fail(
                    RejectCode::CustomerIdReserved,
                    "customer_id",
                    format!(
                        "{} events use customer_id \"{MODEL_CUSTOMER}\"",
                        self.kind()
                    ),
                );
            }
            (Payload::ModelFitted(_) | Payload::ModelEvaluated(_), _) => {}
            (_, true) => {
                return fail(
                    RejectCode::CustomerIdReserved,
                    "customer_id",
                    "customer ids starting with '_' are reserved for the ledger",
                );
            }
            _ => {}
        }
        if self.occurred_at < Timestamp::EPOCH {
            return fail(
                RejectCode::TimeBeforeEpoch,
                "occurred_at",
                format!("occurred_at {} is before 1970-01-01", self.occurred_at),
            );
        }
        let latest = now.saturating_add(policy.max_future_skew);
        if self.occurred_at > latest {
            return fail(
                RejectCode::TimeInFuture,
                "occurred_at",
                format!(
                    "occurred_at {} is after {latest} (ledger clock {now} + allowed skew {}s)",
                    self.occurred_at,
                    policy.max_future_skew.as_secs()
                ),
            );
        }
        policy.optional_id("correlation_id", self.correlation_id.as_deref())?;
        policy.optional_id("causation_id", self.causation_id.as_deref())?;
        match &self.payload {
            Payload::Purchase(p) => purchase(policy, p),
            Payload::Complaint(c) => complaint(policy, c),
            Payload::Callback(c) => callback(policy, c),
            Payload::Survey(s) => survey(policy, s),
            Payload::Retraction(r) => retraction(policy, r),
            Payload::ModelFitted(m) => model_fitted(policy, m),
            Payload::ChurnRiskAssessed(c) => churn_risk(policy, c),
            Payload::ModelEvaluated(m) => model_evaluated(policy, m),
        }
    }
}

fn currency(field: &str, c: &str) -> Check {
    if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        fail(
            RejectCode::CurrencyInvalid,
            field,
            format!("{field} {c:?} is not an ISO 4217 code (three upper-case letters)"),
        )
    }
}

fn purchase(policy: &ValidationPolicy, p: &Purchase) -> Check {
    policy.id("purchase.order_id", &p.order_id)?;
    if p.amount_minor < 0 {
        return fail(
            RejectCode::AmountNegative,
            "purchase.amount_minor",
            format!("amount_minor {} is negative", p.amount_minor),
        );
    }
    if p.amount_minor > policy.max_amount_minor {
        return fail(
            RejectCode::AmountTooLarge,
            "purchase.amount_minor",
            format!(
                "amount_minor {} is above the ceiling {}",
                p.amount_minor, policy.max_amount_minor
            ),
        );
    }
    currency("purchase.currency", &p.currency)?;
    if p.item_count == 0 {
        return fail(
            RejectCode::CountInvalid,
            "purchase.item_count",
            "item_count must be >= 1",
        );
    }
    policy.text("purchase.category", &p.category)
}

fn complaint(policy: &ValidationPolicy, c: &Complaint) -> Check {
    policy.id("complaint.complaint_id", &c.complaint_id)?;
    score("complaint.severity", Some(c.severity), 1, 5)?;
    policy.text("complaint.text", &c.text)
}

fn callback(policy: &ValidationPolicy, c: &Callback) -> Check {
    policy.id("callback.callback_id", &c.callback_id)?;
    policy.optional_id(
        "callback.related_complaint_id",
        c.related_complaint_id.as_deref(),
    )?;
    score(
        "callback.resolution_satisfaction",
        c.resolution_satisfaction,
        1,
        5,
    )?;
    policy.text("callback.note", &c.note)
}

fn survey(policy: &ValidationPolicy, s: &Survey) -> Check {
    policy.id("survey.survey_id", &s.survey_id)?;
    if s.expectation == Some(0) {
        return fail(
            RejectCode::ExpectationZero,
            "survey.expectation",
            "expectation a = 0: the satisfaction index C = b/a is undefined (scale is 1..=10)",
        );
    }
    match (s.expectation, s.performance) {
        (Some(_), None) | (None, Some(_)) => {
            return fail(
                RejectCode::SurveyPairIncomplete,
                if s.expectation.is_some() {
                    "survey.performance"
                } else {
                    "survey.expectation"
                },
                "expectation a and performance b are given together (C = b/a)",
            );
        }
        _ => {}
    }
    score("survey.expectation", s.expectation, 1, 10)?;
    score("survey.performance", s.performance, 1, 10)?;
    score("survey.csat", s.csat, 1, 5)?;
    score("survey.nps", s.nps, 0, 10)?;
    score("survey.ces", s.ces, 1, 7)?;
    score("survey.repurchase_intent", s.repurchase_intent, 1, 5)?;
    if let Some(n) = s.other_suppliers
        && n > 1000
    {
        return fail(
            RejectCode::CountInvalid,
            "survey.other_suppliers",
            format!("other_suppliers {n} is implausible (at most 1000)"),
        );
    }
    let answered = s.expectation.is_some()
        || s.csat.is_some()
        || s.nps.is_some()
        || s.ces.is_some()
        || s.repurchase_intent.is_some()
        || s.other_suppliers.is_some()
        || s.leaving_reason.is_some();
    if !answered {
        return fail(
            RejectCode::SurveyEmpty,
            "survey",
            "a survey needs at least one answer",
        );
    }
    policy.text("survey.text", &s.text)
}

fn retraction(policy: &ValidationPolicy, r: &Retraction) -> Check {
    policy.id("retraction.retracted_event_id", &r.retracted_event_id)?;
    policy.text("retraction.reason", &r.reason)
}

fn model_fitted(policy: &ValidationPolicy, m: &ModelFitted) -> Check {
    policy.id("model_fitted.model", &m.model)?;
    policy.id("model_fitted.model_version", &m.model_version)?;
    finite_positive("model_fitted.r", m.r)?;
    finite_positive("model_fitted.alpha", m.alpha)?;
    finite_positive("model_fitted.a", m.a)?;
    finite_positive("model_fitted.b", m.b)?;
    finite("model_fitted.log_likelihood", m.log_likelihood)?;
    if let Some(s) = &m.spend {
        currency("model_fitted.spend.currency", &s.currency)?;
        finite_positive("model_fitted.spend.p", s.p)?;
        finite_positive("model_fitted.spend.q", s.q)?;
        finite_positive("model_fitted.spend.gamma", s.gamma)?;
        finite("model_fitted.spend.log_likelihood", s.log_likelihood)?;
    }
    Ok(())
}

fn finite(field: &str, v: f64) -> Check {
    if v.is_finite() {
        Ok(())
    } else {
        fail(RejectCode::ValueInvalid, field, "must be finite")
    }
}

fn model_evaluated(policy: &ValidationPolicy, m: &ModelEvaluated) -> Check {
    policy.id("model_evaluated.model_version", &m.model_version)?;
    if m.holdout_end <= m.calibration_end {
        return fail(
            RejectCode::ValueInvalid,
            "model_evaluated.holdout_end",
            "must be after calibration_end",
        );
    }
    let share = |field: &str, v: f64| -> Check {
        if v.is_finite() && (0.0..=1.0).contains(&v) {
            Ok(())
        } else {
            fail(
                RejectCode::ValueInvalid,
                field,
                format!("{v} is outside 0..=1"),
            )
        }
    };
    if !(m.holdout_predicted.is_finite() && m.holdout_predicted >= 0.0) {
        return fail(
            RejectCode::ValueInvalid,
            "model_evaluated.holdout_predicted",
            "must be finite and >= 0",
        );
    }
    for (field, auc) in [
        ("model_evaluated.auc_score", m.auc_score),
        ("model_evaluated.auc_recency", m.auc_recency),
        ("model_evaluated.auc_model", m.auc_model),
    ] {
        if let Some(v) = auc {
            share(field, v)?;
        }
    }
    for t in &m.thresholds {
        share("model_evaluated.thresholds.precision", t.precision)?;
        share("model_evaluated.thresholds.recall", t.recall)?;
        if !(t.lift.is_finite() && t.lift >= 0.0) {
            return fail(
                RejectCode::ValueInvalid,
                "model_evaluated.thresholds.lift",
                "must be finite and >= 0",
            );
        }
    }
    Ok(())
}

fn churn_risk(policy: &ValidationPolicy, c: &ChurnRiskAssessed) -> Check {
    if !(c.score.is_finite() && (0.0..=1.0).contains(&c.score)) {
        return fail(
            RejectCode::ScoreOutOfRange,
            "churn_risk_assessed.score",
            format!("score {} is outside 0..=1", c.score),
        );
    }
    if c.value_at_risk_minor < 0 {
        return fail(
            RejectCode::AmountNegative,
            "churn_risk_assessed.value_at_risk_minor",
            "value at risk is negative",
        );
    }
    if !c.currency.is_empty() {
        currency("churn_risk_assessed.currency", &c.currency)?;
    }
    policy.id("churn_risk_assessed.model_version", &c.model_version)?;
    for (i, r) in c.reasons.iter().enumerate() {
        policy.id(&format!("churn_risk_assessed.reasons[{i}].code"), &r.code)?;
        policy.text(
            &format!("churn_risk_assessed.reasons[{i}].evidence"),
            &r.evidence,
        )?;
    }
    Ok(())
}
