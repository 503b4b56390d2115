//! The DPO losses on per-sequence log-probs, as TRL 1.16's `DPOTrainer._compute_loss` has
//! them (`f_divergence_type: reverse_kl`), with cDPO's label smoothing on `sigmoid` and the
//! reference-free mode of TRL 0.28 (a reference of 0).
//!
//! With `c = logπ(y_w) − logπ_ref(y_w)`, `r = logπ(y_l) − logπ_ref(y_l)`, `Δ = c − r`:
//! sigmoid `−(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)`; hinge `relu(1 − βΔ)`; ipo
//! `(c/n_w − r/n_l − 1/(2β))²` with `n` the completion tokens (at least 1); robust
//! `(−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε)`. The step's loss is
//! `Σ_types weight · mean over pairs`, i.e. the mean over pairs of the weighted sum.

use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::{Tensor, TensorData};
use moeru_models::params::to_f32_vec;

use crate::recipe::dpo::{DpoLossType, DpoSection};

/// The loss settings of a DPO run.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoSettings {
    pub beta: f64,
    pub losses: Vec<(DpoLossType, f64)>,
    pub label_smoothing: f64,
}

impl DpoSettings {
    pub fn from_section(d: &DpoSection) -> Self {
        Self {
            beta: d.beta,
            losses: d.weighted_losses(),
            label_smoothing: d.label_smoothing,
        }
    }
}

/// One micro-batch's pairs under [`dpo_loss`].
pub struct DpoLoss {
    /// The weighted per-pair loss `[pairs]` (differentiable in the policy's log-probs).
    pub per_pair: Tensor<1>,
    /// Host copies for the metrics: `β·c`, `β·r` and the policy's log-probs, per pair.
    pub chosen_rewards: Vec<f64>,
    pub rejected_rewards: Vec<f64>,
    pub chosen_logps: Vec<f64>,
    pub rejected_logps: Vec<f64>,
}

/// The per-pair DPO loss. `policy` holds the log-probs of `n` chosen rows then `n` rejected
/// rows `[2n]`; `reference` the same rows' reference log-probs (`None`: reference-free);
/// `completion_tokens` each row's completion length.
pub fn dpo_loss(
    policy: Tensor<1>,
    reference: Option<&[f64]>,
    completion_tokens: &[f32],
    s: &DpoSettings,
) -> DpoLoss {
    let rows = policy.dims()[0];
    let n = rows / 2;
    let device = policy.device();
    let host = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [rows]), &device);
    let reference_f32: Vec<f32> = match reference {
        Some(r) => r.iter().map(|&x| x as f32).collect(),
        None => vec![0.0; rows],
    };
    let ratio = policy.clone() - host(reference_f32);
    let (c, r) = (ratio.clone().narrow(0, 0, n), ratio.narrow(0, n, n));
    let z = (c.clone() - r.clone()).mul_scalar(s.beta);
    let eps = s.label_smoothing;
    let mut per_pair: Option<Tensor<1>> = None;
    for &(kind, weight) in &s.losses {
        let term = match kind {
            DpoLossType::Sigmoid => {
                -log_sigmoid(z.clone()).mul_scalar(1.0 - eps)
                    - log_sigmoid(-z.clone()).mul_scalar(eps)
            }
            DpoLossType::Hinge => relu(z.clone().neg().add_scalar(1.0)),
            DpoLossType::Ipo => {
                let lens = host(completion_tokens.iter().map(|&x| x.max(1.0)).collect());
                let avg = ratio_avg(&c, &r, lens, n);
                avg.sub_scalar(1.0 / (2.0 * s.beta)).powi_scalar(2)
            }
            DpoLossType::Robust => (-log_sigmoid(z.clone()).mul_scalar(1.0 - eps)
                + log_sigmoid(-z.clone()).mul_scalar(eps))
            .div_scalar(1.0 - 2.0 * eps),
        };
        let term = term.mul_scalar(weight);
        per_pair = Some(match per_pair {
            Some(p) => p + term,
            None => term,
        });
    }
    let values = |t: Tensor<1>| -> Vec<f64> { to_f32_vec(t).into_iter().map(f64::from).collect() };
    let logps = values(policy.detach());
    let (cv, rv) = (values(c.detach()), values(r.detach()));
    DpoLoss {
        per_pair: per_pair.expect("dpo.loss_type names at least one loss (validated)"),
        chosen_rewards: cv.iter().map(|x| s.beta * x).collect(),
        rejected_rewards: rv.iter().map(|x| s.beta * x).collect(),
        chosen_logps: logps[..n].to_vec(),
        rejected_logps: logps[n..].to_vec(),
    }
}

/// The metrics a DPO step logs, as TRL names them with `/` → `_`: means over pairs.
pub const DPO_METRICS: [&str; 6] = [
    "rewards_chosen",
    "rewards_rejected",
    "rewards_accuracy",
    "rewards_margin",
    "logps_chosen",
    "logps_rejected",
];

impl DpoLoss {
    /// Sums over these pairs of each of [`DPO_METRICS`], in that order (a mean is a sum over
    /// the pairs it covers, divided by their count).
    pub fn metric_sums(&self) -> [f64; 6] {
        let (c, r) = (&self.chosen_rewards, &self.rejected_rewards);
        let sum = |v: &[f64]| v.iter().sum::<f64>();
        [
            sum(c),
            sum(r),
            c.iter().zip(r).filter(|(a, b)| a > b).count() as f64,
            c.iter().zip(r).map(|(a, b)| a - b).sum(),
            sum(&self.chosen_logps),
            sum(&self.rejected_logps),
        ]
    }
}

/// IPO's length-normalised margin `c/n_w − r/n_l`, `lens [2n]` chosen then rejected.
fn ratio_avg(c: &Tensor<1>, r: &Tensor<1>, lens: Tensor<1>, n: usize) -> Tensor<1> {
    let (nw, nl) = (lens.clone().narrow(0, 0, n), lens.narrow(0, n, n));
    c.clone() / nw - r.clone() / nl
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn settings(kind: DpoLossType, eps: f64) -> DpoSettings {
        DpoSettings {
            beta: 0.5,
            losses: vec![(kind, 1.0)],
            label_smoothing: eps,
        }
    }

    fn run(s: &DpoSettings, policy: &[f32], reference: Option<&[f64]>, lens: &[f32]) -> Vec<f64> {
        let t = Tensor::<1>::from_data(
            TensorData::new(policy.to_vec(), [policy.len()]),
            &Device::default(),
        );
        let l = dpo_loss(t, reference, lens, s);
        to_f32_vec(l.per_pair).into_iter().map(f64::from).collect()
    }

    fn log_sig(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    #[test]
    fn each_loss_matches_its_formula() {
        // One pair: c = -1 - (-1.5) = 0.5, r = -3 - (-2) = -1, Δ = 1.5.
        let (policy, reference, lens) = ([-1.0f32, -3.0], [-1.5f64, -2.0], [2.0f32, 4.0]);
        let z = 0.5 * 1.5;
        let cases = [
            (DpoLossType::Sigmoid, 0.0, -log_sig(z)),
            (
                DpoLossType::Sigmoid,
                0.2,
                -0.8 * log_sig(z) - 0.2 * log_sig(-z),
            ),
            (DpoLossType::Hinge, 0.0, (1.0f64 - z).max(0.0)),
            (
                DpoLossType::Ipo,
                0.0,
                (0.5 / 2.0 + 1.0 / 4.0 - 1.0f64).powi(2),
            ),
            (
                DpoLossType::Robust,
                0.2,
                (-0.8 * log_sig(z) + 0.2 * log_sig(-z)) / 0.6,
            ),
        ];
        for (kind, eps, want) in cases {
            let got = run(&settings(kind, eps), &policy, Some(&reference), &lens)[0];
            assert!(
                (got - want).abs() < 1e-6,
                "{kind:?} ε {eps}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn reference_free_is_a_zero_reference() {
        let s = settings(DpoLossType::Sigmoid, 0.0);
        let free = run(&s, &[-1.0, -3.0, -2.0, -0.5], None, &[1.0; 4]);
        let zero = run(&s, &[-1.0, -3.0, -2.0, -0.5], Some(&[0.0; 4]), &[1.0; 4]);
        assert_eq!(free, zero);
        assert!((free[0] - -log_sig(0.5 * (-1.0 - -2.0))).abs() < 1e-6);
    }

    #[test]
    fn a_policy_equal_to_its_reference_costs_ln_2() {
        let s = settings(DpoLossType::Sigmoid, 0.0);
        let v = run(&s, &[-1.25, -7.5], Some(&[-1.25, -7.5]), &[3.0, 1.0]);
        assert_eq!(v[0], std::f32::consts::LN_2 as f64);
    }
}
