//! `touchledger serve`: connect to NATS (credentials and TLS from flags or environment), run the
//! ledger service on the embedded store, and shut down in order on SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use touchledger_bus::{BusConfig, Subjects};
use touchledger_store::SledStore;

/// NATS connection settings. Secrets can come from the environment so they stay out of
/// process listings; none is ever logged.
#[derive(clap::Args, Clone)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "TOUCHLEDGER_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// Subject prefix.
    #[arg(long, env = "TOUCHLEDGER_PREFIX", default_value = "crm")]
    pub prefix: String,
    /// User name (with --password).
    #[arg(long, env = "TOUCHLEDGER_NATS_USER")]
    pub user: Option<String>,
    /// Password (with --user).
    #[arg(long, env = "TOUCHLEDGER_NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Token authentication.
    #[arg(long, env = "TOUCHLEDGER_NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// NKey seed authentication.
    #[arg(long, env = "TOUCHLEDGER_NATS_NKEY", hide_env_values = true)]
    pub nkey: Option<String>,
    /// Credentials (.creds) file.
    #[arg(long, env = "TOUCHLEDGER_NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// CA certificate(s) to trust (PEM); implies TLS.
    #[arg(long, env = "TOUCHLEDGER_NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM, with --tls-key).
    #[arg(long, env = "TOUCHLEDGER_NATS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM, with --tls-cert).
    #[arg(long, env = "TOUCHLEDGER_NATS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require TLS.
    #[arg(long, env = "TOUCHLEDGER_NATS_TLS")]
    pub tls: bool,
}

impl std::fmt::Debug for NatsArgs {
    /// Secrets are redacted: settings may end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsArgs")
            .field("nats_url", &redact_url(&self.nats_url))
            .field("prefix", &self.prefix)
            .field("user", &self.user)
            .field("password", &redact(&self.password))
            .field("token", &redact(&self.token))
            .field("nkey", &redact(&self.nkey))
            .field("creds", &self.creds)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls", &self.tls)
            .finish()
    }
}

impl NatsArgs {
    /// Build connect options from the flags.
    pub async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        let mut o = async_nats::ConnectOptions::new()
            .name("touchledger")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => {
                        metrics::counter!("touchledger_nats_connects_total").increment(1);
                        tracing::info!("NATS connected");
                    }
                    async_nats::Event::Disconnected => {
                        metrics::counter!("touchledger_nats_disconnects_total").increment(1);
                        tracing::warn!("NATS disconnected; reconnecting");
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            });
        // Credentials inside the URL (`nats://user:password@host`, `nats://token@host`) are
        // taken out of it and used like the flags; the URL shown anywhere is redacted.
        let (urls, in_url) = split_url_credentials(&self.nats_url)?;
        let flags = self.user.is_some() || self.token.is_some() || self.nkey.is_some();
        match in_url {
            Some(_) if flags || self.creds.is_some() => anyhow::bail!(
                "credentials are given both in --nats-url ({}) and as flags: use one",
                redact_url(&self.nats_url)
            ),
            Some(UrlCredentials::UserPassword(u, p)) => o = o.user_and_password(u, p),
            Some(UrlCredentials::Token(t)) => o = o.token(t),
            None => {}
        }
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => o = o.user_and_password(u.clone(), p.clone()),
            (None, None) => {}
            _ => anyhow::bail!("--user and --password go together"),
        }
        if let Some(t) = &self.token {
            o = o.token(t.clone());
        }
        if let Some(seed) = &self.nkey {
            o = o.nkey(seed.clone());
        }
        if let Some(path) = &self.creds {
            o = o
                .credentials_file(path)
                .await
                .with_context(|| format!("reading {}", path.display()))?;
        }
        if let Some(ca) = &self.tls_ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => o = o.add_client_certificate(c.clone(), k.clone()),
            (None, None) => {}
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        }
        if self.tls {
            o = o.require_tls(true);
        }
        // retry_on_initial_connect makes connect return at once; wait for the first connection
        // so that a wrong URL is reported rather than retried silently forever.
        // Messages show the URL as given, with any credentials in it redacted.
        let shown = redact_url(&self.nats_url);
        // A list (`nats://a:4222,nats://b:4222`) is a cluster's seed servers: the client
        // connects to one and fails over to the others (and to those the cluster announces).
        let client = o
            .connect(urls.split(',').collect::<Vec<&str>>())
            .await
            .with_context(|| format!("connecting to {shown}"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "no connection to {shown} after 10 s (wrong address, refused credentials or TLS settings; the server's log says which)"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(client)
    }
}

/// Credentials found in a NATS URL's userinfo.
#[derive(Clone, PartialEq, Eq)]
pub enum UrlCredentials {
    /// `user:password@`.
    UserPassword(String, String),
    /// `token@` (no password).
    Token(String),
}

impl std::fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlCredentials::UserPassword(u, _) => write!(f, "UserPassword({u:?}, <redacted>)"),
            UrlCredentials::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}

/// The userinfo part of one URL: (start, end) of `userinfo@` within it, if any.
fn userinfo(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let host_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let at = url[start..host_end].rfind('@')? + start;
    Some((start, at + 1))
}

/// Split comma-separated NATS URLs into the URLs without userinfo and the credentials they
/// carried (percent-decoded). Different credentials in two URLs are an error.
pub fn split_url_credentials(urls: &str) -> anyhow::Result<(String, Option<UrlCredentials>)> {
    let mut clean = Vec::new();
    let mut found: Option<UrlCredentials> = None;
    for url in urls.split(',').map(str::trim) {
        let Some((start, end)) = userinfo(url) else {
            clean.push(url.to_owned());
            continue;
        };
        let info = &url[start..end - 1];
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| anyhow::anyhow!("the credentials in --nats-url are not UTF-8"))
        };
        let creds = match info.split_once(':') {
            Some((u, p)) => UrlCredentials::UserPassword(decode(u)?, decode(p)?),
            None => UrlCredentials::Token(decode(info)?),
        };
        if found.as_ref().is_some_and(|f| *f != creds) {
            anyhow::bail!("the URLs in --nats-url carry different credentials");
        }
        found = Some(creds);
        clean.push(format!("{}{}", &url[..start], &url[end..]));
    }
    Ok((clean.join(","), found))
}

/// A NATS URL list for messages and logs: userinfo replaced by `***`.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| match userinfo(url.trim()) {
            Some((start, end)) => {
                let url = url.trim();
                format!("{}***@{}", &url[..start], &url[end..])
            }
            None => url.trim().to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Intake timing settings.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long a fetch waits for its batch to fill.
    pub fetch_wait: Duration,
    /// Redelivery delay for messages fetched by a crashed ledger.
    pub ack_wait: Duration,
}

/// Read-model service settings from the command line.
#[derive(Clone, Debug)]
pub struct ViewTiming {
    /// Assessor sweep interval.
    pub sweep: Duration,
    /// Scheduled refit interval (`None` = on demand only).
    pub refit: Option<Duration>,
    /// HTTP listen address.
    pub http_addr: std::net::SocketAddr,
    /// HTTP bearer token.
    pub http_token: Option<String>,
    /// How long tasks get to stop after shutdown was requested (signal or fatal error).
    pub shutdown: Duration,
    /// The read models' rules (`--rules`, else the defaults).
    pub rules: touchledger_domain::population::Rules,
}

/// Run the service until SIGINT/SIGTERM: the ledger (intake, synchronous append, feed,
/// replay) and the read models (projectors, views, queries, assessor) on one store.
pub fn serve(
    store: SledStore,
    nats: &NatsArgs,
    batch: usize,
    timing: Timing,
    views: ViewTiming,
) -> anyhow::Result<()> {
    run_service(nats, views.shutdown, |client, shutdown| async move {
        tracing::info!(server = %client.server_info().version, prefix = %nats.prefix, "connected");
        let cfg = BusConfig {
            subjects: Subjects::new(nats.prefix.clone()),
            batch: batch.max(1),
            fetch_wait: timing.fetch_wait,
            ack_wait: timing.ack_wait,
            ..BusConfig::default()
        };
        let store = Arc::new(store);
        let mut view_cfg = touchledger_bus::ViewConfig {
            subjects: cfg.subjects.clone(),
            sweep_interval: views.sweep,
            refit_every: views.refit,
            rules: views.rules.clone(),
            ..touchledger_bus::ViewConfig::default()
        };
        // One current materialisation, maintained by the read-model service and read by HTTP.
        let current =
            touchledger_bus::open_current(&store, &view_cfg.rules, view_cfg.current_refresh)?;
        view_cfg.current = Some(current.clone());
        let month_ends = touchledger_bus::open_month_ends(&store, &view_cfg.rules)?;
        view_cfg.month_ends = Some(month_ends.clone());
        let metrics = install_metrics();
        for q in store.quarantined() {
            metrics_quarantined(q);
        }
        let reads = Arc::new(touchledger_projector::ReadModels::open(
            &store,
            view_cfg.rules.clone(),
        )?);
        let http_cfg = touchledger_http::HttpConfig {
            addr: views.http_addr,
            token: views.http_token.clone(),
            prefix: nats.prefix.clone(),
            metrics,
            current: Some(current),
            month_ends: Some(month_ends),
            ..touchledger_http::HttpConfig::default()
        };
        let http = {
            let shutdown = shutdown.clone();
            let (store, client) = (store.clone(), client.clone());
            async move {
                let r =
                    touchledger_http::run_http(store, reads, client, http_cfg, shutdown.clone())
                        .await;
                if r.is_err() {
                    shutdown.cancel();
                }
                r
            }
        };
        let (ledger, read_models, http) = tokio::join!(
            touchledger_bus::run_ledger(client.clone(), store.clone(), cfg, shutdown.clone()),
            touchledger_bus::run_views(client, store, view_cfg, shutdown.clone()),
            http,
        );
        ledger?;
        read_models?;
        http?;
        anyhow::Ok(())
    })
}

/// The Prometheus recorder behind `/metrics` (`None`, logged, if one is installed already).
fn install_metrics() -> Option<Arc<dyn Fn() -> String + Send + Sync>> {
    match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(handle) => {
            Some(Arc::new(move || handle.render()) as Arc<dyn Fn() -> String + Send + Sync>)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    }
}

/// The frame both services run in: a runtime, SIGINT/SIGTERM caught from the start, the NATS
/// connection, then `body` until it ends. A fatal error in any task cancels `shutdown` as a
/// signal does; either way the process is gone within `bound` after it, never half alive (a
/// supervisor restarts it), and blocking tasks still stuck in the store do not keep it alive.
fn run_service<F, Fut>(nats: &NatsArgs, bound: Duration, body: F) -> anyhow::Result<()>
where
    F: FnOnce(async_nats::Client, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let shutdown = shutdown_on_signal();
        let client = tokio::select! {
            c = nats.connect() => c?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        tokio::select! {
            r = body(client, shutdown.clone()) => r,
            _ = async { shutdown.cancelled().await; tokio::time::sleep(bound).await } => {
                tracing::error!(seconds = bound.as_secs(), "tasks did not stop in time after shutdown; exiting");
                Err(anyhow::anyhow!(
                    "shutdown did not finish within {} s (a task is blocked, e.g. on a failing disk); exiting without waiting for it",
                    bound.as_secs()
                ))
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// How a partitioned `serve` runs its partitions.
pub struct PartitionRun {
    /// Seconds between global checkpoints (published by the holder of partition 0).
    pub global_every: Duration,
    /// The TTL of an ownership lease (for a new lease bucket).
    pub lease_ttl: Duration,
    /// `--own auto`: hold a share of the partitions, balanced with the other members.
    pub auto: bool,
    /// Replicas of the ledger's streams and lease bucket (3 on a 3-node cluster).
    pub replicas: usize,
}

/// Run the owned partitions of a partitioned ledger until SIGINT/SIGTERM: for each, its intake
/// consumer (the server routes touchpoints by customer), synchronous append, replay,
/// committed-event feed and read models on its own store, and the router that answers the
/// ledger-wide queries (forwarded to the customer's partition, or merged across all of them;
/// docs/partitions.md), and the HTTP API and dashboard, whose reads go through the router.
pub fn serve_partitions(
    stores: Vec<SledStore>,
    nats: &NatsArgs,
    batch: usize,
    timing: Timing,
    views: ViewTiming,
    run: PartitionRun,
) -> anyhow::Result<()> {
    run_service(nats, views.shutdown, |client, shutdown| async move {
        let owned: Vec<String> = stores.iter().map(|s| s.partition().to_string()).collect();
        tracing::info!(server = %client.server_info().version, prefix = %nats.prefix, partitions = ?owned, "connected");
        for store in &stores {
            for q in store.quarantined() {
                metrics_quarantined(q);
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        let js = async_nats::jetstream::new(client.clone());
        let (leases, ttl) =
            touchledger_bus::lease_bucket(&js, &nats.prefix, run.lease_ttl, run.replicas).await?;
        let count = stores.first().map_or(1, |s| s.partition().count);
        let owner = touchledger_bus::owner_name();
        // The partitions' read models register here while owned (for /readyz).
        let owned_views = touchledger_bus::OwnedViews::default();
        let view_cfg = touchledger_bus::ViewConfig {
            sweep_interval: views.sweep,
            owned: Some(owned_views.clone()),
            rules: views.rules.clone(),
            ..touchledger_bus::ViewConfig::default()
        };
        // Any process answers any ledger-wide read or fit, whatever partitions it owns.
        let mut router = touchledger_bus::Router::new(
            client.clone(),
            Subjects::new(nats.prefix.clone()),
            count,
            view_cfg.rules.clone(),
        );
        router.name = owner.clone();
        // The HTTP API and dashboard: every read through the router, whatever is owned here.
        {
            let http_cfg = touchledger_http::HttpConfig {
                addr: views.http_addr,
                token: views.http_token.clone(),
                prefix: nats.prefix.clone(),
                metrics: install_metrics(),
                clock: view_cfg.clock.clone(),
                ..touchledger_http::HttpConfig::default()
            };
            let p = touchledger_http::Partitioned {
                router: router.clone(),
                owned: owned_views,
            };
            let (client, shutdown) = (client.clone(), shutdown.clone());
            tasks.spawn(async move {
                let r =
                    touchledger_http::run_http_partitioned(p, client, http_cfg, shutdown.clone())
                        .await;
                if r.is_err() {
                    shutdown.cancel();
                }
                r.context("HTTP API")
            });
        }
        {
            let (router, clock, shutdown) =
                (router.clone(), view_cfg.clock.clone(), shutdown.clone());
            tasks.spawn(async move {
                touchledger_bus::run_router(router, "touchledger-router".into(), clock, shutdown)
                    .await
                    .context("query router")
            });
        }
        let ownership = touchledger_bus::Ownership {
            client: client.clone(),
            leases,
            ttl,
            owner,
            global_every: run.global_every,
            balance: run.auto.then(|| touchledger_bus::Balance::new(count)),
            views: Some(view_cfg),
        };
        tracing::info!(owner = ownership.owner, ttl = ?ttl, auto = run.auto, "partitions are owned by leases");
        // The holder of partition 0 refits the model on every partition's buyers.
        if let Some(every) = views.refit {
            let (own, clock, shutdown) = (
                ownership.clone(),
                ownership.views.as_ref().map(|v| v.clock.clone()),
                shutdown.clone(),
            );
            let clock = clock.unwrap_or_else(|| Arc::new(touchledger_domain::Timestamp::now));
            tasks.spawn(async move {
                touchledger_bus::run_scheduled_refits(
                    router,
                    own,
                    every,
                    touchledger_domain::TimeUnit::Weeks,
                    clock,
                    shutdown,
                )
                .await
                .context("scheduled refits")
            });
        }
        if run.auto {
            let (own, shutdown) = (ownership.clone(), shutdown.clone());
            tasks.spawn(async move {
                touchledger_bus::run_balancer(own, shutdown)
                    .await
                    .context("partition balancer")
            });
        }
        for store in stores {
            let cfg = BusConfig {
                subjects: Subjects::new(nats.prefix.clone()),
                batch: batch.max(1),
                fetch_wait: timing.fetch_wait,
                ack_wait: timing.ack_wait,
                partition: store.partition(),
                replicas: run.replicas,
                ..BusConfig::default()
            };
            let shutdown = shutdown.clone();
            let ownership = ownership.clone();
            let nats = nats.clone();
            tasks.spawn(async move {
                let partition = store.partition();
                let connect = || async {
                    nats.connect()
                        .await
                        .map_err(|e| touchledger_bus::BusError::Nats {
                            what: "connect",
                            detail: format!("{e:#}"),
                        })
                };
                let r = touchledger_bus::own_partition(
                    connect,
                    Arc::new(store),
                    cfg,
                    &ownership,
                    &shutdown,
                )
                .await
                .with_context(|| partition.to_string());
                if r.is_err() {
                    // One partition failing stops the process (a supervisor restarts it).
                    shutdown.cancel();
                }
                r
            });
        }
        // Any task failing (an error or a panic; a partition or the global checkpoints) stops
        // the process, as a signal does; a supervisor restarts it.
        let mut result = Ok(());
        while let Some(r) = tasks.join_next().await {
            let r = r.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = &r {
                tracing::error!(error = format!("{e:#}"), "a task failed; shutting down");
                shutdown.cancel();
            }
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

fn metrics_quarantined(q: &touchledger_store::Quarantined) {
    metrics::counter!("touchledger_store_quarantined_files_total").increment(1);
    tracing::warn!(from = %q.from.display(), to = %q.to.display(), why = q.why, "sled leftover was quarantined at open");
}

/// Run the three projectors apart from the ledger: follow the committed-event stream into a
/// projection database of their own, until SIGINT/SIGTERM.
pub fn project(dir: &std::path::Path, nats: &NatsArgs, batch: usize) -> anyhow::Result<()> {
    let db = touchledger_store::ProjectionDb::open(dir)?;
    let mut projectors = Vec::new();
    for spec in touchledger_projector::ALL {
        let (p, opened) = touchledger_projector::Projector::open(spec, db.projection(spec.name)?)?;
        tracing::info!(projection = spec.name, opened = ?opened, "projection opened");
        projectors.push(p);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let shutdown = shutdown_on_signal();
        let client = tokio::select! {
            c = nats.connect() => c?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let js = async_nats::jetstream::new(client.clone());
        touchledger_bus::run_remote_projectors(
            js,
            Subjects::new(nats.prefix.clone()),
            projectors,
            batch.max(1),
            None,
            shutdown,
        )
        .await?;
        client.drain().await?;
        Ok(())
    })
}

/// A token cancelled on SIGINT/SIGTERM. The handlers are registered here, before this returns
/// (not when a task first runs), so a signal at any later instant, during connect included, is
/// a clean stop and never the default action's kill. Call inside the runtime.
fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    let signals = Signals::register();
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("shutdown requested");
        signal.cancel();
    });
    shutdown
}

/// SIGINT and SIGTERM, registered.
struct Signals {
    #[cfg(unix)]
    registered: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn register() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals {
                registered: signal(SignalKind::interrupt())
                    .and_then(|i| Ok((i, signal(SignalKind::terminate())?)))
                    .ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn recv(self) {
        #[cfg(unix)]
        if let Some((mut interrupt, mut terminate)) = self.registered {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_taken_out_and_redacted() {
        let (clean, c) = split_url_credentials(
            "nats://alice:p%40ss@10.0.0.5:4222, nats://alice:p%40ss@10.0.0.6:4222",
        )
        .expect("split");
        assert_eq!(clean, "nats://10.0.0.5:4222,nats://10.0.0.6:4222");
        assert_eq!(
            c,
            Some(UrlCredentials::UserPassword("alice".into(), "p@ss".into()))
        );
        let (clean, c) = split_url_credentials("tls://s3cret@host:4222").expect("split");
        assert_eq!(clean, "tls://host:4222");
        assert_eq!(c, Some(UrlCredentials::Token("s3cret".into())));
        let (clean, c) = split_url_credentials("nats://127.0.0.1:4222").expect("split");
        assert_eq!((clean.as_str(), c), ("nats://127.0.0.1:4222", None));
        assert!(split_url_credentials("nats://a:b@h1,nats://a:c@h2").is_err());
        assert_eq!(
            redact_url("nats://alice:secret@h:4222,nats://h2"),
            "nats://***@h:4222,nats://h2"
        );
        let args = NatsArgs {
            nats_url: "nats://alice:secret@h:4222".into(),
            prefix: "crm".into(),
            user: None,
            password: None,
            token: None,
            nkey: None,
            creds: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls: false,
        };
        assert!(!format!("{args:?}").contains("secret"));
        assert!(!format!("{c:?}", c = UrlCredentials::Token("secret".into())).contains("secret"));
    }
}
