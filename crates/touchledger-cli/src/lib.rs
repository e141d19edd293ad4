//! The `touchledger` command line.
//!
//! Key decision: the whole CLI is a library function, [`run`], writing to the streams it is
//! given and returning an exit code; `main` only wires it to the process. The integration tests
//! drive exactly what users run, in-process. Errors go to stderr; data goes to stdout.
//!
//! Exit codes (stable, documented in the README):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | failure: I/O error, storage error, unreadable input file |
//! | 2 | usage error (bad flags or arguments) |
//! | 3 | damage: `verify` found the ledger damaged, sled found damaged data on open, or `restore` refused an export |
//! | 4 | `append` finished, but some input was rejected (see the summary and `rejections`) |
//! | 5 | the data directory cannot be used: locked, other format version, not a ledger, a storage format this build cannot read |
//! | 6 | storage full: the store's free-space reserve was reached; every batch before it is durable |

pub mod audit;
pub mod demo;
pub mod generate;
pub mod models;
pub mod remote;
mod rng;
pub mod serve;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use touchledger_domain::count::CountKind;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use touchledger_domain::partition::{PartitionId, partition_of};
use touchledger_domain::{EventKind, Timestamp};
use touchledger_store::{
    AppendItem, AppendOutcome, Committed, EventStore, ReadFilter, SledStore, StoreConfig,
    StoreError, VerifyReport, rejection_record,
};

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: failure.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: usage error.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: verification failed.
pub const EXIT_VERIFY_FAILED: i32 = 3;
/// Exit code: some appended input was rejected.
pub const EXIT_REJECTED: i32 = 4;
/// Exit code: the data directory cannot be used.
pub const EXIT_DATA_DIR: i32 = 5;
/// Exit code: the store's free-space reserve was reached.
pub const EXIT_STORAGE_FULL: i32 = 6;

#[derive(Parser, Debug)]
#[command(
    name = "touchledger",
    version,
    about = "Event-sourced customer-interaction ledger"
)]
struct Cli {
    /// Settings file (TOML): keys are the long flag names with `_` for `-`, e.g.
    /// `nats_url = "nats://10.0.0.5:4222"`. Flags and environment variables take precedence.
    #[arg(long, global = true, env = "TOUCHLEDGER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Merge a TOML settings file into the arguments: every key becomes `--key value` unless the
/// flag is already given or its environment variable is set, so the precedence is
/// flags > environment > file > defaults. Unknown keys are an error, never ignored.
fn expand_config(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    use clap::CommandFactory;
    let strs: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut path: Option<String> = None;
    for (i, a) in strs.iter().enumerate() {
        if a == "--config" {
            path = strs.get(i + 1).cloned();
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_owned());
        }
    }
    let Some(path) = path.or_else(|| std::env::var("TOUCHLEDGER_CONFIG").ok()) else {
        return Ok(args);
    };
    let Some(sub) = strs.iter().skip(1).find(|a| !a.starts_with('-')) else {
        return Ok(args);
    };
    let cmd = Cli::command();
    let Some(subcmd) = cmd.find_subcommand(sub) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read config file {path}: {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("config file {path}: {e}"))?;
    let mut out = args;
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let Some(arg) = subcmd
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()))
        else {
            return Err(format!(
                "config file {path}: `{key}` is not a setting of `touchledger {sub}`"
            ));
        };
        let given = strs
            .iter()
            .any(|a| a == &format!("--{flag}") || a.starts_with(&format!("--{flag}=")));
        let in_env = arg.get_env().is_some_and(|e| std::env::var_os(e).is_some());
        if given || in_env {
            continue;
        }
        match value {
            toml::Value::Boolean(true) => out.push(format!("--{flag}").into()),
            toml::Value::Boolean(false) => {}
            toml::Value::String(v) => out.extend([format!("--{flag}").into(), v.into()]),
            toml::Value::Integer(v) => {
                out.extend([format!("--{flag}").into(), v.to_string().into()])
            }
            toml::Value::Float(v) => out.extend([format!("--{flag}").into(), v.to_string().into()]),
            other => {
                return Err(format!(
                    "config file {path}: `{key}` has an unsupported value {other}"
                ));
            }
        }
    }
    Ok(out)
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the ledger service: JetStream intake, synchronous append, the committed-event feed
    /// and replay, plus the read models (projectors, views, queries, churn assessor and model
    /// refits) over NATS, on the embedded sled store. Stops cleanly on SIGINT/SIGTERM.
    Serve {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        nats: serve::NatsArgs,
        #[command(flatten)]
        rules: RulesArgs,
        /// Messages per intake batch (one flush each).
        #[arg(long, env = "TOUCHLEDGER_BATCH", default_value_t = 500)]
        batch: usize,
        /// How long an intake fetch waits for its batch to fill, in milliseconds.
        #[arg(long, env = "TOUCHLEDGER_FETCH_WAIT_MS", default_value_t = 50)]
        fetch_wait_ms: u64,
        /// Seconds before JetStream redelivers messages a crashed ledger had fetched.
        #[arg(long, env = "TOUCHLEDGER_ACK_WAIT_SECS", default_value_t = 10)]
        ack_wait_secs: u64,
        /// Seconds between churn-assessor sweeps of the due-time index.
        #[arg(long, env = "TOUCHLEDGER_SWEEP_SECS", default_value_t = 60)]
        sweep_secs: u64,
        /// Hours between scheduled BG/NBD refits (0 = only on demand, `touchledger fit`).
        #[arg(long, env = "TOUCHLEDGER_REFIT_HOURS", default_value_t = 24)]
        refit_hours: u64,
        /// HTTP API and dashboard address (loopback by default).
        #[arg(long, env = "TOUCHLEDGER_HTTP_ADDR", default_value = "127.0.0.1:8080")]
        http_addr: std::net::SocketAddr,
        /// Require `Authorization: Bearer <token>` on the HTTP API, dashboard and metrics.
        #[arg(long, env = "TOUCHLEDGER_HTTP_TOKEN", hide_env_values = true)]
        http_token: Option<String>,
        /// Seconds the service waits for its tasks to stop after SIGTERM/SIGINT or a fatal
        /// store error before it exits anyway (non-zero when the shutdown was not clean).
        #[arg(long, env = "TOUCHLEDGER_SHUTDOWN_SECS", default_value_t = 15)]
        shutdown_secs: u64,
        /// With `--partitions` > 1: the partitions this process owns, e.g. `0-3`, `1,5,7` or
        /// `all`, or `auto`: a share ⌈P / processes⌉ of them, balanced with the other `auto`
        /// processes. Each owned partition runs its own intake consumer, store, feed,
        /// synchronous append and replay; one held by another process is waited for
        /// (docs/partitions.md).
        #[arg(long, env = "TOUCHLEDGER_OWN", default_value = "all")]
        own: String,
        /// With `--partitions` > 1: seconds between global checkpoints (every partition's head
        /// and one hash over them, on `<prefix>.ledger.global_checkpoint`), published by the
        /// owner of partition 0 when a head moved.
        #[arg(long, env = "TOUCHLEDGER_GLOBAL_CHECKPOINT_SECS", default_value_t = 60)]
        global_checkpoint_secs: u64,
        /// With `--partitions` > 1: the TTL of a partition's ownership lease (the `max_age` of
        /// the `<PREFIX>_LEASES` KV bucket, set by the first process that creates it). An owner
        /// renews every quarter TTL and stops acting for a partition once three quarters have
        /// passed without a renewal; another process takes the partition after the full TTL.
        #[arg(long, env = "TOUCHLEDGER_LEASE_TTL_SECS", default_value_t = 10)]
        lease_ttl_secs: u64,
        /// With `--partitions` > 1: copies of each stream (intake, feed, dead letters, global
        /// checkpoints) and of the lease bucket on a JetStream cluster: 3 on a 3-node cluster
        /// (a stream then survives the loss of one node), 1 on a single server.
        #[arg(long, env = "TOUCHLEDGER_REPLICAS", default_value_t = 1)]
        replicas: usize,
    },
    /// Append events from a JSON-lines file through the store's append path (offline import).
    Append {
        #[command(flatten)]
        data: DataArgs,
        /// JSON-lines file of events (`-` = standard input).
        #[arg(long)]
        file: PathBuf,
        /// Events per atomic, flushed batch.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print stored events in position order, with position, version and hashes.
    Replay {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Replay from a running ledger over NATS (`--nats-url`) instead of the data directory.
        #[arg(long)]
        remote: bool,
        #[command(flatten)]
        nats: serve::NatsArgs,
    },
    /// Publish events from a JSON-lines or CSV file to the ledger over NATS.
    Publish {
        #[command(flatten)]
        nats: serve::NatsArgs,
        /// Input file (`-` = standard input).
        #[arg(long)]
        file: PathBuf,
        /// Input format. CSV columns: event_id, customer_id, occurred_at, source,
        /// schema_version, kind, payload (the kind's JSON object).
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Use synchronous append (exact per-event outcomes after the ledger's flush) instead of
        /// JetStream publish (acked when JetStream has it).
        #[arg(long)]
        sync: bool,
        /// Unacknowledged publishes in flight (or events per synchronous append).
        #[arg(long, default_value_t = 256)]
        in_flight: usize,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow committed events live and print them as JSON lines.
    Tail {
        #[command(flatten)]
        nats: serve::NatsArgs,
        /// Only this kind.
        #[arg(long)]
        kind: Option<EventKind>,
        /// Only this customer.
        #[arg(long)]
        customer: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Recompute the hash chain and check every index (of the data directory, or of an
    /// exported file with `--export`); with `--checkpoint POSITION:HASH`, also prove that the
    /// history up to that published checkpoint is unchanged.
    Verify {
        #[command(flatten)]
        data: DataArgs,
        /// A checkpoint to check against, as `POSITION:HASH` (from `crm.ledger.checkpoint`,
        /// `touchledger stats`, or an auditor's records).
        #[arg(long)]
        checkpoint: Option<audit::CheckpointArg>,
        /// Verify this exported file (from position 1) instead of the data directory.
        #[arg(long)]
        export: Option<PathBuf>,
        /// With `--partitions` > 1: a global checkpoint (the text published on
        /// `<prefix>.ledger.global_checkpoint`) to check every partition here against.
        #[arg(long)]
        global: Option<PathBuf>,
        /// Format of the exported file.
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
    },
    /// Write the history (or a filtered part of it) to a file for auditors: per record the
    /// position, customer version, recorded_at, hash, prev_hash and the event. A full export
    /// can be verified on its own with `verify --export FILE --checkpoint POSITION:HASH`.
    Export {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Output file (`-` = standard output).
        #[arg(long)]
        out: PathBuf,
        /// Export from a running ledger over NATS instead of the data directory.
        #[arg(long)]
        remote: bool,
        #[command(flatten)]
        nats: serve::NatsArgs,
    },
    /// Rebuild a data directory from an export (`export`, or `export --remote` of a running
    /// ledger): the same positions, customer versions, recorded_at and hashes, the chain checked
    /// as it goes. Normally into a new, empty directory; a store that already holds the
    /// export's first part is continued. The rejections record is not part of an export.
    Restore {
        #[command(flatten)]
        data: DataArgs,
        /// The export file.
        #[arg(long)]
        from: PathBuf,
        /// Format of the export file.
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// A published checkpoint, `POSITION:HASH`, that the restored record at POSITION must
        /// match.
        #[arg(long)]
        checkpoint: Option<audit::CheckpointArg>,
    },
    /// Counts: events by kind, customers, checkpoints, rejections, disk size.
    Stats {
        #[command(flatten)]
        data: DataArgs,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the rejections record (rejected input with code, reason and raw bytes) as JSON lines.
    Rejections {
        #[command(flatten)]
        data: DataArgs,
    },
    /// Run the read-model projectors apart from the ledger: follow the committed-event stream
    /// over NATS into a projection database of their own (`--projections`).
    Project {
        /// Directory of the projection database (created if missing).
        #[arg(
            long,
            env = "TOUCHLEDGER_PROJECTIONS",
            default_value = "./data/projections"
        )]
        projections: PathBuf,
        #[command(flatten)]
        nats: serve::NatsArgs,
        /// Events per atomic projection commit.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Publish realistic, seeded synthetic touchpoints over NATS: a backfilled history, then
    /// a live tail, so that every read model, chart and alert has something to show.
    Demo {
        #[command(flatten)]
        nats: serve::NatsArgs,
        /// Customers simulated.
        #[arg(long, default_value_t = 500)]
        customers: u64,
        /// PRNG seed (same seed, same day: the same events, stored once).
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Days of history backfilled first.
        #[arg(long, default_value_t = 180)]
        history_days: u32,
        /// Live events per second after the backfill (0 = backfill only).
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        /// Stop the live tail after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration_secs: Option<u64>,
        /// Write the history straight into this data directory (through the store's append
        /// path, no NATS, no live tail): grows a store of millions of events for benchmarks.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Reset the read-model projections and fold the whole log again.
    Rebuild {
        #[command(flatten)]
        data: DataArgs,
    },
    /// Print a read model (satisfaction, loyalty, churn warning) of one customer, or the
    /// population figures, at any instant (`--as-of`) on either time axis.
    Query {
        #[command(flatten)]
        data: DataArgs,
        /// The customer (omit for the population).
        #[arg(long)]
        customer: Option<String>,
        /// Which read model.
        #[arg(long, value_enum, default_value_t = models::Model::All)]
        model: models::Model,
        /// The instant (RFC 3339 or YYYY-MM-DD; default now).
        #[arg(long)]
        as_of: Option<Timestamp>,
        /// business: what had happened by then; knowledge: what the ledger knew then.
        #[arg(long, value_enum, default_value_t = models::AxisArg::Business)]
        axis: models::AxisArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        rules: RulesArgs,
    },
    /// Fit the BG/NBD churn model on the population at `--as-of` and record it as a
    /// `ModelFitted` event (assessments name the version they used). Offline on the data
    /// directory, or `--remote` on a running ledger.
    Fit {
        #[command(flatten)]
        data: DataArgs,
        /// Calibration end (RFC 3339 or YYYY-MM-DD; default now).
        #[arg(long)]
        as_of: Option<Timestamp>,
        /// Time unit of the model.
        #[arg(long, value_enum, default_value_t = models::UnitArg::Weeks)]
        unit: models::UnitArg,
        /// Print the fit without recording it.
        #[arg(long)]
        dry_run: bool,
        /// The count model (the spend model is fitted with either). Offline default `bgnbd`;
        /// with `--remote` the one the ledger's rules select (`churn.count_model`).
        #[arg(long, value_enum)]
        model: Option<models::ModelArg>,
        /// Ask a running ledger over NATS (`<prefix>.model.fit`) instead of opening the data
        /// directory (which `serve` holds).
        #[arg(long)]
        remote: bool,
        #[command(flatten)]
        nats: serve::NatsArgs,
    },
    /// How well the churn model and the churn warnings predicted what happened: BG/NBD fitted
    /// on what had happened by `--calibration-end`, each buyer's warning evaluated then, both
    /// compared with the purchases up to `--holdout-end` (model fit by calibration frequency,
    /// holdout totals and tracking; precision, recall, lift and AUC of the warnings against
    /// recency and BG/NBD alone). Offline on the data directory; appends nothing.
    Evaluate {
        #[command(flatten)]
        data: DataArgs,
        /// Calibration end T1 (RFC 3339 or YYYY-MM-DD).
        #[arg(long)]
        calibration_end: Timestamp,
        /// Holdout end T2, after T1.
        #[arg(long)]
        holdout_end: Timestamp,
        /// Time unit of the model.
        #[arg(long, value_enum, default_value_t = models::UnitArg::Weeks)]
        unit: models::UnitArg,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Record the evaluation as a `ModelEvaluated` event (the model version, the periods and
        /// the summary figures), so auditors see how the model behind the warnings performed.
        #[arg(long, conflicts_with = "tune")]
        record: bool,
        #[command(flatten)]
        rules: RulesArgs,
        /// Instead of one evaluation: try the churn thresholds that a purchase history can
        /// tune (P(alive), overdue multiples, lost after, one-time horizon; 400 combinations
        /// around the defaults) on one fit, ranked by the ROC AUC of the churn score.
        #[arg(long)]
        tune: bool,
        /// With `--tune`: write the best rules (the `--rules` given, with the best churn
        /// thresholds) to this file, for `--rules`.
        #[arg(long, requires = "tune")]
        write_rules: Option<PathBuf>,
        /// Also write the plots (frequency.svg, tracking.svg, conditional.svg: FHL's figures
        /// 2–4, as on the dashboard's Models page) into this directory (created if missing).
        #[arg(long, conflicts_with = "tune")]
        svg: Option<PathBuf>,
        /// Ask a running ledger over NATS (`<prefix>.model.evaluate`) instead of opening the
        /// data directory (which `serve` holds). It evaluates under the rules it serves with;
        /// `--rules` applies to offline runs only.
        #[arg(long, conflicts_with = "tune")]
        remote: bool,
        #[command(flatten)]
        nats: serve::NatsArgs,
    },
    /// A running ledger as NATS sees it.
    Cluster {
        #[command(subcommand)]
        what: ClusterCommand,
    },
    /// Import a data set as events through the append path.
    Import {
        #[command(subcommand)]
        what: ImportCommand,
    },
    /// Write a deterministic synthetic JSON-lines file with duplicates, conflicts and invalid lines.
    Generate {
        /// Output file (`-` = standard output).
        #[arg(long)]
        out: PathBuf,
        /// Valid distinct events.
        #[arg(long, default_value_t = 10_000)]
        events: u64,
        /// Identical re-sends.
        #[arg(long, default_value_t = 0)]
        duplicates: u64,
        /// Same id, different content.
        #[arg(long, default_value_t = 0)]
        conflicts: u64,
        /// Invalid lines.
        #[arg(long, default_value_t = 0)]
        invalid: u64,
        /// Customers (default: events / 20).
        #[arg(long)]
        customers: Option<u64>,
        /// PRNG seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Business time of the first event.
        #[arg(long, default_value = "2024-01-01T00:00:00Z")]
        start: Timestamp,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Per partition: its owner (lease holder), feed head, touchpoints waiting for it, and on a
    /// NATS cluster each stream's and consumer's Raft leader and replicas in sync.
    Status {
        #[command(flatten)]
        nats: serve::NatsArgs,
        /// The ledger's partition count.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// One JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ImportCommand {
    /// The CDNOW purchase log (master or sample file) as purchase events.
    Cdnow {
        #[command(flatten)]
        data: DataArgs,
        /// `CDNOW_master.txt` or `CDNOW_sample.txt`.
        #[arg(long)]
        file: PathBuf,
        /// Events per atomic, flushed batch.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
}

/// The read models' rules.
#[derive(clap::Args, Debug)]
struct RulesArgs {
    /// A JSON file of rules (any subset, grouped as `satisfaction`, `loyalty`, `churn`,
    /// `population`; the rest keep their defaults; docs/read-models.md). Unknown names and
    /// out-of-range values are refused. Every process of a partitioned ledger needs the same.
    #[arg(long, env = "TOUCHLEDGER_RULES")]
    rules: Option<PathBuf>,
}

impl RulesArgs {
    fn load(&self) -> anyhow::Result<touchledger_domain::population::Rules> {
        let Some(path) = &self.rules else {
            return Ok(touchledger_domain::population::Rules::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("rules file {}: {e}", path.display()))?;
        touchledger_domain::population::Rules::from_json(&text)
            .map_err(|e| anyhow::anyhow!("rules file {}: {e}", path.display()))
    }
}

#[derive(clap::Args, Debug)]
struct DataArgs {
    /// Data directory of the ledger (created if missing).
    #[arg(long, env = "TOUCHLEDGER_DATA", default_value = "./data/ledger")]
    data: PathBuf,
    /// Store a checkpoint every N positions.
    #[arg(long, env = "TOUCHLEDGER_CHECKPOINT_INTERVAL", default_value_t = 1000)]
    checkpoint_interval: u64,
    /// Sled cache size in MiB (bounds memory).
    #[arg(long, env = "TOUCHLEDGER_CACHE_MIB", default_value_t = 256)]
    cache_mib: u64,
    /// Free space the store keeps on its filesystem, at least this many MiB (plus twice the
    /// newest sled snapshot): below it, writes are refused (`STORAGE_FULL`) before sled meets
    /// a full disk. 0 together with `--reserve-percent 0` switches the check off.
    #[arg(long, env = "TOUCHLEDGER_RESERVE_MIB", default_value_t = 256)]
    reserve_mib: u64,
    /// ... and at least this share of the filesystem, in percent.
    #[arg(long, env = "TOUCHLEDGER_RESERVE_PERCENT", default_value_t = 5.0)]
    reserve_percent: f64,
    /// Partition count P of the ledger in `--data` (fixed when it is created; 1 = an
    /// unpartitioned ledger in `--data` itself; P > 1 keeps partition n in `--data`/p<n>).
    #[arg(long, env = "TOUCHLEDGER_PARTITIONS", default_value_t = 1)]
    partitions: u32,
    /// Which partition a command on one store addresses (with `--partitions` > 1).
    #[arg(long)]
    partition: Option<u32>,
}

impl DataArgs {
    /// The store directory of partition `n` (the data directory itself when P = 1), after
    /// checking that the directory's layout is the one asked for.
    fn partition_dir(&self, n: u32) -> anyhow::Result<(PathBuf, PartitionId)> {
        let id = PartitionId::new(n, self.partitions).map_err(|e| anyhow::anyhow!(e))?;
        let root_is_ledger = self.data.join(touchledger_store::LEDGER_MARKER).exists();
        let has_partitions = self
            .data
            .join("p0")
            .join(touchledger_store::LEDGER_MARKER)
            .exists();
        if self.partitions == 1 {
            if has_partitions && !root_is_ledger {
                anyhow::bail!(
                    "{} holds a partitioned ledger (p0, p1, …): give --partitions P and --partition N",
                    self.data.display()
                );
            }
            return Ok((self.data.clone(), id));
        }
        if root_is_ledger {
            anyhow::bail!(
                "{} holds an unpartitioned ledger; its partition count cannot be changed in place (export, then re-append into a new ledger: docs/partitions.md)",
                self.data.display()
            );
        }
        Ok((self.data.join(format!("p{n}")), id))
    }

    /// The partition a `--remote` replay or export addresses (`None`: an unpartitioned ledger).
    fn remote_partition(&self) -> anyhow::Result<Option<u32>> {
        if self.partitions == 1 {
            self.single_partition()?;
            return Ok(None);
        }
        let n = self.single_partition()?;
        PartitionId::new(n, self.partitions).map_err(|e| anyhow::anyhow!(e))?;
        Ok(Some(n))
    }

    /// The one partition a single-store command addresses.
    fn single_partition(&self) -> anyhow::Result<u32> {
        match (self.partitions, self.partition) {
            (1, None | Some(0)) => Ok(0),
            (1, Some(n)) => anyhow::bail!("--partition {n} without --partitions"),
            (p, None) => anyhow::bail!("the ledger has {p} partitions: say which with --partition"),
            (_, Some(n)) => Ok(n),
        }
    }
}

/// Replay filters.
#[derive(clap::Args, Debug)]
pub struct FilterArgs {
    /// Only this customer.
    #[arg(long)]
    pub customer: Option<String>,
    /// Only this kind (purchase, complaint, callback, survey, retraction, model_fitted, churn_risk_assessed).
    #[arg(long)]
    pub kind: Option<EventKind>,
    /// First position (inclusive).
    #[arg(long, default_value_t = 1)]
    pub from_position: u64,
    /// Last position (inclusive).
    #[arg(long)]
    pub to_position: Option<u64>,
    /// Only events that occurred at or after this instant (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    pub since: Option<Timestamp>,
    /// Only events that occurred before this instant.
    #[arg(long)]
    pub until: Option<Timestamp>,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
/// File formats.
pub enum Format {
    /// JSON lines.
    Jsonl,
    /// CSV with a header row.
    Csv,
}

/// Run the CLI with `args` (including the program name). Returns the exit code.
pub fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let args = match expand_config(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = writeln!(err, "touchledger: error: {e}");
            return EXIT_USAGE;
        }
    };
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let text = e.render().to_string();
            let _ = if e.use_stderr() {
                err.write_all(text.as_bytes())
            } else {
                out.write_all(text.as_bytes())
            };
            return code;
        }
    };
    match execute(cli.command, out) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "touchledger: error: {e:#}");
            match e.downcast_ref::<StoreError>() {
                Some(
                    StoreError::Locked { .. }
                    | StoreError::FormatMismatch { .. }
                    | StoreError::PartitionMismatch { .. }
                    | StoreError::NotALedger { .. }
                    | StoreError::Unsupported { .. },
                ) => EXIT_DATA_DIR,
                Some(StoreError::Damaged { .. } | StoreError::Corrupt { .. }) => EXIT_VERIFY_FAILED,
                Some(StoreError::StorageFull { .. }) => EXIT_STORAGE_FULL,
                _ => EXIT_FAILURE,
            }
        }
    }
}

fn open(d: &DataArgs) -> anyhow::Result<SledStore> {
    open_partition(d, d.single_partition()?)
}

/// Open partition `n`'s store (the ledger's only store when P = 1).
fn open_partition(d: &DataArgs, n: u32) -> anyhow::Result<SledStore> {
    let (dir, id) = d.partition_dir(n)?;
    let mut cfg = StoreConfig::new(dir);
    cfg.partition = id;
    cfg.checkpoint_interval = d.checkpoint_interval;
    cfg.cache_capacity = d.cache_mib * 1024 * 1024;
    cfg.space_reserve = if d.reserve_mib == 0 && d.reserve_percent <= 0.0 {
        touchledger_store::SpaceReserve::NONE
    } else {
        touchledger_store::SpaceReserve {
            min_bytes: d.reserve_mib.saturating_mul(1024 * 1024),
            percent: d.reserve_percent,
            ..touchledger_store::SpaceReserve::default()
        }
    };
    Ok(SledStore::open(cfg)?)
}

/// `all`, `3`, `0-3`, `1,5,7`, `0-1,6`: the partitions a process owns (sorted, distinct).
fn parse_own(spec: &str, partitions: u32) -> anyhow::Result<Vec<u32>> {
    if spec.trim() == "all" {
        return Ok((0..partitions).collect());
    }
    let mut owned = std::collections::BTreeSet::new();
    for part in spec.split(',').map(str::trim) {
        let num = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| anyhow::anyhow!("--own {spec:?}: {t:?} is not a partition number"))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if a > b || b >= partitions {
            anyhow::bail!(
                "--own {spec:?}: {part} is not within partitions 0-{}",
                partitions - 1
            );
        }
        owned.extend(a..=b);
    }
    Ok(owned.into_iter().collect())
}

/// Verify one store (one partition's when `label` names it) and print the verdict.
fn verify_store(
    store: &SledStore,
    checkpoint: Option<audit::CheckpointArg>,
    label: &str,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    if let Some(c) = checkpoint {
        match store.get(c.position)? {
            None => {
                writeln!(
                    out,
                    "{label}FAILED at position {}: the ledger ends at {}, before the checkpoint",
                    c.position,
                    store.head().position
                )?;
                return Ok(EXIT_VERIFY_FAILED);
            }
            Some(r) if r.hash != c.hash => {
                writeln!(
                    out,
                    "{label}FAILED at position {}: hash {} differs from the checkpoint's {}",
                    c.position, r.hash, c.hash
                )?;
                return Ok(EXIT_VERIFY_FAILED);
            }
            Some(_) => {}
        }
    }
    match store.verify()? {
        VerifyReport::Ok {
            events,
            head,
            checkpoints,
            customers,
        } => {
            writeln!(
                out,
                "{label}OK: {events} events, {customers} customers, {checkpoints} checkpoints; head position {} hash {}",
                head.position, head.hash
            )?;
            if let Some(c) = checkpoint {
                writeln!(
                    out,
                    "{label}checkpoint {}:{} matches: the history up to it is unchanged",
                    c.position, c.hash
                )?;
            }
            Ok(EXIT_OK)
        }
        VerifyReport::Failed { position, problem } => {
            writeln!(out, "{label}FAILED at position {position}: {problem}")?;
            Ok(EXIT_VERIFY_FAILED)
        }
    }
}

/// `verify` of a partitioned ledger: every partition whose store is in the data directory,
/// each checked on its own chain; partitions kept on other machines are listed as absent.
/// A global checkpoint file (the text published on `<prefix>.ledger.global_checkpoint`),
/// parsed and its hash line checked; the error says why not.
fn read_global(path: &std::path::Path) -> Result<touchledger_store::GlobalCheckpoint, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    touchledger_store::GlobalCheckpoint::parse(&text)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn verify_partitions(
    data: &DataArgs,
    global: Option<&std::path::Path>,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let global = match global.map(read_global).transpose() {
        Ok(Some(g)) if g.heads.len() != data.partitions as usize => {
            writeln!(
                out,
                "FAILED: the global checkpoint has {} partitions, the ledger {}",
                g.heads.len(),
                data.partitions
            )?;
            return Ok(EXIT_VERIFY_FAILED);
        }
        Ok(g) => g,
        Err(msg) => {
            writeln!(out, "FAILED: {msg}")?;
            return Ok(EXIT_VERIFY_FAILED);
        }
    };
    let mut code = EXIT_OK;
    let mut present = 0;
    for n in 0..data.partitions {
        let (dir, _) = data.partition_dir(n)?;
        if !dir.join(touchledger_store::LEDGER_MARKER).exists() {
            writeln!(out, "partition {n}: no store in {}", dir.display())?;
            continue;
        }
        present += 1;
        let label = format!("partition {n}: ");
        let checkpoint = global.as_ref().and_then(|g| {
            let (position, hash) = g.heads[n as usize];
            (position > 0).then_some(audit::CheckpointArg { position, hash })
        });
        let c = verify_store(&open_partition(data, n)?, checkpoint, &label, out)?;
        if code == EXIT_OK {
            code = c;
        }
    }
    if let Some(g) = &global
        && code == EXIT_OK
    {
        writeln!(
            out,
            "global checkpoint {} matches every partition here",
            g.hash()
        )?;
    }
    if present == 0 {
        anyhow::bail!(
            "{} holds no partition of a ledger of {} partitions",
            data.data.display(),
            data.partitions
        );
    }
    Ok(code)
}

fn execute(cmd: Command, out: &mut dyn Write) -> anyhow::Result<i32> {
    match cmd {
        Command::Serve {
            data,
            nats,
            rules,
            batch,
            fetch_wait_ms,
            ack_wait_secs,
            sweep_secs,
            refit_hours,
            http_addr,
            http_token,
            shutdown_secs,
            own,
            global_checkpoint_secs,
            lease_ttl_secs,
            replicas,
        } => {
            let timing = serve::Timing {
                fetch_wait: std::time::Duration::from_millis(fetch_wait_ms),
                ack_wait: std::time::Duration::from_secs(ack_wait_secs.max(1)),
            };
            let views = serve::ViewTiming {
                sweep: std::time::Duration::from_secs(sweep_secs.max(1)),
                refit: (refit_hours > 0)
                    .then(|| std::time::Duration::from_secs(refit_hours * 3600)),
                http_addr,
                http_token,
                shutdown: std::time::Duration::from_secs(shutdown_secs.max(1)),
                rules: rules.load()?,
            };
            if data.partitions > 1 {
                let auto = own.trim() == "auto";
                let owned = if auto {
                    (0..data.partitions).collect()
                } else {
                    parse_own(&own, data.partitions)?
                };
                let stores = owned
                    .iter()
                    .map(|&n| open_partition(&data, n))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                serve::serve_partitions(
                    stores,
                    &nats,
                    batch,
                    timing,
                    views,
                    serve::PartitionRun {
                        global_every: std::time::Duration::from_secs(global_checkpoint_secs.max(1)),
                        lease_ttl: std::time::Duration::from_secs(lease_ttl_secs.max(1)),
                        auto,
                        replicas: replicas.max(1),
                    },
                )?;
            } else {
                let store = open(&data)?;
                serve::serve(store, &nats, batch, timing, views)?;
            }
            Ok(EXIT_OK)
        }
        Command::Append {
            data,
            file,
            batch,
            json,
        } => append(&data, &file, batch.max(1), json, out),
        Command::Restore {
            data,
            from,
            format,
            checkpoint,
        } => {
            let store = open(&data)?;
            audit::restore(&store, &from, format, checkpoint, out)
        }
        Command::Replay {
            data,
            filter,
            format,
            remote,
            nats,
        } => {
            if remote {
                // One customer's history lives in one partition: `--customer` alone finds it.
                let partition = match (&filter.customer, data.partitions, data.partition) {
                    (Some(c), p, None) if p > 1 => Some(partition_of(c, p)),
                    _ => data.remote_partition()?,
                };
                remote::replay(&nats, &filter, format, partition, out)
            } else {
                replay(&data, &filter, format, out)
            }
        }
        Command::Publish {
            nats,
            file,
            format,
            sync,
            in_flight,
            json,
        } => remote::publish(&nats, &file, format, sync, in_flight, json, out),
        Command::Tail {
            nats,
            kind,
            customer,
            count,
        } => remote::tail(&nats, kind, customer, count, out),
        Command::Verify {
            data,
            checkpoint,
            export,
            format,
            global,
        } => {
            if let Some(file) = export {
                let global = match global.as_deref().map(read_global).transpose() {
                    Ok(g) => g,
                    Err(msg) => {
                        writeln!(out, "FAILED: {msg}")?;
                        return Ok(EXIT_VERIFY_FAILED);
                    }
                };
                let pin = match (&global, checkpoint) {
                    (Some(_), Some(_)) => {
                        anyhow::bail!("--checkpoint and --global: give one of them")
                    }
                    (Some(g), None) => audit::Pin::Global(g),
                    (None, Some(c)) => audit::Pin::Checkpoint(c),
                    (None, None) => audit::Pin::None,
                };
                let check = audit::check_export(&file, format, pin)?;
                return audit::report_export(&check, pin, out);
            }
            if data.partitions > 1 && data.partition.is_none() {
                if checkpoint.is_some() {
                    anyhow::bail!("--checkpoint names one partition's position: add --partition");
                }
                return verify_partitions(&data, global.as_deref(), out);
            }
            if global.is_some() {
                anyhow::bail!(
                    "--global checks a partitioned ledger: give --partitions (and no --partition)"
                );
            }
            verify_store(&open(&data)?, checkpoint, "", out)
        }
        Command::Stats { data, json } => {
            let s = open(&data)?.stats()?;
            let view = StatsView {
                head_position: s.head.position,
                head_hash: s.head.hash.to_hex(),
                head_recorded_at: (s.head.position > 0).then_some(s.head.recorded_at),
                events_by_kind: s
                    .by_kind
                    .iter()
                    .map(|(k, n)| (k.as_str().to_owned(), *n))
                    .collect(),
                customers: s.customers,
                checkpoints: s.checkpoints,
                rejections_by_code: s.rejections.iter().cloned().collect(),
                size_on_disk_bytes: s.size_on_disk,
            };
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&view)?)?;
            } else {
                writeln!(out, "events        {}", view.head_position)?;
                for (k, n) in &view.events_by_kind {
                    writeln!(out, "  {k:<20} {n}")?;
                }
                writeln!(out, "customers     {}", view.customers)?;
                writeln!(out, "checkpoints   {}", view.checkpoints)?;
                writeln!(
                    out,
                    "rejections    {}",
                    view.rejections_by_code.values().sum::<u64>()
                )?;
                for (c, n) in &view.rejections_by_code {
                    writeln!(out, "  {c:<28} {n}")?;
                }
                writeln!(out, "head hash     {}", view.head_hash)?;
                writeln!(out, "disk bytes    {}", view.size_on_disk_bytes)?;
            }
            Ok(EXIT_OK)
        }
        Command::Rejections { data } => {
            let store = open(&data)?;
            let mut w = BufWriter::new(out);
            for r in store.rejections() {
                let r = r?;
                let (raw_utf8, raw_hex) = match String::from_utf8(r.raw.clone()) {
                    Ok(s) => (Some(s), None),
                    Err(_) => (None, Some(hex::encode(&r.raw))),
                };
                let line = RejectionView {
                    sequence: r.sequence,
                    code: r.rejection.code.as_str(),
                    field: &r.rejection.field,
                    reason: &r.rejection.reason,
                    received_at: r.received_at,
                    origin: &r.origin,
                    event_id: &r.event_id,
                    customer_id: &r.customer_id,
                    raw_utf8,
                    raw_hex,
                };
                serde_json::to_writer(&mut w, &line)?;
                w.write_all(b"\n")?;
            }
            w.flush()?;
            Ok(EXIT_OK)
        }
        Command::Project {
            projections,
            nats,
            batch,
        } => {
            serve::project(&projections, &nats, batch)?;
            Ok(EXIT_OK)
        }
        Command::Export {
            data,
            filter,
            format,
            out: path,
            remote,
            nats,
        } => {
            let to_stdout = path.as_os_str() == "-";
            let mut file: Box<dyn Write> = if to_stdout {
                Box::new(&mut *out)
            } else {
                Box::new(
                    File::create(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )
            };
            let code = if remote && data.partitions > 1 && data.partition.is_none() {
                remote::export_partitions(&nats, &filter, format, data.partitions, &mut *file)?
            } else if remote {
                remote::replay(&nats, &filter, format, data.remote_partition()?, &mut *file)?
            } else if data.partitions > 1 && data.partition.is_none() {
                export_partitions(&data, &filter, format, &mut *file)?
            } else {
                replay(&data, &filter, format, &mut *file)?
            };
            drop(file);
            if !to_stdout {
                File::open(&path)?.sync_all()?;
                writeln!(out, "exported to {}", path.display())?;
            }
            Ok(code)
        }
        Command::Demo {
            nats,
            customers,
            seed,
            history_days,
            rate,
            duration_secs,
            data,
        } => {
            let spec = demo::DemoSpec {
                customers: customers.max(1),
                seed,
                history_days,
                rate,
                duration: duration_secs.map(std::time::Duration::from_secs),
            };
            match data {
                Some(dir) => demo::backfill_store(
                    &open(&DataArgs {
                        data: dir,
                        checkpoint_interval: 1000,
                        cache_mib: 256,
                        reserve_mib: 256,
                        reserve_percent: 5.0,
                        partitions: 1,
                        partition: None,
                    })?,
                    &spec,
                    1000,
                    out,
                ),
                None => demo::demo(&nats, &spec, out),
            }
        }
        Command::Rebuild { data } => {
            models::rebuild(&open(&data)?, out)?;
            Ok(EXIT_OK)
        }
        Command::Query {
            data,
            customer,
            model,
            as_of,
            axis,
            json,
            rules,
        } => models::query(
            &open(&data)?,
            &rules.load()?,
            customer.as_deref(),
            model,
            models::as_of(as_of, axis),
            json,
            out,
        ),
        Command::Fit {
            remote: true,
            nats,
            as_of,
            unit,
            model,
            dry_run,
            ..
        } => remote::fit(
            &nats,
            as_of,
            unit.into(),
            model.map(Into::into),
            dry_run,
            out,
        ),
        Command::Fit {
            data,
            as_of,
            unit,
            model,
            dry_run,
            ..
        } => models::fit(
            &open(&data)?,
            as_of.unwrap_or_else(Timestamp::now),
            unit.into(),
            model.map_or(CountKind::BgNbd, Into::into),
            dry_run,
            out,
        ),
        Command::Evaluate {
            data,
            calibration_end,
            holdout_end,
            unit,
            json,
            record,
            rules,
            tune,
            write_rules,
            svg,
            remote,
            nats,
        } => {
            let periods = (calibration_end, holdout_end);
            let output = models::EvaluateOutput {
                json,
                record,
                svg: svg.as_deref(),
            };
            if remote {
                return remote::evaluate(&nats, periods, unit.into(), output, out);
            }
            let store = open(&data)?;
            let rules = rules.load()?;
            if tune {
                models::tune(
                    &store,
                    &rules,
                    periods,
                    unit.into(),
                    json,
                    write_rules.as_deref(),
                    out,
                )
            } else {
                models::evaluate(&store, &rules, periods, unit.into(), output, out)
            }
        }
        Command::Cluster {
            what:
                ClusterCommand::Status {
                    nats,
                    partitions,
                    json,
                },
        } => remote::cluster_status(&nats, partitions.max(1), json, out),
        Command::Import {
            what: ImportCommand::Cdnow { data, file, batch },
        } => models::import_cdnow(&open(&data)?, &file, batch.max(1), out),
        Command::Generate {
            out: path,
            events,
            duplicates,
            conflicts,
            invalid,
            customers,
            seed,
            start,
        } => {
            let spec = generate::GenSpec {
                events,
                duplicates,
                conflicts,
                invalid,
                customers: customers.unwrap_or((events / 20).max(1)),
                seed,
                start,
            };
            let summary = if path.as_os_str() == "-" {
                let mut w = BufWriter::new(&mut *out);
                let s = generate::generate(&spec, &mut w)?;
                w.flush()?;
                s
            } else {
                let f = File::create(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                let mut w = BufWriter::new(f);
                let s = generate::generate(&spec, &mut w)?;
                w.flush()?;
                w.get_ref().sync_all()?;
                writeln!(
                    out,
                    "wrote {} lines to {}: {} events, {} duplicates, {} conflicts, {} invalid",
                    s.lines,
                    path.display(),
                    s.events,
                    s.duplicates,
                    s.conflicts,
                    s.invalid
                )?;
                s
            };
            let _ = summary;
            Ok(EXIT_OK)
        }
    }
}

#[derive(Serialize)]
struct StatsView {
    head_position: u64,
    head_hash: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    head_recorded_at: Option<Timestamp>,
    events_by_kind: BTreeMap<String, u64>,
    customers: u64,
    checkpoints: u64,
    rejections_by_code: BTreeMap<String, u64>,
    size_on_disk_bytes: u64,
}

#[derive(Serialize)]
struct RejectionView<'a> {
    sequence: u64,
    code: &'a str,
    field: &'a str,
    reason: &'a str,
    received_at: Timestamp,
    origin: &'a str,
    event_id: &'a str,
    customer_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_utf8: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_hex: Option<String>,
}

/// The summary of an `append` run.
#[derive(Serialize, serde::Deserialize, Default, Debug, Clone, PartialEq, Eq)]
pub struct AppendSummary {
    /// Input lines read (blank lines are skipped and not counted).
    pub lines: u64,
    /// Newly stored.
    pub appended: u64,
    /// Already stored, identical.
    pub duplicate: u64,
    /// Expected-version mismatches (not possible from a file, kept for completeness).
    pub version_conflict: u64,
    /// Rejected, total.
    pub rejected: u64,
    /// Rejected, per code.
    pub rejected_by_code: BTreeMap<String, u64>,
    /// Head position after the run.
    pub head_position: u64,
    /// Head hash after the run.
    pub head_hash: String,
}

fn append(
    data: &DataArgs,
    file: &PathBuf,
    batch: usize,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let store = open(data)?;
    let reader: Box<dyn Read> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(File::open(file).with_context(|| format!("cannot open {}", file.display()))?)
    };
    let name = file.display().to_string();
    let mut summary = AppendSummary::default();
    let mut items: Vec<AppendItem> = Vec::with_capacity(batch);
    let mut undecodable = Vec::new();
    let flush = |items: &mut Vec<AppendItem>,
                 undecodable: &mut Vec<touchledger_store::RejectionRecord>,
                 summary: &mut AppendSummary|
     -> anyhow::Result<()> {
        // Keep input order in the rejections record: undecodable lines of this chunk first is
        // fine, each carries its line number in `origin`.
        let codes: Vec<&'static str> = undecodable
            .iter()
            .map(|r| r.rejection.code.as_str())
            .collect();
        // Counted only once durable, so that a stopped run reports exactly what was written.
        store.record_rejections(std::mem::take(undecodable))?;
        for code in codes {
            *summary.rejected_by_code.entry(code.to_owned()).or_default() += 1;
            summary.rejected += 1;
        }
        for o in store.append(std::mem::take(items))? {
            match o {
                AppendOutcome::Appended { .. } => summary.appended += 1,
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
        Ok(())
    };
    let mut line = Vec::new();
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut lineno = 0u64;
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading {name}"))?
            == 0
        {
            break;
        }
        lineno += 1;
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        summary.lines += 1;
        let origin = format!("file:{name}:{lineno}");
        match touchledger_domain::json::parse_event(trimmed) {
            Ok(event) => items.push(AppendItem {
                event,
                expected_customer_version: None,
                raw: Some(trimmed.to_vec()),
                origin,
            }),
            Err(r) => {
                let mut rec = rejection_record(r.code, r.reason, trimmed.to_vec(), origin);
                rec.rejection.field = r.field;
                undecodable.push(rec);
            }
        }
        if items.len() + undecodable.len() >= batch
            && let Err(e) = flush(&mut items, &mut undecodable, &mut summary)
        {
            return stopped(&store, e, &name, lineno, summary, json, out);
        }
    }
    if let Err(e) = flush(&mut items, &mut undecodable, &mut summary) {
        return stopped(&store, e, &name, lineno, summary, json, out);
    }
    let head = store.head();
    summary.head_position = head.position;
    summary.head_hash = head.hash.to_hex();
    print_summary(&summary, &name, json, out)?;
    Ok(if summary.rejected > 0 {
        EXIT_REJECTED
    } else {
        EXIT_OK
    })
}

/// An append that stopped on a store error: report what is durable (every batch before the
/// failed one), then the error.
fn stopped(
    store: &SledStore,
    e: anyhow::Error,
    name: &str,
    lineno: u64,
    mut summary: AppendSummary,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let head = store.head();
    summary.head_position = head.position;
    summary.head_hash = head.hash.to_hex();
    print_summary(&summary, name, json, out)?;
    Err(e.context(format!(
        "append stopped at or before line {lineno} of {name}; everything counted above is durable (head {}), the rest was not written",
        head.position
    )))
}

fn print_summary(
    summary: &AppendSummary,
    name: &str,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
    } else {
        writeln!(out, "read {} lines from {name}", summary.lines)?;
        writeln!(out, "appended          {}", summary.appended)?;
        writeln!(out, "duplicate         {}", summary.duplicate)?;
        writeln!(out, "version_conflict  {}", summary.version_conflict)?;
        writeln!(out, "rejected          {}", summary.rejected)?;
        for (code, n) in &summary.rejected_by_code {
            writeln!(out, "  {code:<28} {n}")?;
        }
        writeln!(
            out,
            "head              {} {}",
            summary.head_position, summary.head_hash
        )?;
    }
    Ok(())
}

#[derive(Serialize)]
struct ReplayLine<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<u32>,
    position: u64,
    customer_version: u64,
    recorded_at: Timestamp,
    hash: String,
    prev_hash: String,
    event: &'a touchledger_domain::Event,
}

const CSV_COLUMNS: [&str; 11] = [
    "position",
    "customer_version",
    "recorded_at",
    "hash",
    "prev_hash",
    "event_id",
    "customer_id",
    "kind",
    "occurred_at",
    "source",
    "event_json",
];

/// Writes replayed records as JSON lines or CSV (the same shape offline and remote). An export
/// of several partitions carries each record's partition (a leading field or column).
pub(crate) struct ReplayWriter<'w> {
    sink: Sink<'w>,
    /// The partition of the records written now, in a partitioned export.
    partition: Option<u32>,
}

enum Sink<'w> {
    Jsonl(BufWriter<&'w mut dyn Write>),
    /// The CSV writer, and whether its header is written yet (it names a `partition` column
    /// only in a partitioned export).
    Csv(Box<csv::Writer<BufWriter<&'w mut dyn Write>>>, bool),
}

impl<'w> ReplayWriter<'w> {
    pub(crate) fn new(format: Format, out: &'w mut dyn Write) -> anyhow::Result<Self> {
        let w = BufWriter::with_capacity(1 << 16, out);
        let sink = match format {
            Format::Jsonl => Sink::Jsonl(w),
            Format::Csv => Sink::Csv(Box::new(csv::Writer::from_writer(w)), false),
        };
        Ok(ReplayWriter {
            sink,
            partition: None,
        })
    }

    /// The same writer for an export of several partitions (see [`Self::set_partition`]).
    pub(crate) fn partitioned(mut self) -> Self {
        self.partition = Some(0);
        self
    }

    /// The partition of the records written from now on.
    pub(crate) fn set_partition(&mut self, n: u32) {
        self.partition = Some(n);
    }

    fn header(&mut self) -> anyhow::Result<()> {
        if let Sink::Csv(csv, written @ false) = &mut self.sink {
            if self.partition.is_some() {
                csv.write_field("partition")?;
            }
            csv.write_record(CSV_COLUMNS)?;
            *written = true;
        }
        Ok(())
    }

    pub(crate) fn write(
        &mut self,
        position: u64,
        customer_version: u64,
        recorded_at: Timestamp,
        hash: &[u8],
        prev_hash: &[u8],
        event: &touchledger_domain::Event,
    ) -> anyhow::Result<()> {
        self.header()?;
        let partition = self.partition;
        match &mut self.sink {
            Sink::Jsonl(w) => {
                let line = ReplayLine {
                    partition,
                    position,
                    customer_version,
                    recorded_at,
                    hash: hex::encode(hash),
                    prev_hash: hex::encode(prev_hash),
                    event,
                };
                serde_json::to_writer(&mut *w, &line)?;
                w.write_all(b"\n")?;
            }
            Sink::Csv(csv, _) => {
                if let Some(n) = partition {
                    csv.write_field(n.to_string())?;
                }
                csv.write_record([
                    position.to_string(),
                    customer_version.to_string(),
                    recorded_at.to_string(),
                    hex::encode(hash),
                    hex::encode(prev_hash),
                    event.event_id.clone(),
                    event.customer_id.clone(),
                    event.kind().as_str().to_owned(),
                    event.occurred_at.to_string(),
                    event.source.clone(),
                    serde_json::to_string(event)?,
                ])?
            }
        }
        Ok(())
    }

    /// One record read from a store.
    fn write_committed(&mut self, c: &Committed) -> anyhow::Result<()> {
        self.write(
            c.position,
            c.customer_version,
            c.recorded_at,
            &c.hash.0,
            &c.prev_hash.0,
            &c.event,
        )
    }

    pub(crate) fn flush(&mut self) -> anyhow::Result<()> {
        match &mut self.sink {
            Sink::Jsonl(w) => w.flush()?,
            Sink::Csv(csv, _) => csv.flush()?,
        }
        Ok(())
    }

    pub(crate) fn finish(mut self) -> anyhow::Result<()> {
        // An export of nothing still has its CSV header.
        self.header()?;
        self.flush()
    }
}

impl FilterArgs {
    pub(crate) fn to_filter(&self) -> ReadFilter {
        ReadFilter {
            from_position: self.from_position,
            to_position: self.to_position,
            customer: self.customer.clone(),
            kind: self.kind,
            occurred_since: self.since,
            occurred_until: self.until,
        }
    }
}

fn replay(
    data: &DataArgs,
    f: &FilterArgs,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let store = open(data)?;
    let mut w = ReplayWriter::new(format, out)?;
    for c in store.read(&f.to_filter()) {
        w.write_committed(&c?)?;
    }
    w.finish()?;
    Ok(EXIT_OK)
}

/// Every partition of a partitioned ledger into one file, partition by partition, each line
/// carrying its partition (`verify --export` checks each partition's chain from it). Every
/// partition must be in this data directory: a partial export could not be checked against a
/// global checkpoint (export partitions kept elsewhere one by one with `--partition`).
fn export_partitions(
    data: &DataArgs,
    f: &FilterArgs,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    for n in 0..data.partitions {
        let (dir, _) = data.partition_dir(n)?;
        if !dir.join(touchledger_store::LEDGER_MARKER).exists() {
            anyhow::bail!(
                "partition {n} has no store in {}: export the partitions kept elsewhere with --partition",
                dir.display()
            );
        }
    }
    let mut w = ReplayWriter::new(format, out)?.partitioned();
    for n in 0..data.partitions {
        let store = open_partition(data, n)?;
        w.set_partition(n);
        for c in store.read(&f.to_filter()) {
            w.write_committed(&c?)?;
        }
    }
    w.finish()?;
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_partitions_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_own("all", 4).expect("all"), vec![0, 1, 2, 3]);
        assert_eq!(parse_own("2", 4).expect("one"), vec![2]);
        assert_eq!(parse_own("0-1, 3", 4).expect("mixed"), vec![0, 1, 3]);
        assert_eq!(parse_own("3,1-2,1", 8).expect("dupes"), vec![1, 2, 3]);
        for bad in ["4", "2-1", "x", "0-9", "", "1,"] {
            assert!(parse_own(bad, 4).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn config_file_fills_in_what_flags_do_not_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ledger.toml");
        std::fs::write(
            &file,
            "nats_url = \"nats://10.1.2.3:4222\"\nbatch = 123\nprefix = \"acme\"\n",
        )
        .expect("write");
        let f = file.to_str().expect("utf8");
        let args: Vec<OsString> = [
            "touchledger",
            "serve",
            "--config",
            f,
            "--prefix",
            "flagwins",
        ]
        .map(Into::into)
        .to_vec();
        let expanded: Vec<String> = expand_config(args)
            .expect("expands")
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let cli = Cli::try_parse_from(&expanded).expect("parses");
        match cli.command {
            Command::Serve { nats, batch, .. } => {
                assert_eq!(nats.nats_url, "nats://10.1.2.3:4222");
                assert_eq!(nats.prefix, "flagwins");
                assert_eq!(batch, 123);
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(&file, "natsurl = 1\n").expect("write");
        let args: Vec<OsString> = ["touchledger", "serve", "--config", f]
            .map(Into::into)
            .to_vec();
        assert!(
            expand_config(args)
                .expect_err("unknown key")
                .contains("natsurl")
        );
    }
}
