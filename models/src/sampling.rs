//! Sampling for generation: transformers' logits warpers (temperature, top-k, top-p, min-p,
//! applied in that order, each skipped at its neutral value) on one row's f32 logits, and a
//! seeded draw whose token depends only on the seed, the row's stream and the step, never on
//! the batch size, the row order or the rank layout.
//!
//! Owns: the warpers' arithmetic and the random draw. Must not: touch tensors or devices (it
//! works on host logits the decode loop hands it).

/// How a token is chosen from a row's logits when sampling (greedy is `None` in
/// [`crate::generate::GenerationConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// > 0; 1 leaves the logits as they are.
    pub temperature: f64,
    /// Keep the k largest logits (ties with the k-th kept); 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest most-likely set whose probability exceeds p; 1 keeps all.
    pub top_p: f64,
    /// Drop tokens whose probability is below `min_p` times the largest; 0 keeps all.
    pub min_p: f64,
    pub seed: u64,
}

impl Sampling {
    /// The warpers in transformers' order (`_get_logits_processor`), in place; removed tokens
    /// become −∞.
    pub fn warp(&self, logits: &mut [f32]) {
        if self.temperature != 1.0 {
            temperature(logits, self.temperature);
        }
        if self.top_k != 0 {
            top_k(logits, self.top_k);
        }
        if self.top_p < 1.0 {
            top_p(logits, self.top_p);
        }
        if self.min_p > 0.0 {
            min_p(logits, self.min_p);
        }
    }

    /// The token drawn from warped `logits` for `stream` at `step`.
    pub fn draw(&self, logits: &[f32], stream: u64, step: usize) -> usize {
        draw(logits, uniform(self.seed, stream, step as u64))
    }
}

/// `TemperatureLogitsWarper`: logits / t, in f32 as torch divides an f32 tensor by a scalar.
pub fn temperature(logits: &mut [f32], t: f64) {
    let t = t as f32;
    logits.iter_mut().for_each(|x| *x /= t);
}

/// `TopKLogitsWarper`: everything below the k-th largest value removed (at least one kept).
pub fn top_k(logits: &mut [f32], k: usize) {
    let k = k.clamp(1, logits.len());
    let mut sorted = logits.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    logits
        .iter_mut()
        .filter(|x| **x < kth)
        .for_each(|x| *x = f32::NEG_INFINITY);
}

/// `TopPLogitsWarper`: sorted ascending, the tokens whose cumulative probability is at most
/// 1 − p removed; the most likely token always kept. The cumulative sum runs in f64 and is
/// rounded to f32 at each term, as torch's CPU `cumsum` of an f32 tensor.
pub fn top_p(logits: &mut [f32], p: f64) {
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(a.cmp(&b)));
    let limit = (1.0 - p) as f32;
    let mut sum = 0f64;
    for (rank, &i) in order.iter().enumerate() {
        sum += probs[i] as f64;
        if rank + 1 < order.len() && (sum as f32) <= limit {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// `MinPLogitsWarper`: tokens whose probability is below `p` times the largest removed; the
/// most likely token always kept.
pub fn min_p(logits: &mut [f32], p: f64) {
    let probs = softmax(logits);
    let top = probs.iter().copied().fold(0f32, f32::max);
    let bar = (p as f32) * top;
    let best = argmax(logits);
    for (i, x) in logits.iter_mut().enumerate() {
        if i != best && probs[i] < bar {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// `softmax` in f32 as torch computes it: exp(x − max) over their sum.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// `log_softmax` in f64 (for comparing warped rows: −∞ where removed).
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

/// The index of the largest value, the first one on ties (as `torch.argmax`).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Inverse-CDF draw over softmax(`logits`) in id order: the first token whose cumulative
/// probability exceeds `u` ∈ [0, 1); removed tokens are never drawn.
fn draw(logits: &[f32], u: f64) -> usize {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let target = u * weights.iter().sum::<f64>();
    let mut sum = 0.0;
    let mut last = argmax(logits);
    for (i, &w) in weights.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        sum += w;
        last = i;
        if sum > target {
            return i;
        }
    }
    last
}

/// A uniform draw in [0, 1) fixed by (seed, stream, step): splitmix64 over the three.
fn uniform(seed: u64, stream: u64, step: u64) -> f64 {
    let h = mix(mix(mix(seed) ^ stream) ^ step);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// splitmix64's finaliser.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_distribution_and_skip_removed_tokens() {
        let logits = [0.0f32, f32::NEG_INFINITY, (3f32).ln(), f32::NEG_INFINITY];
        let mut counts = [0usize; 4];
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 9,
        };
        for stream in 0..4000 {
            counts[s.draw(&logits, stream, 0)] += 1;
        }
        assert_eq!(counts[1] + counts[3], 0);
        let share = counts[2] as f64 / 4000.0;
        assert!(
            (share - 0.75).abs() < 0.03,
            "share of p=0.75 token: {share}"
        );
    }

    #[test]
    fn neutral_settings_change_nothing() {
        let mut logits = vec![0.5f32, -1.0, 2.0, 0.25];
        let before = logits.clone();
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        }
        .warp(&mut logits);
        assert_eq!(logits, before);
    }
}
