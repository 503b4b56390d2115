//! LoRA adapters in PEFT's layout: `adapter_model.safetensors` (tensor names
//! `base_model.model.<moeru adapter name>`) and `adapter_config.json`; and the merged export.
//!
//! Which site a tensor belongs to follows peft 0.21 with transformers 5: linears and the router
//! by module path; the fused experts through `ParamWrapper`s nested on `mlp.experts`, where
//! `experts.base_layer.lora_*` is gate_up_proj's (inner) and `experts.lora_*` down_proj's —
//! or, when only one of the two is adapted, that one's.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use moeru_models::lora::{expert_b_ranks, is_parameter_site, peft_b_shape, peft_module};
use moeru_models::params::{param_from_data, ParamSource};
use moeru_models::{LoraConfig, LoraSite, Qwen3Config, Qwen3Model};
use serde_json::{Map, Value};

use crate::error::CheckpointError;
use crate::hf_export::{export_hf, named_tensors};
use crate::peft_config::{
    config_json, peft_key, PeftAdapterConfig, PeftError, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
    PEFT_PREFIX,
};
use crate::tensor_file::{write_tensors, OwnedTensor, TensorFile};

/// Loads the PEFT LoRA adapter in `dir` onto `model` (which must have none yet): the base is
/// frozen and the adapter's A/B become the trainable parameters. Returns the adapter's config.
pub fn load_peft_adapter(
    dir: &Path,
    model: &mut Qwen3Model,
) -> Result<PeftAdapterConfig, PeftError> {
    let cfg = PeftAdapterConfig::read(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.exists() {
        let hint = if dir.join("adapter_model.bin").exists() {
            " (only adapter_model.bin, a pickle, which moeru never reads: save it again with \
             save_pretrained(..., safe_serialization=True))"
        } else {
            ""
        };
        return Err(PeftError::NoWeights {
            dir: dir.into(),
            hint: hint.into(),
        });
    }
    let file = TensorFile::open(&path)?;
    let sites = file_sites(&file, &cfg, &model.config)?;
    check_targets(&cfg, &file, &sites, &model.config)?;
    let mut src = AdapterFile { file: &file };
    model
        .attach_lora_sites(&cfg.lora_config(), &sites, &mut src)
        .map_err(|e| match e {
            PeftError::Lora(source) => PeftError::InAdapter { file: path, source },
            other => other,
        })?;
    Ok(cfg)
}

/// The two files of a PEFT adapter as peft's `save_pretrained` writes them: the tensors of
/// `adapter_model.safetensors` and the JSON of `adapter_config.json`.
pub fn peft_adapter_files(
    model: &mut Qwen3Model,
    base_model_name_or_path: &str,
) -> Result<(Vec<(String, OwnedTensor)>, Value), PeftError> {
    let held = named_tensors(&mut model.trainable());
    peft_adapter_files_of(model, base_model_name_or_path, held)
}

/// [`peft_adapter_files`] of the whole adapter tensors `held` (moeru names and in-memory
/// shapes, e.g. gathered from the ranks of a sharded run) of `model`'s sites.
pub fn peft_adapter_files_of(
    model: &mut Qwen3Model,
    base_model_name_or_path: &str,
    held: Vec<(String, OwnedTensor)>,
) -> Result<(Vec<(String, OwnedTensor)>, Value), PeftError> {
    let cfg = model.lora_config().cloned().ok_or_else(|| {
        PeftError::Unrepresentable("the model has no LoRA adapters attached".into())
    })?;
    let sites = model.lora_sites();
    let mc = model.config.clone();
    if mc.moe.is_some() {
        if let Some(s) = sites
            .iter()
            .find(|s| s.param.contains(".mlp.") && !is_parameter_site(&s.param))
        {
            return Err(PeftError::Unrepresentable(format!(
                "`{}`: peft with transformers 5 cannot adapt the dense MLP of a MoE model (it moves gate_proj/up_proj/down_proj to the experts)",
                s.param
            )));
        }
    }
    let (modules, params) = targets(&sites, &mc);
    let rank_pattern = patterns(&sites, |s| s.rank as f64, cfg.rank as f64, true);
    let alpha_pattern = patterns(&sites, |s| s.alpha, cfg.alpha, false);
    let json = config_json(
        &cfg,
        modules,
        params,
        rank_pattern,
        alpha_pattern,
        base_model_name_or_path,
    );
    let expert_b = expert_b_ranks(&sites);
    let tensors: Vec<_> = held
        .into_iter()
        .map(|(name, mut t)| {
            if let Some(&rank) = expert_b.get(&name) {
                t.shape = peft_b_shape(&t.shape, rank);
            }
            (format!("{PEFT_PREFIX}{name}"), t)
        })
        .collect();
    Ok((tensors, json))
}

/// Writes the model's adapters into `dir` (created if needed; the two files are replaced
/// atomically) as peft's `save_pretrained` would, so `PeftModel.from_pretrained` loads them.
pub fn save_peft_adapter(
    dir: &Path,
    model: &mut Qwen3Model,
    base_model_name_or_path: &str,
) -> Result<(), PeftError> {
    let (tensors, json) = peft_adapter_files(model, base_model_name_or_path)?;
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::io(dir, e))?;
    let tmp = |f: &str| dir.join(format!(".{f}.tmp-{}", std::process::id()));
    write_tensors(&tmp(ADAPTER_WEIGHTS), &tensors)?;
    let text = serde_json::to_string_pretty(&json).expect("JSON values serialise") + "\n";
    std::fs::write(tmp(ADAPTER_CONFIG), text)
        .map_err(|e| CheckpointError::io(tmp(ADAPTER_CONFIG), e))?;
    for f in [ADAPTER_WEIGHTS, ADAPTER_CONFIG] {
        std::fs::rename(tmp(f), dir.join(f)).map_err(|e| CheckpointError::io(dir.join(f), e))?;
    }
    Ok(())
}

/// Exports the model with every adapter folded into its weight (W ← W + s·B·A, experts one
/// by one) as a plain Hugging Face folder; `model` keeps its adapters.
pub fn export_merged_hf(
    model: &Qwen3Model,
    out: &Path,
    max_shard_bytes: u64,
    side_files_from: Option<&Path>,
) -> Result<(), CheckpointError> {
    export_hf(&mut model.merged(), out, max_shard_bytes, side_files_from)
}

/// The sites of a PEFT file, with ranks from the tensors (checked against the config) and
/// alphas from the config.
fn file_sites(
    file: &TensorFile,
    cfg: &PeftAdapterConfig,
    mc: &Qwen3Config,
) -> Result<Vec<LoraSite>, PeftError> {
    let path = &file.path;
    let unknown = |name: &str, shape: &[usize], why: &str| PeftError::UnknownTensor {
        file: path.clone(),
        name: name.into(),
        shape: shape.to_vec(),
        why: why.into(),
    };
    // PEFT module path → shapes of its lora_A and lora_B.
    let mut modules: BTreeMap<String, [Option<Vec<usize>>; 2]> = BTreeMap::new();
    for (name, shape) in file.shapes() {
        let Some(rest) = name.strip_prefix(PEFT_PREFIX) else {
            return Err(unknown(
                &name,
                &shape,
                "tensor names in a PEFT adapter start with `base_model.model.`",
            ));
        };
        let (module, which) = match (
            rest.strip_suffix(".lora_A.weight"),
            rest.strip_suffix(".lora_B.weight"),
        ) {
            (Some(m), _) => (m, 0),
            (_, Some(m)) => (m, 1),
            _ => {
                return Err(unknown(
                    &name,
                    &shape,
                    "moeru loads LoRA A/B matrices only (`….lora_A.weight`, `….lora_B.weight`)",
                ))
            }
        };
        if shape.len() != 2 {
            return Err(unknown(&name, &shape, "LoRA A/B matrices are 2-D"));
        }
        if is_per_expert(module) {
            return Err(unknown(&name, &shape, "this is a transformers-4 per-expert adapter; moeru reads the fused layout that peft writes with transformers 5 (load it there with PeftModel.from_pretrained and save_pretrained it again)"));
        }
        modules.entry(module.to_string()).or_default()[which] = Some(shape);
    }
    let mut sites = Vec::new();
    let mut site_module = Vec::new();
    for (module, [a, b]) in &modules {
        let missing = |which: &str, other: &str| PeftError::MissingTensor {
            file: path.clone(),
            name: format!("{PEFT_PREFIX}{module}.{which}.weight"),
            why: format!("its {other} is there"),
        };
        let a = a.as_ref().ok_or_else(|| missing("lora_A", "lora_B"))?;
        b.as_ref().ok_or_else(|| missing("lora_B", "lora_A"))?;
        let site = site_of(module, a, &modules, cfg, mc)
            .map_err(|why| unknown(&format!("{PEFT_PREFIX}{module}.lora_A.weight"), a, &why))?;
        let experts = match (&mc.moe, site.contains(".experts.")) {
            (Some(m), true) => m.num_experts,
            _ => 1,
        };
        let name = format!("{PEFT_PREFIX}{module}.lora_A.weight");
        if a[0] % experts != 0 {
            return Err(unknown(
                &name,
                a,
                &format!("rows must be rank × {experts} experts"),
            ));
        }
        let rank = a[0] / experts;
        let key = peft_key(&site);
        let (expected, rule) = cfg.rank_for(&key)?;
        if rank != expected {
            return Err(PeftError::RankMismatch {
                file: path.clone(),
                name,
                detail: format!(
                    "{a:?} is a rank-{rank} adapter, but {} gives `{key}` rank {expected} ({rule})",
                    cfg.file.display()
                ),
            });
        }
        let alpha = cfg.alpha_for(&key)?;
        site_module.push((site.clone(), module.clone()));
        sites.push(LoraSite {
            param: site,
            rank,
            alpha,
        });
    }
    // peft nests gate_up_proj's wrapper inside down_proj's only when both exist.
    for (site, module) in &site_module {
        let expected = peft_module(site, &sites);
        if expected != *module {
            return Err(PeftError::MissingTensor {
                file: path.clone(),
                name: format!("{PEFT_PREFIX}{expected}.lora_A.weight"),
                why: format!(
                    "`{module}` holds {site}'s adapter only when peft nests it inside down_proj's"
                ),
            });
        }
    }
    Ok(sites)
}

/// The base parameter a PEFT module path adapts.
fn site_of(
    module: &str,
    a: &[usize],
    modules: &BTreeMap<String, [Option<Vec<usize>>; 2]>,
    cfg: &PeftAdapterConfig,
    mc: &Qwen3Config,
) -> Result<String, String> {
    if let Some(p) = module.strip_suffix(".experts.base_layer") {
        return Ok(format!("{p}.experts.gate_up_proj"));
    }
    let Some(p) = module.strip_suffix(".experts") else {
        return Ok(format!("{module}.weight"));
    };
    let (gate_up, down) = (
        format!("{p}.experts.gate_up_proj"),
        format!("{p}.experts.down_proj"),
    );
    if modules.contains_key(&format!("{p}.experts.base_layer")) {
        return Ok(down);
    }
    match (
        cfg.targets_parameter(&gate_up, mc),
        cfg.targets_parameter(&down, mc),
    ) {
        (Some(true), Some(false)) => return Ok(gate_up),
        (Some(false), Some(true)) => return Ok(down),
        _ => {}
    }
    // The config does not say: the input width tells, unless hidden = moe_intermediate.
    let (h, i) = (
        mc.hidden_size,
        mc.moe.as_ref().map_or(0, |m| m.moe_intermediate_size),
    );
    match a[1] {
        w if w == h && w != i => Ok(gate_up),
        w if w == i && w != h => Ok(down),
        _ => Err("cannot tell whether it adapts the experts' gate_up_proj or down_proj; adapter_config.json's target_parameters should name exactly one".into()),
    }
}

/// `….experts.<n>.…`: transformers 4 kept one module per expert.
fn is_per_expert(module: &str) -> bool {
    module
        .split_once(".experts.")
        .and_then(|(_, rest)| rest.split('.').next())
        .is_some_and(|n| n.parse::<usize>().is_ok())
}

/// Every site the config targets must be in the file, and the file may hold no site the
/// config does not target (peft would drop it, so the outputs would differ).
fn check_targets(
    cfg: &PeftAdapterConfig,
    file: &TensorFile,
    sites: &[LoraSite],
    mc: &Qwen3Config,
) -> Result<(), PeftError> {
    for candidate in candidates(mc) {
        let key = peft_key(&candidate);
        let targeted = if is_parameter_site(&candidate) {
            cfg.targets_parameter(&key, mc)
        } else {
            cfg.targets_module(&key, mc)
        };
        let present = sites.iter().any(|s| s.param == candidate);
        match (targeted, present) {
            (Some(true), false) => {
                return Err(PeftError::MissingTensor {
                    file: file.path.clone(),
                    name: format!(
                        "{PEFT_PREFIX}{}.lora_A.weight",
                        peft_module(&candidate, sites)
                    ),
                    why: format!("{} targets `{key}`", cfg.file.display()),
                })
            }
            (Some(false), true) => {
                return Err(PeftError::Untargeted {
                    file: file.path.clone(),
                    name: format!(
                        "{PEFT_PREFIX}{}.lora_A.weight",
                        peft_module(&candidate, sites)
                    ),
                    key,
                    config: cfg.file.clone(),
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every weight of the model that can carry an adapter, as a site name.
fn candidates(mc: &Qwen3Config) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..mc.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for t in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            out.push(format!("{p}.self_attn.{t}.weight"));
        }
        if mc.is_moe_layer(i) {
            out.push(format!("{p}.mlp.gate.weight"));
            out.push(format!("{p}.mlp.experts.gate_up_proj"));
            out.push(format!("{p}.mlp.experts.down_proj"));
        } else {
            for t in ["gate_proj", "up_proj", "down_proj"] {
                out.push(format!("{p}.mlp.{t}.weight"));
            }
        }
    }
    out
}

/// The target a site is written under when every candidate of its kind is adapted: the leaf
/// module name for linears, peft's suffix form for parameters.
fn kind(site: &str) -> String {
    let key = peft_key(site);
    if is_parameter_site(site) {
        key.splitn(4, '.').nth(3).unwrap_or(&key).to_string() // drop `model.layers.N.`
    } else {
        key.rsplit('.').next().unwrap_or(&key).to_string()
    }
}

/// `target_modules` and `target_parameters` that make peft create exactly these sites.
fn targets(sites: &[LoraSite], mc: &Qwen3Config) -> (Vec<String>, Vec<String>) {
    let all = candidates(mc);
    let (mut modules, mut params) = (Vec::new(), Vec::new());
    let mut kinds: Vec<String> = sites.iter().map(|s| kind(&s.param)).collect();
    kinds.sort();
    kinds.dedup();
    for k in kinds {
        let of_kind: Vec<&String> = all.iter().filter(|c| kind(c) == k).collect();
        let adapted: Vec<&LoraSite> = sites.iter().filter(|s| kind(&s.param) == k).collect();
        let names = if adapted.len() == of_kind.len() {
            vec![k.clone()]
        } else {
            adapted.iter().map(|s| peft_key(&s.param)).collect()
        };
        if is_parameter_site(&adapted[0].param) {
            params.extend(names);
        } else {
            modules.extend(names);
        }
    }
    (modules, params)
}

/// `rank_pattern` / `alpha_pattern`: a kind-wide pattern when all its sites agree, else one
/// per site that differs from the global value.
fn patterns(
    sites: &[LoraSite],
    value: impl Fn(&LoraSite) -> f64,
    global: f64,
    integer: bool,
) -> Map<String, Value> {
    let json = |v: f64| -> Value {
        if integer {
            (v as u64).into()
        } else {
            v.into()
        }
    };
    let mut out = Map::new();
    let mut by_kind: BTreeMap<String, Vec<&LoraSite>> = BTreeMap::new();
    for s in sites {
        by_kind.entry(kind(&s.param)).or_default().push(s);
    }
    for (k, group) in by_kind {
        let first = value(group[0]);
        if group.iter().all(|s| value(s) == first) {
            if first != global {
                out.insert(regex::escape(&k), json(first));
            }
        } else {
            for s in group.iter().filter(|s| value(s) != global) {
                out.insert(regex::escape(&peft_key(&s.param)), json(value(s)));
            }
        }
    }
    out
}

/// A [`ParamSource`] over an adapter file: moeru names plus PEFT's prefix, shapes checked.
struct AdapterFile<'a> {
    file: &'a TensorFile,
}

impl ParamSource for AdapterFile<'_> {
    type Error = PeftError;

    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, PeftError> {
        let full = format!("{PEFT_PREFIX}{name}");
        let (values, found) = self.file.f32(&full)?;
        if found != shape {
            return Err(PeftError::Shape {
                file: self.file.path.clone(),
                name: full,
                found,
                expected: shape.to_vec(),
            });
        }
        Ok(param_from_data(TensorData::new(values, shape), device))
    }
}

/// The moeru `LoraConfig` an adapter folder describes (no weights read).
pub fn read_peft_lora_config(dir: &Path) -> Result<LoraConfig, PeftError> {
    Ok(PeftAdapterConfig::read(dir)?.lora_config())
}
