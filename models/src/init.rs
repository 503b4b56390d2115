//! Deterministic from-scratch initialisation, as transformers' `_init_weights`: normal(0, σ) for
//! projections, embeddings, routers and experts; ones for norms; zeros for biases.
//!
//! Each tensor draws from its own stream, seeded by the seed and the tensor's name, so the
//! values do not depend on construction order or on how the model is sharded.

use std::convert::Infallible;

use burn::tensor::{Device, Tensor, TensorData};

use crate::params::{param_from_data, ParamSource};
use crate::shard::Split;

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: tiny, fast, and exactly reproducible everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Jumps `n` draws ahead in O(1): the state only ever advances by the constant step, so a
    /// shard can draw its slice of a tensor without drawing the slices before it.
    pub fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(GAMMA.wrapping_mul(n));
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    pub fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn next_normal(&mut self) -> f64 {
        let (u1, u2) = (self.next_unit(), self.next_unit());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// FNV-1a of a name, to derive a per-tensor stream.
pub(crate) fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A [`ParamSource`] that initialises every tensor from `seed`.
pub struct RandomInit {
    pub seed: u64,
    pub std: f64,
}

impl ParamSource for RandomInit {
    type Error = Infallible;

    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, Infallible> {
        let n: usize = shape.iter().product();
        let whole = std::iter::once(0..n).collect::<Vec<_>>();
        let values = self.values(name, &whole);
        Ok(param_from_data(TensorData::new(values, shape), device))
    }

    /// Exactly the values the whole tensor has in the part's elements.
    fn tensor_part<const D: usize>(
        &mut self,
        name: &str,
        full: [usize; D],
        split: &Split,
        device: &Device,
    ) -> Result<Tensor<D>, Infallible> {
        let (d, rows) = (split.dim, split.range(full[split.dim]));
        let outer: usize = full[..d].iter().product();
        let inner: usize = full[d + 1..].iter().product();
        let runs: Vec<_> = (0..outer)
            .map(|o| {
                let start = (o * full[d] + rows.start) * inner;
                start..start + rows.len() * inner
            })
            .collect();
        let values = self.values(name, &runs);
        let shape = split.local_shape(full);
        Ok(param_from_data(TensorData::new(values, shape), device))
    }
}

impl RandomInit {
    /// The values of elements `runs` (flat indices into the whole tensor), concatenated.
    fn values(&self, name: &str, runs: &[std::ops::Range<usize>]) -> Vec<f32> {
        let n = runs.iter().map(|r| r.len()).sum();
        if name.ends_with("norm.weight") {
            return vec![1.0; n];
        }
        if name.ends_with(".bias") {
            return vec![0.0; n];
        }
        let mut out = Vec::with_capacity(n);
        for run in runs {
            let mut rng = SplitMix64::new(self.seed ^ name_hash(name));
            // Each element takes two draws (Box–Muller).
            rng.skip(2 * run.start as u64);
            out.extend(run.clone().map(|_| (rng.next_normal() * self.std) as f32));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_holds_the_whole_tensors_values() {
        let device = Device::flex();
        let mut init = RandomInit { seed: 7, std: 0.02 };
        let name = "model.layers.0.self_attn.o_proj.weight";
        let whole: Tensor<3> = init.tensor(name, [3, 4, 6], &device).unwrap();
        for (dim, parts) in [(0, 3), (1, 2), (2, 3)] {
            for index in 0..parts {
                let split = Split { dim, index, parts };
                let part: Tensor<3> = init.tensor_part(name, [3, 4, 6], &split, &device).unwrap();
                let r = split.range([3, 4, 6][dim]);
                let want = whole.clone().narrow(dim, r.start, r.len());
                assert_eq!(part.into_data(), want.into_data(), "dim {dim} part {index}");
            }
        }
    }
}
