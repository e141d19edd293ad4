//! A deterministic generator of realistic-looking touchpoint files (JSON lines), with a
//! controlled number of re-sent duplicates, same-id-different-content conflicts and invalid
//! lines — the input of the acceptance run and the README's first command.
//!
//! Key decision: a fixed seed gives byte-identical files (a small SplitMix64, no `rand`), so a
//! failing run can be reproduced exactly. Every extra line is placed after the event it copies,
//! so the original is always the one stored.

use std::io::Write;

use touchledger_domain::{
    Callback, CallbackOutcome, CallbackPurpose, Channel, Complaint, ComplaintCategory, Event,
    LeavingReason, Payload, Purchase, Retraction, Survey, Timestamp,
};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenSpec {
    /// Valid, distinct events.
    pub events: u64,
    /// Identical re-sends of earlier events.
    pub duplicates: u64,
    /// Earlier event ids re-sent with different content.
    pub conflicts: u64,
    /// Invalid lines (a rotating mix of rejection causes).
    pub invalid: u64,
    /// Number of customers.
    pub customers: u64,
    /// PRNG seed.
    pub seed: u64,
    /// Business time of the first event; later ones follow within the next two years.
    pub start: Timestamp,
}

/// Counts of what was written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenSummary {
    /// Lines written.
    pub lines: u64,
    /// Valid distinct events among them.
    pub events: u64,
    /// Duplicates.
    pub duplicates: u64,
    /// Conflicts.
    pub conflicts: u64,
    /// Invalid lines.
    pub invalid: u64,
}

use crate::rng::Rng;

const DAY: i64 = 86_400 * 1_000_000_000;

/// Write the file. Returns what was written.
pub fn generate(spec: &GenSpec, out: &mut dyn Write) -> std::io::Result<GenSummary> {
    let mut rng = Rng(spec.seed);
    let customers = spec.customers.max(1);
    let span = 730 * DAY;
    let step = (span / spec.events.max(1) as i64).max(1);
    let mut valid: Vec<Event> = Vec::with_capacity(spec.events as usize);
    // Per customer: index (in `valid`) of its retractable events, to pick retraction targets.
    let mut by_customer: Vec<Vec<u32>> = vec![Vec::new(); customers as usize];
    let mut t = spec.start.unix_nanos();
    for i in 0..spec.events {
        t += 1 + rng.below(2 * step as u64) as i64;
        let c = rng.below(customers) as usize;
        let customer_id = format!("cust-{c:06}");
        let roll = rng.below(100);
        let payload = if roll < 5 && !by_customer[c].is_empty() {
            let pick = by_customer[c][rng.below(by_customer[c].len() as u64) as usize];
            Payload::Retraction(Retraction {
                retracted_event_id: valid[pick as usize].event_id.clone(),
                reason: "entered in error".into(),
            })
        } else if roll < 65 {
            Payload::Purchase(Purchase {
                order_id: format!("ord-{i}"),
                amount_minor: 500 + rng.below(20_000) as i64,
                currency: "EUR".into(),
                item_count: 1 + rng.below(5) as u32,
                channel: Some([Channel::Web, Channel::App, Channel::Store][rng.below(3) as usize]),
                category: ["music", "books", "video", "games"][rng.below(4) as usize].into(),
            })
        } else if roll < 80 {
            let a = 4 + rng.below(7) as u32;
            Payload::Survey(Survey {
                survey_id: format!("srv-{i}"),
                expectation: Some(a),
                performance: Some(1 + rng.below(10) as u32),
                csat: Some(1 + rng.below(5) as u32),
                nps: Some(rng.below(11) as u32),
                ces: (rng.below(2) == 0).then(|| 1 + rng.below(7) as u32),
                repurchase_intent: Some(1 + rng.below(5) as u32),
                other_suppliers: (rng.below(3) == 0).then(|| rng.below(4) as u32),
                leaving_reason: None,
                text: String::new(),
            })
        } else if roll < 90 {
            Payload::Complaint(Complaint {
                complaint_id: format!("cmp-{i}"),
                category: [
                    ComplaintCategory::ProductQuality,
                    ComplaintCategory::ServiceAttitude,
                    ComplaintCategory::Delivery,
                    ComplaintCategory::Price,
                    ComplaintCategory::Billing,
                ][rng.below(5) as usize],
                severity: 1 + rng.below(5) as u32,
                channel: Some(Channel::Phone),
                text: "parcel arrived late".into(),
            })
        } else {
            Payload::Callback(Callback {
                callback_id: format!("cb-{i}"),
                purpose: CallbackPurpose::SatisfactionCheck,
                related_complaint_id: None,
                outcome: [CallbackOutcome::Reached, CallbackOutcome::NoAnswer]
                    [rng.below(2) as usize],
                resolution_satisfaction: None,
                leaving_reason: (rng.below(20) == 0).then_some(LeavingReason::Competitor),
                note: String::new(),
            })
        };
        let retractable = !matches!(payload, Payload::Retraction(_));
        valid.push(Event {
            event_id: rng.uuid(),
            customer_id,
            occurred_at: Timestamp::from_unix_nanos(t),
            source: "generator".into(),
            schema_version: 1,
            correlation_id: None,
            causation_id: None,
            payload,
        });
        if retractable {
            by_customer[c].push(i as u32);
        }
    }

    // Extra lines, each placed after the event it derives from: (after index, line).
    let mut extras: Vec<(u64, String)> = Vec::new();
    let n = spec.events.max(1);
    let mut add = |rng: &mut Rng, make: &dyn Fn(&mut Rng, &Event) -> String| {
        let src = rng.below(n);
        let after = src + rng.below(n - src);
        if let Some(e) = valid.get(src as usize) {
            let line = make(rng, e);
            extras.push((after, line));
        }
    };
    for _ in 0..spec.duplicates {
        add(&mut rng, &|_, e| to_line(e));
    }
    for _ in 0..spec.conflicts {
        add(&mut rng, &|_, e| {
            let mut c = e.clone();
            c.source = "generator-conflict".into();
            to_line(&c)
        });
    }
    for k in 0..spec.invalid {
        add(&mut rng, &move |rng, e| invalid_line(k, rng, e));
    }
    extras.sort_by_key(|(after, _)| *after);

    let mut summary = GenSummary {
        events: spec.events,
        duplicates: spec.duplicates,
        conflicts: spec.conflicts,
        invalid: spec.invalid,
        ..GenSummary::default()
    };
    let mut extra = extras.into_iter().peekable();
    for (i, e) in valid.iter().enumerate() {
        writeln!(out, "{}", to_line(e))?;
        summary.lines += 1;
        while let Some((_, line)) = extra.next_if(|(after, _)| *after == i as u64) {
            writeln!(out, "{line}")?;
            summary.lines += 1;
        }
    }
    Ok(summary)
}

fn to_line(e: &Event) -> String {
    // Serialising a plain struct of strings and numbers cannot fail.
    serde_json::to_string(e).unwrap_or_default()
}

/// The k-th invalid line: a rotation over distinct rejection causes, each a fresh event id.
fn invalid_line(k: u64, rng: &mut Rng, base: &Event) -> String {
    let mut e = base.clone();
    e.event_id = rng.uuid();
    let survey = |s: Survey| {
        Payload::Survey(Survey {
            survey_id: "srv-bad".into(),
            ..s
        })
    };
    match k % 10 {
        0 => return "{\"event_id\": \"truncated".into(),
        1 => e.customer_id = "cust.with.dots".into(),
        2 => {
            e.payload = survey(Survey {
                nps: Some(11),
                ..Survey::default()
            })
        }
        3 => {
            e.payload = Payload::Purchase(Purchase {
                order_id: "ord-bad".into(),
                amount_minor: -100,
                currency: "EUR".into(),
                item_count: 1,
                channel: None,
                category: String::new(),
            })
        }
        4 => {
            e.payload = Payload::Purchase(Purchase {
                order_id: "ord-bad".into(),
                amount_minor: 100,
                currency: "euro".into(),
                item_count: 1,
                channel: None,
                category: String::new(),
            })
        }
        5 => {
            e.payload = survey(Survey {
                expectation: Some(0),
                performance: Some(5),
                ..Survey::default()
            })
        }
        6 => {
            let mut v = serde_json::to_value(&e).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.retain(|k, _| {
                    !matches!(
                        k.as_str(),
                        "purchase" | "survey" | "complaint" | "callback" | "retraction"
                    )
                });
            }
            return v.to_string();
        }
        7 => e.occurred_at = "2200-01-01T00:00:00Z".parse().unwrap_or_default(),
        8 => {
            e.payload = Payload::Retraction(Retraction {
                retracted_event_id: "no-such-event".into(),
                reason: String::new(),
            })
        }
        _ => e.event_id = String::new(),
    }
    to_line(&e)
}
