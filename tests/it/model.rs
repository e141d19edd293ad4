//! Model-based test of the store (after sled's own discipline): random sequences of appends —
//! with duplicates, id conflicts, expected versions, retractions and invalid events — and
//! restarts (drop and reopen the sled directory), checked step by step against a plain
//! in-memory model of what the ledger must contain.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use touchledger_domain::{EventKind, Payload, RejectCode};
use touchledger_store::{AppendItem, AppendOutcome, EventStore, ReadFilter, VerifyReport};

use crate::support::{fixed_clock_store, purchase, retraction};

#[derive(Clone, Debug)]
enum Op {
    Append(Vec<ItemSpec>),
    Restart,
}

#[derive(Clone, Debug)]
struct ItemSpec {
    id: u8,
    customer: u8,
    /// 0..3: content variant (same id + other variant = conflict).
    variant: u8,
    /// Retract the event with this id instead of purchasing.
    retract: Option<u8>,
    invalid: bool,
    expected: Option<u8>,
}

fn item() -> impl Strategy<Value = ItemSpec> {
    (
        0u8..16,
        0u8..3,
        0u8..2,
        prop::option::weighted(0.2, 0u8..16),
        prop::bool::weighted(0.1),
        prop::option::weighted(0.2, 0u8..4),
    )
        .prop_map(
            |(id, customer, variant, retract, invalid, expected)| ItemSpec {
                id,
                customer,
                variant,
                retract,
                invalid,
                expected,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec(item(), 1..8).prop_map(Op::Append),
        1 => Just(Op::Restart),
    ]
}

fn build(s: &ItemSpec) -> AppendItem {
    let id = format!("ev-{}", s.id);
    let customer = format!("cust-{}", s.customer);
    let mut event = match s.retract {
        Some(t) => retraction(&id, &customer, &format!("ev-{t}")),
        None => purchase(&id, &customer, 100 + i64::from(s.variant)),
    };
    if s.invalid {
        event.source = String::new();
    }
    if s.variant == 1 {
        event.correlation_id = Some("v1".into());
    }
    AppendItem {
        expected_customer_version: s.expected.map(u64::from),
        ..AppendItem::new(event)
    }
}

/// What the store must hold.
#[derive(Default)]
struct Model {
    /// event id → (position, the event)
    ids: HashMap<String, (u64, touchledger_domain::Event)>,
    versions: HashMap<String, u64>,
    log: Vec<(String, u64)>, // (event id, customer version) by position
}

impl Model {
    fn apply(&mut self, item: &AppendItem) -> AppendOutcome {
        let e = &item.event;
        if e.source.is_empty() {
            return AppendOutcome::Rejected(touchledger_domain::Rejection::new(
                RejectCode::FieldMissing,
                "source",
                "",
            ));
        }
        if let Some((pos, stored)) = self.ids.get(&e.event_id) {
            return if stored == e {
                AppendOutcome::Duplicate { position: *pos }
            } else {
                AppendOutcome::Rejected(touchledger_domain::Rejection::new(
                    RejectCode::EventIdConflict,
                    "",
                    "",
                ))
            };
        }
        let current = self.versions.get(&e.customer_id).copied().unwrap_or(0);
        if let Some(expected) = item.expected_customer_version
            && expected != current
        {
            return AppendOutcome::VersionConflict {
                expected,
                actual: current,
            };
        }
        if let Payload::Retraction(r) = &e.payload {
            match self.ids.get(&r.retracted_event_id) {
                None => {
                    return AppendOutcome::Rejected(touchledger_domain::Rejection::new(
                        RejectCode::RetractionTargetUnknown,
                        "",
                        "",
                    ));
                }
                Some((_, t))
                    if t.kind() == EventKind::Retraction || t.customer_id != e.customer_id =>
                {
                    return AppendOutcome::Rejected(touchledger_domain::Rejection::new(
                        RejectCode::RetractionTargetInvalid,
                        "",
                        "",
                    ));
                }
                Some(_) => {}
            }
        }
        let position = self.log.len() as u64 + 1;
        self.versions.insert(e.customer_id.clone(), current + 1);
        self.ids.insert(e.event_id.clone(), (position, e.clone()));
        self.log.push((e.event_id.clone(), current + 1));
        // The hash is checked separately (chain recomputation in verify).
        AppendOutcome::Appended {
            position,
            customer_version: current + 1,
            hash: Default::default(),
        }
    }
}

/// Outcomes compared on everything but the hash and the human reason text.
fn same(got: &AppendOutcome, want: &AppendOutcome) -> bool {
    match (got, want) {
        (
            AppendOutcome::Appended {
                position: a,
                customer_version: b,
                ..
            },
            AppendOutcome::Appended {
                position: c,
                customer_version: d,
                ..
            },
        ) => a == c && b == d,
        (AppendOutcome::Rejected(a), AppendOutcome::Rejected(b)) => a.code == b.code,
        (a, b) => a == b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 2000, .. ProptestConfig::default() })]

    #[test]
    fn store_matches_model_across_restarts(ops in prop::collection::vec(op(), 1..24)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Some(fixed_clock_store(dir.path()));
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Restart => {
                    drop(store.take());
                    store = Some(fixed_clock_store(dir.path()));
                }
                Op::Append(specs) => {
                    let items: Vec<_> = specs.iter().map(build).collect();
                    let s = store.as_ref().expect("open");
                    let got = s.append(items.clone()).expect("append");
                    prop_assert_eq!(got.len(), items.len());
                    for (i, (g, item)) in got.iter().zip(&items).enumerate() {
                        let want = model.apply(item);
                        prop_assert!(same(g, &want), "item {} {:?}: store {:?}, model {:?}", i, item.event.event_id, g, want);
                    }
                }
            }
            let s = store.as_ref().expect("open");
            prop_assert_eq!(s.head().position, model.log.len() as u64);
        }
        let s = store.as_ref().expect("open");
        let all: Vec<_> = s.read(&ReadFilter::default()).map(|r| r.expect("read")).collect();
        let got: Vec<_> = all.iter().map(|c| (c.event.event_id.clone(), c.customer_version)).collect();
        prop_assert_eq!(&got, &model.log);
        for (i, c) in all.iter().enumerate() {
            prop_assert_eq!(c.position, i as u64 + 1);
            prop_assert_eq!(c.prev_hash, if i == 0 { Default::default() } else { all[i - 1].hash });
        }
        // Per-customer reads agree with the model's versions.
        let mut per: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for c in &all {
            per.entry(c.event.customer_id.clone()).or_default().push(c.customer_version);
        }
        for (customer, versions) in per {
            let read: Vec<_> = s
                .read(&ReadFilter { customer: Some(customer.clone()), ..ReadFilter::default() })
                .map(|r| r.expect("read").customer_version)
                .collect();
            prop_assert_eq!(&read, &versions);
            prop_assert_eq!(versions, (1..=read.len() as u64).collect::<Vec<_>>());
            prop_assert_eq!(s.customer_version(&customer).expect("version"), read.len() as u64);
        }
        let report = s.verify().expect("verify");
        prop_assert!(report.is_ok(), "{:?}", report);
        if let VerifyReport::Ok { events, .. } = report {
            prop_assert_eq!(events, model.log.len() as u64);
        }
    }
}
