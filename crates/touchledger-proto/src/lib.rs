//! The only crate that knows protobuf: the generated types of `proto/touchledger/v1` and the
//! hand-written conversions between them and the domain types.
//!
//! Key decisions:
//! * Decoding (`TryFrom<v1::Envelope> for Event`) checks structure only — a payload is present,
//!   enums are known and specified, timestamps are valid — and reports problems as the domain's
//!   typed [`Rejection`]s. Value rules live in `Event::validate` so that every input path shares
//!   them.
//! * Encoding a domain event is canonical: the schema has no `map` fields, and prost writes
//!   fields in number order, so equal events encode to equal bytes. The store relies on this to
//!   tell an identical re-send (duplicate) from a same-id-different-content conflict.

use prost::Message;
use touchledger_domain as d;
use touchledger_domain::{RejectCode, Rejection, Timestamp};

/// Generated protobuf types, package `touchledger.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/touchledger.v1.rs"));
}

pub use prost;

pub mod views;

use v1::envelope::Payload as P;

/// Decode protobuf `Envelope` bytes into a domain event (structure only; see crate docs).
pub fn decode_event(bytes: &[u8]) -> Result<d::Event, Rejection> {
    let env = v1::Envelope::decode(bytes).map_err(|e| {
        Rejection::new(
            RejectCode::DecodeFailed,
            "",
            format!("not a touchledger.v1.Envelope: {e}"),
        )
    })?;
    d::Event::try_from(env)
}

/// Canonical protobuf encoding of a domain event.
pub fn encode_event(e: &d::Event) -> Vec<u8> {
    v1::Envelope::from(e).encode_to_vec()
}

/// The kind and customer id of a stored `StoredRecord`, read without decoding the rest (no
/// allocation): what the committed-event feed needs to build a record's subject. `None` if the
/// bytes are not a `StoredRecord` with an event that has a customer id and a payload.
pub fn peek_record(record: &[u8]) -> Option<(d::EventKind, &str)> {
    use prost::encoding::WireType;
    /// (field number, wire type, field bytes for length-delimited fields).
    fn fields(mut buf: &[u8]) -> impl Iterator<Item = Option<(u32, Option<&[u8]>)>> {
        std::iter::from_fn(move || {
            if buf.is_empty() {
                return None;
            }
            let field = (|| {
                let key = prost::encoding::decode_varint(&mut buf).ok()?;
                let (tag, wire) = (u32::try_from(key >> 3).ok()?, key & 7);
                match WireType::try_from(wire).ok()? {
                    WireType::Varint => {
                        prost::encoding::decode_varint(&mut buf).ok()?;
                        Some((tag, None))
                    }
                    WireType::SixtyFourBit => {
                        buf = buf.get(8..)?;
                        Some((tag, None))
                    }
                    WireType::ThirtyTwoBit => {
                        buf = buf.get(4..)?;
                        Some((tag, None))
                    }
                    WireType::LengthDelimited => {
                        let len =
                            usize::try_from(prost::encoding::decode_varint(&mut buf).ok()?).ok()?;
                        let (value, rest) = (buf.get(..len)?, buf.get(len..)?);
                        buf = rest;
                        Some((tag, Some(value)))
                    }
                    WireType::StartGroup | WireType::EndGroup => None,
                }
            })();
            if field.is_none() {
                // Malformed: stop after reporting it once.
                buf = &[];
            }
            Some(field)
        })
    }
    let mut envelope = None;
    for f in fields(record) {
        if let (5, Some(v)) = f? {
            envelope = Some(v);
        }
    }
    let (mut customer, mut kind) = (None, None);
    for f in fields(envelope?) {
        match f? {
            (2, Some(v)) => customer = Some(std::str::from_utf8(v).ok()?),
            // The payload oneof: tag 10 + the kind's index in `EventKind::ALL` (events.proto).
            (tag, Some(_)) if (10..10 + d::EventKind::ALL.len() as u32).contains(&tag) => {
                kind = d::EventKind::ALL.get(tag as usize - 10).copied()
            }
            _ => {}
        }
    }
    Some((kind?, customer.filter(|c| !c.is_empty())?))
}

/// Domain instant → protobuf timestamp.
pub fn to_pb_time(t: Timestamp) -> prost_types::Timestamp {
    let (seconds, nanos) = t.to_parts();
    prost_types::Timestamp { seconds, nanos }
}

/// Protobuf timestamp → domain instant, with a typed rejection naming `field`.
pub fn from_pb_time(
    field: &str,
    t: Option<prost_types::Timestamp>,
) -> Result<Timestamp, Rejection> {
    let t = t.ok_or_else(|| {
        Rejection::new(
            RejectCode::FieldMissing,
            field,
            format!("{field} is required"),
        )
    })?;
    Timestamp::from_parts(t.seconds, t.nanos).ok_or_else(|| {
        Rejection::new(
            RejectCode::TimeInvalid,
            field,
            format!(
                "{field} {{seconds: {}, nanos: {}}} is not a representable instant",
                t.seconds, t.nanos
            ),
        )
    })
}

fn opt_time(
    field: &str,
    t: Option<prost_types::Timestamp>,
) -> Result<Option<Timestamp>, Rejection> {
    t.map(|t| from_pb_time(field, Some(t))).transpose()
}

fn opt_str(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

/// Map a wire enum value to a domain enum. `0` (UNSPECIFIED) → `Ok(None)`; unknown → rejection.
fn wire_enum<W, D>(
    field: &str,
    raw: i32,
    map: impl Fn(W) -> Option<D>,
) -> Result<Option<D>, Rejection>
where
    W: TryFrom<i32>,
{
    if raw == 0 {
        return Ok(None);
    }
    W::try_from(raw)
        .ok()
        .and_then(map)
        .map(Some)
        .ok_or_else(|| {
            Rejection::new(
                RejectCode::EnumInvalid,
                field,
                format!("{field} = {raw} is not a known value"),
            )
        })
}

fn required<T>(field: &str, v: Option<T>) -> Result<T, Rejection> {
    v.ok_or_else(|| {
        Rejection::new(
            RejectCode::FieldMissing,
            field,
            format!("{field} is required (0 = unspecified)"),
        )
    })
}

fn channel(field: &str, raw: i32) -> Result<Option<d::Channel>, Rejection> {
    use v1::Channel as W;
    wire_enum(field, raw, |w: W| match w {
        W::Unspecified => None,
        W::Web => Some(d::Channel::Web),
        W::App => Some(d::Channel::App),
        W::Store => Some(d::Channel::Store),
        W::Phone => Some(d::Channel::Phone),
        W::Email => Some(d::Channel::Email),
        W::Chat => Some(d::Channel::Chat),
        W::Social => Some(d::Channel::Social),
        W::Other => Some(d::Channel::Other),
    })
}

fn channel_to(c: Option<d::Channel>) -> i32 {
    use v1::Channel as W;
    (match c {
        None => W::Unspecified,
        Some(d::Channel::Web) => W::Web,
        Some(d::Channel::App) => W::App,
        Some(d::Channel::Store) => W::Store,
        Some(d::Channel::Phone) => W::Phone,
        Some(d::Channel::Email) => W::Email,
        Some(d::Channel::Chat) => W::Chat,
        Some(d::Channel::Social) => W::Social,
        Some(d::Channel::Other) => W::Other,
    }) as i32
}

fn leaving(field: &str, raw: i32) -> Result<Option<d::LeavingReason>, Rejection> {
    use v1::LeavingReason as W;
    wire_enum(field, raw, |w: W| match w {
        W::Unspecified => None,
        W::Natural => Some(d::LeavingReason::Natural),
        W::NeedChange => Some(d::LeavingReason::NeedChange),
        W::Competitor => Some(d::LeavingReason::Competitor),
        W::Disappointment => Some(d::LeavingReason::Disappointment),
    })
}

fn leaving_to(r: Option<d::LeavingReason>) -> i32 {
    use v1::LeavingReason as W;
    (match r {
        None => W::Unspecified,
        Some(d::LeavingReason::Natural) => W::Natural,
        Some(d::LeavingReason::NeedChange) => W::NeedChange,
        Some(d::LeavingReason::Competitor) => W::Competitor,
        Some(d::LeavingReason::Disappointment) => W::Disappointment,
    }) as i32
}

fn level(field: &str, raw: i32) -> Result<d::ChurnLevel, Rejection> {
    use v1::ChurnLevel as W;
    required(
        field,
        wire_enum(field, raw, |w: W| match w {
            W::Unspecified => None,
            W::None => Some(d::ChurnLevel::None),
            W::Watch => Some(d::ChurnLevel::Watch),
            W::Warning => Some(d::ChurnLevel::Warning),
            W::Critical => Some(d::ChurnLevel::Critical),
            W::Lost => Some(d::ChurnLevel::Lost),
        })?,
    )
}

fn level_to(l: d::ChurnLevel) -> i32 {
    use v1::ChurnLevel as W;
    (match l {
        d::ChurnLevel::None => W::None,
        d::ChurnLevel::Watch => W::Watch,
        d::ChurnLevel::Warning => W::Warning,
        d::ChurnLevel::Critical => W::Critical,
        d::ChurnLevel::Lost => W::Lost,
    }) as i32
}

pub(crate) fn risk_reason_to(r: &d::RiskReason) -> v1::RiskReason {
    v1::RiskReason {
        code: r.code.clone(),
        level: level_to(r.level),
        evidence: r.evidence.clone(),
        threshold: r.threshold.clone(),
    }
}

impl TryFrom<v1::Envelope> for d::Event {
    type Error = Rejection;

    fn try_from(e: v1::Envelope) -> Result<Self, Rejection> {
        let payload = match e.payload {
            None => {
                return Err(Rejection::new(
                    RejectCode::PayloadMissing,
                    "",
                    "no payload (or a payload kind this ledger does not know)",
                ));
            }
            Some(p) => payload_from(p)?,
        };
        Ok(d::Event {
            event_id: e.event_id,
            customer_id: e.customer_id,
            occurred_at: from_pb_time("occurred_at", e.occurred_at)?,
            source: e.source,
            schema_version: e.schema_version,
            correlation_id: opt_str(e.correlation_id),
            causation_id: opt_str(e.causation_id),
            payload,
        })
    }
}

fn payload_from(p: P) -> Result<d::Payload, Rejection> {
    Ok(match p {
        P::Purchase(p) => d::Payload::Purchase(d::Purchase {
            order_id: p.order_id,
            amount_minor: p.amount_minor,
            currency: p.currency,
            item_count: p.item_count,
            channel: channel("purchase.channel", p.channel)?,
            category: p.category,
        }),
        P::Complaint(c) => {
            use v1::ComplaintCategory as W;
            let f = "complaint.category";
            let category = required(
                f,
                wire_enum(f, c.category, |w: W| match w {
                    W::Unspecified => None,
                    W::ProductQuality => Some(d::ComplaintCategory::ProductQuality),
                    W::ServiceAttitude => Some(d::ComplaintCategory::ServiceAttitude),
                    W::Delivery => Some(d::ComplaintCategory::Delivery),
                    W::Price => Some(d::ComplaintCategory::Price),
                    W::Billing => Some(d::ComplaintCategory::Billing),
                    W::Other => Some(d::ComplaintCategory::Other),
                })?,
            )?;
            d::Payload::Complaint(d::Complaint {
                complaint_id: c.complaint_id,
                category,
                severity: c.severity,
                channel: channel("complaint.channel", c.channel)?,
                text: c.text,
            })
        }
        P::Callback(c) => {
            use v1::{CallbackOutcome as O, CallbackPurpose as U};
            let fp = "callback.purpose";
            let purpose = required(
                fp,
                wire_enum(fp, c.purpose, |w: U| match w {
                    U::Unspecified => None,
                    U::ComplaintFollowUp => Some(d::CallbackPurpose::ComplaintFollowUp),
                    U::RoutineCare => Some(d::CallbackPurpose::RoutineCare),
                    U::SatisfactionCheck => Some(d::CallbackPurpose::SatisfactionCheck),
                    U::WinBack => Some(d::CallbackPurpose::WinBack),
                })?,
            )?;
            let fo = "callback.outcome";
            let outcome = required(
                fo,
                wire_enum(fo, c.outcome, |w: O| match w {
                    O::Unspecified => None,
                    O::Reached => Some(d::CallbackOutcome::Reached),
                    O::NoAnswer => Some(d::CallbackOutcome::NoAnswer),
                    O::Refused => Some(d::CallbackOutcome::Refused),
                    O::ComplaintResolved => Some(d::CallbackOutcome::ComplaintResolved),
                    O::ComplaintUnresolved => Some(d::CallbackOutcome::ComplaintUnresolved),
                })?,
            )?;
            d::Payload::Callback(d::Callback {
                callback_id: c.callback_id,
                purpose,
                related_complaint_id: opt_str(c.related_complaint_id),
                outcome,
                resolution_satisfaction: c.resolution_satisfaction,
                leaving_reason: leaving("callback.leaving_reason", c.leaving_reason)?,
                note: c.note,
            })
        }
        P::Survey(s) => d::Payload::Survey(d::Survey {
            survey_id: s.survey_id,
            expectation: s.expectation,
            performance: s.performance,
            csat: s.csat,
            nps: s.nps,
            ces: s.ces,
            repurchase_intent: s.repurchase_intent,
            other_suppliers: s.other_suppliers,
            leaving_reason: leaving("survey.leaving_reason", s.leaving_reason)?,
            text: s.text,
        }),
        P::Retraction(r) => d::Payload::Retraction(d::Retraction {
            retracted_event_id: r.retracted_event_id,
            reason: r.reason,
        }),
        P::ModelFitted(m) => {
            use v1::TimeUnit as W;
            let f = "model_fitted.time_unit";
            let time_unit = required(
                f,
                wire_enum(f, m.time_unit, |w: W| match w {
                    W::Unspecified => None,
                    W::Days => Some(d::TimeUnit::Days),
                    W::Weeks => Some(d::TimeUnit::Weeks),
                })?,
            )?;
            d::Payload::ModelFitted(d::ModelFitted {
                model: m.model,
                model_version: m.model_version,
                r: m.r,
                alpha: m.alpha,
                a: m.a,
                b: m.b,
                log_likelihood: m.log_likelihood,
                customers: m.customers,
                time_unit,
                calibration_end: from_pb_time("model_fitted.calibration_end", m.calibration_end)?,
                spend: m.spend.map(|s| d::SpendModel {
                    currency: s.currency,
                    p: s.p,
                    q: s.q,
                    gamma: s.gamma,
                    log_likelihood: s.log_likelihood,
                    customers: s.customers,
                }),
            })
        }
        P::ModelEvaluated(m) => {
            let thresholds = m
                .thresholds
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    Ok(d::EvaluatedThreshold {
                        at_least: level(
                            &format!("model_evaluated.thresholds[{i}].at_least"),
                            t.at_least,
                        )?,
                        flagged: t.flagged,
                        precision: t.precision,
                        recall: t.recall,
                        lift: t.lift,
                    })
                })
                .collect::<Result<Vec<_>, Rejection>>()?;
            d::Payload::ModelEvaluated(d::ModelEvaluated {
                model_version: m.model_version,
                calibration_end: from_pb_time(
                    "model_evaluated.calibration_end",
                    m.calibration_end,
                )?,
                holdout_end: from_pb_time("model_evaluated.holdout_end", m.holdout_end)?,
                customers: m.customers,
                holdout_actual: m.holdout_actual,
                holdout_predicted: m.holdout_predicted,
                churned: m.churned,
                thresholds,
                auc_score: m.auc_score,
                auc_recency: m.auc_recency,
                auc_model: m.auc_model,
            })
        }
        P::ChurnRiskAssessed(c) => {
            let reasons = c
                .reasons
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    Ok(d::RiskReason {
                        code: r.code,
                        level: level(&format!("churn_risk_assessed.reasons[{i}].level"), r.level)?,
                        evidence: r.evidence,
                        threshold: r.threshold,
                    })
                })
                .collect::<Result<Vec<_>, Rejection>>()?;
            d::Payload::ChurnRiskAssessed(d::ChurnRiskAssessed {
                level: level("churn_risk_assessed.level", c.level)?,
                previous_level: level("churn_risk_assessed.previous_level", c.previous_level)?,
                score: c.score,
                reasons,
                probable_cause: leaving("churn_risk_assessed.probable_cause", c.probable_cause)?,
                since: opt_time("churn_risk_assessed.since", c.since)?,
                expected_next_purchase: opt_time(
                    "churn_risk_assessed.expected_next_purchase",
                    c.expected_next_purchase,
                )?,
                value_at_risk_minor: c.value_at_risk_minor,
                currency: c.currency,
                model_version: c.model_version,
                as_of: from_pb_time("churn_risk_assessed.as_of", c.as_of)?,
            })
        }
    })
}

impl From<&d::Event> for v1::Envelope {
    fn from(e: &d::Event) -> Self {
        v1::Envelope {
            event_id: e.event_id.clone(),
            customer_id: e.customer_id.clone(),
            occurred_at: Some(to_pb_time(e.occurred_at)),
            source: e.source.clone(),
            schema_version: e.schema_version,
            correlation_id: e.correlation_id.clone().unwrap_or_default(),
            causation_id: e.causation_id.clone().unwrap_or_default(),
            payload: Some(payload_to(&e.payload)),
        }
    }
}

fn payload_to(p: &d::Payload) -> P {
    match p {
        d::Payload::Purchase(p) => P::Purchase(v1::Purchase {
            order_id: p.order_id.clone(),
            amount_minor: p.amount_minor,
            currency: p.currency.clone(),
            item_count: p.item_count,
            channel: channel_to(p.channel),
            category: p.category.clone(),
        }),
        d::Payload::Complaint(c) => {
            use v1::ComplaintCategory as W;
            let category = match c.category {
                d::ComplaintCategory::ProductQuality => W::ProductQuality,
                d::ComplaintCategory::ServiceAttitude => W::ServiceAttitude,
                d::ComplaintCategory::Delivery => W::Delivery,
                d::ComplaintCategory::Price => W::Price,
                d::ComplaintCategory::Billing => W::Billing,
                d::ComplaintCategory::Other => W::Other,
            };
            P::Complaint(v1::Complaint {
                complaint_id: c.complaint_id.clone(),
                category: category as i32,
                severity: c.severity,
                channel: channel_to(c.channel),
                text: c.text.clone(),
            })
        }
        d::Payload::Callback(c) => {
            use v1::{CallbackOutcome as O, CallbackPurpose as U};
            let purpose = match c.purpose {
                d::CallbackPurpose::ComplaintFollowUp => U::ComplaintFollowUp,
                d::CallbackPurpose::RoutineCare => U::RoutineCare,
                d::CallbackPurpose::SatisfactionCheck => U::SatisfactionCheck,
                d::CallbackPurpose::WinBack => U::WinBack,
            };
            let outcome = match c.outcome {
                d::CallbackOutcome::Reached => O::Reached,
                d::CallbackOutcome::NoAnswer => O::NoAnswer,
                d::CallbackOutcome::Refused => O::Refused,
                d::CallbackOutcome::ComplaintResolved => O::ComplaintResolved,
                d::CallbackOutcome::ComplaintUnresolved => O::ComplaintUnresolved,
            };
            P::Callback(v1::Callback {
                callback_id: c.callback_id.clone(),
                purpose: purpose as i32,
                related_complaint_id: c.related_complaint_id.clone().unwrap_or_default(),
                outcome: outcome as i32,
                resolution_satisfaction: c.resolution_satisfaction,
                leaving_reason: leaving_to(c.leaving_reason),
                note: c.note.clone(),
            })
        }
        d::Payload::Survey(s) => P::Survey(v1::Survey {
            survey_id: s.survey_id.clone(),
            expectation: s.expectation,
            performance: s.performance,
            csat: s.csat,
            nps: s.nps,
            ces: s.ces,
            repurchase_intent: s.repurchase_intent,
            other_suppliers: s.other_suppliers,
            leaving_reason: leaving_to(s.leaving_reason),
            text: s.text.clone(),
        }),
        d::Payload::Retraction(r) => P::Retraction(v1::Retraction {
            retracted_event_id: r.retracted_event_id.clone(),
            reason: r.reason.clone(),
        }),
        d::Payload::ModelFitted(m) => P::ModelFitted(v1::ModelFitted {
            model: m.model.clone(),
            model_version: m.model_version.clone(),
            r: m.r,
            alpha: m.alpha,
            a: m.a,
            b: m.b,
            log_likelihood: m.log_likelihood,
            customers: m.customers,
            time_unit: match m.time_unit {
                d::TimeUnit::Days => v1::TimeUnit::Days,
                d::TimeUnit::Weeks => v1::TimeUnit::Weeks,
            } as i32,
            calibration_end: Some(to_pb_time(m.calibration_end)),
            spend: m.spend.as_ref().map(|s| v1::SpendModel {
                currency: s.currency.clone(),
                p: s.p,
                q: s.q,
                gamma: s.gamma,
                log_likelihood: s.log_likelihood,
                customers: s.customers,
            }),
        }),
        d::Payload::ModelEvaluated(m) => P::ModelEvaluated(v1::ModelEvaluated {
            model_version: m.model_version.clone(),
            calibration_end: Some(to_pb_time(m.calibration_end)),
            holdout_end: Some(to_pb_time(m.holdout_end)),
            customers: m.customers,
            holdout_actual: m.holdout_actual,
            holdout_predicted: m.holdout_predicted,
            churned: m.churned,
            thresholds: m
                .thresholds
                .iter()
                .map(|t| v1::EvaluatedThreshold {
                    at_least: level_to(t.at_least),
                    flagged: t.flagged,
                    precision: t.precision,
                    recall: t.recall,
                    lift: t.lift,
                })
                .collect(),
            auc_score: m.auc_score,
            auc_recency: m.auc_recency,
            auc_model: m.auc_model,
        }),
        d::Payload::ChurnRiskAssessed(c) => P::ChurnRiskAssessed(v1::ChurnRiskAssessed {
            level: level_to(c.level),
            previous_level: level_to(c.previous_level),
            score: c.score,
            reasons: c.reasons.iter().map(risk_reason_to).collect(),
            probable_cause: leaving_to(c.probable_cause),
            since: c.since.map(to_pb_time),
            expected_next_purchase: c.expected_next_purchase.map(to_pb_time),
            value_at_risk_minor: c.value_at_risk_minor,
            currency: c.currency.clone(),
            model_version: c.model_version.clone(),
            as_of: Some(to_pb_time(c.as_of)),
        }),
    }
}

impl From<&Rejection> for v1::Rejection {
    fn from(r: &Rejection) -> Self {
        v1::Rejection {
            code: r.code.as_str().to_owned(),
            field: r.field.clone(),
            reason: r.reason.clone(),
        }
    }
}

/// A wire rejection whose code this build does not know (sent by a newer ledger).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown rejection code {0:?}")]
pub struct UnknownCode(pub String);

impl TryFrom<v1::Rejection> for Rejection {
    type Error = UnknownCode;
    fn try_from(r: v1::Rejection) -> Result<Self, UnknownCode> {
        let code = RejectCode::parse(&r.code).ok_or(UnknownCode(r.code))?;
        Ok(Rejection::new(code, r.field, r.reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ModelFitted` as it was before the spend model (fields 1–10), declared here as the
    /// schema of the events already recorded.
    #[derive(Clone, PartialEq, prost::Message)]
    struct ModelFittedBeforeSpend {
        #[prost(string, tag = "1")]
        model: String,
        #[prost(string, tag = "2")]
        model_version: String,
        #[prost(double, tag = "3")]
        r: f64,
        #[prost(double, tag = "4")]
        alpha: f64,
        #[prost(double, tag = "5")]
        a: f64,
        #[prost(double, tag = "6")]
        b: f64,
        #[prost(double, tag = "7")]
        log_likelihood: f64,
        #[prost(uint64, tag = "8")]
        customers: u64,
        #[prost(enumeration = "v1::TimeUnit", tag = "9")]
        time_unit: i32,
        #[prost(message, optional, tag = "10")]
        calibration_end: Option<prost_types::Timestamp>,
    }

    #[test]
    fn a_fit_without_a_spend_model_has_the_bytes_of_the_schema_before_it() {
        use prost::Message;
        let fit = d::ModelFitted {
            model: "bgnbd".into(),
            model_version: "bgnbd-1997-09-30-weeks-9867290ccb83".into(),
            r: 0.2426,
            alpha: 4.4136,
            a: 0.7929,
            b: 2.4258,
            log_likelihood: -9582.43,
            customers: 2357,
            time_unit: d::TimeUnit::Weeks,
            calibration_end: "1997-09-30T00:00:00Z".parse().expect("time"),
            spend: None,
        };
        let e = d::Event {
            payload: d::Payload::ModelFitted(fit.clone()),
            customer_id: d::MODEL_CUSTOMER.into(),
            ..purchase()
        };
        let v1::envelope::Payload::ModelFitted(now) =
            v1::Envelope::from(&e).payload.expect("payload")
        else {
            panic!("not a fit")
        };
        let before = ModelFittedBeforeSpend {
            model: fit.model.clone(),
            model_version: fit.model_version.clone(),
            r: fit.r,
            alpha: fit.alpha,
            a: fit.a,
            b: fit.b,
            log_likelihood: fit.log_likelihood,
            customers: fit.customers,
            time_unit: v1::TimeUnit::Weeks as i32,
            calibration_end: Some(to_pb_time(fit.calibration_end)),
        };
        // Old events keep their bytes (and so their hashes), and decode to "no spend model".
        assert_eq!(now.encode_to_vec(), before.encode_to_vec());
        let decoded = v1::ModelFitted::decode(before.encode_to_vec().as_slice()).expect("old");
        assert_eq!(decoded.spend, None);
        // With one, the bytes are the old ones followed by field 11.
        let mut with = now.clone();
        with.spend = Some(v1::SpendModel {
            currency: "USD".into(),
            p: 6.25,
            q: 3.74,
            gamma: 1544.0,
            log_likelihood: -8412.4,
            customers: 946,
        });
        let bytes = with.encode_to_vec();
        assert!(bytes.starts_with(&before.encode_to_vec()));
        assert_eq!(bytes[before.encode_to_vec().len()], (11 << 3) | 2);
    }

    fn purchase() -> d::Event {
        d::Event {
            event_id: "e1".into(),
            customer_id: "c1".into(),
            occurred_at: "2026-03-03T12:00:00.5Z".parse().expect("time"),
            source: "shop".into(),
            schema_version: 1,
            correlation_id: Some("corr".into()),
            causation_id: None,
            payload: d::Payload::Purchase(d::Purchase {
                order_id: "o1".into(),
                amount_minor: 1299,
                currency: "EUR".into(),
                item_count: 2,
                channel: Some(d::Channel::Web),
                category: "music".into(),
            }),
        }
    }

    #[test]
    fn peek_reads_kind_and_customer_of_a_stored_record() {
        let mut e = purchase();
        let record = |e: &d::Event| {
            v1::StoredRecord {
                position: 7,
                customer_version: 3,
                prev_hash: vec![9; 32],
                recorded_at: Some(to_pb_time(e.occurred_at)),
                event: Some(v1::Envelope::from(e)),
            }
            .encode_to_vec()
        };
        assert_eq!(
            peek_record(&record(&e)),
            Some((d::EventKind::Purchase, "c1"))
        );
        e.customer_id = "cust-42".into();
        e.payload = d::Payload::Retraction(d::Retraction {
            retracted_event_id: "e0".into(),
            reason: "typo".into(),
        });
        assert_eq!(
            peek_record(&record(&e)),
            Some((d::EventKind::Retraction, "cust-42"))
        );
        // The last kind of the oneof (tag 17), whatever the envelope's other fields.
        e.customer_id = d::MODEL_CUSTOMER.into();
        e.payload = d::Payload::ModelEvaluated(d::ModelEvaluated {
            model_version: "bgnbd-1997-09-30-weeks-0123456789ab".into(),
            calibration_end: Timestamp::from_unix_nanos(875_577_600_000_000_000),
            holdout_end: Timestamp::from_unix_nanos(899_164_800_000_000_000),
            customers: 2357,
            holdout_actual: 1882,
            holdout_predicted: 1653.4,
            churned: 1673,
            thresholds: vec![d::EvaluatedThreshold {
                at_least: d::ChurnLevel::Warning,
                flagged: 1850,
                precision: 0.8,
                recall: 0.9,
                lift: 1.1,
            }],
            auc_score: Some(0.75),
            auc_recency: None,
            auc_model: Some(0.76),
        });
        e.correlation_id = Some("corr".into());
        assert_eq!(
            peek_record(&record(&e)),
            Some((d::EventKind::ModelEvaluated, d::MODEL_CUSTOMER))
        );
        let wire = encode_event(&e);
        assert_eq!(decode_event(&wire).expect("decode"), e);
        let bytes = record(&e);
        assert_eq!(peek_record(&bytes[..bytes.len() - 3]), None);
        assert_eq!(peek_record(b"\xff\xff\xff"), None);
        assert_eq!(peek_record(&[]), None);
    }

    #[test]
    fn encode_decode_round_trip_and_is_canonical() {
        let e = purchase();
        let bytes = encode_event(&e);
        let back = decode_event(&bytes).expect("decodes");
        assert_eq!(back, e);
        assert_eq!(encode_event(&back), bytes);
    }

    #[test]
    fn structural_errors_are_typed() {
        assert_eq!(
            decode_event(b"\xff\xff\xff").expect_err("garbage").code,
            RejectCode::DecodeFailed
        );
        let mut env = v1::Envelope::from(&purchase());
        env.payload = None;
        assert_eq!(
            d::Event::try_from(env).expect_err("no payload").code,
            RejectCode::PayloadMissing
        );
        let mut env = v1::Envelope::from(&purchase());
        if let Some(P::Purchase(p)) = env.payload.as_mut() {
            p.channel = 99;
        }
        let r = d::Event::try_from(env).expect_err("bad enum");
        assert_eq!(
            (r.code, r.field.as_str()),
            (RejectCode::EnumInvalid, "purchase.channel")
        );
        let mut env = v1::Envelope::from(&purchase());
        env.occurred_at = Some(prost_types::Timestamp {
            seconds: 1,
            nanos: -3,
        });
        assert_eq!(
            d::Event::try_from(env).expect_err("bad time").code,
            RejectCode::TimeInvalid
        );
        let mut env = v1::Envelope::from(&purchase());
        env.occurred_at = None;
        assert_eq!(
            d::Event::try_from(env).expect_err("no time").code,
            RejectCode::FieldMissing
        );
    }
}
