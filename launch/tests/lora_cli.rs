//! The LoRA path of the `moeru` binary: train the tests' tiny LoRA recipe, evaluate its checkpoint
//! (alone, and as `--adapter` on the base), export it merged and check the merge.

mod common;

use std::path::Path;

use common::{moeru, p, workspace, LORA_SFT};
use moeru_checkpoints::TensorFile;

fn ok(args: &[&str]) -> String {
    let out = moeru(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "moeru {args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn eval_loss(model: &Path, adapter: Option<&Path>) -> f64 {
    let data = workspace().join("recipes/smoke/data/chat-eval");
    let mut args = vec![
        "eval",
        "--model",
        p(model),
        "--data",
        p(&data),
        "--seq-len",
        "64",
        "--micro-batch-size",
        "4",
        "--max-batches",
        "3",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", p(a)]);
    }
    let text = ok(&args);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn tensor(dir: &Path, file: &str, name: &str) -> (Vec<f32>, Vec<usize>) {
    TensorFile::open(&dir.join(file))
        .unwrap()
        .f32(name)
        .unwrap()
}

/// `c[i][j] = Σ_k a[i][k] · b[k][j]` in f64.
fn matmul(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * m];
    for i in 0..n {
        for t in 0..k {
            for j in 0..m {
                c[i * m + j] += a[i * k + t] * b[t * m + j];
            }
        }
    }
    c
}

#[test]
fn lora_checkpoint_evaluates_and_exports_merged() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    ok(&[
        "train",
        LORA_SFT,
        "--set",
        &format!("checkpoint.dir={}", run.display()),
        "--set",
        &format!("logging.dir={}", run.join("logs").display()),
        "--set",
        "logging.progress=false",
        "--set",
        "train.steps=4",
        "--set",
        "train.eval_every=0",
        "--set",
        "checkpoint.every=2",
    ]);
    let ckpt = run.join("step-000004");
    let base = workspace().join("recipes/smoke/base");
    let merged = tmp.path().join("merged");

    // A LoRA checkpoint is not a model: export says how to merge it.
    let out = moeru(&["export", "--checkpoint", p(&run), "--out", p(&merged)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--merge-lora"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    ok(&[
        "export",
        "--checkpoint",
        p(&run),
        "--merge-lora",
        "--out",
        p(&merged),
    ]);

    // Merged = base + (alpha / r) · B·A: a linear, and one expert of the fused down_proj.
    let adapter = "adapter_model.safetensors";
    let peft = "base_model.model.model.layers.1";
    let check = |w: &str, a: &str, b: &str, expert: Option<(usize, usize)>| {
        let (w0, shape) = tensor(&base, "model.safetensors", w);
        let (w1, _) = tensor(&merged, "model.safetensors", w);
        let (a, ashape) = tensor(&ckpt, adapter, a);
        let (b, bshape) = tensor(&ckpt, adapter, b);
        let (out_dim, in_dim) = (shape[0], shape[1]);
        let (ae, be): (Vec<f64>, Vec<f64>) = match expert {
            None => (
                a.iter().map(|&x| x as f64).collect(),
                b.iter().map(|&x| x as f64).collect(),
            ),
            Some((e, experts)) => {
                let r = ashape[0] / experts;
                let a_e = a[e * r * in_dim..(e + 1) * r * in_dim].iter();
                // lora_B [out, r·E] is [out, r, E]: expert e's column j is j·E + e.
                let mut b_e = Vec::new();
                for o in 0..out_dim {
                    for j in 0..r {
                        b_e.push(b[o * bshape[1] + j * experts + e] as f64);
                    }
                }
                (a_e.map(|&x| x as f64).collect(), b_e)
            }
        };
        let r = ae.len() / in_dim;
        let delta = matmul(&be, &ae, out_dim, r, in_dim);
        let scale = 16.0 / 8.0;
        let diff = w0
            .iter()
            .zip(&w1)
            .zip(&delta)
            .map(|((x, y), d)| (*x as f64 + scale * d - *y as f64).abs())
            .fold(0.0, f64::max);
        let moved = w0.iter().zip(&w1).any(|(x, y)| x != y);
        eprintln!("{w}: max |base + s·BA − merged| = {diff:.2e}");
        assert!(diff <= 1e-6 && moved, "{w}: {diff}");
    };
    check(
        "model.layers.1.self_attn.q_proj.weight",
        &format!("{peft}.self_attn.q_proj.lora_A.weight"),
        &format!("{peft}.self_attn.q_proj.lora_B.weight"),
        None,
    );
    check(
        "model.layers.1.mlp.experts.2.down_proj.weight",
        &format!("{peft}.mlp.experts.lora_A.weight"),
        &format!("{peft}.mlp.experts.lora_B.weight"),
        Some((2, 4)),
    );
    // Tensors without adapters are the base's, bit for bit.
    let (n0, _) = tensor(&base, "model.safetensors", "model.norm.weight");
    let (n1, _) = tensor(&merged, "model.safetensors", "model.norm.weight");
    assert_eq!(n0, n1);

    // The checkpoint evaluates on its base (from adapter_config.json), the same as the
    // adapter given explicitly and as the merged model; and not as the bare base.
    let alone = eval_loss(&ckpt, None);
    let explicit = eval_loss(&base, Some(&ckpt));
    let folded = eval_loss(&merged, None);
    let bare = eval_loss(&base, None);
    eprintln!("eval: checkpoint {alone}, base+adapter {explicit}, merged {folded}, base {bare}");
    assert_eq!(alone, explicit);
    assert!((alone - folded).abs() <= 1e-4, "{alone} vs {folded}");
    assert!((alone - bare).abs() > 1e-3, "{alone} vs {bare}");
}
