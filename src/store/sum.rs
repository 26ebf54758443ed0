//! An order-independent sum over listed objects: a listing's parts arrive in any order, and
//! what they add up to must be what one listing of the same objects gives.

use std::fmt;

/// A wrapping sum of one 256-bit hash per object, and their count: adding objects in any
/// order, or the sums of disjoint parts, gives the same value; removing one takes it out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListingSum {
    lanes: [u64; 4],
    count: u64,
}

impl ListingSum {
    fn lanes_of(hash: [u8; 32]) -> [u64; 4] {
        let mut lanes = [0u64; 4];
        for (lane, chunk) in lanes.iter_mut().zip(hash.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *lane = u64::from_be_bytes(b);
        }
        lanes
    }

    /// Counts in one object by its hash.
    pub fn add(&mut self, hash: [u8; 32]) {
        for (l, x) in self.lanes.iter_mut().zip(Self::lanes_of(hash)) {
            *l = l.wrapping_add(x);
        }
        self.count += 1;
    }

    /// Takes out one object counted in before.
    pub fn remove(&mut self, hash: [u8; 32]) {
        for (l, x) in self.lanes.iter_mut().zip(Self::lanes_of(hash)) {
            *l = l.wrapping_sub(x);
        }
        self.count = self.count.saturating_sub(1);
    }

    /// Adds the sum of a disjoint set of objects.
    pub fn merge(&mut self, other: &ListingSum) {
        for (l, x) in self.lanes.iter_mut().zip(other.lanes) {
            *l = l.wrapping_add(x);
        }
        self.count += other.count;
    }

    /// The objects counted in.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The sum's bytes: the count, then the lanes, big-endian.
    pub fn to_bytes(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..8].copy_from_slice(&self.count.to_be_bytes());
        for (chunk, l) in out[8..].chunks_exact_mut(8).zip(self.lanes) {
            chunk.copy_from_slice(&l.to_be_bytes());
        }
        out
    }
}

impl fmt::Display for ListingSum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_bytes()
            .iter()
            .try_for_each(|b| write!(f, "{b:02x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u8) -> [u8; 32] {
        let mut h = [0u8; 32];
        for (j, b) in h.iter_mut().enumerate() {
            *b = i.wrapping_mul(37).wrapping_add(j as u8).wrapping_mul(101);
        }
        h
    }

    #[test]
    fn parts_add_up_to_the_whole_in_any_order() {
        let all: Vec<[u8; 32]> = (0..6).map(hash).collect();
        let sum = |hs: &[[u8; 32]]| {
            let mut s = ListingSum::default();
            hs.iter().for_each(|h| s.add(*h));
            s
        };
        let whole = sum(&all);
        let mut reversed: Vec<[u8; 32]> = all.clone();
        reversed.reverse();
        assert_eq!(whole, sum(&reversed));
        let (a, b) = all.split_at(2);
        let mut parts = sum(b);
        parts.merge(&sum(a));
        assert_eq!(parts, whole);
        assert_eq!(parts.count(), 6);
        // One object more, one less, or one counted twice: another value.
        assert_ne!(sum(&all[..5]), whole);
        let mut twice = whole;
        twice.add(all[0]);
        assert_ne!(twice, whole);
        twice.remove(all[0]);
        assert_eq!(twice, whole);
        assert_eq!(whole.to_string().len(), 80);
        assert_ne!(whole.to_string(), sum(&all[..5]).to_string());
    }
}
