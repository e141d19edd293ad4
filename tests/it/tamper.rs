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
    // sled releases its directory lock only when the dropped store's flusher thread stops,
    // which can take a moment on a busy machine (the store's own `open` waits the same way).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let db = loop {
        match sled::open(dir) {
            Ok(db) => break db,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("open raw: {e}"),
        }
    };
    let tree = db.open_tree(layout::TREE).expect("tree");
    edit(&tree);
    db.flush().expect("flush");
}

/// A block as the attacker sees it: its first position, zone map and (hash, record) entries.
struct RawBlock {
    first: u64,
    zone: (touchledger_domain::Timestamp, touchledger_domain::Timestamp),
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawBlock {
    /// The block holding `position`.
    fn holding(t: &sled::Tree, position: u64) -> RawBlock {
        let (k, v) = t
            .get_lt(layout::block_key(position + 1))
            .expect("get")
            .expect("a block");
        let first = layout::trailing_u64(&k).expect("key");
        let view = layout::BlockView::parse(&v).expect("block");
        assert!(
            position < first + view.len() as u64,
            "block holds {position}"
        );
        RawBlock {
            first,
            zone: (view.min_occurred(), view.max_occurred()),
            entries: view
                .entries()
                .map(|(h, r)| (h.to_vec(), r.to_vec()))
                .collect(),
        }
    }

    fn entry(&mut self, position: u64) -> &mut (Vec<u8>, Vec<u8>) {
        &mut self.entries[(position - self.first) as usize]
    }

    /// Write `entries` back as one block starting at `first`.
    fn write(
        t: &sled::Tree,
        first: u64,
        zone: (touchledger_domain::Timestamp, touchledger_domain::Timestamp),
        entries: &[(Vec<u8>, Vec<u8>)],
    ) {
        let refs: Vec<(&[u8], &[u8])> = entries
            .iter()
            .map(|(h, r)| (h.as_slice(), r.as_slice()))
            .collect();
        t.insert(layout::block_key(first), layout::encode_block(&refs, zone))
            .expect("insert");
    }

    fn store(&self, t: &sled::Tree) {
        RawBlock::write(t, self.first, self.zone, &self.entries);
    }
}

#[test]
fn altered_record_is_named_by_position() {
    let dir = ledger_with(50);
    tamper(dir.path(), |t| {
        let mut b = RawBlock::holding(t, 17);
        let (_, v) = b.entry(17);
        // Change the purchase amount inside the record: 100+16 = 116 → 117 (varint byte).
        let i = v.iter().rposition(|b| *b == 116).expect("amount byte");
        v[i] = 117;
        b.store(t);
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
        let mut b = RawBlock::holding(t, 20);
        let prev = b.entry(19).0.clone();
        let (hash, record) = b.entry(20);
        let i = record.iter().rposition(|b| *b == 119).expect("amount byte");
        record[i] = 120;
        let mut h = blake3::Hasher::new();
        h.update(&prev);
        h.update(record);
        *hash = h.finalize().as_bytes().to_vec();
        b.store(t);
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
        // Cut record 30 out: the records before and after it stay, in blocks of their own.
        let b = RawBlock::holding(t, 30);
        let cut = (30 - b.first) as usize;
        t.remove(layout::block_key(b.first)).expect("remove");
        if cut > 0 {
            RawBlock::write(t, b.first, b.zone, &b.entries[..cut]);
        }
        RawBlock::write(t, 31, b.zone, &b.entries[cut + 1..]);
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

#[test]
fn damaged_indexes_and_zone_maps_are_found() {
    // A zone map that no longer covers its records would hide them from time-filtered reads.
    let dir = ledger_with(50);
    tamper(dir.path(), |t| {
        let mut b = RawBlock::holding(t, 1);
        b.zone.1 = touchledger_domain::Timestamp::from_unix_nanos(0);
        b.store(t);
    });
    match fixed_clock_store(dir.path()).verify().expect("verify") {
        VerifyReport::Failed {
            position: 1,
            problem: VerifyProblem::Index(_),
        } => {}
        other => panic!("expected a zone-map failure at block 1, got {other:?}"),
    }

    // A customer's run removed from the customer index (written: the test store indexes every
    // 7 events) is found at that customer's first event.
    let dir = ledger_with(50);
    tamper(dir.path(), |t| {
        t.remove(layout::customer_key("c2", 1)).expect("remove");
    });
    match fixed_clock_store(dir.path()).verify().expect("verify") {
        VerifyReport::Failed {
            position: 3,
            problem: VerifyProblem::Index(_),
        } => {}
        other => panic!("expected a customer-index failure at position 3, got {other:?}"),
    }

    // The kind run of the batch removed: the first purchase is reported.
    let dir = ledger_with(50);
    tamper(dir.path(), |t| {
        t.remove(layout::kind_key(touchledger_domain::EventKind::Purchase, 1))
            .expect("remove");
    });
    match fixed_clock_store(dir.path()).verify().expect("verify") {
        VerifyReport::Failed {
            position: 1,
            problem: VerifyProblem::Index(_),
        } => {}
        other => panic!("expected a kind-index failure at position 1, got {other:?}"),
    }
}
