//! LoRA adapters with PEFT's layout and math, applied beside the frozen base weight:
//! `y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ`, never `x·(W + s·B·A)ᵀ` while training.
//!
//! Sites (the weights an adapter sits on) are named by the base parameter: a linear
//! `model.layers.0.self_attn.q_proj.weight`, the MoE router `model.layers.1.mlp.gate.weight`
//! or the fused experts `model.layers.1.mlp.experts.gate_up_proj` / `…experts.down_proj`.
//! Adapter tensors carry PEFT's file names minus `base_model.model.` and PEFT's shapes:
//! - linear and router: `…q_proj.lora_A.weight [r, in]`, `…q_proj.lora_B.weight [out, r]`;
//! - experts (peft ≥ 0.17 `target_parameters`, a `ParamWrapper` per parameter, nested when both
//!   are targeted: gate_up_proj inside, so its tensors are `…experts.base_layer.lora_A.weight`,
//!   down_proj's `…experts.lora_A.weight`): `lora_A [E·r, in]` is the per-expert stack
//!   `[E, r, in]` flattened; `lora_B [out, r·E]` is `[out, r, E]` flattened (rank-major, expert
//!   minor), so expert e's B is `lora_B[:, j·E + e]`. Expert e's weight gains `s·B_e·A_e`.
//!   In memory the experts' B is held as `[out·r, E]`, the same elements in the same order,
//!   so that under expert parallelism a rank's experts are a plain column range of it (PEFT's
//!   2-D view interleaves them); the adapter files are read and written in PEFT's shape.
//!
//! Scaling is `alpha / r`, or `alpha / √r` with rsLoRA (per site: rank and alpha may differ).

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};

use crate::config::Qwen3Config;
use crate::grouped_mm::grouped_mm;
use crate::init::{name_hash, SplitMix64};
use crate::layers::linear;
use crate::params::{param_from_data, ParamSource};
use crate::precision::{like, scale};
use crate::shard::{cut_part, is_expert_param, Split};

/// What `lora.target_modules` may name. On a MoE model `gate_proj`/`up_proj`/`down_proj` mean
/// the experts and `gate` the router, as peft rewrites them for transformers 5.
pub const KNOWN_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate",
];

/// The `lora:` section of a recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input (linears only; peft allows none with MoE targets).
    pub dropout: f64,
    pub target_modules: Vec<String>,
    /// rsLoRA: scale `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
}

/// One adapted weight with its rank and alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSite {
    /// The base parameter's name (see the module docs).
    pub param: String,
    pub rank: usize,
    pub alpha: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("lora.target_modules: unknown target `{0}`; known are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj and gate (the MoE router)")]
    UnknownTarget(String),
    #[error("lora.target_modules is empty; name at least one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, gate")]
    NoTargets,
    #[error("lora.target_modules: `gate` is the MoE router, and this model is dense; remove it")]
    RouterOnDense,
    #[error("lora.target_modules: `{given}` without `{missing}`: this MoE model fuses the experts' gate and up projections (gate_up_proj), so target both or neither (peft refuses it too)")]
    HalfFused { given: String, missing: String },
    #[error("LoRA dropout {0} with MoE expert or router targets: peft refuses lora_dropout > 0 with target_parameters (it cannot drop the input of a fused weight); set the dropout (lora.dropout in a recipe, lora_dropout in adapter_config.json) to 0, or target only attention")]
    DropoutOnParameters(f64),
    #[error("lora.dropout = {0} must be in [0, 1)")]
    BadDropout(f64),
    #[error("LoRA site `{0}`: rank must be at least 1")]
    ZeroRank(String),
    #[error("LoRA is already attached to this model; attach once, to a model without adapters")]
    AlreadyAttached,
    #[error("LoRA site `{0}`: the model has no such weight, or it cannot carry an adapter (adapters go on attention and MLP projections, the MoE experts and the router)")]
    UnknownSite(String),
    #[error("LoRA site `{0}` is listed twice")]
    DuplicateSite(String),
}

/// `alpha / r`, or `alpha / √r` with rsLoRA.
pub fn scaling(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

impl LoraConfig {
    /// The sites these targets select on a model with config `c`, as peft would create them
    /// with transformers 5: on MoE layers `gate_proj`+`up_proj` select the fused
    /// `experts.gate_up_proj` with rank 2r and alpha 2α (peft's `rank_pattern`/`alpha_pattern`
    /// for the fusion), `down_proj` the experts' `down_proj`, `gate` the router. The dense MLP
    /// layers of a MoE model (`mlp_only_layers`, `decoder_sparse_step`) get no MLP adapter,
    /// because peft moves those names to the experts.
    pub fn sites(&self, c: &Qwen3Config) -> Result<Vec<LoraSite>, LoraError> {
        if self.target_modules.is_empty() {
            return Err(LoraError::NoTargets);
        }
        if let Some(t) = self
            .target_modules
            .iter()
            .find(|t| !KNOWN_TARGETS.contains(&t.as_str()))
        {
            return Err(LoraError::UnknownTarget(t.clone()));
        }
        let has = |t: &str| self.target_modules.iter().any(|x| x == t);
        let moe = c.moe.is_some();
        if has("gate") && !moe {
            return Err(LoraError::RouterOnDense);
        }
        if moe {
            for (given, missing) in [("gate_proj", "up_proj"), ("up_proj", "gate_proj")] {
                if has(given) && !has(missing) {
                    return Err(LoraError::HalfFused {
                        given: given.into(),
                        missing: missing.into(),
                    });
                }
            }
            let params = ["gate_proj", "down_proj", "gate"].iter().any(|t| has(t));
            if params && self.dropout > 0.0 {
                return Err(LoraError::DropoutOnParameters(self.dropout));
            }
        }
        let (r, a) = (self.rank, self.alpha);
        let site = |param: String, rank, alpha| LoraSite { param, rank, alpha };
        let mut sites = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for t in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                if has(t) {
                    sites.push(site(format!("{p}.self_attn.{t}.weight"), r, a));
                }
            }
            if c.is_moe_layer(i) {
                if has("gate") {
                    sites.push(site(format!("{p}.mlp.gate.weight"), r, a));
                }
                if has("gate_proj") {
                    sites.push(site(
                        format!("{p}.mlp.experts.gate_up_proj"),
                        2 * r,
                        2.0 * a,
                    ));
                }
                if has("down_proj") {
                    sites.push(site(format!("{p}.mlp.experts.down_proj"), r, a));
                }
            } else if !moe {
                for t in ["gate_proj", "up_proj", "down_proj"] {
                    if has(t) {
                        sites.push(site(format!("{p}.mlp.{t}.weight"), r, a));
                    }
                }
            }
        }
        Ok(sites)
    }
}

/// True for sites that peft adapts through `target_parameters` (experts, router).
pub fn is_parameter_site(param: &str) -> bool {
    param.ends_with(".experts.gate_up_proj")
        || param.ends_with(".experts.down_proj")
        || param.ends_with(".mlp.gate.weight")
}

/// The PEFT module path (minus `base_model.model.`) that holds the adapter of `site`; `all` is
/// every site of the model, needed because peft nests the two expert wrappers.
pub fn peft_module(site: &str, all: &[LoraSite]) -> String {
    if let Some(p) = site.strip_suffix(".experts.gate_up_proj") {
        let down = format!("{p}.experts.down_proj");
        if all.iter().any(|s| s.param == down) {
            format!("{p}.experts.base_layer")
        } else {
            format!("{p}.experts")
        }
    } else if let Some(p) = site.strip_suffix(".experts.down_proj") {
        format!("{p}.experts")
    } else {
        site.strip_suffix(".weight").unwrap_or(site).to_string()
    }
}

/// The names of the A and B tensors of `site` (PEFT's, minus `base_model.model.`).
pub fn adapter_names(site: &str, all: &[LoraSite]) -> (String, String) {
    let m = peft_module(site, all);
    (format!("{m}.lora_A.weight"), format!("{m}.lora_B.weight"))
}

/// Which dropout mask to draw (`ForwardCtx::dropout`): the trainer passes its seed and a
/// counter that differs for every forward (e.g. `step · micro_batches + micro`). Each adapter
/// mixes in its own name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    pub counter: u64,
}

/// The adapter on one site.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub site: String,
    pub a_name: String,
    pub b_name: String,
    /// `[r, in]`, or `[E·r, in]` for experts.
    pub a: Tensor<2>,
    /// `[out, r]`, or `[out·r, E]` for experts (PEFT's `[out, r·E]` reshaped).
    pub b: Tensor<2>,
    pub rank: usize,
    pub alpha: f64,
    pub scale: f64,
    /// 1 unless the site is a stacked expert weight.
    pub experts: usize,
    pub dropout: f64,
    /// On a row-parallel site under tensor parallelism, the input columns this rank holds:
    /// the dropout mask is drawn for the whole input and cut, so it equals the one-rank mask.
    pub input_part: Option<Split>,
}

impl LoraAdapter {
    /// `s · (dropout(x) · Aᵀ) · Bᵀ` for `x [.., in]`, the dropout mask drawn from `key` (none
    /// without a key).
    pub fn apply<const D: usize>(&self, x: Tensor<D>, key: Option<DropoutKey>) -> Tensor<D> {
        let x = self.drop(x, key);
        scale(linear(linear(x, &self.a, None), &self.b, None), self.scale)
    }

    /// Per-expert `s · (x_e · A_eᵀ) · B_eᵀ` for `x [rows, in]` sorted by expert (expert e's
    /// rows `offsets[e]..offsets[e + 1]`) → `[rows, out]`.
    pub fn apply_experts(&self, x: Tensor<2>, offsets: &[usize]) -> Tensor<2> {
        let (a, b) = self.per_expert();
        let (a, b) = (like(a, &x), like(b, &x));
        let y = grouped_mm(grouped_mm(x, a, offsets), b, offsets);
        scale(y, self.scale)
    }

    /// `(A [E, r, in], B [E, out, r])` from PEFT's flattened layout.
    fn per_expert(&self) -> (Tensor<3>, Tensor<3>) {
        let (e, r) = (self.experts, self.rank);
        let [_, inp] = self.a.dims();
        let out = self.b.dims()[0] / r;
        let a = self.a.clone().reshape([e, r, inp]);
        let b = self.b.clone().reshape([out, r, e]).permute([2, 0, 1]);
        (a, b)
    }

    /// `s · B · A` `[out, in]` (untracked), what merging adds to a linear or router weight.
    pub fn delta(&self) -> Tensor<2> {
        let (a, b) = (self.a.clone(), self.b.clone());
        b.matmul(a).mul_scalar(self.scale).set_require_grad(false)
    }

    /// `s · B_e · A_e` per expert `[E, out, in]` (untracked).
    pub fn delta_experts(&self) -> Tensor<3> {
        let (a, b) = self.per_expert();
        b.matmul(a).mul_scalar(self.scale).set_require_grad(false)
    }

    /// Inverted dropout with a mask drawn from (key, adapter name); identity without a key.
    fn drop<const D: usize>(&self, x: Tensor<D>, key: Option<DropoutKey>) -> Tensor<D> {
        let (Some(key), true) = (key, self.dropout > 0.0) else {
            return x;
        };
        let dims = x.dims();
        let mut whole = dims;
        if let Some(part) = &self.input_part {
            whole[D - 1] *= part.parts;
        }
        let n: usize = whole.iter().product();
        let stream = key.seed ^ name_hash(&self.a_name) ^ key.counter.wrapping_mul(MIX);
        let mut rng = SplitMix64::new(stream);
        let (p, keep) = (self.dropout, (1.0 / (1.0 - self.dropout)) as f32);
        let mut mask: Vec<f32> = (0..n)
            .map(|_| if rng.next_unit() > p { keep } else { 0.0 })
            .collect();
        if let Some(part) = &self.input_part {
            let split = Split {
                dim: D - 1,
                ..*part
            };
            mask = cut_part(&mask, &whole, &split);
        }
        let mask = Tensor::<D>::from_data(TensorData::new(mask, dims), &x.device());
        let mask = like(mask, &x);
        x * mask
    }
}

/// The experts' B tensors (held as `[out·r, E]`, see the module docs) among the adapters of
/// `sites`, with their ranks.
pub fn expert_b_ranks(sites: &[LoraSite]) -> BTreeMap<String, usize> {
    (sites.iter())
        .filter(|s| is_expert_param(&s.param))
        .map(|s| (adapter_names(&s.param, sites).1, s.rank))
        .collect()
}

/// PEFT's `[out, r·E]` for an experts' B held as `[out·r, E]`.
pub fn peft_b_shape(held: &[usize], rank: usize) -> Vec<usize> {
    vec![held[0] / rank, held[1] * rank]
}

/// An odd constant to spread the counter over the seed's bits.
const MIX: u64 = 0xD6E8_FEB8_6659_FD93;

/// Where an adapter goes: the slot in its module and the base weight's dims.
pub(crate) struct LoraSlot<'a> {
    pub adapter: &'a mut Option<LoraAdapter>,
    pub dims: Vec<usize>,
}

/// PEFT's default init: A ~ kaiming-uniform(a=√5) = U(±1/√fan_in), B = 0. Each A draws from
/// its own SplitMix64 stream seeded by (seed, name), like [`crate::init::RandomInit`].
pub struct LoraInit {
    pub seed: u64,
}

impl ParamSource for LoraInit {
    type Error = LoraError;

    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, LoraError> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.contains(".lora_A.") {
            let bound = 1.0 / (shape[D - 1] as f64).sqrt();
            let mut rng = SplitMix64::new(self.seed ^ name_hash(name));
            (0..n)
                .map(|_| (bound * (2.0 * rng.next_unit() - 1.0)) as f32)
                .collect()
        } else {
            vec![0.0; n]
        };
        Ok(param_from_data(TensorData::new(values, shape), device))
    }
}
