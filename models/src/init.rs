//! Deterministic from-scratch initialisation, as transformers' `_init_weights`: normal(0, σ) for
//! projections, embeddings, routers and experts; ones for norms; zeros for biases.
//!
//! Each tensor draws from its own stream, seeded by the seed and the tensor's name, so the
//! values do not depend on construction order or on how the model is sharded.

use std::convert::Infallible;

use burn::tensor::{Device, Tensor, TensorData};

use crate::params::{param_from_data, ParamSource};

/// SplitMix64: tiny, fast, and exactly reproducible everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
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
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let mut rng = SplitMix64::new(self.seed ^ name_hash(name));
            (0..n)
                .map(|_| (rng.next_normal() * self.std) as f32)
                .collect()
        };
        Ok(param_from_data(TensorData::new(values, shape), device))
    }
}
