//! Projection state trees: where a read-model projector keeps its per-customer state and its
//! checkpoint.
//!
//! Key decisions:
//! * One sled tree per projection (`proj.<name>`), beside the ledger's tree in the same
//!   database (in-process projectors) or in a database of its own (remote projectors,
//!   [`ProjectionDb`]). State values are opaque bytes: the projector owns their encoding.
//! * State writes and the checkpoint (the last position folded, and the projection version)
//!   go in **one** sled batch, which sled applies atomically, also across a crash: after a
//!   restart the state is exactly the fold of positions `1..=checkpoint`, so resuming from
//!   `checkpoint + 1` neither loses nor double-counts anything.
//! * Commits are not flushed one by one: projection state can always be rebuilt from the
//!   ledger, and an unflushed batch lost in a crash only rewinds the checkpoint with it.
//! * A reset removes the checkpoint *first* (flushed), then the states: a crash in between
//!   leaves a tree without a checkpoint, which the projector treats as "rebuild from scratch".

use std::path::Path;

use crate::StoreError;

const META: &[u8] = b"\x00meta";
const STATE: u8 = b's';

/// A projection's checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectionMeta {
    /// The projection's fold version the state was built with.
    pub version: u32,
    /// The last ledger position folded into the state.
    pub checkpoint: u64,
}

impl ProjectionMeta {
    fn encode(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&self.version.to_be_bytes());
        b[4..].copy_from_slice(&self.checkpoint.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let version = u32::from_be_bytes(b.get(..4)?.try_into().ok()?);
        let checkpoint = u64::from_be_bytes(b.get(4..12)?.try_into().ok()?);
        Some(ProjectionMeta {
            version,
            checkpoint,
        })
    }
}

fn state_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(STATE);
    k.extend_from_slice(key.as_bytes());
    k
}

/// One projection's state tree.
#[derive(Clone)]
pub struct ProjectionTree {
    db: sled::Db,
    tree: sled::Tree,
}

impl std::fmt::Debug for ProjectionTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionTree")
            .field("tree", &String::from_utf8_lossy(&self.tree.name()))
            .finish()
    }
}

impl ProjectionTree {
    pub(crate) fn open(db: &sled::Db, name: &str) -> Result<Self, StoreError> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(StoreError::Config(format!(
                "projection name {name:?} must be ASCII letters, digits or _"
            )));
        }
        Ok(ProjectionTree {
            db: db.clone(),
            tree: db.open_tree(format!("proj.{name}"))?,
        })
    }

    /// The checkpoint, or `None` for a new (or half-reset) tree.
    pub fn meta(&self) -> Result<Option<ProjectionMeta>, StoreError> {
        match self.tree.get(META)? {
            None => Ok(None),
            Some(v) => ProjectionMeta::decode(&v)
                .map(Some)
                .ok_or_else(|| StoreError::corrupt("projection checkpoint", "not 12 bytes")),
        }
    }

    /// The state stored under `key` (a customer id).
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(state_key(key))?.map(|v| v.to_vec()))
    }

    /// Write `states` and the checkpoint `meta` atomically.
    pub fn commit<'a>(
        &self,
        states: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        meta: ProjectionMeta,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, v) in states {
            batch.insert(state_key(k), v);
        }
        batch.insert(META, &meta.encode());
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Write `states`, remove `removed` and (if given) set the checkpoint, atomically.
    pub fn apply<'a>(
        &self,
        states: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        removed: impl IntoIterator<Item = &'a str>,
        meta: Option<ProjectionMeta>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, v) in states {
            batch.insert(state_key(k), v);
        }
        for k in removed {
            batch.remove(state_key(k));
        }
        if let Some(m) = meta {
            batch.insert(META, &m.encode());
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Remove every state and start again at `version`, checkpoint 0.
    pub fn reset(&self, version: u32) -> Result<(), StoreError> {
        self.tree.remove(META)?;
        self.db.flush()?;
        self.tree.clear()?;
        self.commit(
            std::iter::empty(),
            ProjectionMeta {
                version,
                checkpoint: 0,
            },
        )?;
        self.db.flush()?;
        Ok(())
    }

    /// Remove the checkpoint (flushed) and keep the states: the tree then counts as "rebuild
    /// from scratch" on open until [`ProjectionTree::commit`] writes a checkpoint again. A bulk
    /// rebuild writes its states in several batches between the two, so a crash in between
    /// can never leave a checkpoint beside a partial state.
    pub fn clear_checkpoint(&self) -> Result<(), StoreError> {
        self.tree.remove(META)?;
        self.db.flush()?;
        Ok(())
    }

    /// Every state, in key order, lazily.
    pub fn states(
        &self,
    ) -> impl Iterator<Item = Result<(String, Vec<u8>), StoreError>> + Send + 'static {
        self.tree.scan_prefix([STATE]).map(|r| {
            let (k, v) = r?;
            let key = String::from_utf8(k[1..].to_vec())
                .map_err(|_| StoreError::corrupt("projection state key", "not UTF-8"))?;
            Ok((key, v.to_vec()))
        })
    }

    /// The states after key `after` (all with `None`), in key order, lazily.
    pub fn states_after(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = Result<(String, Vec<u8>), StoreError>> + Send + 'static {
        let start = match after {
            None => std::ops::Bound::Included(vec![STATE]),
            Some(k) => {
                let mut key = Vec::with_capacity(k.len() + 1);
                key.push(STATE);
                key.extend_from_slice(k.as_bytes());
                std::ops::Bound::Excluded(key)
            }
        };
        self.tree
            .range::<Vec<u8>, _>((start, std::ops::Bound::Excluded(vec![STATE + 1])))
            .map(|r| {
                let (k, v) = r?;
                let key = String::from_utf8(k[1..].to_vec())
                    .map_err(|_| StoreError::corrupt("projection state key", "not UTF-8"))?;
                Ok((key, v.to_vec()))
            })
    }

    /// Make everything committed so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// A due-time index: which customer must be looked at again, and when. Keys are
/// `d ‖ instant ‖ customer` (time-ordered, so the due entries are a prefix range) and
/// `c ‖ customer → instant` (to move an entry); both change in one atomic batch.
#[derive(Clone)]
pub struct DueIndex {
    tree: sled::Tree,
}

impl std::fmt::Debug for DueIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DueIndex")
            .field("len", &self.tree.len())
            .finish()
    }
}

fn due_key(at: touchledger_domain::Timestamp, customer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + customer.len());
    k.push(b'd');
    k.extend_from_slice(&at.to_key_bytes());
    k.extend_from_slice(customer.as_bytes());
    k
}

impl DueIndex {
    pub(crate) fn open(db: &sled::Db, name: &str) -> Result<Self, StoreError> {
        Ok(DueIndex {
            tree: db.open_tree(format!("due.{name}"))?,
        })
    }

    /// Schedule `customer` at `at`, replacing any earlier schedule.
    pub fn schedule(
        &self,
        customer: &str,
        at: touchledger_domain::Timestamp,
    ) -> Result<(), StoreError> {
        let mut ckey = vec![b'c'];
        ckey.extend_from_slice(customer.as_bytes());
        let mut batch = sled::Batch::default();
        if let Some(old) = self.tree.get(&ckey)? {
            let b: [u8; 8] = old
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::corrupt("due index", "instant is not 8 bytes"))?;
            batch.remove(due_key(
                touchledger_domain::Timestamp::from_key_bytes(b),
                customer,
            ));
        }
        batch.insert(due_key(at, customer), &[][..]);
        batch.insert(ckey, &at.to_key_bytes()[..]);
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// When `customer` is scheduled, if at all.
    pub fn scheduled(
        &self,
        customer: &str,
    ) -> Result<Option<touchledger_domain::Timestamp>, StoreError> {
        let mut ckey = vec![b'c'];
        ckey.extend_from_slice(customer.as_bytes());
        Ok(self.tree.get(ckey)?.and_then(|v| {
            <[u8; 8]>::try_from(v.as_ref())
                .ok()
                .map(touchledger_domain::Timestamp::from_key_bytes)
        }))
    }

    /// Up to `limit` customers due at or before `now`, earliest first. Cost: O(due), not
    /// O(scheduled).
    pub fn due(
        &self,
        now: touchledger_domain::Timestamp,
        limit: usize,
    ) -> Result<Vec<(touchledger_domain::Timestamp, String)>, StoreError> {
        let mut end = vec![b'd'];
        end.extend_from_slice(&now.to_key_bytes());
        end.push(0xff);
        let mut out = Vec::new();
        for r in self.tree.range(&b"d"[..]..end.as_slice()).take(limit) {
            let (k, _) = r?;
            let at: [u8; 8] = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| StoreError::corrupt("due index", "short key"))?;
            let at = touchledger_domain::Timestamp::from_key_bytes(at);
            if at > now {
                break;
            }
            let customer = String::from_utf8(k[9..].to_vec())
                .map_err(|_| StoreError::corrupt("due index", "customer not UTF-8"))?;
            out.push((at, customer));
        }
        Ok(out)
    }

    /// Customers scheduled.
    pub fn len(&self) -> usize {
        self.tree.len() / 2
    }

    /// Whether nobody is scheduled.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

/// A database of projection trees only, for projectors running apart from the ledger.
#[derive(Clone, Debug)]
pub struct ProjectionDb {
    db: sled::Db,
}

impl ProjectionDb {
    /// Open (or create) a projection database in `path`. Waits up to 2 s for the directory
    /// lock (a previous handle's background flusher releases it shortly after the drop).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = crate::sled_store::open_locked(
            &sled::Config::new().path(path),
            path,
            std::time::Duration::from_secs(2),
        )?;
        Ok(ProjectionDb { db })
    }

    /// The tree of projection `name`.
    pub fn projection(&self, name: &str) -> Result<ProjectionTree, StoreError> {
        ProjectionTree::open(&self.db, name)
    }

    /// The due-time index `name`.
    pub fn due_index(&self, name: &str) -> Result<DueIndex, StoreError> {
        DueIndex::open(&self.db, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_reset_and_iterate() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = ProjectionDb::open(dir.path()).expect("open");
        let t = db.projection("loyalty").expect("tree");
        assert_eq!(t.meta().expect("meta"), None);
        let m = ProjectionMeta {
            version: 3,
            checkpoint: 42,
        };
        t.commit([("a", &b"1"[..]), ("b", &b"2"[..])], m)
            .expect("commit");
        assert_eq!(t.meta().expect("meta"), Some(m));
        assert_eq!(t.get("a").expect("get").as_deref(), Some(&b"1"[..]));
        let all: Vec<String> = t.states().map(|r| r.expect("state").0).collect();
        assert_eq!(all, ["a", "b"]);
        t.reset(4).expect("reset");
        assert_eq!(t.states().count(), 0);
        assert_eq!(
            t.meta().expect("meta"),
            Some(ProjectionMeta {
                version: 4,
                checkpoint: 0
            })
        );
        assert!(db.projection("no.dots").is_err());
    }

    #[test]
    fn due_index_moves_entries_and_returns_only_due() {
        use touchledger_domain::Timestamp as T;
        let dir = tempfile::tempdir().expect("tmp");
        let db = ProjectionDb::open(dir.path()).expect("open");
        let d = db.due_index("churn").expect("index");
        d.schedule("a", T::from_unix_nanos(30)).expect("a");
        d.schedule("b", T::from_unix_nanos(10)).expect("b");
        d.schedule("c", T::from_unix_nanos(-5)).expect("c");
        d.schedule("a", T::from_unix_nanos(5)).expect("a moved");
        assert_eq!(d.len(), 3);
        let due: Vec<String> = d
            .due(T::from_unix_nanos(10), 10)
            .expect("due")
            .into_iter()
            .map(|x| x.1)
            .collect();
        assert_eq!(due, ["c", "a", "b"]);
        assert_eq!(d.due(T::from_unix_nanos(9), 10).expect("due").len(), 2);
        assert_eq!(d.due(T::from_unix_nanos(10), 1).expect("due").len(), 1);
        assert_eq!(d.scheduled("a").expect("a"), Some(T::from_unix_nanos(5)));
    }
}
