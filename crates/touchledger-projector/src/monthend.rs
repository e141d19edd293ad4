//! Month-end population snapshots: the population read model at the end of each closed month
//! (the first instant of the next month), on either axis, kept so that the common audit and
//! reporting read — "the overview at the end of October" — is a lookup, not a pass over every
//! customer.
//!
//! Key decisions:
//! * A snapshot is exactly the full pass ([`ReadModels::population`]) at its instant, stored as
//!   JSON with the log position it reflects (`checked_to`). It stays valid while no event after
//!   that position could change it: on the business axis an event that occurred by the instant
//!   (a late arrival, a backdated fit) or any retraction (it corrects history whenever it is
//!   recorded); on the knowledge axis an event recorded by the instant.
//!   Each read checks only the events appended since the last check (the store skips blocks
//!   whose business-time range cannot match), then moves `checked_to`; an invalid snapshot is
//!   recomputed by the read that finds it so.
//! * Snapshots are taken when a month closes (the read-model service does it in the background)
//!   and on the first read of a month end; they are rebuildable, versioned with the rules like
//!   the current materialisation, and reset with the projections.

use serde::{Deserialize, Serialize};
use touchledger_domain::facts::{AsOf, Axis, day_of, day_start};
use touchledger_domain::population::{PopulationView, Rules, month_of, month_start};
use touchledger_domain::{EventKind, Timestamp};
use touchledger_store::{EventStore, ProjectionMeta, ProjectionTree, ReadFilter};

use crate::{ProjectorError, ReadModels};

/// The tree's name (`proj.monthend`).
pub const TREE: &str = "monthend";

/// One stored snapshot (bincode 2; the view inside is JSON, exactly what the API returns).
#[derive(Serialize, Deserialize)]
struct Snapshot {
    /// The population read model, JSON.
    view: Vec<u8>,
    /// The last log position checked (or folded into the view).
    checked_to: u64,
}

/// The month-end snapshots of one ledger.
#[derive(Debug)]
pub struct MonthEnds {
    tree: ProjectionTree,
}

/// Whether `at` is the end of a month: the first instant of a month (UTC).
pub fn is_month_end(at: Timestamp) -> bool {
    let d = day_of(at);
    day_start(month_start(month_of(d))) == at
}

/// The end of the last month closed by `now`: the first instant of `now`'s month.
pub fn last_month_end(now: Timestamp) -> Timestamp {
    day_start(month_start(month_of(day_of(now))))
}

fn key(as_of: AsOf) -> String {
    let axis = match as_of.axis {
        Axis::Business => "b",
        Axis::Knowledge => "k",
    };
    format!("{axis}{:020}", as_of.at.unix_nanos())
}

impl MonthEnds {
    /// Open the snapshots in `tree` for `rules`; snapshots of other rules are dropped.
    pub fn open(tree: ProjectionTree, rules: &Rules) -> Result<MonthEnds, ProjectorError> {
        let want = crate::current::version(rules);
        if tree.meta()?.is_none_or(|m| m.version != want) {
            tree.reset(want)?;
        }
        Ok(MonthEnds { tree })
    }

    /// The population at `as_of`, which must be a month end ([`is_month_end`]) passed by
    /// `now`: the snapshot when it is still valid, else a full pass, stored for next time.
    /// Returns the view and whether it came from a snapshot. `None` for an instant that is not
    /// a passed month end.
    pub fn population(
        &self,
        reads: &ReadModels,
        store: &dyn EventStore,
        as_of: AsOf,
        now: Timestamp,
    ) -> Result<Option<(PopulationView, bool)>, ProjectorError> {
        if !is_month_end(as_of.at) || as_of.at >= now {
            return Ok(None);
        }
        let k = key(as_of);
        // What a full pass reads now: the churn projection up to its checkpoint.
        let folded = reads.checkpoints()?[2];
        if let Some(bytes) = self.tree.get(&k)?
            && let Ok((snap, _)) = bincode::serde::decode_from_slice::<Snapshot, _>(
                &bytes,
                bincode::config::standard(),
            )
            && snap.checked_to <= folded
            && unchanged_since(store, as_of, snap.checked_to, folded)?
            && let Ok(view) = serde_json::from_slice::<PopulationView>(&snap.view)
        {
            if snap.checked_to < folded {
                self.put(&k, &snap.view, folded)?;
            }
            return Ok(Some((view, true)));
        }
        let view = reads.population(as_of)?;
        let json = serde_json::to_vec(&view).unwrap_or_default();
        self.put(&k, &json, folded)?;
        Ok(Some((view, false)))
    }

    /// Take the snapshots of the last month end closed by `now` on both axes, if missing.
    /// Returns how many were taken.
    pub fn close_month(
        &self,
        reads: &ReadModels,
        store: &dyn EventStore,
        now: Timestamp,
    ) -> Result<usize, ProjectorError> {
        let at = last_month_end(now);
        let mut taken = 0;
        for axis in [Axis::Business, Axis::Knowledge] {
            let as_of = AsOf { at, axis };
            if self.tree.get(&key(as_of))?.is_none()
                && self
                    .population(reads, store, as_of, now)?
                    .is_some_and(|(_, hit)| !hit)
            {
                taken += 1;
            }
        }
        Ok(taken)
    }

    fn put(&self, k: &str, view: &[u8], checked_to: u64) -> Result<(), ProjectorError> {
        let snap = Snapshot {
            view: view.to_vec(),
            checked_to,
        };
        let bytes =
            bincode::serde::encode_to_vec(&snap, bincode::config::standard()).unwrap_or_default();
        let meta = self.tree.meta()?.unwrap_or(ProjectionMeta {
            version: 0,
            checkpoint: 0,
        });
        self.tree
            .apply([(k, bytes.as_slice())], std::iter::empty(), Some(meta))?;
        Ok(())
    }
}

/// Whether no event at positions `from + 1 ..= to` of `store` can change the population at
/// `as_of`: on the business axis none occurred by `as_of.at` (a late arrival, a backdated fit)
/// and none is a retraction (it takes its event out of every business-axis read, whenever it was
/// recorded); on the knowledge axis none was recorded by it. What keeps a month-end snapshot valid, here and
/// in a partitioned ledger's router (each partition checks its own log).
pub fn unchanged_since(
    store: &dyn EventStore,
    as_of: AsOf,
    from: u64,
    to: u64,
) -> Result<bool, ProjectorError> {
    if from >= to {
        return Ok(true);
    }
    match as_of.axis {
        // Positions are recorded in order: only the first new one can be recorded by then.
        Axis::Knowledge => Ok(store
            .get(from + 1)?
            .is_none_or(|c| c.recorded_at > as_of.at)),
        Axis::Business => {
            let late = store
                .read(&ReadFilter {
                    from_position: from + 1,
                    to_position: Some(to),
                    occurred_until: Some(Timestamp::from_unix_nanos(
                        as_of.at.unix_nanos().saturating_add(1),
                    )),
                    ..Default::default()
                })
                .next()
                .transpose()?;
            if late.is_some() {
                return Ok(false);
            }
            // The business axis drops a retracted fact whenever the retraction was recorded,
            // so any retraction since may take away an event that occurred by the instant.
            // (Retractions are rare: the kind index finds them without reading the rest.)
            let retraction = store
                .read(&ReadFilter {
                    from_position: from + 1,
                    to_position: Some(to),
                    kind: Some(EventKind::Retraction),
                    ..Default::default()
                })
                .next()
                .transpose()?;
            Ok(retraction.is_none())
        }
    }
}
