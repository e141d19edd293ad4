//! Leftovers of sled 0.34 that make a healthy store unopenable, moved aside before the open.
//!
//! sled keeps its recovery snapshot in `snap.<LSN>` files beside the log (`db`) and its settings
//! in `conf`. On open it lists every file whose name starts with `snap.`, sorts the names and
//! reads the last one; if that file is empty or fails its CRC the whole open fails with
//! "Read corrupted data" (upstream issue #1527). A snapshot is only an index into the log: sled
//! rebuilds it from the log when none is usable, so a snapshot that is not whole never holds
//! anything the log does not. The cases handled here (ADR 0007):
//!
//! * `snap.<LSN>.generating`: a snapshot sled began to write and never renamed (a crash or a
//!   full disk while writing). It sorts after the finished `snap.<LSN>` and is always picked.
//! * `snap.<LSN>` whose trailer (length, CRC32 of the body) does not match its body: a finished
//!   snapshot damaged afterwards.
//! * `conf` whose CRC32 does not match: sled warns and then fails to decode it. touchledger
//!   always opens sled with the same storage parameters, so sled writes an equal one again.
//!
//! Nothing is deleted: each file is moved into `quarantine/` inside the data directory (same
//! filesystem, so the move is an atomic rename), under a name that keeps the original and the
//! time, with a log line. Damage to the log itself (`db`) is not recoverable here: open fails
//! with [`crate::StoreError::Damaged`] and the operator restores from an export.

use std::path::{Path, PathBuf};

/// The quarantine folder inside a data directory.
pub const QUARANTINE_DIR: &str = "quarantine";

/// A file moved out of sled's way before the open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    /// Where it was.
    pub from: PathBuf,
    /// Where it is now.
    pub to: PathBuf,
    /// Why it was moved.
    pub why: &'static str,
}

/// Move every known-unusable sled leftover in `dir` into `dir/quarantine/`. A directory that
/// does not exist yet has none.
pub fn quarantine_leftovers(dir: &Path) -> std::io::Result<Vec<Quarantined>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut snapshots = Vec::new();
    let mut moved = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type()?.is_file() {
            continue;
        }
        if name.starts_with("snap.") {
            if name.ends_with(".generating") {
                moved.push(quarantine(
                    dir,
                    &name,
                    "snapshot never finished (.generating)",
                )?);
            } else {
                snapshots.push(name);
            }
        } else if name == "conf" && !conf_is_whole(&entry.path())? {
            moved.push(quarantine(dir, &name, "settings file fails its CRC")?);
        }
    }
    // sled reads the newest snapshot only: check from the newest down, moving damaged ones aside
    // until a whole one is found (or none is left and sled rebuilds from the log).
    snapshots.sort();
    while let Some(name) = snapshots.pop() {
        if snapshot_is_whole(&dir.join(&name))? {
            break;
        }
        moved.push(quarantine(
            dir,
            &name,
            "snapshot fails its length or CRC check",
        )?);
    }
    Ok(moved)
}

/// sled 0.34's snapshot trailer: body ‖ u64 LE decompressed length ‖ u32 LE CRC32(body).
fn snapshot_is_whole(path: &Path) -> std::io::Result<bool> {
    let bytes = std::fs::read(path)?;
    if bytes.len() <= 12 {
        return Ok(false);
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 12);
    let crc = u32::from_le_bytes([trailer[8], trailer[9], trailer[10], trailer[11]]);
    Ok(crc32fast::hash(body) == crc)
}

/// sled 0.34's settings file: body ‖ u32 LE CRC32(body). sled itself treats a file of at most
/// 8 bytes as absent, so only a longer one with a wrong CRC is a problem.
fn conf_is_whole(path: &Path) -> std::io::Result<bool> {
    let bytes = std::fs::read(path)?;
    if bytes.len() <= 8 {
        return Ok(true);
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    Ok(crc32fast::hash(body) == u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]))
}

fn quarantine(dir: &Path, name: &str, why: &'static str) -> std::io::Result<Quarantined> {
    let qdir = dir.join(QUARANTINE_DIR);
    std::fs::create_dir_all(&qdir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let from = dir.join(name);
    let to = qdir.join(format!("{name}.{stamp}"));
    std::fs::rename(&from, &to)?;
    // The rename must survive a crash before sled writes anything.
    std::fs::File::open(dir)?.sync_all()?;
    std::fs::File::open(&qdir)?.sync_all()?;
    tracing::warn!(from = %from.display(), to = %to.display(), why, "sled leftover quarantined");
    Ok(Quarantined { from, to, why })
}

/// Move a whole store directory aside, beside itself, as `<dir>.diverged-<unix nanos>` (same
/// filesystem: an atomic rename, made durable in the parent), and return where it went. A
/// partition's store that diverges from its replicated feed is set aside this way before the
/// partition is rebuilt from the feed (docs/partitions.md): nothing is deleted, the records the
/// feed lacks stay readable and verifiable in the moved directory. A handle still open on the
/// store keeps working on the moved files; a new store can be opened at `dir` at once.
pub fn set_aside(dir: &Path) -> std::io::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = dir
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no name", dir.display())))?
        .to_string_lossy()
        .into_owned();
    let to = dir.with_file_name(format!("{name}.diverged-{stamp}"));
    std::fs::rename(dir, &to)?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(parent)?.sync_all()?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(body: &[u8]) -> Vec<u8> {
        let mut v = body.to_vec();
        v.extend_from_slice(&(body.len() as u64).to_le_bytes());
        v.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        v
    }

    #[test]
    fn generating_and_damaged_snapshots_move_whole_ones_stay() {
        let dir = tempfile::tempdir().expect("test");
        let d = dir.path();
        std::fs::write(d.join("snap.0000000000000010"), snapshot(b"older whole")).expect("test");
        std::fs::write(d.join("snap.0000000000000020"), snapshot(b"newest")).expect("test");
        let mut bad = snapshot(b"newest but flipped");
        bad[0] ^= 1;
        std::fs::write(d.join("snap.0000000000000030"), bad).expect("test");
        std::fs::write(d.join("snap.0000000000000040.generating"), b"").expect("test");
        let moved = quarantine_leftovers(d).expect("test");
        let names: Vec<_> = moved
            .iter()
            .map(|q| {
                q.from
                    .file_name()
                    .expect("test")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            names,
            ["snap.0000000000000040.generating", "snap.0000000000000030"]
        );
        assert!(d.join("snap.0000000000000020").exists());
        assert!(d.join("snap.0000000000000010").exists());
        assert_eq!(
            std::fs::read_dir(d.join(QUARANTINE_DIR))
                .expect("test")
                .count(),
            2
        );
        // A second open finds nothing more to move.
        assert!(quarantine_leftovers(d).expect("test").is_empty());
    }

    #[test]
    fn conf_with_a_bad_crc_moves_a_short_one_stays() {
        let dir = tempfile::tempdir().expect("test");
        let d = dir.path();
        std::fs::write(d.join("conf"), b"short").expect("test");
        assert!(quarantine_leftovers(d).expect("test").is_empty());
        let mut conf = b"segment_size: 524288".to_vec();
        conf.extend_from_slice(&crc32fast::hash(&conf).to_le_bytes());
        std::fs::write(d.join("conf"), &conf).expect("test");
        assert!(quarantine_leftovers(d).expect("test").is_empty());
        conf[3] ^= 0x20;
        std::fs::write(d.join("conf"), &conf).expect("test");
        assert_eq!(quarantine_leftovers(d).expect("test").len(), 1);
        assert!(!d.join("conf").exists());
    }
}
