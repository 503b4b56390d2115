//! The `dpo` section (`data.task: dpo`): TRL 1.16's DPO settings, with cDPO's label
//! smoothing on `sigmoid` and a reference-free mode kept from TRL 0.28.
//!
//! Owns: the section's schema and its checks. Must not: compute losses (`crate::dpo`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::validate::Violation;

/// The per-pair loss of DPO and its variants (formulas: `crate::dpo::loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    Sigmoid,
    Hinge,
    Ipo,
    Robust,
}

/// The names `dpo.loss_type` takes.
pub const DPO_LOSS_NAMES: &[&str] = &["sigmoid", "hinge", "ipo", "robust"];

/// What the policy is compared against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceKind {
    /// Under fresh LoRA adapters the base (adapters off); under an adapter continued from
    /// `lora.adapter` a frozen copy of it; else a frozen copy of the starting weights.
    Auto,
    /// Reference-free: the reference log-probs are 0.
    None,
    /// A Hugging Face model folder.
    Folder(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSection {
    /// β: the KL penalty's strength (IPO's τ).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// One loss or several, summed with `loss_weights`.
    #[serde(default = "default_loss_type")]
    pub loss_type: Vec<DpoLossType>,
    /// One weight per `loss_type`; null: 1 each.
    #[serde(default)]
    pub loss_weights: Option<Vec<f64>>,
    /// ε of cDPO (`sigmoid`) and robust DPO: the assumed rate of flipped labels.
    #[serde(default)]
    pub label_smoothing: f64,
    /// `auto`, `none` (reference-free) or a model folder.
    #[serde(default = "default_reference")]
    pub reference: String,
    /// Compute the reference log-probs of every pair once, into the run folder.
    #[serde(default)]
    pub precompute_reference: bool,
}

impl Default for DpoSection {
    fn default() -> Self {
        Self {
            beta: default_beta(),
            loss_type: default_loss_type(),
            loss_weights: None,
            label_smoothing: 0.0,
            reference: default_reference(),
            precompute_reference: false,
        }
    }
}

impl DpoSection {
    pub fn reference_kind(&self) -> ReferenceKind {
        match self.reference.as_str() {
            "auto" => ReferenceKind::Auto,
            "none" => ReferenceKind::None,
            path => ReferenceKind::Folder(PathBuf::from(path)),
        }
    }

    /// Each loss with its weight.
    pub fn weighted_losses(&self) -> Vec<(DpoLossType, f64)> {
        let weights = self.loss_weights.clone();
        let weights = weights.unwrap_or_else(|| vec![1.0; self.loss_type.len()]);
        self.loss_type.iter().copied().zip(weights).collect()
    }

    /// The first violated constraint, if any.
    pub fn validate(&self) -> Result<(), Violation> {
        let bad = |key, msg: String| {
            Err(Violation {
                key,
                msg,
                related: &[],
            })
        };
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return bad(
                "dpo.beta",
                format!(
                    "is {}; it must be greater than 0 (TRL's default is 0.1)",
                    self.beta
                ),
            );
        }
        if self.loss_type.is_empty() {
            return bad(
                "dpo.loss_type",
                "is an empty list; name at least one loss (e.g. sigmoid)".into(),
            );
        }
        if let Some(w) = &self.loss_weights {
            if w.len() != self.loss_type.len() {
                return Err(Violation {
                    key: "dpo.loss_weights",
                    msg: format!(
                        "has {} weights for {} loss types; give one weight per `dpo.loss_type` entry, or null",
                        w.len(),
                        self.loss_type.len()
                    ),
                    related: &["dpo.loss_type"],
                });
            }
            if let Some(x) = w.iter().find(|x| !x.is_finite() || **x < 0.0) {
                return bad(
                    "dpo.loss_weights",
                    format!("holds {x}; every weight must be 0 or more"),
                );
            }
        }
        let eps = self.label_smoothing;
        if !(0.0..0.5).contains(&eps) {
            return bad(
                "dpo.label_smoothing",
                format!("is {eps}; it must be in [0, 0.5)"),
            );
        }
        let smoothed = |t: &DpoLossType| matches!(t, DpoLossType::Sigmoid | DpoLossType::Robust);
        if eps > 0.0 && !self.loss_type.iter().any(smoothed) {
            return Err(Violation {
                key: "dpo.label_smoothing",
                msg: format!("is {eps} but no loss in `dpo.loss_type` uses it; it applies to sigmoid (cDPO) and robust"),
                related: &["dpo.loss_type"],
            });
        }
        if self.reference.is_empty() {
            return bad(
                "dpo.reference",
                "is empty; use `auto`, `none` or a model folder".into(),
            );
        }
        if self.precompute_reference && self.reference_kind() == ReferenceKind::None {
            return Err(Violation {
                key: "dpo.precompute_reference",
                msg: "is true but `dpo.reference` is `none` (no reference to compute); set one of them differently".into(),
                related: &["dpo.reference"],
            });
        }
        Ok(())
    }
}

fn default_beta() -> f64 {
    0.1
}
fn default_loss_type() -> Vec<DpoLossType> {
    vec![DpoLossType::Sigmoid]
}
fn default_reference() -> String {
    "auto".into()
}
