//! The commands that talk to a running ledger over NATS: `publish`, `tail`, `replay --remote`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::Path;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use touchledger_client::{AppendOutcome, Ledger, ReplayFilter};
use touchledger_domain::{Event, EventKind, json::parse_event};

use crate::serve::NatsArgs;
use crate::{EXIT_OK, EXIT_REJECTED, FilterArgs, Format, ReplayWriter};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The summary of a `publish` run.
#[derive(Serialize, serde::Deserialize, Default, Debug, Clone, PartialEq, Eq)]
pub struct PublishSummary {
    /// Input records read.
    pub read: u64,
    /// Acknowledged: by JetStream (publish) or appended by the ledger (`--sync`).
    pub acked: u64,
    /// Duplicates: JetStream's window, or the ledger's permanent idempotency (`--sync`).
    pub duplicate: u64,
    /// Version conflicts (`--sync` only).
    pub version_conflict: u64,
    /// Rejected: unreadable input here, or the ledger's verdict (`--sync`).
    pub rejected: u64,
    /// Rejected, per code.
    pub rejected_by_code: BTreeMap<String, u64>,
}

/// Read events from a file: JSON lines, or CSV with a payload column.
fn read_events(
    path: &Path,
    format: Format,
    summary: &mut PublishSummary,
) -> anyhow::Result<Vec<Event>> {
    let reader: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(File::open(path).with_context(|| format!("cannot open {}", path.display()))?)
    };
    let mut events = Vec::new();
    let mut reject = |code: &str, line: u64, why: String| {
        eprintln!("{}:{line}: rejected {code}: {why}", path.display());
        summary.rejected += 1;
        *summary.rejected_by_code.entry(code.to_owned()).or_default() += 1;
    };
    match format {
        Format::Jsonl => {
            for (i, line) in BufReader::new(reader).split(b'\n').enumerate() {
                let line = line?;
                let t = line.trim_ascii();
                if t.is_empty() {
                    continue;
                }
                match parse_event(t) {
                    Ok(e) => events.push(e),
                    Err(r) => reject(r.code.as_str(), i as u64 + 1, r.reason),
                }
            }
        }
        Format::Csv => {
            let mut rdr = csv::Reader::from_reader(reader);
            for (i, rec) in rdr.deserialize::<BTreeMap<String, String>>().enumerate() {
                let rec = rec?;
                let get = |k: &str| rec.get(k).cloned().unwrap_or_default();
                let kind = get("kind");
                let payload: serde_json::Value = match serde_json::from_str(&get("payload")) {
                    Ok(v) => v,
                    Err(e) => {
                        reject(
                            "DECODE_FAILED",
                            i as u64 + 2,
                            format!("payload column: {e}"),
                        );
                        continue;
                    }
                };
                let mut obj = serde_json::json!({
                    "event_id": get("event_id"),
                    "customer_id": get("customer_id"),
                    "occurred_at": get("occurred_at"),
                    "source": get("source"),
                    "schema_version": get("schema_version").parse::<u32>().unwrap_or(0),
                });
                obj[kind.as_str()] = payload;
                match parse_event(obj.to_string().as_bytes()) {
                    Ok(e) => events.push(e),
                    Err(r) => reject(r.code.as_str(), i as u64 + 2, r.reason),
                }
            }
        }
    }
    summary.read = events.len() as u64 + summary.rejected;
    Ok(events)
}

/// `touchledger publish`.
pub fn publish(
    nats: &NatsArgs,
    file: &Path,
    format: Format,
    sync: bool,
    in_flight: usize,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let mut summary = PublishSummary::default();
    let events = read_events(file, format, &mut summary)?;
    let progress = std::io::stderr().is_terminal();
    runtime()?.block_on(async {
        let ledger = Ledger::new(nats.connect().await?, nats.prefix.clone());
        let total = events.len();
        for (n, chunk) in events.chunks(in_flight.max(1)).enumerate() {
            if sync {
                let items = chunk.iter().cloned().map(|e| (e, None)).collect();
                for o in ledger.append(items).await? {
                    match o {
                        AppendOutcome::Appended { .. } => summary.acked += 1,
                        AppendOutcome::Duplicate { .. } => summary.duplicate += 1,
                        AppendOutcome::VersionConflict { .. } => summary.version_conflict += 1,
                        AppendOutcome::Rejected(r) => {
                            summary.rejected += 1;
                            *summary
                                .rejected_by_code
                                .entry(r.code.as_str().to_owned())
                                .or_default() += 1;
                        }
                    }
                }
            } else {
                for dup in ledger.publish_batch(chunk, chunk.len()).await? {
                    if dup {
                        summary.duplicate += 1;
                    } else {
                        summary.acked += 1;
                    }
                }
            }
            if progress {
                eprint!(
                    "\rpublished {}/{total}",
                    ((n + 1) * in_flight.max(1)).min(total)
                );
            }
        }
        if progress {
            eprintln!();
        }
        anyhow::Ok(())
    })?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
    } else {
        writeln!(out, "read              {}", summary.read)?;
        writeln!(out, "acked             {}", summary.acked)?;
        writeln!(out, "duplicate         {}", summary.duplicate)?;
        if sync {
            writeln!(out, "version_conflict  {}", summary.version_conflict)?;
        }
        writeln!(out, "rejected          {}", summary.rejected)?;
        for (c, n) in &summary.rejected_by_code {
            writeln!(out, "  {c:<28} {n}")?;
        }
        if !sync {
            writeln!(
                out,
                "(acked = durable in JetStream; values are validated by the ledger, rejections go to <prefix>.deadletter.<code>; use --sync for per-event outcomes)"
            )?;
        }
    }
    Ok(if summary.rejected > 0 {
        EXIT_REJECTED
    } else {
        EXIT_OK
    })
}

/// `touchledger tail`.
pub fn tail(
    nats: &NatsArgs,
    kind: Option<EventKind>,
    customer: Option<String>,
    count: Option<u64>,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    runtime()?.block_on(async {
        let ledger = Ledger::new(nats.connect().await?, nats.prefix.clone());
        let mut stream = Box::pin(ledger.follow(kind, customer.as_deref()).await?);
        let mut w = ReplayWriter::new(Format::Jsonl, out)?;
        let mut seen = 0u64;
        while count.is_none_or(|c| seen < c) {
            let Some(r) = stream.next().await else { break };
            let r = r?;
            w.write(
                r.position,
                r.customer_version,
                r.recorded_at,
                &r.hash,
                &r.prev_hash,
                &r.event,
            )?;
            seen += 1;
            // Live output: each record is visible as soon as it is committed.
            w.flush()?;
        }
        w.finish()?;
        anyhow::Ok(())
    })?;
    Ok(EXIT_OK)
}

/// `touchledger replay --remote`.
/// `partition`: which partition's log of a partitioned ledger (`None`: an unpartitioned one).
pub fn replay(
    nats: &NatsArgs,
    f: &FilterArgs,
    format: Format,
    partition: Option<u32>,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    runtime()?.block_on(async {
        let ledger = Ledger::new(nats.connect().await?, nats.prefix.clone());
        let ledger = match partition {
            Some(n) => ledger.in_partition(n),
            None => ledger,
        };
        let mut w = ReplayWriter::new(format, out)?;
        replay_into(&ledger, f, &mut w).await?;
        w.finish()?;
        anyhow::Ok(())
    })?;
    Ok(EXIT_OK)
}

/// `touchledger export --remote --partitions P`: every partition's log, one after the other,
/// into one file whose records carry their partition (what `verify --export` checks), each
/// replayed from whichever process owns the partition now.
pub fn export_partitions(
    nats: &NatsArgs,
    f: &FilterArgs,
    format: Format,
    partitions: u32,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    runtime()?.block_on(async {
        let ledger = Ledger::new(nats.connect().await?, nats.prefix.clone());
        let mut w = ReplayWriter::new(format, out)?.partitioned();
        for n in 0..partitions {
            w.set_partition(n);
            replay_into(&ledger.in_partition(n), f, &mut w)
                .await
                .with_context(|| format!("partition {n}"))?;
        }
        w.finish()?;
        anyhow::Ok(())
    })?;
    Ok(EXIT_OK)
}

/// Replay one log through `w`.
async fn replay_into(
    ledger: &Ledger,
    f: &FilterArgs,
    w: &mut ReplayWriter<'_>,
) -> anyhow::Result<()> {
    let filter = f.to_filter();
    let mut failure = None;
    let rf = ReplayFilter {
        from_position: filter.from_position,
        to_position: filter.to_position,
        customer: filter.customer.clone(),
        kind: filter.kind,
        occurred_since: filter.occurred_since,
        occurred_until: filter.occurred_until,
        chunk_size: 0,
    };
    ledger
        .replay(&rf, |r| {
            if failure.is_none()
                && let Err(e) = w.write(
                    r.position,
                    r.customer_version,
                    r.recorded_at,
                    &r.hash,
                    &r.prev_hash,
                    &r.event,
                )
            {
                failure = Some(e);
            }
            Ok(())
        })
        .await?;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `touchledger fit --remote`: ask the running ledger to fit the churn model now
/// (`<prefix>.model.fit`) and record it; prints the fit like the offline command.
pub fn fit(
    nats: &NatsArgs,
    as_of: Option<touchledger_domain::Timestamp>,
    unit: touchledger_domain::TimeUnit,
    model: Option<touchledger_domain::count::CountKind>,
    dry_run: bool,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    use touchledger_proto::prost::Message;
    use touchledger_proto::v1;
    runtime()?.block_on(async {
        let client = nats.connect().await?;
        let req = v1::FitRequest {
            as_of: as_of.map(touchledger_proto::to_pb_time),
            unit: match unit {
                touchledger_domain::TimeUnit::Days => v1::TimeUnit::Days,
                touchledger_domain::TimeUnit::Weeks => v1::TimeUnit::Weeks,
            } as i32,
            dry_run,
            model: model.map(|m| m.name().to_owned()).unwrap_or_default(),
        };
        let subject = format!("{}.model.fit", nats.prefix);
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(120),
            client.request(subject.clone(), req.encode_to_vec().into()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no reply on {subject} within 120 s"))?
        .with_context(|| format!("request on {subject}"))?;
        let reply = v1::FitReply::decode(reply.payload.as_ref())?;
        if let Some(e) = reply.error {
            anyhow::bail!("fit failed: {} {}", e.code, e.message);
        }
        let event = Event::try_from(reply.event.unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("reply carries no valid event: {e}"))?;
        let touchledger_domain::Payload::ModelFitted(m) = event.payload else {
            anyhow::bail!("reply carries another kind of event, not model_fitted");
        };
        crate::models::print_fit(&m, out)?;
        if reply.duplicate {
            writeln!(out, "already recorded at position {}", reply.position)?;
        } else if reply.position > 0 {
            writeln!(
                out,
                "recorded as ModelFitted at position {}",
                reply.position
            )?;
        }
        Ok(EXIT_OK)
    })
}

/// `touchledger evaluate --remote`: the evaluation made by a running ledger
/// (`<prefix>.model.evaluate`), printed as the offline command prints it.
pub fn evaluate(
    nats: &NatsArgs,
    (calibration_end, holdout_end): (touchledger_domain::Timestamp, touchledger_domain::Timestamp),
    unit: touchledger_domain::TimeUnit,
    output: crate::models::EvaluateOutput,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    use touchledger_proto::prost::Message;
    use touchledger_proto::v1;
    let started = std::time::Instant::now();
    let reply = runtime()?.block_on(async {
        let client = nats.connect().await?;
        let req = v1::EvaluateRequest {
            calibration_end: Some(touchledger_proto::to_pb_time(calibration_end)),
            holdout_end: Some(touchledger_proto::to_pb_time(holdout_end)),
            unit: match unit {
                touchledger_domain::TimeUnit::Days => v1::TimeUnit::Days,
                touchledger_domain::TimeUnit::Weeks => v1::TimeUnit::Weeks,
            } as i32,
            record: output.record,
        };
        let subject = format!("{}.model.evaluate", nats.prefix);
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(300),
            client.request(subject.clone(), req.encode_to_vec().into()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no reply on {subject} within 300 s"))?
        .with_context(|| format!("request on {subject}"))?;
        anyhow::Ok(v1::EvaluateReply::decode(reply.payload.as_ref())?)
    })?;
    if let Some(e) = reply.error {
        if e.code == "BAD_REQUEST" {
            writeln!(out, "{}", e.message)?;
            return Ok(crate::EXIT_USAGE);
        }
        if e.code == "REJECTED" {
            writeln!(out, "{}", e.message)?;
            return Ok(crate::EXIT_REJECTED);
        }
        anyhow::bail!("evaluation failed: {} {}", e.code, e.message);
    }
    let evaluation: touchledger_projector::evaluate::ModelEvaluation =
        serde_json::from_str(&reply.evaluation_json)
            .context("the reply's evaluation is not an evaluation")?;
    let recorded = match (output.record, reply.duplicate) {
        (false, _) => None,
        (true, false) => Some(format!(
            "recorded as ModelEvaluated at position {}",
            reply.position
        )),
        (true, true) => Some(format!("already recorded at position {}", reply.position)),
    };
    crate::models::present_evaluation(
        &evaluation,
        recorded,
        output.json,
        output.svg,
        started.elapsed(),
        out,
    )
}

/// `touchledger cluster status`: the ledger's partitions as NATS sees them.
pub fn cluster_status(
    nats: &NatsArgs,
    partitions: u32,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let status = runtime()?.block_on(async {
        let client = nats.connect().await?;
        let subjects = touchledger_bus::Subjects::new(nats.prefix.clone());
        anyhow::Ok(touchledger_bus::cluster_status(&client, &subjects, partitions).await?)
    })?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &status)?;
        writeln!(out)?;
        return Ok(EXIT_OK);
    }
    let group = |g: &Option<touchledger_bus::GroupStatus>| match g {
        None => "-".to_owned(),
        Some(g) => format!(
            "{} {}/{}{}",
            g.leader.as_deref().unwrap_or("(no leader)"),
            g.in_sync,
            g.replicas,
            if g.offline.is_empty() {
                String::new()
            } else {
                format!(" offline: {}", g.offline.join(","))
            }
        ),
    };
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    writeln!(
        out,
        "server {}{}",
        status.server,
        status
            .cluster
            .as_deref()
            .map(|c| format!(", cluster {c}"))
            .unwrap_or_default()
    )?;
    writeln!(
        out,
        "intake: {} messages, {}",
        opt(status.intake_messages),
        group(&status.intake)
    )?;
    if status.intake_messages.is_none() {
        writeln!(
            out,
            "no intake stream under the prefix {:?} on this server: is `serve` running with this --prefix?",
            nats.prefix
        )?;
    }
    if !status.members.is_empty() {
        writeln!(out, "auto members: {}", status.members.join(", "))?;
    }
    writeln!(
        out,
        "partition  owner                                   feed head  pending  unacked  feed leader in-sync/replicas   consumer leader in-sync/replicas"
    )?;
    for p in &status.partitions {
        writeln!(
            out,
            "{:>9}  {:<38}  {:>9}  {:>7}  {:>7}  {:<30}  {}",
            p.partition,
            p.owner.as_deref().unwrap_or(if partitions > 1 {
                "(no owner)"
            } else {
                "(unpartitioned: no lease)"
            }),
            opt(p.feed_head),
            opt(p.intake_pending),
            opt(p.intake_unacked),
            group(&p.feed),
            group(&p.consumer),
        )?;
    }
    // What could not be read (a Raft group without a leader, a lease bucket that failed):
    // named, never shown as "missing".
    for e in &status.problems {
        writeln!(out, "problem: {e}")?;
    }
    for p in &status.partitions {
        for e in &p.problems {
            writeln!(out, "problem: partition {}: {e}", p.partition)?;
        }
    }
    Ok(EXIT_OK)
}
