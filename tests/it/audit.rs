//! Audit (issue 5, item 4): an export verifies on its own against a published checkpoint, and
//! fails after any change to the exported history — an altered field, a removed record, or an
//! altered record whose hashes were all recomputed (caught by the checkpoint).

use touchledger_domain::Event;
use touchledger_store::{Committed, EventStore, Hash, SledStore, StoreConfig};

use crate::cli::cli;

fn recompute_from(lines: &mut [serde_json::Value], from: usize) {
    let mut prev = if from == 0 {
        Hash::ZERO
    } else {
        let h = lines[from - 1]["hash"].as_str().expect("hash");
        Hash::from_slice(&hex_decode(h)).expect("32 bytes")
    };
    for l in lines.iter_mut().skip(from) {
        let event: Event = serde_json::from_value(l["event"].clone()).expect("event");
        let c = Committed {
            position: l["position"].as_u64().expect("position"),
            customer_version: l["customer_version"].as_u64().expect("version"),
            recorded_at: l["recorded_at"]
                .as_str()
                .expect("recorded_at")
                .parse()
                .expect("time"),
            prev_hash: prev,
            hash: Hash::ZERO,
            event,
        };
        let mut h = blake3::Hasher::new();
        h.update(&prev.0);
        h.update(&c.record_bytes());
        let hash = Hash(*h.finalize().as_bytes());
        l["prev_hash"] = serde_json::Value::String(prev.to_hex());
        l["hash"] = serde_json::Value::String(hash.to_hex());
        prev = hash;
    }
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn write_lines(path: &std::path::Path, lines: &[serde_json::Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).expect("write");
}

#[test]
fn an_export_verifies_against_a_checkpoint_and_fails_after_any_change() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("ledger");
    let d = data.to_str().expect("utf8");
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/data/cdnow/CDNOW_sample.txt");
    assert_eq!(
        cli(&["import", "cdnow", "--data", d, "--file", sample]).0,
        0
    );
    // A derived event with floating-point fields must survive the JSON round trip exactly.
    assert_eq!(cli(&["fit", "--data", d, "--as-of", "1997-09-30"]).0, 0);
    let (checkpoint, head) = {
        let store = SledStore::open(StoreConfig::new(&data)).expect("open");
        let cp = store
            .checkpoints()
            .map(|c| c.expect("checkpoint"))
            .find(|c| c.position == 6000)
            .expect("checkpoint 6000");
        (format!("{}:{}", cp.position, cp.hash), store.head())
    };
    assert_eq!(head.position, 6920);
    let export = dir.path().join("history.jsonl");
    let e = export.to_str().expect("utf8");
    let (code, out, err) = cli(&["export", "--data", d, "--out", e]);
    assert_eq!(code, 0, "{out}{err}");

    // The export alone proves the history up to the published checkpoint, and to the head.
    let (code, out, _) = cli(&["verify", "--export", e, "--checkpoint", &checkpoint]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("6920 exported records"), "{out}");
    let head_cp = format!("{}:{}", head.position, head.hash);
    assert_eq!(
        cli(&["verify", "--export", e, "--checkpoint", &head_cp]).0,
        0
    );
    // And the data directory against the same checkpoint.
    let (code, out, _) = cli(&["verify", "--data", d, "--checkpoint", &checkpoint]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("matches"), "{out}");
    let wrong = format!("6000:{}", "ab".repeat(32));
    let (code, out, _) = cli(&["verify", "--data", d, "--checkpoint", &wrong]);
    assert_eq!(code, 3, "{out}");

    let original: Vec<serde_json::Value> = std::fs::read_to_string(&export)
        .expect("read")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let tampered = dir.path().join("tampered.jsonl");
    let t = tampered.to_str().expect("utf8");

    // 1. One amount changed.
    let mut lines = original.clone();
    lines[1233]["event"]["purchase"]["amount_minor"] = serde_json::json!(1);
    write_lines(&tampered, &lines);
    let (code, out, _) = cli(&["verify", "--export", t, "--checkpoint", &checkpoint]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("at position 1234") && out.contains("does not match its hash"),
        "{out}"
    );

    // 2. One record removed.
    let mut lines = original.clone();
    lines.remove(99);
    write_lines(&tampered, &lines);
    let (code, out, _) = cli(&["verify", "--export", t, "--checkpoint", &checkpoint]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("position 101 where 100 was expected"), "{out}");

    // 3. A record altered and every later hash recomputed: the chain is consistent again, but
    //    it no longer reaches the published checkpoint.
    let mut lines = original.clone();
    lines[41]["event"]["occurred_at"] = serde_json::json!("1997-03-03T00:00:00Z");
    recompute_from(&mut lines, 41);
    write_lines(&tampered, &lines);
    let (code, out, _) = cli(&["verify", "--export", t]);
    assert_eq!(code, 0, "a rewritten chain is self-consistent: {out}");
    let (code, out, _) = cli(&["verify", "--export", t, "--checkpoint", &checkpoint]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("at position 6000") && out.contains("differs from the checkpoint"),
        "{out}"
    );

    // 4. The export ends before the checkpoint.
    write_lines(&tampered, &original[..5000]);
    let (code, out, _) = cli(&["verify", "--export", t, "--checkpoint", &checkpoint]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("ends at position 5000"), "{out}");

    // CSV exports verify the same way.
    let csv = dir.path().join("history.csv");
    let c = csv.to_str().expect("utf8");
    assert_eq!(
        cli(&["export", "--data", d, "--out", c, "--format", "csv"]).0,
        0
    );
    let (code, out, _) = cli(&[
        "verify",
        "--export",
        c,
        "--format",
        "csv",
        "--checkpoint",
        &head_cp,
    ]);
    assert_eq!(code, 0, "{out}");
}
