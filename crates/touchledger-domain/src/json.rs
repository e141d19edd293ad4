//! The JSON form of an event, for files, the CLI and HTTP.
//!
//! Key decision: the JSON mirrors the protobuf `Envelope` field for field (snake_case names,
//! the `oneof` payload as one field named after the kind), so a producer can switch between the
//! two without relearning the shape. Unknown fields are refused, not ignored: a misspelt
//! `ocurred_at` must be an error, never a silently dropped value. Decoding maps serde's errors to
//! the stable rejection codes of [`crate::validate`].

use serde::{Deserialize, Serialize};

use crate::event::{
    Callback, ChurnRiskAssessed, Complaint, Event, ModelEvaluated, ModelFitted, Payload, Purchase,
    Retraction, Survey,
};
use crate::time::Timestamp;
use crate::validate::{RejectCode, Rejection};

/// Wire shape of the JSON form (see `docs/json-events.md`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonEvent {
    #[serde(default)]
    event_id: String,
    #[serde(default)]
    customer_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    occurred_at: Option<Timestamp>,
    #[serde(default)]
    source: String,
    #[serde(default)]
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    purchase: Option<Purchase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    complaint: Option<Complaint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    callback: Option<Callback>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    survey: Option<Survey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retraction: Option<Retraction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model_fitted: Option<ModelFitted>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    churn_risk_assessed: Option<ChurnRiskAssessed>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model_evaluated: Option<ModelEvaluated>,
}

impl TryFrom<JsonEvent> for Event {
    type Error = Rejection;

    fn try_from(j: JsonEvent) -> Result<Self, Rejection> {
        let mut payloads: Vec<Payload> = Vec::with_capacity(1);
        payloads.extend(j.purchase.map(Payload::Purchase));
        payloads.extend(j.complaint.map(Payload::Complaint));
        payloads.extend(j.callback.map(Payload::Callback));
        payloads.extend(j.survey.map(Payload::Survey));
        payloads.extend(j.retraction.map(Payload::Retraction));
        payloads.extend(j.model_fitted.map(Payload::ModelFitted));
        payloads.extend(j.churn_risk_assessed.map(Payload::ChurnRiskAssessed));
        payloads.extend(j.model_evaluated.map(Payload::ModelEvaluated));
        if payloads.len() > 1 {
            let kinds: Vec<_> = payloads.iter().map(|p| p.kind().as_str()).collect();
            return Err(Rejection::new(
                RejectCode::PayloadAmbiguous,
                "",
                format!("exactly one payload expected, found {}", kinds.join(", ")),
            ));
        }
        let payload = payloads.pop().ok_or_else(|| {
            Rejection::new(
                RejectCode::PayloadMissing,
                "",
                "no payload: expected one of purchase, complaint, callback, survey, retraction, \
                 model_fitted, churn_risk_assessed",
            )
        })?;
        let occurred_at = j.occurred_at.ok_or_else(|| {
            Rejection::new(
                RejectCode::FieldMissing,
                "occurred_at",
                "occurred_at is required",
            )
        })?;
        Ok(Event {
            event_id: j.event_id,
            customer_id: j.customer_id,
            occurred_at,
            source: j.source,
            schema_version: j.schema_version,
            correlation_id: j.correlation_id,
            causation_id: j.causation_id,
            payload,
        })
    }
}

impl From<Event> for JsonEvent {
    fn from(e: Event) -> Self {
        let mut j = JsonEvent {
            event_id: e.event_id,
            customer_id: e.customer_id,
            occurred_at: Some(e.occurred_at),
            source: e.source,
            schema_version: e.schema_version,
            correlation_id: e.correlation_id,
            causation_id: e.causation_id,
            ..JsonEvent::default()
        };
        match e.payload {
            Payload::Purchase(p) => j.purchase = Some(p),
            Payload::Complaint(p) => j.complaint = Some(p),
            Payload::Callback(p) => j.callback = Some(p),
            Payload::Survey(p) => j.survey = Some(p),
            Payload::Retraction(p) => j.retraction = Some(p),
            Payload::ModelFitted(p) => j.model_fitted = Some(p),
            Payload::ChurnRiskAssessed(p) => j.churn_risk_assessed = Some(p),
            Payload::ModelEvaluated(p) => j.model_evaluated = Some(p),
        }
        j
    }
}

/// Decode one JSON event (e.g. a JSON line). Structural problems become typed rejections;
/// value rules are checked later by [`Event::validate`](crate::validate).
pub fn parse_event(bytes: &[u8]) -> Result<Event, Rejection> {
    let j: JsonEvent = serde_json::from_slice(bytes).map_err(|e| classify(&e))?;
    Event::try_from(j)
}

/// Turn a serde_json error into the rejection code a producer can act on.
fn classify(e: &serde_json::Error) -> Rejection {
    let msg = e.to_string();
    let field = between_backticks(&msg).unwrap_or_default();
    let code = if e.is_syntax() || e.is_eof() || e.is_io() {
        RejectCode::DecodeFailed
    } else if msg.starts_with("missing field") {
        RejectCode::FieldMissing
    } else if msg.starts_with("unknown field") {
        RejectCode::FieldUnknown
    } else if msg.starts_with("unknown variant") {
        RejectCode::EnumInvalid
    } else if msg.starts_with("not an RFC 3339") {
        RejectCode::TimeInvalid
    } else {
        RejectCode::DecodeFailed
    };
    let field = if matches!(code, RejectCode::EnumInvalid) {
        String::new()
    } else {
        field
    };
    Rejection::new(code, field, msg)
}

fn between_backticks(s: &str) -> Option<String> {
    let start = s.find('`')? + 1;
    let len = s[start..].find('`')?;
    Some(s[start..start + len].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example_round_trips() {
        let line = r#"{"event_id":"01J9Z3","customer_id":"c-42","occurred_at":"2026-03-03T12:00:00Z","source":"shop","schema_version":1,"purchase":{"order_id":"o-1","amount_minor":1299,"currency":"EUR","item_count":2,"channel":"web","category":"music"}}"#;
        let e = parse_event(line.as_bytes()).expect("valid");
        assert_eq!(e.kind(), crate::EventKind::Purchase);
        assert_eq!(serde_json::to_string(&e).expect("serialises"), line);
    }

    #[test]
    fn structural_errors_have_codes() {
        let cases: &[(&str, RejectCode)] = &[
            ("{not json", RejectCode::DecodeFailed),
            (
                r#"{"event_id":"e","ocurred_at":"2026-01-01"}"#,
                RejectCode::FieldUnknown,
            ),
            (
                r#"{"event_id":"e","occurred_at":"2026-01-01","purchase":{"order_id":"o"}}"#,
                RejectCode::FieldMissing,
            ),
            (
                r#"{"event_id":"e","occurred_at":"2026-01-01","complaint":{"complaint_id":"k","category":"rude","severity":1}}"#,
                RejectCode::EnumInvalid,
            ),
            (
                r#"{"event_id":"e","occurred_at":"soon"}"#,
                RejectCode::TimeInvalid,
            ),
            (
                r#"{"event_id":"e","occurred_at":"2026-01-01"}"#,
                RejectCode::PayloadMissing,
            ),
            (
                r#"{"event_id":"e","occurred_at":"2026-01-01","retraction":{"retracted_event_id":"x"},"survey":{"survey_id":"s"}}"#,
                RejectCode::PayloadAmbiguous,
            ),
            (
                r#"{"event_id":"e","retraction":{"retracted_event_id":"x"}}"#,
                RejectCode::FieldMissing,
            ),
        ];
        for (input, code) in cases {
            let r = parse_event(input.as_bytes()).expect_err(input);
            assert_eq!(r.code, *code, "{input}: {r}");
        }
    }
}
