//! Attaching LoRA adapters to a [`Qwen3Model`], walking what trains, merging for export.
//!
//! Once adapters are attached the base is frozen: on an autodiff device every base parameter
//! is rebuilt with `require_grad` off, so backward computes no gradient for it and an
//! optimizer walking [`Qwen3Model::trainable`] keeps no state for it.

use std::collections::{BTreeMap, BTreeSet};

use burn::tensor::{Device, Tensor};

use crate::lora::{
    adapter_names, expert_b_ranks, is_parameter_site, scaling, LoraAdapter, LoraConfig, LoraError,
    LoraInit, LoraSite, LoraSlot,
};
use crate::model::Qwen3Model;
use crate::params::{param_from_data, ParamSource, ParamVisitor, Params};
use crate::shard::{full_shape, Placement, ShardedSource};

impl Qwen3Model {
    /// Attaches fresh adapters on the sites `cfg` selects (see [`LoraConfig::sites`]):
    /// A kaiming-uniform as peft initialises it, from SplitMix64 streams seeded by
    /// (seed, tensor name); B zero, so the model's output is unchanged until B trains.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<(), LoraError> {
        let sites = cfg.sites(&self.config)?;
        self.attach_lora_sites(cfg, &sites, &mut LoraInit { seed })
    }

    /// Attaches adapters on `sites`, asking `src` for each A and B by its adapter name with
    /// PEFT's whole shape (see `lora.rs`); a sharded model keeps the part its shard's plan
    /// gives it (`shard.rs`), so a rank draws or reads exactly its slice of the one-rank
    /// adapter. `cfg` supplies dropout and rsLoRA (its rank and alpha are recorded; each
    /// site's own rank and alpha give its scaling). Nothing changes on error.
    pub fn attach_lora_sites<S: ParamSource>(
        &mut self,
        cfg: &LoraConfig,
        sites: &[LoraSite],
        src: &mut S,
    ) -> Result<(), S::Error>
    where
        S::Error: From<LoraError>,
    {
        if self.lora.is_some() {
            return Err(LoraError::AlreadyAttached.into());
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            return Err(LoraError::BadDropout(cfg.dropout).into());
        }
        let mut seen = BTreeSet::new();
        for s in sites {
            if s.rank == 0 {
                return Err(LoraError::ZeroRank(s.param.clone()).into());
            }
            if !seen.insert(s.param.as_str()) {
                return Err(LoraError::DuplicateSite(s.param.clone()).into());
            }
            if cfg.dropout > 0.0 && is_parameter_site(&s.param) {
                return Err(LoraError::DropoutOnParameters(cfg.dropout).into());
            }
        }
        let (device, shard) = (self.device(), self.shard());
        let expert_b = expert_b_ranks(sites);
        let mut peft = PeftShapes {
            inner: src,
            expert_b: &expert_b,
        };
        let mut src = ShardedSource {
            inner: &mut peft,
            shard,
        };
        let mut adapters = Vec::with_capacity(sites.len());
        for s in sites {
            let local = self
                .lora_slot(&s.param)
                .ok_or_else(|| LoraError::UnknownSite(s.param.clone()))?
                .dims;
            let dims = full_shape(&local, &shard.plan(&s.param).placement);
            // [out, in] for a linear or the router, [E, out, in] for stacked experts.
            let (experts, out, inp) = match dims[..] {
                [e, o, i] => (e, o, i),
                [o, i] => (1, o, i),
                _ => unreachable!("LoRA sites are matrices or expert stacks"),
            };
            let (a_name, b_name) = adapter_names(&s.param, sites);
            let a = src.tensor(&a_name, [s.rank * experts, inp], &device)?;
            let b = match local.len() {
                3 => src.tensor(&b_name, [out * s.rank, experts], &device)?,
                _ => src.tensor(&b_name, [out, s.rank], &device)?,
            };
            let input_part = match shard.plan(&a_name).placement {
                Placement::Split(p) if !shard.plan(&a_name).expert => Some(p),
                _ => None,
            };
            adapters.push(LoraAdapter {
                site: s.param.clone(),
                a_name,
                b_name,
                a,
                b,
                rank: s.rank,
                alpha: s.alpha,
                scale: scaling(s.alpha, s.rank, cfg.use_rslora),
                experts: if local.len() == 3 { local[0] } else { 1 },
                dropout: cfg.dropout,
                input_part,
            });
        }
        for adapter in adapters {
            let slot = self.lora_slot(&adapter.site).expect("slot was found above");
            *slot.adapter = Some(adapter);
        }
        self.visit_params(&mut SetRequireGrad(false));
        self.lora = Some(cfg.clone());
        Ok(())
    }

    /// The LoRA settings, once adapters are attached.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Every adapter, in visiting order (layer by layer; q, k, v, o; router, gate_up, down).
    pub fn lora_adapters(&mut self) -> Vec<&mut LoraAdapter> {
        self.layers.iter_mut().flat_map(|l| l.loras_mut()).collect()
    }

    /// The sites with their ranks and alphas.
    pub fn lora_sites(&mut self) -> Vec<LoraSite> {
        self.lora_adapters()
            .into_iter()
            .map(|l| LoraSite {
                param: l.site.clone(),
                rank: l.rank,
                alpha: l.alpha,
            })
            .collect()
    }

    /// The parameters an optimizer updates: the adapters' A and B when LoRA is attached
    /// (named as in PEFT's file minus `base_model.model.`), every parameter otherwise.
    pub fn trainable(&mut self) -> Trainable<'_> {
        Trainable(self)
    }

    /// Base parameters, then adapters: for moving or stripping a whole model (e.g. an
    /// inference copy without autodiff).
    pub fn all_params(&mut self) -> AllParams<'_> {
        AllParams(self)
    }

    /// Folds every adapter into its base weight (W ← W + s·B·A, experts one by one) and drops
    /// the adapters: the plain model that `export_hf` writes. On an autodiff device the merged
    /// parameters are trainable again, like a freshly loaded model's.
    pub fn merge_lora(&mut self) {
        for layer in &mut self.layers {
            layer.merge_lora();
        }
        if self.lora.take().is_some() && self.device().is_autodiff() {
            self.visit_params(&mut SetRequireGrad(true));
        }
    }

    /// A copy that backward never reaches: every parameter, adapters included, detached
    /// and not requiring gradients (a DPO / GRPO reference). Shares storage until `self`'s
    /// parameters are replaced by an update.
    pub fn frozen(&self) -> Qwen3Model {
        let mut copy = self.clone();
        copy.all_params().visit_params(&mut SetRequireGrad(false));
        copy
    }

    /// A merged copy (see [`Qwen3Model::merge_lora`]); `self` keeps its adapters.
    pub fn merged(&self) -> Qwen3Model {
        let mut copy = self.clone();
        copy.merge_lora();
        copy
    }

    fn lora_slot(&mut self, param: &str) -> Option<LoraSlot<'_>> {
        let rest = param.strip_prefix("model.layers.")?;
        let (index, _) = rest.split_once('.')?;
        let at = self
            .layer_ids
            .binary_search(&index.parse::<usize>().ok()?)
            .ok()?;
        let layer = self.layers.get_mut(at)?;
        layer.lora_slot(param)
    }
}

/// Asks the source for the experts' B in PEFT's shape `[out, r·E]` and hands it on as held,
/// `[out·r, E]` (the same elements in the same order; see `lora.rs`).
struct PeftShapes<'a, S> {
    inner: &'a mut S,
    /// B tensor name → rank.
    expert_b: &'a BTreeMap<String, usize>,
}

impl<S: ParamSource> ParamSource for PeftShapes<'_, S> {
    type Error = S::Error;

    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, S::Error> {
        let Some(&rank) = self.expert_b.get(name) else {
            return self.inner.tensor(name, shape, device);
        };
        let mut peft = shape;
        (peft[0], peft[1]) = (shape[0] / rank, shape[1] * rank);
        let t = self.inner.tensor(name, peft, device)?;
        // A new leaf: a reshaped tracked tensor would send its gradient to the one read.
        Ok(param_from_data(t.reshape(shape).into_data(), device))
    }
}

/// Freezes (false) or unfreezes (true, autodiff devices only) every visited parameter.
struct SetRequireGrad(bool);

impl ParamVisitor for SetRequireGrad {
    fn visit<const D: usize>(&mut self, _: &str, param: &mut Tensor<D>) {
        *param = param.clone().detach().set_require_grad(self.0);
    }
}

/// See [`Qwen3Model::trainable`].
pub struct Trainable<'a>(&'a mut Qwen3Model);

impl Params for Trainable<'_> {
    fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        if self.0.lora.is_some() {
            visit_adapters(self.0, v);
        } else {
            self.0.visit_params(v);
        }
    }
}

/// See [`Qwen3Model::all_params`].
pub struct AllParams<'a>(&'a mut Qwen3Model);

impl Params for AllParams<'_> {
    fn visit_params<V: ParamVisitor>(&mut self, v: &mut V) {
        self.0.visit_params(v);
        visit_adapters(self.0, v);
    }
}

fn visit_adapters<V: ParamVisitor>(model: &mut Qwen3Model, v: &mut V) {
    for l in model.lora_adapters() {
        v.visit(&l.a_name, &mut l.a);
        v.visit(&l.b_name, &mut l.b);
    }
}
