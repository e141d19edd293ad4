//! A partition's part of a population read, and the merge of the parts (docs/partitions.md,
//! "Reads across partitions").
//!
//! The population of a partitioned ledger is the population of the customers of every
//! partition, and its rank figures (RFM quintiles, pyramid tiers, the top-20 % share) rank
//! customers of all partitions together. So a partition does not answer with its own figures:
//! it answers with its customers' [`Contribution`]s at the instant asked, a page at a time in
//! customer order, and the reader adds every partition's pages into one [`PopulationBuilder`].
//! The result is the figures a single log of the same events gives, byte for byte: the additive
//! sums do not depend on the order customers are added in, and the ranks are taken over the
//! whole population.
//!
//! Key decisions:
//! * A "now" read on the business axis is answered from the partition's current
//!   materialisation (ADR 0006: each row's contribution, nothing evaluated) when it is ready;
//!   any other instant, or a partition whose materialisation is not ready, evaluates its
//!   customers at that instant (the full pass of an unpartitioned ledger, a page at a time).
//! * A page is bounded in bytes (the request says how many), so a reply stays under the NATS
//!   server's `max_payload` whatever the customers hold.
//! * The encoding is internal between `touchledger` processes of the same version (bincode 2,
//!   one leading version byte); a process of another version is refused with a clear error.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use touchledger_domain::facts::{AsOf, Axis};
use touchledger_domain::population::{Contribution, PopulationBuilder, PopulationView, Rules};

use crate::{Current, ProjectorError, ReadModels};

/// Bump when [`PartialRequest`], a page's rows or the page encoding change (2: fit rows carry
/// the repeat spend).
const VERSION: u8 = 2;

/// A decoded page: its rows (customer, value) and the customer to continue after (`None` on
/// the last page).
pub type Page<T> = (Vec<(String, T)>, Option<String>);

/// Tags inside an encoded page.
const ROW: u8 = 1;
const END: u8 = 0;

/// What a reader asks a partition for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartialRequest {
    /// The instant and axis of the read.
    pub as_of: AsOf,
    /// A "now" read: the current materialisation may answer (business axis only).
    pub now: bool,
    /// Continue after this customer (`None`: from the first).
    pub after: Option<String>,
    /// The page's size limit in bytes (the page holds at least one customer).
    pub max_bytes: usize,
}

/// One page of a partition's contributions.
#[derive(Clone, Debug, PartialEq)]
pub struct PartialPage {
    /// Customers and their contributions, in customer order.
    pub rows: Vec<(String, Contribution)>,
    /// The customer to continue after; `None` on the last page.
    pub next: Option<String>,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn put<T: Serialize>(out: &mut Vec<u8>, v: &T) {
    // Serialising plain data into a Vec cannot fail.
    let _ = bincode::serde::encode_into_std_write(v, out, config());
}

/// A request's bytes: the version byte, then the request (bincode 2).
pub(crate) fn encode_request<T: Serialize>(req: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    put(&mut out, req);
    out
}

/// A request from its bytes (`what` names it in errors).
pub(crate) fn decode_request<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    match bytes.split_first() {
        Some((&VERSION, rest)) => bincode::serde::decode_from_slice(rest, config())
            .map(|(r, _)| r)
            .map_err(|e| format!("undecodable {what} request: {e}")),
        Some((v, _)) => Err(format!(
            "{what} request of encoding version {v}; this process reads version {VERSION} (mixed touchledger versions)"
        )),
        None => Err(format!("empty {what} request")),
    }
}

/// Encode rows (customer, value) in customer order until the page holds `max_bytes` (at
/// least one row); the end mark names the customer to continue after when rows were left.
pub(crate) fn encode_page<T: Serialize>(
    rows: impl Iterator<Item = Result<(String, T), ProjectorError>>,
    max_bytes: usize,
) -> Result<Vec<u8>, ProjectorError> {
    let mut out = vec![VERSION];
    let mut next = None;
    for r in rows {
        let (id, row) = r?;
        out.push(ROW);
        put(&mut out, &(&id, &row));
        if out.len() >= max_bytes {
            next = Some(id);
            break;
        }
    }
    out.push(END);
    put(&mut out, &next);
    Ok(out)
}

/// The rows of a page and the customer to continue after (`what` names it in errors).
pub(crate) fn decode_page<T: DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<Page<T>, String> {
    let mut rest = match bytes.split_first() {
        Some((&VERSION, rest)) => rest,
        Some((v, _)) => {
            return Err(format!(
                "{what} page of encoding version {v}; this process reads version {VERSION} (mixed touchledger versions)"
            ));
        }
        None => return Err(format!("empty {what} page")),
    };
    let mut rows = Vec::new();
    loop {
        let (tag, tail) = rest
            .split_first()
            .ok_or_else(|| format!("{what} page ends without its end mark"))?;
        let undecodable = |e: bincode::error::DecodeError| format!("undecodable {what} page: {e}");
        match *tag {
            ROW => {
                let (row, n): ((String, T), usize) =
                    bincode::serde::decode_from_slice(tail, config()).map_err(undecodable)?;
                rows.push(row);
                rest = &tail[n..];
            }
            END => {
                let (next, _): (Option<String>, usize) =
                    bincode::serde::decode_from_slice(tail, config()).map_err(undecodable)?;
                return Ok((rows, next));
            }
            t => return Err(format!("{what} page: unknown tag {t}")),
        }
    }
}

impl PartialRequest {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        encode_request(self)
    }

    /// A request from its bytes.
    pub fn decode(bytes: &[u8]) -> Result<PartialRequest, String> {
        decode_request(bytes, "partial")
    }
}

impl PartialPage {
    /// A page from its bytes.
    pub fn decode(bytes: &[u8]) -> Result<PartialPage, String> {
        decode_page(bytes, "partial").map(|(rows, next)| PartialPage { rows, next })
    }
}

/// Answer `req` from this partition's read models: the encoded page of contributions.
pub fn page(
    reads: &ReadModels,
    current: Option<&Current>,
    req: &PartialRequest,
) -> Result<Vec<u8>, ProjectorError> {
    let after = req.after.as_deref();
    match current.filter(|c| req.now && req.as_of.axis == Axis::Business && c.is_ready()) {
        Some(current) => encode_page(
            current
                .rows_after(after)
                .map(|r| r.map(|(id, row)| (id, row.population))),
            req.max_bytes,
        ),
        None => {
            let rules = &reads.rules;
            let model = reads.model(req.as_of)?;
            let rows = reads
                .customers_after(after)
                .filter(|r| !matches!(r, Ok((_, f)) if !f.has_touchpoints(req.as_of)))
                .map(|r| {
                    let (id, f) = r?;
                    let views = rules.customer(&f, &f, &f, model.as_ref(), req.as_of);
                    let c = Contribution::of(
                        &f,
                        &views,
                        &rules.satisfaction,
                        &rules.population,
                        rules.churn.lost_after_days,
                        req.as_of,
                    );
                    Ok((id, c))
                });
            encode_page(rows, req.max_bytes)
        }
    }
}

/// The population of every partition's customers, added up page by page.
#[derive(Debug)]
pub struct Merge {
    builder: PopulationBuilder,
}

impl Merge {
    /// An empty population at `as_of` under `rules`.
    pub fn new(as_of: AsOf, rules: &Rules) -> Merge {
        Merge {
            builder: PopulationBuilder::new(as_of, rules.population.clone(), &rules.churn),
        }
    }

    /// Add one page of a partition's customers.
    pub fn add(&mut self, page: PartialPage) {
        for (id, c) in page.rows {
            self.builder.add_contribution(id, c);
        }
    }

    /// A customer's ranks among everyone added (`None` without purchases).
    pub fn ranks(&self, customer: &str) -> Option<crate::read::Ranks> {
        crate::read::ranks_in(&self.builder, customer)
    }

    /// The population figures.
    pub fn finish(self) -> PopulationView {
        self.builder.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use touchledger_domain::Timestamp;

    #[test]
    fn requests_round_trip_and_other_versions_are_refused() {
        let req = PartialRequest {
            as_of: AsOf::knowledge(Timestamp::from_unix_nanos(1_700_000_000_000_000_000)),
            now: false,
            after: Some("c-17".into()),
            max_bytes: 4096,
        };
        let bytes = req.encode();
        assert_eq!(PartialRequest::decode(&bytes), Ok(req));
        let mut other = bytes.clone();
        other[0] = VERSION + 1;
        let e = PartialRequest::decode(&other).expect_err("another version");
        assert!(e.contains("mixed touchledger versions"), "{e}");
        assert!(PartialPage::decode(&other).is_err());
        assert!(PartialPage::decode(&[VERSION, ROW, 0xff]).is_err());
        assert!(PartialPage::decode(&[VERSION]).is_err());
    }
}
