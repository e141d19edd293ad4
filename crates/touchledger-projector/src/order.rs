//! An order-statistics multiset: sorted, with O(log n) rank ("how many are smaller"), select
//! ("the k-th"), prefix weight ("the sum of the first k") and insert/remove.
//!
//! Key decision: a two-level structure (sorted chunks of at most [`MAX_CHUNK`] elements, with
//! Fenwick trees over the chunks' lengths and weights), the layout of Python's
//! `sortedcontainers`. It is small, allocation-light (elements sit in plain `Vec`s, no node per
//! element) and iterates in either direction as fast as a `Vec`. The crates that offer the same
//! (`indexset`, `wabi_tree`) were considered: `indexset`'s API has changed in every minor
//! release since 0.12 and carries concurrent/CDC machinery we do not need, `wabi_tree` is at
//! 0.1 with a single release line; neither keeps per-element weights, which the pyramid's
//! revenue shares need. The structure is checked against a sorted `Vec` by a property test.

/// Chunks are split when they exceed this many elements.
pub const MAX_CHUNK: usize = 1024;

/// A Fenwick (binary indexed) tree of `i128` over chunk positions.
#[derive(Clone, Debug, Default)]
struct Fenwick(Vec<i128>);

impl Fenwick {
    fn build(values: impl ExactSizeIterator<Item = i128>) -> Fenwick {
        let mut t: Vec<i128> = values.collect();
        let n = t.len();
        for i in 0..n {
            let j = i | (i + 1);
            if j < n {
                t[j] += t[i];
            }
        }
        Fenwick(t)
    }

    fn add(&mut self, mut i: usize, v: i128) {
        while i < self.0.len() {
            self.0[i] += v;
            i |= i + 1;
        }
    }

    /// Sum of positions `0..i`.
    fn prefix(&self, i: usize) -> i128 {
        let mut i = i.min(self.0.len());
        let mut s = 0;
        while i > 0 {
            s += self.0[i - 1];
            i &= i - 1;
        }
        s
    }

    /// The first position `p` with `prefix(p + 1) > k` (counts are non-negative), and
    /// `prefix(p)`.
    fn find(&self, k: i128) -> (usize, i128) {
        let n = self.0.len();
        let mut pos = 0;
        let mut rem = k;
        let mut step = n.next_power_of_two();
        while step > 0 {
            let next = pos + step;
            if next <= n && self.0[next - 1] <= rem {
                pos = next;
                rem -= self.0[next - 1];
            }
            step >>= 1;
        }
        (pos, k - rem)
    }
}

/// A sorted multiset of `T` with per-element weights (see the module docs).
#[derive(Clone)]
pub struct OrderIndex<T> {
    chunks: Vec<Vec<T>>,
    /// Each chunk's weight (kept so that a split rebuilds the Fenwick trees in O(chunks)).
    chunk_weights: Vec<i128>,
    counts: Fenwick,
    weights: Fenwick,
    len: usize,
    total: i128,
    weight: fn(&T) -> i64,
}

impl<T> std::fmt::Debug for OrderIndex<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderIndex")
            .field("len", &self.len)
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

fn no_weight<T>(_: &T) -> i64 {
    0
}

impl<T: Ord + Clone> Default for OrderIndex<T> {
    fn default() -> Self {
        OrderIndex::new()
    }
}

impl<T: Ord + Clone> OrderIndex<T> {
    /// An empty index without weights.
    pub fn new() -> Self {
        OrderIndex::weighted(no_weight::<T>)
    }

    /// An empty index whose elements weigh `weight(element)`.
    pub fn weighted(weight: fn(&T) -> i64) -> Self {
        OrderIndex {
            chunks: Vec::new(),
            chunk_weights: Vec::new(),
            counts: Fenwick::default(),
            weights: Fenwick::default(),
            len: 0,
            total: 0,
            weight,
        }
    }

    /// An index of `items` (any order), built in O(n log n).
    pub fn from_unsorted(mut items: Vec<T>, weight: fn(&T) -> i64) -> Self {
        items.sort();
        let mut ix = OrderIndex::weighted(weight);
        ix.len = items.len();
        ix.total = items.iter().map(|t| i128::from(weight(t))).sum();
        let half = MAX_CHUNK / 2;
        let mut it = items.into_iter().peekable();
        while it.peek().is_some() {
            ix.chunks.push(it.by_ref().take(half).collect());
        }
        ix.chunk_weights = ix.chunks.iter().map(|c| ix.weigh(c)).collect();
        ix.reindex();
        ix
    }

    fn weigh(&self, chunk: &[T]) -> i128 {
        chunk.iter().map(|t| i128::from((self.weight)(t))).sum()
    }

    /// Rebuild the Fenwick trees after the chunks were split or removed: O(chunks).
    fn reindex(&mut self) {
        self.counts = Fenwick::build(self.chunks.iter().map(|c| c.len() as i128));
        self.weights = Fenwick::build(self.chunk_weights.iter().copied());
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sum of all weights.
    pub fn total_weight(&self) -> i128 {
        self.total
    }

    /// The chunk that holds (or would hold) `x`: the first whose last element is >= `x`.
    fn chunk_of(&self, x: &T) -> usize {
        self.chunks
            .partition_point(|c| c.last().is_some_and(|l| l < x))
    }

    /// Insert `x` (duplicates are kept).
    pub fn insert(&mut self, x: T) {
        let w = i128::from((self.weight)(&x));
        self.len += 1;
        self.total += w;
        if self.chunks.is_empty() {
            self.chunks.push(vec![x]);
            self.chunk_weights.push(w);
            self.reindex();
            return;
        }
        let ci = self.chunk_of(&x).min(self.chunks.len() - 1);
        let chunk = &mut self.chunks[ci];
        let pos = chunk.partition_point(|e| e < &x);
        chunk.insert(pos, x);
        self.chunk_weights[ci] += w;
        if chunk.len() > MAX_CHUNK {
            let tail = chunk.split_off(chunk.len() / 2);
            let tail_weight = self.weigh(&tail);
            self.chunk_weights[ci] -= tail_weight;
            self.chunks.insert(ci + 1, tail);
            self.chunk_weights.insert(ci + 1, tail_weight);
            self.reindex();
        } else {
            self.counts.add(ci, 1);
            self.weights.add(ci, w);
        }
    }

    /// Remove one element equal to `x`; whether there was one.
    pub fn remove(&mut self, x: &T) -> bool {
        let ci = self.chunk_of(x);
        let Some(chunk) = self.chunks.get_mut(ci) else {
            return false;
        };
        let pos = chunk.partition_point(|e| e < x);
        if chunk.get(pos) != Some(x) {
            return false;
        }
        let removed = chunk.remove(pos);
        let w = i128::from((self.weight)(&removed));
        self.len -= 1;
        self.total -= w;
        self.chunk_weights[ci] -= w;
        if chunk.is_empty() {
            self.chunks.remove(ci);
            self.chunk_weights.remove(ci);
            self.reindex();
        } else {
            self.counts.add(ci, -1);
            self.weights.add(ci, -w);
        }
        true
    }

    /// How many elements are strictly smaller than `x`.
    pub fn count_less(&self, x: &T) -> usize {
        let ci = self.chunk_of(x);
        let before = self.counts.prefix(ci) as usize;
        before
            + self
                .chunks
                .get(ci)
                .map_or(0, |c| c.partition_point(|e| e < x))
    }

    /// How many elements satisfy `pred`, which must hold for a prefix of the sorted order
    /// (true, then false): the first position where it fails. O(log n).
    pub fn partition_point(&self, pred: impl Fn(&T) -> bool) -> usize {
        let ci = self.chunks.partition_point(|c| c.last().is_some_and(&pred));
        let before = self.counts.prefix(ci) as usize;
        before + self.chunks.get(ci).map_or(0, |c| c.partition_point(&pred))
    }

    /// The elements from sorted position `k` on, in ascending order; O(log n) to start.
    pub fn iter_from(&self, k: usize) -> impl Iterator<Item = &T> + '_ {
        let (ci, skip) = if k >= self.len {
            (self.chunks.len(), 0)
        } else {
            let (ci, before) = self.counts.find(k as i128);
            (ci, k - before as usize)
        };
        self.chunks
            .iter()
            .skip(ci)
            .enumerate()
            .flat_map(move |(i, c)| c[if i == 0 { skip } else { 0 }..].iter())
    }

    /// The element at sorted position `k` (0-based).
    pub fn get(&self, k: usize) -> Option<&T> {
        if k >= self.len {
            return None;
        }
        let (ci, before) = self.counts.find(k as i128);
        self.chunks.get(ci)?.get(k - before as usize)
    }

    /// Sum of the weights of the first `k` elements in sorted order.
    pub fn prefix_weight(&self, k: usize) -> i128 {
        if k >= self.len {
            return self.total;
        }
        let (ci, before) = self.counts.find(k as i128);
        let w = self.weight;
        self.weights.prefix(ci)
            + self.chunks[ci][..k - before as usize]
                .iter()
                .map(|t| i128::from(w(t)))
                .sum::<i128>()
    }

    /// The elements in ascending order (reverse it for descending).
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> + '_ {
        self.chunks.iter().flat_map(|c| c.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(x: &(i64, u32)) -> i64 {
        x.0
    }

    /// A small deterministic generator (no dependency needed for a unit test).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }
    }

    #[test]
    fn agrees_with_a_sorted_vec() {
        for seed in 0..6u64 {
            let mut rng = Lcg(seed);
            let mut ix = OrderIndex::weighted(w);
            let mut model: Vec<(i64, u32)> = Vec::new();
            // Few distinct values in some seeds (many duplicates), many in others.
            let span = [3u64, 50, 5000, 1 << 30, 7, 100_000][seed as usize];
            for step in 0..6000u32 {
                let x = (
                    (rng.next() % span) as i64 - (span as i64) / 2,
                    (rng.next() % 4) as u32,
                );
                if rng.next().is_multiple_of(3) && !model.is_empty() {
                    let victim = model[(rng.next() as usize) % model.len()];
                    assert!(ix.remove(&victim));
                    let p = model.iter().position(|m| *m == victim).expect("present");
                    model.remove(p);
                    assert!(!ix.remove(&(i64::MAX, 9)));
                } else {
                    ix.insert(x);
                    let p = model.partition_point(|e| e < &x);
                    model.insert(p, x);
                }
                if step.is_multiple_of(97) || step > 5900 {
                    assert_eq!(ix.len(), model.len());
                    assert!(ix.iter().eq(model.iter()));
                    assert!(ix.iter().rev().eq(model.iter().rev()));
                    let probe = ((rng.next() % span) as i64 - (span as i64) / 2, 1);
                    assert_eq!(ix.count_less(&probe), model.partition_point(|e| e < &probe));
                    assert_eq!(
                        ix.partition_point(|e| e.0 <= probe.0),
                        model.partition_point(|e| e.0 <= probe.0)
                    );
                    let from = (rng.next() as usize) % (model.len() + 2);
                    assert!(ix.iter_from(from).eq(model.iter().skip(from)));
                    let k = (rng.next() as usize) % (model.len() + 1);
                    assert_eq!(ix.get(k), model.get(k));
                    let want: i128 = model[..k].iter().map(|m| i128::from(m.0)).sum();
                    assert_eq!(ix.prefix_weight(k), want);
                    assert_eq!(
                        ix.total_weight(),
                        model.iter().map(|m| i128::from(m.0)).sum::<i128>()
                    );
                }
            }
            let rebuilt = OrderIndex::from_unsorted(model.clone(), w);
            assert!(rebuilt.iter().eq(model.iter()));
            assert_eq!(
                rebuilt.prefix_weight(model.len() / 2),
                ix.prefix_weight(model.len() / 2)
            );
        }
    }
}
