//! Store errors: failures of the storage itself. Expected outcomes (duplicates, rejections,
//! version conflicts, a failed verification) are values, not errors.

use std::path::PathBuf;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed (I/O, disk full, corruption reported by sled). For an append
    /// this means nothing of the batch was acknowledged: retry later or stop; never ack upstream.
    #[error("storage engine failed: {0}")]
    Engine(#[from] sled::Error),

    /// Another process holds the data directory (sled's file lock). Stop the other process or
    /// use another directory.
    #[error("data directory {path} is in use by another process")]
    Locked {
        /// The directory.
        path: PathBuf,
    },

    /// The directory holds a ledger written in another on-disk format. Use a touchledger build
    /// that reads format `found`, or export with it and re-import.
    #[error(
        "data directory {path} has on-disk format version {found}, this build reads version {expected}"
    )]
    FormatMismatch {
        /// The directory.
        path: PathBuf,
        /// Version found on disk.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },

    /// The directory holds sled data that is not a touchledger store (no format marker).
    /// Point `--data` at an empty or touchledger directory.
    #[error("data directory {path} holds data that is not a touchledger ledger (no format marker)")]
    NotALedger {
        /// The directory.
        path: PathBuf,
    },

    /// A stored record could not be read back (run `verify` to locate all damage).
    #[error("stored data is damaged at {what}: {detail}")]
    Corrupt {
        /// Which key, e.g. `position 42`.
        what: String,
        /// What is wrong.
        detail: String,
    },

    /// An earlier append failed inside the storage engine; the in-memory state can no longer be
    /// trusted to match the disk. Reopen the store (restart the process); the durable state is
    /// intact and nothing unacknowledged was reported as stored.
    #[error("an earlier write failed; reopen the store before appending again")]
    NeedsReopen,

    /// The filesystem of the data directory has less free space than the store's reserve
    /// ([`crate::SpaceReserve`]). Nothing of the batch was written and the store stays usable:
    /// retry when space has been freed (or the reserve lowered).
    #[error(
        "storage full: {available} bytes free on the filesystem of {path}, the store keeps {reserve} in reserve; nothing of this batch was written"
    )]
    StorageFull {
        /// The data directory.
        path: PathBuf,
        /// Bytes free.
        available: u64,
        /// Bytes the store keeps free.
        reserve: u64,
    },

    /// sled found damaged data while opening the directory (its log `db`, a snapshot it could
    /// not set aside, or its settings). Nothing was changed. Restore the ledger into a new
    /// directory from an export (`touchledger restore`) or from a copy of the directory.
    #[error(
        "data directory {path} is damaged ({detail}); nothing was changed. Restore it into a new directory from an export (`touchledger restore --from FILE --data NEW_DIR`) or from a backup copy; see docs/operations.md"
    )]
    Damaged {
        /// The directory.
        path: PathBuf,
        /// What sled reported.
        detail: String,
    },

    /// sled cannot read this directory's storage format or settings (written by another sled
    /// version, or settings that differ). Use the touchledger build that wrote it.
    #[error(
        "data directory {path} was written in a storage format this build cannot read: {detail}"
    )]
    Unsupported {
        /// The directory.
        path: PathBuf,
        /// What sled reported.
        detail: String,
    },

    /// The directory holds another partition of a partitioned ledger than the one asked for, or
    /// a ledger of another partition count. A ledger's partition count is fixed when it is
    /// created; changing it is a migration (export, then re-append into a new ledger).
    #[error("data directory {path} holds {found} of the ledger, not {expected}")]
    PartitionMismatch {
        /// The directory.
        path: PathBuf,
        /// What the directory holds.
        found: touchledger_domain::partition::PartitionId,
        /// What was asked for.
        expected: touchledger_domain::partition::PartitionId,
    },

    /// Preparing the data directory failed (listing it, moving a leftover into quarantine).
    #[error("cannot prepare data directory {path}: {source}")]
    Prepare {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// A restore input does not continue the chain (see `SledStore::restore`).
    #[error("restore refused at position {position}: {detail}")]
    RestoreMismatch {
        /// The first position that does not match.
        position: u64,
        /// What does not match.
        detail: String,
    },

    /// The configuration is invalid (e.g. checkpoint interval 0).
    #[error("invalid store configuration: {0}")]
    Config(String),
}

impl StoreError {
    pub(crate) fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }
}
