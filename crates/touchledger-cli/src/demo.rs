//! `touchledger demo`: realistic, seeded synthetic traffic so that every read model, chart and
//! alert has something to show.
//!
//! The simulation follows the BG/NBD story: while alive, each customer buys at their own
//! Poisson rate (rates Gamma-distributed across customers) and after each purchase drops out
//! with their own probability (Beta-like across customers). On top of it, the textbook links:
//! some purchases go wrong and lead to complaints; a complaint left unresolved (or resolved
//! coldly) raises the customer's dropout probability; callbacks resolve most complaints, faster
//! ones with happier ratings; surveys report expectation *a* and performance *b* (worse while a
//! complaint is open), CSAT, NPS, CES and repurchase intent; some customers who left are called
//! back and state a reason.
//!
//! Key decisions:
//! * A fixed seed and history start give the same events with the same ids (SplitMix64, no
//!   `rand`), so re-running the demo the same day stores nothing twice.
//! * First a backfill: the history of the last `history_days`, published as fast as JetStream
//!   acknowledges. Then a live tail at `rate` events per second: the simulation continues
//!   (time-compressed) and each event is stamped with the wall-clock instant it is published.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Write;
use std::time::Duration;

use touchledger_client::Ledger;
use touchledger_domain::{
    Callback, CallbackOutcome, CallbackPurpose, Channel, Complaint, ComplaintCategory, Event,
    LeavingReason, Payload, Purchase, Survey, Timestamp,
};

use crate::serve::NatsArgs;

const DAY: f64 = 86_400e9;

use crate::rng::Rng;

struct Customer {
    id: String,
    /// Purchases per day while alive.
    rate: f64,
    /// Dropout probability after each purchase.
    p_drop: f64,
    alive: bool,
    /// Expectation a (1–10).
    expectation: u32,
    /// How well the business serves this customer (added to a for b).
    quality: f64,
    /// Chance that a purchase goes wrong.
    p_problem: f64,
    /// Open complaints: (complaint id, raised at).
    open: Vec<(String, i64)>,
    /// Complaints handled badly (unresolved or coldly resolved).
    grievances: u32,
    /// Amount scale of this customer's baskets (minor units).
    basket: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Purchase,
    Complaint,
    Resolve(String),
    Survey,
    WinBack,
}

/// The seeded simulation: events in business-time order.
pub struct Simulation {
    rng: Rng,
    customers: Vec<Customer>,
    queue: BinaryHeap<Reverse<(i64, u64, usize, Action)>>,
    seq: u64,
    prefix: String,
    emitted: u64,
}

impl Simulation {
    /// `customers` customers acquired over the first half of the history that starts at
    /// `start`; ids are prefixed with `prefix` (event ids) — customers are `demo-c<n>`.
    pub fn new(
        seed: u64,
        customers: u64,
        start: Timestamp,
        history_days: f64,
        prefix: String,
    ) -> Self {
        let mut rng = Rng(seed);
        let mut sim = Simulation {
            rng: Rng(0),
            customers: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            prefix,
            emitted: 0,
        };
        for i in 0..customers {
            // Gamma(2)-distributed purchase rates around one purchase every ~30 days.
            let rate = (rng.exp(1.0) + rng.exp(1.0)) / 2.0 / 30.0;
            let u = rng.unit();
            let c = Customer {
                id: format!("demo-c{i:05}"),
                rate,
                p_drop: 0.02 + 0.25 * u * u,
                alive: true,
                expectation: 5 + rng.below(5) as u32,
                quality: rng.unit() * 3.0 - 1.0,
                p_problem: 0.03 + 0.12 * rng.unit(),
                open: Vec::new(),
                grievances: 0,
                basket: 1500.0 + 6000.0 * rng.unit(),
            };
            sim.customers.push(c);
            let first = start.unix_nanos() as f64 + rng.unit() * history_days / 2.0 * DAY;
            sim.schedule(first as i64, i as usize, Action::Purchase);
        }
        sim.rng = rng;
        sim
    }

    fn schedule(&mut self, at: i64, c: usize, a: Action) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, c, a)));
    }

    /// Business time of the next event, if any.
    pub fn peek(&self) -> Option<i64> {
        self.queue.peek().map(|Reverse((t, ..))| *t)
    }

    fn event(&mut self, c: usize, at: i64, payload: Payload) -> Event {
        self.emitted += 1;
        Event {
            event_id: format!("{}-{}", self.prefix, self.emitted),
            customer_id: self.customers[c].id.clone(),
            occurred_at: Timestamp::from_unix_nanos(at),
            source: "demo".into(),
            schema_version: touchledger_domain::SCHEMA_VERSION,
            correlation_id: None,
            causation_id: None,
            payload,
        }
    }

    /// The next event (in business-time order), or `None` when every customer has left and
    /// nothing is pending.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            let Reverse((at, _, c, action)) = self.queue.pop()?;
            let day = DAY as i64;
            match action {
                Action::Purchase => {
                    if !self.customers[c].alive {
                        continue;
                    }
                    let rng = &mut self.rng;
                    let cust = &self.customers[c];
                    let amount = (cust.basket * (0.5 + rng.unit())) as i64;
                    let items = 1 + rng.below(4) as u32;
                    let channel =
                        [Channel::Web, Channel::App, Channel::Store][rng.below(3) as usize];
                    let category = ["music", "books", "video", "games"][rng.below(4) as usize];
                    let problem = rng.chance(cust.p_problem);
                    let survey = rng.chance(0.25);
                    let p_drop = (cust.p_drop + 0.15 * f64::from(cust.grievances)).min(0.9);
                    let drops = rng.chance(p_drop);
                    let next_gap = rng.exp(1.0 / cust.rate.max(1e-6));
                    let complaint_gap = rng.unit() * 2.0;
                    let survey_gap = 1.0 + rng.unit() * 4.0;
                    let winback_gap = 60.0 + rng.unit() * 60.0;
                    let winback = rng.chance(0.5);
                    if problem {
                        self.schedule(
                            at + (complaint_gap * DAY) as i64 + day / 24,
                            c,
                            Action::Complaint,
                        );
                    }
                    if survey {
                        self.schedule(at + (survey_gap * DAY) as i64, c, Action::Survey);
                    }
                    if drops {
                        self.customers[c].alive = false;
                        if winback {
                            self.schedule(at + (winback_gap * DAY) as i64, c, Action::WinBack);
                        }
                    } else {
                        self.schedule(at + (next_gap * DAY) as i64 + day / 48, c, Action::Purchase);
                    }
                    let order = format!("{}-o{}", self.prefix, self.seq);
                    return Some(self.event(
                        c,
                        at,
                        Payload::Purchase(Purchase {
                            order_id: order,
                            amount_minor: amount,
                            currency: "EUR".into(),
                            item_count: items,
                            channel: Some(channel),
                            category: category.into(),
                        }),
                    ));
                }
                Action::Complaint => {
                    let rng = &mut self.rng;
                    let severity = 1 + rng.below(5) as u32;
                    let category = [
                        ComplaintCategory::ProductQuality,
                        ComplaintCategory::ServiceAttitude,
                        ComplaintCategory::Delivery,
                        ComplaintCategory::Price,
                        ComplaintCategory::Billing,
                    ][rng.below(5) as usize];
                    let resolved = rng.chance(0.8);
                    let gap = rng.exp(2.0);
                    let id = format!("{}-k{}", self.prefix, self.seq);
                    self.customers[c].open.push((id.clone(), at));
                    if resolved {
                        self.schedule(
                            at + (gap * DAY) as i64 + day / 24,
                            c,
                            Action::Resolve(id.clone()),
                        );
                    } else {
                        self.customers[c].grievances += 1;
                    }
                    return Some(self.event(
                        c,
                        at,
                        Payload::Complaint(Complaint {
                            complaint_id: id,
                            category,
                            severity,
                            channel: Some(Channel::Phone),
                            text: "demo complaint".into(),
                        }),
                    ));
                }
                Action::Resolve(id) => {
                    let raised = self.customers[c]
                        .open
                        .iter()
                        .position(|(k, _)| *k == id)
                        .map(|i| self.customers[c].open.remove(i).1)
                        .unwrap_or(at);
                    let days = (at - raised) as f64 / DAY;
                    let rng = &mut self.rng;
                    // Fast resolutions please; slow ones much less.
                    let rating = if days < 2.0 {
                        4 + rng.below(2)
                    } else {
                        1 + rng.below(4)
                    } as u32;
                    if rating <= 2 {
                        self.customers[c].grievances += 1;
                    }
                    return Some(self.event(
                        c,
                        at,
                        Payload::Callback(Callback {
                            callback_id: format!("{}-cb{}", self.prefix, self.seq),
                            purpose: CallbackPurpose::ComplaintFollowUp,
                            related_complaint_id: Some(id),
                            outcome: CallbackOutcome::ComplaintResolved,
                            resolution_satisfaction: Some(rating),
                            leaving_reason: None,
                            note: String::new(),
                        }),
                    ));
                }
                Action::Survey => {
                    let cust = &self.customers[c];
                    let a = cust.expectation;
                    let penalty = 2.0 * cust.open.len() as f64 + f64::from(cust.grievances);
                    let (quality, intent_base) = (cust.quality, cust.alive);
                    let rng = &mut self.rng;
                    let b = (f64::from(a) + quality - penalty + rng.unit() * 2.0 - 1.0)
                        .round()
                        .clamp(1.0, 10.0) as u32;
                    let ratio = f64::from(b) / f64::from(a);
                    let csat = (ratio * 4.0).round().clamp(1.0, 5.0) as u32;
                    let nps = (ratio * 8.5 + rng.unit() * 2.0 - 1.0)
                        .round()
                        .clamp(0.0, 10.0) as u32;
                    let ces = 1 + rng.below(7) as u32;
                    let intent = if intent_base {
                        (ratio * 4.5).round().clamp(1.0, 5.0) as u32
                    } else {
                        1
                    };
                    let suppliers = rng.below(4) as u32;
                    return Some(self.event(
                        c,
                        at,
                        Payload::Survey(Survey {
                            survey_id: format!("{}-s{}", self.prefix, self.seq),
                            expectation: Some(a),
                            performance: Some(b),
                            csat: Some(csat),
                            nps: Some(nps),
                            ces: Some(ces),
                            repurchase_intent: Some(intent),
                            other_suppliers: Some(suppliers),
                            leaving_reason: None,
                            text: String::new(),
                        }),
                    ));
                }
                Action::WinBack => {
                    let grievances = self.customers[c].grievances;
                    let rng = &mut self.rng;
                    let reached = rng.chance(0.6);
                    let reason = if !reached {
                        None
                    } else if grievances > 0 && rng.chance(0.6) {
                        Some(LeavingReason::Disappointment)
                    } else {
                        Some(
                            [
                                LeavingReason::Competitor,
                                LeavingReason::Competitor,
                                LeavingReason::NeedChange,
                                LeavingReason::Natural,
                            ][rng.below(4) as usize],
                        )
                    };
                    return Some(self.event(
                        c,
                        at,
                        Payload::Callback(Callback {
                            callback_id: format!("{}-wb{}", self.prefix, self.seq),
                            purpose: CallbackPurpose::WinBack,
                            related_complaint_id: None,
                            outcome: if reached {
                                CallbackOutcome::Reached
                            } else {
                                CallbackOutcome::NoAnswer
                            },
                            resolution_satisfaction: None,
                            leaving_reason: reason,
                            note: String::new(),
                        }),
                    ));
                }
            }
        }
    }
}

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoSpec {
    /// Customers simulated.
    pub customers: u64,
    /// PRNG seed.
    pub seed: u64,
    /// Days of history backfilled before the live tail.
    pub history_days: u32,
    /// Live events per second (0 = backfill only).
    pub rate: f64,
    /// Stop the live tail after this long (`None` = until Ctrl-C).
    pub duration: Option<Duration>,
}

/// The simulation of `spec` as of `now`: its history start and event-id prefix depend only on
/// the day, so a same-day re-run gives the same events.
fn simulation(spec: &DemoSpec, now: Timestamp) -> Simulation {
    let day = 86_400 * 1_000_000_000i64;
    // Midnight of the first history day: the same all day, so a same-day re-run is idempotent.
    let start_day = now.unix_nanos().div_euclid(day) - i64::from(spec.history_days);
    let start = Timestamp::from_unix_nanos(start_day * day);
    let prefix = format!("demo-{}-{start_day}", spec.seed);
    Simulation::new(
        spec.seed,
        spec.customers,
        start,
        f64::from(spec.history_days),
        prefix,
    )
}

/// Write the demo's history (up to now) straight into a data directory through the store's
/// append path (validation, idempotency), `batch` events per flush, without NATS: how the
/// scale benchmark grows a store of millions of events. Streams: memory stays bounded by the
/// simulation's per-customer state.
pub fn backfill_store(
    store: &touchledger_store::SledStore,
    spec: &DemoSpec,
    batch: usize,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    use touchledger_store::{AppendItem, AppendOutcome, EventStore};
    let now = Timestamp::now();
    let mut sim = simulation(spec, now);
    let (mut appended, mut duplicate, mut rejected) = (0u64, 0u64, 0u64);
    let mut items = Vec::with_capacity(batch);
    let started = std::time::Instant::now();
    loop {
        let next = if sim.peek().is_some_and(|t| t <= now.unix_nanos()) {
            sim.next_event()
        } else {
            None
        };
        if let Some(e) = &next {
            items.push(AppendItem::new(e.clone()));
        }
        if items.len() >= batch.max(1) || (next.is_none() && !items.is_empty()) {
            for o in store.append(std::mem::take(&mut items))? {
                match o {
                    AppendOutcome::Appended { .. } => appended += 1,
                    AppendOutcome::Duplicate { .. } => duplicate += 1,
                    _ => rejected += 1,
                }
            }
        }
        if next.is_none() {
            break;
        }
    }
    writeln!(
        out,
        "demo: appended {appended} events of {} customers over {} days ({duplicate} duplicates, {rejected} rejected) in {:.1} s",
        spec.customers,
        spec.history_days,
        started.elapsed().as_secs_f64()
    )?;
    Ok(if rejected > 0 {
        crate::EXIT_REJECTED
    } else {
        crate::EXIT_OK
    })
}

/// Run the demo against a ledger over NATS.
pub fn demo(nats: &NatsArgs, spec: &DemoSpec, out: &mut dyn Write) -> anyhow::Result<i32> {
    let now = Timestamp::now();
    let mut sim = simulation(spec, now);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ledger = Ledger::new(nats.connect().await?, nats.prefix.clone());
        let mut backfill = Vec::new();
        while sim.peek().is_some_and(|t| t <= now.unix_nanos()) {
            if let Some(e) = sim.next_event() {
                backfill.push(e);
            }
        }
        let mut published = 0;
        for chunk in backfill.chunks(256) {
            ledger.publish_batch(chunk, chunk.len()).await?;
            published += chunk.len();
        }
        writeln!(
            out,
            "demo: backfilled {published} events of {} customers over {} days",
            spec.customers, spec.history_days
        )?;
        out.flush()?;
        if spec.rate <= 0.0 {
            return Ok(crate::EXIT_OK);
        }
        let live_prefix = format!("live{}", now.unix_nanos());
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / spec.rate));
        let deadline = spec.duration.map(|d| tokio::time::Instant::now() + d);
        let mut live = 0u64;
        let stop = tokio::signal::ctrl_c();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {}
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                break;
            }
            let Some(mut e) = sim.next_event() else { break };
            // Time-compressed: the simulation's next event, stamped now.
            e.occurred_at = Timestamp::now();
            e.event_id = format!("{}-{live_prefix}-{live}", e.event_id);
            ledger.publish(&e).await?;
            live += 1;
        }
        writeln!(out, "demo: published {live} live events")?;
        Ok(crate::EXIT_OK)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_history_is_reproducible_ordered_and_valid() {
        let start: Timestamp = "2026-01-01".parse().expect("time");
        let run = || {
            let mut s = Simulation::new(7, 200, start, 180.0, "demo-7-x".into());
            let mut out = Vec::new();
            while s
                .peek()
                .is_some_and(|t| t < start.unix_nanos() + 180 * 86_400_000_000_000)
            {
                out.extend(s.next_event());
            }
            out
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert!(a.len() > 500, "{}", a.len());
        assert!(a.windows(2).all(|w| w[0].occurred_at <= w[1].occurred_at));
        let policy = touchledger_domain::ValidationPolicy::default();
        let now: Timestamp = "2026-07-01".parse().expect("time");
        for e in &a {
            assert!(e.validate(&policy, now).is_ok(), "{e:?}");
        }
        let kinds = |k: touchledger_domain::EventKind| a.iter().filter(|e| e.kind() == k).count();
        use touchledger_domain::EventKind as K;
        assert!(kinds(K::Purchase) > kinds(K::Complaint) && kinds(K::Complaint) > 0);
        assert!(kinds(K::Survey) > 0 && kinds(K::Callback) > 0);
        let ids: std::collections::BTreeSet<_> = a.iter().map(|e| &e.event_id).collect();
        assert_eq!(ids.len(), a.len());
    }
}
