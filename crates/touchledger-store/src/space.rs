//! Free space: the store stops writing before sled meets a full disk.
//!
//! sled 0.34 does not survive ENOSPC well: a snapshot half written when the disk filled makes
//! the next open fail, and writes that failed in its background flusher leave the in-memory
//! state ahead of the disk. So every commit first asks the filesystem (`statvfs`, one syscall)
//! how much is free and refuses with [`crate::StoreError::StorageFull`] below the reserve:
//! nothing of that batch is written, the writer stays usable, and the caller retries later.

use std::path::Path;

/// How much free space the store keeps on its filesystem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpaceReserve {
    /// At least this many bytes. Default 256 MiB.
    pub min_bytes: u64,
    /// At least this share of the filesystem, in percent. Default 5.
    pub percent: f64,
    /// Plus room for sled to write its next snapshot: this many times the size of the newest
    /// snapshot file. Default 2.
    pub snapshot_factor: u64,
}

impl Default for SpaceReserve {
    fn default() -> Self {
        SpaceReserve {
            min_bytes: 256 * 1024 * 1024,
            percent: 5.0,
            snapshot_factor: 2,
        }
    }
}

impl SpaceReserve {
    /// No reserve at all (the check is skipped).
    pub const NONE: SpaceReserve = SpaceReserve {
        min_bytes: 0,
        percent: 0.0,
        snapshot_factor: 0,
    };

    /// Whether the check is switched off.
    pub fn is_none(&self) -> bool {
        self.min_bytes == 0 && self.percent <= 0.0 && self.snapshot_factor == 0
    }

    /// The reserve in bytes for a filesystem of `total` bytes whose newest snapshot has
    /// `snapshot` bytes.
    pub fn bytes(&self, total: u64, snapshot: u64) -> u64 {
        let share = (total as f64 * self.percent.max(0.0) / 100.0) as u64;
        self.min_bytes
            .max(share)
            .saturating_add(snapshot.saturating_mul(self.snapshot_factor))
    }
}

/// The free space of the filesystem holding `dir`, as seen by an unprivileged writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeSpace {
    /// Bytes available to this process.
    pub available: u64,
    /// Size of the filesystem.
    pub total: u64,
}

/// `statvfs` on `dir`.
pub fn free_space(dir: &Path) -> std::io::Result<FreeSpace> {
    let s = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    let block = s.f_frsize.max(1);
    Ok(FreeSpace {
        available: s.f_bavail.saturating_mul(block),
        total: s.f_blocks.saturating_mul(block),
    })
}

/// The size of the newest `snap.*` file in `dir` (0 when there is none).
pub(crate) fn newest_snapshot_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
        .max_by_key(|e| e.file_name())
        .and_then(|e| e.metadata().ok())
        .map_or(0, |m| m.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_the_larger_floor_plus_snapshot_room() {
        let r = SpaceReserve::default();
        // 1 GiB filesystem: 5 % = 51 MiB < 256 MiB.
        assert_eq!(r.bytes(1 << 30, 0), 256 << 20);
        // 100 GiB: 5 % = 5 GiB.
        assert_eq!(r.bytes(100 << 30, 0), 5 << 30);
        assert_eq!(r.bytes(1 << 30, 10 << 20), (256 << 20) + (20 << 20));
        assert!(SpaceReserve::NONE.is_none());
        assert_eq!(SpaceReserve::NONE.bytes(1 << 40, 1 << 30), 0);
    }

    #[test]
    fn statvfs_reports_a_plausible_filesystem() {
        let dir = tempfile::tempdir().expect("test");
        let f = free_space(dir.path()).expect("test");
        assert!(f.total > 0 && f.available <= f.total, "{f:?}");
    }
}
