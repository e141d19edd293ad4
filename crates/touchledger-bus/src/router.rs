//! Reads across partitions (docs/partitions.md, "Reads across partitions").
//!
//! In a partitioned ledger each partition's read models answer on the partition's own
//! subjects (`<prefix>.partition.<n>.query.<model>`), served by whichever process owns the
//! partition now. The ledger-wide `<prefix>.query.<model>` that clients use is answered by the
//! **router**, which every partitioned `serve` runs (one queue group, so any process answers
//! any read, whatever partitions it owns):
//! * a customer's read model is forwarded to the partition that holds the customer
//!   ([`partition_of`]) and the owner's reply is returned unchanged;
//! * the population asks every partition for its customers' contributions at the instant (a
//!   page at a time, all partitions at once) and adds them up
//!   ([`touchledger_projector::partial`]): exact figures, ranks over the whole population.
//!
//! A partition without an owner answering (during a takeover) makes the read fail with
//! `UNAVAILABLE`; nothing is guessed from the partitions that did answer.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio_util::sync::CancellationToken;
use touchledger_domain::count::CountKind;
use touchledger_domain::evaluation::Buyer;
use touchledger_domain::facts::AsOf;
use touchledger_domain::partition::partition_of;
use touchledger_domain::population::{PopulationView, Rules};
use touchledger_domain::{Event, ModelFitted, TimeUnit, Timestamp};
use touchledger_projector::api::{AtRiskAnswer, AtRiskRequest};
use touchledger_projector::current::{
    Current, PopulationPart, RankCounts, RankKeys, RankStats, Thresholds,
};
use touchledger_projector::evaluate::{BuyersRequest, ModelEvaluation};
use touchledger_projector::model::FitStatsRequest;
use touchledger_projector::model::{FitRow, fitted_event};
use touchledger_projector::partial::{Merge, PartialPage, PartialRequest};
use touchledger_projector::read::Ranks;
use touchledger_proto::{v1, views};

use crate::{BusError, Subjects, nats_err};

/// The model name of a partition's part of a population read.
pub(crate) const PARTIAL: &str = "partial";

/// The model name of a partition's part of a model fit (its buyers' statistics).
pub(crate) const FIT_STATS: &str = "fitstats";

/// The model name of a partition's part of an evaluation (its buyers, holdouts and warnings).
pub(crate) const BUYERS: &str = "evalbuyers";

/// The model name of a customer's page without ranks (HTTP 360), asked of its partition.
pub(crate) const PAGE: &str = "page";

/// The model name of a partition's counts of buyers below given rank keys.
pub(crate) const RANK_COUNTS: &str = "rankcounts";

/// The model name of a partition's first rows of the at-risk list.
pub(crate) const AT_RISK: &str = "atrisk";

/// The model names of the steps of a "now" population read summed in the partitions.
pub(crate) const RANK_STATS: &str = "rankstats";
pub(crate) const VALUES_ABOVE: &str = "valuesabove";
pub(crate) const BUYERS_VALUED: &str = "buyersvalued";
pub(crate) const POPULATION_PART: &str = "poppart";

/// The model name of a partition's check of a month-end population the router keeps.
pub(crate) const MONTH_END: &str = "monthend";

/// Asked of a partition about a month-end population: its read models' position, and whether
/// anything it logged after `from` (up to that position) could change the population at `as_of`
/// ([`touchledger_projector::monthend::unchanged_since`]). `from: None` asks the position only.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct MonthEndCheck {
    pub as_of: AsOf,
    pub from: Option<LogPoint>,
}

/// A position of a partition's log and the hash of its record there (empty at position 0):
/// the same position with another hash is another history (a store rebuilt from the feed after
/// an owner's unacknowledged records were set aside).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LogPoint {
    pub position: u64,
    pub hash: String,
}

impl LogPoint {
    /// From a [`crate::headers::FOLDED`] value, `<position>:<hash>`.
    fn parse(value: &str) -> Option<LogPoint> {
        let (position, hash) = value.split_once(':')?;
        Some(LogPoint {
            position: position.parse().ok()?,
            hash: hash.to_owned(),
        })
    }
}

/// A partition's answer to a [`MonthEndCheck`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct MonthEndState {
    /// The position its read models have folded (what a population read of it reflects), with
    /// the hash of the record there.
    pub folded: LogPoint,
    /// Its log still holds the record asked about, and nothing in `from + 1 ..= folded` can
    /// change the population at the instant.
    pub unchanged: bool,
}

/// Month-end populations a router keeps (the most recent, by instant and axis).
const MONTH_ENDS_KEPT: usize = 48;

/// A month-end population merged from every partition, and per partition the position up to
/// which its log is known not to change it.
#[derive(Clone, Debug)]
struct MonthEndEntry {
    view: PopulationView,
    checked: Vec<LogPoint>,
}

type MonthEndCache = std::sync::Mutex<std::collections::BTreeMap<(i64, u8), MonthEndEntry>>;

/// The ledger's RFM thresholds and pyramid cut keys, sent to every partition for its part.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct PartRequest {
    pub thresholds: Thresholds,
    pub cuts: [Option<(i64, String)>; 3],
}

/// A customer's page, asked of the customer's partition (JSON).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct PageRequest {
    pub customer: String,
    pub as_of: AsOf,
    /// A "now" read: the answer carries the customer's rank keys in the current views.
    pub now: bool,
    /// Timeline entries at most.
    pub limit: usize,
}

/// The partition's answer: the page (`None`: no touchpoints at the instant) and the
/// customer's rank keys when the current views may answer the ranks.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct PageAnswer {
    pub page: Option<serde_json::Map<String, serde_json::Value>>,
    /// Whether the current views answer the ranks (a "now" read, business axis, ready).
    pub current: bool,
    /// The customer's keys in them (`None`: not a buyer).
    pub rank_keys: Option<RankKeys>,
}

/// How a partition's `Touchledger-Read-Error` says it is not ready yet (retry), not failed.
pub(crate) const NOT_READY_PREFIX: &str = "NOT_READY: ";

/// The deepest at-risk row a partitioned ledger lists (each partition sends up to this many
/// rows, which must fit in one NATS message).
pub const MAX_AT_RISK_DEPTH: usize = 1000;

/// Attempts to record a fitted model in one partition before the fit reports failure.
const RECORD_ATTEMPTS: u32 = 6;

/// Why a read across partitions failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No process answers for the partition (it has no owner right now, e.g. during a
    /// takeover). Retry.
    #[error(
        "partition {partition} has no owner answering (a takeover, or no serve owns it); retry"
    )]
    Unavailable {
        /// The partition.
        partition: u32,
    },
    /// The partition's owner did not answer in time.
    #[error("partition {partition} did not answer within {secs} s; retry")]
    Timeout {
        /// The partition.
        partition: u32,
        /// The wait.
        secs: u64,
    },
    /// The partition's projections have not reached its log's head in time (a fit must see
    /// everything committed). Retry.
    #[error("partition {partition}: {detail}")]
    NotReady {
        /// The partition.
        partition: u32,
        /// What it is waiting for.
        detail: String,
    },
    /// The request asks for more than a read across partitions gives (a page too deep).
    #[error("{detail}")]
    TooDeep {
        /// What was asked, and the limit.
        detail: String,
    },
    /// The partition answered with an error, or the request could not be made.
    #[error("partition {partition}: {detail}")]
    Partition {
        /// The partition.
        partition: u32,
        /// What went wrong.
        detail: String,
    },
}

impl ReadError {
    /// The `QueryError` code of this failure.
    pub fn code(&self) -> &'static str {
        match self {
            ReadError::Unavailable { .. } | ReadError::Timeout { .. } => "UNAVAILABLE",
            ReadError::NotReady { .. } => "NOT_READY",
            ReadError::TooDeep { .. } => "BAD_REQUEST",
            ReadError::Partition { .. } => "INTERNAL",
        }
    }
}

/// Reads of a partitioned ledger, from any process.
#[derive(Clone, Debug)]
pub struct Router {
    /// The connection.
    pub client: async_nats::Client,
    /// The ledger's subjects (not scoped to a partition).
    pub subjects: Subjects,
    /// The partition count.
    pub partitions: u32,
    /// The rules the population is evaluated under (every process of a ledger uses the same).
    pub rules: Rules,
    /// How long one partition may take to answer one request. Default 30 s.
    pub timeout: Duration,
    /// The size of one page of contributions, bytes (the partition caps it at half the
    /// server's `max_payload`). Default 256 KiB.
    pub page_bytes: usize,
    /// This process's name ([`crate::owner_name`]), sent with every answer in the
    /// `Touchledger-Answered-By` header (which process answered a read).
    pub name: String,
    /// The month-end populations this router merged (see [`Router::population_from`]).
    month_ends: Arc<MonthEndCache>,
}

impl Router {
    /// A router with the default timeout and page size.
    pub fn new(
        client: async_nats::Client,
        subjects: Subjects,
        partitions: u32,
        rules: Rules,
    ) -> Router {
        Router {
            client,
            subjects,
            partitions: partitions.max(1),
            rules,
            timeout: Duration::from_secs(30),
            page_bytes: 256 * 1024,
            name: crate::owner_name(),
            month_ends: Arc::default(),
        }
    }

    /// One request to one partition's subject, waiting at most [`Router::timeout`] (the
    /// client's own default of 10 s does not apply).
    async fn ask(
        &self,
        partition: u32,
        subject: String,
        payload: bytes::Bytes,
    ) -> Result<async_nats::Message, ReadError> {
        let timeout = ReadError::Timeout {
            partition,
            secs: self.timeout.as_secs(),
        };
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(self.timeout));
        // The request carries its own timeout; the outer one only guards against a request
        // that never completes at all.
        let guard = self.timeout + Duration::from_secs(1);
        match tokio::time::timeout(guard, self.client.send_request(subject, request)).await {
            Err(_) => Err(timeout),
            Ok(Err(e)) => match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    Err(ReadError::Unavailable { partition })
                }
                async_nats::RequestErrorKind::TimedOut => Err(timeout),
                _ => Err(ReadError::Partition {
                    partition,
                    detail: e.to_string(),
                }),
            },
            Ok(Ok(m)) => Ok(m),
        }
    }

    async fn request(
        &self,
        partition: u32,
        model: &str,
        payload: bytes::Bytes,
    ) -> Result<async_nats::Message, ReadError> {
        let subject = self.subjects.in_partition(partition).query(model);
        self.ask(partition, subject, payload).await
    }

    /// Forward a customer's read-model query (`satisfaction`, `loyalty`, `churn`) to the
    /// partition that holds the customer; the owner's `QueryReply`, unchanged.
    pub async fn customer(
        &self,
        model: &str,
        customer: &str,
        payload: bytes::Bytes,
    ) -> Result<bytes::Bytes, ReadError> {
        let partition = partition_of(customer, self.partitions);
        Ok(self.request(partition, model, payload).await?.payload)
    }

    /// Every page of one partition's answer to a paged request (`make` builds the request
    /// continuing after a customer; `decode` reads a page and the customer to continue after).
    async fn pages<T>(
        &self,
        partition: u32,
        model: &str,
        make: impl Fn(Option<String>) -> Vec<u8>,
        decode: impl Fn(&[u8]) -> Result<(T, Option<String>), String>,
    ) -> Result<Vec<T>, ReadError> {
        Ok(self.pages_folded(partition, model, make, decode).await?.0)
    }

    /// [`Router::pages`], and the least folded position the pages say they reflect
    /// ([`crate::headers::FOLDED`]; `None` when a page does not say: a partition of an
    /// earlier version, or a read that does not report it). The pages of one answer may come
    /// from two processes (a partition's owner changed meanwhile, the new one still catching
    /// up): the least is what all of them reflect.
    async fn pages_folded<T>(
        &self,
        partition: u32,
        model: &str,
        make: impl Fn(Option<String>) -> Vec<u8>,
        decode: impl Fn(&[u8]) -> Result<(T, Option<String>), String>,
    ) -> Result<(Vec<T>, Option<LogPoint>), ReadError> {
        let mut pages = Vec::new();
        let mut after = None;
        let mut least: Option<Option<LogPoint>> = None;
        loop {
            let m = self.request(partition, model, make(after).into()).await?;
            read_error(partition, &m)?;
            let (page, next) =
                decode(&m.payload).map_err(|detail| ReadError::Partition { partition, detail })?;
            pages.push(page);
            let folded = m
                .headers
                .as_ref()
                .and_then(|h| h.get(crate::headers::FOLDED))
                .and_then(|v| LogPoint::parse(v.as_str()));
            least = Some(match (least, folded) {
                (None, f) => f,
                (Some(Some(a)), Some(b)) => Some(if b.position < a.position { b } else { a }),
                _ => None,
            });
            after = next;
            if after.is_none() {
                return Ok((pages, least.flatten()));
            }
        }
    }

    /// One JSON request to one partition, its JSON answer.
    async fn ask_json<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
        &self,
        partition: u32,
        model: &str,
        req: &Q,
    ) -> Result<A, ReadError> {
        let body = serde_json::to_vec(req).map_err(|e| ReadError::Partition {
            partition,
            detail: format!("{model} request: {e}"),
        })?;
        let mut pages = self
            .pages(
                partition,
                model,
                |_| body.clone(),
                |b| {
                    serde_json::from_slice::<A>(b)
                        .map(|a| (a, None))
                        .map_err(|e| format!("undecodable {model} answer: {e}"))
                },
            )
            .await?;
        Ok(pages.remove(0))
    }

    /// A customer's page (HTTP 360) at `as_of`: the partition that holds the customer gives
    /// the read models and the timeline; the ranks are among every buyer of every partition.
    /// For a "now" read they are counted from each partition's current views (O(P log n),
    /// exact: the counts add up); at any other instant, or while a partition's current views
    /// are not ready, they are taken from every customer's contribution at the instant, as a
    /// population read is. `None`: no touchpoints of the customer at the instant.
    pub async fn customer_page(
        &self,
        customer: &str,
        as_of: AsOf,
        now: bool,
        limit: usize,
    ) -> Result<Option<serde_json::Value>, ReadError> {
        let owner = partition_of(customer, self.partitions);
        let req = PageRequest {
            customer: customer.to_owned(),
            as_of,
            now,
            limit,
        };
        let answer: PageAnswer = self.ask_json(owner, PAGE, &req).await?;
        let Some(mut page) = answer.page else {
            return Ok(None);
        };
        let counted = match (&answer.rank_keys, answer.current) {
            (Some(keys), true) => self.counted_ranks(keys).await?,
            // The current views answer that the customer is not a buyer: no ranks.
            (None, true) => Some(None),
            (_, false) => None,
        };
        let ranks = match counted {
            Some(r) => r,
            None => self.merged_ranks(customer, as_of, now).await?,
        };
        page.insert(
            "ranks".into(),
            serde_json::to_value(ranks).unwrap_or(serde_json::Value::Null),
        );
        Ok(Some(serde_json::Value::Object(page)))
    }

    /// Ranks from every partition's counts below `keys`; `None` when a partition's current
    /// views are not ready or rank in another currency than the ledger's reporting currency.
    async fn counted_ranks(&self, keys: &RankKeys) -> Result<Option<Option<Ranks>>, ReadError> {
        let parts: Vec<RankCounts> = futures::future::try_join_all(
            (0..self.partitions).map(|p| self.ask_json(p, RANK_COUNTS, keys)),
        )
        .await?;
        let mut sum = RankCounts {
            ready: true,
            ..RankCounts::default()
        };
        for c in &parts {
            sum.add(c);
        }
        let currency =
            touchledger_domain::population::reporting_currency(&self.rules.population, &sum.totals);
        let same = parts
            .iter()
            .all(|c| c.currency == currency || c.buyers == 0)
            && keys.currency == currency;
        Ok((sum.ready && same).then(|| Some(sum.ranks())))
    }

    /// Ranks from every customer's contribution at `as_of` (a pass over every customer).
    async fn merged_ranks(
        &self,
        customer: &str,
        as_of: AsOf,
        now: bool,
    ) -> Result<Option<Ranks>, ReadError> {
        let customer = customer.to_owned();
        self.merged(as_of, now, move |m| m.ranks(&customer)).await
    }

    /// Every partition's customers' contributions at `as_of`, added into one [`Merge`], and
    /// `then` of it (on a blocking thread).
    async fn merged<T: Send + 'static>(
        &self,
        as_of: AsOf,
        now: bool,
        then: impl FnOnce(Merge) -> T + Send + 'static,
    ) -> Result<T, ReadError> {
        Ok(self.merged_folded(as_of, now, then).await?.0)
    }

    /// [`Router::merged`], and per partition the least folded position its pages reflect
    /// ([`Router::pages_folded`]).
    async fn merged_folded<T: Send + 'static>(
        &self,
        as_of: AsOf,
        now: bool,
        then: impl FnOnce(Merge) -> T + Send + 'static,
    ) -> Result<(T, Vec<Option<LogPoint>>), ReadError> {
        let parts = futures::future::try_join_all(
            (0..self.partitions).map(|p| self.partial(p, as_of, now)),
        )
        .await?;
        let (parts, folded): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
        let rules = self.rules.clone();
        let merged = tokio::task::spawn_blocking(move || {
            let mut merge = Merge::new(as_of, &rules);
            for page in parts.into_iter().flatten() {
                merge.add(page);
            }
            then(merge)
        })
        .await
        .map_err(|e| ReadError::Partition {
            partition: 0,
            detail: format!("merge task: {e}"),
        })?;
        Ok((merged, folded))
    }

    /// One page of the ledger's at-risk list: each partition's first `offset + limit` rows,
    /// merged in the list's order (O(P × (offset + limit)) rows moved); the total is the sum.
    pub async fn at_risk(&self, req: &AtRiskRequest) -> Result<AtRiskAnswer, ReadError> {
        let depth = req.offset.saturating_add(req.limit);
        if depth > MAX_AT_RISK_DEPTH {
            return Err(ReadError::TooDeep {
                detail: format!(
                    "offset + per_page = {depth}: a partitioned ledger lists at most the first {MAX_AT_RISK_DEPTH} rows of an order (each partition sends that many); narrow the filters"
                ),
            });
        }
        let each = AtRiskRequest {
            offset: 0,
            limit: req.offset.saturating_add(req.limit),
            ..req.clone()
        };
        let parts: Vec<AtRiskAnswer> = futures::future::try_join_all(
            (0..self.partitions).map(|p| self.ask_json(p, AT_RISK, &each)),
        )
        .await?;
        Ok(touchledger_projector::api::merge_at_risk(req, parts))
    }

    /// Every customer of one partition at `as_of`, page by page.
    async fn partial(
        &self,
        partition: u32,
        as_of: AsOf,
        now: bool,
    ) -> Result<(Vec<PartialPage>, Option<LogPoint>), ReadError> {
        let make = |after| {
            PartialRequest {
                as_of,
                now,
                after,
                max_bytes: self.page_bytes,
            }
            .encode()
        };
        self.pages_folded(partition, PARTIAL, make, |b| {
            PartialPage::decode(b).map(|p| {
                let next = p.next.clone();
                (p, next)
            })
        })
        .await
    }

    /// The "now" population summed in the partitions, without moving a row per customer:
    /// 1. every partition's rank keys in summary ([`RankStats`]): the RFM thresholds of
    ///    recency and frequency are placed from their day histograms;
    /// 2. the value thresholds and the pyramid's cut keys are found by a 16-way search over
    ///    value, all at once, each round asking every partition how many buyers lie above the
    ///    probes (O(log16(value range)) rounds of P requests, O(probes × log n) each), ties at
    ///    a cut broken by id as in one index;
    /// 3. every partition sums its customers under those ([`PopulationPart`]: its additive
    ///    sums, its buyers per RFM cell and per tier), and the parts are added.
    ///
    /// Exact: the figures of one index of every customer. `None` when a partition's current
    /// views are not ready or rank value in another currency than the ledger's (the caller
    /// then adds up contributions instead).
    pub async fn population_summed(
        &self,
        now: Timestamp,
    ) -> Result<Option<PopulationView>, ReadError> {
        let all = |model: &'static str, body: Vec<u8>| {
            futures::future::try_join_all((0..self.partitions).map(move |p| {
                let body = body.clone();
                async move {
                    let m = self.request(p, model, body.into()).await?;
                    read_error(p, &m)?;
                    Ok::<_, ReadError>((p, m.payload))
                }
            }))
        };
        let stats: Vec<RankStats> = all(RANK_STATS, b"{}".to_vec())
            .await?
            .iter()
            .map(|(p, b)| decode_json(*p, b))
            .collect::<Result<_, _>>()?;
        let mut totals = std::collections::BTreeMap::new();
        for s in &stats {
            for (c, v) in &s.totals {
                *totals.entry(c.clone()).or_insert(0i128) += v;
            }
        }
        let currency =
            touchledger_domain::population::reporting_currency(&self.rules.population, &totals);
        if stats
            .iter()
            .any(|s| !s.ready || (s.buyers > 0 && s.currency != currency))
        {
            return Ok(None);
        }
        let n: u64 = stats.iter().map(|s| s.buyers).sum();
        // The s-th RFM threshold is the key at ascending index ceil((s + 1) n / 5) − 1.
        let at = |s: u64| ((s + 1) * n).div_ceil(5).checked_sub(1);
        let kth = |h: &std::collections::BTreeMap<i64, u64>, j: u64| {
            let mut seen = 0;
            h.iter().find_map(|(k, c)| {
                seen += c;
                (seen > j).then_some(*k)
            })
        };
        let sum_hist = |f: fn(&RankStats) -> &std::collections::BTreeMap<i64, u64>| {
            let mut h = std::collections::BTreeMap::new();
            for s in &stats {
                for (k, c) in f(s) {
                    *h.entry(*k).or_insert(0u64) += c;
                }
            }
            h
        };
        let (recency, frequency) = (sum_hist(|s| &s.recency), sum_hist(|s| &s.frequency));
        let mut thresholds: Thresholds = [[None; 4]; 3];
        thresholds[0] = [0, 1, 2, 3].map(|s| at(s).and_then(|j| kth(&recency, j)));
        thresholds[1] = [0, 1, 2, 3].map(|s| at(s).and_then(|j| kth(&frequency, j)));
        // The value at ascending index j: the smallest v with at least j + 1 buyers ≤ v.
        // Targets: the four monetary thresholds, then the three pyramid cuts (descending
        // position c is ascending index n − 1 − c).
        let cuts = touchledger_domain::population::tier_cuts(n as usize).map(|c| c as u64);
        let mut targets: Vec<Option<u64>> = (0..4).map(at).collect();
        targets.extend(cuts.iter().map(|c| (*c < n).then(|| n - 1 - c)));
        let (lo0, hi0) = stats
            .iter()
            .filter_map(|s| s.values)
            .fold((i64::MAX, i64::MIN), |(lo, hi), (a, b)| {
                (lo.min(a), hi.max(b))
            });
        let mut bounds: Vec<(i64, i64)> = targets.iter().map(|_| (lo0, hi0)).collect();
        // Each round splits every open range into SPLIT parts and asks every partition for the
        // counts above all the probes at once: log_SPLIT(value range) rounds.
        const SPLIT: i128 = 16;
        loop {
            let open: Vec<usize> = (0..targets.len())
                .filter(|&i| targets[i].is_some() && bounds[i].0 < bounds[i].1)
                .collect();
            if open.is_empty() {
                break;
            }
            let mut probes: Vec<i64> = Vec::new();
            let mut spans = Vec::new();
            for &i in &open {
                let (lo, hi) = (i128::from(bounds[i].0), i128::from(bounds[i].1));
                let first = probes.len();
                let mut last = None;
                for k in 1..SPLIT {
                    let v = (lo + (hi - lo) * k / SPLIT) as i64;
                    if Some(v) != last && i128::from(v) < hi {
                        probes.push(v);
                        last = Some(v);
                    }
                }
                spans.push((i, first, probes.len()));
            }
            let above = self.values_above(&probes).await?;
            for (i, first, end) in spans {
                let want = targets[i].unwrap_or_default();
                // The first probe with at least want + 1 buyers at or below it bounds the
                // value from above; the probe before it, from below.
                let mut lo = bounds[i].0;
                let mut hi = bounds[i].1;
                for k in first..end {
                    if n.saturating_sub(above[k]) > want {
                        hi = probes[k];
                        break;
                    }
                    lo = probes[k] + 1;
                }
                bounds[i] = (lo, hi);
            }
        }
        thresholds[2] = [0, 1, 2, 3].map(|s| targets[s].map(|_| bounds[s].0));
        let mut cut_keys: [Option<(i64, String)>; 3] = [None, None, None];
        for (k, c) in cuts.iter().enumerate() {
            if targets[4 + k].is_none() {
                continue;
            }
            let v = bounds[4 + k].0;
            let above = self.values_above(&[v]).await?[0];
            // The cut's id is the (c − above)-th smallest among the buyers with value v: among
            // each partition's first c − above + 1 of them.
            let changed = || ReadError::NotReady {
                partition: 0,
                detail: format!(
                    "the partitions changed during the read (no buyer at the pyramid's cut {c}, value {v}); retry"
                ),
            };
            let offset = c.checked_sub(above).ok_or_else(changed)?;
            let req = serde_json::to_vec(&(v, offset + 1)).map_err(|e| ReadError::Partition {
                partition: 0,
                detail: e.to_string(),
            })?;
            let mut ids: Vec<String> = Vec::new();
            for (p, b) in all(BUYERS_VALUED, req).await? {
                let more: Vec<String> = decode_json(p, &b)?;
                ids.extend(more);
            }
            ids.sort();
            let id = ids.into_iter().nth(offset as usize).ok_or_else(changed)?;
            cut_keys[k] = Some((v, id));
        }
        let req = serde_json::to_vec(&PartRequest {
            thresholds,
            cuts: cut_keys,
        })
        .map_err(|e| ReadError::Partition {
            partition: 0,
            detail: e.to_string(),
        })?;
        let parts: Vec<PopulationPart> = all(POPULATION_PART, req)
            .await?
            .iter()
            .map(|(p, b)| {
                PopulationPart::decode(b).map_err(|detail| ReadError::Partition {
                    partition: *p,
                    detail,
                })
            })
            .collect::<Result<_, _>>()?;
        let rules = self.rules.clone();
        tokio::task::spawn_blocking(move || {
            let mut aggregate = touchledger_domain::population::Aggregate::default();
            for p in &parts {
                aggregate.merge(&p.aggregate);
            }
            let ranked = Current::ranked_from_parts(currency, n as usize, &parts);
            Some(aggregate.view(AsOf::business(now), &rules.population, ranked))
        })
        .await
        .map_err(|e| ReadError::Partition {
            partition: 0,
            detail: format!("sum task: {e}"),
        })
    }

    /// Per probe, the buyers of every partition whose value is greater.
    async fn values_above(&self, probes: &[i64]) -> Result<Vec<u64>, ReadError> {
        let parts: Vec<Vec<u64>> = futures::future::try_join_all(
            (0..self.partitions).map(|p| self.ask_json(p, VALUES_ABOVE, &probes)),
        )
        .await?;
        let mut out = vec![0u64; probes.len()];
        for part in parts {
            for (o, a) in out.iter_mut().zip(part) {
                *o += a;
            }
        }
        Ok(out)
    }

    /// The population of the whole ledger at `as_of`: every partition's customers, added up.
    /// `now` says the read is for the service clock (the partitions' current materialisations
    /// may answer on the business axis).
    pub async fn population(
        &self,
        as_of: AsOf,
        now: bool,
        clock: Timestamp,
    ) -> Result<PopulationView, ReadError> {
        Ok(self.population_from(as_of, now, clock).await?.0)
    }

    /// [`Router::population`] and how it was made: `summed` in the partitions
    /// ([`Router::population_summed`], a "now" read), a kept `month_end` population
    /// ([`Router::population_month_end`]), or from every customer's `contributions`. `clock` is
    /// the service clock: only a month end it has passed is kept.
    pub async fn population_from(
        &self,
        as_of: AsOf,
        now: bool,
        clock: Timestamp,
    ) -> Result<(PopulationView, &'static str), ReadError> {
        if now
            && as_of.axis == touchledger_domain::facts::Axis::Business
            && let Some(p) = self.summed_or_none(as_of.at).await?
        {
            return Ok((p, "summed"));
        }
        if !now && touchledger_projector::monthend::is_month_end(as_of.at) && as_of.at < clock {
            return self.population_month_end(as_of).await;
        }
        Ok((self.population_merged(as_of, now).await?, "contributions"))
    }

    /// The population at a passed month end, the audit's common read, kept by this router: the
    /// first read merges every partition's contributions (a pass over every customer) and keeps
    /// the result with the least folded position each partition's pages reflect; a later read
    /// asks every partition whether anything it has folded since could change it (a late
    /// arrival, a backdated fit: [`touchledger_projector::monthend::unchanged_since`], a scan of
    /// the events logged since) and answers the kept population if none could — P small
    /// requests instead of every customer moved. Returns `month_end` when kept, else
    /// `contributions`. Kept per process, in memory (the newest 48).
    pub async fn population_month_end(
        &self,
        as_of: AsOf,
    ) -> Result<(PopulationView, &'static str), ReadError> {
        let key = (
            as_of.at.unix_nanos(),
            matches!(as_of.axis, touchledger_domain::facts::Axis::Knowledge) as u8,
        );
        let kept = self
            .month_ends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        if let Some(entry) = kept {
            let states = futures::future::try_join_all((0..self.partitions).map(|p| {
                let req = MonthEndCheck {
                    as_of,
                    from: Some(entry.checked[p as usize].clone()),
                };
                async move { self.ask_json::<_, MonthEndState>(p, MONTH_END, &req).await }
            }))
            .await
            .unwrap_or_else(|e| {
                // A partition that cannot check (an earlier version, a failing owner): the
                // merge answers, or says why it cannot.
                tracing::warn!(error = %e, "month-end population not checked; merging");
                Vec::new()
            });
            if !states.is_empty() && states.iter().all(|s| s.unchanged) {
                let checked = states.into_iter().map(|s| s.folded).collect();
                // Only the entry that was checked moves on: another read may have replaced it
                // meanwhile (merged from a lagging owner), and its positions are its own.
                if let Some(e) = self
                    .month_ends
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&key)
                    && e.checked == entry.checked
                {
                    e.checked = checked;
                }
                return Ok((entry.view, "month_end"));
            }
        }
        // Each partition's pages say what they reflect at least (the least folded position
        // of the pages, which may come from two owners): a later check from there sees every
        // event the kept population may lack. A partition that does not say (an earlier
        // version) leaves nothing kept.
        let (view, folded) = self.merged_folded(as_of, false, Merge::finish).await?;
        if let Some(checked) = folded.into_iter().collect::<Option<Vec<LogPoint>>>() {
            let mut kept = self.month_ends.lock().unwrap_or_else(|p| p.into_inner());
            kept.insert(
                key,
                MonthEndEntry {
                    view: view.clone(),
                    checked,
                },
            );
            while kept.len() > MONTH_ENDS_KEPT {
                kept.pop_first();
            }
        }
        Ok((view, "contributions"))
    }

    async fn summed_or_none(&self, now: Timestamp) -> Result<Option<PopulationView>, ReadError> {
        match self.population_summed(now).await {
            // A partition could not answer a step (e.g. an answer over the server's payload
            // limit): the contributions, paged, still can.
            Err(e @ ReadError::Partition { .. }) => {
                tracing::warn!(error = %e, "population not summed in the partitions; merging contributions");
                Ok(None)
            }
            r => r,
        }
    }

    async fn population_merged(&self, as_of: AsOf, now: bool) -> Result<PopulationView, ReadError> {
        self.merged(as_of, now, Merge::finish).await
    }

    /// One partition's buyers' BG/NBD statistics at `as_of`, page by page.
    async fn fit_stats(
        &self,
        partition: u32,
        as_of: Timestamp,
        unit: TimeUnit,
    ) -> Result<Vec<(String, FitRow)>, ReadError> {
        let make = |after| {
            FitStatsRequest {
                as_of,
                unit,
                after,
                max_bytes: self.page_bytes,
            }
            .encode()
        };
        let pages = self
            .pages(
                partition,
                FIT_STATS,
                make,
                touchledger_projector::model::decode_fit_stats,
            )
            .await?;
        Ok(pages.into_iter().flatten().collect())
    }

    /// Fit the churn model (`kind`, with the spend model) at `as_of` on every partition's
    /// buyers, in customer order: the fit, and the `ModelFitted` event, that a single log of
    /// the same events gives.
    pub async fn fit(
        &self,
        as_of: Timestamp,
        unit: TimeUnit,
        kind: touchledger_domain::count::CountKind,
    ) -> Result<(ModelFitted, Event), FitFailed> {
        let parts = futures::future::try_join_all(
            (0..self.partitions).map(|p| self.fit_stats(p, as_of, unit)),
        )
        .await
        .map_err(FitFailed::Read)?;
        tokio::task::spawn_blocking(move || {
            let mut all: Vec<(String, FitRow)> = parts.into_iter().flatten().collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            let rows: Vec<FitRow> = all.into_iter().map(|(_, x)| x).collect();
            touchledger_projector::model::fitted_event(&rows, as_of, unit, kind)
        })
        .await
        .map_err(|e| FitFailed::Fit(format!("fit task: {e}")))?
        .map_err(|e| FitFailed::Fit(e.to_string()))
    }

    /// Record a fitted model in every partition's log (each partition's churn rules read the
    /// model from its own log). Idempotent: a partition that has it answers a duplicate, so a
    /// failed recording is retried whole. Returns each partition's position of it and whether
    /// every partition already had it.
    pub async fn record(&self, event: &Event) -> Result<(Vec<u64>, bool), ReadError> {
        let bytes = bytes::Bytes::from(touchledger_proto::encode_event(event));
        let replies = futures::future::join_all(
            (0..self.partitions).map(|p| self.record_in(p, bytes.clone())),
        )
        .await;
        let mut positions = Vec::new();
        let mut duplicate = true;
        for r in replies {
            let (position, dup) = r?;
            positions.push(position);
            duplicate &= dup;
        }
        Ok((positions, duplicate))
    }

    /// Record the model in one partition, retrying the same event (idempotent) with backoff
    /// while the partition has no owner or does not answer (a takeover): 0.25 s, doubling, up
    /// to [`RECORD_ATTEMPTS`] attempts.
    async fn record_in(&self, p: u32, bytes: bytes::Bytes) -> Result<(u64, bool), ReadError> {
        let mut backoff = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            let r = self.record_once(p, bytes.clone()).await;
            match r {
                Err(ReadError::Unavailable { .. } | ReadError::Timeout { .. })
                    if attempt < RECORD_ATTEMPTS =>
                {
                    tracing::info!(
                        partition = p,
                        attempt,
                        "model record not taken yet; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn record_once(&self, p: u32, bytes: bytes::Bytes) -> Result<(u64, bool), ReadError> {
        let subject = self.subjects.in_partition(p).model_record();
        let m = self.ask(p, subject, bytes).await?;
        let r = v1::FitReply::decode(m.payload.as_ref()).map_err(|e| ReadError::Partition {
            partition: p,
            detail: format!("undecodable reply: {e}"),
        })?;
        match r.error {
            Some(e) if e.code == "UNAVAILABLE" => Err(ReadError::Unavailable { partition: p }),
            Some(e) => Err(ReadError::Partition {
                partition: p,
                detail: format!("{}: {}", e.code, e.message),
            }),
            None => Ok((r.position, r.duplicate)),
        }
    }

    /// Answer a ledger-wide `FitRequest`: fit on every partition's buyers and record the model
    /// in every partition (unless a dry run). The reply's position is partition 0's.
    async fn answer_fit(&self, payload: &[u8], now: Timestamp) -> v1::FitReply {
        let err = |code: &str, message: String| v1::FitReply {
            error: Some(v1::QueryError {
                code: code.into(),
                message,
            }),
            ..Default::default()
        };
        let req = match v1::FitRequest::decode(payload) {
            Ok(r) => r,
            Err(e) => return err("BAD_REQUEST", format!("undecodable FitRequest: {e}")),
        };
        let (as_of, unit, kind) =
            match crate::views::fit_params(&req, now, self.rules.churn.count_model) {
                Ok(x) => x,
                Err(e) => return err("BAD_REQUEST", e),
            };
        let (_, event) = match self.fit(as_of, unit, kind).await {
            Ok(x) => x,
            Err(FitFailed::Read(e)) => return err(e.code(), e.to_string()),
            Err(FitFailed::Fit(e)) => return err("FIT_FAILED", e),
        };
        let envelope = Some(v1::Envelope::from(&event));
        if req.dry_run {
            return v1::FitReply {
                event: envelope,
                ..Default::default()
            };
        }
        match self.record(&event).await {
            Ok((positions, duplicate)) => v1::FitReply {
                event: envelope,
                position: positions.first().copied().unwrap_or_default(),
                duplicate,
                ..Default::default()
            },
            Err(e) => err(
                e.code(),
                format!("{e} (the partitions that recorded the model keep it; retry the fit)"),
            ),
        }
    }

    /// One partition's buyers for an evaluation, page by page.
    async fn evaluation_buyers(
        &self,
        partition: u32,
        base: &BuyersRequest,
    ) -> Result<Vec<(String, Buyer)>, ReadError> {
        let make = |after| {
            BuyersRequest {
                after,
                max_bytes: self.page_bytes,
                ..base.clone()
            }
            .encode()
        };
        let pages = self
            .pages(
                partition,
                BUYERS,
                make,
                touchledger_projector::evaluate::decode_buyers,
            )
            .await?;
        Ok(pages.into_iter().flatten().collect())
    }

    /// `touchledger evaluate` across partitions: BG/NBD (and Pareto/NBD beside it) fitted at
    /// `calibration_end` on every partition's buyers, as [`Router::fit`] does; then every
    /// partition's buyers with their holdout and their warning under the fit the rules select;
    /// merged in customer order, the evaluation a single log of the same events gives.
    pub async fn evaluate(
        &self,
        calibration_end: Timestamp,
        holdout_end: Timestamp,
        unit: TimeUnit,
    ) -> Result<ModelEvaluation, EvaluateFailed> {
        if holdout_end <= calibration_end {
            return Err(EvaluateFailed::Periods(format!(
                "holdout_end ({holdout_end}) must be after calibration_end ({calibration_end})"
            )));
        }
        let parts = futures::future::try_join_all(
            (0..self.partitions).map(|p| self.fit_stats(p, calibration_end, unit)),
        )
        .await
        .map_err(EvaluateFailed::Read)?;
        let selected = self.rules.churn.count_model;
        let (model, pareto) = tokio::task::spawn_blocking(move || {
            let mut all: Vec<(String, FitRow)> = parts.into_iter().flatten().collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            let rows: Vec<FitRow> = all.into_iter().map(|(_, x)| x).collect();
            let fit = |kind| fitted_event(&rows, calibration_end, unit, kind).map(|(m, _)| m);
            let model =
                fit(CountKind::BgNbd).map_err(|e| EvaluateFailed::NoModel(e.to_string()))?;
            let pareto = match fit(CountKind::ParetoNbd) {
                Ok(m) => Some(m),
                Err(e) if selected == CountKind::ParetoNbd => {
                    return Err(EvaluateFailed::NoModel(e.to_string()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Pareto/NBD not fitted for the comparison");
                    None
                }
            };
            Ok((model, pareto))
        })
        .await
        .map_err(|e| EvaluateFailed::Internal(format!("fit task: {e}")))??;
        let warning_model = match (selected, &pareto) {
            (CountKind::ParetoNbd, Some(p)) => p.clone(),
            _ => model.clone(),
        };
        let base = BuyersRequest {
            calibration_end,
            holdout_end,
            unit,
            warning_model: warning_model.clone(),
            after: None,
            max_bytes: self.page_bytes,
        };
        let parts = futures::future::try_join_all(
            (0..self.partitions).map(|p| self.evaluation_buyers(p, &base)),
        )
        .await
        .map_err(EvaluateFailed::Read)?;
        tokio::task::spawn_blocking(move || {
            let mut all: Vec<(String, Buyer)> = parts.into_iter().flatten().collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            let buyers: Vec<Buyer> = all.into_iter().map(|(_, b)| b).collect();
            touchledger_projector::evaluate::assemble(
                &model,
                pareto.as_ref(),
                &warning_model,
                &buyers,
                calibration_end,
                holdout_end,
            )
        })
        .await
        .map_err(|e| EvaluateFailed::Internal(format!("evaluation task: {e}")))
    }

    /// Answer a ledger-wide `<prefix>.model.evaluate`: the evaluation across partitions,
    /// recorded in every partition when asked (the reply's position is partition 0's).
    async fn answer_evaluate(&self, payload: &[u8], now: Timestamp) -> v1::EvaluateReply {
        let err = |code: &str, message: String| v1::EvaluateReply {
            error: Some(v1::QueryError {
                code: code.into(),
                message,
            }),
            ..Default::default()
        };
        let req = match v1::EvaluateRequest::decode(payload) {
            Ok(r) => r,
            Err(e) => return err("BAD_REQUEST", format!("undecodable EvaluateRequest: {e}")),
        };
        let (t1, t2, unit) = match crate::views::evaluate_params(&req, now) {
            Ok(x) => x,
            Err(e) => return err("BAD_REQUEST", e),
        };
        let e = match self.evaluate(t1, t2, unit).await {
            Ok(e) => e,
            Err(EvaluateFailed::Periods(m)) => return err("BAD_REQUEST", m),
            Err(EvaluateFailed::NoModel(m)) => {
                return err("NO_MODEL", format!("no model at calibration_end {t1}: {m}"));
            }
            Err(EvaluateFailed::Read(e)) => return err(e.code(), e.to_string()),
            Err(EvaluateFailed::Internal(m)) => return err("INTERNAL", m),
        };
        let (mut reply, event) = match crate::views::evaluation_reply(&e) {
            Ok(x) => x,
            Err(m) => return err("INTERNAL", m),
        };
        if req.record {
            match self.record(&event).await {
                Ok((positions, duplicate)) => {
                    reply.position = positions.first().copied().unwrap_or_default();
                    reply.duplicate = duplicate;
                }
                Err(e) => {
                    return err(
                        e.code(),
                        format!("{e} (the partitions that recorded it keep it; retry)"),
                    );
                }
            }
        }
        reply
    }

    /// Answer one ledger-wide query.
    async fn answer(&self, model: &str, payload: bytes::Bytes, now: Timestamp) -> bytes::Bytes {
        use v1::query_reply::Result as R;
        let reply = |r: R| bytes::Bytes::from(v1::QueryReply { result: Some(r) }.encode_to_vec());
        let err = |code: &str, message: String| {
            reply(R::Error(v1::QueryError {
                code: code.into(),
                message,
            }))
        };
        let req = match v1::QueryRequest::decode(payload.as_ref()) {
            Ok(r) => r,
            Err(e) => return err("BAD_REQUEST", format!("undecodable QueryRequest: {e}")),
        };
        match model {
            "population" => {
                let as_of = match crate::views::query_as_of(&req, now) {
                    Ok(a) => a,
                    Err(e) => return err("BAD_REQUEST", e),
                };
                match self.population(as_of, req.as_of.is_none(), now).await {
                    Ok(p) => reply(R::Population(views::population(&p))),
                    Err(e) => err(e.code(), e.to_string()),
                }
            }
            "satisfaction" | "loyalty" | "churn" => {
                if req.customer_id.is_empty() {
                    return err("BAD_REQUEST", "customer_id is required".into());
                }
                match self.customer(model, &req.customer_id, payload).await {
                    Ok(b) => b,
                    Err(e) => err(e.code(), e.to_string()),
                }
            }
            _ => err(
                "UNKNOWN_MODEL",
                format!("unknown model {model:?}: satisfaction, loyalty, churn or population"),
            ),
        }
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(partition: u32, b: &[u8]) -> Result<T, ReadError> {
    serde_json::from_slice(b).map_err(|e| ReadError::Partition {
        partition,
        detail: format!("undecodable answer: {e}"),
    })
}

/// The error a partition answered in the `Touchledger-Read-Error` header, if any.
fn read_error(partition: u32, m: &async_nats::Message) -> Result<(), ReadError> {
    let Some(e) = m
        .headers
        .as_ref()
        .and_then(|h| h.get(crate::headers::READ_ERROR))
    else {
        return Ok(());
    };
    let detail = e.to_string();
    Err(match detail.strip_prefix(NOT_READY_PREFIX) {
        Some(d) => ReadError::NotReady {
            partition,
            detail: d.to_owned(),
        },
        None => ReadError::Partition { partition, detail },
    })
}

/// Why a fit across partitions failed.
#[derive(Debug, thiserror::Error)]
pub enum FitFailed {
    /// A partition's statistics could not be read.
    #[error(transparent)]
    Read(ReadError),
    /// The model refused the data (no buyers) or the optimiser failed.
    #[error("{0}")]
    Fit(String),
}

/// Why an evaluation across partitions failed.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateFailed {
    /// The periods are out of order.
    #[error("{0}")]
    Periods(String),
    /// No model can be fitted at the calibration end.
    #[error("{0}")]
    NoModel(String),
    /// A partition could not be read.
    #[error(transparent)]
    Read(ReadError),
    /// A task failed.
    #[error("{0}")]
    Internal(String),
}

/// Answer the ledger-wide `<prefix>.query.<model>`, `<prefix>.model.fit` and
/// `<prefix>.model.evaluate` of a partitioned ledger until `shutdown` (queue group
/// `queue_group`), at most 8 reads at a time and one fit or evaluation at a time; `clock` is the service clock of "now" reads and fits.
pub async fn run_router(
    router: Router,
    queue_group: String,
    clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut sub = router
        .client
        .queue_subscribe(router.subjects.queries(), queue_group.clone())
        .await
        .map_err(|e| nats_err("router subscribe", e))?;
    let mut fits = router
        .client
        .queue_subscribe(router.subjects.model_fit(), queue_group.clone())
        .await
        .map_err(|e| nats_err("router fit subscribe", e))?;
    let mut evaluations = router
        .client
        .queue_subscribe(router.subjects.model_evaluate(), queue_group)
        .await
        .map_err(|e| nats_err("router evaluate subscribe", e))?;
    let router = Arc::new(router);
    let fitting = {
        let (router, clock, shutdown) = (router.clone(), clock.clone(), shutdown.clone());
        tokio::spawn(async move {
            // One fit or evaluation at a time; each waits on every partition: shutdown does
            // not wait for it (the asker gets no answer and retries).
            loop {
                let answer = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    m = crate::next_query(&mut fits, &shutdown) => match m {
                        None => break,
                        Some((msg, reply, _)) => tokio::select! {
                            _ = shutdown.cancelled() => break,
                            a = router.answer_fit(&msg.payload, clock()) => (reply, a.encode_to_vec()),
                        },
                    },
                    m = crate::next_query(&mut evaluations, &shutdown) => match m {
                        None => break,
                        Some((msg, reply, _)) => tokio::select! {
                            _ = shutdown.cancelled() => break,
                            a = router.answer_evaluate(&msg.payload, clock()) => (reply, a.encode_to_vec()),
                        },
                    },
                };
                if let Err(e) = router.client.publish(answer.0, answer.1.into()).await {
                    tracing::warn!(error = %e, "model request reply failed");
                }
            }
        })
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(8));
    while let Some((msg, reply, model)) = crate::next_query(&mut sub, &shutdown).await {
        // At most 8 reads in flight: the next message is taken only when one ends (the rest
        // wait in the subscription, not as tasks).
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (router, now, shutdown) = (router.clone(), clock(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let answer = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = router.answer(&model, msg.payload, now) => a,
            };
            let mut h = async_nats::HeaderMap::new();
            h.insert(crate::headers::ANSWERED_BY, router.name.as_str());
            if let Err(e) = router.client.publish_with_headers(reply, h, answer).await {
                tracing::warn!(error = %e, "routed query reply failed");
            }
        });
    }
    let _ = fitting.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::LogPoint;

    #[test]
    fn a_folded_header_is_a_position_and_a_hash() {
        assert_eq!(
            LogPoint::parse("42:ab12"),
            Some(LogPoint {
                position: 42,
                hash: "ab12".into()
            })
        );
        assert_eq!(
            LogPoint::parse("0:"),
            Some(LogPoint {
                position: 0,
                hash: String::new()
            })
        );
        for bad in ["", "42", "x:ab", "-1:ab"] {
            assert_eq!(LogPoint::parse(bad), None, "{bad:?}");
        }
    }
}
