//! One row per rejection code (§3.3), through the real append path: JSON line → decode →
//! store append. Each rejected input must come back with its code and be kept, raw, in the
//! rejections record. Boundary rows that must be *accepted* keep the rules from over-reaching.

use serde_json::{Value, json};
use touchledger_domain::{RejectCode, json::parse_event};
use touchledger_store::{AppendItem, AppendOutcome, EventStore, rejection_record};

use crate::support::{purchase, temp_store};

fn base() -> Value {
    json!({
        "event_id": "e-new",
        "customer_id": "c1",
        "occurred_at": "2026-05-01T10:00:00Z",
        "source": "shop",
        "schema_version": 1,
        "purchase": {"order_id": "o-1", "amount_minor": 1299, "currency": "EUR", "item_count": 1, "channel": "web"}
    })
}

fn with(edit: impl FnOnce(&mut Value)) -> String {
    let mut v = base();
    edit(&mut v);
    v.to_string()
}

fn survey(s: Value) -> String {
    with(|v| {
        let o = v.as_object_mut().expect("object");
        o.remove("purchase");
        o.insert("survey".into(), s);
    })
}

/// (name, JSON line, expected code or None = accepted)
fn rows() -> Vec<(&'static str, String, Option<RejectCode>)> {
    use RejectCode::*;
    vec![
        ("garbage", "{not json".into(), Some(DecodeFailed)),
        (
            "typo field",
            with(|v| v["ocurred_at"] = json!("2026-01-01")),
            Some(FieldUnknown),
        ),
        (
            "empty event id",
            with(|v| v["event_id"] = json!("")),
            Some(FieldMissing),
        ),
        (
            "missing currency",
            with(|v| {
                v["purchase"].as_object_mut().expect("o").remove("currency");
            }),
            Some(FieldMissing),
        ),
        (
            "no payload",
            with(|v| {
                v.as_object_mut().expect("o").remove("purchase");
            }),
            Some(PayloadMissing),
        ),
        (
            "two payloads",
            with(|v| v["survey"] = json!({"survey_id": "s", "nps": 5})),
            Some(PayloadAmbiguous),
        ),
        (
            "unknown channel",
            with(|v| v["purchase"]["channel"] = json!("pigeon")),
            Some(EnumInvalid),
        ),
        (
            "event id with space",
            with(|v| v["event_id"] = json!("e 1")),
            Some(IdInvalid),
        ),
        (
            "event id too long",
            with(|v| v["event_id"] = json!("x".repeat(129))),
            Some(IdInvalid),
        ),
        (
            "customer with dot",
            with(|v| v["customer_id"] = json!("a.b")),
            Some(CustomerIdInvalid),
        ),
        (
            "customer with star",
            with(|v| v["customer_id"] = json!("a*")),
            Some(CustomerIdInvalid),
        ),
        (
            "customer with gt",
            with(|v| v["customer_id"] = json!("a>")),
            Some(CustomerIdInvalid),
        ),
        (
            "customer with tab",
            with(|v| v["customer_id"] = json!("a\tb")),
            Some(CustomerIdInvalid),
        ),
        (
            "customer too long",
            with(|v| v["customer_id"] = json!("c".repeat(129))),
            Some(CustomerIdInvalid),
        ),
        (
            "customer max length",
            with(|v| {
                v["customer_id"] = json!("c".repeat(128));
                v["event_id"] = json!("ok-len")
            }),
            None,
        ),
        (
            "reserved customer",
            with(|v| v["customer_id"] = json!("_system")),
            Some(CustomerIdReserved),
        ),
        (
            "bad date",
            with(|v| v["occurred_at"] = json!("2026-13-01")),
            Some(TimeInvalid),
        ),
        (
            "before epoch",
            with(|v| v["occurred_at"] = json!("1969-12-31T23:59:59Z")),
            Some(TimeBeforeEpoch),
        ),
        (
            "epoch itself",
            with(|v| {
                v["occurred_at"] = json!("1970-01-01T00:00:00Z");
                v["event_id"] = json!("ok-epoch")
            }),
            None,
        ),
        (
            "future beyond skew",
            with(|v| v["occurred_at"] = json!("2026-06-02T00:00:01Z")),
            Some(TimeInFuture),
        ),
        (
            "future within skew",
            with(|v| {
                v["occurred_at"] = json!("2026-06-02T00:00:00Z");
                v["event_id"] = json!("ok-skew")
            }),
            None,
        ),
        (
            "source with space",
            with(|v| v["source"] = json!("my shop")),
            Some(SourceInvalid),
        ),
        (
            "ledger source on purchase",
            with(|v| v["source"] = json!("ledger")),
            Some(SourceReserved),
        ),
        (
            "schema v2",
            with(|v| v["schema_version"] = json!(2)),
            Some(SchemaVersionUnsupported),
        ),
        (
            "negative amount",
            with(|v| v["purchase"]["amount_minor"] = json!(-1)),
            Some(AmountNegative),
        ),
        (
            "amount of i64::MAX",
            with(|v| v["purchase"]["amount_minor"] = json!(i64::MAX)),
            Some(AmountTooLarge),
        ),
        (
            "amount just above the ceiling",
            with(|v| v["purchase"]["amount_minor"] = json!(1_000_000_000_001_i64)),
            Some(AmountTooLarge),
        ),
        (
            "amount at the ceiling",
            with(|v| {
                v["purchase"]["amount_minor"] = json!(1_000_000_000_000_i64);
                v["event_id"] = json!("ok-ceiling")
            }),
            None,
        ),
        (
            "zero amount",
            with(|v| {
                v["purchase"]["amount_minor"] = json!(0);
                v["event_id"] = json!("ok-zero")
            }),
            None,
        ),
        (
            "lower-case currency",
            with(|v| v["purchase"]["currency"] = json!("eur")),
            Some(CurrencyInvalid),
        ),
        (
            "zero items",
            with(|v| v["purchase"]["item_count"] = json!(0)),
            Some(CountInvalid),
        ),
        (
            "nps 11",
            survey(json!({"survey_id": "s", "nps": 11})),
            Some(ScoreOutOfRange),
        ),
        (
            "csat 0",
            survey(json!({"survey_id": "s", "csat": 0})),
            Some(ScoreOutOfRange),
        ),
        (
            "ces 8",
            survey(json!({"survey_id": "s", "ces": 8})),
            Some(ScoreOutOfRange),
        ),
        (
            "b 11",
            survey(json!({"survey_id": "s", "expectation": 5, "performance": 11})),
            Some(ScoreOutOfRange),
        ),
        (
            "nps 0 and 10 bounds",
            survey(
                json!({"survey_id": "s", "nps": 0, "csat": 5, "ces": 7, "repurchase_intent": 1}),
            )
            .replace("e-new", "ok-bounds"),
            None,
        ),
        (
            "a = 0",
            survey(json!({"survey_id": "s", "expectation": 0, "performance": 5})),
            Some(ExpectationZero),
        ),
        (
            "a without b",
            survey(json!({"survey_id": "s", "expectation": 5})),
            Some(SurveyPairIncomplete),
        ),
        (
            "empty survey",
            survey(json!({"survey_id": "s"})),
            Some(SurveyEmpty),
        ),
        (
            "long complaint",
            with(|v| {
                let o = v.as_object_mut().expect("o");
                o.remove("purchase");
                o.insert("complaint".into(), json!({"complaint_id": "k", "category": "delivery", "severity": 3, "text": "x".repeat(4097)}));
            }),
            Some(TextTooLong),
        ),
        (
            "model with negative r",
            with(|v| {
                let o = v.as_object_mut().expect("o");
                o.remove("purchase");
                o.insert("customer_id".into(), json!("_model"));
                o.insert("source".into(), json!("ledger"));
                o.insert("model_fitted".into(), json!({"model": "bgnbd", "model_version": "m1", "r": -1.0, "alpha": 4.4, "a": 0.79, "b": 2.4, "log_likelihood": -9582.4, "customers": 2357, "time_unit": "weeks", "calibration_end": "1997-09-30"}));
            }),
            Some(ValueInvalid),
        ),
        (
            "retract unknown",
            with(|v| {
                let o = v.as_object_mut().expect("o");
                o.remove("purchase");
                o.insert("retraction".into(), json!({"retracted_event_id": "nope"}));
            }),
            Some(RetractionTargetUnknown),
        ),
        (
            "retract other customer's",
            with(|v| {
                let o = v.as_object_mut().expect("o");
                o.remove("purchase");
                o.insert("customer_id".into(), json!("c2"));
                o.insert(
                    "retraction".into(),
                    json!({"retracted_event_id": "stored-1"}),
                );
            }),
            Some(RetractionTargetInvalid),
        ),
        (
            "same id, other content",
            with(|v| v["event_id"] = json!("stored-1")),
            Some(EventIdConflict),
        ),
    ]
}

#[test]
fn every_rule_has_a_code_and_every_code_a_row() {
    let (_dir, store) = temp_store();
    let stored = purchase("stored-1", "c1", 500);
    assert!(matches!(
        store.append(vec![AppendItem::new(stored)]).expect("append")[0],
        AppendOutcome::Appended { .. }
    ));

    let rows = rows();
    let mut expected_rejections = Vec::new();
    for (name, line, want) in &rows {
        let got = match parse_event(line.as_bytes()) {
            Err(r) => {
                store
                    .record_rejections(vec![rejection_record(
                        r.code,
                        r.reason.clone(),
                        line.clone().into_bytes(),
                        *name,
                    )])
                    .expect("record");
                Some(r.code)
            }
            Ok(event) => {
                let item = AppendItem {
                    raw: Some(line.clone().into_bytes()),
                    origin: (*name).into(),
                    ..AppendItem::new(event)
                };
                match &store.append(vec![item]).expect("append")[0] {
                    AppendOutcome::Rejected(r) => Some(r.code),
                    AppendOutcome::Appended { .. } => None,
                    other => panic!("{name}: unexpected {other:?}"),
                }
            }
        };
        assert_eq!(got, *want, "row {name:?}: {line}");
        if let Some(code) = want {
            expected_rejections.push((code.as_str(), line.clone(), *name));
        }
    }

    // Exhaustive: each code is exercised by at least one row, but for the two that only a
    // partitioned ledger's paths produce, which tests/it/partition.rs exercises
    // (SUBJECT_MISMATCH on intake, WRONG_PARTITION in a partition's store).
    let elsewhere = [RejectCode::SubjectMismatch, RejectCode::WrongPartition];
    for code in RejectCode::ALL
        .into_iter()
        .filter(|c| !elsewhere.contains(c))
    {
        assert!(
            rows.iter().any(|(_, _, w)| *w == Some(code)),
            "no row for {code}"
        );
    }

    // Nothing dropped: every rejection is kept with its code, origin and the raw bytes.
    let kept: Vec<_> = store.rejections().map(|r| r.expect("read")).collect();
    assert_eq!(kept.len(), expected_rejections.len());
    for (rec, (code, line, name)) in kept.iter().zip(&expected_rejections) {
        assert_eq!(rec.rejection.code.as_str(), *code);
        assert_eq!(rec.raw, line.as_bytes());
        assert_eq!(rec.origin, *name);
        assert_eq!(rec.received_at, crate::support::now());
    }
}
