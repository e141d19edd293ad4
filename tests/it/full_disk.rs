//! A full disk under `touchledger serve` (issue #16), on a real tmpfs mount fed over a real
//! nats-server: at the free-space reserve the ledger stops taking input and says why, and
//! resumes by itself when space returns; without a reserve, a store that fails mid-run ends
//! the process within the shutdown bound, and the directory opens again afterwards. Every
//! acknowledged publish is stored exactly once. Mounting needs root (CI runs as root); where it
//! is refused the tests say so and return.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use touchledger_testkit::{NatsServer, free_port};

use crate::service_crash::{CHILD_ENV, check_feed, check_store, publish_all, wait_drained};

/// A tmpfs mounted on a temp dir, unmounted on drop.
struct Tmpfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Tmpfs {
    fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root, or no mount privilege)");
            return None;
        }
        Some(Tmpfs { _dir: dir, mnt })
    }

    fn resize(&self, mib: u64) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

fn spawn_serve(data: &Path, url: &str, http: u16, extra: &[&str]) -> Child {
    let http = format!("127.0.0.1:{http}");
    let mut args = vec![
        "--data",
        data.to_str().expect("utf8"),
        "--nats-url",
        url,
        "--batch",
        "200",
        "--fetch-wait-ms",
        "20",
        "--ack-wait-secs",
        "2",
        "--http-addr",
        &http,
        "--cache-mib",
        "16",
    ];
    args.extend_from_slice(extra);
    Command::new(std::env::current_exe().expect("exe"))
        .args([
            "service_crash::serve_child_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, args.join("\u{1f}"))
        .env("TOUCHLEDGER_LOG", "warn")
        .stdout(Stdio::null())
        // The child's log, when asked for (TOUCHLEDGER_TEST_SERVE_LOG=1).
        .stderr(
            if std::env::var_os("TOUCHLEDGER_TEST_SERVE_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            },
        )
        .spawn()
        .expect("spawn serve")
}

/// `GET /readyz` → (status, body); `None` while the server is not listening.
fn readyz(port: u16) -> Option<(u16, serde_json::Value)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1)?;
    Some((status, serde_json::from_str(body).ok()?))
}

async fn wait_for_streams(js: &jetstream::Context) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while js.get_stream("CRM_TOUCHPOINTS").await.is_err() {
        assert!(Instant::now() < deadline, "serve never created its streams");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stop(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    child.wait().expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_pauses_at_the_reserve_and_resumes_when_space_returns() {
    const N: u64 = 30_000;
    let Some(fs) = Tmpfs::mount(40) else { return };
    let data = fs.mnt.join("ledger");
    let server = NatsServer::start();
    let js = jetstream::new(async_nats::connect(server.url()).await.expect("connect"));
    let http = free_port();
    // 40 MiB, 28 of them kept free: about 12 MiB for the ledger, less than N events need.
    let child = spawn_serve(
        &data,
        &server.url(),
        http,
        &["--reserve-mib", "28", "--reserve-percent", "0"],
    );
    wait_for_streams(&js).await;
    publish_all(&js, 0..N).await;

    // The reserve is reached: not ready, with the reason; intake stopped below the head.
    let deadline = Instant::now() + Duration::from_secs(120);
    let body = loop {
        if let Some((503, b)) = readyz(http)
            && b["storage"]["full"] == true
        {
            break b;
        }
        assert!(Instant::now() < deadline, "the reserve was never reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("storage full"), "{body}");
    let head = body["head"].as_u64().expect("head");
    assert!(head < N, "everything fit: the test proved nothing ({body})");
    eprintln!("paused at head {head} of {N}: {reason}");

    // Space returns: ingest resumes by itself, nothing published is lost or doubled.
    fs.resize(400);
    wait_drained(&js, N, Duration::from_secs(240)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(readyz(http), Some((200, _))) {
        assert!(Instant::now() < deadline, "not ready after space returned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let exit = stop(child);
    assert!(exit.success(), "serve did not stop cleanly: {exit}");
    check_store(&data, N);
    check_feed(&js, N).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_whose_store_fails_exits_within_the_bound_and_the_store_reopens() {
    const N: u64 = 30_000;
    let Some(fs) = Tmpfs::mount(16) else { return };
    let data = fs.mnt.join("ledger");
    let server = NatsServer::start();
    let js = jetstream::new(async_nats::connect(server.url()).await.expect("connect"));
    // No reserve: sled meets the full disk, the store fails, the process must end.
    let mut child = spawn_serve(
        &data,
        &server.url(),
        free_port(),
        &[
            "--reserve-mib",
            "0",
            "--reserve-percent",
            "0",
            "--shutdown-secs",
            "5",
        ],
    );
    wait_for_streams(&js).await;
    publish_all(&js, 0..N).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    let exit = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve on a full disk is still running: half alive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !exit.success(),
        "a failed store must end the process non-zero"
    );

    // More space, a new process: the directory opens (half-written snapshots are
    // quarantined), and every acknowledged publish ends up stored exactly once.
    fs.resize(400);
    let http = free_port();
    let child = spawn_serve(&data, &server.url(), http, &[]);
    wait_drained(&js, N, Duration::from_secs(240)).await;
    // The first process may have taken every publish before it failed: the stream is drained
    // at once. Stop the new one only once it serves, as an operator would.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(readyz(http), Some((200, _))) {
        assert!(
            Instant::now() < deadline,
            "the reopened store never got ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exit = stop(child);
    assert!(exit.success(), "serve did not stop cleanly: {exit}");
    check_store(&data, N);
    check_feed(&js, N).await;
}
