//! Targets over single configuration and weight files: the recipe (and `--set`),
//! config.json, safetensors, the sharded-weights index and adapter_config.json.

use std::path::{Path, PathBuf};

use moeru_checkpoints::{HfFolder, PeftAdapterConfig, TensorFile, INDEX_FILE};
use moeru_models::Qwen3Config;

use super::{copy_dir, put, repo_file, target_of};
use crate::mutate::{pack, unpack};
use crate::runner::Target;

const RECIPES: &[&str] = &[
    "recipes/smoke-tiny-moe.yaml",
    "recipes/smoke-lora-sft.yaml",
    "recipes/smoke-dpo.yaml",
    "recipes/toy-grpo.yaml",
    "recipes/toy-rl-sft.yaml",
    "recipes/qwen3-0.6b-grpo.yaml",
    "recipes/qwen3-0.6b-lora-sft.yaml",
    "recipes/qwen3-30b-a3b-sft.yaml",
    "recipes/qwen3-30b-a3b-sft-8gpu.yaml",
    "trainer/tests/recipes/dpo.yaml",
    "trainer/tests/recipes/grpo.yaml",
    "trainer/tests/recipes/lora-sft.yaml",
    "trainer/tests/recipes/tiny-moe.yaml",
];
const OVERRIDES: &[&str] = &[
    "train.steps=5",
    "optim.lr=1e-3",
    "data.seq_len=64",
    "optim.betas=[0.9, 0.99]",
    "model.architecture.num_experts=8",
    "checkpoint.every=0",
];

/// `recipe`: the YAML text and then one `--set` argument per line, through
/// `moeru_trainer::recipe::load_str` (or `load` from a file when the text is not UTF-8).
pub fn recipe() -> Target {
    let seeds = RECIPES
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sets = [
                OVERRIDES[i % OVERRIDES.len()],
                OVERRIDES[(i + 2) % OVERRIDES.len()],
            ];
            pack(&[&repo_file(p), sets.join("\n").as_bytes()])
        })
        .collect();
    target_of("recipe", seeds, true, Box::new(run_recipe))
}

fn run_recipe(input: &[u8], scratch: &Path) -> Result<(), String> {
    let parts = unpack(input, 2);
    let sets: Vec<String> = String::from_utf8_lossy(parts[1])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let file = scratch.join("recipe.yaml");
    let loaded = match std::str::from_utf8(parts[0]) {
        Ok(text) => moeru_trainer::recipe::load_str(text, &file, &sets),
        Err(_) => {
            put(scratch, "recipe.yaml", parts[0])?;
            moeru_trainer::recipe::load(&file, &sets)
        }
    };
    let recipe = loaded.map_err(|e| e.to_string())?;
    // What a run saves next to itself must load back.
    let yaml = moeru_trainer::recipe::to_yaml(&recipe);
    moeru_trainer::recipe::load_str(&yaml, &file, &[])
        .map(|_| ())
        .map_err(|e| format!("effective recipe does not load back: {e}"))
}

const CONFIGS: &[&str] = &[
    "recipes/smoke/base/config.json",
    "recipes/toy-rl/sft/config.json",
    "tests/reference/models/qwen3-dense-kv1-bf16/config.json",
    "tests/reference/models/qwen3-dense-tied/config.json",
    "tests/reference/models/qwen3-moe-mixed/config.json",
    "tests/reference/models/qwen3-moe-norm-sharded/config.json",
    "tests/reference/dpo/policy/config.json",
];

/// `config_json`: `Qwen3Config::from_dir` on a folder holding the mutated config.json.
pub fn config_json() -> Target {
    let seeds = CONFIGS.iter().map(|p| repo_file(p)).collect();
    target_of("config_json", seeds, true, Box::new(run_config))
}

fn run_config(input: &[u8], scratch: &Path) -> Result<(), String> {
    put(scratch, "config.json", input)?;
    let cfg = Qwen3Config::from_dir(scratch).map_err(|e| e.to_string())?;
    for layer in 0..cfg.num_hidden_layers.min(4096) {
        let _ = cfg.is_moe_layer(layer);
    }
    let back = serde_json::Value::Object(cfg.to_export_json()).to_string();
    put(scratch, "config.json", back.as_bytes())?;
    Qwen3Config::from_dir(scratch)
        .map(|_| ())
        .map_err(|e| format!("exported config does not load back: {e}"))
}

const TENSOR_FILES: &[&str] = &[
    "tests/reference/lora/dense-kv1-patterns/adapter_model.safetensors",
    "tests/reference/lora/moeru-written/moeru-dense-tied/moeru.safetensors",
    "tests/reference/training/adamw-20-steps.safetensors",
    "tests/reference/models/qwen3-moe-norm-sharded/model-00004-of-00004.safetensors",
];

/// `safetensors`: `TensorFile::open`, then every tensor's shape, dtype and values.
pub fn safetensors() -> Target {
    let seeds = TENSOR_FILES.iter().map(|p| repo_file(p)).collect();
    let mut t = target_of("safetensors", seeds, false, Box::new(run_safetensors));
    t.max_len = 64 << 10;
    t
}

fn run_safetensors(input: &[u8], scratch: &Path) -> Result<(), String> {
    put(scratch, "t.safetensors", input)?;
    read_all(&scratch.join("t.safetensors"))
}

fn read_all(path: &Path) -> Result<(), String> {
    let file = TensorFile::open(path).map_err(|e| e.to_string())?;
    let _ = file.metadata();
    for (name, shape) in file.shapes() {
        let dtype = file.dtype(&name).map_err(|e| e.to_string())?;
        let read = match dtype.as_str() {
            "I64" | "I32" => file.i64(&name).map(|(_, s)| s),
            _ => file.f32(&name).map(|(_, s)| s),
        };
        if read.map_err(|e| e.to_string())? != shape {
            return Err(format!("{name}: shape changed between header and read"));
        }
        if !shape.is_empty() {
            file.f32_rows(&name, 0..shape[0].min(1))
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

const SHARDED: &str = "tests/reference/models/qwen3-moe-norm-sharded";

/// `safetensors_index`: the committed 4-shard model folder with its
/// model.safetensors.index.json mutated, opened with `HfFolder::open` and every tensor read.
pub fn safetensors_index() -> Target {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_dir(SHARDED, dir.path());
    let folder: PathBuf = dir.path().to_path_buf();
    let seeds = vec![repo_file(&format!("{SHARDED}/{INDEX_FILE}"))];
    let run = move |input: &[u8], _scratch: &Path| -> Result<(), String> {
        put(&folder, INDEX_FILE, input)?;
        let mut hf = HfFolder::open(&folder).map_err(|e| e.to_string())?;
        let names: Vec<String> = hf.names().map(str::to_string).collect();
        for name in names {
            // The shape as stored, so the read itself is what is exercised.
            let shape = stored_shape(&folder, &name);
            hf.read(&name, &shape).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    let mut t = target_of("safetensors_index", seeds, true, Box::new(run));
    t._keep.push(Box::new(dir));
    t
}

/// The shape of tensor `name` in whichever shard of `dir` holds it (empty if none).
fn stored_shape(dir: &Path, name: &str) -> Vec<usize> {
    (1..=4)
        .filter_map(|i| {
            TensorFile::open(&dir.join(format!("model-0000{i}-of-00004.safetensors"))).ok()
        })
        .flat_map(|f| f.shapes())
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
        .unwrap_or_default()
}

const ADAPTERS: &[&str] = &[
    "tests/reference/lora/dense-kv1-patterns",
    "tests/reference/lora/dense-tied-rslora",
    "tests/reference/lora/moe-mixed-experts-router",
    "tests/reference/lora/moe-sharded-down",
    "tests/reference/lora/moeru-written/moeru-dense-tied",
    "tests/reference/lora/moeru-written/moeru-moe-mixed",
    "tests/reference/lora/smoke-base-peft",
];
const SITES: &[&str] = &[
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.mlp.experts.gate_up_proj",
    "model.layers.0.mlp.down_proj",
    "lm_head",
];

/// `adapter_config`: `PeftAdapterConfig::read`, then the rank, alpha and targeting of a few
/// sites against the smoke base model's config.
pub fn adapter_config() -> Target {
    let seeds = ADAPTERS
        .iter()
        .map(|d| repo_file(&format!("{d}/adapter_config.json")))
        .collect();
    let model = Qwen3Config::from_dir(&super::workspace_root().join("recipes/smoke/base"))
        .expect("smoke base config");
    let run = move |input: &[u8], scratch: &Path| -> Result<(), String> {
        put(scratch, "adapter_config.json", input)?;
        let cfg = PeftAdapterConfig::read(scratch).map_err(|e| e.to_string())?;
        let _ = cfg.lora_config();
        for site in SITES {
            cfg.rank_for(site).map_err(|e| e.to_string())?;
            cfg.alpha_for(site).map_err(|e| e.to_string())?;
            let _ = cfg.targets_module(site, &model);
            let _ = cfg.targets_parameter(site, &model);
        }
        Ok(())
    };
    target_of("adapter_config", seeds, true, Box::new(run))
}
