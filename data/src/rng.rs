//! A small explicit, counter-based RNG (SplitMix64). Every random choice in the pipeline is a
//! pure function of (seed, epoch, window), so a loader position needs no RNG state beyond the
//! seed, and no hash-map order or thread timing can leak in.

/// SplitMix64 (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by Lemire's multiply-shift (bias < n / 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Derive a stream seed from a base seed and a list of counters.
pub fn derive(seed: u64, counters: &[u64]) -> u64 {
    let mut r = SplitMix64::new(seed ^ 0x6D6F_6572_752D_6461); // "moeru-da"
    let mut h = r.next_u64();
    for &c in counters {
        let mut m = SplitMix64::new(h ^ c.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        h = m.next_u64();
    }
    h
}

/// A uniformly random permutation of `0..n` (Fisher-Yates).
pub fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    let mut r = SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = r.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_seeded() {
        let p = permutation(1000, 7);
        let mut s = p.clone();
        s.sort_unstable();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
        assert_eq!(p, permutation(1000, 7));
        assert_ne!(p, permutation(1000, 8));
    }

    #[test]
    fn derive_depends_on_every_counter() {
        assert_ne!(derive(1, &[0, 1]), derive(1, &[1, 0]));
        assert_ne!(derive(1, &[0]), derive(2, &[0]));
        assert_eq!(derive(3, &[4, 5]), derive(3, &[4, 5]));
    }
}
