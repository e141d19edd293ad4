//! Builders for test events and stores.

use std::sync::Arc;

use tempfile::TempDir;
use touchledger_domain::{Channel, Event, Payload, Purchase, Retraction, Timestamp};
use touchledger_store::{SledStore, StoreConfig};

/// The fixed "now" of stores opened with [`fixed_clock_store`].
pub fn now() -> Timestamp {
    "2026-06-01T00:00:00Z".parse().expect("time")
}

/// A store in `dir` whose clock always reads [`now`]. It checkpoints every 10 positions and
/// writes its customer index every 7 events, so that tests cross both often (and the
/// in-memory part of the customer index is rebuilt on most reopens).
pub fn fixed_clock_store(dir: &std::path::Path) -> SledStore {
    let mut cfg = StoreConfig::new(dir);
    cfg.clock = Arc::new(now);
    cfg.checkpoint_interval = 10;
    cfg.customer_index_batch = 7;
    cfg.cache_capacity = 16 * 1024 * 1024;
    SledStore::open(cfg).expect("open store")
}

/// A temp dir and a fixed-clock store in it.
pub fn temp_store() -> (TempDir, SledStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = fixed_clock_store(dir.path());
    (dir, store)
}

/// A valid purchase.
pub fn purchase(event_id: &str, customer: &str, amount_minor: i64) -> Event {
    Event {
        event_id: event_id.into(),
        customer_id: customer.into(),
        occurred_at: "2026-05-01T10:00:00Z".parse().expect("time"),
        source: "shop".into(),
        schema_version: 1,
        correlation_id: None,
        causation_id: None,
        payload: Payload::Purchase(Purchase {
            order_id: format!("ord-{event_id}"),
            amount_minor,
            currency: "EUR".into(),
            item_count: 1,
            channel: Some(Channel::Web),
            category: "music".into(),
        }),
    }
}

/// A valid retraction of `target`.
pub fn retraction(event_id: &str, customer: &str, target: &str) -> Event {
    Event {
        payload: Payload::Retraction(Retraction {
            retracted_event_id: target.into(),
            reason: "entered in error".into(),
        }),
        ..purchase(event_id, customer, 0)
    }
}
