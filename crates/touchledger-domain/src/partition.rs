//! Which partition a customer belongs to: a stable, documented function of `customer_id` that
//! anyone can recompute, and the same one the NATS server applies when it routes a touchpoint
//! to its partition (the intake stream's subject transform `{{partition(P,2)}}`).
//!
//! The function is 32-bit FNV-1a over the UTF-8 bytes of `customer_id`, reduced modulo the
//! partition count:
//!
//! ```text
//! h = 0x811c9dc5
//! for each byte b of customer_id: h = (h XOR b) × 0x01000193  (mod 2^32)
//! partition = h mod P
//! ```
//!
//! This is what nats-server's `partition(n, wildcards…)` mapping computes over the selected
//! subject tokens (Go's `hash/fnv` New32a, then `% n`); with one token selected, the customer
//! token, the two agree byte for byte (tests/it/partition.rs checks 100,000 ids against a real
//! server). A customer's partition never changes while P stays the same, so per-customer order
//! is kept; changing P is a migration (export, then re-append into a new ledger).

/// The largest partition count a ledger may be created with.
pub const MAX_PARTITIONS: u32 = 1024;

/// 32-bit FNV-1a of `bytes`.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The partition (0 ≤ result < `partitions`) that owns `customer_id`.
///
/// # Panics
/// If `partitions` is 0 (a partition count is validated when a ledger is created).
pub fn partition_of(customer_id: &str, partitions: u32) -> u32 {
    assert!(partitions > 0, "a ledger has at least one partition");
    fnv1a32(customer_id.as_bytes()) % partitions
}

/// A ledger's partition layout: how many partitions, and which one a store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PartitionId {
    /// This partition, `0..count`.
    pub index: u32,
    /// The ledger's partition count P.
    pub count: u32,
}

impl PartitionId {
    /// The single partition of an unpartitioned ledger (P = 1).
    pub const SINGLE: PartitionId = PartitionId { index: 0, count: 1 };

    /// Partition `index` of `count`, checked.
    pub fn new(index: u32, count: u32) -> Result<PartitionId, String> {
        if count == 0 || count > MAX_PARTITIONS {
            return Err(format!(
                "a ledger has 1 to {MAX_PARTITIONS} partitions, not {count}"
            ));
        }
        if index >= count {
            return Err(format!(
                "partition {index} does not exist in a ledger of {count}"
            ));
        }
        Ok(PartitionId { index, count })
    }

    /// Whether `customer_id` belongs here.
    pub fn owns(&self, customer_id: &str) -> bool {
        partition_of(customer_id, self.count) == self.index
    }
}

impl std::fmt::Display for PartitionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "partition {} of {}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a32_matches_the_published_test_vectors() {
        // From the FNV reference test suite (Noll): "" , "a", "foobar".
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn the_spread_over_partitions_is_even() {
        let p = 8;
        let mut counts = [0u32; 8];
        for i in 0..80_000 {
            let n = partition_of(&format!("cust-{i:06}"), p);
            assert!(n < p);
            counts[n as usize] += 1;
        }
        // 10,000 expected per partition; a uniform hash stays well within ±5 %.
        for c in counts {
            assert!((9_500..=10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn one_partition_holds_everyone_and_bad_layouts_are_refused() {
        assert!(PartitionId::SINGLE.owns("anyone"));
        assert!(PartitionId::new(0, 0).is_err());
        assert!(PartitionId::new(3, 3).is_err());
        assert!(PartitionId::new(0, MAX_PARTITIONS + 1).is_err());
        assert_eq!(
            PartitionId::new(2, 8).expect("layout").to_string(),
            "partition 2 of 8"
        );
    }
}
