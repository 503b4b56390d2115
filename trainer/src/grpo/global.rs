//! One generation batch's values gathered over the data-parallel ranks (rewards, per-function
//! scores, lengths) and the rollout metrics TRL logs from them.
//!
//! Owns: the gather and the metrics. Must not: score or generate.

use moeru_parallel::ReduceOp;

use super::advantage::{nan_mean, nan_std};
use super::reward::Reward;
use super::rollout::Rollout;
use crate::error::TrainError;
use crate::session::Session;

/// One generation batch's values over every data-parallel rank, in slot order.
pub struct GlobalBatch {
    pub rewards: Vec<f64>,
    /// Per reward function, NaN where unscored.
    scores: Vec<Vec<f64>>,
    lengths: Vec<f64>,
    stopped: Vec<f64>,
}

impl GlobalBatch {
    /// Each rank fills its slots of a zeroed vector and the vectors are summed: exact, since
    /// every slot has one non-zero writer.
    pub fn gather(
        session: &Session,
        rollouts: &[Rollout],
        scores: &[Vec<Option<f64>>],
        total: &[f64],
    ) -> Result<Self, TrainError> {
        let g = &session.recipe.grpo;
        let n = g.prompts_per_step * g.num_generations;
        let fields = 3 + scores.len();
        let mut flat = vec![0.0; fields * n];
        for (i, r) in rollouts.iter().enumerate() {
            flat[r.slot] = total[i];
            flat[n + r.slot] = r.completion.len() as f64;
            flat[2 * n + r.slot] = f64::from(u8::from(r.stopped));
            for (f, s) in scores.iter().enumerate() {
                flat[(3 + f) * n + r.slot] = s[i].unwrap_or(f64::NAN);
            }
        }
        let dp = &session.groups.dp;
        if dp.size() > 1 {
            dp.all_reduce(&mut flat, ReduceOp::Sum)?;
        }
        let part = |k: usize| flat[k * n..(k + 1) * n].to_vec();
        Ok(Self {
            rewards: part(0),
            lengths: part(1),
            stopped: part(2),
            scores: (0..scores.len()).map(|f| part(3 + f)).collect(),
        })
    }

    /// TRL's rollout metrics: the reward's mean and standard deviation, each function's, the
    /// fraction of rows whose group has a zero standard deviation, completion lengths.
    pub fn metrics(&self, rewards: &[Reward], zero_std: &[bool]) -> Vec<(String, f64)> {
        let n = self.rewards.len().max(1) as f64;
        let mut out = vec![
            ("reward".to_string(), nan_mean(&self.rewards)),
            ("reward_std".to_string(), nan_std(&self.rewards)),
            (
                "frac_reward_zero_std".to_string(),
                zero_std.iter().filter(|&&z| z).count() as f64 / n,
            ),
            (
                "completions_mean_length".to_string(),
                self.lengths.iter().sum::<f64>() / n,
            ),
            (
                "completions_clipped_ratio".to_string(),
                1.0 - self.stopped.iter().sum::<f64>() / n,
            ),
        ];
        for (f, s) in rewards.iter().zip(&self.scores) {
            out.push((format!("rewards_{}_mean", f.name), nan_mean(s)));
            out.push((format!("rewards_{}_std", f.name), nan_std(s)));
        }
        out
    }
}
