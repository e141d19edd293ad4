//! Reads of a partitioned ledger (issue #11, "Reads across partitions"): three `serve`
//! processes own the 8 partitions of one ledger; four publishers send about 40,000 messages
//! (10 % duplicates, 2 % undecodable). Every unique valid event is stored once, in its
//! partition, and the chains verify; the population read through **each** process equals, byte
//! for byte, the population of a single-partition ledger of the same events; a customer's read
//! models asked of a process that does not own the customer's partition equal the owner's
//! answer; the churn model fitted through the router is the single ledger's fit, and the
//! population and churn views with it equal the single ledger's.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use prost::Message;
use touchledger_domain::facts::AsOf;
use touchledger_domain::partition::{PartitionId, partition_of};
use touchledger_domain::population::Rules;
use touchledger_domain::{Event, EventKind, Timestamp};
use touchledger_proto::{encode_event, v1, views};
use touchledger_store::{AppendItem, EventStore, SledStore, StoreConfig};
use touchledger_testkit::NatsServer;

use crate::partition::{ServeChild, spawn_serve};

const P: u32 = 8;
const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 10_000;
/// The population is compared at this business instant: after every generated touchpoint
/// (they span 2024–2025) and before the service clock, so the assessments the partitions'
/// assessors record (at the service clock) are not part of it.
pub(crate) const AS_OF: &str = "2026-01-15T00:00:00Z";
/// A closed month end inside the generated touchpoints: the router keeps its population.
const MONTH_END: &str = "2025-07-01T00:00:00Z";

/// Each publisher's messages: its customers' valid events in order, every 10th message a
/// re-send of one of its earlier events under a new message id (only the ledger can tell), every
/// 50th undecodable. Returns (subject, message id, bytes) per publisher and the undecodable count.
pub(crate) type Outgoing = Vec<(String, String, Vec<u8>)>;

pub(crate) fn messages(events: &[Event]) -> (Vec<Outgoing>, u64) {
    // A customer's events all go through one publisher, in order (a retraction follows its
    // target), as a producer owning that customer would send them.
    let mut per: Vec<Vec<&Event>> = vec![Vec::new(); PUBLISHERS];
    for e in events {
        per[partition_of(&e.customer_id, PUBLISHERS as u32) as usize].push(e);
    }
    let mut bad = 0;
    let out = per
        .into_iter()
        .enumerate()
        .map(|(p, evs)| {
            let mut out = Vec::new();
            let mut next = evs.into_iter();
            let mut sent: Vec<&Event> = Vec::new();
            let mut i = 0usize;
            loop {
                let subject =
                    |e: &Event| format!("crm.touchpoint.{}.{}", e.kind().as_str(), e.customer_id);
                if i % 10 == 9 && !sent.is_empty() {
                    let e = sent[(i * 7) % sent.len()];
                    out.push((
                        subject(e),
                        format!("{}-again-{i}", e.event_id),
                        encode_event(e),
                    ));
                } else if i % 50 == 25 {
                    bad += 1;
                    out.push((
                        "crm.touchpoint.purchase.someone".to_owned(),
                        format!("p{p}-bad-{i}"),
                        b"\xff\x00not protobuf".to_vec(),
                    ));
                } else {
                    let Some(e) = next.next() else { break };
                    out.push((subject(e), e.event_id.clone(), encode_event(e)));
                    sent.push(e);
                }
                i += 1;
            }
            out
        })
        .collect();
    (out, bad)
}

/// `touchledger cluster status --partitions 8 --json` of the ledger on `urls`.
pub(crate) async fn cluster_status(urls: &str) -> serde_json::Value {
    let (code, out, err) = crate::cli::cli_blocking(&[
        "cluster",
        "status",
        "--nats-url",
        urls,
        "--partitions",
        "8",
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    serde_json::from_str(&out).expect("status JSON")
}

/// `n` events of the generator's realistic mix (purchases, complaints, callbacks, surveys,
/// retractions) of 1,500 customers over 2024–25, by `touchledger generate --seed seed` into a
/// file in `dir`.
pub(crate) fn generated(dir: &std::path::Path, n: u32, seed: &str) -> Vec<Event> {
    let file = dir.join("events.jsonl");
    let n = n.to_string();
    let (code, _, err) = crate::cli::cli(&[
        "generate",
        "--out",
        file.to_str().expect("utf8"),
        "--events",
        &n,
        "--customers",
        "1500",
        "--seed",
        seed,
    ]);
    assert_eq!(code, 0, "{err}");
    std::fs::read_to_string(&file)
        .expect("read")
        .lines()
        .map(|l| touchledger_domain::json::parse_event(l.as_bytes()).expect("generated event"))
        .collect()
}

/// The population and customer replies of a single-partition ledger of `events`, folded in
/// this process.
pub(crate) struct Reference {
    _dir: tempfile::TempDir,
    store: SledStore,
    projectors: Vec<touchledger_projector::Projector>,
    pub(crate) reads: touchledger_projector::ReadModels,
}

impl Reference {
    /// The reply to a population query at `at` on the business axis.
    pub(crate) fn population_at(&self, at: Timestamp) -> Vec<u8> {
        population_reply(
            &self
                .reads
                .population(AsOf::business(at))
                .expect("population"),
        )
    }

    /// Append touchpoints and fold them.
    fn append_touchpoints(&mut self, events: Vec<Event>) {
        self.store
            .append(events.into_iter().map(AppendItem::new).collect())
            .expect("append");
        touchledger_projector::catch_up(&self.store, &mut self.projectors, 10_000).expect("fold");
    }

    /// The overview (HTTP JSON) at `as_of`.
    fn overview(&self, as_of: AsOf) -> String {
        serde_json::to_string(
            &serde_json::to_value(self.reads.population(as_of).expect("population")).expect("json"),
        )
        .expect("json")
    }

    /// Append the ledger's own events (a model fit) and fold them.
    fn append_ledger_events(&mut self, events: Vec<Event>) {
        self.store
            .append_ledger_events(events.into_iter().map(AppendItem::new).collect())
            .expect("append");
        touchledger_projector::catch_up(&self.store, &mut self.projectors, 10_000).expect("fold");
    }
}

pub(crate) fn reference(events: &[Event]) -> Reference {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = StoreConfig::new(dir.path());
    cfg.cache_capacity = 32 * 1024 * 1024;
    let store = SledStore::open(cfg).expect("open");
    for chunk in events.chunks(1000) {
        store
            .append(chunk.iter().cloned().map(AppendItem::new).collect())
            .expect("append");
    }
    let mut projectors: Vec<_> = touchledger_projector::open_all(&store)
        .expect("projectors")
        .into_iter()
        .map(|p| p.0)
        .collect();
    touchledger_projector::catch_up(&store, &mut projectors, 10_000).expect("fold");
    let reads = touchledger_projector::ReadModels::open(&store, Rules::default()).expect("reads");
    Reference {
        _dir: dir,
        store,
        projectors,
        reads,
    }
}

pub(crate) fn population_reply(p: &touchledger_domain::population::PopulationView) -> Vec<u8> {
    v1::QueryReply {
        result: Some(v1::query_reply::Result::Population(views::population(p))),
    }
    .encode_to_vec()
}

pub(crate) fn query(customer: &str, as_of: Option<Timestamp>) -> Vec<u8> {
    v1::QueryRequest {
        customer_id: customer.to_owned(),
        as_of: as_of.map(touchledger_proto::to_pb_time),
        axis: v1::Axis::Business as i32,
    }
    .encode_to_vec()
}

/// The pid in a `Touchledger-Answered-By` header (`host/pid/start`).
pub(crate) fn answered_by(m: &async_nats::Message) -> u32 {
    let h = m
        .headers
        .as_ref()
        .and_then(|h| h.get(touchledger_bus::headers::ANSWERED_BY))
        .unwrap_or_else(|| panic!("no {} header", touchledger_bus::headers::ANSWERED_BY));
    h.as_str()
        .split('/')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("answered by {h}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_serve_processes_of_8_partitions_store_once_and_answer_reads_as_one_ledger() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("ledger");

    // 35,200 distinct valid events: the real CDNOW sample's 6,919 purchases of 2,357 customers
    // (1997–98: what the churn model is fitted on) and 28,281 of the generator's realistic mix
    // (purchases, complaints, callbacks, surveys, retractions) of 1,500 customers over 2024–25.
    let cdnow = dir.path().join("cdnow");
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/data/cdnow/CDNOW_sample.txt");
    let (code, out, err) = crate::cli::cli(&[
        "import",
        "cdnow",
        "--data",
        cdnow.to_str().expect("utf8"),
        "--file",
        sample,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let mut events: Vec<Event> = {
        let store = SledStore::open(StoreConfig::new(&cdnow)).expect("open");
        store
            .read(&Default::default())
            .map(|r| r.expect("record").event)
            .collect()
    };
    assert_eq!(events.len(), 6_919);
    events.extend(generated(dir.path(), 28_281, "11"));
    let (outgoing, bad) = messages(&events);
    // About 4 x 10,000 messages (a publisher's share follows its customers).
    let total = outgoing.iter().map(Vec::len).sum::<usize>();
    assert!(
        total.abs_diff(PUBLISHERS * PER_PUBLISHER) <= 20,
        "{total} messages"
    );
    assert!(bad >= 790, "{bad} undecodable");

    let owns = ["0-2", "3-5", "6,7"];
    let mut children: Vec<ServeChild> = owns
        .iter()
        .map(|own| {
            spawn_serve(
                &data,
                &server.url(),
                own,
                &["--partitions", "8"],
                &data.with_extension(format!("{own}.log")),
            )
        })
        .collect();
    let logs = || -> String {
        owns.iter()
            .map(|own| {
                std::fs::read_to_string(data.with_extension(format!("{own}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let owner_of = |partition: u32| -> u32 {
        let i = match partition {
            0..=2 => 0,
            3..=5 => 1,
            _ => 2,
        };
        children[i].id()
    };

    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    // Views and churn alerts, as a dashboard follows them: each names its partition.
    let mut live = client
        .subscribe("crm.view.churn.>")
        .await
        .expect("subscribe");
    let mut alerts = client
        .subscribe("crm.alert.churn.>")
        .await
        .expect("subscribe");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while js.get_stream("CRM_TOUCHPOINTS").await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no intake stream\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    crate::partition::publish_concurrently(&client, outgoing).await;

    // The same events in a single-partition ledger.
    let mut reference = tokio::task::spawn_blocking({
        let events = events.clone();
        move || reference(&events)
    })
    .await
    .expect("reference");
    let at: Timestamp = AS_OF.parse().expect("time");
    let want_population = reference.population_at(at);

    // The population through the ledger-wide subject: once every partition has folded what it
    // was sent, it equals the single ledger's. Asked until each of the three processes has
    // answered (the router is one queue group: any process answers any read).
    let pop_request = query("", Some(at));
    let mut answered: BTreeMap<u32, usize> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut last = Vec::new();
    while answered.len() < 3 {
        let m = client
            .request("crm.query.population", pop_request.clone().into())
            .await
            .expect("population request");
        if m.payload.as_ref() == want_population.as_slice() {
            *answered.entry(answered_by(&m)).or_default() += 1;
        } else {
            last = m.payload.to_vec();
            assert!(
                tokio::time::Instant::now() < deadline,
                "the routed population never equalled the single ledger's:\n{:?}\nwant\n{:?}\n{}",
                v1::QueryReply::decode(last.as_slice()),
                v1::QueryReply::decode(want_population.as_slice()),
                logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let pids: BTreeSet<u32> = children.iter().map(|c| c.id()).collect();
    assert_eq!(
        answered.keys().copied().collect::<BTreeSet<_>>(),
        pids,
        "{answered:?} {last:?}"
    );

    // A customer's read models through a process that does not own the customer's partition
    // equal the owner's own answer (asked on the partition's subject), for a customer of every
    // partition, at an instant and now.
    let customers: BTreeSet<&str> = events.iter().map(|e| e.customer_id.as_str()).collect();
    for n in 0..P {
        let customer = customers
            .iter()
            .find(|c| partition_of(c, P) == n)
            .expect("a customer of the partition");
        for model in ["satisfaction", "loyalty", "churn"] {
            for as_of in [Some(at), None] {
                let mut tries = 0;
                let routed = loop {
                    let m = client
                        .request(format!("crm.query.{model}"), query(customer, as_of).into())
                        .await
                        .expect("routed query");
                    if answered_by(&m) != owner_of(n) {
                        break m;
                    }
                    tries += 1;
                    assert!(tries < 100, "only the owner answered {model} of {customer}");
                };
                let direct = client
                    .request(
                        format!("crm.partition.{n}.query.{model}"),
                        query(customer, as_of).into(),
                    )
                    .await
                    .expect("owner query");
                let reply = v1::QueryReply::decode(routed.payload.as_ref()).expect("reply");
                assert!(
                    !matches!(reply.result, Some(v1::query_reply::Result::Error(_)) | None),
                    "{model} of {customer}: {reply:?}"
                );
                if as_of.is_some() {
                    assert_eq!(routed.payload, direct.payload, "{model} of {customer}");
                    // ...and the single ledger's.
                    let views = reference
                        .reads
                        .customer(customer, AsOf::business(at))
                        .expect("reference")
                        .expect("known");
                    let want = match model {
                        "satisfaction" => v1::query_reply::Result::Satisfaction(
                            views::satisfaction(customer, &views.satisfaction),
                        ),
                        "loyalty" => v1::query_reply::Result::Loyalty(views::loyalty(
                            customer,
                            &views.loyalty,
                        )),
                        _ => v1::query_reply::Result::Churn(views::churn(customer, &views.churn)),
                    };
                    assert_eq!(reply.result, Some(want), "{model} of {customer}");
                } else {
                    // "Now" moves with the clock between the two requests: the same customer
                    // and model, answered.
                    let d = v1::QueryReply::decode(direct.payload.as_ref()).expect("reply");
                    assert_eq!(
                        std::mem::discriminant(&d.result),
                        std::mem::discriminant(&reply.result)
                    );
                }
            }
        }
    }
    // A customer nobody knows: the owner's NOT_FOUND, forwarded.
    let m = client
        .request("crm.query.churn", query("nobody-at-all", Some(at)).into())
        .await
        .expect("query");
    match v1::QueryReply::decode(m.payload.as_ref())
        .expect("reply")
        .result
    {
        Some(v1::query_reply::Result::Error(e)) => assert_eq!(e.code, "NOT_FOUND", "{e:?}"),
        other => panic!("{other:?}"),
    }

    // A "now" population merges the partitions' current materialisations: once they have
    // caught up with the projections (they follow them), the same figures as the single ledger
    // evaluated at the instant the reply names.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = client
            .request("crm.query.population", query("", None).into())
            .await
            .expect("now population");
        let now_reply = v1::QueryReply::decode(m.payload.as_ref()).expect("reply");
        let Some(v1::query_reply::Result::Population(now_pop)) = &now_reply.result else {
            panic!("{now_reply:?}");
        };
        let now_at = touchledger_proto::from_pb_time("as_of", now_pop.as_of).expect("as_of");
        let want_now = reference.population_at(now_at);
        if m.payload.as_ref() == want_now.as_slice() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let diff = now_differences(&client, &reference, now_at).await;
            panic!("now population differs; customers:\n{}", diff.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The churn model: fitted through any process on every partition's buyers, it is the fit
    // of the single ledger (the same event, byte for byte), recorded in every partition; the
    // population and the churn views at the instant then use it, as the single ledger's do.
    let calibration_end: Timestamp = "1997-09-30T00:00:00Z".parse().expect("time");
    let fit_request = v1::FitRequest {
        as_of: Some(touchledger_proto::to_pb_time(calibration_end)),
        unit: v1::TimeUnit::Weeks as i32,
        dry_run: false,
        model: String::new(),
    };
    let m = client
        .request("crm.model.fit", fit_request.encode_to_vec().into())
        .await
        .expect("fit");
    let fitted = v1::FitReply::decode(m.payload.as_ref()).expect("fit reply");
    assert!(fitted.error.is_none(), "{fitted:?}");
    let (model, event) = touchledger_projector::model::fit_event(
        &reference.reads,
        calibration_end,
        touchledger_domain::TimeUnit::Weeks,
        touchledger_domain::count::CountKind::BgNbd,
    )
    .expect("reference fit");
    // (The CDNOW sample's published estimate, as tests/it/projector.rs checks it.)
    assert!((model.r - 0.2426).abs() < 1e-3, "{model:?}");
    assert_eq!(
        fitted.event,
        Some(v1::Envelope::from(&event)),
        "the partitioned fit is the single ledger's"
    );
    assert!(!fitted.duplicate && fitted.position > 0, "{fitted:?}");
    // Acknowledged only once in the partition's feed (a new owner starts from the feed): the
    // reply's position (partition 0's) is already there.
    let js = jetstream::new(client.clone());
    let mut feed0 = js.get_stream("CRM_LEDGER_EVENTS_P0").await.expect("feed 0");
    let feed_head = feed0.info().await.expect("feed 0 info").state.last_sequence;
    assert!(
        feed_head >= fitted.position,
        "the fit was acknowledged at position {} before partition 0's feed held it (head {feed_head})",
        fitted.position
    );
    let again = client
        .request("crm.model.fit", fit_request.encode_to_vec().into())
        .await
        .expect("fit again");
    let again = v1::FitReply::decode(again.payload.as_ref()).expect("fit reply");
    assert!(
        again.duplicate && again.position == fitted.position,
        "{again:?}"
    );
    reference.append_ledger_events(vec![event]);
    let want_population = reference.population_at(at);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let m = client
            .request("crm.query.population", pop_request.clone().into())
            .await
            .expect("population request");
        if m.payload.as_ref() == want_population.as_slice() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the population with the model never equalled the single ledger's:\n{:?}\nwant\n{:?}",
            v1::QueryReply::decode(m.payload.as_ref()),
            v1::QueryReply::decode(want_population.as_slice()),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for n in 0..P {
        let customer = customers
            .iter()
            .find(|c| partition_of(c, P) == n)
            .expect("a customer of the partition");
        let m = client
            .request("crm.query.churn", query(customer, Some(at)).into())
            .await
            .expect("churn");
        let views = reference
            .reads
            .customer(customer, AsOf::business(at))
            .expect("reference")
            .expect("known");
        let want = v1::QueryReply {
            result: Some(v1::query_reply::Result::Churn(views::churn(
                customer,
                &views.churn,
            ))),
        };
        assert_eq!(
            v1::QueryReply::decode(m.payload.as_ref()).expect("reply"),
            want,
            "churn of {customer} with the model"
        );
    }

    // The calibration/holdout evaluation across partitions (every partition's buyers with their
    // holdouts and warnings, merged in customer order) is the single ledger's, figure for
    // figure: over NATS, as `evaluate --remote` asks it, and over HTTP from another process.
    let holdout_end: Timestamp = "1998-06-30T00:00:00Z".parse().expect("time");
    let want = serde_json::to_value(
        touchledger_projector::evaluate::evaluate(
            &reference.reads,
            calibration_end,
            holdout_end,
            touchledger_domain::TimeUnit::Weeks,
        )
        .expect("reference evaluation"),
    )
    .expect("JSON");
    assert_eq!(
        want["evaluation"]["holdout_actual"], 1882,
        "the CDNOW sample's"
    );
    let m = client
        .request(
            "crm.model.evaluate",
            v1::EvaluateRequest {
                calibration_end: Some(touchledger_proto::to_pb_time(calibration_end)),
                holdout_end: Some(touchledger_proto::to_pb_time(holdout_end)),
                unit: v1::TimeUnit::Weeks as i32,
                record: false,
            }
            .encode_to_vec()
            .into(),
        )
        .await
        .expect("evaluate");
    let reply = v1::EvaluateReply::decode(m.payload.as_ref()).expect("evaluate reply");
    assert!(reply.error.is_none(), "{:?}", reply.error);
    let got: serde_json::Value = serde_json::from_str(&reply.evaluation_json).expect("JSON");
    assert_eq!(
        got, want,
        "the partitioned evaluation is the single ledger's"
    );
    let body = http_ok(
        children[2].http_port(),
        "/api/v1/models/evaluation?calibration_end=1997-09-30&holdout_end=1998-06-30",
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(got, want, "over HTTP too");

    http_reads_equal_the_single_ledger(&children, &reference, &customers, at).await;

    // A late arrival: a purchase that occurred before the kept month end, published now. Its
    // partition's check finds it, so the next month-end read is merged again and counts it
    // (the single ledger given the same purchase says so), then kept again.
    let late = {
        let mut e = events
            .iter()
            .find(|e| {
                e.kind() == EventKind::Purchase
                    && !e.customer_id.starts_with("cdnow-")
                    && e.occurred_at < MONTH_END.parse().expect("time")
            })
            .expect("a purchase before the month end")
            .clone();
        e.event_id = "late-arrival-1".into();
        e.occurred_at = "2025-06-20T12:00:00Z".parse().expect("time");
        if let touchledger_domain::Payload::Purchase(p) = &mut e.payload {
            p.order_id = "late-order-1".into();
            p.amount_minor += 123_456;
        }
        e
    };
    let me_path = format!("/api/v1/overview?as_of={MONTH_END}");
    let cached = http_ok(children[1].http_port(), &me_path).await;
    js.publish(
        format!("crm.touchpoint.purchase.{}", late.customer_id),
        encode_event(&late).into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    reference.append_touchpoints(vec![late.clone()]);
    let want = reference.overview(AsOf::business(MONTH_END.parse().expect("time")));
    assert_ne!(
        cached, want,
        "the late purchase changes the month-end population"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, head, body) =
            crate::http::get_with_head(children[1].http_port(), &me_path, None).await;
        if body == want {
            assert_eq!(
                crate::http::header(&head, "x-touchledger-source").as_deref(),
                Some("partitions"),
                "merged again: {head}"
            );
            break;
        }
        assert_eq!(body, cached, "either the kept population or the new one");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the month-end population never counted the late purchase"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, head, body) = crate::http::get_with_head(children[1].http_port(), &me_path, None).await;
    assert!(
        head.to_ascii_lowercase()
            .contains("x-touchledger-source: partitions_month_end"),
        "{head}"
    );
    assert_eq!(body, want);

    for (what, sub) in [("view", &mut live), ("alert", &mut alerts)] {
        for _ in 0..50 {
            let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .unwrap_or_else(|_| panic!("no {what}"))
                .expect("message");
            let customer = m.subject.as_str().rsplit('.').next().expect("customer");
            let partition = m
                .headers
                .as_ref()
                .and_then(|h| h.get(touchledger_bus::headers::PARTITION))
                .map(|p| p.as_str().to_owned());
            assert_eq!(
                partition,
                Some(partition_of(customer, P).to_string()),
                "{what} {}",
                m.subject
            );
        }
    }

    // An operator's view: every partition owned by the process given it, its feed holding its
    // records, nothing waiting for it in the intake.
    let status = cluster_status(&server.url()).await;
    let out = status.to_string();
    let parts = status["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 8, "{out}");
    for (n, p) in parts.iter().enumerate() {
        let owner = p["owner"]
            .as_str()
            .unwrap_or_else(|| panic!("no owner: {out}"));
        assert!(
            owner.contains(&format!("/{}/", owner_of(n as u32))),
            "partition {n} owned by {owner}"
        );
        assert!(p["feed_head"].as_u64().unwrap_or(0) > 0, "{p}");
        assert_eq!(p["intake_pending"].as_u64(), Some(0), "{p}");
        assert_eq!(p["intake_unacked"].as_u64(), Some(0), "{p}");
        assert_eq!(p["problems"], serde_json::json!([]), "{p}");
    }
    assert_eq!(status["problems"], serde_json::json!([]), "{out}");

    // One customer's history replayed over NATS by the customer alone: its partition's owner
    // answers, with exactly the customer's records.
    let someone = events
        .iter()
        .rev()
        .find(|e| e.customer_id.starts_with("cdnow-"))
        .map(|e| e.customer_id.clone())
        .expect("a CDNOW customer");
    let theirs = events.iter().filter(|e| e.customer_id == someone).count();
    let (code, out, err) = crate::cli::cli_blocking(&[
        "replay",
        "--remote",
        "--nats-url",
        &server.url(),
        "--partitions",
        "8",
        "--customer",
        &someone,
        "--kind",
        "purchase",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().count(), theirs, "{out}");
    assert!(
        out.lines()
            .all(|l| l.contains(&format!("\"customer_id\":\"{someone}\""))),
        "{out}"
    );

    // An auditor exports every partition over NATS into one file, each from its owner; the
    // file verifies on its own, partition by partition.
    let remote_file = dir.path().join("remote.jsonl");
    let (code, out, err) = crate::cli::cli_blocking(&[
        "export",
        "--remote",
        "--nats-url",
        &server.url(),
        "--partitions",
        "8",
        "--out",
        remote_file.to_str().expect("utf8"),
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let rf = remote_file.to_str().expect("utf8");
    let (code, out, err) = crate::cli::cli(&["verify", "--export", rf]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("of 8 partitions recompute"), "{out}");

    for child in &mut children {
        crate::partition::signal(child, "-TERM");
        let exit = child.wait().expect("wait");
        assert!(exit.success(), "serve: {exit}\n{}", logs());
    }

    // Every unique valid event exactly once, in its customer's partition (besides them, only
    // the assessors' ChurnRiskAssessed records); every undecodable message rejected.
    let mut stored = HashSet::new();
    let mut rejected = 0;
    for n in 0..P {
        let mut cfg = StoreConfig::new(data.join(format!("p{n}")));
        cfg.partition = PartitionId::new(n, P).expect("layout");
        let store = SledStore::open(cfg).expect("open partition");
        collect_touchpoints(&store, n, P, &mut stored);
        rejected += store.rejections().count() as u64;
    }
    let want: HashSet<String> = events
        .iter()
        .chain([&late])
        .map(|e| e.event_id.clone())
        .collect();
    assert_eq!(stored.len(), want.len());
    assert_eq!(stored, want);
    assert_eq!(rejected, bad);
    let d = data.to_str().expect("utf8");
    let (code, out, err) = crate::cli::cli(&["verify", "--data", d, "--partitions", "8"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches(": OK: ").count(), 8, "{out}");
    // The remote export holds what the stores held then: every line of it is a line of the
    // export of the stores written offline now (which may have grown by later assessments).
    let offline = dir.path().join("offline.jsonl");
    let (code, out, err) = crate::cli::cli(&[
        "export",
        "--data",
        d,
        "--partitions",
        "8",
        "--out",
        offline.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let offline = std::fs::read_to_string(&offline).expect("offline export");
    let offline: HashSet<&str> = offline.lines().collect();
    let remote = std::fs::read_to_string(&remote_file).expect("remote export");
    assert!(remote.lines().count() >= stored.len());
    for line in remote.lines() {
        assert!(offline.contains(line), "{line}");
    }
}

/// Add the event ids of partition `n` of `p`'s touchpoints in `store` to `stored`, checking
/// each is its customer's partition's and none is there twice (the ledger's own records besides
/// them: model fits, and the assessors' `ChurnRiskAssessed` of the partition's customers).
pub(crate) fn collect_touchpoints(store: &SledStore, n: u32, p: u32, stored: &mut HashSet<String>) {
    for r in store.read(&Default::default()) {
        let r = r.expect("record");
        if r.event.kind() == EventKind::ModelFitted {
            continue;
        }
        assert_eq!(partition_of(&r.event.customer_id, p), n);
        if r.event.kind() == EventKind::ChurnRiskAssessed {
            continue;
        }
        assert!(
            stored.insert(r.event.event_id.clone()),
            "{} twice",
            r.event.event_id
        );
    }
}

/// The customers whose current contribution (as the partitions answer a "now" read) differs
/// from an evaluation of the single ledger's facts at `at`.
async fn now_differences(
    client: &async_nats::Client,
    reference: &Reference,
    at: Timestamp,
) -> Vec<String> {
    let at = AsOf::business(at);
    let rules = Rules::default();
    let mut diff = Vec::new();
    for n in 0..P {
        let mut after = None;
        loop {
            let req = touchledger_projector::partial::PartialRequest {
                as_of: at,
                now: true,
                after,
                max_bytes: 1 << 18,
            };
            let r = client
                .request(
                    format!("crm.partition.{n}.query.partial"),
                    req.encode().into(),
                )
                .await
                .expect("partial");
            let page =
                touchledger_projector::partial::PartialPage::decode(&r.payload).expect("page");
            after = page.next.clone();
            for (id, c) in page.rows {
                let f = reference
                    .reads
                    .facts_in("churn", &id)
                    .expect("facts")
                    .unwrap_or_default();
                let v = rules.customer(&f, &f, &f, None, at);
                let want = touchledger_domain::population::Contribution::of(
                    &f,
                    &v,
                    &rules.satisfaction,
                    &rules.population,
                    rules.churn.lost_after_days,
                    at,
                );
                if want != c {
                    diff.push(format!("{id}: current {c:?}\n  want {want:?}"));
                }
            }
            if after.is_none() {
                break;
            }
        }
    }
    diff
}

/// The body of a `GET` that must answer 200.
async fn http_ok(port: u16, path: &str) -> String {
    let (status, body) = crate::http::get(port, path, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// JSON as it comes out of the API: through its text (so floats compare as the API prints
/// them).
fn as_served(v: &serde_json::Value) -> serde_json::Value {
    serde_json::from_str(&serde_json::to_string(v).expect("json")).expect("json")
}

/// The HTTP API of every process of the partitioned ledger answers as the single ledger's
/// would: customer pages (read models, timeline, ranks among every partition's buyers), the
/// overview and every order of the at-risk list at an instant; "now" ranks counted from the
/// partitions' current views equal the single ledger's at the reply's instant; `/readyz` names
/// the partitions each process owns.
async fn http_reads_equal_the_single_ledger(
    children: &[ServeChild],
    reference: &Reference,
    customers: &BTreeSet<&str>,
    at: Timestamp,
) {
    let as_of = AsOf::business(at);
    let ports: Vec<u16> = children.iter().map(ServeChild::http_port).collect();
    let owned = [vec!["0", "1", "2"], vec!["3", "4", "5"], vec!["6", "7"]];
    for (i, port) in ports.iter().enumerate() {
        // Ready once its partitions' read models have caught up (they have: the population
        // above was equal), and it says which partitions it holds.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let ready = loop {
            let (status, body) = crate::http::get(*port, "/readyz", None).await;
            if status == 200 {
                break body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never ready: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let ready: serde_json::Value = serde_json::from_str(&ready).expect("readyz JSON");
        let held: Vec<&str> = ready["owned"]
            .as_object()
            .expect("owned")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(held, owned[i], "{ready}");
        assert_eq!(ready["partitions"], 8, "{ready}");
    }

    // The dashboard's partitions card: every partition, its owner, from any process.
    let status: serde_json::Value =
        serde_json::from_str(&http_ok(ports[1], "/api/v1/partitions").await).expect("JSON");
    let parts = status["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 8, "{status}");
    for (i, held) in owned.iter().enumerate() {
        for n in held {
            let p = &parts[n.parse::<usize>().expect("n")];
            let owner = p["owner"].as_str().unwrap_or_default();
            assert!(
                owner.contains(&format!("/{}/", children[i].id())),
                "partition {n} owned by {owner}, not process {i}"
            );
            assert!(p["feed_head"].as_u64().unwrap_or(0) > 0, "{p}");
        }
    }

    // The overview at the instant, byte for byte, from each process.
    let want = serde_json::to_string(
        &serde_json::to_value(reference.reads.population(as_of).expect("population"))
            .expect("json"),
    )
    .expect("json");
    for port in &ports {
        let body = http_ok(*port, &format!("/api/v1/overview?as_of={AS_OF}")).await;
        assert_eq!(body, want, "overview through port {port}");
    }

    // A closed month end, on both axes: the first read merges every partition's
    // contributions, the next is the population the router kept (every partition saying
    // nothing it logged since could change it), both the single ledger's byte for byte.
    for axis in ["business", "knowledge"] {
        let at: Timestamp = MONTH_END.parse().expect("time");
        let as_of = if axis == "business" {
            AsOf::business(at)
        } else {
            AsOf {
                at,
                axis: touchledger_domain::facts::Axis::Knowledge,
            }
        };
        let want = reference.overview(as_of);
        let path = format!("/api/v1/overview?as_of={MONTH_END}&axis={axis}");
        for source in ["partitions", "partitions_month_end"] {
            let (status, head, body) = crate::http::get_with_head(ports[1], &path, None).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                crate::http::header(&head, "x-touchledger-source").as_deref(),
                Some(source),
                "{axis} month end, {source} expected: {head}"
            );
            assert_eq!(body, want, "{axis} month end from {source}");
        }
    }

    // The "now" overview: summed in the partitions (RFM thresholds and pyramid cuts found
    // across them, each partition adding up its own customers), equal to the single ledger's
    // population at the reply's instant.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, head, body) =
            crate::http::get_with_head(ports[2], "/api/v1/overview", None).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("x-touchledger-source: partitions_summed"),
            "{head}"
        );
        let got: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let now: Timestamp = got["as_of"]["at"]
            .as_str()
            .or(got["as_of"].as_str())
            .expect("as_of")
            .parse()
            .expect("time");
        let want = serde_json::to_string(
            &serde_json::to_value(
                reference
                    .reads
                    .population(AsOf::business(now))
                    .expect("population"),
            )
            .expect("json"),
        )
        .expect("json");
        if body == want {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the summed now overview never equalled the single ledger's:\n{body}\nwant\n{want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Customer pages: one customer of each partition, through a process that does not own it
    // (every field but each record's position, version and recording time, which are the
    // partition log's).
    let strip = |mut v: serde_json::Value| {
        for e in v["timeline"].as_array_mut().into_iter().flatten() {
            let o = e.as_object_mut().expect("entry");
            o.remove("position");
            o.remove("recorded_at");
            // (The partition's log also holds the assessor's `ChurnRiskAssessed` records,
            // which take customer versions; the reference has no assessor.)
            o.remove("customer_version");
        }
        v
    };
    for n in 0..P {
        let customer = customers
            .iter()
            .rev()
            .find(|c| {
                partition_of(c, P) == n && reference.reads.ranks(c, as_of).ok().flatten().is_some()
            })
            .expect("a buyer of the partition");
        let port = ports[(owned
            .iter()
            .position(|o| o.contains(&n.to_string().as_str()))
            .expect("owner")
            + 1)
            % 3];
        let body = http_ok(port, &format!("/api/v1/customers/{customer}?as_of={AS_OF}")).await;
        let mut want = touchledger_projector::api::customer_page(
            &reference.store,
            &reference.reads,
            customer,
            as_of,
            200,
        )
        .expect("page")
        .expect("known");
        want.insert(
            "ranks".into(),
            serde_json::json!(reference.reads.ranks(customer, as_of).expect("ranks")),
        );
        let got: serde_json::Value = serde_json::from_str(&body).expect("page JSON");
        assert_eq!(
            strip(got),
            strip(as_served(&serde_json::Value::Object(want))),
            "page of {customer} (partition {n}) through port {port}"
        );

        // "Now": ranks counted from every partition's current views equal the single
        // ledger's at the reply's instant.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let body = http_ok(port, &format!("/api/v1/customers/{customer}")).await;
            let got: serde_json::Value = serde_json::from_str(&body).expect("page JSON");
            let now: Timestamp = got["as_of"].as_str().expect("as_of").parse().expect("time");
            let want = reference
                .reads
                .ranks(customer, AsOf::business(now))
                .expect("ranks");
            if got["ranks"] == as_served(&serde_json::json!(want)) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "now ranks of {customer}: {} want {want:?}",
                got["ranks"]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let (status, body) = crate::http::get(ports[0], "/api/v1/customers/nobody-at-all", None).await;
    assert_eq!(status, 404, "{body}");

    // A page deeper than a partition may send in one message is refused, saying so.
    let (status, body) =
        crate::http::get(ports[0], "/api/v1/at-risk?per_page=500&page=3", None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("at most the first 1000 rows"), "{body}");

    // The at-risk list at the instant, every order, two pages: the partitions' first rows
    // merged are the single ledger's page.
    for sort in ["score", "value", "since", "customer", "level"] {
        for (page, order) in [(1, "desc"), (2, "asc")] {
            let req = touchledger_projector::api::AtRiskRequest {
                as_of,
                now: false,
                min_level: touchledger_domain::ChurnLevel::Watch,
                level: None,
                cause: None,
                reason: None,
                sort: sort.into(),
                ascending: order == "asc",
                offset: (page - 1) * 50,
                limit: 50,
            };
            let want = req.answer(&reference.reads, None).expect("at-risk");
            assert!(want.items.len() == 50, "a full page to compare ({sort})");
            let path = format!(
                "/api/v1/at-risk?as_of={AS_OF}&sort={sort}&order={order}&page={page}&per_page=50"
            );
            let got: serde_json::Value =
                serde_json::from_str(&http_ok(ports[page % 3], &path).await).expect("JSON");
            assert_eq!(got["total"], want.total, "{path}");
            assert_eq!(
                got["items"],
                as_served(&serde_json::json!(want.items)),
                "{path}"
            );
        }
    }
}
