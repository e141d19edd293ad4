//! The current materialisation (issue #10) on a real sled directory: after every step of a
//! random history — touchpoints with retractions and future-dated arrivals, clock advances,
//! restarts, and a crash between a projection commit and the materialisation's — every
//! materialised row equals a read-time evaluation at its instant (JSON, byte for byte), its
//! verdict (level, cause, fired rules) equals the evaluation at the service clock, and the
//! ranks, the whole population read model (kept by difference) and every at-risk page equal a
//! full pass at the clock.

use std::time::Duration;

use proptest::prelude::*;
use touchledger_domain::facts::AsOf;
use touchledger_domain::population::Rules;
use touchledger_domain::{ChurnLevel, Timestamp};
use touchledger_projector::current::{AtRiskQuery, AtRiskSort, CAUSES, CurrentRow, REASON_CODES};
use touchledger_projector::partial::{self, Merge, PartialPage, PartialRequest};
use touchledger_projector::{Current, Projector, ReadModels, catch_up, open_all};
use touchledger_store::{AppendItem, DueIndex, EventStore, SledStore};

use crate::projector::{day, touchpoint};
use crate::support::fixed_clock_store;

#[derive(Clone, Debug)]
enum Step {
    /// Append touchpoints (kind, customer, day, value, target index) and fold them.
    Append(Vec<(u8, u8, u16, u8, usize)>),
    /// Move the service clock forward by this many hours and sweep what is due.
    Advance(u32),
    /// Close and reopen everything.
    Restart,
    /// Append and fold, then die before the materialisation follows, and reopen.
    Crash(Vec<(u8, u8, u16, u8, usize)>),
}

fn touchpoints() -> impl Strategy<Value = Vec<(u8, u8, u16, u8, usize)>> {
    proptest::collection::vec(
        (0u8..6, 0u8..12, 0u16..520, any::<u8>(), any::<usize>()),
        1..20,
    )
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => touchpoints().prop_map(Step::Append),
        4 => prop_oneof![1u32..30, 24u32..2400].prop_map(Step::Advance),
        1 => Just(Step::Restart),
        1 => touchpoints().prop_map(Step::Crash),
    ]
}

const RECHECK_DAYS: i64 = 30;

/// The live pieces, as `serve` holds them.
struct Live {
    rules: Rules,
    store: SledStore,
    projectors: Vec<Projector>,
    reads: ReadModels,
    current: Current,
    due: DueIndex,
}

fn open(dir: &std::path::Path) -> Live {
    open_with(dir, &Rules::default())
}

fn open_with(dir: &std::path::Path, rules: &Rules) -> Live {
    let store = fixed_clock_store(dir);
    let projectors: Vec<Projector> = open_all(&store)
        .expect("projectors")
        .into_iter()
        .map(|p| p.0)
        .collect();
    let reads = ReadModels::open(&store, rules.clone()).expect("reads");
    let churn = reads.checkpoints().expect("checkpoints")[2];
    let (current, catchup) = Current::open(
        store
            .projection(touchledger_projector::current::TREE)
            .expect("tree"),
        rules.clone(),
        // No age cap: every re-evaluation must come from a fact change or a due time.
        Duration::from_secs(10 * 365 * 86_400),
        churn,
    )
    .expect("current");
    let due = store.due_index("current_test").expect("due");
    let live = Live {
        rules: rules.clone(),
        store,
        projectors,
        reads,
        current,
        due,
    };
    // What the start-up must re-evaluate is made due at once: the next sweep (every step
    // ends with one) evaluates it at the clock.
    let ids = Current::catchup_customers(&catchup, &live.reads, &live.store).expect("ids");
    for id in ids {
        live.due
            .schedule(&id, Timestamp::from_unix_nanos(0))
            .expect("schedule");
    }
    live.current.commit(churn).expect("commit");
    live.current.set_ready();
    live
}

impl Live {
    fn append_and_fold(&mut self, events: Vec<touchledger_domain::Event>) -> Vec<String> {
        let from = self.store.head().position + 1;
        self.store
            .append(events.into_iter().map(AppendItem::new).collect())
            .expect("append");
        catch_up(&self.store, &mut self.projectors, 13).expect("fold");
        let to = self.store.head().position;
        let mut ids = std::collections::BTreeSet::new();
        for p in from..=to {
            if let Some(c) = self.store.get(p).expect("get") {
                ids.insert(c.event.customer_id);
            }
        }
        ids.into_iter().collect()
    }

    fn refresh(&self, id: &str, now: Timestamp) {
        let (_, _, due) = self
            .current
            .refresh(&self.reads, id, now, RECHECK_DAYS)
            .expect("refresh");
        self.due.schedule(id, due).expect("schedule");
    }

    fn sweep(&self, now: Timestamp) {
        loop {
            let due = self.due.due(now, 100).expect("due");
            let n = due.len();
            for (_, id) in due {
                self.refresh(&id, now);
            }
            if n < 100 {
                break;
            }
        }
    }
}

macro_rules! json {
    ($e:expr) => {
        serde_json::to_string($e).expect("json")
    };
}

/// The at-risk list as the full pass orders it, from the materialised rows.
fn reference_page(rows: &[(String, CurrentRow)], q: &AtRiskQuery) -> (u64, Vec<String>) {
    let mut v: Vec<&(String, CurrentRow)> = rows
        .iter()
        .filter(|(_, r)| {
            let c = &r.churn;
            let cause = c
                .probable_cause
                .map_or("unknown", touchledger_domain::population::cause_name);
            c.level >= q.min_level
                && q.level.is_none_or(|l| l == c.level)
                && q.cause.as_deref().is_none_or(|x| x == cause)
                && q.reason
                    .as_deref()
                    .is_none_or(|code| c.reasons.iter().any(|r| r.code == code))
        })
        .collect();
    v.sort_by(|(ia, ra), (ib, rb)| {
        let (a, b) = (&ra.churn, &rb.churn);
        let o = match q.sort {
            AtRiskSort::Value => a.value_at_risk_minor.cmp(&b.value_at_risk_minor),
            AtRiskSort::Since => a.since.cmp(&b.since),
            AtRiskSort::Customer => ia.cmp(ib),
            AtRiskSort::Level => a.level.cmp(&b.level).then(a.score.total_cmp(&b.score)),
            AtRiskSort::Score => a.score.total_cmp(&b.score).then(a.level.cmp(&b.level)),
        }
        .then_with(|| ia.cmp(ib));
        if q.ascending { o } else { o.reverse() }
    });
    let total = v.len() as u64;
    let ids = v
        .into_iter()
        .skip(q.offset)
        .take(q.limit)
        .map(|(id, _)| id.clone())
        .collect();
    (total, ids)
}

fn check(live: &Live, now: Timestamp) -> Result<(), TestCaseError> {
    let at = AsOf::business(now);
    let rules = live.rules.clone();
    let model = live.reads.model(at).expect("model");
    let mut rows = Vec::new();
    for id in live.reads.customer_ids() {
        let id = id.expect("id");
        let facts = live
            .reads
            .facts_in("churn", &id)
            .expect("facts")
            .unwrap_or_default();
        let row = live.current.row(&id).expect("row");
        if !facts.has_touchpoints(at) {
            prop_assert!(row.is_none(), "{id} has no touchpoints at {now} but a row");
            continue;
        }
        let row = row.ok_or_else(|| TestCaseError::fail(format!("{id}: no row at {now}")))?;
        // The row is exactly the evaluation at its own instant...
        let then = row.churn.as_of.at;
        prop_assert!(then <= now);
        let want = CurrentRow::of(
            &facts,
            rules.customer(&facts, &facts, &facts, model.as_ref(), AsOf::business(then)),
            &rules,
            then,
        );
        prop_assert_eq!(json!(&row), json!(&want), "{} at {}", id, then);
        // ...and its verdict is the one at the clock.
        let v = rules.churn.evaluate(&facts, model.as_ref(), at);
        prop_assert_eq!(row.churn.level, v.level, "{} level at {}", id, now);
        prop_assert_eq!(row.churn.probable_cause, v.probable_cause, "{} cause", id);
        prop_assert_eq!(
            (row.churn.value_at_risk_minor, &row.churn.currency),
            (v.value_at_risk_minor, &v.currency),
            "{} value at risk at {}",
            id,
            now
        );
        let codes = |r: &[touchledger_domain::RiskReason]| -> Vec<String> {
            r.iter().map(|x| x.code.clone()).collect()
        };
        prop_assert_eq!(codes(&row.churn.reasons), codes(&v.reasons), "{} rules", id);
        // Ranks among the population.
        prop_assert_eq!(
            live.current.ranks(&id),
            live.reads.ranks(&id, at).expect("ranks"),
            "{} ranks at {}",
            id,
            now
        );
        rows.push((id, row));
    }
    prop_assert_eq!(live.current.len(), rows.len());
    let pop = live.reads.population(at).expect("population");
    let (currency, tiers, top20) = live.current.pyramid();
    prop_assert_eq!(&currency, &pop.currency);
    prop_assert_eq!(json!(&tiers), json!(&pop.pyramid));
    prop_assert_eq!(json!(&top20), json!(&pop.top20_revenue_share_pct));
    prop_assert_eq!(&live.current.level_counts(), &pop.churn_levels);
    // The whole population read model, kept by difference, equals the full pass.
    prop_assert_eq!(
        json!(&live.current.population(now)),
        json!(&pop),
        "population at {}",
        now
    );
    // A partition's pages of contributions (of its current rows for "now", evaluated at the
    // instant otherwise), merged as a partitioned ledger's reader does, give the same figures.
    for now_read in [true, false] {
        let mut merge = Merge::new(at, &rules);
        let mut after = None;
        let mut pages = 0;
        loop {
            let req = PartialRequest {
                as_of: at,
                now: now_read,
                after,
                max_bytes: 300,
            };
            let bytes = partial::page(&live.reads, Some(&live.current), &req).expect("page");
            let page = PartialPage::decode(&bytes).map_err(TestCaseError::fail)?;
            after = page.next.clone();
            merge.add(page);
            pages += 1;
            if after.is_none() {
                break;
            }
        }
        prop_assert!(
            pages <= rows.len() + 1,
            "{} pages for {} customers",
            pages,
            rows.len()
        );
        prop_assert_eq!(
            json!(&merge.finish()),
            json!(&pop),
            "merged pages (now: {}) at {}",
            now_read,
            now
        );
    }
    // Every sort, both orders, with and without filters, first and a later page.
    let sorts = [
        AtRiskSort::Score,
        AtRiskSort::Value,
        AtRiskSort::Since,
        AtRiskSort::Customer,
        AtRiskSort::Level,
    ];
    for sort in sorts {
        for ascending in [false, true] {
            for (min_level, level, cause, reason) in [
                (ChurnLevel::Watch, None, None, None),
                (ChurnLevel::None, None, None, None),
                (ChurnLevel::Watch, Some(ChurnLevel::Warning), None, None),
                (ChurnLevel::Watch, None, Some(CAUSES[3]), None),
                (ChurnLevel::None, None, None, Some(REASON_CODES[3])),
                (
                    ChurnLevel::Watch,
                    None,
                    Some(CAUSES[4]),
                    Some(REASON_CODES[1]),
                ),
            ] {
                for (offset, limit) in [(0, 5), (3, 4), (0, 1000)] {
                    let q = AtRiskQuery {
                        min_level,
                        level,
                        cause: cause.map(str::to_owned),
                        reason: reason.map(str::to_owned),
                        sort,
                        ascending,
                        offset,
                        limit,
                    };
                    let page = live.current.at_risk(&q).expect("page");
                    let (total, ids) = reference_page(&rows, &q);
                    prop_assert_eq!(page.total, total, "{:?}", q);
                    let got: Vec<String> = page.items.iter().map(|(id, _)| id.clone()).collect();
                    prop_assert_eq!(got, ids, "{:?}", q);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Materialised current views, ranks, pyramid and at-risk pages equal read-time
    /// evaluation after every step.
    #[test]
    fn current_views_equal_read_time_evaluation(steps in proptest::collection::vec(step(), 1..12)) {
        run_steps(&Rules::default(), None, steps)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    /// The same with a fitted model (BG/NBD with a spend model) and the value at risk by CLV,
    /// which changes every day a customer is silent: the daily due times keep the
    /// materialised views equal to read-time evaluation.
    #[test]
    fn current_views_with_value_at_risk_by_clv_equal_read_time_evaluation(
        steps in proptest::collection::vec(step(), 1..12)
    ) {
        let mut rules = Rules::default();
        rules.churn.value_at_risk = touchledger_domain::churn::ValueAtRisk::Clv;
        let fit = touchledger_domain::ModelFitted {
            model: "bgnbd".into(),
            model_version: "bgnbd-test".into(),
            r: 0.2426,
            alpha: 4.4135,
            a: 0.7929,
            b: 2.4258,
            log_likelihood: -9582.4,
            customers: 2357,
            time_unit: touchledger_domain::TimeUnit::Weeks,
            calibration_end: day(0),
            spend: Some(touchledger_domain::SpendModel {
                currency: "EUR".into(),
                p: 6.25,
                q: 3.74,
                gamma: 1544.0,
                log_likelihood: -8412.4,
                customers: 946,
            }),
        };
        run_steps(&rules, Some(fit), steps)?;
    }
}

/// Run `steps` on a ledger evaluated under `rules` (with `model` recorded first), checking
/// after every step that the materialisation equals read-time evaluation.
fn run_steps(
    rules: &Rules,
    model: Option<touchledger_domain::ModelFitted>,
    steps: Vec<Step>,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tmp");
    let mut live = open_with(dir.path(), rules);
    if let Some(m) = model {
        let event = touchledger_domain::Event {
            event_id: format!("model-{}", m.model_version),
            customer_id: touchledger_domain::MODEL_CUSTOMER.into(),
            occurred_at: m.calibration_end,
            source: touchledger_domain::LEDGER_SOURCE.into(),
            schema_version: touchledger_domain::SCHEMA_VERSION,
            correlation_id: None,
            causation_id: None,
            payload: touchledger_domain::Payload::ModelFitted(m),
        };
        live.store
            .append_ledger_events(vec![AppendItem::new(event)])
            .expect("model");
        catch_up(&live.store, &mut live.projectors, 13).expect("fold");
        let cp = live.reads.checkpoints().expect("cp")[2];
        live.current.commit(cp).expect("commit");
    }
    let mut now = day(250);
    let mut sent: Vec<touchledger_domain::Event> = Vec::new();
    let make = |specs: Vec<(u8, u8, u16, u8, usize)>, sent: &mut Vec<touchledger_domain::Event>| {
        specs
            .into_iter()
            .map(|(k, c, d, v, t)| {
                let id = format!("e{}", sent.len());
                let target = if sent.is_empty() {
                    "none".to_owned()
                } else {
                    sent[t % sent.len()].event_id.clone()
                };
                let e = touchpoint(&id, k, c, d, v, &target);
                sent.push(e.clone());
                e
            })
            .collect::<Vec<_>>()
    };
    for s in steps {
        match s {
            Step::Append(specs) => {
                let events = make(specs, &mut sent);
                let ids = live.append_and_fold(events);
                for id in &ids {
                    live.refresh(id, now);
                }
                let cp = live.reads.checkpoints().expect("cp")[2];
                live.current.commit(cp).expect("commit");
            }
            Step::Advance(hours) => {
                now = Timestamp::from_unix_nanos(
                    now.unix_nanos() + i64::from(hours) * 3_600_000_000_000,
                );
            }
            Step::Restart => {
                drop(live);
                live = open_with(dir.path(), rules);
            }
            Step::Crash(specs) => {
                let events = make(specs, &mut sent);
                live.append_and_fold(events);
                for p in &live.projectors {
                    p.tree().flush().expect("flush");
                }
                drop(live);
                live = open_with(dir.path(), rules);
            }
        }
        live.sweep(now);
        check(&live, now)?;
    }
    // The projection checkpoint the rows reflect.
    prop_assert_eq!(
        live.current.checkpoint(),
        live.reads.checkpoints().expect("cp")[2]
    );
    Ok(())
}

/// Month-end snapshots: a passed month end is a full pass the first time and a lookup after,
/// on both axes; a late arrival that occurred by the month end invalidates the business-axis
/// snapshot (recomputed, and equal to the new full pass) but not the knowledge-axis one, as does
/// a retraction recorded later of an event before the month end; an event after the month end
/// changes nothing.
#[test]
fn month_end_snapshots_equal_the_full_pass_and_follow_late_arrivals() {
    use touchledger_domain::facts::Axis;
    use touchledger_projector::monthend::{MonthEnds, is_month_end, last_month_end};
    let dir = tempfile::tempdir().expect("tmp");
    let mut live = open(dir.path());
    let events: Vec<_> = (0..120u16)
        .map(|i| {
            touchpoint(
                &format!("e{i}"),
                (i % 5) as u8,
                (i % 9) as u8,
                i * 3,
                i as u8,
                "none",
            )
        })
        .collect();
    live.append_and_fold(events);
    let me = MonthEnds::open(
        live.store
            .projection(touchledger_projector::monthend::TREE)
            .expect("tree"),
        &Rules::default(),
    )
    .expect("month ends");
    let now = day(400);
    let end = last_month_end(day(200));
    assert!(is_month_end(end) && !is_month_end(day(200)));
    assert!(
        me.population(&live.reads, &live.store, AsOf::business(day(200)), now)
            .expect("read")
            .is_none()
    );
    assert!(
        me.population(
            &live.reads,
            &live.store,
            AsOf::business(last_month_end(day(500))),
            now
        )
        .expect("read")
        .is_none(),
        "a month end not passed yet is not a snapshot"
    );
    let read = |live: &Live, axis: Axis| {
        let as_of = AsOf { at: end, axis };
        let (v, hit) = me
            .population(&live.reads, &live.store, as_of, now)
            .expect("read")
            .expect("a month end");
        let full = live.reads.population(as_of).expect("full pass");
        assert_eq!(json!(&v), json!(&full), "{axis:?}");
        (v, hit)
    };
    for axis in [Axis::Business, Axis::Knowledge] {
        assert!(!read(&live, axis).1, "first read is a full pass");
        assert!(read(&live, axis).1, "second read is the snapshot");
    }
    // An event after the month end: both snapshots stay.
    live.append_and_fold(vec![touchpoint("after", 0, 50, 300, 9, "none")]);
    assert!(read(&live, Axis::Business).1);
    assert!(read(&live, Axis::Knowledge).1);
    // A late arrival that occurred before the month end (recorded now, after it).
    let (before, _) = read(&live, Axis::Business);
    live.append_and_fold(vec![touchpoint("late", 0, 51, 10, 9, "none")]);
    let (after, hit) = read(&live, Axis::Business);
    assert!(
        !hit,
        "the late arrival invalidates the business-axis snapshot"
    );
    assert_eq!(after.customers, before.customers + 1);
    assert!(read(&live, Axis::Business).1);
    assert!(
        read(&live, Axis::Knowledge).1,
        "the ledger did not know it at the month end"
    );
    // A retraction dated after the month end of a purchase made before it: the corrected
    // history (business axis) loses the purchase; what was known then (knowledge axis) keeps it.
    let (before, _) = read(&live, Axis::Business);
    live.append_and_fold(vec![touchpoint("oops", 5, 5, 300, 0, "e5")]);
    let (after, hit) = read(&live, Axis::Business);
    assert!(
        !hit,
        "the retraction invalidates the business-axis snapshot"
    );
    assert_ne!(
        json!(&after),
        json!(&before),
        "the retracted purchase is gone"
    );
    assert!(read(&live, Axis::Business).1);
    assert!(read(&live, Axis::Knowledge).1);
}
