//! Recipe loading: defaults, `--set`, one-line errors with positions and suggestions, validation,
//! the recipe hash, and the key table staying in step with the schema.

use std::path::Path;

use moeru_trainer::recipe::keys::{self, Kind};
use moeru_trainer::recipe::{self, load_str, Precision, Recipe, RecipeError, ScheduleKind};

const MINIMAL: &str = "\
model:
  architecture: {model_type: qwen3, hidden_size: 8}
data:
  train: data/train
  seq_len: 16
train:
  steps: 10
  micro_batch_size: 2
checkpoint:
  dir: ckpt
logging:
  dir: logs
";

fn file() -> &'static Path {
    Path::new("r.yaml")
}

fn ok(text: &str, sets: &[&str]) -> Recipe {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    match load_str(text, file(), &sets) {
        Ok(r) => r,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn err(text: &str, sets: &[&str]) -> String {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let e = load_str(text, file(), &sets).expect_err("expected an error");
    assert_eq!(e.exit_code(), 2);
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "not one line: {msg}");
    msg
}

/// MINIMAL with `line` (e.g. "  steps: 10") replaced.
fn with(line: &str, by: &str) -> String {
    assert!(MINIMAL.contains(line), "{line}");
    MINIMAL.replacen(line, by, 1)
}

#[test]
fn minimal_recipe_gets_defaults() {
    let r = ok(MINIMAL, &[]);
    assert_eq!(r.model.architecture.as_ref().unwrap()["hidden_size"], 8);
    assert_eq!(r.model.path, None);
    assert_eq!(r.data.train, Path::new("data/train"));
    assert_eq!(
        (r.data.seq_len, r.data.shuffle, r.data.pad),
        (16, true, false)
    );
    assert_eq!(r.optim.lr, 3e-4);
    assert_eq!(r.optim.betas, [0.9, 0.95]);
    assert_eq!((r.optim.eps, r.optim.grad_clip), (1e-8, 1.0));
    assert_eq!(r.schedule.kind, ScheduleKind::Cosine);
    assert_eq!((r.train.grad_accum, r.train.eval_every), (1, 0));
    assert!(r.checkpoint.resume && r.logging.progress && r.logging.tensorboard);
    assert_eq!(
        (r.parallel.dp, r.parallel.tp, r.parallel.ep, r.parallel.pp),
        (0, 1, 1, 1)
    );
    assert_eq!(
        (
            r.parallel.zero_stage,
            r.parallel.bucket_mb,
            r.parallel.timeout_s
        ),
        (0, 25.0, 600.0)
    );
    assert_eq!((r.moe.aux_loss_coef, r.moe.z_loss_coef), (None, 0.0));
    assert_eq!(r.precision, Precision::F32);
}

#[test]
fn empty_section_means_defaults() {
    let r = ok(&format!("{MINIMAL}optim:\nmoe: {{}}\n"), &[]);
    assert_eq!(r.optim.lr, 3e-4);
}

#[test]
fn docs_example_recipe_loads() {
    let docs = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/RECIPES.md"));
    let start = docs
        .find("```yaml\n")
        .expect("docs/RECIPES.md has a yaml example")
        + 8;
    let len = docs[start..].find("```").expect("closed yaml block");
    let r = ok(&docs[start..start + len], &[]);
    let arch = r.model.architecture.expect("example trains from scratch");
    assert_eq!(arch["model_type"], "qwen3_moe");
    for k in [
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "mlp_only_layers",
    ] {
        assert!(arch.contains_key(k), "{k}");
    }
}

#[test]
fn unknown_key_in_file_has_position_and_suggestion() {
    let msg = err(&with("  steps: 10", "  stesp: 10"), &[]);
    assert_eq!(
        msg,
        "r.yaml:7:3: unknown key `train.stesp`; did you mean `train.steps`?"
    );
    let msg = err(&format!("{MINIMAL}optimm:\n  lr: 1\n"), &[]);
    assert_eq!(
        msg,
        "r.yaml:13:1: unknown key `optimm`; did you mean `optim`?"
    );
    let msg = err(&with("  dir: logs", "  {dir: logs, progres: true}"), &[]);
    assert!(msg.contains("unknown key `logging.progres`; did you mean `logging.progress`?"));
    let msg = err(&format!("{MINIMAL}moe:\n  zzzzzzzzzz: 1\n"), &[]);
    assert!(
        msg.ends_with(
            "valid keys here: `moe.aux_loss_coef`, `moe.z_loss_coef`, `moe.capacity_factor`, `moe.router_replay`"
        ),
        "{msg}"
    );
}

#[test]
fn wrong_type_in_file_names_key_expected_and_found() {
    let cases = [
        ("  steps: 10", "  steps: abc", "r.yaml:7:10: `train.steps`: expected a non-negative integer, found \"abc\""),
        ("  steps: 10", "  steps: -3", "r.yaml:7:10: `train.steps`: expected a non-negative integer, found -3"),
        ("  steps: 10", "  steps: 1.5", "`train.steps`: expected a non-negative integer, found 1.5"),
        ("  steps: 10", "  steps: \"10\"", "`train.steps`: expected a non-negative integer, found \"10\""),
        ("  seq_len: 16", "  seq_len: 16\n  pad: 3", "r.yaml:6:8: `data.pad`: expected a boolean (true or false), found 3"),
        ("  seq_len: 16", "  seq_len: 16\n  task: pretrian", "`data.task`: expected one of `pretrain`, `sft`, `dpo`, `grpo`, found \"pretrian\"; did you mean `pretrain`?"),
        ("  dir: ckpt", "  dir: [a, b]", "r.yaml:10:8: `checkpoint.dir`: expected a path (a string), found a list of 2 item(s)"),
        ("train:\n", "train: 5\nx:\n", "r.yaml:6:8: `train`: expected a mapping of keys, found 5"),
    ];
    for (from, to, want) in cases {
        let msg = err(&with(from, to), &[]);
        assert!(msg.ends_with(want), "got:  {msg}\nwant: {want}");
    }
    let msg = err(&format!("{MINIMAL}optim:\n  betas: [0.9]\n"), &[]);
    assert_eq!(msg, "r.yaml:14:10: `optim.betas`: expected a list of two numbers, e.g. [0.9, 0.95], found a list of 1 item(s)");
    let msg = err(&format!("{MINIMAL}optim:\n  betas: [0.9, x]\n"), &[]);
    assert_eq!(msg, "r.yaml:14:16: `optim.betas`: expected a list of two numbers, e.g. [0.9, 0.95], found \"x\"");
    let msg = err(&format!("{MINIMAL}precision: fp16\n"), &[]);
    assert_eq!(msg, "r.yaml:13:12: `precision`: expected one of `f32`, `bf16`, found \"fp16\"; did you mean `bf16`?");
}

#[test]
fn device_key() {
    assert_eq!(ok(MINIMAL, &[]).device, "cpu");
    assert_eq!(ok(&format!("{MINIMAL}device: cuda\n"), &[]).device, "cuda");
    let msg = err(&format!("{MINIMAL}device: tpu:0\n"), &[]);
    assert!(
        msg.contains("`device`")
            && msg.contains("`tpu:0` is not a device; use `cpu`, `cuda` or `cuda:N`"),
        "{msg}"
    );
    let msg = err(MINIMAL, &["device=cuda:x"]);
    assert!(msg.contains("`cuda:x` is not a device"), "{msg}");
    let msg = err(&format!("{MINIMAL}device: 3\n"), &[]);
    assert!(
        msg.contains("`device`: expected a string, found 3"),
        "{msg}"
    );
}

#[test]
fn missing_required_keys_and_sections() {
    let msg = err(&with("logging:\n  dir: logs\n", ""), &[]);
    assert_eq!(
        msg,
        "r.yaml: missing required key `logging` (where logs go)"
    );
    let msg = err(&with("  steps: 10\n", ""), &[]);
    assert_eq!(
        msg,
        "r.yaml:6:1: missing required key `train.steps` (the number of optimizer steps)"
    );
    let msg = err(&with("  seq_len: 16\n", ""), &[]);
    assert!(msg.contains("missing required key `data.seq_len`"), "{msg}");
}

#[test]
fn bad_yaml_empty_and_unreadable_files() {
    let msg = err(&with("  steps: 10", "  steps: [10"), &[]);
    assert!(
        msg.starts_with("r.yaml:") && msg.contains(": invalid YAML: "),
        "{msg}"
    );
    let msg = err("# nothing\n", &[]);
    assert!(
        msg.starts_with("r.yaml") && msg.ends_with("found an empty document"),
        "{msg}"
    );
    let msg = err("[1, 2]\n", &[]);
    assert_eq!(
        msg,
        "r.yaml:1:1: expected a mapping with the sections `model`, `data`, `train`, `checkpoint`, `logging` (see docs/RECIPES.md), found a list of 2 item(s)"
    );
    let msg = err(&format!("{MINIMAL}train:\n  seed: 1\n"), &[]);
    assert_eq!(
        msg,
        "r.yaml:13:1: invalid YAML: duplicate mapping key: train (each key may appear only once)"
    );

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let e = recipe::load(&missing, &[]).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("{}: cannot read recipe: ", missing.display())),
        "{msg}"
    );
}

#[test]
fn load_reads_a_file_and_reports_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.yaml");
    std::fs::write(&path, with("  steps: 10", "  stesp: 10")).unwrap();
    let msg = recipe::load(&path, &[]).unwrap_err().to_string();
    assert_eq!(
        msg,
        format!(
            "{}:7:3: unknown key `train.stesp`; did you mean `train.steps`?",
            path.display()
        )
    );
    std::fs::write(&path, MINIMAL).unwrap();
    let r = recipe::load(&path, &["train.steps=3".to_string()]).unwrap();
    assert_eq!(r.train.steps, 3);
}

#[test]
fn overrides_change_values() {
    let eval = with("  seq_len: 16", "  seq_len: 16\n  eval: data/eval");
    let r = ok(
        &eval,
        &[
            "train.steps=100",
            "optim.betas=[0.9,0.99]",
            "data.eval=null",
            "model.architecture.hidden_size=64",
            "model.architecture.rope_scaling={type: yarn, factor: 4.0}",
            "schedule.kind=linear",
            "optim.lr=1e-3",
            "moe.aux_loss_coef=0.01",
            "precision=bf16",
            "device=cuda:1",
            "logging={dir: other}",
        ],
    );
    assert_eq!(r.train.steps, 100);
    assert_eq!(r.optim.betas, [0.9, 0.99]);
    assert_eq!(r.data.eval, None);
    let arch = r.model.architecture.unwrap();
    assert_eq!(
        (arch["hidden_size"].as_u64(), arch["model_type"].as_str()),
        (Some(64), Some("qwen3"))
    );
    assert_eq!(arch["rope_scaling"]["factor"], 4.0);
    assert_eq!(r.schedule.kind, ScheduleKind::Linear);
    assert_eq!((r.optim.lr, r.moe.aux_loss_coef), (1e-3, Some(0.01)));
    assert_eq!(r.precision, Precision::Bf16);
    assert_eq!(r.device, "cuda:1");
    assert_eq!(r.logging.dir, Path::new("other"));
    assert!(
        r.logging.progress,
        "a replaced section takes defaults for keys it omits"
    );
    // Later overrides win; a path override can switch the model source.
    let r = ok(
        MINIMAL,
        &[
            "train.steps=5",
            "train.steps=6",
            "model.architecture=null",
            "model.path=hf/qwen3",
        ],
    );
    assert_eq!(
        (r.train.steps, r.model.path.unwrap()),
        (6, "hf/qwen3".into())
    );
}

#[test]
fn overrides_are_checked() {
    let cases = [
        (
            "train.steps=abc",
            "--set train.steps=abc: expected a non-negative integer, found \"abc\"",
        ),
        (
            "train.stesp=5",
            "--set train.stesp=5: unknown key `train.stesp`; did you mean `train.steps`?",
        ),
        (
            "optim.betas=0.9",
            "--set optim.betas=0.9: expected a list of two numbers, e.g. [0.9, 0.95], found 0.9",
        ),
        (
            "optim={lr: x}",
            "--set optim={lr: x}: `optim.lr`: expected a number, found \"x\"",
        ),
        (
            "optim={lrr: 1}",
            "--set optim={lrr: 1}: unknown key `optim.lrr`; did you mean `optim.lr`?",
        ),
        (
            "data.seq_len=1",
            "--set data.seq_len=1: is 1; it must be at least 2 (an input and a target token)",
        ),
        (
            "train.steps",
            "--set train.steps: expected KEY.PATH=VALUE, e.g. `--set train.steps=100`",
        ),
        (
            "data.train=null",
            "--set data.train=null: expected a path (a string), found null",
        ),
    ];
    for (set, want) in cases {
        assert_eq!(err(MINIMAL, &[set]), want);
    }
}

/// MINIMAL with `section.leaf: value` written into the file (replacing the line if present).
fn in_file(key: &str, value: &str) -> String {
    let (section, leaf) = key.split_once('.').unwrap();
    let mut lines: Vec<String> = MINIMAL.lines().map(String::from).collect();
    let new = format!("  {leaf}: {value}");
    match lines.iter().position(|l| *l == format!("{section}:")) {
        Some(s) => {
            let end = (s + 1..lines.len())
                .find(|&i| !lines[i].starts_with(' '))
                .unwrap_or(lines.len());
            match (s + 1..end).find(|&i| lines[i].starts_with(&format!("  {leaf}:"))) {
                Some(i) => lines[i] = new,
                None => lines.insert(s + 1, new),
            }
        }
        None => lines.extend([format!("{section}:"), new]),
    }
    lines.join("\n") + "\n"
}

#[test]
fn validation_names_key_value_and_fix() {
    let cases: &[(&str, &str)] = &[
        ("model.path=hf", "`model`: set exactly one of `model.path` (a Hugging Face folder) and `model.architecture` (config.json fields, to train from scratch); both are set"),
        ("model.architecture=null", "`model`: set exactly one of"),
        ("train.micro_batch_size=0", "`train.micro_batch_size`: is 0; it must be at least 1"),
        ("train.grad_accum=0", "`train.grad_accum`: is 0; it must be at least 1"),
        ("train.steps=0", "it must be at least 1"),
        ("parallel.ep=0", "`parallel.ep`: is 0; it must be at least 1"),
        ("schedule.warmup_steps=11", "`schedule.warmup_steps`: is 11 but `train.steps` is 10; set it to at most 10"),
        ("schedule.min_lr=0.1", "`schedule.min_lr`: is 0.1 but `optim.lr` is 0.0003"),
        ("optim.lr=-0.1", "`optim.lr`: is -0.1; it must be 0 or more"),
        ("optim.betas=[0.9, 1.0]", "`optim.betas`: beta2 is 1; each beta must be in [0, 1)"),
        ("optim.eps=0", "`optim.eps`: is 0; it must be greater than 0"),
        ("train.eval_every=5", "`train.eval_every`: is 5 but `data.eval` is not set; set `data.eval` to a prepared folder, or `train.eval_every` to 0"),
    ];
    for (set, want) in cases {
        // From the file: the message carries the value's position and names the key.
        let (key, value) = set.split_once('=').unwrap();
        let text = in_file(key, value);
        let msg = err(&text, &[]);
        assert!(
            msg.starts_with("r.yaml:") && msg.contains(want),
            "{set}: {msg}"
        );
        // From --set: the message names the argument.
        let msg = err(MINIMAL, &[set]);
        assert!(msg.starts_with(&format!("--set {set}: ")), "{set}: {msg}");
        let plain = want.replace(&format!("`{key}`: "), "");
        assert!(msg.contains(&plain) || msg.contains(want), "{set}: {msg}");
    }
    let eval = with("  seq_len: 16", "  seq_len: 16\n  eval: e");
    assert_eq!(ok(&eval, &["train.eval_every=5"]).train.eval_every, 5);
    let msg = err(&with("  steps: 10", "  steps: 10\n  grad_accum: 0"), &[]);
    assert_eq!(
        msg,
        "r.yaml:8:15: `train.grad_accum`: is 0; it must be at least 1 (1 = no accumulation)"
    );
    let msg = err(&with("  dir: ckpt", "  dir: ckpt\n  path: hf"), &[]);
    assert!(msg.contains("unknown key `checkpoint.path`"), "{msg}");
    let msg = err(&format!("{MINIMAL}schedule: {{warmup_steps: 11}}\n"), &[]);
    assert_eq!(msg, "r.yaml:13:26: `schedule.warmup_steps`: is 11 but `train.steps` is 10; set it to at most 10");
}

#[test]
fn hash_tracks_values_not_key_order() {
    let a = ok(MINIMAL, &[]);
    let reordered = "\
logging: {dir: logs}
checkpoint: {dir: ckpt}
train: {micro_batch_size: 2, steps: 10}
data: {seq_len: 16, train: data/train}
model:
  architecture: {hidden_size: 8, model_type: qwen3}
";
    let b = ok(reordered, &[]);
    assert_eq!(a, b);
    let h = recipe::recipe_hash(&a);
    assert_eq!(h.len(), 64);
    assert!(h.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(h, recipe::recipe_hash(&b));
    let c = ok(MINIMAL, &["optim.lr=0.001"]);
    assert_ne!(h, recipe::recipe_hash(&c));
    let d = ok(MINIMAL, &["model.architecture.hidden_size=9"]);
    assert_ne!(h, recipe::recipe_hash(&d));
    // The layout, `checkpoint.resume` and `checkpoint.async` do not change the training math.
    let e = ok(
        MINIMAL,
        &[
            "parallel.dp=4",
            "parallel.zero_stage=1",
            "checkpoint.resume=false",
            "checkpoint.async=true",
        ],
    );
    assert_eq!(h, recipe::recipe_hash(&e));
}

#[test]
fn to_yaml_round_trips() {
    let eval = with("  seq_len: 16", "  seq_len: 16\n  eval: e");
    let r = ok(
        &eval,
        &[
            "optim.lr=3e-4",
            "moe.aux_loss_coef=0.001",
            "model.architecture.mlp_only_layers=[0, 2]",
        ],
    );
    let text = recipe::to_yaml(&r);
    assert_eq!(ok(&text, &[]), r, "{text}");
}

fn full_json() -> serde_json::Value {
    let r = ok(
        &with("  seq_len: 16", "  seq_len: 16\n  eval: e"),
        &[
            "moe.aux_loss_coef=0.01",
            "model.architecture=null",
            "model.path=m",
            "lora.rank=4",
            "lora.adapter=a",
            "data.task=dpo",
            "dpo.beta=0.2",
            "dpo.loss_weights=[1.0]",
            "train.eval_on_start=true",
            "checkpoint.async=true",
        ],
    );
    // The GRPO sections, set beside DPO's (validation would refuse both) so every key shows.
    let mut r = r;
    r.grpo.beta = 0.1;
    r.generation.max_new_tokens = 8;
    r.rewards = vec![serde_json::from_value(
        serde_json::json!({"name": "f", "kind": "format", "pattern": "x"}),
    )
    .unwrap()];
    serde_json::to_value(r).unwrap()
}

fn leaf_paths(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
    if let serde_json::Value::Object(map) = v {
        for (k, v) in map {
            let path = keys::join(prefix, k);
            out.push(path.clone());
            if path != "model.architecture" {
                leaf_paths(&path, v, out);
            }
        }
    }
}

#[test]
fn key_table_matches_schema() {
    let mut from_schema = Vec::new();
    leaf_paths("", &full_json(), &mut from_schema);
    from_schema.sort();
    let mut from_table: Vec<String> = keys::KEYS.iter().map(|k| k.path.to_string()).collect();
    from_table.sort();
    assert_eq!(from_schema, from_table);
}

/// `v` with the key at `path` removed (`None`) or set.
fn edited(v: &serde_json::Value, path: &str, to: Option<serde_json::Value>) -> serde_json::Value {
    let mut v = v.clone();
    let (parent, leaf) = path.rsplit_once('.').unwrap_or(("", path));
    let pointer = if parent.is_empty() {
        String::new()
    } else {
        format!("/{}", parent.replace('.', "/"))
    };
    let obj = v
        .pointer_mut(&pointer)
        .and_then(|o| o.as_object_mut())
        .expect("parent is an object");
    match to {
        Some(x) => obj.insert(leaf.to_string(), x),
        None => obj.remove(leaf),
    };
    v
}

#[test]
fn key_table_required_and_kinds_match_schema() {
    let full = full_json();
    for k in keys::KEYS {
        let parsed = serde_json::from_value::<Recipe>(edited(&full, k.path, None));
        assert_eq!(
            parsed.is_err(),
            k.required,
            "{}: required in table = {}",
            k.path,
            k.required
        );
        // A sample of what the table accepts must deserialize too.
        let samples: Vec<serde_json::Value> = match k.kind {
            Kind::Section => vec![],
            Kind::OptSection => vec![serde_json::Value::Null],
            Kind::UInt => vec![3.into()],
            Kind::OptUInt => vec![3.into(), serde_json::Value::Null],
            Kind::MapList => vec![
                serde_json::json!([{"name": "f", "kind": "format", "pattern": "x"}]),
                serde_json::json!([]),
            ],
            Kind::Float => vec![0.5.into(), 2.into()],
            Kind::OptFloat => vec![0.5.into(), serde_json::Value::Null],
            Kind::Bool => vec![true.into()],
            Kind::Path => vec!["p".into()],
            Kind::OptPath => vec!["p".into(), serde_json::Value::Null],
            Kind::Enum(values) => values.iter().map(|s| (*s).into()).collect(),
            Kind::FloatPair => vec![serde_json::json!([0.5, 1])],
            Kind::StrList => vec![serde_json::json!(["a", "b"]), serde_json::json!([])],
            Kind::Str => vec!["s".into()],
            Kind::Names(values) => vec![serde_json::json!(values), serde_json::json!([values[0]])],
            Kind::OptFloatList => vec![serde_json::json!([0.5, 1]), serde_json::Value::Null],
            Kind::OptUIntList => vec![serde_json::json!([2, 1]), serde_json::Value::Null],
            Kind::FreeMap => vec![
                serde_json::json!({"a": [1, {"b": null}]}),
                serde_json::Value::Null,
            ],
        };
        for s in samples {
            let r = serde_json::from_value::<Recipe>(edited(&full, k.path, Some(s.clone())));
            assert!(r.is_ok(), "{} = {s}: {:?}", k.path, r.err());
        }
    }
}

#[test]
fn every_error_exits_with_two() {
    let e = RecipeError::MalformedSet { arg: "a".into() };
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn committed_recipes_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n > 0, "no recipes in {}", dir.display());
}

#[test]
fn lora_section_is_on_as_a_mapping_and_off_as_null() {
    let base = ["model.architecture=null", "model.path=m"];
    let on = ok(MINIMAL, &[base[0], base[1], "lora={}"]);
    assert_eq!(on.lora, Some(Default::default()));
    let off = ok(MINIMAL, &[base[0], base[1], "lora.rank=4", "lora=null"]);
    assert_eq!(off.lora, None);
    let e = err(MINIMAL, &["lora.rank=4"]);
    assert!(e.contains("`lora`") && e.contains("model.path"), "{e}");
    let e = err(MINIMAL, &[base[0], base[1], "lora.target_modules=[qproj]"]);
    assert!(
        e.contains("lora.target_modules") && e.contains("qproj"),
        "{e}"
    );
    let e = err(MINIMAL, &[base[0], base[1], "lora.dropout=1.5"]);
    assert!(e.contains("lora.dropout") && e.contains("1.5"), "{e}");
}

#[test]
fn capacity_factor_is_positive_or_null() {
    let base = ["model.architecture=null", "model.path=m"];
    assert_eq!(ok(MINIMAL, &base).moe.capacity_factor, None);
    let on = ok(MINIMAL, &[base[0], base[1], "moe.capacity_factor=1.25"]);
    assert_eq!(on.moe.capacity_factor, Some(1.25));
    let e = err(MINIMAL, &[base[0], base[1], "moe.capacity_factor=0"]);
    assert!(
        e.contains("moe.capacity_factor") && e.contains("is 0"),
        "{e}"
    );
}
