//! Crash test (brief §5 durability): a child process appends batches and reports each batch
//! only after `append` returned; it is killed with SIGKILL at random moments. After each kill
//! the directory is reopened: every reported batch is present, no batch is partially present,
//! positions are gapless and `verify` passes. The child is this test binary, re-invoked.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use touchledger_store::{AppendItem, EventStore, ReadFilter};

use crate::support::{fixed_clock_store, purchase};

const CHILD_ENV: &str = "TOUCHLEDGER_CRASH_CHILD_DIR";
const TRIAL_ENV: &str = "TOUCHLEDGER_CRASH_TRIAL";
const TRIALS: u64 = 24;

/// Size of batch `k`: 1..=64, varied so kills land in batches of every size.
fn batch_size(k: u64) -> u64 {
    1 + (k * 7919) % 64
}

/// Not a test on its own: the child side of `kill_9_loses_nothing_acknowledged`. Without the
/// environment variable it returns at once.
#[test]
fn crash_child_helper() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let trial: u64 = std::env::var(TRIAL_ENV)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let store = fixed_clock_store(std::path::Path::new(&dir));
    let mut out = std::io::stdout().lock();
    for k in 0.. {
        let items = (0..batch_size(k))
            .map(|i| {
                AppendItem::new(purchase(
                    &format!("t{trial}-b{k}-i{i}"),
                    &format!("cust-{}", (k + i) % 7),
                    100,
                ))
            })
            .collect();
        store.append(items).expect("append");
        // Reported only after append returned, i.e. after the flush.
        writeln!(out, "COMMITTED {k}").expect("stdout");
        out.flush().expect("flush stdout");
    }
}

#[test]
fn kill_9_loses_nothing_acknowledged() {
    // Kill at a random moment between 30 and 430 ms after start (the child opens the store and
    // starts appending within the first few ms).
    kill_loop(TRIALS, 30, 400, 0);
}

/// sled 0.34 writes its recovery snapshot while it opens a directory whose log has grown
/// (`snap.<LSN>.generating`, then a rename). Kills in the first milliseconds of the child land
/// in that write; a half-written snapshot made the store unopenable before the leftovers were
/// quarantined (issue #16). Every reopen must succeed and lose nothing acknowledged.
#[test]
fn kill_9_during_open_and_its_snapshot_reopens_every_time() {
    let quarantined = kill_loop(40, 0, 25, 20_000);
    eprintln!(
        "kills during open: {quarantined} half-written snapshot(s) quarantined over 40 reopens"
    );
}

/// Kill the writer `trials` times, each `min_ms` + up to `spread_ms` after its start; returns
/// how many sled leftovers the reopens quarantined.
fn kill_loop(trials: u64, min_ms: u64, spread_ms: u64, prefill: u64) -> usize {
    let mut quarantined = 0;
    let dir = tempfile::tempdir().expect("tempdir");
    // A grown log makes the snapshot written at each open larger (and a kill inside it likelier).
    let prefilled = {
        let store = fixed_clock_store(dir.path());
        for b in 0..prefill / 500 {
            let items = (0..500)
                .map(|i| {
                    AppendItem::new(purchase(
                        &format!("pre-{b}-{i}"),
                        &format!("pre-{}", i % 97),
                        100,
                    ))
                })
                .collect();
            store.append(items).expect("prefill");
        }
        store.head().position
    };
    let exe = std::env::current_exe().expect("current exe");
    let mut expected_total = prefilled;
    let mut seed = 0x5eed_u64;
    for trial in 0..trials {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut child = Command::new(&exe)
            .args([
                "crash::crash_child_helper",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env(TRIAL_ENV, trial.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            let mut committed = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(k) = line.strip_prefix("COMMITTED ") {
                    committed.push(k.parse::<u64>().expect("batch number"));
                }
            }
            committed
        });
        let delay = Duration::from_millis(min_ms + (seed >> 33) % spread_ms);
        let start = Instant::now();
        while start.elapsed() < delay {
            if child.try_wait().expect("try_wait").is_some() {
                panic!("child exited on its own");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        let committed = reader.join().expect("reader");

        let store = fixed_clock_store(dir.path());
        quarantined += store.quarantined().len();
        // Group this trial's stored events by batch.
        let mut batches: BTreeMap<u64, u64> = BTreeMap::new();
        let prefix = format!("t{trial}-b");
        let mut stored_total = 0u64;
        for c in store.read(&ReadFilter::default()) {
            let c = c.expect("read");
            stored_total += 1;
            assert_eq!(c.position, stored_total, "positions are gapless");
            if let Some(rest) = c.event.event_id.strip_prefix(&prefix) {
                let k: u64 = rest
                    .split('-')
                    .next()
                    .and_then(|k| k.parse().ok())
                    .expect("batch");
                *batches.entry(k).or_default() += 1;
            }
        }
        for k in &committed {
            assert_eq!(
                batches.get(k).copied(),
                Some(batch_size(*k)),
                "trial {trial}: acknowledged batch {k} lost or partial"
            );
        }
        for (k, n) in &batches {
            assert_eq!(
                *n,
                batch_size(*k),
                "trial {trial}: batch {k} partially present"
            );
        }
        // Batches are committed in order: what is stored is a prefix 0..m of this trial's batches.
        let ks: Vec<u64> = batches.keys().copied().collect();
        assert_eq!(
            ks,
            (0..ks.len() as u64).collect::<Vec<_>>(),
            "trial {trial}: stored batches are not a prefix"
        );
        expected_total += batches.values().sum::<u64>();
        assert_eq!(stored_total, expected_total);
        assert_eq!(store.head().position, expected_total);
        let report = store.verify().expect("verify");
        assert!(report.is_ok(), "trial {trial}: {report:?}");
        eprintln!(
            "trial {trial}: killed after {delay:?}, {} batches acknowledged, {} stored",
            committed.len(),
            batches.len()
        );
    }
    assert!(
        expected_total > prefilled,
        "the children never committed anything: the test proved nothing"
    );
    quarantined
}
