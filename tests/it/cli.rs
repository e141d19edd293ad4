//! The CLI end to end, in-process: the acceptance run of issue #2 (100,000 valid events plus
//! 1,000 re-sent duplicates, 100 conflicts and 100 invalid lines), replay formats and filters,
//! and the documented exit codes.

use std::collections::HashMap;

use touchledger_cli::{AppendSummary, EXIT_OK, EXIT_REJECTED, EXIT_USAGE, run};

/// [`cli`] from an async test: on a blocking thread (the CLI runs its own runtime).
pub async fn cli_blocking(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args)
    })
    .await
    .expect("cli thread")
}

pub fn cli(args: &[&str]) -> (i32, String, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut argv = vec!["touchledger"];
    argv.extend_from_slice(args);
    let code = run(argv, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).expect("utf8"),
        String::from_utf8(err).expect("utf8"),
    )
}

/// The value of a `name = value` line the CLI printed (e.g. a fitted parameter).
pub fn printed(out: &str, name: &str) -> f64 {
    out.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(name)?
                .trim()
                .strip_prefix('=')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {name} in {out}"))
}

#[test]
fn acceptance_100k_with_duplicates_conflicts_and_invalid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.jsonl");
    let data = dir.path().join("ledger");
    let (f, d) = (file.to_str().expect("utf8"), data.to_str().expect("utf8"));

    let (code, out, err) = cli(&[
        "generate",
        "--out",
        f,
        "--events",
        "100000",
        "--duplicates",
        "1000",
        "--conflicts",
        "100",
        "--invalid",
        "100",
        "--seed",
        "7",
    ]);
    assert_eq!(code, EXIT_OK, "{out}{err}");

    let (code, out, err) = cli(&["append", "--data", d, "--file", f, "--json"]);
    assert_eq!(
        code, EXIT_REJECTED,
        "rejections must show in the exit code: {err}"
    );
    let s: AppendSummary = serde_json::from_str(&out).expect("summary json");
    assert_eq!(s.lines, 101_200);
    assert_eq!(s.appended, 100_000);
    assert_eq!(s.duplicate, 1_000);
    assert_eq!(s.rejected, 200);
    assert_eq!(s.rejected_by_code.get("EVENT_ID_CONFLICT"), Some(&100));
    // The generator rotates over ten causes of invalidity, ten lines each.
    let invalid: HashMap<_, _> = s
        .rejected_by_code
        .iter()
        .filter(|(c, _)| *c != "EVENT_ID_CONFLICT")
        .collect();
    assert_eq!(invalid.len(), 10, "{invalid:?}");
    assert!(invalid.values().all(|n| **n == 10), "{invalid:?}");
    assert_eq!(s.head_position, 100_000);

    // Re-running the same file appends nothing: everything valid is now a duplicate.
    let (_, out, _) = cli(&["append", "--data", d, "--file", f, "--json"]);
    let again: AppendSummary = serde_json::from_str(&out).expect("summary json");
    assert_eq!(
        (again.appended, again.duplicate, again.head_position),
        (0, 101_000, 100_000)
    );

    let (code, out, _) = cli(&["verify", "--data", d]);
    assert_eq!(code, EXIT_OK);
    assert!(out.starts_with("OK: 100000 events"), "{out}");

    // Replay returns them in order, positions gapless, customer versions gapless from 1,
    // each line linked to the previous by its hash.
    let (code, out, _) = cli(&["replay", "--data", d]);
    assert_eq!(code, EXIT_OK);
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut prev_hash = "0".repeat(64);
    let mut n = 0u64;
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        n += 1;
        assert_eq!(v["position"], n);
        let customer = v["event"]["customer_id"]
            .as_str()
            .expect("customer")
            .to_owned();
        let ver = versions.entry(customer).or_default();
        *ver += 1;
        assert_eq!(v["customer_version"], *ver);
        assert_eq!(v["prev_hash"], prev_hash.as_str());
        prev_hash = v["hash"].as_str().expect("hash").to_owned();
    }
    assert_eq!(n, 100_000);

    // Rejections are kept with their raw input.
    let (_, out, _) = cli(&["rejections", "--data", d]);
    // One record per distinct input: the second run of the same file records nothing again.
    assert_eq!(out.lines().count(), 200, "one record per rejected line");
    assert!(
        out.lines()
            .any(|l| l.contains("\"raw_utf8\":\"{\\\"event_id\\\": \\\"truncated\""))
    );
}

#[test]
fn replay_filters_and_csv() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.jsonl");
    let data = dir.path().join("ledger");
    let (f, d) = (file.to_str().expect("utf8"), data.to_str().expect("utf8"));
    assert_eq!(
        cli(&[
            "generate",
            "--out",
            f,
            "--events",
            "2000",
            "--customers",
            "50"
        ])
        .0,
        EXIT_OK
    );
    assert_eq!(
        cli(&["append", "--data", d, "--file", f, "--batch", "300"]).0,
        EXIT_OK
    );

    let (_, out, _) = cli(&[
        "replay",
        "--data",
        d,
        "--customer",
        "cust-000007",
        "--kind",
        "purchase",
        "--from-position",
        "100",
        "--to-position",
        "1500",
    ]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(!lines.is_empty());
    let mut last = 0;
    for v in &lines {
        let p = v["position"].as_u64().expect("position");
        assert!((100..=1500).contains(&p) && p > last);
        last = p;
        assert_eq!(v["event"]["customer_id"], "cust-000007");
        assert!(v["event"]["purchase"].is_object());
    }

    let (_, out, _) = cli(&[
        "replay",
        "--data",
        d,
        "--since",
        "2024-03-01",
        "--until",
        "2024-04-01",
        "--format",
        "csv",
    ]);
    let mut rdr = csv::Reader::from_reader(out.as_bytes());
    let headers = rdr.headers().expect("headers").clone();
    assert_eq!(&headers[0], "position");
    let mut count = 0;
    for rec in rdr.records() {
        let rec = rec.expect("record");
        let occurred = &rec[8];
        assert!(
            ("2024-03-01".."2024-04-01").contains(&occurred),
            "{occurred}"
        );
        let event: serde_json::Value = serde_json::from_str(&rec[10]).expect("event json");
        assert_eq!(event["occurred_at"], occurred);
        count += 1;
    }
    assert!(count > 0);
}

#[test]
fn usage_errors_exit_2_on_stderr() {
    let (code, out, err) = cli(&["replay", "--kind", "telegram"]);
    assert_eq!(code, EXIT_USAGE);
    assert!(out.is_empty());
    assert!(err.contains("telegram"), "{err}");
}
