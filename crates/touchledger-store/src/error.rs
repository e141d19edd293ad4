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
