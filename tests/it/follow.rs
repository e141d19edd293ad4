//! In-process consumers follow new commits through the head watch, without polling.

use touchledger_store::{AppendItem, EventStore, ReadFilter};

use crate::support::{purchase, temp_store};

#[test]
fn watchers_are_woken_by_commits_only() {
    let (_dir, store) = temp_store();
    let mut rx = store.subscribe();
    assert!(!rx.has_changed().expect("open"));

    store
        .append(vec![
            AppendItem::new(purchase("a", "c1", 1)),
            AppendItem::new(purchase("b", "c1", 2)),
        ])
        .expect("append");
    assert!(rx.has_changed().expect("open"));
    let head = *rx.borrow_and_update();
    assert_eq!(head.position, 2);

    // A batch that commits nothing new (a duplicate) does not wake anyone.
    store
        .append(vec![AppendItem::new(purchase("a", "c1", 1))])
        .expect("append");
    assert!(!rx.has_changed().expect("open"));

    // A follower reads what is new since its last position.
    store
        .append(vec![AppendItem::new(purchase("c", "c2", 3))])
        .expect("append");
    assert!(rx.has_changed().expect("open"));
    let new: Vec<_> = store
        .read(&ReadFilter {
            from_position: head.position + 1,
            to_position: Some(rx.borrow_and_update().position),
            ..Default::default()
        })
        .map(|c| c.expect("read").event.event_id)
        .collect();
    assert_eq!(new, ["c"]);
}

#[test]
fn reads_by_kind_time_and_customer() {
    let (_dir, store) = temp_store();
    let mut late = purchase("late", "c2", 5);
    late.occurred_at = "2026-01-01T00:00:00Z".parse().expect("time");
    store
        .append(vec![
            AppendItem::new(purchase("p1", "c1", 1)),
            AppendItem::new(late),
            AppendItem::new(crate::support::retraction("r1", "c1", "p1")),
        ])
        .expect("append");
    let kind: Vec<_> = store
        .read(&ReadFilter {
            kind: Some(touchledger_domain::EventKind::Retraction),
            ..Default::default()
        })
        .map(|c| c.expect("read").event.event_id)
        .collect();
    assert_eq!(kind, ["r1"]);
    // Business-time order differs from position order: the late-arriving event comes first.
    let by_time: Vec<_> = store
        .read_by_occurred(
            "2025-01-01".parse().expect("t"),
            "2027-01-01".parse().expect("t"),
        )
        .map(|c| c.expect("read").event.event_id)
        .collect();
    assert_eq!(by_time, ["late", "p1", "r1"]);
    let since: Vec<_> = store
        .read(&ReadFilter {
            occurred_since: Some("2026-02-01".parse().expect("t")),
            ..Default::default()
        })
        .map(|c| c.expect("read").position)
        .collect();
    assert_eq!(since, [1, 3]);
    let cust: Vec<_> = store
        .read(&ReadFilter {
            customer: Some("c1".into()),
            from_position: 2,
            ..Default::default()
        })
        .map(|c| c.expect("read").customer_version)
        .collect();
    assert_eq!(cust, [2]);
}

#[test]
fn a_format_mismatch_is_refused_precisely() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(crate::support::fixed_clock_store(dir.path()));
    {
        let db = sled::open(dir.path()).expect("raw");
        let t = db.open_tree(touchledger_store::layout::TREE).expect("tree");
        t.insert(touchledger_store::layout::META_FORMAT, &99u32.to_be_bytes())
            .expect("insert");
        db.flush().expect("flush");
    }
    let err = touchledger_store::SledStore::open(touchledger_store::StoreConfig::new(dir.path()))
        .err()
        .expect("must refuse");
    assert!(
        matches!(
            err,
            touchledger_store::StoreError::FormatMismatch {
                found: 99,
                expected: 1,
                ..
            }
        ),
        "{err}"
    );
    let mut errout = Vec::new();
    let code = touchledger_cli::run(
        [
            "touchledger",
            "stats",
            "--data",
            dir.path().to_str().expect("utf8"),
        ],
        &mut Vec::new(),
        &mut errout,
    );
    assert_eq!(code, touchledger_cli::EXIT_DATA_DIR);
    assert!(String::from_utf8_lossy(&errout).contains("format version 99"));
}

#[test]
fn raw_records_carry_the_exact_hashed_bytes() {
    use prost::Message;
    let (_dir, store) = temp_store();
    let items = (0..25)
        .map(|i| AppendItem::new(purchase(&format!("e{i}"), "c1", i)))
        .collect();
    store.append(items).expect("append");
    let decoded: Vec<_> = store
        .read(&ReadFilter::default())
        .map(|c| c.expect("read"))
        .collect();
    let raw: Vec<_> = store.read_raw(1, None).map(|r| r.expect("raw")).collect();
    assert_eq!(raw.len(), 25);
    let mut prev = [0u8; 32];
    for (r, c) in raw.iter().zip(&decoded) {
        // A remote consumer can verify the chain from the raw bytes alone.
        let mut h = blake3::Hasher::new();
        h.update(&prev);
        h.update(&r.record);
        assert_eq!(h.finalize().as_bytes(), &r.hash.0);
        assert_eq!(r.hash, c.hash);
        assert_eq!(
            c.record_bytes(),
            r.record,
            "re-encoding a read event reproduces the stored bytes"
        );
        let rec =
            touchledger_proto::v1::StoredRecord::decode(r.record.as_slice()).expect("decodes");
        assert_eq!(rec.position, c.position);
        assert_eq!(rec.customer_version, c.customer_version);
        prev = r.hash.0;
    }
    assert_eq!(
        store
            .read_raw(10, Some(12))
            .map(|r| r.expect("raw").position)
            .collect::<Vec<_>>(),
        [10, 11, 12]
    );
}
