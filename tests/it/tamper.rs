//! Tamper evidence: records altered or removed behind the store's back (directly in the sled
//! tree) make `verify` fail and name the first bad position — through the API and the CLI.

use touchledger_store::layout;
use touchledger_store::{AppendItem, EventStore, VerifyProblem, VerifyReport};

use crate::support::{fixed_clock_store, purchase};

fn ledger_with(n: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = fixed_clock_store(dir.path());
    let items = (0..n)
        .map(|i| {
            AppendItem::new(purchase(
                &format!("e{i}"),
                &format!("c{}", i % 4),
                100 + i as i64,
            ))
        })
        .collect();
    store.append(items).expect("append");
    assert!(store.verify().expect("verify").is_ok());
    dir
}

/// Edit the raw tree with the store closed, as an attacker with disk access would.
fn tamper(dir: &std::path::Path, edit: impl FnOnce(&sled::Tree)) {
    let db = sled::open(dir).expect("open raw");
    let tree = db.open_tree(layout::TREE).expect("tree");
    edit(&tree);
    db.flush().expect("flush");
}

#[test]
fn altered_record_is_named_by_position() {
    let dir = ledger_with(50);
    tamper(dir.path(), |t| {
        let key = layout::event_key(17);
        let mut v = t.get(key).expect("get").expect("present").to_vec();
        // Change the purchase amount inside the record: 100+16 = 116 → 117 (varint byte).
        let i = v.iter().rposition(|b| *b == 116).expect("amount byte");
        v[i] = 117;
        t.insert(key, v).expect("insert");
    });
    let store = fixed_clock_store(dir.path());
    assert_eq!(
        store.verify().expect("verify"),
        VerifyReport::Failed {
            position: 17,
            problem: VerifyProblem::HashMismatch
        }
    );
    drop(store);
    let mut out = Vec::new();
    let code = touchledger_cli::run(
        [
            "touchledger",
            "verify",
            "--data",
            dir.path().to_str().expect("utf8"),
        ],
        &mut out,
        &mut Vec::new(),
    );
    assert_eq!(code, touchledger_cli::EXIT_VERIFY_FAILED);
    assert!(String::from_utf8_lossy(&out).contains("FAILED at position 17"));
}

#[test]
fn rehashed_record_is_still_caught() {
    let dir = ledger_with(50);
    tamper(dir.path(), |t| {
        // A cleverer attacker also rewrites the record's own hash. The chain link to the next
        // record would break at 21, but the content digest taken at append catches it at 20.
        let key = layout::event_key(20);
        let v = t.get(key).expect("get").expect("present").to_vec();
        let (_, record) = v.split_at(32);
        let mut record = record.to_vec();
        let i = record.iter().rposition(|b| *b == 119).expect("amount byte");
        record[i] = 120;
        let prev = &t.get(layout::event_key(19)).expect("get").expect("present")[..32];
        let mut h = blake3::Hasher::new();
        h.update(prev);
        h.update(&record);
        let mut nv = h.finalize().as_bytes().to_vec();
        nv.extend_from_slice(&record);
        t.insert(key, nv).expect("insert");
    });
    let store = fixed_clock_store(dir.path());
    assert_eq!(
        store.verify().expect("verify"),
        VerifyReport::Failed {
            position: 20,
            problem: VerifyProblem::ContentMismatch
        }
    );
}

#[test]
fn removed_record_is_a_gap_and_removed_index_entry_is_found() {
    let dir = ledger_with(50);
    tamper(dir.path(), |t| {
        t.remove(layout::event_key(30)).expect("remove");
    });
    let store = fixed_clock_store(dir.path());
    assert_eq!(
        store.verify().expect("verify"),
        VerifyReport::Failed {
            position: 30,
            problem: VerifyProblem::Gap
        }
    );
    drop(store);

    let dir = ledger_with(50);
    tamper(dir.path(), |t| {
        t.remove(layout::event_id_key("e7")).expect("remove");
    });
    let store = fixed_clock_store(dir.path());
    match store.verify().expect("verify") {
        VerifyReport::Failed {
            position: 8,
            problem: VerifyProblem::Index(_),
        } => {}
        other => panic!("expected an index failure at position 8, got {other:?}"),
    }
}

#[test]
fn checkpoints_are_stored_and_checked() {
    // The test store checkpoints every 10 positions.
    let dir = ledger_with(35);
    let store = fixed_clock_store(dir.path());
    let cps: Vec<_> = store
        .checkpoints()
        .map(|c| c.expect("checkpoint"))
        .collect();
    assert_eq!(
        cps.iter().map(|c| c.position).collect::<Vec<_>>(),
        vec![10, 20, 30]
    );
    for cp in &cps {
        assert_eq!(
            store.get(cp.position).expect("get").expect("present").hash,
            cp.hash
        );
    }
    drop(store);
    tamper(dir.path(), |t| {
        let key = layout::checkpoint_key(20);
        let mut v = t.get(key).expect("get").expect("present").to_vec();
        let n = v.len();
        v[n / 2] ^= 0xff;
        t.insert(key, v).expect("insert");
    });
    let store = fixed_clock_store(dir.path());
    match store.verify().expect("verify") {
        VerifyReport::Failed {
            position: 20,
            problem: VerifyProblem::Checkpoint(_),
        } => {}
        other => panic!("expected a checkpoint failure at 20, got {other:?}"),
    }
}
