//! The read-model commands: `rebuild`, `query`, `fit` and `import cdnow`.
//!
//! Offline commands open the data directory themselves (so not while `serve` holds it). Before
//! reading, the projections are brought up to the head of the log, so a query always reflects
//! every committed event.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use touchledger_domain::count::CountKind;
use touchledger_domain::facts::{AsOf, Axis};
use touchledger_domain::population::{CustomerViews, PopulationView, Rules};
use touchledger_domain::{Event, Payload, Purchase, TimeUnit, Timestamp};
use touchledger_projector::{Opened, Projector, ReadModels};
use touchledger_store::{AppendItem, AppendOutcome, EventStore, SledStore};

/// Open the three projectors (resetting any whose version changed) and fold the log up to its
/// head. Returns the projectors and the number of events folded.
pub fn caught_up(
    store: &SledStore,
    out: Option<&mut dyn Write>,
) -> anyhow::Result<(Vec<Projector>, u64)> {
    let mut projectors = Vec::new();
    let mut notes = Vec::new();
    for (p, opened) in touchledger_projector::open_all(store)? {
        if let Opened::Reset { reason } = &opened
            && reason != "new"
        {
            notes.push(format!(
                "projection {} reset ({reason}); rebuilding",
                p.spec().name
            ));
        }
        projectors.push(p);
    }
    if let Some(out) = out {
        for n in notes {
            writeln!(out, "{n}")?;
        }
    }
    let n = touchledger_projector::catch_up(store, &mut projectors, 10_000)?;
    Ok((projectors, n))
}

/// `touchledger rebuild`: reset the projections and fold the whole log again.
pub fn rebuild(store: &SledStore, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut projectors = Vec::new();
    for (mut p, _) in touchledger_projector::open_all(store)? {
        p.reset()?;
        projectors.push(p);
    }
    let t = Instant::now();
    let n = touchledger_projector::catch_up(store, &mut projectors, 10_000)?;
    let secs = t.elapsed().as_secs_f64();
    writeln!(
        out,
        "rebuilt {} projections from {n} events in {secs:.2} s ({:.0} events/s)",
        projectors.len(),
        n as f64 / secs.max(1e-9)
    )?;
    for p in &projectors {
        writeln!(out, "  {:<14} checkpoint {}", p.spec().name, p.checkpoint())?;
    }
    Ok(())
}

/// Which read model `query` prints.
#[derive(Copy, Clone, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum Model {
    /// All three.
    All,
    /// Satisfaction.
    Satisfaction,
    /// Loyalty.
    Loyalty,
    /// Churn warning.
    Churn,
}

/// `touchledger query`.
pub fn query(
    store: &SledStore,
    rules: &Rules,
    customer: Option<&str>,
    model: Model,
    as_of: AsOf,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    caught_up(store, None)?;
    let reads = ReadModels::open(store, rules.clone())?;
    match customer {
        Some(id) => {
            let Some(v) = reads.customer(id, as_of)? else {
                writeln!(
                    out,
                    "no touchpoints of customer {id:?} at {} ({:?} axis)",
                    as_of.at, as_of.axis
                )?;
                return Ok(crate::EXIT_FAILURE);
            };
            let ranks = if matches!(model, Model::All | Model::Loyalty) {
                reads.ranks(id, as_of)?
            } else {
                None
            };
            if json {
                let value = match model {
                    Model::All => {
                        let mut all = serde_json::to_value(&v)?;
                        all["ranks"] = serde_json::to_value(&ranks)?;
                        all
                    }
                    Model::Satisfaction => serde_json::to_value(&v.satisfaction)?,
                    Model::Loyalty => serde_json::to_value(&v.loyalty)?,
                    Model::Churn => serde_json::to_value(&v.churn)?,
                };
                writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
            } else {
                print_customer(id, &v, model, out)?;
                if let Some(r) = ranks {
                    writeln!(
                        out,
                        "ranks           RFM {}{}{}, pyramid tier {}",
                        r.recency, r.frequency, r.monetary, r.tier
                    )?;
                }
            }
        }
        None => {
            let p = reads.population(as_of)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&p)?)?;
            } else {
                print_population(&p, out)?;
            }
        }
    }
    Ok(crate::EXIT_OK)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.digits$}"))
}

fn print_customer(
    id: &str,
    v: &CustomerViews,
    model: Model,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "customer {id} as of {} ({:?} axis)",
        v.churn.as_of.at, v.churn.as_of.axis
    )?;
    if matches!(model, Model::All | Model::Satisfaction) {
        let s = &v.satisfaction;
        writeln!(out, "satisfaction")?;
        match &s.last_c {
            Some(c) => writeln!(
                out,
                "  last C          {:.3} ({}) at {}",
                c.c, c.class, c.at
            )?,
            None => writeln!(out, "  last C          -")?,
        }
        writeln!(
            out,
            "  decayed C       {} (trend {:?})",
            opt(s.c_mean, 3),
            s.trend
        )?;
        writeln!(out, "  decayed CSAT    {}", opt(s.csat_mean, 2))?;
        writeln!(
            out,
            "  last NPS        {}",
            s.last_nps
                .map_or("-".into(), |(n, c)| format!("{n} ({c:?})"))
        )?;
        let c = &s.complaints;
        writeln!(
            out,
            "  complaints      {} total, {} open, {} recent, recovery {}",
            c.total,
            c.open,
            c.recent,
            opt(c.recovery_rate().map(|r| r * 100.0), 0) + "%"
        )?;
    }
    if matches!(model, Model::All | Model::Loyalty) {
        let l = &v.loyalty;
        let b = &l.behaviour;
        writeln!(out, "loyalty")?;
        writeln!(out, "  attitude        {}", opt(l.attitude, 2))?;
        writeln!(
            out,
            "  purchase-days   {} (x = {}), {} in the window, recency {} d",
            b.purchase_days,
            b.repeat_days,
            b.frequency_window,
            b.recency_days.map_or("-".into(), |r| r.to_string())
        )?;
        writeln!(out, "  monetary        {:?}", b.monetary)?;
        writeln!(out, "  dick & basu     {:?}", l.dick_basu)?;
        writeln!(out, "  knox            {:?}", l.knox)?;
        writeln!(out, "  lifecycle       {:?}", l.stage)?;
        for (t, s) in &l.stage_history {
            writeln!(out, "    {t}  {s:?}")?;
        }
        match &l.value {
            Some(c) => writeln!(
                out,
                "  CLV             {:.0} {} (minor units) over {} months at {}%/month ({:.2} purchase-days × {:.0} expected)",
                c.clv_minor,
                c.currency,
                c.horizon_months,
                c.monthly_discount * 100.0,
                c.expected_purchases,
                c.expected_average_value_minor
            )?,
            None => writeln!(out, "  CLV             -")?,
        }
    }
    if matches!(model, Model::All | Model::Churn) {
        let c = &v.churn;
        writeln!(out, "churn warning")?;
        writeln!(
            out,
            "  level           {:?} (score {:.2})",
            c.level, c.score
        )?;
        writeln!(
            out,
            "  probable cause  {}",
            c.probable_cause
                .map_or("unknown".into(), |x| format!("{x:?}"))
        )?;
        writeln!(
            out,
            "  since           {}",
            c.since.map_or("-".into(), |t| t.to_string())
        )?;
        writeln!(out, "  P(active)       {}", opt(c.p_active, 3))?;
        writeln!(out, "  P(alive)        {}", opt(c.p_alive, 3))?;
        writeln!(
            out,
            "  E[purchases]    {} in the next {} d",
            opt(c.expected_purchases, 2),
            c.expected_purchases_days
        )?;
        writeln!(
            out,
            "  model           {}",
            c.model_version.as_deref().unwrap_or("-")
        )?;
        writeln!(
            out,
            "  next purchase   {}",
            c.expected_next_purchase
                .map_or("-".into(), |t| t.to_string())
        )?;
        writeln!(
            out,
            "  value at risk   {} {}",
            c.value_at_risk_minor, c.currency
        )?;
        for r in &c.reasons {
            writeln!(
                out,
                "  - {:<17} {:<8} {} ({})",
                r.code,
                format!("{:?}", r.level),
                r.evidence,
                r.threshold
            )?;
        }
    }
    let reasons = v.satisfaction.reasons.iter().chain(&v.loyalty.reasons);
    if model == Model::All {
        writeln!(out, "reasons")?;
        for r in reasons {
            writeln!(out, "  - {:<17} {} ({})", r.code, r.evidence, r.threshold)?;
        }
    }
    Ok(())
}

fn print_population(p: &PopulationView, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "population as of {} ({:?} axis)",
        p.as_of.at, p.as_of.axis
    )?;
    writeln!(
        out,
        "  customers        {} ({} buyers)",
        p.customers, p.buyers
    )?;
    writeln!(out, "  NPS              {}", opt(p.nps, 1))?;
    writeln!(out, "  CSAT %           {}", opt(p.csat_pct, 1))?;
    writeln!(out, "  mean CES         {}", opt(p.mean_ces, 2))?;
    writeln!(out, "  mean C           {}", opt(p.mean_c, 3))?;
    writeln!(out, "  complaint rate % {}", opt(p.complaint_rate_pct, 1))?;
    writeln!(out, "  recovery rate %  {}", opt(p.recovery_rate_pct, 1))?;
    writeln!(
        out,
        "  top 20% revenue  {}% ({})",
        opt(p.top20_revenue_share_pct, 1),
        p.currency
    )?;
    writeln!(out, "pyramid")?;
    for t in &p.pyramid {
        writeln!(
            out,
            "  {:<9} {:>8} customers {:>14} {:>6.1}%",
            t.tier, t.customers, t.revenue_minor, t.revenue_share_pct
        )?;
    }
    writeln!(out, "months (churn % / retention % / NPS / complaints)")?;
    for m in &p.months {
        writeln!(
            out,
            "  {}  start {:>7}  lost {:>6}  won back {:>5}  new {:>6}  churn {:>6}  retention {:>6}  NPS {:>6}  complaints {}",
            m.month,
            m.churn.at_start,
            m.churn.lost,
            m.churn.won_back,
            m.churn.new,
            opt(m.churn_rate_pct, 1),
            opt(m.retention_rate_pct, 1),
            opt(m.nps, 1),
            m.counters.complaints
        )?;
    }
    writeln!(out, "dick & basu      {:?}", p.dick_basu)?;
    writeln!(out, "lifecycle        {:?}", p.lifecycle)?;
    writeln!(out, "churn levels     {:?}", p.churn_levels)?;
    writeln!(out, "churn causes     {:?}", p.churn_causes)?;
    Ok(())
}

/// `touchledger fit`: fit the count model `kind` (with the spend model) at `as_of` and append
/// the `ModelFitted` event.
pub fn fit(
    store: &SledStore,
    as_of: Timestamp,
    unit: TimeUnit,
    kind: CountKind,
    dry_run: bool,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    caught_up(store, None)?;
    let reads = ReadModels::open(store, Rules::default())?;
    let t = Instant::now();
    let (m, event) = touchledger_projector::model::fit_event(&reads, as_of, unit, kind)?;
    writeln!(out, "fitted in {:.2} s", t.elapsed().as_secs_f64())?;
    print_fit(&m, out)?;
    if dry_run {
        return Ok(crate::EXIT_OK);
    }
    match store
        .append_ledger_events(vec![AppendItem::new(event)])?
        .pop()
    {
        Some(AppendOutcome::Appended { position, .. }) => {
            writeln!(out, "recorded as ModelFitted at position {position}")?;
        }
        Some(AppendOutcome::Duplicate { position, .. }) => {
            writeln!(out, "already recorded at position {position}")?;
        }
        other => anyhow::bail!("ModelFitted was not recorded: {other:?}"),
    }
    caught_up(store, None)?;
    Ok(crate::EXIT_OK)
}

/// What `touchledger evaluate` does with an evaluation besides printing it.
pub struct EvaluateOutput<'a> {
    /// Print JSON instead of tables.
    pub json: bool,
    /// Append it as a `ModelEvaluated` event.
    pub record: bool,
    /// Write the plots into this directory.
    pub svg: Option<&'a std::path::Path>,
}

/// `touchledger evaluate`: the churn model and warnings, calibration against holdout.
pub fn evaluate(
    store: &SledStore,
    rules: &Rules,
    (calibration_end, holdout_end): (Timestamp, Timestamp),
    unit: TimeUnit,
    EvaluateOutput { json, record, svg }: EvaluateOutput,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    caught_up(store, None)?;
    let reads = ReadModels::open(store, rules.clone())?;
    let t = Instant::now();
    let e =
        match touchledger_projector::evaluate::evaluate(&reads, calibration_end, holdout_end, unit)
        {
            Ok(e) => e,
            Err(err @ touchledger_projector::evaluate::EvaluateError::Periods { .. }) => {
                writeln!(out, "{err}")?;
                return Ok(crate::EXIT_USAGE);
            }
            Err(err) => return Err(err.into()),
        };
    // Recorded first, so that a refused record (e.g. a holdout end in the future) is reported
    // before any figure is taken for recorded.
    let recorded = if record {
        let outcome = store
            .append_ledger_events(vec![AppendItem::new(e.event())])?
            .pop();
        caught_up(store, None)?;
        match outcome {
            Some(AppendOutcome::Appended { position, .. }) => {
                Some(format!("recorded as ModelEvaluated at position {position}"))
            }
            Some(AppendOutcome::Duplicate { position, .. }) => {
                Some(format!("already recorded at position {position}"))
            }
            Some(AppendOutcome::Rejected(r)) => {
                writeln!(out, "ModelEvaluated not recorded: {r}")?;
                return Ok(crate::EXIT_REJECTED);
            }
            other => anyhow::bail!("ModelEvaluated was not recorded: {other:?}"),
        }
    } else {
        None
    };
    present_evaluation(&e, recorded, json, svg, t.elapsed(), out)
}

/// Print an evaluation (`--json`: as JSON; else tables) after writing its plots into `svg`;
/// `recorded` says where it was recorded.
pub fn present_evaluation(
    e: &touchledger_projector::evaluate::ModelEvaluation,
    recorded: Option<String>,
    json: bool,
    svg: Option<&Path>,
    elapsed: std::time::Duration,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let plots = match svg {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|err| anyhow::anyhow!("--svg {}: {err}", dir.display()))?;
            let mut written = Vec::new();
            for (name, doc) in touchledger_projector::plots::evaluation_svgs(&e.evaluation) {
                let path = dir.join(name);
                std::fs::write(&path, doc)
                    .map_err(|err| anyhow::anyhow!("--svg {}: {err}", path.display()))?;
                written.push(path.display().to_string());
            }
            Some(written)
        }
        None => None,
    };
    if json {
        serde_json::to_writer_pretty(&mut *out, &e)?;
        writeln!(out)?;
        return Ok(crate::EXIT_OK);
    }
    if let Some(plots) = &plots {
        writeln!(out, "plots written: {}", plots.join(", "))?;
    }
    if let Some(r) = &recorded {
        writeln!(out, "{r}")?;
    }
    let v = &e.evaluation;
    writeln!(
        out,
        "evaluated in {:.2} s: {} buyers by {}; holdout to {} ({:.1} {:?})",
        elapsed.as_secs_f64(),
        v.customers,
        e.calibration_end,
        e.holdout_end,
        v.holdout_length,
        e.model.time_unit
    )?;
    print_fit(&e.model, out)?;
    if let Some(w) = &e.warning_model {
        writeln!(out, "the warnings below use (churn.count_model):")?;
        print_fit(w, out)?;
    }
    writeln!(out, "\ncalibration repeat purchases   actual   predicted")?;
    for b in &v.frequency {
        writeln!(
            out,
            "  {:>4}                     {:>8} {:>11.1}",
            b.repeat_purchases, b.actual, b.predicted
        )?;
    }
    writeln!(
        out,
        "\nholdout repeat purchase-days: actual {}, predicted {:.1}",
        v.holdout_actual, v.holdout_predicted
    )?;
    writeln!(
        out,
        "by calibration frequency   buyers   actual mean   predicted mean"
    )?;
    for b in &v.conditional {
        writeln!(
            out,
            "  {:>4}                  {:>8} {:>13.3} {:>16.3}",
            b.repeat_purchases, b.customers, b.actual_mean, b.predicted_mean
        )?;
    }
    if let (Some(first), Some(last)) = (v.tracking.first(), v.tracking.last()) {
        let at_t1 = v
            .tracking
            .iter()
            .rev()
            .find(|p| !p.holdout)
            .unwrap_or(first);
        writeln!(
            out,
            "tracking (cumulative repeat purchase-days, {} weeks): at the calibration end actual {} / predicted {:.1}; at the holdout end actual {} / predicted {:.1}",
            v.tracking.len(),
            at_t1.actual,
            at_t1.predicted,
            last.actual,
            last.predicted
        )?;
    }
    if !v.count_models.is_empty() {
        writeln!(
            out,
            "\ncount models on the same holdout   calibration LL   holdout predicted   mean |error| by frequency"
        )?;
        for m in &v.count_models {
            let params: Vec<String> = m
                .parameters
                .iter()
                .map(|(k, x)| format!("{k} {x:.4}"))
                .collect();
            writeln!(
                out,
                "  {:<11} {:>21.2} {:>19.1} {:>27.3}   ({})",
                m.model,
                m.log_likelihood,
                m.holdout_predicted,
                m.conditional_mean_abs_error,
                params.join(", ")
            )?;
        }
    }
    print_warnings(&v.warnings, v.customers, out)?;
    Ok(crate::EXIT_OK)
}

/// Print the warnings' figures of an evaluation of `customers` buyers.
fn print_warnings(
    w: &touchledger_domain::evaluation::WarningEvaluation,
    customers: u64,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "\nchurn warnings at the calibration end; churned = no purchase in the holdout: {} of {} ({:.1} %)",
        w.churned,
        customers,
        100.0 * w.base_rate
    )?;
    writeln!(out, "  level      buyers   churned")?;
    for l in &w.levels {
        writeln!(
            out,
            "  {:<9} {:>7} {:>8.1} %",
            format!("{:?}", l.level).to_lowercase(),
            l.customers,
            100.0 * l.churned_share
        )?;
    }
    writeln!(
        out,
        "  flagged at     n    rules P / R / lift        recency P / R / lift      BG/NBD P / R / lift"
    )?;
    for t in &w.thresholds {
        let c = |c: &touchledger_domain::evaluation::Classification| {
            format!("{:.3} / {:.3} / {:.2}", c.precision, c.recall, c.lift)
        };
        writeln!(
            out,
            "  {:<9} {:>7}   {:<24}  {:<24}  {}",
            format!("{:?}+", t.at_least).to_lowercase(),
            t.flagged,
            c(&t.rules),
            c(&t.recency),
            c(&t.model)
        )?;
    }
    let a = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.3}"));
    writeln!(
        out,
        "  ROC AUC: churn score {}, days since last purchase {}, BG/NBD P(no purchase) {}",
        a(w.auc.rules_score),
        a(w.auc.recency),
        a(w.auc.model)
    )?;
    Ok(())
}

/// `touchledger evaluate --tune`: the purchase-driven churn thresholds tried on one fit, best
/// first by the ROC AUC of the churn score; the best written as a rules file if asked.
pub fn tune(
    store: &SledStore,
    rules: &Rules,
    (calibration_end, holdout_end): (Timestamp, Timestamp),
    unit: TimeUnit,
    json: bool,
    write_rules: Option<&std::path::Path>,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    use touchledger_projector::evaluate::{EvaluateError, TuningGrid, tune};
    caught_up(store, None)?;
    let reads = ReadModels::open(store, rules.clone())?;
    let t = Instant::now();
    let grid = TuningGrid::default();
    let tuning = match tune(
        &reads,
        calibration_end,
        holdout_end,
        unit,
        &rules.churn,
        &grid,
    ) {
        Ok(t) => t,
        Err(err @ EvaluateError::Periods { .. }) => {
            writeln!(out, "{err}")?;
            return Ok(crate::EXIT_USAGE);
        }
        Err(err) => return Err(err.into()),
    };
    let Some(best) = tuning.tried.first() else {
        anyhow::bail!("no rule set of the grid passed the rules' checks");
    };
    if let Some(path) = write_rules {
        let chosen = Rules {
            churn: best.rules.clone(),
            ..rules.clone()
        };
        let mut text = serde_json::to_string_pretty(&chosen)?;
        text.push('\n');
        std::fs::write(path, text)
            .map_err(|e| anyhow::anyhow!("rules file {}: {e}", path.display()))?;
    }
    if json {
        serde_json::to_writer_pretty(&mut *out, &tuning)?;
        writeln!(out)?;
        return Ok(crate::EXIT_OK);
    }
    writeln!(
        out,
        "tuned in {:.2} s: {} rule sets on {} buyers by {}, holdout to {}",
        t.elapsed().as_secs_f64(),
        tuning.tried.len(),
        tuning.customers,
        tuning.calibration_end,
        tuning.holdout_end
    )?;
    let row = |t: &touchledger_projector::evaluate::Tried| {
        let r = &t.rules;
        let at = |level: touchledger_domain::ChurnLevel| {
            t.warnings
                .thresholds
                .iter()
                .find(|x| x.at_least == level)
                .map_or("-".to_owned(), |x| {
                    format!(
                        "{:>5} {:.3}/{:.3}/{:.2}",
                        x.flagged, x.rules.precision, x.rules.recall, x.rules.lift
                    )
                })
        };
        format!(
            "{:.3}  {:>4}/{:<4}  {:>3}/{:<3}  {:>5}  {:>5}   {}   {}",
            t.auc(),
            r.alive_watch_below,
            r.alive_warning_below,
            r.overdue_watch_k,
            r.overdue_warning_k,
            r.lost_after_days,
            r.one_time_horizon_days,
            at(touchledger_domain::ChurnLevel::Watch),
            at(touchledger_domain::ChurnLevel::Warning),
        )
    };
    writeln!(
        out,
        "  AUC    P(alive) <   overdue k  lost  1-time   watch+: n P/R/lift          warning+: n P/R/lift"
    )?;
    writeln!(out, "  {}   (given)", row(&tuning.given))?;
    for tried in tuning.tried.iter().take(10) {
        writeln!(out, "  {}", row(tried))?;
    }
    print_warnings(&best.warnings, tuning.customers, out)?;
    if let Some(path) = write_rules {
        writeln!(out, "\nthe best rules written to {}", path.display())?;
    }
    Ok(crate::EXIT_OK)
}

/// Print a fit.
pub fn print_fit(m: &touchledger_domain::ModelFitted, out: &mut dyn Write) -> anyhow::Result<()> {
    let kind = CountKind::of_name(&m.model).unwrap_or_default();
    writeln!(
        out,
        "{} fit on {} customers, calibration end {}, unit {:?}",
        kind.label(),
        m.customers,
        m.calibration_end,
        m.time_unit
    )?;
    let (a, b) = match kind {
        CountKind::BgNbd => ("a    ", "b    "),
        CountKind::ParetoNbd => ("s    ", "beta "),
    };
    writeln!(out, "  r     = {:.4}", m.r)?;
    writeln!(out, "  alpha = {:.4}", m.alpha)?;
    writeln!(out, "  {a} = {:.4}", m.a)?;
    writeln!(out, "  {b} = {:.4}", m.b)?;
    writeln!(out, "  log-likelihood = {:.2}", m.log_likelihood)?;
    match &m.spend {
        Some(s) => {
            writeln!(
                out,
                "Gamma-Gamma spend model on {} repeat buyers paying in {}",
                s.customers, s.currency
            )?;
            writeln!(out, "  p     = {:.4}", s.p)?;
            writeln!(out, "  q     = {:.4}", s.q)?;
            writeln!(out, "  gamma = {:.2} (minor units)", s.gamma)?;
            writeln!(out, "  log-likelihood = {:.2}", s.log_likelihood)?;
        }
        None => writeln!(
            out,
            "no Gamma-Gamma spend model (no repeat buyers in one currency, or no usable fit): no CLV"
        )?,
    }
    writeln!(out, "  model_version  = {}", m.model_version)?;
    Ok(())
}

/// What `import cdnow` did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ImportSummary {
    /// Transactions read.
    pub rows: u64,
    /// Appended.
    pub appended: u64,
    /// Already stored.
    pub duplicate: u64,
    /// Rejected (with codes in the rejections record).
    pub rejected: u64,
    /// Distinct customers.
    pub customers: u64,
}

/// An import that stopped on a store error (e.g. the free-space reserve): report what is
/// durable (every batch before the failed one), then the error.
fn import_stopped(
    store: &SledStore,
    e: anyhow::Error,
    s: &ImportSummary,
    line: u64,
    file: &Path,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let head = touchledger_store::EventStore::head(store);
    writeln!(
        out,
        "stopped: appended {}, duplicate {}, rejected {} (durable; head {} {})",
        s.appended, s.duplicate, s.rejected, head.position, head.hash
    )?;
    Err(e.context(format!(
        "import stopped at or before line {line} of {}; everything counted above is durable, run the same import again when the cause is fixed",
        file.display()
    )))
}

/// `touchledger import cdnow`: the CDNOW log (master: `customer_id date cds dollars` with a
/// header; sample: `master_id sample_id date cds dollars`) as purchase events, through the
/// store's append path. Event ids are derived from the file's row, so importing twice stores
/// nothing new. Customers are `cdnow-<id>` (the sample's own ids for the sample).
pub fn import_cdnow(
    store: &SledStore,
    file: &Path,
    batch: usize,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut s = ImportSummary::default();
    let mut customers = std::collections::BTreeSet::new();
    let mut items = Vec::with_capacity(batch);
    let flush = |items: &mut Vec<AppendItem>, s: &mut ImportSummary| -> anyhow::Result<()> {
        for o in store.append(std::mem::take(items))? {
            match o {
                AppendOutcome::Appended { .. } => s.appended += 1,
                AppendOutcome::Duplicate { .. } => s.duplicate += 1,
                _ => s.rejected += 1,
            }
        }
        Ok(())
    };
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (id, date, cds, dollars) = match cols.as_slice() {
            [] => continue,
            ["customer_id", ..] => continue,
            [id, date, cds, dollars] => (*id, *date, *cds, *dollars),
            [_master, sample, date, cds, dollars] => (*sample, *date, *cds, *dollars),
            _ => anyhow::bail!(
                "{}:{}: expected 4 or 5 columns: {line:?}",
                file.display(),
                i + 1
            ),
        };
        let bad =
            |what: &str| anyhow::anyhow!("{}:{}: bad {what} in {line:?}", file.display(), i + 1);
        let id = id.trim_start_matches('0');
        if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("date"));
        }
        let occurred_at: Timestamp = format!("{}-{}-{}", &date[..4], &date[4..6], &date[6..])
            .parse()
            .map_err(|_| bad("date"))?;
        let cds: u32 = cds.parse().map_err(|_| bad("number of CDs"))?;
        let cents =
            (dollars.parse::<f64>().map_err(|_| bad("dollar value"))? * 100.0).round() as i64;
        let customer = format!("cdnow-{id}");
        customers.insert(customer.clone());
        s.rows += 1;
        items.push(AppendItem::new(Event {
            event_id: format!(
                "cdnow-{}-{}",
                file.file_name().and_then(|n| n.to_str()).unwrap_or("log"),
                i + 1
            ),
            customer_id: customer,
            occurred_at,
            source: "cdnow-import".into(),
            schema_version: touchledger_domain::SCHEMA_VERSION,
            correlation_id: None,
            causation_id: None,
            payload: Payload::Purchase(Purchase {
                order_id: format!("row-{}", i + 1),
                amount_minor: cents,
                currency: "USD".into(),
                item_count: cds,
                channel: None,
                category: "music".into(),
            }),
        }));
        if items.len() >= batch
            && let Err(e) = flush(&mut items, &mut s)
        {
            return import_stopped(store, e, &s, i as u64 + 1, file, out);
        }
    }
    if let Err(e) = flush(&mut items, &mut s) {
        return import_stopped(store, e, &s, s.rows, file, out);
    }
    s.customers = customers.len() as u64;
    writeln!(
        out,
        "imported {} rows of {} customers: appended {}, duplicate {}, rejected {}",
        s.rows, s.customers, s.appended, s.duplicate, s.rejected
    )?;
    Ok(if s.rejected > 0 {
        crate::EXIT_REJECTED
    } else {
        crate::EXIT_OK
    })
}

/// The time axis of a read.
#[derive(Copy, Clone, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum AxisArg {
    /// What had happened by `--as-of` (corrected history).
    Business,
    /// What the ledger knew at `--as-of` (what a dashboard showed then).
    Knowledge,
}

/// The instant of a read: `--as-of` (default now) on `--axis`.
pub fn as_of(at: Option<Timestamp>, axis: AxisArg) -> AsOf {
    AsOf {
        at: at.unwrap_or_else(Timestamp::now),
        axis: match axis {
            AxisArg::Business => Axis::Business,
            AxisArg::Knowledge => Axis::Knowledge,
        },
    }
}

/// The count model flag.
#[derive(Copy, Clone, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum ModelArg {
    /// BG/NBD (Fader, Hardie & Lee 2005).
    Bgnbd,
    /// Pareto/NBD (Schmittlein, Morrison & Colombo 1987).
    Paretonbd,
}

impl From<ModelArg> for CountKind {
    fn from(m: ModelArg) -> CountKind {
        match m {
            ModelArg::Bgnbd => CountKind::BgNbd,
            ModelArg::Paretonbd => CountKind::ParetoNbd,
        }
    }
}

/// The model's time unit flag.
#[derive(Copy, Clone, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum UnitArg {
    /// Days.
    Days,
    /// Weeks (as in the BG/NBD paper).
    Weeks,
}

impl From<UnitArg> for TimeUnit {
    fn from(u: UnitArg) -> TimeUnit {
        match u {
            UnitArg::Days => TimeUnit::Days,
            UnitArg::Weeks => TimeUnit::Weeks,
        }
    }
}
