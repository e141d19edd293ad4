//! Test support: real `nats-server` processes on free loopback ports, each with its own
//! JetStream store in a temp directory, that tests can kill (SIGKILL) and restart on the same
//! port and store; the process is killed and the directory removed on drop.
//!
//! Key decision: no mocks. The server binary is found from `TOUCHLEDGER_NATS_SERVER`, then the
//! pinned release that `deploy/ensure-nats-server.sh` installs under `target/tools/`, then `PATH`,
//! then `/usr/sbin/nats-server`; a server older than [`MIN_SERVER_VERSION`] is refused with its
//! version named (`deploy/test.sh` always sets `TOUCHLEDGER_NATS_SERVER` to a usable one). The
//! machine's shared server on 4222 is never touched.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A `nats-server` with JetStream, owned by a test.
pub struct NatsServer {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    binary: PathBuf,
    /// A configuration file (`-c`) and the environment it expands (`$NAME`), if any.
    config: Option<(PathBuf, Vec<(String, String)>)>,
    /// More command-line arguments (a cluster node's name, cluster port and routes).
    args: Vec<String>,
}

/// Why a server could not be started.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// The oldest nats-server the tests accept: the same as the ledger's own start-up check
/// (`touchledger_bus::MIN_SERVER_VERSION`) and `MIN` in `deploy/ensure-nats-server.sh`.
pub const MIN_SERVER_VERSION: (u32, u32, u32) = (2, 10, 0);

/// Locate the `nats-server` binary.
pub fn nats_server_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TOUCHLEDGER_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    // The pinned release installed by deploy/ensure-nats-server.sh (newest first).
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools");
    if let Ok(dirs) = std::fs::read_dir(&tools) {
        // `nats-server-<version>`: the newest by version number, not by name.
        let found = dirs
            .filter_map(|d| d.ok())
            .filter_map(|d| {
                let name = d.file_name().to_string_lossy().into_owned();
                let version = parse_version(name.strip_prefix("nats-server-")?)?;
                let binary = d.path().join("bin/nats-server");
                binary.is_file().then_some((version, binary))
            })
            .max();
        if let Some((_, p)) = found {
            return Some(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("nats-server");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    let debian = Path::new("/usr/sbin/nats-server");
    debian.is_file().then(|| debian.to_path_buf())
}

/// The version a `nats-server` binary reports (`nats-server: v2.15.1`).
pub fn server_version(binary: &Path) -> Result<(u32, u32, u32), StartError> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| StartError(format!("running {} --version: {e}", binary.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| {
        StartError(format!(
            "{} --version printed {:?}, not a version",
            binary.display(),
            text.trim()
        ))
    })
}

fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.trim().rsplit(' ').next()?.trim_start_matches('v');
    let mut parts = v.split(['.', '-']).map(|p| p.parse::<u32>());
    Some((
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next().and_then(|p| p.ok()).unwrap_or(0),
    ))
}

/// A free TCP port on 127.0.0.1, chosen below the kernel's ephemeral range.
///
/// A port the kernel hands out for `bind(0)` comes from the ephemeral range (32768–60999 on
/// Linux), the same range every outgoing connection takes its local port from. Between choosing
/// such a port and the server binding it, any client connection of a test running alongside
/// (a ledger process connecting to NATS, say) can take it: CI saw a cluster node fail with
/// "address already in use" that way. Ports here come from 20000–32767 instead, which no
/// outgoing connection uses, walked by a process-wide cursor (so two tests of one binary are
/// never given the same port) that starts at an offset taken from the process id (so test
/// binaries running at once start far apart); each is checked free by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 32_768 - LOW;
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = CURSOR.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(2_654_435_761)) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + CURSOR.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

impl NatsServer {
    /// Start a server with JetStream on a free port; panics with a clear message on failure
    /// (this is test support).
    pub fn start() -> NatsServer {
        Self::try_start().unwrap_or_else(|e| panic!("cannot start nats-server for the test: {e}"))
    }

    /// Start a server with a configuration file (e.g. `deploy/nats/roles.conf`) whose `$NAME`
    /// variables come from `env`; the listen address, port and JetStream store are still the
    /// test's own.
    pub fn start_with_config(config: &Path, env: &[(&str, &str)]) -> NatsServer {
        Self::try_start_with(Some((
            config.to_path_buf(),
            env.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )))
        .unwrap_or_else(|e| panic!("cannot start nats-server for the test: {e}"))
    }

    /// Start a server, returning an error instead of panicking.
    pub fn try_start() -> Result<NatsServer, StartError> {
        Self::try_start_with(None)
    }

    fn try_start_with(
        config: Option<(PathBuf, Vec<(String, String)>)>,
    ) -> Result<NatsServer, StartError> {
        let mut s = Self::prepare(config, Vec::new())?;
        s.spawn()?;
        Ok(s)
    }

    /// A server ready to spawn: binary found and checked, port and directory chosen.
    fn prepare(
        config: Option<(PathBuf, Vec<(String, String)>)>,
        args: Vec<String>,
    ) -> Result<NatsServer, StartError> {
        let binary = nats_server_binary().ok_or_else(|| {
            StartError(
                "nats-server not found (run `bash deploy/ensure-nats-server.sh`, or set TOUCHLEDGER_NATS_SERVER)"
                    .into(),
            )
        })?;
        let version = server_version(&binary)?;
        if version < MIN_SERVER_VERSION {
            let (a, b, c) = version;
            let (x, y, z) = MIN_SERVER_VERSION;
            return Err(StartError(format!(
                "{} is nats-server {a}.{b}.{c}; the tests need {x}.{y}.{z} or newer \
                 (`bash deploy/ensure-nats-server.sh` installs the pinned release and prints its path \
                 for TOUCHLEDGER_NATS_SERVER)",
                binary.display()
            )));
        }
        let dir = tempfile::Builder::new()
            .prefix("touchledger-nats-")
            .tempdir()
            .map_err(|e| StartError(format!("temp dir: {e}")))?;
        Ok(NatsServer {
            port: free_port(),
            dir,
            child: None,
            binary,
            config,
            args,
        })
    }

    fn spawn(&mut self) -> Result<(), StartError> {
        let store = self.dir.path().join("jetstream");
        let mut cmd = Command::new(&self.binary);
        if let Some((path, env)) = &self.config {
            cmd.arg("-c").arg(path);
            cmd.envs(env.iter().map(|(k, v)| (k, v)));
        }
        let child = cmd
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&store)
            .args(&self.args)
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| StartError(format!("spawning {}: {e}", self.binary.display())))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(15))
    }

    /// Wait until the server greets on its port (an `INFO` line), or the process dies.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), StartError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(StartError(format!(
                    "nats-server exited with {status} during start-up; log: {}",
                    self.log()
                )));
            }
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(StartError(format!(
                    "nats-server not ready after {timeout:?}; log: {}",
                    self.log()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kill the server with SIGKILL (no shutdown), keeping its JetStream store.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the server again on the same port and JetStream store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn()
            .unwrap_or_else(|e| panic!("cannot restart nats-server: {e}"));
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("server.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

/// A JetStream cluster of `nats-server` processes on loopback (free client and cluster ports,
/// one store directory each), whose nodes a test can kill (SIGKILL) and restart one by one.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Start `n` nodes routed to each other (cluster `touchledger-test`, servers `n0`…), and
    /// wait until every node answers. JetStream elects its meta leader shortly after; clients
    /// see `JetStream not ready` until then ([`Self::urls`] lists every node for them).
    pub fn start(n: usize) -> NatsCluster {
        Self::start_nodes(&vec![None; n])
    }

    /// Start one node per configuration file (e.g. `deploy/nats/cluster/n1.conf`…), each with
    /// the file's settings (server name, cluster name, JetStream limits, `sync_interval`) but the
    /// test's own client port, cluster port, routes and store directory (command-line flags
    /// override the file's).
    pub fn start_with_configs(configs: &[PathBuf]) -> NatsCluster {
        Self::start_nodes(&configs.iter().cloned().map(Some).collect::<Vec<_>>())
    }

    fn start_nodes(configs: &[Option<PathBuf>]) -> NatsCluster {
        // A port taken between choosing and binding it (another test binary's server) fails
        // the node at start-up with "address already in use"; start the cluster again on
        // other ports rather than fail the test.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start_nodes(configs) {
                Ok(cluster) => return cluster,
                Err(e) if e.0.contains("address already in use") => last = e.0,
                Err(e) => panic!("cannot start the cluster: {e}"),
            }
        }
        panic!("cannot start the cluster: ports kept being taken; last: {last}")
    }

    fn try_start_nodes(configs: &[Option<PathBuf>]) -> Result<NatsCluster, StartError> {
        let n = configs.len();
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::with_capacity(n);
        for (i, cport) in cluster_ports.iter().enumerate() {
            let mut args = vec![
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{cport}"),
                "--routes".to_owned(),
                routes.clone(),
            ];
            if configs[i].is_none() {
                args.extend([
                    "--server_name".to_owned(),
                    format!("n{i}"),
                    "--cluster_name".to_owned(),
                    "touchledger-test".to_owned(),
                ]);
            }
            let config = configs[i].clone().map(|c| (c, Vec::new()));
            let mut node = NatsServer::prepare(config, args)
                .map_err(|e| StartError(format!("cluster node {i}: {e}")))?;
            node.spawn()
                .map_err(|e| StartError(format!("cluster node {i}: {e}")))?;
            nodes.push(node);
        }
        Ok(NatsCluster { nodes })
    }

    /// Every node's client URL, comma-separated (what a client is given to fail over).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`.
    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's log (for failure messages).
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- n{i}\n{}", n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("nats-server: v2.12.0-RC.1"), Some((2, 12, 0)));
        assert_eq!(parse_version("nonsense"), None);
        assert_eq!(parse_version("2.9.10"), Some((2, 9, 10)));
    }

    #[test]
    fn starts_kills_and_restarts_on_the_same_port() {
        let mut s = NatsServer::start();
        let port = s.port();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        s.kill();
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "killed server still accepts"
        );
        s.restart();
        assert_eq!(s.port(), port);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    }
}
