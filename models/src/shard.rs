//! The sharding plan: which part of every parameter a rank holds under tensor and expert
//! parallelism, decided from the parameter's Hugging Face name alone (the one place that
//! knows it, as torchtitan's per-model sharding files), and a [`ParamSource`] wrapper that
//! hands each layer its part. Layers then read their local sizes (heads, vocabulary rows,
//! experts) off the weights they were given, so their code stays single-device.
//!
//! Owns: placements and the divisibility they need. Must not: communicate (that is
//! `boundaries.rs`'s implementor in moeru-parallel) or know about optimizers.

use burn::tensor::{Device, Tensor};

use crate::params::{param_from_data, ParamSource};

/// This rank's coordinates in the model-parallel layout: its tensor-parallel rank of `tp`
/// (heads, intermediate size and vocabulary split), whether activations between the
/// tensor-parallel regions are split by rows too (sequence parallelism), and its
/// expert-parallel rank of `ep` (experts split in contiguous ranges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShard {
    pub tp: usize,
    pub tp_rank: usize,
    pub sequence_parallel: bool,
    pub ep: usize,
    pub ep_rank: usize,
}

impl Default for ModelShard {
    fn default() -> Self {
        Self::single()
    }
}

/// One part of a tensor cut in `parts` equal slices along `dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub dim: usize,
    pub index: usize,
    pub parts: usize,
}

impl Split {
    /// The rows (along `dim`) of a tensor whose full length there is `full`.
    pub fn range(&self, full: usize) -> std::ops::Range<usize> {
        let len = full / self.parts;
        self.index * len..(self.index + 1) * len
    }

    /// The local shape of a tensor of shape `full`.
    pub fn local_shape<const D: usize>(&self, mut full: [usize; D]) -> [usize; D] {
        full[self.dim] /= self.parts;
        full
    }
}

/// Where a parameter lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Every rank holds all of it.
    Replicated,
    Split(Split),
}

/// A parameter's placement and how its gradient is completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamPlan {
    pub placement: Placement,
    /// An expert tensor: split over the expert-parallel group, its gradient summed over the
    /// expert-data-parallel group (the ranks holding the same experts) instead of dp.
    pub expert: bool,
    /// Replicated, but each tensor-parallel rank computes only part of its gradient (QK-norms
    /// see their rank's heads; under sequence parallelism every replicated weight sees its
    /// rank's rows): the gradient is summed over tp before the data-parallel sync.
    pub tp_partial: bool,
}

impl ModelShard {
    /// The whole model on one rank.
    pub const fn single() -> Self {
        Self {
            tp: 1,
            tp_rank: 0,
            sequence_parallel: false,
            ep: 1,
            ep_rank: 0,
        }
    }

    /// True when this shard holds everything (the plan places nothing).
    pub fn is_single(&self) -> bool {
        self.tp == 1 && self.ep == 1
    }

    /// Whether activations between tensor-parallel regions are split by rows: only with
    /// more than one tensor-parallel rank.
    pub fn sequence_parallel(&self) -> bool {
        self.sequence_parallel && self.tp > 1
    }

    /// The plan for the parameter `name` (a Hugging Face name, see `params.rs`).
    pub fn plan(&self, name: &str) -> ParamPlan {
        if let Some((module, which)) = lora_tensor(name) {
            return self.lora_plan(module, which);
        }
        let tp = |dim| self.split(dim, self.tp_rank, self.tp);
        let (placement, expert) = if is_expert_param(name) {
            (self.split(0, self.ep_rank, self.ep), true)
        } else if is_column(name) {
            (tp(0), false)
        } else if is_row(name) {
            (tp(1), false)
        } else {
            (Placement::Replicated, false)
        };
        let replicated = placement == Placement::Replicated && !expert;
        let qk_norm = name.ends_with(".q_norm.weight") || name.ends_with(".k_norm.weight");
        ParamPlan {
            placement,
            expert,
            tp_partial: replicated && self.tp > 1 && (qk_norm || self.sequence_parallel()),
        }
    }

    /// A LoRA tensor is split like its base weight, so that `x·Aᵀ·Bᵀ` needs no collective of
    /// its own: on a column-parallel site B `[out, r]` by output rows and A whole; on a
    /// row-parallel one A `[r, in]` by input columns and B whole (its term joins the partial
    /// sum the base's reduction completes); on experts A `[E·r, in]` by expert rows and B,
    /// held as `[out·r, E]` (see `lora.rs`), by expert columns. The whole factor of a split
    /// site sees only its rank's part of the product, so its gradient is partial over tp.
    fn lora_plan(&self, module: &str, which: LoraFactor) -> ParamPlan {
        let tp = |dim| self.split(dim, self.tp_rank, self.tp);
        let site = format!("{module}.weight");
        let (placement, expert) = if module.contains(".mlp.experts") {
            let dim = if which == LoraFactor::A { 0 } else { 1 };
            (self.split(dim, self.ep_rank, self.ep), true)
        } else {
            let split_factor = match (is_column(&site), is_row(&site)) {
                (true, _) => Some((LoraFactor::B, 0)),
                (_, true) => Some((LoraFactor::A, 1)),
                _ => None,
            };
            match split_factor {
                Some((f, dim)) if f == which => (tp(dim), false),
                _ => (Placement::Replicated, false),
            }
        };
        let replicated = placement == Placement::Replicated && !expert;
        let on_split_site = is_column(&site) || is_row(&site);
        ParamPlan {
            placement,
            expert,
            tp_partial: replicated && self.tp > 1 && (on_split_site || self.sequence_parallel()),
        }
    }

    fn split(&self, dim: usize, index: usize, parts: usize) -> Placement {
        match parts {
            1 => Placement::Replicated,
            _ => Placement::Split(Split { dim, index, parts }),
        }
    }
}

/// The two factors of a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoraFactor {
    A,
    B,
}

/// `(module, factor)` of a LoRA tensor `{module}.lora_A.weight` / `{module}.lora_B.weight`.
fn lora_tensor(name: &str) -> Option<(&str, LoraFactor)> {
    let base = name.strip_suffix(".weight")?;
    if let Some(m) = base.strip_suffix(".lora_A") {
        Some((m, LoraFactor::A))
    } else {
        Some((base.strip_suffix(".lora_B")?, LoraFactor::B))
    }
}

/// Whether `name` is an expert tensor (split over the expert-parallel group, synced over the
/// expert-data-parallel one).
pub fn is_expert_param(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// The whole shape of a parameter whose part under `placement` has shape `local`.
pub fn full_shape(local: &[usize], placement: &Placement) -> Vec<usize> {
    let mut full = local.to_vec();
    if let Placement::Split(s) = placement {
        full[s.dim] *= s.parts;
    }
    full
}

/// Column-parallel (split along the output, dim 0): q/k/v with their biases, the dense MLP's
/// gate and up, and the vocabulary rows of the embedding and the LM head.
fn is_column(name: &str) -> bool {
    const SUFFIXES: [&str; 8] = [
        ".self_attn.q_proj.weight",
        ".self_attn.k_proj.weight",
        ".self_attn.v_proj.weight",
        ".self_attn.q_proj.bias",
        ".self_attn.k_proj.bias",
        ".self_attn.v_proj.bias",
        ".mlp.gate_proj.weight",
        ".mlp.up_proj.weight",
    ];
    name == "model.embed_tokens.weight"
        || name == "lm_head.weight"
        || SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Row-parallel (split along the input, dim 1): o_proj and the dense MLP's down. Their biases
/// are replicated and added after the sum.
fn is_row(name: &str) -> bool {
    name.ends_with(".self_attn.o_proj.weight") || name.ends_with(".mlp.down_proj.weight")
}

/// The whole tensor from its parts: `gathered` holds `parts` parts of `part_shape` one after
/// another (what an all-gather returns), cut along `dim`.
pub fn join_parts(gathered: &[f32], parts: usize, part_shape: &[usize], dim: usize) -> Vec<f32> {
    let outer: usize = part_shape[..dim].iter().product();
    let run: usize = part_shape[dim..].iter().product();
    let part_len = outer * run;
    let mut out = Vec::with_capacity(gathered.len());
    for o in 0..outer {
        for p in 0..parts {
            let at = p * part_len + o * run;
            out.extend_from_slice(&gathered[at..at + run]);
        }
    }
    out
}

/// The part `split` of a whole tensor `full` of shape `shape`, flat.
pub fn cut_part(full: &[f32], shape: &[usize], split: &Split) -> Vec<f32> {
    let d = split.dim;
    let rows = split.range(shape[d]);
    let outer: usize = shape[..d].iter().product();
    let inner: usize = shape[d + 1..].iter().product();
    let mut out = Vec::with_capacity(full.len() / split.parts);
    for o in 0..outer {
        let at = (o * shape[d] + rows.start) * inner;
        out.extend_from_slice(&full[at..at + rows.len() * inner]);
    }
    out
}

/// Narrows a parameter read whole to its part, as a new leaf (a narrowed tracked tensor would
/// send its gradient to the whole tensor instead).
pub fn narrow_param<const D: usize>(full: Tensor<D>, split: &Split) -> Tensor<D> {
    let range = split.range(full.dims()[split.dim]);
    let part = full.narrow(split.dim, range.start, range.len());
    let device = part.device();
    param_from_data(part.into_data(), &device)
}

/// A [`ParamSource`] that gives each parameter as `shard` places it: the layers ask for full
/// shapes and receive their part, through [`ParamSource::tensor_part`] (so a source that can
/// read a slice directly never materialises the whole tensor).
pub struct ShardedSource<'a, S> {
    pub inner: &'a mut S,
    pub shard: ModelShard,
}

impl<S: ParamSource> ParamSource for ShardedSource<'_, S> {
    type Error = S::Error;

    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, S::Error> {
        match self.shard.plan(name).placement {
            Placement::Replicated => self.inner.tensor(name, shape, device),
            Placement::Split(split) => self.inner.tensor_part(name, shape, &split, device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(tp: usize, tp_rank: usize, sp: bool, ep: usize, ep_rank: usize) -> ModelShard {
        ModelShard {
            tp,
            tp_rank,
            sequence_parallel: sp,
            ep,
            ep_rank,
        }
    }

    #[test]
    fn every_kind_of_parameter_has_its_placement() {
        let s = shard(2, 1, false, 4, 3);
        let split = |dim, index, parts| Placement::Split(Split { dim, index, parts });
        let l = "model.layers.2";
        let cases = [
            ("model.embed_tokens.weight", split(0, 1, 2)),
            ("lm_head.weight", split(0, 1, 2)),
            (
                &format!("{l}.self_attn.q_proj.weight") as &str,
                split(0, 1, 2),
            ),
            (&format!("{l}.self_attn.v_proj.bias"), split(0, 1, 2)),
            (&format!("{l}.self_attn.o_proj.weight"), split(1, 1, 2)),
            (&format!("{l}.self_attn.o_proj.bias"), Placement::Replicated),
            (&format!("{l}.mlp.up_proj.weight"), split(0, 1, 2)),
            (&format!("{l}.mlp.down_proj.weight"), split(1, 1, 2)),
            (&format!("{l}.mlp.gate.weight"), Placement::Replicated),
            (&format!("{l}.mlp.experts.gate_up_proj"), split(0, 3, 4)),
            (&format!("{l}.mlp.experts.down_proj"), split(0, 3, 4)),
            (
                &format!("{l}.input_layernorm.weight"),
                Placement::Replicated,
            ),
            ("model.norm.weight", Placement::Replicated),
        ];
        for (name, want) in cases {
            assert_eq!(s.plan(name).placement, want, "{name}");
        }
        assert!(s.plan(&format!("{l}.mlp.experts.down_proj")).expert);
        assert!(!s.plan(&format!("{l}.mlp.gate.weight")).expert);
    }

    #[test]
    fn partial_gradients_are_the_qk_norms_and_under_sp_every_replicated_weight() {
        let norm = "model.layers.0.input_layernorm.weight";
        let qn = "model.layers.0.self_attn.q_norm.weight";
        let q = "model.layers.0.self_attn.q_proj.weight";
        let plain = shard(2, 0, false, 1, 0);
        assert!(plain.plan(qn).tp_partial && !plain.plan(norm).tp_partial);
        let sp = shard(2, 0, true, 1, 0);
        assert!(sp.plan(qn).tp_partial && sp.plan(norm).tp_partial && !sp.plan(q).tp_partial);
        assert!(!ModelShard::single().plan(qn).tp_partial);
        assert!(!shard(1, 0, true, 1, 0).sequence_parallel());
    }

    #[test]
    fn lora_factors_split_like_their_base_weight() {
        let split = |dim, index, parts| Placement::Split(Split { dim, index, parts });
        let s = shard(2, 1, true, 2, 0);
        let l = "model.layers.1";
        let cases = [
            (
                "self_attn.q_proj.lora_A.weight",
                Placement::Replicated,
                true,
            ),
            ("self_attn.q_proj.lora_B.weight", split(0, 1, 2), false),
            ("self_attn.o_proj.lora_A.weight", split(1, 1, 2), false),
            (
                "self_attn.o_proj.lora_B.weight",
                Placement::Replicated,
                true,
            ),
            ("mlp.gate_proj.lora_B.weight", split(0, 1, 2), false),
            ("mlp.down_proj.lora_A.weight", split(1, 1, 2), false),
            ("mlp.gate.lora_A.weight", Placement::Replicated, true),
            ("mlp.experts.lora_A.weight", split(0, 0, 2), false),
            ("mlp.experts.lora_B.weight", split(1, 0, 2), false),
            (
                "mlp.experts.base_layer.lora_A.weight",
                split(0, 0, 2),
                false,
            ),
            (
                "mlp.experts.base_layer.lora_B.weight",
                split(1, 0, 2),
                false,
            ),
        ];
        for (name, placement, partial) in cases {
            let plan = s.plan(&format!("{l}.{name}"));
            assert_eq!(plan.placement, placement, "{name}");
            assert_eq!(plan.tp_partial, partial, "{name}");
            assert_eq!(plan.expert, name.contains("experts"), "{name}");
        }
        // Without sequence parallelism the router's adapter sees every row.
        let router = shard(2, 0, false, 1, 0).plan("model.layers.1.mlp.gate.lora_B.weight");
        assert!(!router.tp_partial);
        assert!(
            shard(2, 0, false, 1, 0)
                .plan("model.layers.0.self_attn.v_proj.lora_A.weight")
                .tp_partial
        );
    }

    #[test]
    fn one_rank_places_nothing() {
        let s = ModelShard::single();
        for name in ["lm_head.weight", "model.layers.0.mlp.experts.down_proj"] {
            assert_eq!(s.plan(name).placement, Placement::Replicated);
        }
    }

    #[test]
    fn cut_parts_join_back_into_the_whole() {
        let shape = [3, 4, 2];
        let full: Vec<f32> = (0..24).map(|i| i as f32).collect();
        for (dim, parts) in [(0, 3), (1, 2), (1, 4), (2, 2)] {
            let gathered: Vec<f32> = (0..parts)
                .flat_map(|index| cut_part(&full, &shape, &Split { dim, index, parts }))
                .collect();
            let mut part_shape = shape;
            part_shape[dim] /= parts;
            assert_eq!(
                join_parts(&gathered, parts, &part_shape, dim),
                full,
                "dim {dim}"
            );
        }
        let second_column = cut_part(
            &full,
            &[4, 6],
            &Split {
                dim: 1,
                index: 1,
                parts: 3,
            },
        );
        assert_eq!(second_column, [2., 3., 8., 9., 14., 15., 20., 21.]);
    }

    #[test]
    fn splits_cut_equal_ranges() {
        let s = Split {
            dim: 1,
            index: 2,
            parts: 4,
        };
        assert_eq!(s.range(12), 6..9);
        assert_eq!(s.local_shape([5, 12]), [5, 3]);
    }
}
