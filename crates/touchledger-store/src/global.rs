//! The global checkpoint of a partitioned ledger: the head (position, hash) of every partition at
//! one moment and one hash over them, so that an auditor can pin the state of the whole ledger
//! with a single value (docs/partitions.md).
//!
//! The text form is what is published on `<prefix>.ledger.global_checkpoint` and what `verify
//! --global` reads:
//!
//! ```text
//! touchledger global checkpoint v1
//! partitions 4
//! 0 1958 <hash hex>
//! 1 2373 <hash hex>
//! 2 2547 <hash hex>
//! 3 1926 <hash hex>
//! hash <global hash hex>
//! ```
//!
//! The global hash is BLAKE3 over `"touchledger global checkpoint v1\n"`, P as u32 big-endian,
//! then for each partition in order its position as u64 big-endian and its 32-byte hash. Each
//! partition is an independent chain, so any combination of their heads is a state the ledger
//! passed through; the checkpoint pins each partition's history up to its position.

use crate::Hash;

const DOMAIN: &[u8] = b"touchledger global checkpoint v1\n";
const HEADER: &str = "touchledger global checkpoint v1";

/// Every partition's head and the hash over them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalCheckpoint {
    /// `(position, hash)` of partitions `0..P`, in order (position 0 and [`Hash::ZERO`] for an
    /// empty partition).
    pub heads: Vec<(u64, Hash)>,
}

impl GlobalCheckpoint {
    /// The global hash (see the module documentation).
    pub fn hash(&self) -> Hash {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(&(self.heads.len() as u32).to_be_bytes());
        for (position, hash) in &self.heads {
            h.update(&position.to_be_bytes());
            h.update(&hash.0);
        }
        Hash(*h.finalize().as_bytes())
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        let mut s = format!("{HEADER}\npartitions {}\n", self.heads.len());
        for (n, (position, hash)) in self.heads.iter().enumerate() {
            s.push_str(&format!("{n} {position} {hash}\n"));
        }
        s.push_str(&format!("hash {}\n", self.hash()));
        s
    }

    /// Parse the text form, checking that its `hash` line is the hash of its heads.
    pub fn parse(text: &str) -> Result<GlobalCheckpoint, String> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if lines.next() != Some(HEADER) {
            return Err(format!(
                "not a global checkpoint (first line is not {HEADER:?})"
            ));
        }
        let count: usize = lines
            .next()
            .and_then(|l| l.strip_prefix("partitions "))
            .and_then(|n| n.parse().ok())
            .ok_or("no `partitions N` line")?;
        let max = touchledger_domain::partition::MAX_PARTITIONS as usize;
        if count == 0 || count > max {
            return Err(format!("{count} partitions: a ledger has 1 to {max}"));
        }
        let mut heads = Vec::with_capacity(count);
        for n in 0..count {
            let line = lines.next().ok_or(format!("no line for partition {n}"))?;
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [index, position, hash] = parts[..] else {
                return Err(format!("bad partition line {line:?}"));
            };
            if index != n.to_string() {
                return Err(format!("partition {n} expected, found {line:?}"));
            }
            let position = position
                .parse()
                .map_err(|_| format!("bad position in {line:?}"))?;
            let hash = hex::decode(hash)
                .ok()
                .and_then(|b| Hash::from_slice(&b))
                .ok_or(format!("bad hash in {line:?}"))?;
            heads.push((position, hash));
        }
        let stated = lines
            .next()
            .and_then(|l| l.strip_prefix("hash "))
            .ok_or("no `hash` line")?;
        let checkpoint = GlobalCheckpoint { heads };
        let computed = checkpoint.hash();
        if stated != computed.to_hex() {
            return Err(format!(
                "its hash line says {stated}, its heads hash to {computed}"
            ));
        }
        Ok(checkpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_any_change_breaks_the_hash() {
        let g = GlobalCheckpoint {
            heads: vec![(3, Hash([1; 32])), (0, Hash::ZERO), (7, Hash([9; 32]))],
        };
        let text = g.to_text();
        assert_eq!(GlobalCheckpoint::parse(&text), Ok(g.clone()));
        // A changed position, hash or partition count no longer matches the stated hash.
        for tampered in [
            text.replace("0 3 ", "0 4 "),
            text.replace(&Hash([9; 32]).to_hex(), &Hash([8; 32]).to_hex()),
        ] {
            assert!(GlobalCheckpoint::parse(&tampered).is_err(), "{tampered}");
        }
        let two = GlobalCheckpoint {
            heads: g.heads[..2].to_vec(),
        };
        assert_ne!(two.hash(), g.hash());
        assert!(GlobalCheckpoint::parse("hello").is_err());
        let huge = "touchledger global checkpoint v1\npartitions 99999999999\n";
        assert!(GlobalCheckpoint::parse(huge).is_err());
    }
}
