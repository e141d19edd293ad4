//! Audit commands: `export` (the history as JSON lines or CSV, from a data directory or over
//! NATS) and the checks behind `verify --checkpoint` and `verify --export`.
//!
//! Key decision: an export carries, per record, everything its hash covers — position,
//! customer version, `recorded_at`, `prev_hash` and the event — so an auditor can recompute the
//! chain from the file alone: the stored record bytes are the canonical protobuf encoding of
//! those fields (`Committed::record_bytes`), and `hash = BLAKE3(prev_hash ‖ record bytes)`.
//! Changing anything in an exported record changes its recomputed hash; removing or reordering
//! records breaks the positions or the links; and the last hash must match a checkpoint that
//! was published (on `<prefix>.ledger.checkpoint`) or stored independently.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;
use touchledger_domain::{Event, Timestamp};
use touchledger_store::{Committed, EventStore, Hash, SledStore};

use crate::Format;

/// A checkpoint given on the command line as `POSITION:HASH`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointArg {
    /// Position.
    pub position: u64,
    /// Chain hash at that position.
    pub hash: Hash,
}

impl std::str::FromStr for CheckpointArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (p, h) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected POSITION:HASH"))?;
        let position = p.parse().map_err(|_| format!("{p:?} is not a position"))?;
        let hash = hex::decode(h)
            .ok()
            .and_then(|b| Hash::from_slice(&b))
            .ok_or_else(|| format!("{h:?} is not a 64-digit hex hash"))?;
        Ok(CheckpointArg { position, hash })
    }
}

#[derive(Deserialize)]
struct ExportLine {
    /// Present in an export of several partitions (`export --partitions P`).
    #[serde(default)]
    partition: Option<u32>,
    position: u64,
    customer_version: u64,
    recorded_at: Timestamp,
    hash: String,
    prev_hash: String,
    event: Event,
}

#[derive(Deserialize)]
struct CsvLine {
    #[serde(default)]
    partition: Option<u32>,
    position: u64,
    customer_version: u64,
    recorded_at: Timestamp,
    hash: String,
    prev_hash: String,
    event_json: String,
}

/// The outcome of checking an export.
#[derive(Debug, PartialEq, Eq)]
pub enum ExportCheck {
    /// Every record's hash recomputes, the links hold, positions are gapless from 1 (in each
    /// partition), and the checkpoint or global checkpoint (if given) matches.
    Ok {
        /// Records checked.
        records: u64,
        /// The last position and its hash, per partition (`None`: an unpartitioned export).
        heads: Vec<(Option<u32>, u64, Hash)>,
    },
    /// The first problem found.
    Failed {
        /// Where (line number in the file).
        line: u64,
        /// Position of the record, if readable.
        position: Option<u64>,
        /// What is wrong.
        problem: String,
    },
}

/// The rows of an export file (JSON lines or CSV as `export` writes them), each with its line
/// number in the file.
fn export_rows(
    reader: BufReader<File>,
    format: Format,
) -> Box<dyn Iterator<Item = anyhow::Result<(u64, ExportLine)>>> {
    match format {
        Format::Jsonl => Box::new(reader.lines().enumerate().filter_map(|(i, l)| {
            let n = i as u64 + 1;
            match l {
                Err(e) => Some(Err(e.into())),
                Ok(l) if l.trim().is_empty() => None,
                Ok(l) => Some(
                    serde_json::from_str::<ExportLine>(&l)
                        .map(|x| (n, x))
                        .map_err(|e| anyhow::anyhow!("line {n}: {e}")),
                ),
            }
        })),
        Format::Csv => {
            let csv = csv::Reader::from_reader(reader);
            Box::new(csv.into_deserialize::<CsvLine>().enumerate().map(|(i, r)| {
                let n = i as u64 + 2;
                let r = r.map_err(|e| anyhow::anyhow!("line {n}: {e}"))?;
                let event: Event = serde_json::from_str(&r.event_json)
                    .map_err(|e| anyhow::anyhow!("line {n}: event_json: {e}"))?;
                Ok((
                    n,
                    ExportLine {
                        partition: r.partition,
                        position: r.position,
                        customer_version: r.customer_version,
                        recorded_at: r.recorded_at,
                        hash: r.hash,
                        prev_hash: r.prev_hash,
                        event,
                    },
                ))
            }))
        }
    }
}

fn hash_of(s: &str) -> Option<Hash> {
    hex::decode(s).ok().and_then(|b| Hash::from_slice(&b))
}

/// What an export is checked against: one chain's checkpoint, or a global checkpoint pinning
/// the head of every partition.
#[derive(Clone, Copy, Debug)]
pub enum Pin<'a> {
    /// Nothing beyond the chain itself.
    None,
    /// `--checkpoint POSITION:HASH` (an unpartitioned export, or one partition's).
    Checkpoint(CheckpointArg),
    /// `--global FILE` (an export of every partition).
    Global(&'a touchledger_store::GlobalCheckpoint),
}

/// Where one chain of the export stands while it is read.
struct Chain {
    expected: u64,
    prev: Hash,
}

fn label(partition: Option<u32>) -> String {
    partition.map_or_else(String::new, |n| format!("partition {n}: "))
}

/// Recompute the hash chain of an exported history (it must start at position 1; an export of
/// several partitions holds one chain per partition, each from position 1) and check it
/// against `pin`.
pub fn check_export(file: &Path, format: Format, pin: Pin<'_>) -> anyhow::Result<ExportCheck> {
    let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let reader = BufReader::with_capacity(1 << 20, f);
    let mut chains: std::collections::BTreeMap<Option<u32>, Chain> = Default::default();
    let mut records = 0u64;
    // The positions pinned, per chain, and whether the export reached them.
    let mut pins: std::collections::BTreeMap<Option<u32>, (CheckpointArg, bool)> = match pin {
        Pin::None => Default::default(),
        Pin::Checkpoint(c) => [(None, (c, false))].into(),
        Pin::Global(g) => g
            .heads
            .iter()
            .enumerate()
            .filter(|(_, (position, _))| *position > 0)
            .map(|(n, &(position, hash))| {
                (Some(n as u32), (CheckpointArg { position, hash }, false))
            })
            .collect(),
    };
    let fail = |line: u64, position: Option<u64>, problem: String| ExportCheck::Failed {
        line,
        position,
        problem,
    };
    let mut rows = export_rows(reader, format);
    for row in &mut rows {
        let (n, r) = match row {
            Ok(x) => x,
            Err(e) => return Ok(fail(0, None, format!("unreadable record: {e:#}"))),
        };
        let p = Some(r.position);
        let part = r.partition;
        if let Some((&other, _)) = chains.iter().next()
            && other.is_some() != part.is_some()
        {
            return Ok(fail(
                n,
                p,
                "the file mixes records with and without a partition".into(),
            ));
        }
        if let (Pin::Global(g), Some(k)) = (pin, part)
            && k as usize >= g.heads.len()
        {
            return Ok(fail(
                n,
                p,
                format!(
                    "partition {k}, but the global checkpoint has {} partitions",
                    g.heads.len()
                ),
            ));
        }
        let chain = chains.entry(part).or_insert(Chain {
            expected: 1,
            prev: Hash::ZERO,
        });
        let at = label(part);
        if r.position != chain.expected {
            return Ok(fail(
                n,
                p,
                format!(
                    "{at}position {} where {} was expected (records removed, added or reordered; an export must start at position 1)",
                    r.position, chain.expected
                ),
            ));
        }
        let (Some(hash), Some(prev_hash)) = (hash_of(&r.hash), hash_of(&r.prev_hash)) else {
            return Ok(fail(n, p, "hash or prev_hash is not 64 hex digits".into()));
        };
        if prev_hash != chain.prev {
            return Ok(fail(
                n,
                p,
                format!(
                    "{at}prev_hash {prev_hash} does not link to the previous record's hash {}",
                    chain.prev
                ),
            ));
        }
        let record = Committed {
            position: r.position,
            customer_version: r.customer_version,
            recorded_at: r.recorded_at,
            prev_hash,
            hash,
            event: r.event,
        }
        .record_bytes();
        let mut h = blake3::Hasher::new();
        h.update(&chain.prev.0);
        h.update(&record);
        let computed = Hash(*h.finalize().as_bytes());
        if computed != hash {
            return Ok(fail(
                n,
                p,
                format!(
                    "{at}content does not match its hash: recomputed {computed}, recorded {hash}"
                ),
            ));
        }
        if let Some((c, reached)) = pins.get_mut(&part)
            && c.position == r.position
        {
            if c.hash != hash {
                return Ok(fail(
                    n,
                    p,
                    format!("{at}hash {hash} differs from the checkpoint's {}", c.hash),
                ));
            }
            *reached = true;
        }
        chain.prev = hash;
        chain.expected += 1;
        records += 1;
    }
    if let (Pin::Global(_), Some(None)) = (pin, chains.keys().next()) {
        return Ok(fail(
            0,
            None,
            "a global checkpoint checks an export of every partition (export --partitions P), this one has none".into(),
        ));
    }
    if let (Pin::Checkpoint(_), Some(Some(k))) = (pin, chains.keys().next()) {
        return Ok(fail(
            0,
            None,
            format!(
                "--checkpoint names one chain, the file holds partitions (first {k}): check it with --global"
            ),
        ));
    }
    for (part, (c, reached)) in &pins {
        if !reached {
            let end = chains.get(part).map_or(0, |c| c.expected - 1);
            return Ok(fail(
                0,
                None,
                format!(
                    "{}the export ends at position {end} before the checkpoint at {}",
                    label(*part),
                    c.position
                ),
            ));
        }
    }
    Ok(ExportCheck::Ok {
        records,
        heads: chains
            .into_iter()
            .map(|(part, c)| (part, c.expected - 1, c.prev))
            .collect(),
    })
}

/// Print an export check; returns the exit code.
pub fn report_export(
    check: &ExportCheck,
    pin: Pin<'_>,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    match check {
        ExportCheck::Ok { records, heads } => {
            match heads.as_slice() {
                [] => write!(out, "OK: the export holds no records")?,
                [(None, last, hash)] => write!(
                    out,
                    "OK: {records} exported records recompute to head position {last} hash {hash}"
                )?,
                _ => {
                    write!(
                        out,
                        "OK: {records} exported records of {} partitions recompute; heads",
                        heads.len()
                    )?;
                    for (part, last, hash) in heads {
                        write!(out, " {}:{last}:{hash}", part.unwrap_or_default())?;
                    }
                }
            }
            match pin {
                Pin::None => {}
                Pin::Checkpoint(c) => {
                    write!(out, "; matches checkpoint {}:{}", c.position, c.hash)?
                }
                Pin::Global(g) => write!(out, "; matches global checkpoint {}", g.hash())?,
            }
            writeln!(out)?;
            Ok(crate::EXIT_OK)
        }
        ExportCheck::Failed {
            line,
            position,
            problem,
        } => {
            let at = position.map_or_else(String::new, |p| format!(" at position {p}"));
            writeln!(out, "FAILED (line {line}){at}: {problem}")?;
            Ok(crate::EXIT_VERIFY_FAILED)
        }
    }
}

/// Restore an export into `store` (normally an empty data directory): every record keeps its
/// position, customer version, `recorded_at` and hash, and the chain is checked as it goes
/// ([`SledStore::restore`]). With `checkpoint`, the restored record at its position must carry
/// its hash. Prints a summary; returns the exit code (3 when the export is refused).
pub fn restore(
    store: &SledStore,
    file: &Path,
    format: Format,
    checkpoint: Option<CheckpointArg>,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    const CHUNK: usize = 10_000;
    let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let start = store.head();
    let mut chunk: Vec<Committed> = Vec::with_capacity(CHUNK);
    let refuse = |out: &mut dyn Write, at: String, problem: String| -> anyhow::Result<i32> {
        let head = store.head();
        writeln!(
            out,
            "REFUSED{at}: {problem}\nrestored before it: positions {}..={} (durable; head {} {})",
            start.position + 1,
            head.position,
            head.position,
            head.hash
        )?;
        Ok(crate::EXIT_VERIFY_FAILED)
    };
    let flush = |chunk: &mut Vec<Committed>| -> Result<(), touchledger_store::StoreError> {
        store.restore(std::mem::take(chunk)).map(drop)
    };
    // A store of one partition takes that partition's records from an export of several.
    let part = store.partition();
    let mine = (part.count > 1).then_some(part.index);
    for row in export_rows(BufReader::with_capacity(1 << 20, f), format) {
        let (n, r) = match row {
            Ok(x) => x,
            Err(e) => return refuse(out, String::new(), format!("unreadable record: {e:#}")),
        };
        match (r.partition, mine) {
            (Some(p), Some(m)) if p != m => continue,
            (Some(p), None) => {
                return refuse(
                    out,
                    format!(" (line {n})"),
                    format!(
                        "a record of partition {p}: the export holds several partitions, restore each with --partitions P --partition N"
                    ),
                );
            }
            _ => {}
        }
        let (Some(hash), Some(prev_hash)) = (hash_of(&r.hash), hash_of(&r.prev_hash)) else {
            return refuse(
                out,
                format!(" (line {n}) at position {}", r.position),
                "hash or prev_hash is not 64 hex digits".into(),
            );
        };
        chunk.push(Committed {
            position: r.position,
            customer_version: r.customer_version,
            recorded_at: r.recorded_at,
            prev_hash,
            hash,
            event: r.event,
        });
        if chunk.len() >= CHUNK {
            match flush(&mut chunk) {
                Ok(()) => {}
                Err(touchledger_store::StoreError::RestoreMismatch { position, detail }) => {
                    return refuse(out, format!(" at position {position}"), detail);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    match flush(&mut chunk) {
        Ok(()) => {}
        Err(touchledger_store::StoreError::RestoreMismatch { position, detail }) => {
            return refuse(out, format!(" at position {position}"), detail);
        }
        Err(e) => return Err(e.into()),
    }
    store.flush()?;
    let head = store.head();
    if let Some(c) = checkpoint {
        let stored = store.get(c.position)?;
        match stored {
            Some(r) if r.hash == c.hash => {}
            Some(r) => {
                return refuse(
                    out,
                    format!(" at position {}", c.position),
                    format!("hash {} differs from the checkpoint's {}", r.hash, c.hash),
                );
            }
            None => {
                return refuse(
                    out,
                    String::new(),
                    format!(
                        "the restored ledger ends at position {} before the checkpoint at {}",
                        head.position, c.position
                    ),
                );
            }
        }
    }
    write!(
        out,
        "restored positions {}..={} from {}: head {} {}",
        start.position + 1,
        head.position,
        file.display(),
        head.position,
        head.hash
    )?;
    if let Some(c) = checkpoint {
        write!(out, "; matches checkpoint {}:{}", c.position, c.hash)?;
    }
    writeln!(out)?;
    Ok(crate::EXIT_OK)
}
