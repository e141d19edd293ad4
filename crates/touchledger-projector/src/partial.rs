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

use serde::{Deserialize, Serialize};
use touchledger_domain::facts::{AsOf, Axis};
use touchledger_domain::population::{Contribution, PopulationBuilder, PopulationView, Rules};

use crate::{Current, ProjectorError, ReadModels};

/// Bump when [`PartialRequest`] or the page encoding changes.
const VERSION: u8 = 1;

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

impl PartialRequest {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        put(&mut out, self);
        out
    }

    /// A request from its bytes.
    pub fn decode(bytes: &[u8]) -> Result<PartialRequest, String> {
        match bytes.split_first() {
            Some((&VERSION, rest)) => bincode::serde::decode_from_slice(rest, config())
                .map(|(r, _)| r)
                .map_err(|e| format!("undecodable partial request: {e}")),
            Some((v, _)) => Err(format!(
                "partial request of encoding version {v}; this process reads version {VERSION} (mixed touchledger versions)"
            )),
            None => Err("empty partial request".into()),
        }
    }
}

impl PartialPage {
    /// A page from its bytes.
    pub fn decode(bytes: &[u8]) -> Result<PartialPage, String> {
        let mut rest = match bytes.split_first() {
            Some((&VERSION, rest)) => rest,
            Some((v, _)) => {
                return Err(format!(
                    "partial page of encoding version {v}; this process reads version {VERSION} (mixed touchledger versions)"
                ));
            }
            None => return Err("empty partial page".into()),
        };
        let mut rows = Vec::new();
        loop {
            let (tag, tail) = rest
                .split_first()
                .ok_or_else(|| "partial page ends without its end mark".to_owned())?;
            let undecodable =
                |e: bincode::error::DecodeError| format!("undecodable partial page: {e}");
            match *tag {
                ROW => {
                    let (row, n): ((String, Contribution), usize) =
                        bincode::serde::decode_from_slice(tail, config()).map_err(undecodable)?;
                    rows.push(row);
                    rest = &tail[n..];
                }
                END => {
                    let (next, _): (Option<String>, usize) =
                        bincode::serde::decode_from_slice(tail, config()).map_err(undecodable)?;
                    return Ok(PartialPage { rows, next });
                }
                t => return Err(format!("partial page: unknown tag {t}")),
            }
        }
    }
}

/// Answer `req` from this partition's read models: the encoded page of contributions.
pub fn page(
    reads: &ReadModels,
    current: Option<&Current>,
    req: &PartialRequest,
) -> Result<Vec<u8>, ProjectorError> {
    let mut out = vec![VERSION];
    let mut last: Option<String> = None;
    let mut full = false;
    let mut add = |out: &mut Vec<u8>, id: String, c: &Contribution| -> bool {
        out.push(ROW);
        put(out, &(&id, c));
        last = Some(id);
        out.len() >= req.max_bytes
    };
    let after = req.after.as_deref();
    match current.filter(|c| req.now && req.as_of.axis == Axis::Business && c.is_ready()) {
        Some(current) => {
            for r in current.rows_after(after) {
                let (id, row) = r?;
                if add(&mut out, id, &row.population) {
                    full = true;
                    break;
                }
            }
        }
        None => {
            let rules = &reads.rules;
            let model = reads.model(req.as_of)?;
            for r in reads.customers_after(after) {
                let (id, f) = r?;
                if !f.has_touchpoints(req.as_of) {
                    continue;
                }
                let views = rules.customer(&f, &f, &f, model.as_ref(), req.as_of);
                let c = Contribution::of(
                    &f,
                    &views,
                    &rules.satisfaction,
                    &rules.population,
                    rules.churn.lost_after_days,
                    req.as_of,
                );
                if add(&mut out, id, &c) {
                    full = true;
                    break;
                }
            }
        }
    }
    out.push(END);
    put(&mut out, &if full { last } else { None });
    Ok(out)
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
