//! A system of record that survives its storage (issue #16): sled leftovers quarantined on
//! open, damage reported with the documented exit code, restore from an export record for
//! record, and the free-space reserve on the offline append path.

use touchledger_cli::{EXIT_OK, EXIT_STORAGE_FULL, EXIT_VERIFY_FAILED};
use touchledger_store::{AppendItem, EventStore, QUARANTINE_DIR, SledStore, StoreConfig};

use crate::cli::cli;
use crate::support::{fixed_clock_store, purchase};

fn fill(store: &SledStore, n: u64) {
    for b in 0..n / 100 {
        let items = (0..100)
            .map(|i| {
                AppendItem::new(purchase(
                    &format!("e-{b}-{i}"),
                    &format!("c-{}", (b * 100 + i) % 37),
                    100 + i as i64,
                ))
            })
            .collect();
        store.append(items).expect("append");
    }
}

#[test]
fn half_written_snapshots_are_quarantined_and_the_store_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let head = {
        let store = fixed_clock_store(dir.path());
        fill(&store, 2_000);
        store.head()
    };
    // What sled leaves behind when the disk fills or the process dies while it writes a
    // snapshot: an empty one, and one with a partial body.
    std::fs::write(dir.path().join("snap.00000000FFFFFFFF.generating"), b"").expect("write");
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| i.wrapping_mul(2_654_435_761) as u8)
        .collect();
    std::fs::write(dir.path().join("snap.00000000FFFFFFFE.generating"), garbage).expect("write");
    // sled alone cannot open this directory: the condition is real.
    let raw = sled::Config::new().path(dir.path()).open();
    assert!(
        raw.is_err(),
        "sled opened a directory with a half-written snapshot"
    );
    drop(raw);

    let store = fixed_clock_store(dir.path());
    let mut moved: Vec<String> = store
        .quarantined()
        .iter()
        .map(|q| {
            q.from
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    moved.sort();
    assert_eq!(
        moved,
        [
            "snap.00000000FFFFFFFE.generating",
            "snap.00000000FFFFFFFF.generating"
        ]
    );
    for q in store.quarantined() {
        assert!(q.to.starts_with(dir.path().join(QUARANTINE_DIR)));
        assert!(q.to.exists(), "moved, never deleted");
    }
    assert_eq!(store.head(), head);
    assert!(store.verify().expect("verify").is_ok());
    drop(store);
    // Nothing left to move on the next open.
    assert!(fixed_clock_store(dir.path()).quarantined().is_empty());
}

#[test]
fn a_damaged_log_is_exit_code_3_naming_the_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("ledger");
    let file = dir.path().join("events.jsonl");
    let (f, d) = (file.to_str().expect("utf8"), data.to_str().expect("utf8"));
    assert_eq!(
        cli(&["generate", "--out", f, "--events", "3000"]).0,
        EXIT_OK
    );
    assert_eq!(cli(&["append", "--data", d, "--file", f]).0, EXIT_OK);
    // Two kinds of damage to sled's log `db`: its first MiB garbled (sled 0.34 panics while
    // reading it), and all of it garbled (sled sees an empty database; the LEDGER marker tells
    // that from a new directory).
    for garbled in [Some(1 << 20), None] {
        let case = dir.path().join(format!("case-{garbled:?}"));
        copy_dir(&data, &case);
        let mut bytes = std::fs::read(case.join("db")).expect("read db");
        let n = garbled.unwrap_or(bytes.len());
        for b in bytes.iter_mut().take(n) {
            *b ^= 0x5a;
        }
        std::fs::write(case.join("db"), bytes).expect("write db");
        let d = case.to_str().expect("utf8");
        let (code, _, err) = cli(&["stats", "--data", d]);
        assert_eq!(code, EXIT_VERIFY_FAILED, "{n} bytes garbled: {err}");
        assert!(err.contains("is damaged") && err.contains(d), "{err}");
        assert!(err.contains("touchledger restore"), "{err}");
    }
    // The copies were damaged, not the original.
    let store = SledStore::open(StoreConfig::new(&data)).expect("open");
    assert_eq!(store.head().position, 3_000);
    assert!(store.verify().expect("verify").is_ok());
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

/// Every stored record (the bytes its hash covers) with its hash, in position order.
fn records(store: &SledStore) -> Vec<(Vec<u8>, [u8; 32])> {
    store
        .read_raw(1, None)
        .map(|r| {
            let r = r.expect("raw");
            (r.record, r.hash.0)
        })
        .collect()
}

#[test]
fn restore_rebuilds_every_record_and_refuses_a_tampered_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n).to_str().expect("utf8").to_owned();
    let (code, _, err) = cli(&[
        "generate",
        "--out",
        &p("events.jsonl"),
        "--events",
        "3000",
        "--seed",
        "7",
    ]);
    assert_eq!(code, EXIT_OK, "{err}");
    // Small batches: many distinct recorded_at values, as in a ledger that grew over time.
    let (code, _, err) = cli(&[
        "append",
        "--data",
        &p("orig"),
        "--file",
        &p("events.jsonl"),
        "--batch",
        "64",
    ]);
    assert!(code == EXIT_OK || code == 4, "{err}");
    for (format, ext) in [("jsonl", "jsonl"), ("csv", "csv")] {
        let export = p(&format!("export.{ext}"));
        let (code, _, err) = cli(&[
            "export",
            "--data",
            &p("orig"),
            "--out",
            &export,
            "--format",
            format,
        ]);
        assert_eq!(code, EXIT_OK, "{err}");
        let head = SledStore::open(StoreConfig::new(p("orig")))
            .expect("open")
            .head();
        let checkpoint = format!("{}:{}", head.position, head.hash);
        let target = p(&format!("restored-{ext}"));
        let (code, out, err) = cli(&[
            "restore",
            "--data",
            &target,
            "--from",
            &export,
            "--format",
            format,
            "--checkpoint",
            &checkpoint,
        ]);
        assert_eq!(code, EXIT_OK, "{out}{err}");
        assert!(out.contains("matches checkpoint"), "{out}");
        let orig = SledStore::open(StoreConfig::new(p("orig"))).expect("open");
        let restored = SledStore::open(StoreConfig::new(&target)).expect("open");
        assert_eq!(restored.head(), orig.head());
        let (a, b) = (records(&orig), records(&restored));
        assert_eq!(a.len() as u64, head.position);
        assert!(
            a == b,
            "{format}: restored records differ from the original"
        );
        let cps = |s: &SledStore| s.checkpoints().map(|c| c.expect("cp")).collect::<Vec<_>>();
        assert_eq!(cps(&orig), cps(&restored));
        assert!(restored.verify().expect("verify").is_ok());
    }

    // One changed amount in the middle of the export: refused at that position, and what was
    // restored before it is exactly the original prefix.
    let text = std::fs::read_to_string(p("export.jsonl")).expect("read");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let victim = (1_000..lines.len())
        .find(|i| lines[*i].contains("\"amount_minor\":"))
        .expect("a purchase after line 1000");
    let position: u64 =
        serde_json::from_str::<serde_json::Value>(&lines[victim]).expect("json")["position"]
            .as_u64()
            .expect("position");
    lines[victim] = lines[victim].replacen("\"amount_minor\":", "\"amount_minor\":1", 1);
    std::fs::write(p("tampered.jsonl"), lines.join("\n") + "\n").expect("write");
    let (code, out, err) = cli(&[
        "restore",
        "--data",
        &p("restored-bad"),
        "--from",
        &p("tampered.jsonl"),
    ]);
    assert_eq!(code, EXIT_VERIFY_FAILED, "{out}{err}");
    assert!(
        out.contains(&format!("REFUSED at position {position}")),
        "{out}"
    );
    let bad = SledStore::open(StoreConfig::new(p("restored-bad"))).expect("open");
    assert!(bad.head().position < position);
    let orig = SledStore::open(StoreConfig::new(p("orig"))).expect("open");
    let prefix = records(&orig);
    assert_eq!(records(&bad)[..], prefix[..bad.head().position as usize]);
}

#[test]
fn append_stops_at_the_reserve_with_exit_code_6_and_reports_what_is_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n).to_str().expect("utf8").to_owned();
    let (code, _, err) = cli(&["generate", "--out", &p("events.jsonl"), "--events", "500"]);
    assert_eq!(code, EXIT_OK, "{err}");
    // A reserve larger than any disk here: the first batch is refused before sled sees it.
    let (code, out, err) = cli(&[
        "append",
        "--data",
        &p("ledger"),
        "--file",
        &p("events.jsonl"),
        "--batch",
        "100",
        "--reserve-mib",
        "1000000000",
    ]);
    assert_eq!(code, EXIT_STORAGE_FULL, "{out}{err}");
    assert!(err.contains("storage full"), "{err}");
    assert!(out.contains("appended          0"), "{out}");
    // Space is back (the default reserve): the same file goes in whole, nothing was half written.
    let (code, out, err) = cli(&[
        "append",
        "--data",
        &p("ledger"),
        "--file",
        &p("events.jsonl"),
        "--batch",
        "100",
    ]);
    assert_eq!(code, EXIT_OK, "{out}{err}");
    assert!(out.contains("appended          500"), "{out}");
}
