//! The read-model service: runs the three projectors in-process, publishes a customer's views
//! on `<prefix>.view.<model>.<customer>` when their state changes, answers queries on
//! `<prefix>.query.<model>`, and runs the churn **assessor**.
//!
//! Key decisions:
//! * Live views are evaluated on the business axis at the service clock's "now"; queries take
//!   any `as_of` and axis.
//! * The assessor's memory is the ledger itself: a customer's previous level is their latest
//!   `ChurnRiskAssessed` event (plus the few just appended and not yet folded). On a level
//!   change it appends a new one (source `ledger`, naming the model version used) and then
//!   publishes the alert; so every alert ever raised is in the auditable history, and a
//!   restart neither repeats nor loses an alert.
//! * A due-time index (`due.churn`, keyed by the next instant a verdict can change without a
//!   new event, see `ChurnRules::next_due`) makes each sweep cost O(customers due). A new
//!   model fit makes every customer due once.
//! * Every evaluation of the assessor also refreshes the customer's **current view**
//!   (`touchledger_projector::Current`, ADR 0006), and the due time includes the current view's
//!   own (future-dated touchpoints, a one-day age cap), so the HTTP API's "now" reads are index
//!   lookups. At start-up the current views are brought up to date first (every customer after
//!   a rules change, the customers of the positions they missed after a crash).
//! * Model refits run on a schedule, on demand over NATS (`<prefix>.model.fit`, what
//!   `touchledger fit --remote` sends) and offline (`touchledger fit`), and are recorded as
//!   `ModelFitted` events; a refit never rewrites earlier assessments.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use touchledger_domain::count::CountKind;
use touchledger_domain::facts::{AsOf, CustomerFacts};
use touchledger_domain::population::Rules;
use touchledger_domain::{
    ChurnLevel, ChurnRiskAssessed, Event, LEDGER_SOURCE, MODEL_CUSTOMER, Payload, SCHEMA_VERSION,
    TimeUnit, Timestamp,
};
use touchledger_projector::current::Catchup;
use touchledger_projector::model::FitStatsRequest;
use touchledger_projector::monthend::{MonthEnds, last_month_end};
use touchledger_projector::partial::{self, PartialRequest};
use touchledger_projector::{Change, Current, ReadModels, RunConfig, run_in_process};
use touchledger_proto::{v1, views};
use touchledger_store::{AppendItem, AppendOutcome, DueIndex, EventStore, SledStore};

use crate::{BusError, Subjects, nats_err};

/// Read-model service settings. Defaults are documented per field.
#[derive(Clone)]
pub struct ViewConfig {
    /// Subject layout.
    pub subjects: Subjects,
    /// The rules evaluated (all defaults from the brief).
    pub rules: Rules,
    /// Events folded per projector batch. Default 1000.
    pub batch: u64,
    /// Interval between assessor sweeps of the due-time index. Default 60 s.
    pub sweep_interval: Duration,
    /// Every customer is re-assessed at least this often (days), even when no threshold is
    /// near. Default 30.
    pub max_recheck_days: i64,
    /// Customers at watch or worse get a fresh `ChurnRiskAssessed` at least this often, even
    /// without a level change (the "periodic" assessment). Default 30 days.
    pub reassert_after: Duration,
    /// Scheduled model refits; `None` = on demand only. Default every 24 h.
    pub refit_every: Option<Duration>,
    /// Time unit of scheduled refits. Default weeks.
    pub refit_unit: TimeUnit,
    /// Queue group of the query responders. Default `touchledger-views`.
    pub queue_group: String,
    /// The service clock. Default: wall clock. Tests substitute a controllable clock.
    pub clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    /// A current view is re-evaluated at least this often (it carries its own `as_of`).
    /// Default 1 day.
    pub current_refresh: Duration,
    /// The current materialisation to maintain (shared with the HTTP API); `None` = open it
    /// from the ledger's database.
    pub current: Option<Arc<Current>>,
    /// While the projections are more than this many positions behind the log (a catch-up or
    /// rebuild), intermediate views are not published and the churn work (assessment, current
    /// views) is deferred until they are near the head, then done once per customer.
    /// Default 10,000.
    pub catch_up_lag: u64,
    /// Month-end population snapshots to take when a month closes (shared with the HTTP API);
    /// `None` = none.
    pub month_ends: Option<Arc<MonthEnds>>,
    /// The ownership fence of a leased partition: checked before the assessor appends (the
    /// default always holds).
    pub fence: crate::Fence,
    /// Serve on-demand model fits and evaluations (`<prefix>.model.fit`,
    /// `<prefix>.model.evaluate`). Default true; off in a partition of a partitioned ledger,
    /// whose model would have to be fitted on every partition's customers, not one
    /// partition's.
    pub fits: bool,
    /// How far the partition's committed-event feed holds its records
    /// ([`crate::FeedProgress`]): a recorded model fit is acknowledged only once it is in the
    /// feed (the next owner starts from the feed). The default tracks nothing.
    pub feed: crate::FeedProgress,
    /// Where a partition's read models are registered while it is owned here (the HTTP
    /// server's `/readyz` of a partitioned process reads them). `None` = not registered.
    pub owned: Option<OwnedViews>,
}

impl std::fmt::Debug for ViewConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewConfig")
            .field("subjects", &self.subjects)
            .field("batch", &self.batch)
            .field("sweep_interval", &self.sweep_interval)
            .field("max_recheck_days", &self.max_recheck_days)
            .field("reassert_after", &self.reassert_after)
            .field("refit_every", &self.refit_every)
            .field("current_refresh", &self.current_refresh)
            .field("catch_up_lag", &self.catch_up_lag)
            .field("month_ends", &self.month_ends.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for ViewConfig {
    fn default() -> Self {
        ViewConfig {
            subjects: Subjects::new("crm"),
            rules: Rules::default(),
            batch: 1000,
            sweep_interval: Duration::from_secs(60),
            max_recheck_days: 30,
            reassert_after: Duration::from_secs(30 * 86_400),
            refit_every: Some(Duration::from_secs(86_400)),
            refit_unit: TimeUnit::Weeks,
            queue_group: "touchledger-views".into(),
            clock: Arc::new(Timestamp::now),
            current_refresh: Duration::from_secs(86_400),
            current: None,
            catch_up_lag: 10_000,
            month_ends: None,
            fence: crate::Fence::default(),
            fits: true,
            feed: crate::FeedProgress::default(),
            owned: None,
        }
    }
}

/// Open the month-end population snapshots in the ledger's database for `rules`.
pub fn open_month_ends(store: &SledStore, rules: &Rules) -> Result<Arc<MonthEnds>, BusError> {
    let tree = store.projection(touchledger_projector::monthend::TREE)?;
    Ok(Arc::new(
        MonthEnds::open(tree, rules).map_err(projector_err)?,
    ))
}

/// Open the current materialisation in the ledger's database for `rules` (what `serve` shares
/// between [`run_views`] and the HTTP API). Its start-up re-evaluation runs in [`run_views`].
pub fn open_current(
    store: &SledStore,
    rules: &Rules,
    refresh: Duration,
) -> Result<Arc<Current>, BusError> {
    let churn = store.projection(touchledger_projector::CHURN.name)?;
    // A projection about to be reset (other version) counts as empty.
    let churn_checkpoint = churn
        .meta()?
        .filter(|m| m.version == touchledger_projector::CHURN.version)
        .map_or(0, |m| m.checkpoint);
    let (current, catchup) = Current::open(
        store.projection(touchledger_projector::current::TREE)?,
        rules.clone(),
        refresh,
        churn_checkpoint,
    )
    .map_err(projector_err)?;
    tracing::info!(customers = current.len(), catchup = ?catchup, "current views opened");
    Ok(Arc::new(current))
}

/// The assessor: evaluates churn warnings, records level changes, keeps the due-time index.
struct Assessor {
    store: Arc<SledStore>,
    reads: Arc<ReadModels>,
    current: Arc<Current>,
    due: DueIndex,
    cfg: ViewConfig,
    /// Levels appended but perhaps not yet folded: customer → (level, position, as_of).
    pending: Mutex<HashMap<String, (ChurnLevel, u64, Timestamp)>>,
}

/// A message to publish.
type Outgoing = (String, Vec<u8>);

/// What assessing one customer decided.
struct Decision {
    /// When the customer must be assessed again.
    next: Timestamp,
    /// The assessment to record, and whether the level changed.
    record: Option<(Event, bool)>,
}

/// A unit of blocking read-model work, returning what to publish.
type Work = Box<dyn FnOnce() -> Result<Vec<Outgoing>, BusError> + Send>;

impl Assessor {
    /// The last assessed level and when, from the ledger (or a pending append).
    fn previous(&self, customer: &str, facts: &CustomerFacts) -> (ChurnLevel, Option<Timestamp>) {
        let folded = facts
            .assessments
            .iter()
            .filter(|a| a.stamp.retracted_at.is_none())
            .max_by_key(|a| a.stamp.position);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&(level, position, at)) = pending.get(customer) {
            if folded.is_some_and(|a| a.stamp.position >= position) {
                pending.remove(customer);
            } else {
                return (level, Some(at));
            }
        }
        folded.map_or((ChurnLevel::None, None), |a| {
            (a.level, Some(a.stamp.occurred_at))
        })
    }

    /// The churn projection has folded up to `checkpoint`, and for `customers` nothing but
    /// their assessments: forget the pending levels that are now folded (`previous` would, but
    /// these customers are not evaluated again until they are next due).
    fn folded(&self, customers: &std::collections::BTreeSet<String>, checkpoint: u64) {
        if customers.is_empty() {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for c in customers {
            if pending
                .get(c)
                .is_some_and(|&(_, position, _)| position <= checkpoint)
            {
                pending.remove(c);
            }
        }
    }

    /// Assess `customer` now: materialise its current view and return when it is due again,
    /// and the `ChurnRiskAssessed` event to record if its level changed (or an at-risk verdict
    /// is due for re-assertion), with whether the level changed. `None` for the model customer.
    /// Rescheduling is the caller's, after the event is recorded.
    fn decide(&self, customer: &str, now: Timestamp) -> Result<Option<Decision>, BusError> {
        if customer == MODEL_CUSTOMER {
            return Ok(None);
        }
        // Evaluated once: the current view is materialised and the alert decided from it.
        let (facts, view, next) = self
            .current
            .refresh(&self.reads, customer, now, self.cfg.max_recheck_days)
            .map_err(projector_err)?;
        let (previous, last_at) = self.previous(customer, &facts);
        let stale = last_at.is_none_or(|t| {
            now.unix_nanos() - t.unix_nanos() >= self.cfg.reassert_after.as_nanos() as i64
        });
        metrics::counter!("touchledger_assessments_evaluated_total").increment(1);
        let changed = view.level != previous;
        let reassert = view.level >= ChurnLevel::Watch && stale;
        if !(changed || reassert) {
            return Ok(Some(Decision { next, record: None }));
        }
        let event = Event {
            // Unique per (customer, instant, transition): a retry of the same assessment is a
            // duplicate, never a conflict.
            event_id: format!(
                "assess-{customer}-{}-{}-{}",
                now.unix_nanos(),
                views::name(&previous),
                views::name(&view.level)
            ),
            customer_id: customer.to_owned(),
            occurred_at: now,
            source: LEDGER_SOURCE.into(),
            schema_version: SCHEMA_VERSION,
            correlation_id: None,
            causation_id: None,
            payload: Payload::ChurnRiskAssessed(ChurnRiskAssessed {
                level: view.level,
                previous_level: previous,
                score: view.score,
                reasons: view.reasons.clone(),
                probable_cause: view.probable_cause,
                since: view.since,
                expected_next_purchase: view.expected_next_purchase,
                value_at_risk_minor: view.value_at_risk_minor,
                currency: view.currency.clone(),
                model_version: view.model_version.clone().unwrap_or_else(|| "none".into()),
                as_of: now,
            }),
        };
        Ok(Some(Decision {
            next,
            record: Some((event, changed)),
        }))
    }

    /// Assess `customers` now (see [`Assessor::decide`]; each once, the model customer never)
    /// and record their `ChurnRiskAssessed` events in **one** append: one atomic batch and one
    /// flush for all of them, not one per customer (at start-up on a million customers, that is
    /// the difference between minutes and hours). The customers are rescheduled only after
    /// the append: if an evaluation or the append fails, a customer that was due stays due and
    /// the next sweep (or the restart's re-evaluation) takes it again. Returns the alerts of
    /// the level changes.
    fn assess_many(&self, customers: &[String], now: Timestamp) -> Result<Vec<Outgoing>, BusError> {
        let mut seen = std::collections::HashSet::new();
        let mut decided = Vec::new();
        let mut schedule = Vec::new();
        for c in customers {
            if !seen.insert(c.as_str()) {
                continue;
            }
            if let Some(d) = self.decide(c, now)? {
                schedule.push((c.as_str(), d.next));
                decided.extend(d.record);
            }
        }
        let alerts = self.record(decided, now)?;
        for (c, next) in schedule {
            self.due.schedule(c, next)?;
        }
        Ok(alerts)
    }

    /// Append the decided assessments in one batch; note them as pending and return the alerts
    /// of the level changes.
    fn record(
        &self,
        decided: Vec<(Event, bool)>,
        now: Timestamp,
    ) -> Result<Vec<Outgoing>, BusError> {
        if decided.is_empty() {
            return Ok(Vec::new());
        }
        let mut items = Vec::with_capacity(decided.len());
        let mut notes = Vec::with_capacity(decided.len());
        for (event, changed) in decided {
            let level = match &event.payload {
                Payload::ChurnRiskAssessed(a) => (a.previous_level, a.level),
                _ => unreachable!("decide returns assessments"),
            };
            let bytes = touchledger_proto::encode_event(&event);
            notes.push((event.customer_id.clone(), level, changed, bytes));
            items.push(AppendItem::new(event));
        }
        self.cfg.fence.check("recording churn assessments")?;
        let outcomes = self.store.append_ledger_events(items)?;
        let quiet = notes.len() > 10;
        let mut alerts = Vec::new();
        let (mut recorded, mut changes) = (0u64, 0u64);
        for ((customer, (from, to), changed, bytes), outcome) in notes.into_iter().zip(outcomes) {
            let position = match outcome {
                AppendOutcome::Appended { position, .. }
                | AppendOutcome::Duplicate { position, .. } => position,
                other => {
                    tracing::error!(customer, outcome = ?other, "assessment not recorded");
                    continue;
                }
            };
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(customer.clone(), (to, position, now));
            if quiet {
                tracing::debug!(customer, ?from, ?to, position, "churn level assessed");
            } else {
                tracing::info!(customer, ?from, ?to, position, "churn level assessed");
            }
            metrics::counter!("touchledger_assessments_recorded_total", "changed" => if changed { "true" } else { "false" }).increment(1);
            recorded += 1;
            if changed {
                changes += 1;
                alerts.push((self.cfg.subjects.alert(&customer), bytes));
            }
        }
        if quiet {
            tracing::info!(recorded, changes, "churn levels assessed");
        }
        Ok(alerts)
    }

    /// Assess every customer due by `now`, a thousand (one append) at a time. Returns the
    /// alerts.
    fn sweep(&self, now: Timestamp) -> Result<Vec<Outgoing>, BusError> {
        metrics::counter!("touchledger_assessor_sweeps_total").increment(1);
        let mut alerts = Vec::new();
        loop {
            let due = self.due.due(now, 1000)?;
            let n = due.len();
            let ids: Vec<String> = due.into_iter().map(|(_, c)| c).collect();
            alerts.extend(self.assess_many(&ids, now)?);
            if n < 1000 {
                break;
            }
        }
        Ok(alerts)
    }

    /// Bring the current materialisation up to date at start-up (see `Current::open`), then
    /// record that it reflects the churn projection up to `checkpoint`.
    fn catch_up_current(&self, checkpoint: u64, now: Timestamp) -> Result<Vec<Outgoing>, BusError> {
        let mut out = Vec::new();
        let mut n = 0u64;
        let catchup = self.current.take_catchup();
        if catchup != Catchup::None {
            tracing::info!(?catchup, "re-evaluating current views");
        }
        let ids = Current::catchup_customers(&catchup, &self.reads, self.store.as_ref())
            .map_err(projector_err)?;
        for chunk in ids.chunks(1000) {
            out.extend(self.assess_many(chunk, now)?);
            n += chunk.len() as u64;
        }
        self.current.commit(checkpoint).map_err(projector_err)?;
        self.current.set_ready();
        tracing::info!(customers = n, checkpoint, "current views ready");
        Ok(out)
    }

    /// A new model makes every customer due now.
    fn everyone_due(&self, now: Timestamp) -> Result<u64, BusError> {
        let mut n = 0;
        for id in self.reads.customer_ids() {
            let id = id.map_err(projector_err)?;
            self.due.schedule(&id, now)?;
            n += 1;
        }
        Ok(n)
    }
}

fn projector_err(e: touchledger_projector::ProjectorError) -> BusError {
    match e {
        touchledger_projector::ProjectorError::Store(s) => BusError::Store(s),
        other => BusError::Projection(other.to_string()),
    }
}

/// The views of one customer in one projection, evaluated now, encoded.
fn view_messages(
    reads: &ReadModels,
    subjects: &Subjects,
    projection: &str,
    customer: &str,
    now: Timestamp,
) -> Result<Option<Outgoing>, BusError> {
    if customer == MODEL_CUSTOMER {
        return Ok(None);
    }
    let as_of = AsOf::business(now);
    // Only the projection that changed is loaded.
    let Some(f) = reads
        .facts_in(projection, customer)
        .map_err(projector_err)?
    else {
        return Ok(None);
    };
    let rules = &reads.rules;
    let bytes = match projection {
        "satisfaction" => {
            views::satisfaction(customer, &rules.satisfaction.evaluate(&f, as_of)).encode_to_vec()
        }
        "loyalty" => {
            let model = reads.model(as_of).map_err(projector_err)?;
            views::loyalty(
                customer,
                &rules
                    .loyalty
                    .with_value(&f, model.as_ref(), as_of, &rules.churn),
            )
            .encode_to_vec()
        }
        _ => {
            let model = reads.model(as_of).map_err(projector_err)?;
            let view = rules
                .churn
                .evaluate_with_expectation(&f, model.as_ref(), as_of);
            views::churn(customer, &view).encode_to_vec()
        }
    };
    Ok(Some((subjects.view(projection, customer), bytes)))
}

/// The instant and axis a query asks for (`now` without `as_of`).
pub(crate) fn query_as_of(req: &v1::QueryRequest, now: Timestamp) -> Result<AsOf, String> {
    let at = match &req.as_of {
        None => now,
        Some(t) => touchledger_proto::from_pb_time("as_of", Some(*t)).map_err(|e| e.to_string())?,
    };
    Ok(AsOf {
        at,
        axis: views::axis_from(req.axis),
    })
}

/// Answer one query.
fn answer(
    reads: &ReadModels,
    current: Option<&Current>,
    model: &str,
    req: &v1::QueryRequest,
    now: Timestamp,
) -> v1::QueryReply {
    use v1::query_reply::Result as R;
    let err = |code: &str, message: String| v1::QueryReply {
        result: Some(R::Error(v1::QueryError {
            code: code.into(),
            message,
        })),
    };
    let as_of = match query_as_of(req, now) {
        Ok(a) => a,
        Err(e) => return err("BAD_REQUEST", e),
    };
    let at = as_of.at;
    if model == "population" {
        // "Now" on the business axis: the current materialisation's sums (ADR 0006).
        if let Some(c) = current.filter(|c| {
            req.as_of.is_none()
                && as_of.axis == touchledger_domain::facts::Axis::Business
                && c.is_ready()
        }) {
            return v1::QueryReply {
                result: Some(R::Population(views::population(&c.population(at)))),
            };
        }
        return match reads.population(as_of) {
            Ok(p) => v1::QueryReply {
                result: Some(R::Population(views::population(&p))),
            },
            Err(e) => err("INTERNAL", e.to_string()),
        };
    }
    if !matches!(model, "satisfaction" | "loyalty" | "churn") {
        return err(
            "UNKNOWN_MODEL",
            format!("unknown model {model:?}: satisfaction, loyalty, churn or population"),
        );
    }
    if req.customer_id.is_empty() {
        return err("BAD_REQUEST", "customer_id is required".into());
    }
    let id = req.customer_id.as_str();
    match reads.customer(id, as_of) {
        Err(e) => err("INTERNAL", e.to_string()),
        Ok(None) => err("NOT_FOUND", format!("no touchpoints of {id:?} at {at}")),
        Ok(Some(v)) => v1::QueryReply {
            result: Some(match model {
                "satisfaction" => R::Satisfaction(views::satisfaction(id, &v.satisfaction)),
                "loyalty" => R::Loyalty(views::loyalty(id, &v.loyalty)),
                _ => R::Churn(views::churn(id, &v.churn)),
            }),
        },
    }
}

/// The calibration end (`now` without `as_of`), time unit (default weeks) and count model
/// (default `default`, the rules' choice) a fit asks for.
pub(crate) fn fit_params(
    req: &v1::FitRequest,
    now: Timestamp,
    default: CountKind,
) -> Result<(Timestamp, TimeUnit, CountKind), String> {
    let as_of = match &req.as_of {
        None => now,
        Some(t) => touchledger_proto::from_pb_time("as_of", Some(*t)).map_err(|e| e.to_string())?,
    };
    let unit = match v1::TimeUnit::try_from(req.unit) {
        Ok(v1::TimeUnit::Days) => TimeUnit::Days,
        Ok(_) => TimeUnit::Weeks,
        Err(_) => return Err(format!("unknown time unit {}", req.unit)),
    };
    let kind = match req.model.as_str() {
        "" => default,
        name => CountKind::of_name(name)
            .ok_or_else(|| format!("unknown model {name:?} (bgnbd or paretonbd)"))?,
    };
    Ok((as_of, unit, kind))
}

/// Fit the churn model now (as of `req.as_of`, default `now`) and record it unless a dry run.
fn fit_now(
    reads: &ReadModels,
    store: &SledStore,
    req: &v1::FitRequest,
    now: Timestamp,
) -> v1::FitReply {
    let err = |code: &str, message: String| v1::FitReply {
        error: Some(v1::QueryError {
            code: code.into(),
            message,
        }),
        ..Default::default()
    };
    let (as_of, unit, kind) = match fit_params(req, now, reads.rules.churn.count_model) {
        Ok(x) => x,
        Err(e) => return err("BAD_REQUEST", e),
    };
    let (m, event) = match touchledger_projector::model::fit_event(reads, as_of, unit, kind) {
        Ok(x) => x,
        Err(e) => return err("FIT_FAILED", e.to_string()),
    };
    let envelope = Some(v1::Envelope::from(&event));
    if req.dry_run {
        return v1::FitReply {
            event: envelope,
            ..Default::default()
        };
    }
    match store.append_ledger_events(vec![AppendItem::new(event)]) {
        Ok(mut o) => match o.pop() {
            Some(AppendOutcome::Appended { position, .. }) => {
                tracing::info!(version = %m.model_version, position, "churn model refitted on demand");
                v1::FitReply {
                    event: envelope,
                    position,
                    ..Default::default()
                }
            }
            Some(AppendOutcome::Duplicate { position, .. }) => v1::FitReply {
                event: envelope,
                position,
                duplicate: true,
                ..Default::default()
            },
            other => err("INTERNAL", format!("ModelFitted not recorded: {other:?}")),
        },
        Err(e) => err("INTERNAL", e.to_string()),
    }
}

/// Evaluate the churn model and the warnings on `req`'s periods (`touchledger evaluate` on
/// the running ledger) and record the evaluation when asked.
fn evaluate_now(
    reads: &ReadModels,
    store: &SledStore,
    req: &v1::EvaluateRequest,
    now: Timestamp,
) -> v1::EvaluateReply {
    use touchledger_projector::evaluate::{EvaluateError, evaluate};
    use touchledger_projector::model::FitError;
    let err = |code: &str, message: String| v1::EvaluateReply {
        error: Some(v1::QueryError {
            code: code.into(),
            message,
        }),
        ..Default::default()
    };
    let (t1, t2, unit) = match evaluate_params(req, now) {
        Ok(x) => x,
        Err(e) => return err("BAD_REQUEST", e),
    };
    let e = match evaluate(reads, t1, t2, unit) {
        Ok(e) => e,
        Err(e @ EvaluateError::Periods { .. }) => return err("BAD_REQUEST", e.to_string()),
        Err(EvaluateError::Fit(FitError::Model(e))) => {
            return err("NO_MODEL", format!("no model at calibration_end {t1}: {e}"));
        }
        Err(e) => return err("INTERNAL", e.to_string()),
    };
    let (mut reply, event) = match evaluation_reply(&e) {
        Ok(x) => x,
        Err(m) => return err("INTERNAL", m),
    };
    if req.record {
        match store.append_ledger_events(vec![AppendItem::new(event)]) {
            Ok(mut o) => match o.pop() {
                Some(AppendOutcome::Appended { position, .. }) => reply.position = position,
                Some(AppendOutcome::Duplicate { position, .. }) => {
                    reply.position = position;
                    reply.duplicate = true;
                }
                Some(AppendOutcome::Rejected(r)) => {
                    return err("REJECTED", format!("ModelEvaluated not recorded: {r}"));
                }
                other => {
                    return err(
                        "INTERNAL",
                        format!("ModelEvaluated not recorded: {other:?}"),
                    );
                }
            },
            Err(e) => return err("INTERNAL", e.to_string()),
        }
    }
    reply
}

/// The reply carrying evaluation `e` (its JSON and its `ModelEvaluated` event), and that
/// event, to record when asked.
pub(crate) fn evaluation_reply(
    e: &touchledger_projector::evaluate::ModelEvaluation,
) -> Result<(v1::EvaluateReply, Event), String> {
    let event = e.event();
    let reply = v1::EvaluateReply {
        evaluation_json: serde_json::to_string(e).map_err(|e| e.to_string())?,
        event: Some(v1::Envelope::from(&event)),
        ..Default::default()
    };
    Ok((reply, event))
}

/// The periods (both required; the holdout end passed by `now`) and unit (default weeks) an
/// evaluation asks for. T2 after T1 is the evaluation's own check.
pub(crate) fn evaluate_params(
    req: &v1::EvaluateRequest,
    now: Timestamp,
) -> Result<(Timestamp, Timestamp, TimeUnit), String> {
    let instant = |field: &str, t: Option<prost_types::Timestamp>| match t {
        None => Err(format!("{field} is required")),
        Some(t) => touchledger_proto::from_pb_time(field, Some(t)).map_err(|e| e.to_string()),
    };
    let t1 = instant("calibration_end", req.calibration_end)?;
    let t2 = instant("holdout_end", req.holdout_end)?;
    if t2 > now {
        return Err(format!(
            "holdout_end ({t2}) has not passed yet (now {now}): nothing to compare with"
        ));
    }
    let unit = match v1::TimeUnit::try_from(req.unit) {
        Ok(v1::TimeUnit::Days) => TimeUnit::Days,
        Ok(_) => TimeUnit::Weeks,
        Err(_) => return Err(format!("unknown time unit {}", req.unit)),
    };
    Ok((t1, t2, unit))
}

/// Answer a `FitRequest`'s bytes.
fn fit_answer(reads: &ReadModels, store: &SledStore, payload: &[u8], now: Timestamp) -> Vec<u8> {
    match v1::FitRequest::decode(payload) {
        Ok(req) => fit_now(reads, store, &req, now),
        Err(e) => v1::FitReply {
            error: Some(v1::QueryError {
                code: "BAD_REQUEST".into(),
                message: format!("undecodable FitRequest: {e}"),
            }),
            ..Default::default()
        },
    }
    .encode_to_vec()
}

/// Answer an `EvaluateRequest`'s bytes.
fn evaluate_answer(
    reads: &ReadModels,
    store: &SledStore,
    payload: &[u8],
    now: Timestamp,
) -> Vec<u8> {
    match v1::EvaluateRequest::decode(payload) {
        Ok(req) => evaluate_now(reads, store, &req, now),
        Err(e) => v1::EvaluateReply {
            error: Some(v1::QueryError {
                code: "BAD_REQUEST".into(),
                message: format!("undecodable EvaluateRequest: {e}"),
            }),
            ..Default::default()
        },
    }
    .encode_to_vec()
}

/// A request on one of the model subjects: fit or evaluate.
#[derive(Clone, Copy)]
enum ModelRequest {
    Fit,
    Evaluate,
}

impl ModelRequest {
    fn subject(self, s: &Subjects) -> String {
        match self {
            ModelRequest::Fit => s.model_fit(),
            ModelRequest::Evaluate => s.model_evaluate(),
        }
    }

    fn answer(
        self,
        reads: &ReadModels,
        store: &SledStore,
        payload: &[u8],
        now: Timestamp,
    ) -> Vec<u8> {
        match self {
            ModelRequest::Fit => fit_answer(reads, store, payload, now),
            ModelRequest::Evaluate => evaluate_answer(reads, store, payload, now),
        }
    }

    fn not_ready(self, target: u64) -> Vec<u8> {
        self.error(
            "NOT_READY",
            format!("the projections have not reached position {target} yet; retry"),
        )
    }

    fn shutting_down(self) -> Vec<u8> {
        self.error(
            "UNAVAILABLE",
            "the ledger process is shutting down; retry (another process, or this one restarted)"
                .into(),
        )
    }

    fn error(self, code: &str, message: String) -> Vec<u8> {
        let error = Some(v1::QueryError {
            code: code.into(),
            message,
        });
        match self {
            ModelRequest::Fit => v1::FitReply {
                error,
                ..Default::default()
            }
            .encode_to_vec(),
            ModelRequest::Evaluate => v1::EvaluateReply {
                error,
                ..Default::default()
            }
            .encode_to_vec(),
        }
    }
}

/// Serve `what` (`<prefix>.model.fit` or `<prefix>.model.evaluate`) until `shutdown`: each
/// request waits until the churn projection has folded the log up to the head as of the
/// request, then runs on a blocking thread, one fit and one evaluation at a time (they are rare
/// and CPU-bound).
async fn serve_model_requests(
    what: ModelRequest,
    client: async_nats::Client,
    reads: Arc<ReadModels>,
    store: Arc<SledStore>,
    cfg: ViewConfig,
    mut churn_checkpoint: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut sub = client
        .queue_subscribe(what.subject(&cfg.subjects), cfg.queue_group.clone())
        .await
        .map_err(|e| nats_err("model request subscribe", e))?;
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply_subject) = msg.reply.clone() else {
            continue;
        };
        let target = store.head().position;
        // (The guard `wait_for` returns is dropped at the end of this statement.)
        // A shutdown ends the wait (the projector stops, the checkpoint would never come).
        let caught_up = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tokio::time::timeout(
                Duration::from_secs(120),
                churn_checkpoint.wait_for(|c| *c >= target),
            ) => matches!(r, Ok(Ok(_))),
        };
        if !caught_up {
            let _ = client
                .publish(reply_subject.clone(), what.not_ready(target).into())
                .await;
            continue;
        }
        let (reads, store, clock) = (reads.clone(), store.clone(), cfg.clock.clone());
        let work = tokio::task::spawn_blocking(move || {
            what.answer(&reads, &store, msg.payload.as_ref(), clock())
        });
        // A shutdown does not wait for a long evaluation: the asker is told to retry (the
        // queue group delivered the request here, so nothing else would answer it), and the
        // blocking thread ends with the process.
        let answer = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = client
                    .publish(reply_subject, what.shutting_down().into())
                    .await;
                break;
            }
            a = work => a.map_err(|e| nats_err("model request task", e))?,
        };
        if let Err(e) = client.publish(reply_subject, answer.into()).await {
            tracing::warn!(error = %e, "model request reply failed");
        }
    }
    Ok(())
}

/// A partition's side of a partitioned ledger's model fit: record the `ModelFitted` event the
/// router fitted on every partition's buyers (`<prefix>.partition.<n>.model.record`; the reply
/// is a `FitReply` with the position here), fenced by the partition's lease.
async fn serve_model_records(
    client: async_nats::Client,
    store: Arc<SledStore>,
    cfg: ViewConfig,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut sub = client
        .subscribe(cfg.subjects.model_record())
        .await
        .map_err(|e| nats_err("model record subscribe", e))?;
    while let Some((msg, reply, _)) = crate::next_query(&mut sub, &shutdown).await {
        let (store, fence) = (store.clone(), cfg.fence.clone());
        let mut answer =
            match tokio::task::spawn_blocking(move || record_model(&store, &fence, &msg.payload))
                .await
            {
                Ok(a) => a,
                Err(e) => fit_error("INTERNAL", format!("model record task: {e}")),
            };
        // Acknowledged only once the record is in the partition's feed.
        if answer.error.is_none() {
            match cfg
                .feed
                .reached(answer.position, &cfg.fence, &shutdown)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    answer = fit_error(
                        "UNAVAILABLE",
                        "the partition's owner is stopping; retry".into(),
                    )
                }
                Err(e) => answer = fit_error("UNAVAILABLE", e.to_string()),
            }
        }
        if let Err(e) = client.publish(reply, answer.encode_to_vec().into()).await {
            tracing::warn!(error = %e, "model record reply failed");
        }
    }
    Ok(())
}

fn fit_error(code: &str, message: String) -> v1::FitReply {
    v1::FitReply {
        error: Some(v1::QueryError {
            code: code.into(),
            message,
        }),
        ..Default::default()
    }
}

fn record_model(store: &SledStore, fence: &crate::Fence, bytes: &[u8]) -> v1::FitReply {
    let err = fit_error;
    let event = match touchledger_proto::decode_event(bytes) {
        Ok(e) => e,
        Err(r) => return err("BAD_REQUEST", format!("undecodable event: {r:?}")),
    };
    if event.customer_id != MODEL_CUSTOMER
        || !matches!(
            event.payload,
            Payload::ModelFitted(_) | Payload::ModelEvaluated(_)
        )
    {
        return err(
            "BAD_REQUEST",
            format!(
                "only ModelFitted and ModelEvaluated events of {MODEL_CUSTOMER:?} are recorded here"
            ),
        );
    }
    if let Err(e) = fence.check("recording a model fit") {
        return err("UNAVAILABLE", e.to_string());
    }
    match store.append_ledger_events(vec![AppendItem::new(event)]) {
        Ok(mut o) => match o.pop() {
            Some(AppendOutcome::Appended { position, .. }) => v1::FitReply {
                position,
                ..Default::default()
            },
            Some(AppendOutcome::Duplicate { position, .. }) => v1::FitReply {
                position,
                duplicate: true,
                ..Default::default()
            },
            other => err("INTERNAL", format!("model event not recorded: {other:?}")),
        },
        Err(e) => err("INTERNAL", e.to_string()),
    }
}

/// A partition's answer to the router's reads behind the HTTP API (JSON both ways; errors go
/// back in the `Touchledger-Read-Error` header):
/// * `page`: a customer's page without ranks ([`touchledger_projector::api::customer_page`])
///   and, for a "now" read the current views answer, the customer's rank keys;
/// * `rankcounts`: how many of this partition's current buyers rank below given keys;
/// * `atrisk`: the first rows of this partition's at-risk list;
/// * `rankstats`, `valuesabove`, `buyersvalued`, `poppart`: the steps of a "now" population
///   summed here ([`crate::Router::population_summed`]; the part is bincode, not JSON);
/// * `monthend`: whether this partition's log since a position can change a month-end
///   population the router keeps ([`crate::Router::population_month_end`]).
fn json_read_answer(
    model: &str,
    payload: &[u8],
    store: &SledStore,
    reads: &ReadModels,
    current: &Current,
) -> Result<Vec<u8>, String> {
    let bad = |e: serde_json::Error| format!("undecodable {model} request: {e}");
    let out = match model {
        crate::router::PAGE => {
            let req: crate::router::PageRequest = serde_json::from_slice(payload).map_err(bad)?;
            let page = touchledger_projector::api::customer_page(
                store,
                reads,
                &req.customer,
                req.as_of,
                req.limit,
            )
            .map_err(|e| e.to_string())?;
            let now = req.now
                && req.as_of.axis == touchledger_domain::facts::Axis::Business
                && current.is_ready();
            let rank_keys = now.then(|| current.rank_keys(&req.customer)).flatten();
            serde_json::to_vec(&crate::router::PageAnswer {
                page,
                current: now,
                rank_keys,
            })
        }
        crate::router::RANK_STATS => serde_json::to_vec(&current.rank_stats()),
        crate::router::VALUES_ABOVE => {
            let probes: Vec<i64> = serde_json::from_slice(payload).map_err(bad)?;
            serde_json::to_vec(&current.values_above(&probes))
        }
        crate::router::BUYERS_VALUED => {
            let (value, limit): (i64, usize) = serde_json::from_slice(payload).map_err(bad)?;
            serde_json::to_vec(&current.buyers_valued(value, limit))
        }
        crate::router::POPULATION_PART => {
            let req: crate::router::PartRequest = serde_json::from_slice(payload).map_err(bad)?;
            return Ok(current.population_part(&req.thresholds, &req.cuts).encode());
        }
        crate::router::MONTH_END => {
            let req: crate::router::MonthEndCheck = serde_json::from_slice(payload).map_err(bad)?;
            let point = |position| log_point(store, position);
            let folded = reads.checkpoints().map_err(|e| e.to_string())?[2];
            let unchanged = match &req.from {
                // The same history up to what was checked (not a store rebuilt differently
                // since), and nothing after it that changes the instant.
                Some(from) if from.position <= folded && point(from.position)? == *from => {
                    touchledger_projector::monthend::unchanged_since(
                        store,
                        req.as_of,
                        from.position,
                        folded,
                    )
                    .map_err(|e| e.to_string())?
                }
                // Its read models are behind what was checked (a new owner still catching up),
                // its log differs there, or only the position was asked.
                _ => false,
            };
            serde_json::to_vec(&crate::router::MonthEndState {
                folded: point(folded)?,
                unchanged,
            })
        }
        crate::router::RANK_COUNTS => {
            let keys: touchledger_projector::current::RankKeys =
                serde_json::from_slice(payload).map_err(bad)?;
            serde_json::to_vec(&current.rank_counts(&keys))
        }
        _ => {
            let req: touchledger_projector::api::AtRiskRequest =
                serde_json::from_slice(payload).map_err(bad)?;
            let answer = req
                .answer(reads, Some(current))
                .map_err(|e| e.to_string())?;
            serde_json::to_vec(&answer)
        }
    };
    out.map_err(|e| format!("{model} answer: {e}"))
}

/// The read models of the partitions a process owns now, by partition (registered by
/// [`run_views`] for as long as it runs a partition's).
#[derive(Clone, Debug, Default)]
pub struct OwnedViews(Arc<Mutex<std::collections::BTreeMap<u32, OwnedPartition>>>);

/// One owned partition's store and read models.
#[derive(Clone)]
pub struct OwnedPartition {
    /// Its store.
    pub store: Arc<SledStore>,
    /// Its read models.
    pub reads: Arc<ReadModels>,
    /// Its current views.
    pub current: Arc<Current>,
}

impl std::fmt::Debug for OwnedPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedPartition")
            .field("partition", &self.store.partition())
            .finish_non_exhaustive()
    }
}

impl OwnedViews {
    /// The partitions owned now, in order.
    pub fn snapshot(&self) -> Vec<(u32, OwnedPartition)> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, p)| (*n, p.clone()))
            .collect()
    }

    fn insert(&self, n: u32, p: OwnedPartition) -> Registered {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(n, p);
        Registered(self.clone(), n)
    }
}

/// Removes a partition from [`OwnedViews`] when its read models stop, however they stop.
struct Registered(OwnedViews, u32);

impl Drop for Registered {
    fn drop(&mut self) {
        (self.0)
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// How long a partition's part of a fit waits for its churn projection to reach the head.
const FIT_STATS_WAIT: Duration = Duration::from_secs(20);

async fn serve_queries(
    client: async_nats::Client,
    reads: Arc<ReadModels>,
    current: Arc<Current>,
    store: Arc<SledStore>,
    churn_checkpoint: tokio::sync::watch::Receiver<u64>,
    cfg: ViewConfig,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut sub = client
        .queue_subscribe(cfg.subjects.queries(), cfg.queue_group.clone())
        .await
        .map_err(|e| nats_err("query subscribe", e))?;
    let limit = Arc::new(tokio::sync::Semaphore::new(4));
    while let Some((msg, reply, model)) = crate::next_query(&mut sub, &shutdown).await {
        // At most 4 reads in flight: the next message is taken only when one ends.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (reads, current, client, clock) = (
            reads.clone(),
            current.clone(),
            client.clone(),
            cfg.clock.clone(),
        );
        let (store, mut churn_checkpoint) = (store.clone(), churn_checkpoint.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // A partition's part of a population read or of a fit (the router asks every
            // partition).
            let json_read = [
                crate::router::PAGE,
                crate::router::RANK_COUNTS,
                crate::router::AT_RISK,
                crate::router::RANK_STATS,
                crate::router::VALUES_ABOVE,
                crate::router::BUYERS_VALUED,
                crate::router::POPULATION_PART,
                crate::router::MONTH_END,
            ]
            .contains(&model.as_str());
            let stats_read = model == crate::router::FIT_STATS || model == crate::router::BUYERS;
            if model == crate::router::PARTIAL || stats_read || json_read {
                let max = client.server_info().max_payload / 2;
                let mut folded_header = None;
                let answer = if json_read {
                    tokio::task::spawn_blocking(move || {
                        json_read_answer(&model, &msg.payload, &store, &reads, &current)
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("read task: {e}")))
                } else if stats_read {
                    fit_stats_answer(
                        &model,
                        &reads,
                        &store,
                        &mut churn_checkpoint,
                        msg.payload,
                        max,
                    )
                    .await
                } else {
                    let (reads, store) = (reads.clone(), store.clone());
                    let answer = tokio::task::spawn_blocking(move || {
                        let mut req = PartialRequest::decode(msg.payload.as_ref())?;
                        req.max_bytes = req.max_bytes.clamp(1, max.max(1));
                        // Taken before the page is read: the page reflects at least this (a
                        // read at an instant; a "now" read may come from the current views).
                        let folded = match req.now {
                            false => Some(folded_point(&reads, &store)?),
                            true => None,
                        };
                        partial::page(&reads, Some(current.as_ref()), &req)
                            .map(|page| (page, folded))
                            .map_err(|e| e.to_string())
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("partial read task: {e}")));
                    answer.map(|(page, folded)| {
                        folded_header = folded.map(|f| format!("{}:{}", f.position, f.hash));
                        page
                    })
                };
                // An answer the server would refuse (over its max_payload) is an error now,
                // not a reply that never arrives.
                let limit = client.server_info().max_payload;
                let answer = answer.and_then(|page| {
                    if page.len() > limit {
                        Err(format!(
                            "the answer ({} bytes) exceeds the server's max_payload ({limit} bytes): ask for less (a smaller or shallower page)",
                            page.len()
                        ))
                    } else {
                        Ok(page)
                    }
                });
                let sent = match answer {
                    Ok(page) => match folded_header {
                        Some(folded) => {
                            let mut h = async_nats::HeaderMap::new();
                            h.insert(crate::headers::FOLDED, folded.as_str());
                            client.publish_with_headers(reply, h, page.into()).await
                        }
                        None => client.publish(reply, page.into()).await,
                    },
                    Err(e) => {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert(crate::headers::READ_ERROR, e.as_str());
                        client
                            .publish_with_headers(reply, h, bytes::Bytes::new())
                            .await
                    }
                };
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "partial reply failed");
                }
                return;
            }
            let answer = tokio::task::spawn_blocking(move || {
                match v1::QueryRequest::decode(msg.payload.as_ref()) {
                    Ok(req) => answer(&reads, Some(current.as_ref()), &model, &req, clock()),
                    Err(e) => query_error("BAD_REQUEST", format!("undecodable QueryRequest: {e}")),
                }
            })
            .await
            .unwrap_or_else(|e| query_error("INTERNAL", format!("query task: {e}")));
            if let Err(e) = client.publish(reply, answer.encode_to_vec().into()).await {
                tracing::warn!(error = %e, "query reply failed");
            }
        });
    }
    Ok(())
}

fn query_error(code: &str, message: String) -> v1::QueryReply {
    v1::QueryReply {
        result: Some(v1::query_reply::Result::Error(v1::QueryError {
            code: code.into(),
            message,
        })),
    }
}

/// The position `position` of this partition's log and the hash of its record there (empty at
/// position 0).
fn log_point(store: &SledStore, position: u64) -> Result<crate::router::LogPoint, String> {
    let hash = match position {
        0 => String::new(),
        p => store
            .get(p)
            .map_err(|e| e.to_string())?
            .map(|c| c.hash.to_hex())
            .unwrap_or_default(),
    };
    Ok(crate::router::LogPoint { position, hash })
}

/// What this partition's population reads reflect: the churn projection's checkpoint.
fn folded_point(reads: &ReadModels, store: &SledStore) -> Result<crate::router::LogPoint, String> {
    let folded = reads.checkpoints().map_err(|e| e.to_string())?[2];
    log_point(store, folded)
}

/// One page of this partition's buyers for a fit (`fitstats`: their statistics) or an
/// evaluation (`evalbuyers`: their statistics, holdout and warning) across partitions. The
/// first page waits (up to [`FIT_STATS_WAIT`]) until the churn projection has folded the log up
/// to its head as of the request: a fit sees everything committed, as on a single ledger.
async fn fit_stats_answer(
    model: &str,
    reads: &Arc<ReadModels>,
    store: &SledStore,
    churn_checkpoint: &mut tokio::sync::watch::Receiver<u64>,
    payload: bytes::Bytes,
    max: usize,
) -> Result<Vec<u8>, String> {
    enum Req {
        Fit(FitStatsRequest),
        Buyers(touchledger_projector::evaluate::BuyersRequest),
    }
    let (req, first) = if model == crate::router::BUYERS {
        let mut r = touchledger_projector::evaluate::BuyersRequest::decode(payload.as_ref())?;
        r.max_bytes = r.max_bytes.clamp(1, max.max(1));
        let first = r.after.is_none();
        (Req::Buyers(r), first)
    } else {
        let mut r = FitStatsRequest::decode(payload.as_ref())?;
        r.max_bytes = r.max_bytes.clamp(1, max.max(1));
        let first = r.after.is_none();
        (Req::Fit(r), first)
    };
    if first {
        let target = store.head().position;
        let caught_up = matches!(
            tokio::time::timeout(FIT_STATS_WAIT, churn_checkpoint.wait_for(|c| *c >= target)).await,
            Ok(Ok(_))
        );
        if !caught_up {
            return Err(format!(
                "{}the projections have not reached position {target} within {} s; retry",
                crate::router::NOT_READY_PREFIX,
                FIT_STATS_WAIT.as_secs()
            ));
        }
    }
    let reads = reads.clone();
    tokio::task::spawn_blocking(move || {
        match req {
            Req::Fit(r) => touchledger_projector::model::fit_stats_page(&reads, &r),
            Req::Buyers(r) => touchledger_projector::evaluate::buyers_page(&reads, &r),
        }
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("fit statistics task: {e}")))
}

/// Run projectors, view publishing, queries and the assessor until `shutdown`.
pub async fn run_views(
    client: async_nats::Client,
    store: Arc<SledStore>,
    cfg: ViewConfig,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let s = store.clone();
    let opened = tokio::task::spawn_blocking(move || touchledger_projector::open_all(&s))
        .await
        .map_err(|e| nats_err("projector open task", e))?
        .map_err(projector_err)?;
    let mut projectors = Vec::new();
    for (p, how) in opened {
        tracing::info!(projection = p.spec().name, opened = ?how, "projection opened");
        projectors.push(p);
    }
    let reads = Arc::new(ReadModels::open(&store, cfg.rules.clone()).map_err(projector_err)?);
    let current = match &cfg.current {
        Some(c) => c.clone(),
        None => open_current(&store, &cfg.rules, cfg.current_refresh)?,
    };
    let _registered = match (&cfg.owned, cfg.subjects.partition()) {
        (Some(owned), Some(n)) => Some(owned.insert(
            n,
            OwnedPartition {
                store: store.clone(),
                reads: reads.clone(),
                current: current.clone(),
            },
        )),
        _ => None,
    };
    // Far behind the head (a new or reset projection on a grown store, a long downtime): fold
    // synchronously first, in passes for empty projections (`touchledger_projector::catch_up`),
    // instead of 1,000-event batches that each load and write every customer they touch.
    let head = store.head().position;
    if projectors
        .iter()
        .any(|p| head.saturating_sub(p.checkpoint()) > cfg.catch_up_lag)
    {
        tracing::info!(
            head,
            "projections far behind: catching up before following the log"
        );
        let started = std::time::Instant::now();
        let s = store.clone();
        let (back, folded) = tokio::task::spawn_blocking(move || {
            let r = touchledger_projector::catch_up(s.as_ref(), &mut projectors, 10_000);
            (projectors, r)
        })
        .await
        .map_err(|e| nats_err("projector catch-up task", e))?;
        projectors = back;
        let folded = folded.map_err(projector_err)?;
        current.projection_advanced(reads.checkpoints().map_err(projector_err)?[2]);
        tracing::info!(
            events = folded,
            secs = started.elapsed().as_secs_f64(),
            "projections caught up"
        );
    }
    // The churn checkpoint the start-up re-evaluation covers (the projectors start below).
    let opened_at = reads.checkpoints().map_err(projector_err)?[2];
    let assessor = Arc::new(Assessor {
        store: store.clone(),
        reads: reads.clone(),
        current: current.clone(),
        due: store.due_index("churn")?,
        cfg: cfg.clone(),
        pending: Mutex::new(HashMap::new()),
    });
    let (tx, mut rx) = mpsc::channel::<Change>(64);
    let mut folding = tokio::spawn(run_in_process(
        store.clone(),
        projectors,
        RunConfig { batch: cfg.batch },
        Some(tx),
        shutdown.clone(),
    ));
    let (churn_checkpoint, checkpoint_rx) =
        tokio::sync::watch::channel(reads.checkpoints().map_err(projector_err)?[2]);
    let queries = tokio::spawn(serve_queries(
        client.clone(),
        reads.clone(),
        current.clone(),
        store.clone(),
        checkpoint_rx.clone(),
        cfg.clone(),
        shutdown.clone(),
    ));
    let fits = if cfg.fits {
        let serve = |what| {
            serve_model_requests(
                what,
                client.clone(),
                reads.clone(),
                store.clone(),
                cfg.clone(),
                checkpoint_rx.clone(),
                shutdown.clone(),
            )
        };
        let (fit, evaluate) = (serve(ModelRequest::Fit), serve(ModelRequest::Evaluate));
        tokio::spawn(async move {
            tokio::try_join!(fit, evaluate)?;
            Ok(())
        })
    } else if cfg.subjects.partition().is_some() {
        // A partition of a partitioned ledger records the fits the router makes.
        tokio::spawn(serve_model_records(
            client.clone(),
            store.clone(),
            cfg.clone(),
            shutdown.clone(),
        ))
    } else {
        tokio::spawn(async { Ok(()) })
    };
    let mut sweep = tokio::time::interval(cfg.sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let refit_every = cfg
        .refit_every
        .unwrap_or(Duration::from_secs(u32::MAX as u64));
    let mut refit =
        tokio::time::interval_at(tokio::time::Instant::now() + refit_every, refit_every);
    let mut result = Ok(());
    // The month end whose snapshots were last taken, and whether a snapshot task runs.
    let mut closed_month: Option<Timestamp> = None;
    let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Customers whose churn work waits for the end of a catch-up (see `catch_up_lag`).
    let deferred: Arc<Mutex<std::collections::BTreeSet<String>>> = Arc::default();
    let mut startup: Option<Work> = {
        let (assessor, now) = (assessor.clone(), (cfg.clock)());
        Some(Box::new(move || assessor.catch_up_current(opened_at, now)))
    };
    loop {
        let work: Work = if let Some(w) = startup.take() {
            w
        } else {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = &mut folding => {
                    result = match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(projector_err(e)),
                        Err(e) => Err(nats_err("projector task", e)),
                    };
                    break;
                }
                Some(change) = rx.recv() => {
                    let lag = store.head().position.saturating_sub(change.checkpoint);
                    let labels = crate::metric_labels(&cfg.subjects, &[("projection", change.projection)]);
                    metrics::gauge!("touchledger_projection_lag", labels.clone()).set(lag as f64);
                    metrics::gauge!("touchledger_projection_checkpoint", labels).set(change.checkpoint as f64);
                    if change.projection == "churn" {
                        churn_checkpoint.send_replace(change.checkpoint);
                    }
                    let (reads, assessor, subjects, now, current, deferred) = (reads.clone(), assessor.clone(), cfg.subjects.clone(), (cfg.clock)(), current.clone(), deferred.clone());
                    let catching_up = lag > cfg.catch_up_lag;
                    Box::new(move || {
                        let mut out = Vec::new();
                        let mut customers = change.customers;
                        // The ledger's own assessments, folded: nothing to evaluate again.
                        if change.projection == "churn" {
                            assessor.folded(&change.assessed_only, change.checkpoint);
                        }
                        customers.retain(|c| !change.assessed_only.contains(c));
                        if change.projection == "churn" {
                            let mut d = deferred.lock().unwrap_or_else(|p| p.into_inner());
                            if catching_up {
                                // Far behind the head: each customer is assessed (and their
                                // current view materialised) once, near the head. The current
                                // views' checkpoint stays behind until then.
                                d.extend(customers);
                                return Ok(out);
                            }
                            if !d.is_empty() {
                                let mut all = std::mem::take(&mut *d);
                                tracing::info!(customers = all.len(), "catch-up done: assessing the customers it changed");
                                all.extend(customers);
                                customers = all.into_iter().collect();
                            }
                        } else if catching_up {
                            return Ok(out);
                        }
                        for c in &customers {
                            out.extend(view_messages(&reads, &subjects, change.projection, c, now)?);
                        }
                        if change.projection == "churn" {
                            if customers.iter().any(|c| c == MODEL_CUSTOMER) {
                                let n = assessor.everyone_due(now)?;
                                tracing::info!(customers = n, "new churn model: everyone due");
                                out.extend(assessor.sweep(now)?);
                            }
                            for chunk in customers.chunks(1000) {
                                out.extend(assessor.assess_many(chunk, now)?);
                            }
                        }
                        if change.projection == "churn" {
                            current.commit(change.checkpoint).map_err(projector_err)?;
                        }
                        Ok(out)
                    })
                }
                _ = sweep.tick() => {
                    let (assessor, now) = (assessor.clone(), (cfg.clock)());
                    // A month has closed: its month-end snapshots are taken in the background
                    // (a pass over every customer per axis), once per month and process.
                    if let Some(me) = &cfg.month_ends {
                        let end = last_month_end(now);
                        if closed_month != Some(end) && !closing.swap(true, std::sync::atomic::Ordering::AcqRel) {
                            closed_month = Some(end);
                            let (me, reads, store, closing) = (me.clone(), reads.clone(), store.clone(), closing.clone());
                            tokio::task::spawn_blocking(move || {
                                match me.close_month(&reads, store.as_ref(), now) {
                                    Ok(n) if n > 0 => tracing::info!(month_end = %end, snapshots = n, "month-end population snapshots taken"),
                                    Ok(_) => {}
                                    Err(e) => tracing::warn!(error = %e, "month-end snapshot failed"),
                                }
                                closing.store(false, std::sync::atomic::Ordering::Release);
                            });
                        }
                    }
                    Box::new(move || assessor.sweep(now))
                }
                _ = refit.tick(), if cfg.refit_every.is_some() => {
                    let (reads, store, now, unit, fence) = (reads.clone(), store.clone(), (cfg.clock)(), cfg.refit_unit, cfg.fence.clone());
                    Box::new(move || {
                        match touchledger_projector::model::fit_event(
                            &reads,
                            now,
                            unit,
                            reads.rules.churn.count_model,
                        ) {
                            Ok((m, e)) => {
                                fence.check("recording a model fit")?;
                                store.append_ledger_events(vec![AppendItem::new(e)])?;
                                tracing::info!(version = %m.model_version, customers = m.customers, "churn model refitted");
                            }
                            Err(e) => tracing::warn!(error = %e, "scheduled refit skipped"),
                        }
                        Ok(Vec::new())
                    })
                }
            }
        };
        let out = match tokio::task::spawn_blocking(work).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "read-model work failed");
                result = Err(e);
                break;
            }
            Err(e) => {
                result = Err(nats_err("read-model task", e));
                break;
            }
        };
        for (subject, bytes) in out {
            if subject.contains(".alert.churn.") {
                metrics::counter!("touchledger_churn_alerts_total").increment(1);
            }
            // In a partitioned ledger every view and alert names its partition.
            let sent = match cfg.subjects.partition() {
                None => client.publish(subject, bytes.into()).await,
                Some(n) => {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert(crate::headers::PARTITION, n.to_string().as_str());
                    client.publish_with_headers(subject, h, bytes.into()).await
                }
            };
            if let Err(e) = sent {
                tracing::warn!(error = %e, "view publish failed");
            }
        }
    }
    shutdown.cancel();
    // Nothing reads the changes any more: a projector waiting to send one stops at once.
    drop(rx);
    if !folding.is_finished() {
        match folding.await {
            Ok(Err(e)) if result.is_ok() => result = Err(projector_err(e)),
            Err(e) if result.is_ok() => result = Err(nats_err("projector task", e)),
            _ => {}
        }
    }
    for task in [queries, fits] {
        if let Ok(Err(e)) = task.await
            && result.is_ok()
        {
            result = Err(e);
        }
    }
    result
}
