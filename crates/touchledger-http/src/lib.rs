//! The HTTP API (JSON) and the embedded web dashboard, served by `touchledger serve`.
//!
//! Key decisions:
//! * Every read takes `as_of` (RFC 3339 or `YYYY-MM-DD`, default now) and `axis` (`business`
//!   or `knowledge`) and is evaluated by the same `ReadModels` as the NATS queries, so the
//!   dashboard, `touchledger query` and `crm.query.*` always agree.
//! * The live feed (Server-Sent Events) is a bridge from the NATS subjects
//!   (`<prefix>.view.>` → `view` events naming the model and customer; `<prefix>.alert.churn.>` →
//!   `alert` events carrying the `ChurnRiskAssessed` event as JSON), so HTTP clients see exactly
//!   what NATS subscribers see.
//! * Binds to loopback by default. With a bearer token configured, everything but `/healthz`
//!   and `/readyz` requires `Authorization: Bearer <token>` (or `?access_token=` for
//!   `EventSource`, which cannot set headers; and for the dashboard page itself).
//! * Bad parameters get a 400 with a message naming the parameter; reads run on
//!   `spawn_blocking` (sled).
//! * The dashboard's assets are compiled into the binary (`include_str!`): no CDN, no internet.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use prost::Message;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use touchledger_domain::facts::{AsOf, Axis};
use touchledger_domain::{ChurnLevel, Event, Timestamp};
use touchledger_projector::api::AtRiskRequest;
use touchledger_projector::monthend::MonthEnds;
use touchledger_projector::{Current, ReadModels};
use touchledger_store::{EventStore, SledStore};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const OPENAPI: &str = include_str!("../assets/openapi.json");

/// HTTP settings. Defaults are documented per field.
#[derive(Clone)]
pub struct HttpConfig {
    /// Listen address. Default `127.0.0.1:8080` (loopback only).
    pub addr: SocketAddr,
    /// Bearer token required on the API, the dashboard and `/metrics`; `None` = open.
    pub token: Option<String>,
    /// NATS subject prefix of the live feed. Default `crm`.
    pub prefix: String,
    /// `/readyz` answers 503 while any projection is more than this many positions behind
    /// the log. Default 1000.
    pub ready_max_lag: u64,
    /// Renders the Prometheus exposition for `/metrics` (installed by the binary).
    pub metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
    /// The service clock (default now). Tests substitute.
    pub clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    /// The current materialisation (maintained by the read-model service): "now" reads of ranks
    /// and the at-risk list use its indexes. `None` = every read is a full pass.
    pub current: Option<Arc<Current>>,
    /// Month-end population snapshots: an overview at a passed month end (the first instant
    /// of a month) is a lookup. `None` = a full pass.
    pub month_ends: Option<Arc<MonthEnds>>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            prefix: "crm".into(),
            ready_max_lag: 1000,
            metrics: None,
            clock: Arc::new(Timestamp::now),
            current: None,
            month_ends: None,
        }
    }
}

impl std::fmt::Debug for HttpConfig {
    /// The token is redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("prefix", &self.prefix)
            .field("ready_max_lag", &self.ready_max_lag)
            .finish_non_exhaustive()
    }
}

/// Why the HTTP server stopped.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound (in use, or not permitted).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

struct AppState {
    backend: Backend,
    client: async_nats::Client,
    cfg: HttpConfig,
    /// One model evaluation at a time (each is a fit and a pass over every customer); the
    /// permit goes with the blocking task, so a client that hangs up does not free it early.
    evaluating: Arc<tokio::sync::Semaphore>,
}

/// Where the reads come from.
enum Backend {
    /// An unpartitioned ledger: its store and read models, in this process.
    Local {
        store: Arc<SledStore>,
        reads: Arc<ReadModels>,
    },
    /// A process of a partitioned ledger.
    Partitioned(Box<Partitioned>),
}

/// What the HTTP API of a process of a partitioned ledger reads through: the router (any
/// partition, owned here or not, over NATS) and the partitions this process owns now (for
/// `/readyz`).
#[derive(Clone, Debug)]
pub struct Partitioned {
    /// The ledger-wide reads.
    pub router: touchledger_bus::Router,
    /// The partitions owned here now.
    pub owned: touchledger_bus::OwnedViews,
}

/// A read across partitions that failed: 503 when a partition has no owner answering or is not
/// ready (retry), 500 otherwise.
fn read_failed(e: touchledger_bus::ReadError) -> ApiError {
    match e.code() {
        "UNAVAILABLE" | "NOT_READY" => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        "BAD_REQUEST" => bad(e.to_string()),
        _ => internal(e),
    }
}

/// Whether a read is for "now" (no explicit `as_of`, business axis).
fn is_now(q: &HashMap<String, String>) -> bool {
    let explicit = q.get("as_of").is_some_and(|v| !v.is_empty());
    let business = q
        .get("axis")
        .is_none_or(|a| a.is_empty() || a == "business");
    !explicit && business
}

/// A JSON error response.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "HTTP read failed");
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// The query parameters; a query string that does not decode is a JSON 400, like every error.
type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

fn params(q: Params) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| bad(format!("query: {}", e.body_text())))
}

fn as_of(q: &HashMap<String, String>, now: Timestamp) -> Result<AsOf, ApiError> {
    let at = match q.get("as_of").map(String::as_str) {
        None | Some("") => now,
        Some(s) => s.parse().map_err(|e| {
            bad(format!(
                "as_of: {e} (use RFC 3339, e.g. 2026-03-03T12:00:00Z, or YYYY-MM-DD)"
            ))
        })?,
    };
    let axis = match q.get("axis").map(String::as_str) {
        None | Some("") | Some("business") => Axis::Business,
        Some("knowledge") => Axis::Knowledge,
        Some(other) => return Err(bad(format!("axis: {other:?} is not business or knowledge"))),
    };
    Ok(AsOf { at, axis })
}

fn number(q: &HashMap<String, String>, key: &str, default: u64, max: u64) -> Result<u64, ApiError> {
    match q.get(key) {
        None => Ok(default),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(bad(format!("{key}: {v:?} is not a number in 1..={max}"))),
        },
    }
}

/// The current materialisation, when this read may use it: no explicit `as_of`, the business
/// axis, and the start-up re-evaluation done.
fn current_now(s: &AppState, q: &HashMap<String, String>) -> Option<Arc<Current>> {
    s.cfg
        .current
        .as_ref()
        .filter(|c| is_now(q) && c.is_ready())
        .cloned()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

/// `GET /api/v1/customers/{id}`: the three read models, ranks and the timeline.
async fn customer(
    State(s): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    q: Params,
) -> Result<Response, ApiError> {
    // A path that does not decode (`%ff`) gets the JSON error too, not axum's plain text.
    let Path(id) = id.map_err(|e| bad(format!("id: {}", e.body_text())))?;
    let q = params(q)?;
    let at = as_of(&q, (s.cfg.clock)())?;
    let limit = number(&q, "limit", 200, 10_000)? as usize;
    let not_found = move |id: &str| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no touchpoints of customer {id:?} at {} ({:?} axis)",
                at.at, at.axis
            ),
        )
    };
    let (store, reads) = match &s.backend {
        Backend::Local { store, reads } => (store.clone(), reads.clone()),
        Backend::Partitioned(p) => {
            // The customer's partition gives the page; the ranks are among every partition's
            // buyers (counted from their current views for a "now" read).
            let partition = touchledger_domain::partition::partition_of(&id, p.router.partitions);
            return match p
                .router
                .customer_page(&id, at, is_now(&q), limit)
                .await
                .map_err(read_failed)?
            {
                Some(page) => Ok((
                    [("x-touchledger-partition", partition.to_string())],
                    Json(page),
                )
                    .into_response()),
                None => Err(not_found(&id)),
            };
        }
    };
    let current = current_now(&s, &q);
    blocking(move || {
        let Some(mut page) =
            touchledger_projector::api::customer_page(store.as_ref(), &reads, &id, at, limit)
                .map_err(internal)?
        else {
            return Err(not_found(&id));
        };
        // Ranks among the population: O(log n) from the current indexes for a "now" read,
        // else a pass over every customer at `as_of`.
        let ranks = match &current {
            Some(c) => c.ranks(&id),
            None => reads.ranks(&id, at).map_err(internal)?,
        };
        page.insert("ranks".into(), json!(ranks));
        Ok(Json(Value::Object(page)).into_response())
    })
    .await
}

/// `GET /api/v1/models/evaluation`: `touchledger evaluate` on the ledger this process serves —
/// BG/NBD fitted at `calibration_end`, each buyer's warning evaluated then with the rules in
/// force, both compared with the purchases up to `holdout_end` (which must have passed).
async fn model_evaluation(State(s): State<Arc<AppState>>, q: Params) -> Result<Response, ApiError> {
    use touchledger_projector::evaluate::{EvaluateError, evaluate};
    use touchledger_projector::model::FitError;
    let q = params(q)?;
    let instant = |key: &str| -> Result<Timestamp, ApiError> {
        match q.get(key).map(String::as_str) {
            None | Some("") => Err(bad(format!("{key}: required (RFC 3339 or YYYY-MM-DD)"))),
            Some(v) => v.parse().map_err(|e| {
                bad(format!(
                    "{key}: {e} (use RFC 3339, e.g. 2026-03-03T12:00:00Z, or YYYY-MM-DD)"
                ))
            }),
        }
    };
    let (t1, t2) = (instant("calibration_end")?, instant("holdout_end")?);
    let unit = match q.get("unit").map(String::as_str) {
        None | Some("") | Some("weeks") => touchledger_domain::TimeUnit::Weeks,
        Some("days") => touchledger_domain::TimeUnit::Days,
        Some(other) => return Err(bad(format!("unit: {other:?} is not weeks or days"))),
    };
    if t2 <= t1 {
        return Err(bad(format!(
            "holdout_end ({t2}) must be after calibration_end ({t1})"
        )));
    }
    let now = (s.cfg.clock)();
    if t2 > now {
        return Err(bad(format!(
            "holdout_end ({t2}) has not passed yet (now {now}): nothing to compare with"
        )));
    }
    let Ok(one) = s.evaluating.clone().try_acquire_owned() else {
        return Ok((
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Json(json!({ "error": "another evaluation is running; retry when it is done" })),
        )
            .into_response());
    };
    let reads = match &s.backend {
        Backend::Local { reads, .. } => reads.clone(),
        Backend::Partitioned(p) => {
            // Every partition's buyers, merged: the single ledger's evaluation.
            use touchledger_bus::EvaluateFailed;
            let e = p.router.evaluate(t1, t2, unit).await;
            drop(one);
            return match e {
                Ok(e) => Ok(Json(e).into_response()),
                Err(EvaluateFailed::Periods(m)) => Err(bad(m)),
                Err(EvaluateFailed::NoModel(m)) => Err(ApiError(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("no model at calibration_end {t1}: {m}"),
                )),
                Err(EvaluateFailed::Read(e)) => Err(read_failed(e)),
                Err(EvaluateFailed::Internal(m)) => Err(internal(m)),
            };
        }
    };
    blocking(move || match evaluate(&reads, t1, t2, unit) {
        Ok(e) => {
            drop(one);
            Ok(Json(e).into_response())
        }
        Err(e @ EvaluateError::Periods { .. }) => Err(bad(e.to_string())),
        // The data cannot be fitted (no buyer by the calibration end, a degenerate
        // likelihood): a property of the instants asked for, not a server failure.
        Err(EvaluateError::Fit(FitError::Model(e))) => Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("no model at calibration_end {t1}: {e}"),
        )),
        Err(e) => Err(internal(e)),
    })
    .await
}

fn level_of(s: &str) -> Option<ChurnLevel> {
    Some(match s {
        "none" => ChurnLevel::None,
        "watch" => ChurnLevel::Watch,
        "warning" => ChurnLevel::Warning,
        "critical" => ChurnLevel::Critical,
        "lost" => ChurnLevel::Lost,
        _ => return None,
    })
}

/// The parameters of `GET /api/v1/at-risk`, checked.
struct AtRiskParams {
    /// The page asked for (offset and limit from `page` and `per_page`).
    req: AtRiskRequest,
    page: u64,
    per_page: u64,
}

impl AtRiskParams {
    fn parse(q: &HashMap<String, String>, now: Timestamp) -> Result<AtRiskParams, ApiError> {
        let at = as_of(q, now)?;
        let min_level = match q.get("min_level") {
            None => ChurnLevel::Watch,
            Some(l) => level_of(l).ok_or_else(|| {
                bad(format!(
                    "min_level: {l:?} is not none, watch, warning, critical or lost"
                ))
            })?,
        };
        let level = match q.get("level") {
            None => None,
            Some(l) => Some(level_of(l).ok_or_else(|| {
                bad(format!(
                    "level: {l:?} is not none, watch, warning, critical or lost"
                ))
            })?),
        };
        let cause = q.get("cause").cloned();
        if let Some(c) = &cause
            && ![
                "natural",
                "need_change",
                "competitor",
                "disappointment",
                "unknown",
            ]
            .contains(&c.as_str())
        {
            return Err(bad(format!(
                "cause: {c:?} is not natural, need_change, competitor, disappointment or unknown"
            )));
        }
        let reason = q.get("reason").cloned();
        let sort = q.get("sort").cloned().unwrap_or_else(|| "score".into());
        if !["score", "value", "since", "customer", "level"].contains(&sort.as_str()) {
            return Err(bad(format!(
                "sort: {sort:?} is not score, value, since, customer or level"
            )));
        }
        let ascending = match q.get("order").map(String::as_str) {
            None | Some("desc") => false,
            Some("asc") => true,
            Some(o) => return Err(bad(format!("order: {o:?} is not asc or desc"))),
        };
        let page = number(q, "page", 1, u64::MAX)?;
        let per_page = number(q, "per_page", 50, 500)?;
        // (page − 1) × per_page must not wrap (it once answered page 1 for a huge page).
        let offset = (page - 1)
            .checked_mul(per_page)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(|| {
                bad(format!(
                    "page: {page} × per_page {per_page} is beyond any list (too large)"
                ))
            })?;
        Ok(AtRiskParams {
            req: AtRiskRequest {
                as_of: at,
                now: is_now(q),
                min_level,
                level,
                cause,
                reason,
                sort,
                ascending,
                offset,
                limit: per_page as usize,
            },
            page,
            per_page,
        })
    }
}

/// Check a query string as the API would (decoding, then the parameters of `endpoint`:
/// `customer`, `at-risk` or `overview`), without a store: for the fuzzer (`fuzz/`). Never
/// panics; an `Err` is the 400 message.
#[doc(hidden)]
pub fn check_query(endpoint: &str, query: &str) -> Result<(), String> {
    let q: HashMap<String, String> =
        serde_urlencoded::from_str(query).map_err(|e| format!("query: {e}"))?;
    let now = Timestamp::from_unix_nanos(1_780_000_000_000_000_000);
    let r = match endpoint {
        "customer" => as_of(&q, now).and_then(|_| number(&q, "limit", 200, 10_000).map(drop)),
        "at-risk" => AtRiskParams::parse(&q, now).map(drop),
        _ => as_of(&q, now).map(drop),
    };
    r.map_err(|ApiError(_, m)| m)
}

/// `GET /api/v1/at-risk`: customers at or above `min_level` (default watch), optionally only
/// `level`, `cause` and `reason`, sorted and paginated.
async fn at_risk(State(s): State<Arc<AppState>>, q: Params) -> Result<Json<Value>, ApiError> {
    let q = params(q)?;
    let AtRiskParams {
        req,
        page,
        per_page,
    } = AtRiskParams::parse(&q, (s.cfg.clock)())?;
    let at = req.as_of;
    // "Now": the current views' indexes, O(log n + page); an explicit instant: a pass over
    // every customer. Partitioned: every partition's first rows, merged.
    let answer = match &s.backend {
        Backend::Partitioned(p) => p.router.at_risk(&req).await.map_err(read_failed)?,
        Backend::Local { reads, .. } => {
            let (reads, current) = (reads.clone(), s.cfg.current.clone());
            blocking(move || req.answer(&reads, current.as_deref()).map_err(internal)).await?
        }
    };
    Ok(Json(json!({
        "as_of": at.at,
        "axis": at.axis,
        "source": answer.source,
        "total": answer.total,
        "page": page,
        "per_page": per_page,
        "items": answer.items,
    })))
}

/// `GET /api/v1/overview`: the population read model.
async fn overview(State(s): State<Arc<AppState>>, q: Params) -> Result<Response, ApiError> {
    let q = params(q)?;
    let at = as_of(&q, (s.cfg.clock)())?;
    // "Now": the current materialisation's sums (O(months), plus a pass over the in-memory
    // rank keys after a change); a passed month end: its snapshot if still valid; any other
    // instant: a pass over every customer.
    let (store, reads) = match &s.backend {
        Backend::Local { store, reads } => (store.clone(), reads.clone()),
        Backend::Partitioned(p) => {
            // Every partition's customers, added up (their current views for a "now" read).
            let (p, how) = p
                .router
                .population_from(at, is_now(&q), (s.cfg.clock)())
                .await
                .map_err(read_failed)?;
            let body = serde_json::to_value(&p).map(Json).map_err(internal)?;
            let source = match how {
                "summed" => "partitions_summed",
                "month_end" => "partitions_month_end",
                _ => "partitions",
            };
            return Ok(([("x-touchledger-source", source)], body).into_response());
        }
    };
    let current = current_now(&s, &q);
    let now = (s.cfg.clock)();
    let (source, body) = blocking(move || {
        let (p, source) = match (current, &s.cfg.month_ends) {
            (Some(c), _) => (c.population(at.at), "current"),
            (None, Some(me)) => match me
                .population(&reads, store.as_ref(), at, now)
                .map_err(internal)?
            {
                Some((p, true)) => (p, "month_end"),
                Some((p, false)) => (p, "full_pass"),
                None => (reads.population(at).map_err(internal)?, "full_pass"),
            },
            (None, None) => (reads.population(at).map_err(internal)?, "full_pass"),
        };
        Ok((
            source,
            serde_json::to_value(&p).map(Json).map_err(internal)?,
        ))
    })
    .await?;
    Ok(([("x-touchledger-source", source)], body).into_response())
}

/// `GET /api/v1/partitions`: the ledger's partitions as NATS sees them (what
/// `touchledger cluster status --json` prints): owners, feed heads, intake backlog, Raft groups.
async fn partitions(State(s): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let count = match &s.backend {
        Backend::Partitioned(p) => p.router.partitions,
        Backend::Local { .. } => 1,
    };
    let subjects = touchledger_bus::Subjects::new(s.cfg.prefix.clone());
    let status = touchledger_bus::cluster_status(&s.client, &subjects, count)
        .await
        .map_err(internal)?;
    serde_json::to_value(status).map(Json).map_err(internal)
}

/// `GET /healthz`: the process is up.
async fn healthz() -> &'static str {
    "ok\n"
}

/// One store's readiness: its projections and current views within `max_lag` of its log,
/// and its free space above the reserve. `(ready, reason, body)`.
fn store_ready(
    store: &SledStore,
    reads: &ReadModels,
    current: Option<&Current>,
    max_lag: u64,
) -> Result<(bool, Option<String>, Value), ApiError> {
    let head = store.head().position;
    let cps = reads.checkpoints().map_err(internal)?;
    let mut lag = cps
        .iter()
        .map(|c| head.saturating_sub(*c))
        .max()
        .unwrap_or(0);
    // The current views count as a projection: not ready until their start-up
    // re-evaluation is done and they follow the churn projection.
    let current_body = current.map(|c| {
        lag = lag.max(head.saturating_sub(c.checkpoint()));
        json!({ "ready": c.is_ready(), "checkpoint": c.checkpoint(), "customers": c.len() })
    });
    // Free space against the store's reserve: below it the ledger takes no input.
    let storage = match store.space() {
        Ok((free, reserve)) => {
            metrics::gauge!("touchledger_store_available_bytes").set(free.available as f64);
            metrics::gauge!("touchledger_store_reserve_bytes").set(reserve as f64);
            let full = !store.config().space_reserve.is_none() && free.available < reserve;
            json!({ "available_bytes": free.available, "reserve_bytes": reserve, "full": full })
        }
        Err(e) => json!({ "error": e.to_string(), "full": false }),
    };
    let full = storage["full"].as_bool().unwrap_or(false);
    let ready = !full && lag <= max_lag && current.is_none_or(|c| c.is_ready());
    let reason = if full {
        Some(format!(
            "storage full: {} bytes free, the store keeps {} in reserve; intake is paused and resumes by itself when space is freed",
            storage["available_bytes"], storage["reserve_bytes"]
        ))
    } else if !ready {
        Some("read models are catching up with the ledger".to_owned())
    } else {
        None
    };
    let body = json!({
        "ready": ready,
        "reason": reason,
        "storage": storage,
        "head": head,
        "checkpoints": { "satisfaction": cps[0], "loyalty": cps[1], "churn": cps[2] },
        "current": current_body,
        "lag": lag,
    });
    Ok((ready, reason, body))
}

/// `GET /readyz`: 200 once every projection is within `ready_max_lag` positions of the log
/// (of every partition this process owns, for a process of a partitioned ledger; one that
/// owns none only routes reads and is ready).
async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let max_lag = s.cfg.ready_max_lag;
    let (ready, body) = match &s.backend {
        Backend::Local { store, reads } => {
            let (store, reads, current) = (store.clone(), reads.clone(), s.cfg.current.clone());
            match blocking(move || store_ready(&store, &reads, current.as_deref(), max_lag)).await {
                Ok((ready, _, body)) => (ready, body),
                Err(e) => return e.into_response(),
            }
        }
        Backend::Partitioned(p) => {
            let owned = p.owned.snapshot();
            let count = p.router.partitions;
            let r = blocking(move || {
                let mut ready = true;
                let mut reasons = Vec::new();
                let mut parts = serde_json::Map::new();
                for (n, o) in owned {
                    let (ok, reason, body) =
                        store_ready(&o.store, &o.reads, Some(&o.current), max_lag)?;
                    metrics::gauge!("touchledger_partition_ready", "partition" => n.to_string())
                        .set(if ok { 1.0 } else { 0.0 });
                    ready &= ok;
                    if let Some(r) = reason {
                        reasons.push(format!("partition {n}: {r}"));
                    }
                    parts.insert(n.to_string(), body);
                }
                let reason = (!reasons.is_empty()).then(|| reasons.join("; "));
                Ok((
                    ready,
                    json!({
                        "ready": ready,
                        "reason": reason,
                        "partitions": count,
                        "owned": parts,
                    }),
                ))
            })
            .await;
            match r {
                Ok(x) => x,
                Err(e) => return e.into_response(),
            }
        }
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    match &s.cfg.metrics {
        Some(render) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            render(),
        )
            .into_response(),
        None => ApiError(StatusCode::NOT_FOUND, "metrics are not enabled".into()).into_response(),
    }
}

/// `GET /api/v1/events`: Server-Sent Events bridged from NATS.
async fn events(
    State(s): State<Arc<AppState>>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let prefix = s.cfg.prefix.clone();
    let views = s
        .client
        .subscribe(format!("{prefix}.view.>"))
        .await
        .map_err(internal)?;
    let alerts = s
        .client
        .subscribe(format!("{prefix}.alert.churn.>"))
        .await
        .map_err(internal)?;
    let stream = futures::stream::select(views, alerts).filter_map(move |m| {
        let prefix = prefix.clone();
        async move {
            let rest = m
                .subject
                .as_str()
                .strip_prefix(&format!("{prefix}."))?
                .to_owned();
            // A partitioned ledger's views and alerts name their partition (a header on
            // NATS, a `partition` field here).
            let partition = m
                .headers
                .as_ref()
                .and_then(|h| h.get(touchledger_bus::headers::PARTITION))
                .and_then(|p| p.as_str().parse::<u32>().ok());
            let mut parts = rest.splitn(3, '.');
            let ev = match (parts.next(), parts.next(), parts.next()) {
                (Some("view"), Some(model), Some(customer)) => {
                    let mut data = json!({ "model": model, "customer_id": customer });
                    if let Some(p) = partition {
                        data["partition"] = json!(p);
                    }
                    SseEvent::default().event("view").data(data.to_string())
                }
                (Some("alert"), Some("churn"), Some(_)) => {
                    let env = touchledger_proto::v1::Envelope::decode(m.payload.as_ref()).ok()?;
                    let e = Event::try_from(env).ok()?;
                    let mut data = serde_json::to_value(&e).ok()?;
                    if let Some(p) = partition {
                        data["partition"] = json!(p);
                    }
                    SseEvent::default().event("alert").data(data.to_string())
                }
                _ => return None,
            };
            Some(Ok(ev))
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn auth(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = &s.cfg.token else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return next.run(req).await;
    }
    // `Authorization: Bearer <token>`, the scheme case-insensitive (RFC 9110 §11.1).
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned());
    // `?access_token=` only where a browser cannot send a header: the dashboard page (opened
    // from a link) and the live feed (EventSource). Percent-decoded.
    let query_token = (path == "/" || path == "/api/v1/events")
        .then(|| req.uri().query())
        .flatten()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("access_token="))
                .map(|t| {
                    percent_encoding::percent_decode_str(&t.replace('+', " "))
                        .decode_utf8_lossy()
                        .into_owned()
                })
        });
    let ok = [bearer, query_token]
        .iter()
        .flatten()
        .any(|given| same_token(given, token));
    if ok {
        next.run(req).await
    } else {
        let mut r = ApiError(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required".into(),
        )
        .into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    }
}

/// Compare a presented token with the configured one in constant time: both are hashed first,
/// so neither the position of the first differing byte nor the length is timed.
fn same_token(given: &str, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    let (a, b) = (
        blake3::hash(given.as_bytes()),
        blake3::hash(token.as_bytes()),
    );
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The router of an unpartitioned ledger's API (exposed for tests).
pub fn router(
    store: Arc<SledStore>,
    reads: Arc<ReadModels>,
    client: async_nats::Client,
    cfg: HttpConfig,
) -> Router {
    app(Backend::Local { store, reads }, client, cfg)
}

/// The router of a partitioned ledger's API, served by each of its processes.
pub fn partitioned_router(p: Partitioned, client: async_nats::Client, cfg: HttpConfig) -> Router {
    app(Backend::Partitioned(Box::new(p)), client, cfg)
}

fn app(backend: Backend, client: async_nats::Client, cfg: HttpConfig) -> Router {
    let state = Arc::new(AppState {
        backend,
        client,
        cfg,
        evaluating: Arc::new(tokio::sync::Semaphore::new(1)),
    });
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/customers/{id}", get(customer))
        .route("/api/v1/at-risk", get(at_risk))
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/partitions", get(partitions))
        .route("/api/v1/events", get(events))
        .route("/api/v1/models/evaluation", get(model_evaluation))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such resource".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// Serve an unpartitioned ledger's HTTP API until `shutdown`.
pub async fn run_http(
    store: Arc<SledStore>,
    reads: Arc<ReadModels>,
    client: async_nats::Client,
    cfg: HttpConfig,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    let addr = cfg.addr;
    serve(addr, router(store, reads, client, cfg), shutdown).await
}

/// Serve the HTTP API of a process of a partitioned ledger until `shutdown`: every read goes
/// through the router (any partition, wherever it is owned).
pub async fn run_http_partitioned(
    p: Partitioned,
    client: async_nats::Client,
    cfg: HttpConfig,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    let addr = cfg.addr;
    serve(addr, partitioned_router(p, client, cfg), shutdown).await
}

async fn serve(
    addr: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    tracing::info!(%addr, "HTTP listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(HttpError::Serve)
}
