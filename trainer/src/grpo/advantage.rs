//! Group-normalised advantages, as TRL 1.16's `_generate_and_score_completions` computes them
//! (`multi_objective_aggregation: sum_then_normalize`): a row's reward is the weighted sum of
//! its reward functions' scores, NaN when every function left it unscored; then
//! `A = (r − mean_group) / (std + eps)` with the group's (`group`) or the whole generation
//! batch's (`batch`) standard deviation, or `r − mean_group` (`none`); NaN advantages become 0.
//! Means and standard deviations skip NaN rows; the standard deviation has Bessel's
//! correction (NaN with fewer than two scored rows).
//!
//! Owns: the arithmetic. Must not: score completions or communicate.

use crate::recipe::grpo::ScaleRewards;

/// One generation batch's advantages.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    pub values: Vec<f64>,
    /// Per row: its group's (or the batch's) standard deviation is 0 (TRL's
    /// `frac_reward_zero_std` is the mean of this).
    pub zero_std: Vec<bool>,
}

/// The weighted sum of each row's scores (`scores[f][row]`, `None`: unscored); NaN where
/// every function left the row unscored.
pub fn combine(scores: &[Vec<Option<f64>>], weights: &[f64], rows: usize) -> Vec<f64> {
    (0..rows)
        .map(|i| {
            let scored: Vec<f64> = (scores.iter().zip(weights))
                .filter_map(|(s, w)| s[i].map(|x| x * w))
                .collect();
            match scored.is_empty() {
                true => f64::NAN,
                false => scored.iter().sum(),
            }
        })
        .collect()
}

/// Advantages of `rewards` in consecutive groups of `group` rows.
pub fn advantages(rewards: &[f64], group: usize, mode: ScaleRewards, eps: f64) -> Advantages {
    let batch_std = nan_std(rewards);
    let mut values = Vec::with_capacity(rewards.len());
    let mut zero_std = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let mean = nan_mean(g);
        let std = match mode {
            ScaleRewards::Group | ScaleRewards::None => nan_std(g),
            ScaleRewards::Batch => batch_std,
        };
        for &r in g {
            let a = match mode {
                ScaleRewards::None => r - mean,
                _ => (r - mean) / (std + eps),
            };
            values.push(if a.is_nan() { 0.0 } else { a });
            // torch.isclose(std, 0): |std| ≤ 1e-8 (NaN is not close).
            zero_std.push(std.abs() <= 1e-8);
        }
    }
    Advantages { values, zero_std }
}

/// The mean of the values that are not NaN (NaN when there are none).
pub fn nan_mean(v: &[f64]) -> f64 {
    let kept: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    kept.iter().sum::<f64>() / kept.len() as f64
}

/// TRL's `nanstd`: the standard deviation of the values that are not NaN, with Bessel's
/// correction; NaN with fewer than two.
pub fn nan_std(v: &[f64]) -> f64 {
    let kept: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    let n = kept.len() as f64;
    if kept.len() < 2 {
        return f64::NAN;
    }
    let mean = kept.iter().sum::<f64>() / n;
    let var = kept.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (var * n / (n - 1.0)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unscored_rows_are_nan_and_weights_apply() {
        let scores = vec![
            vec![Some(1.0), None, None],
            vec![Some(0.5), Some(2.0), None],
        ];
        let r = combine(&scores, &[1.0, 0.5], 3);
        assert_eq!(r[..2], [1.25, 1.0]);
        assert!(r[2].is_nan());
    }

    #[test]
    fn a_constant_group_has_zero_advantages_and_zero_std() {
        let a = advantages(&[1.0, 1.0, 0.0, 1.0], 2, ScaleRewards::Group, 1e-4);
        assert_eq!(a.values[..2], [0.0, 0.0]);
        assert_eq!(a.zero_std, [true, true, false, false]);
        let s = (0.5f64).sqrt();
        assert!((a.values[2] - -0.5 / (s + 1e-4)).abs() < 1e-12);
    }
}
