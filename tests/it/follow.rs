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
    // A business-time window is a filter; the order stays the log's.
    let window: Vec<_> = store
        .read(&ReadFilter {
            occurred_since: Some("2025-01-01".parse().expect("t")),
            occurred_until: Some("2026-02-01".parse().expect("t")),
            ..Default::default()
        })
        .map(|c| c.expect("read").event.event_id)
        .collect();
    assert_eq!(window, ["late"]);
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
                expected: touchledger_store::layout::FORMAT_VERSION,
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

/// Reads through blocks, kind runs, zone maps and the customer index (durable runs and the
/// in-memory tail, before and after a reopen) agree with a brute-force filter of the whole log.
#[test]
fn every_read_path_agrees_with_a_full_scan() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The customer index written every 7 events (support store), or never (default 32,768:
    // everything stays in the tail, which a reopen rebuilds).
    for (name, tiny_index) in [("runs", true), ("tail", false)] {
        let path = dir.path().join(name);
        let open = || {
            if tiny_index {
                crate::support::fixed_clock_store(&path)
            } else {
                let mut cfg = touchledger_store::StoreConfig::new(&path);
                cfg.clock = std::sync::Arc::new(crate::support::now);
                touchledger_store::SledStore::open(cfg).expect("open")
            }
        };
        let store = open();
        // 1,200 events in batches of 300 (several blocks each), business time by batch, with
        // every 50th event a retraction of the one before it.
        let mut n = 0u64;
        for batch in 0..4u32 {
            let mut items = Vec::new();
            for _ in 0..300 {
                let mut e = if n % 50 == 49 {
                    crate::support::retraction(
                        &format!("e{n}"),
                        &format!("c{}", (n - 1) % 37),
                        &format!("e{}", n - 1),
                    )
                } else {
                    purchase(&format!("e{n}"), &format!("c{}", n % 37), n as i64)
                };
                e.occurred_at = month(batch * 2 + (n % 2) as u32);
                items.push(AppendItem::new(e));
                n += 1;
            }
            store.append(items).expect("append");
        }
        check_every_read(&store, &format!("{name}, before reopening"));
        drop(store);
        check_every_read(&open(), &format!("{name}, reopened"));
    }
}

fn month(m: u32) -> touchledger_domain::Timestamp {
    format!("2025-{:02}-15T00:00:00Z", m % 12 + 1)
        .parse()
        .expect("t")
}

fn check_every_read(store: &touchledger_store::SledStore, name: &str) {
    use touchledger_domain::EventKind;
    let all: Vec<_> = store
        .read(&ReadFilter::default())
        .map(|c| c.expect("read"))
        .collect();
    assert_eq!(all.len(), 1200, "{name}");
    for c in all.iter().step_by(97) {
        assert_eq!(store.get(c.position).expect("get").as_ref(), Some(c));
    }
    assert_eq!(store.get(1201).expect("get"), None);
    let check = |f: ReadFilter| {
        let got: Vec<_> = store.read(&f).map(|c| c.expect("read").position).collect();
        let want: Vec<_> = all
            .iter()
            .filter(|c| {
                c.position >= f.from_position
                    && f.to_position.is_none_or(|t| c.position <= t)
                    && f.customer
                        .as_ref()
                        .is_none_or(|x| &c.event.customer_id == x)
                    && f.kind.is_none_or(|k| c.event.kind() == k)
                    && f.occurred_since.is_none_or(|s| c.event.occurred_at >= s)
                    && f.occurred_until.is_none_or(|u| c.event.occurred_at < u)
            })
            .map(|c| c.position)
            .collect();
        assert!(!want.is_empty(), "{f:?}");
        assert_eq!(got, want, "{name}: {f:?}");
    };
    check(ReadFilter {
        occurred_since: Some(month(2)),
        occurred_until: Some(month(4)),
        ..Default::default()
    });
    check(ReadFilter {
        from_position: 333,
        to_position: Some(901),
        occurred_since: Some(month(5)),
        ..Default::default()
    });
    check(ReadFilter {
        kind: Some(EventKind::Retraction),
        from_position: 120,
        to_position: Some(1000),
        ..Default::default()
    });
    check(ReadFilter {
        customer: Some("c5".into()),
        from_position: 400,
        ..Default::default()
    });
    check(ReadFilter {
        customer: Some("c12".into()),
        kind: Some(EventKind::Purchase),
        occurred_until: Some(month(3)),
        ..Default::default()
    });
    let raw: Vec<_> = store
        .read_raw(299, Some(302))
        .map(|r| r.expect("raw").position)
        .collect();
    assert_eq!(raw, [299, 300, 301, 302]);
    for c in 0..37 {
        let customer = format!("c{c}");
        let n = all
            .iter()
            .filter(|x| x.event.customer_id == customer)
            .count();
        assert_eq!(
            store.customer_version(&customer).expect("version"),
            n as u64,
            "{name}"
        );
    }
    let stats = store.stats().expect("stats");
    assert_eq!(stats.customers, 37, "{name}");
    assert_eq!(
        stats.by_kind.iter().map(|(_, n)| n).sum::<u64>(),
        1200,
        "{name}"
    );
    assert!(store.verify().expect("verify").is_ok(), "{name}");
}
