//! The reads behind the HTTP API's customer page and at-risk list, shared by a single ledger's
//! HTTP server and by a partition answering the router of a partitioned ledger, so both give
//! the same JSON for the same facts.
//!
//! * [`customer_page`]: a customer's three read models and timeline at an instant (the ranks
//!   among the population are added by the caller: they need every partition).
//! * [`AtRiskRequest`]: one at-risk page, from the current views' indexes for a "now" read or a
//!   pass over every customer at an explicit instant; [`merge_at_risk`] merges the first
//!   `offset + limit` rows of each partition into the ledger's page, in the same order.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use touchledger_domain::churn::ChurnView;
use touchledger_domain::facts::{AsOf, Axis};
use touchledger_domain::{ChurnLevel, LeavingReason, RiskReason, Timestamp};
use touchledger_store::{EventStore, ReadFilter};

use crate::current::{AtRiskQuery, AtRiskSort};
use crate::{Current, ProjectorError, ReadModels};

/// A customer's page at `at` without the ranks: `None` for a customer without touchpoints
/// then. The timeline is the newest `limit` of the customer's events visible at `at`.
pub fn customer_page(
    store: &dyn EventStore,
    reads: &ReadModels,
    id: &str,
    at: AsOf,
    limit: usize,
) -> Result<Option<serde_json::Map<String, Value>>, ProjectorError> {
    let Some(views) = reads.customer(id, at)? else {
        return Ok(None);
    };
    let mut visible = Vec::new();
    for c in store.read(&ReadFilter {
        customer: Some(id.to_owned()),
        ..Default::default()
    }) {
        let c = c?;
        if c.event.occurred_at <= at.at && (at.axis == Axis::Business || c.recorded_at <= at.at) {
            visible.push(c);
        }
    }
    // Newest business time first (by the instant, not its text: `…:00.5Z` sorts before
    // `…:00Z` as a string), equal instants in log order; capped before it is rendered.
    visible.sort_by_key(|c| std::cmp::Reverse(c.event.occurred_at));
    let total = visible.len();
    visible.truncate(limit);
    let timeline: Vec<Value> = visible
        .into_iter()
        .map(|c| {
            json!({
                "position": c.position,
                "customer_version": c.customer_version,
                "recorded_at": c.recorded_at,
                "kind": c.event.kind().as_str(),
                "event": c.event,
            })
        })
        .collect();
    let body = json!({
        "customer_id": id,
        "as_of": at.at,
        "axis": at.axis,
        "satisfaction": views.satisfaction,
        "loyalty": views.loyalty,
        "churn": views.churn,
        "timeline_total": total,
        "timeline": timeline,
    });
    match body {
        Value::Object(m) => Ok(Some(m)),
        _ => unreachable!("a JSON object literal"),
    }
}

/// One row of the at-risk list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AtRiskRow {
    /// The customer.
    pub customer_id: String,
    /// Churn level.
    pub level: ChurnLevel,
    /// Score in [0, 1].
    pub score: f64,
    /// Probable cause; `None` = unknown.
    pub probable_cause: Option<LeavingReason>,
    /// At this level since.
    pub since: Option<Timestamp>,
    /// Value of the trailing year at risk (minor units).
    pub value_at_risk_minor: i64,
    /// Its currency.
    pub currency: String,
    /// Every rule that fired.
    pub reasons: Vec<RiskReason>,
    /// When this row was evaluated (the request's `as_of`, or the materialisation instant).
    pub evaluated_at: Timestamp,
}

impl AtRiskRow {
    /// The row of a customer's churn view.
    pub fn of(customer_id: String, v: ChurnView) -> Self {
        AtRiskRow {
            customer_id,
            level: v.level,
            score: v.score,
            probable_cause: v.probable_cause,
            since: v.since,
            value_at_risk_minor: v.value_at_risk_minor,
            currency: v.currency,
            reasons: v.reasons,
            evaluated_at: v.as_of.at,
        }
    }
}

/// An order of the at-risk list by its API name (`score`, `value`, `since`, `customer`,
/// `level`).
pub fn sort_named(name: &str) -> Option<AtRiskSort> {
    Some(match name {
        "score" => AtRiskSort::Score,
        "value" => AtRiskSort::Value,
        "since" => AtRiskSort::Since,
        "customer" => AtRiskSort::Customer,
        "level" => AtRiskSort::Level,
        _ => return None,
    })
}

/// The at-risk list's order (the current views' indexes keep the same one).
pub fn compare(sort: AtRiskSort, ascending: bool, a: &AtRiskRow, b: &AtRiskRow) -> Ordering {
    let o = match sort {
        AtRiskSort::Value => a.value_at_risk_minor.cmp(&b.value_at_risk_minor),
        AtRiskSort::Since => a.since.cmp(&b.since),
        AtRiskSort::Customer => Ordering::Equal,
        AtRiskSort::Level => a.level.cmp(&b.level).then(a.score.total_cmp(&b.score)),
        AtRiskSort::Score => a.score.total_cmp(&b.score).then(a.level.cmp(&b.level)),
    }
    .then_with(|| a.customer_id.cmp(&b.customer_id));
    if ascending { o } else { o.reverse() }
}

/// One page of the at-risk list (the filters and order of `GET /api/v1/at-risk`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AtRiskRequest {
    /// The instant.
    pub as_of: AsOf,
    /// A "now" read: the current views answer when they are ready (else a pass at `as_of`).
    pub now: bool,
    /// Lowest level listed.
    pub min_level: ChurnLevel,
    /// Only this level.
    pub level: Option<ChurnLevel>,
    /// Only this probable cause.
    pub cause: Option<String>,
    /// Only customers for whom this rule fired.
    pub reason: Option<String>,
    /// Order, by its API name.
    pub sort: String,
    /// Ascending instead of descending.
    pub ascending: bool,
    /// Rows skipped.
    pub offset: usize,
    /// Rows returned at most.
    pub limit: usize,
}

/// A page: how many customers match, the rows, and where they came from (`current`: the
/// materialised views; `full_pass`: every customer evaluated at the instant).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AtRiskAnswer {
    /// Customers matching the filters.
    pub total: u64,
    /// The page.
    pub items: Vec<AtRiskRow>,
    /// `current` or `full_pass`.
    pub source: String,
}

impl AtRiskRequest {
    /// Answer from `current` when it may answer (a "now" read, business axis, ready), else by
    /// a pass over every customer of `reads` at the instant.
    pub fn answer(
        &self,
        reads: &ReadModels,
        current: Option<&Current>,
    ) -> Result<AtRiskAnswer, ProjectorError> {
        let sort = sort_named(&self.sort).unwrap_or(AtRiskSort::Score);
        if let Some(c) =
            current.filter(|c| self.now && self.as_of.axis == Axis::Business && c.is_ready())
        {
            let p = c.at_risk(&AtRiskQuery {
                min_level: self.min_level,
                level: self.level,
                cause: self.cause.clone(),
                reason: self.reason.clone(),
                sort,
                ascending: self.ascending,
                offset: self.offset,
                limit: self.limit,
            })?;
            return Ok(AtRiskAnswer {
                total: p.total,
                items: p
                    .items
                    .into_iter()
                    .map(|(id, v)| AtRiskRow::of(id, v))
                    .collect(),
                source: "current".into(),
            });
        }
        let at = self.as_of;
        let model = reads.model(at)?;
        let rules = &reads.rules.churn;
        let mut rows = Vec::new();
        for r in reads.customers() {
            let (id, facts) = r?;
            if !facts.has_touchpoints(at) {
                continue;
            }
            let v = rules.evaluate(&facts, model.as_ref(), at);
            if v.level < self.min_level || self.level.is_some_and(|l| l != v.level) {
                continue;
            }
            let cause_name = v
                .probable_cause
                .map_or("unknown", touchledger_domain::population::cause_name);
            if self.cause.as_deref().is_some_and(|c| c != cause_name) {
                continue;
            }
            if self
                .reason
                .as_deref()
                .is_some_and(|code| !v.reasons.iter().any(|r| r.code == code))
            {
                continue;
            }
            rows.push(AtRiskRow::of(id, v));
        }
        rows.sort_by(|a, b| compare(sort, self.ascending, a, b));
        let total = rows.len() as u64;
        let items = rows
            .into_iter()
            .skip(self.offset)
            .take(self.limit)
            .collect();
        Ok(AtRiskAnswer {
            total,
            items,
            source: "full_pass".into(),
        })
    }
}

/// The ledger's page from each partition's first `offset + limit` rows (each asked with offset
/// 0): a k-way merge in the list's order. The source is `current` only if every partition's
/// is.
pub fn merge_at_risk(req: &AtRiskRequest, parts: Vec<AtRiskAnswer>) -> AtRiskAnswer {
    let sort = sort_named(&req.sort).unwrap_or(AtRiskSort::Score);
    let total = parts.iter().map(|p| p.total).sum();
    let source = if parts.iter().all(|p| p.source == "current") {
        "current"
    } else {
        "full_pass"
    };
    let mut rows: Vec<AtRiskRow> = parts.into_iter().flat_map(|p| p.items).collect();
    rows.sort_by(|a, b| compare(sort, req.ascending, a, b));
    AtRiskAnswer {
        total,
        items: rows.into_iter().skip(req.offset).take(req.limit).collect(),
        source: source.into(),
    }
}
