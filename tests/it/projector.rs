//! The projector runtime on real sled directories (brief §5 projection consistency):
//! incremental state with restarts equals a rebuild byte for byte (property test); two rebuilds
//! are byte-identical; a changed projection version triggers a rebuild; a projector killed
//! with SIGKILL mid-batch resumes without loss or double counting; and the CDNOW sample,
//! imported through the append path, fits to the published BG/NBD parameters.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use proptest::prelude::*;
use touchledger_domain::{
    Callback, CallbackOutcome, CallbackPurpose, Complaint, ComplaintCategory, Event, EventKind,
    Payload, Survey, Timestamp,
};
use touchledger_projector::{ALL, Opened, Projector, Spec, catch_up, open_all};
use touchledger_store::{
    AppendItem, EventStore, ProjectionDb, ProjectionTree, ReadFilter, SledStore,
};

use crate::cli::cli;
use crate::support::{fixed_clock_store, purchase, retraction};

/// Every state of a tree, plus its checkpoint.
pub(crate) fn snapshot(tree: &ProjectionTree) -> (u64, Vec<(String, Vec<u8>)>) {
    let meta = tree.meta().expect("meta").expect("checkpoint");
    let states = tree.states().map(|r| r.expect("state")).collect();
    (meta.checkpoint, states)
}

/// Fold the store's log into fresh projectors in a separate database, up to `to`.
pub(crate) fn fresh_rebuild(store: &SledStore, to: u64) -> (tempfile::TempDir, Vec<Projector>) {
    let (dir, mut ps) = empty_projectors();
    fold_to(store, &mut ps, to, 97);
    (dir, ps)
}

/// The three projectors, empty, in a database of their own.
fn empty_projectors() -> (tempfile::TempDir, Vec<Projector>) {
    let dir = tempfile::tempdir().expect("tmp");
    let db = ProjectionDb::open(dir.path()).expect("db");
    let ps = ALL
        .iter()
        .map(|s| {
            Projector::open(*s, db.projection(s.name).expect("tree"))
                .expect("open")
                .0
        })
        .collect();
    (dir, ps)
}

/// Fold positions from the projectors' lowest checkpoint up to `to`, `batch` at a time.
fn fold_to(store: &SledStore, ps: &mut [Projector], to: u64, batch: u64) {
    let mut from = ps.iter().map(|p| p.checkpoint()).min().unwrap_or(0) + 1;
    while from <= to {
        let end = to.min(from + batch - 1);
        let events = touchledger_projector::read_range(store, from, end).expect("read");
        for p in ps.iter_mut() {
            p.apply(&events).expect("apply");
        }
        from = end + 1;
    }
}

pub(crate) fn day(d: u16) -> Timestamp {
    Timestamp::from_unix_nanos((20_000 + i64::from(d)) * 86_400 * 1_000_000_000 + 3_600_000_000_000)
}

/// A touchpoint of kind `k` (0..5) for customer `c` on day `d`; kind 5 retracts `target`.
pub(crate) fn touchpoint(id: &str, k: u8, c: u8, d: u16, v: u8, target: &str) -> Event {
    let customer = format!("cust-{c}");
    let mut e = purchase(id, &customer, i64::from(v) * 100);
    e.occurred_at = day(d);
    e.payload = match k {
        0 | 1 => e.payload,
        2 => Payload::Complaint(Complaint {
            complaint_id: format!("k-{id}"),
            category: ComplaintCategory::Delivery,
            severity: 1 + u32::from(v % 5),
            channel: None,
            text: String::new(),
        }),
        3 => Payload::Callback(Callback {
            callback_id: format!("cb-{id}"),
            purpose: CallbackPurpose::ComplaintFollowUp,
            related_complaint_id: Some(format!("k-{target}")),
            outcome: CallbackOutcome::ComplaintResolved,
            resolution_satisfaction: Some(1 + u32::from(v % 5)),
            leaving_reason: None,
            note: String::new(),
        }),
        4 => Payload::Survey(Survey {
            survey_id: format!("s-{id}"),
            expectation: Some(1 + u32::from(v % 10)),
            performance: Some(1 + u32::from(v / 10 % 10)),
            nps: Some(u32::from(v % 11)),
            csat: Some(1 + u32::from(v % 5)),
            ..Default::default()
        }),
        _ => {
            let mut r = retraction(id, &customer, target);
            r.occurred_at = day(d);
            return r;
        }
    };
    e
}

#[derive(Clone, Debug)]
enum Op {
    /// Append these touchpoints (kind, customer, day, value, target index), in one batch.
    Append(Vec<(u8, u8, u16, u8, usize)>),
    /// Re-send earlier events (duplicates).
    Resend(Vec<usize>),
    /// Fold what is new into the live projectors.
    Fold,
    /// Drop everything and reopen store and projectors.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec((0u8..6, 0u8..4, 0u16..500, any::<u8>(), any::<usize>()), 1..25).prop_map(Op::Append),
        1 => proptest::collection::vec(any::<usize>(), 1..5).prop_map(Op::Resend),
        2 => Just(Op::Fold),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Incremental folding with restarts, duplicates and retractions equals a rebuild from the
    /// log, byte for byte, for every projection.
    #[test]
    fn incremental_equals_rebuild_byte_for_byte(ops in proptest::collection::vec(op(), 1..14)) {
        let dir = tempfile::tempdir().expect("tmp");
        let mut store = fixed_clock_store(dir.path());
        let mut live: Vec<Projector> = open_all(&store).expect("open").into_iter().map(|p| p.0).collect();
        let mut sent: Vec<Event> = Vec::new();
        for op in ops {
            match op {
                Op::Append(specs) => {
                    let items = specs
                        .into_iter()
                        .map(|(k, c, d, v, t)| {
                            let id = format!("e{}", sent.len());
                            let target = if sent.is_empty() { "none".to_owned() } else { sent[t % sent.len()].event_id.clone() };
                            let e = touchpoint(&id, k, c, d, v, &target);
                            sent.push(e.clone());
                            AppendItem::new(e)
                        })
                        .collect();
                    store.append(items).expect("append");
                }
                Op::Resend(ix) => {
                    if !sent.is_empty() {
                        let items = ix.into_iter().map(|i| AppendItem::new(sent[i % sent.len()].clone())).collect();
                        store.append(items).expect("append");
                    }
                }
                Op::Fold => {
                    catch_up(&store, &mut live, 7).expect("fold");
                }
                Op::Restart => {
                    drop(live);
                    drop(store);
                    store = fixed_clock_store(dir.path());
                    live = open_all(&store)
                        .expect("reopen")
                        .into_iter()
                        .map(|(p, opened)| {
                            assert!(matches!(opened, Opened::Resumed { .. }), "{opened:?}");
                            p
                        })
                        .collect();
                }
            }
        }
        catch_up(&store, &mut live, 7).expect("fold");
        let head = store.head().position;
        let (_d, rebuilt) = fresh_rebuild(&store, head);
        for (a, b) in live.iter().zip(&rebuilt) {
            let (sa, sb) = (snapshot(a.tree()), snapshot(b.tree()));
            prop_assert_eq!(sa.0, head);
            prop_assert_eq!(&sa, &sb, "projection {}", a.spec().name);
        }
    }
}

pub(crate) fn populated_store(dir: &std::path::Path, n: usize) -> SledStore {
    let store = fixed_clock_store(dir);
    let mut x = 0x9e37_79b9_u64;
    let mut items = Vec::new();
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = (x % 6) as u8;
        let target = format!("e{}", (x >> 8) as usize % (i.max(1)));
        let e = touchpoint(
            &format!("e{i}"),
            k,
            (x >> 20) as u8 % 50,
            (x >> 30) as u16 % 500,
            (x >> 40) as u8,
            &target,
        );
        items.push(AppendItem::new(e));
        if items.len() == 500 {
            store.append(std::mem::take(&mut items)).expect("append");
        }
    }
    store.append(items).expect("append");
    store
}

#[test]
fn two_rebuilds_are_byte_identical_and_a_version_change_rebuilds() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = populated_store(dir.path(), 2000);
    let head = store.head().position;
    let (_a, first) = fresh_rebuild(&store, head);
    let (_b, second) = fresh_rebuild(&store, head);
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(snapshot(a.tree()), snapshot(b.tree()), "{}", a.spec().name);
    }
    // The in-ledger projections: fold, then reopen under a bumped version → reset and rebuilt.
    let mut live: Vec<Projector> = open_all(&store)
        .expect("open")
        .into_iter()
        .map(|p| p.0)
        .collect();
    catch_up(&store, &mut live, 1000).expect("fold");
    let before = snapshot(live[2].tree());
    drop(live);
    let bumped = Spec {
        version: touchledger_projector::CHURN.version + 1,
        ..touchledger_projector::CHURN
    };
    let (mut p, opened) =
        Projector::open(bumped, store.projection("churn").expect("tree")).expect("open");
    assert_eq!(
        opened,
        Opened::Reset {
            reason: format!("version {} -> {}", bumped.version - 1, bumped.version)
        }
    );
    assert_eq!(p.checkpoint(), 0);
    assert_eq!(p.tree().states().count(), 0);
    catch_up(&store, std::slice::from_mut(&mut p), 333).expect("rebuild");
    assert_eq!(snapshot(p.tree()), before);
}

#[test]
fn a_rebuild_in_passes_equals_the_incremental_fold_and_a_half_rebuilt_tree_is_rebuilt() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = populated_store(dir.path(), 3000);
    let head = store.head().position;
    let (_a, incremental) = fresh_rebuild(&store, head);
    for pass_events in [head, 700, 97] {
        let (_p, mut ps) = empty_projectors();
        let mut refs: Vec<&mut Projector> = ps.iter_mut().collect();
        let done = touchledger_projector::bulk::rebuild(&store, &mut refs, pass_events)
            .expect("bulk rebuild");
        assert_eq!(done.head, head);
        assert_eq!(done.passes, head.div_ceil(pass_events), "{pass_events}");
        for (a, b) in ps.iter().zip(&incremental) {
            assert_eq!(a.checkpoint(), head);
            assert_eq!(
                snapshot(a.tree()),
                snapshot(b.tree()),
                "{} in passes of {pass_events}",
                a.spec().name
            );
        }
        // Only an empty projection is rebuilt in passes.
        let mut refs: Vec<&mut Projector> = ps.iter_mut().collect();
        assert!(touchledger_projector::bulk::rebuild(&store, &mut refs, pass_events).is_err());
    }
    // A rebuild that stopped between its passes leaves states without a checkpoint: the
    // projector rebuilds from scratch on open instead of resuming from a partial state.
    let tree = store.projection("loyalty").expect("tree");
    let mut live: Vec<Projector> = open_all(&store)
        .expect("open")
        .into_iter()
        .map(|p| p.0)
        .collect();
    catch_up(&store, &mut live, 1000).expect("fold");
    drop(live);
    assert!(tree.states().count() > 0);
    tree.clear_checkpoint().expect("clear");
    let (p, opened) = Projector::open(touchledger_projector::LOYALTY, tree).expect("open");
    assert_eq!(
        opened,
        Opened::Reset {
            reason: "new".into()
        }
    );
    assert_eq!(p.tree().states().count(), 0);
}

const CHILD_ENV: &str = "TOUCHLEDGER_PROJECTOR_CRASH_DIR";

/// Not a test on its own: the child side of `projector_killed_mid_batch_resumes_exactly`.
#[test]
fn projector_crash_child_helper() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = fixed_clock_store(std::path::Path::new(&dir));
    let mut ps: Vec<Projector> = open_all(&store)
        .expect("open")
        .into_iter()
        .map(|p| p.0)
        .collect();
    let head = store.head().position;
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").expect("stdout");
    out.flush().expect("flush");
    if std::env::var_os(CHILD_BULK_ENV).is_some() {
        // The rebuild in passes of empty projectors, 50 events a pass (60 passes here).
        let mut refs: Vec<&mut Projector> = ps.iter_mut().collect();
        touchledger_projector::bulk::rebuild(&store, &mut refs, 50).expect("bulk");
    } else {
        fold_to(&store, &mut ps, head, 5);
    }
    writeln!(out, "DONE").expect("stdout");
}

/// Reopen the projectors in `dir`, fold to the head and compare with a fresh rebuild.
fn resume_equals_a_rebuild(dir: &std::path::Path, head: u64) {
    let store = fixed_clock_store(dir);
    let mut live: Vec<Projector> = open_all(&store)
        .expect("reopen")
        .into_iter()
        .map(|p| p.0)
        .collect();
    catch_up(&store, &mut live, 100).expect("fold");
    let (_d, reference) = fresh_rebuild(&store, head);
    for (a, b) in live.iter().zip(&reference) {
        assert_eq!(snapshot(a.tree()), snapshot(b.tree()), "{}", a.spec().name);
    }
}

const CHILD_BULK_ENV: &str = "TOUCHLEDGER_PROJECTOR_CRASH_BULK";

/// Spawn the crash child on `dir` (in bulk mode or not), kill it `delay` after it has the
/// store open (never, with `None`: it runs to the end); whether it finished first, and how
/// long after opening the store.
fn kill_child(dir: &std::path::Path, bulk: bool, delay: Option<Duration>) -> (bool, Duration) {
    let exe = std::env::current_exe().expect("exe");
    let mut cmd = Command::new(&exe);
    cmd.args([
        "projector::projector_crash_child_helper",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, dir)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if bulk {
        cmd.env(CHILD_BULK_ENV, "1");
    }
    let mut child = cmd.spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // The harness prints "test <name> ... " before the test's own output, on the same line.
    while let Some(Ok(l)) = lines.next() {
        if l.ends_with("READY") {
            break;
        }
    }
    let start = std::time::Instant::now();
    if let Some(d) = delay {
        std::thread::sleep(d);
        child.kill().expect("kill");
    }
    let done = lines.any(|l| l.is_ok_and(|l| l == "DONE"));
    let took = start.elapsed();
    child.wait().expect("wait");
    (done, took)
}

/// A rebuild in passes killed with SIGKILL at any point leaves, on reopen, either the finished
/// rebuild (checkpoint at the head, states equal to a fresh fold) or an empty projection at
/// checkpoint 0 (states without a checkpoint are reset on open): never a checkpoint beside a
/// partial state. Resuming then folds to the same bytes as a rebuild.
#[test]
fn a_rebuild_in_passes_killed_mid_pass_is_redone_from_scratch() {
    let dir = tempfile::tempdir().expect("tmp");
    let head = {
        let store = populated_store(dir.path(), 3000);
        store.head().position
    };
    let reset = || {
        // Every run starts from empty projections: the bulk path.
        let store = fixed_clock_store(dir.path());
        for (mut p, _) in open_all(&store).expect("open") {
            p.reset().expect("reset");
        }
    };
    // How long an uninterrupted rebuild takes here; the kills are spread over it.
    reset();
    let (done, full) = kill_child(dir.path(), true, None);
    assert!(done, "the rebuild child did not finish");
    let (mut interrupted, mut mid_pass) = (0, 0);
    for trial in 0..8u32 {
        reset();
        if !kill_child(dir.path(), true, Some(full * (2 * trial + 1) / 16)).0 {
            interrupted += 1;
        }
        let store = fixed_clock_store(dir.path());
        // Before reopening the projectors: was a tree caught with states but no checkpoint?
        if ALL.iter().any(|s| {
            let t = store.projection(s.name).expect("tree");
            t.meta().expect("meta").is_none() && t.states().next().is_some()
        }) {
            mid_pass += 1;
        }
        let live: Vec<Projector> = open_all(&store)
            .expect("reopen")
            .into_iter()
            .map(|p| p.0)
            .collect();
        let (_d, reference) = fresh_rebuild(&store, head);
        for p in &live {
            let (checkpoint, states) = snapshot(p.tree());
            if checkpoint == 0 {
                assert!(
                    states.is_empty(),
                    "trial {trial}: {} has {} states at checkpoint 0",
                    p.spec().name,
                    states.len()
                );
                continue;
            }
            let r = reference
                .iter()
                .find(|r| r.spec().name == p.spec().name)
                .expect("same spec");
            assert_eq!(checkpoint, head, "trial {trial}: {}", p.spec().name);
            assert_eq!(
                (checkpoint, states),
                snapshot(r.tree()),
                "trial {trial}: {}",
                p.spec().name
            );
        }
    }
    assert!(
        interrupted >= 2 && mid_pass >= 1,
        "of 8 children {interrupted} were killed before the end, {mid_pass} with states written \
         and no checkpoint"
    );
    resume_equals_a_rebuild(dir.path(), head);
}

#[test]
fn projector_killed_mid_batch_resumes_exactly() {
    let dir = tempfile::tempdir().expect("tmp");
    let head = {
        let store = populated_store(dir.path(), 3000);
        store.head().position
    };
    let mut interrupted = 0;
    for trial in 0..8u64 {
        if !kill_child(
            dir.path(),
            false,
            Some(Duration::from_millis(5 + trial * 9)),
        )
        .0
        {
            interrupted += 1;
        }
        // Reopen: each projection's state must be exactly the fold of 1..=checkpoint.
        let store = fixed_clock_store(dir.path());
        let live: Vec<Projector> = open_all(&store)
            .expect("reopen")
            .into_iter()
            .map(|p| p.0)
            .collect();
        for p in &live {
            let (checkpoint, states) = snapshot(p.tree());
            let (_d, reference) = fresh_rebuild(&store, checkpoint);
            let r = reference
                .iter()
                .find(|r| r.spec().name == p.spec().name)
                .expect("same spec");
            let expected = if checkpoint == 0 {
                (0, Vec::new())
            } else {
                snapshot(r.tree())
            };
            assert_eq!(
                (checkpoint, states),
                expected,
                "trial {trial}: {} at checkpoint {checkpoint}",
                p.spec().name
            );
        }
        // Make the next child start somewhere new: reset them every other trial.
        if trial % 2 == 1 {
            for mut p in live {
                p.reset().expect("reset");
            }
        }
    }
    assert!(
        interrupted >= 2,
        "only {interrupted} of 8 children were killed mid-fold"
    );
    // Finally, resuming folds to the head and equals a rebuild.
    resume_equals_a_rebuild(dir.path(), head);
}

#[test]
fn cdnow_sample_import_and_fit_reproduce_the_paper() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("ledger");
    let data = data.to_str().expect("utf8");
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/data/cdnow/CDNOW_sample.txt");
    let (code, out, err) = cli(&["import", "cdnow", "--data", data, "--file", file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("imported 6919 rows of 2357 customers: appended 6919"),
        "{out}"
    );
    // Importing again stores nothing new.
    let (code, out, _) = cli(&["import", "cdnow", "--data", data, "--file", file]);
    assert_eq!(code, 0);
    assert!(out.contains("appended 0, duplicate 6919"), "{out}");
    // `fit` at the paper's calibration end, in weeks, with `extra` flags.
    let fit = |extra: &[&str]| {
        let mut args = vec![
            "fit",
            "--data",
            data,
            "--as-of",
            "1997-09-30",
            "--unit",
            "weeks",
        ];
        args.extend_from_slice(extra);
        cli(&args)
    };
    let (code, out, err) = fit(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("r     = 0.2426"), "{out}");
    // The fit is in the ledger, as a derived event.
    let store = SledStore::open(touchledger_store::StoreConfig::new(
        dir.path().join("ledger"),
    ))
    .expect("open");
    let fits: Vec<_> = store
        .read(&ReadFilter {
            kind: Some(EventKind::ModelFitted),
            ..Default::default()
        })
        .collect::<Result<_, _>>()
        .expect("read");
    assert_eq!(fits.len(), 1);
    let Payload::ModelFitted(m) = &fits[0].event.payload else {
        panic!("not a fit")
    };
    for (got, want) in [
        (m.r, 0.2426),
        (m.alpha, 4.4135),
        (m.a, 0.7929),
        (m.b, 2.4258),
    ] {
        assert!((got / want - 1.0).abs() < 0.005, "{got} vs {want}");
    }
    assert!(
        (m.log_likelihood + 9582.4).abs() < 0.5,
        "{}",
        m.log_likelihood
    );
    assert_eq!(m.customers, 2357);
    // The spend model fitted with it: Fader, Hardie & Lee (2005, "RFM and CLV") on the 946
    // repeat buyers, p = 6.25, q = 3.74, γ = $15.44 (in cents here: every CDNOW value is USD).
    let spend = m.spend.as_ref().expect("a spend model");
    assert_eq!(spend.currency, "USD");
    assert_eq!(spend.customers, 946);
    for (name, got, want) in [
        ("p", spend.p, 6.25),
        ("q", spend.q, 3.74),
        ("gamma", spend.gamma, 1544.0),
    ] {
        assert!((got / want - 1.0).abs() < 0.005, "{name} = {got} vs {want}");
    }
    assert!(
        out.contains("Gamma-Gamma spend model on 946 repeat buyers paying in USD"),
        "{out}"
    );
    assert_eq!(fits[0].event.source, "ledger");
    drop(store);
    // Customer 1 at `as_of`, under a rules file (`name`, with `rules`) when given.
    let query_at = |as_of: &str, rules: Option<(&str, &str)>| -> serde_json::Value {
        let mut args = vec![
            "query",
            "--data",
            data,
            "--customer",
            "cdnow-1",
            "--as-of",
            as_of,
            "--json",
        ];
        let path;
        if let Some((name, rules)) = rules {
            path = std::path::Path::new(data).with_extension(name);
            std::fs::write(&path, rules).expect("rules");
            args.extend(["--rules", path.to_str().expect("utf8")]);
        }
        let (code, out, err) = cli(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).expect("json")
    };
    let query_under = |rules: Option<(&str, &str)>| query_at("1997-09-30", rules);
    // Queries use it: customer 1 of the sample (x = 2, t_x = 30.43, T = 38.86).
    let v = query_under(None);
    assert_eq!(
        v["churn"]["model_version"],
        serde_json::json!(m.model_version)
    );
    assert_eq!(v["loyalty"]["behaviour"]["repeat_days"], 2);
    // Population-relative ranks, checked independently (a short Python pass over the file):
    // customer 1 spent $74.02 by 1997-09-30, rank 606 of 2,357 buyers by value (top 20 % =
    // 472, top 50 % = 1,179) → ordinary; 1,850 buyers have fewer than 3 purchase-days →
    // frequency quintile 1 + 1850·5/2357 = 4.
    assert_eq!(v["ranks"]["tier"], "ordinary", "{}", v["ranks"]);
    assert_eq!(v["ranks"]["frequency"], 4);
    let p = v["churn"]["p_active"].as_f64().expect("p");
    assert!(p > 0.0 && p < 1.0);
    // A repeat buyer's P(active) is P(alive); the expected purchases over the next 365 d.
    assert_eq!(v["churn"]["p_alive"], v["churn"]["p_active"]);
    assert_eq!(v["churn"]["expected_purchases_days"], 365);
    // FHL's worked example is this customer: E[Y(39 weeks)] = 1.226. With a 273-day (39-week)
    // horizon set in a rules file, the churn view says the same (our fit is the published one
    // to ±0.5 %).
    let v39 = query_under(Some((
        "rules.json",
        r#"{"churn": {"expected_purchases_days": 273}}"#,
    )));
    assert_eq!(v39["churn"]["expected_purchases_days"], 273);
    let e = v39["churn"]["expected_purchases"].as_f64().expect("E[Y]");
    assert!((e / 1.226 - 1.0).abs() < 0.01, "E[Y(39)] = {e}");
    let e365 = v["churn"]["expected_purchases"].as_f64().expect("E[Y]");
    assert!(e365 > e, "a longer horizon expects more: {e365} vs {e}");
    // Customer 1's value. By 1997-09-30 their repeat purchase-days were $29.73 (1997-01-18) and
    // $14.96 (1997-08-02): x = 2, mean 2,234.5 cents. Gamma-Gamma's expectation is
    // p(γ + x·m)/(px + q − 1), computed here from the recorded parameters.
    let value = &v["loyalty"]["value"];
    assert_eq!(value["currency"], "USD", "{value}");
    assert_eq!(value["model_version"], serde_json::json!(m.model_version));
    assert_eq!(value["horizon_months"], 12);
    let z = spend.p * (spend.gamma + 2.0 * 2_234.5) / (spend.p * 2.0 + spend.q - 1.0);
    let got = value["expected_average_value_minor"]
        .as_f64()
        .expect("E[Z]");
    assert!((got - z).abs() < 1e-6 * z, "E[Z] = {got} vs {z}");
    // Undiscounted over 9 months (39.1 weeks) CLV is E[Z] · E[Y(9 months)], and E[Y(39 weeks)]
    // is the paper's 1.226; discounted at the default 1 %/month over 12 months it is less than
    // undiscounted over 12.
    let v9 = query_under(Some((
        "clv.json",
        r#"{"churn": {"clv_horizon_months": 9, "clv_monthly_discount": 0.0}}"#,
    )));
    let ey9 = v9["loyalty"]["value"]["expected_purchases"]
        .as_f64()
        .expect("E[Y(9 months)]");
    assert!((ey9 / 1.226 - 1.0).abs() < 0.01, "E[Y(9 months)] = {ey9}");
    let clv9 = v9["loyalty"]["value"]["clv_minor"].as_f64().expect("clv");
    assert!(
        (clv9 - z * ey9).abs() < 1e-6 * clv9,
        "{clv9} vs {}",
        z * ey9
    );
    let clv12 = value["clv_minor"].as_f64().expect("clv");
    let ey12 = value["expected_purchases"]
        .as_f64()
        .expect("E[Y(12 months)]");
    assert!(
        clv12 < z * ey12 && clv12 > z * ey12 / 1.01f64.powi(12),
        "{clv12}"
    );
    // Refitting the same data is idempotent.
    let (code, out, _) = fit(&[]);
    assert_eq!(code, 0);
    assert!(out.contains("already recorded"), "{out}");

    // The value at risk by CLV (`churn.value_at_risk: clv`): customer 1 at 1998-06-30 is at
    // watch; their value at risk is then their CLV (as the loyalty view states it, rounded to
    // cents), not their trailing 365 days' revenue (the default).
    let at = |rules: Option<(&str, &str)>| query_at("1998-06-30", rules);
    let by_revenue = at(None);
    let by_clv = at(Some(("var.json", r#"{"churn": {"value_at_risk": "clv"}}"#)));
    assert_eq!(by_clv["churn"]["level"], "watch", "{}", by_clv["churn"]);
    let clv = by_clv["loyalty"]["value"]["clv_minor"]
        .as_f64()
        .expect("CLV");
    assert_eq!(
        by_clv["churn"]["value_at_risk_minor"],
        serde_json::json!(clv.round() as i64)
    );
    assert_eq!(by_clv["churn"]["currency"], "USD");
    // By revenue: the purchase-days of the trailing 365 days ($14.96 on 1997-08-02 and $26.48 on
    // 1997-12-12).
    assert_eq!(by_revenue["churn"]["value_at_risk_minor"], 1496 + 2648);

    // Pareto/NBD as the count model: `fit --model paretonbd` records the published fit
    // (Fader, Hardie & Lee 2005: r = 0.553, α = 10.578, s = 0.606, β = 11.669; s and β kept
    // as a and b) beside the BG/NBD one, and only rules that select it use it.
    let (code, out, err) = fit(&["--model", "paretonbd"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Pareto/NBD fit on 2357 customers"), "{out}");
    let pareto_version = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("model_version  = "))
        .expect("version line")
        .to_owned();
    assert!(
        pareto_version.starts_with("paretonbd-1997-09-30-weeks-"),
        "{out}"
    );
    let param = |name: &str| crate::cli::printed(&out, name);
    for (name, want) in [
        ("r", 0.553),
        ("alpha", 10.578),
        ("s", 0.606),
        ("beta", 11.669),
    ] {
        let got = param(name);
        assert!((got / want - 1.0).abs() < 0.005, "{name} = {got} vs {want}");
    }
    // The default rules still read the BG/NBD fit; `churn.count_model` selects Pareto/NBD, whose
    // P(alive) for customer 1 is its own (the closed form, from the published parameters to
    // within their rounding), and whose alive rule speaks for one-time buyers too.
    assert_eq!(
        query_under(None)["churn"]["model_version"],
        serde_json::json!(m.model_version)
    );
    let vp = query_under(Some((
        "pareto.json",
        r#"{"churn": {"count_model": "paretonbd"}}"#,
    )));
    assert_eq!(
        vp["churn"]["model_version"],
        serde_json::json!(pareto_version)
    );
    let published = touchledger_domain::paretonbd::Params {
        r: 0.553,
        alpha: 10.578,
        s: 0.606,
        beta: 11.669,
    };
    let alive = touchledger_domain::paretonbd::p_alive(
        &published,
        &touchledger_domain::bgnbd::Rfm {
            x: 2.0,
            t_x: 30.428_571,
            t: 38.857_143,
        },
    );
    let got = vp["churn"]["p_alive"].as_f64().expect("P(alive)");
    assert!(
        (got - alive).abs() < 0.01,
        "Pareto/NBD P(alive) = {got} vs {alive}"
    );
    assert_ne!(
        vp["churn"]["p_alive"], v["churn"]["p_alive"],
        "BG/NBD's differs"
    );
    // The evaluation under those rules evaluates the warnings with Pareto/NBD, and says so.
    let rules = std::path::Path::new(data).with_extension("pareto.json");
    let pareto_rules = rules.to_str().expect("utf8");
    // `evaluate` over FHL's periods with `extra` flags.
    let evaluate = |extra: &[&str]| {
        let mut args = vec![
            "evaluate",
            "--data",
            data,
            "--calibration-end",
            "1997-09-30",
            "--holdout-end",
            "1998-06-30",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = cli(&args);
        assert_eq!(code, 0, "{out}{err}");
        out
    };
    let out = evaluate(&["--json", "--rules", pareto_rules]);
    let e: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        e["warning_model"]["model"], "paretonbd",
        "{}",
        e["warning_model"]
    );
    assert_eq!(e["model"]["model"], "bgnbd");
    // Recorded under either rules, the two evaluations of the same holdout are two records
    // (each names the model behind its warnings), and recording one again is a duplicate.
    let record = |rules: Option<&str>| {
        let mut extra = vec!["--record"];
        extra.extend(rules.iter().flat_map(|r| ["--rules", *r]));
        evaluate(&extra)
    };
    assert!(record(None).contains("recorded as ModelEvaluated at position"));
    let out = record(Some(pareto_rules));
    assert!(
        out.contains("recorded as ModelEvaluated at position"),
        "{out}"
    );
    assert!(record(Some(pareto_rules)).contains("already recorded at position"));
}

#[test]
fn cdnow_master_pyramid_top_20_percent_bring_67_8_percent() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("ledger");
    let data = data.to_str().expect("utf8");
    // The full log lives beside the project (../shared/data), as in CI.
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/cdnow/CDNOW_master.txt"
    );
    let (code, out, err) = cli(&[
        "import", "cdnow", "--data", data, "--file", file, "--batch", "5000",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli(&["query", "--data", data, "--as-of", "1998-07-01", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["customers"], 23570);
    let share = v["top20_revenue_share_pct"].as_f64().expect("share");
    assert!((share - 67.8).abs() < 0.05, "{share}");
    let tiers: Vec<u64> = v["pyramid"]
        .as_array()
        .expect("tiers")
        .iter()
        .map(|t| t["customers"].as_u64().expect("n"))
        .collect();
    assert_eq!(tiers, vec![236, 4478, 7071, 11785]);
}

/// Drop every `as_of` (and with it the axis) from a JSON view, to compare figures only.
fn without_as_of(mut v: serde_json::Value) -> serde_json::Value {
    match &mut v {
        serde_json::Value::Object(m) => {
            m.remove("as_of");
            for x in m.values_mut() {
                *x = without_as_of(x.take());
            }
        }
        serde_json::Value::Array(a) => {
            for x in a.iter_mut() {
                *x = without_as_of(x.take());
            }
        }
        _ => {}
    }
    v
}

/// Time travel on the knowledge axis: a read "as the ledger knew it at T" equals a read of a
/// ledger that only ever received the events recorded by T — including events that arrived
/// late (occurred long before they were recorded) and a retraction recorded after T.
#[test]
fn knowledge_axis_reproduces_what_the_ledger_knew() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    use touchledger_domain::facts::AsOf;
    use touchledger_domain::population::Rules;
    use touchledger_projector::ReadModels;

    // (recorded on day, event): touchpoint(id, kind, customer, occurred day, value, target)
    let plan: Vec<(u16, Event)> = vec![
        (10, touchpoint("p1", 0, 1, 10, 30, "")),
        (12, touchpoint("s1", 4, 1, 12, 87, "")),
        (20, touchpoint("k1", 2, 1, 20, 3, "")),
        (25, touchpoint("p2", 0, 2, 24, 50, "")),
        (40, touchpoint("late", 0, 1, 5, 70, "")),
        (45, touchpoint("cb1", 3, 1, 44, 4, "k1")),
        (60, touchpoint("r1", 5, 1, 60, 0, "p1")),
        (61, touchpoint("s2", 4, 2, 61, 12, "")),
        (90, touchpoint("p3", 0, 2, 89, 20, "")),
    ];
    let build = |upto: u16| {
        let dir = tempfile::tempdir().expect("tmp");
        let now = Arc::new(AtomicI64::new(0));
        let mut cfg = touchledger_store::StoreConfig::new(dir.path());
        let c = now.clone();
        cfg.clock = Arc::new(move || Timestamp::from_unix_nanos(c.load(Ordering::SeqCst)));
        let store = SledStore::open(cfg).expect("open");
        for (rec, e) in plan.iter().filter(|(rec, _)| *rec <= upto) {
            now.store(day(*rec).unix_nanos(), Ordering::SeqCst);
            let out = store
                .append(vec![AppendItem::new(e.clone())])
                .expect("append");
            assert!(
                matches!(out[0], touchledger_store::AppendOutcome::Appended { .. }),
                "{out:?}"
            );
        }
        let mut ps: Vec<Projector> = open_all(&store)
            .expect("open")
            .into_iter()
            .map(|p| p.0)
            .collect();
        catch_up(&store, &mut ps, 3).expect("fold");
        (dir, store)
    };
    let (_full_dir, full) = build(u16::MAX);
    let full_reads = ReadModels::open(&full, Rules::default()).expect("reads");
    for t in [11u16, 21, 30, 41, 50, 59, 65, 95] {
        let at = day(t);
        let (_d, partial) = build(t);
        let partial_reads = ReadModels::open(&partial, Rules::default()).expect("reads");
        for customer in ["cust-1", "cust-2"] {
            let then = full_reads
                .customer(customer, AsOf::knowledge(at))
                .expect("read");
            let reference = partial_reads
                .customer(customer, AsOf::business(at))
                .expect("read");
            let j = |v: &Option<touchledger_domain::population::CustomerViews>| {
                without_as_of(serde_json::to_value(v).expect("json"))
            };
            assert_eq!(j(&then), j(&reference), "{customer} at day {t}");
        }
        let pop = |r: &ReadModels, a: AsOf| {
            without_as_of(serde_json::to_value(r.population(a).expect("pop")).expect("json"))
        };
        assert_eq!(
            pop(&full_reads, AsOf::knowledge(at)),
            pop(&partial_reads, AsOf::business(at)),
            "population at day {t}"
        );
    }
    // The two axes differ where they should: on day 30 the late purchase (occurred day 5,
    // recorded day 40) is part of the business history but was not yet known.
    let business = full_reads
        .customer("cust-1", AsOf::business(day(30)))
        .expect("read")
        .expect("known");
    let knowledge = full_reads
        .customer("cust-1", AsOf::knowledge(day(30)))
        .expect("read")
        .expect("known");
    // Business axis: p1 retracted (known today) + late purchase = 1 purchase-day;
    // knowledge axis on day 30: p1 only (the retraction came on day 60).
    assert_eq!(business.loyalty.behaviour.purchase_days, 1);
    assert_eq!(
        business.loyalty.behaviour.first,
        Some(Timestamp::from_unix_nanos(
            (20_000 + 5) * 86_400 * 1_000_000_000
        ))
    );
    assert_eq!(knowledge.loyalty.behaviour.purchase_days, 1);
    assert_eq!(
        knowledge.loyalty.behaviour.first,
        Some(Timestamp::from_unix_nanos(
            (20_000 + 10) * 86_400 * 1_000_000_000
        ))
    );
}

/// A customer whose only events in a folded batch are the ledger's own churn assessments is
/// reported as `assessed_only` (no view depends on them: the serve loop evaluates nothing
/// again for it); a customer with any other event in the batch is not.
#[test]
fn customers_with_only_assessments_in_a_batch_are_marked_assessed_only() {
    use touchledger_domain::{ChurnLevel, ChurnRiskAssessed, LEDGER_SOURCE};
    use touchledger_projector::{Change, read_range};
    let (_dir, store) = crate::support::temp_store();
    let assessment = |id: &str, customer: &str| Event {
        event_id: id.into(),
        source: LEDGER_SOURCE.into(),
        payload: Payload::ChurnRiskAssessed(ChurnRiskAssessed {
            level: ChurnLevel::Watch,
            previous_level: ChurnLevel::None,
            score: 0.4,
            reasons: Vec::new(),
            probable_cause: None,
            since: None,
            expected_next_purchase: None,
            value_at_risk_minor: 0,
            currency: "EUR".into(),
            model_version: "none".into(),
            as_of: "2026-05-02T00:00:00Z".parse().expect("time"),
        }),
        ..purchase(id, customer, 0)
    };
    store
        .append(vec![
            AppendItem::new(purchase("p1", "a", 100)),
            AppendItem::new(purchase("p2", "b", 100)),
        ])
        .expect("append");
    store
        .append_ledger_events(vec![
            AppendItem::new(assessment("s1", "a")),
            AppendItem::new(assessment("s2", "b")),
        ])
        .expect("assess");
    store
        .append(vec![AppendItem::new(purchase("p3", "b", 50))])
        .expect("append");
    let (_pdir, mut ps) = empty_projectors();
    let churn = ps
        .iter_mut()
        .find(|p| p.spec().name == "churn")
        .expect("churn projector");
    // First batch: purchases and assessments of both; nobody is assessed-only.
    let events = read_range(&store, 1, 4).expect("read");
    let customers = churn.apply(&events).expect("apply");
    let change = Change::after(churn, customers, &events);
    assert_eq!(change.customers, vec!["a".to_owned(), "b".to_owned()]);
    assert!(change.assessed_only.is_empty(), "{change:?}");
    // Second batch: only a's assessment... and b's purchase.
    let (_pdir2, mut ps2) = empty_projectors();
    let churn2 = ps2
        .iter_mut()
        .find(|p| p.spec().name == "churn")
        .expect("churn projector");
    churn2
        .apply(&read_range(&store, 1, 2).expect("read"))
        .expect("apply");
    let events = read_range(&store, 3, 5).expect("read");
    let customers = churn2.apply(&events).expect("apply");
    let change = Change::after(churn2, customers, &events);
    assert_eq!(change.customers, vec!["a".to_owned(), "b".to_owned()]);
    assert_eq!(
        change.assessed_only.into_iter().collect::<Vec<_>>(),
        vec!["a".to_owned()]
    );
}

/// A projector whose changes nobody reads any more (its channel full) still stops when the
/// ledger shuts down, with its folded batches checkpointed: a serve stopped while its views lag
/// far behind once hung here until its 15-second shutdown bound killed it.
#[test]
fn a_projector_blocked_on_unread_changes_stops_at_shutdown() {
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;
    use touchledger_projector::{RunConfig, run_in_process};
    let (_dir, store) = crate::support::temp_store();
    for b in 0..10 {
        let items = (0..10)
            .map(|i| AppendItem::new(purchase(&format!("e{b}-{i}"), &format!("c{i}"), 100)))
            .collect();
        store.append(items).expect("append");
    }
    let store = Arc::new(store);
    let (_pdir, ps) = empty_projectors();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // Room for one change; nothing ever receives (the receiver is kept, not dropped).
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let full = tx.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_in_process(
            store.clone(),
            ps,
            RunConfig { batch: 10 },
            Some(tx),
            shutdown.clone(),
        ));
        // The first change fills the channel; the projector then waits to send the second
        // (three projections: each batch reports three changes).
        let waited = std::time::Instant::now();
        while full.capacity() > 0 {
            assert!(waited.elapsed() < Duration::from_secs(10), "no change sent");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !task.is_finished(),
            "the projector waits on the full channel"
        );
        shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the projector stops within 10 s of the shutdown");
        r.expect("task").expect("no error");
    });
}
