//! MoE router replay (models/src/route_replay.rs): replaying the routes a forward chose gives
//! that forward's logits and gradients bit for bit; replaying forced routes matches
//! transformers with the same routes forced into `Qwen3MoeTopKRouter` (the router's gradient
//! included; tests/reference/make_router_replay_reference.py); with `norm_topk_prob` the LM
//! loss gives gate rows of experts no token replays exactly zero gradient; and the routes a
//! generation records are the top-k of a full forward over the final sequences.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use moeru_checkpoints::{load_hf_model, TensorFile};
use moeru_models::generate::{GenerationConfig, Prompts, StepObserver};
use moeru_models::params::{to_f32_vec, Params};
use moeru_models::route_replay::LIVE;
use moeru_models::{Batch, ForwardCtx, Qwen3Model, RouteReplay};

const MODELS: [&str; 2] = ["qwen3-moe-mixed", "qwen3-moe-norm-sharded"];

fn model(name: &str) -> Qwen3Model {
    let device = test_device().autodiff();
    load_hf_model(&model_dir(name), &device).unwrap_or_else(|e| panic!("{e}"))
}

fn top_k(m: &Qwen3Model) -> usize {
    m.config.moe.as_ref().unwrap().num_experts_per_tok
}

/// Logits, LM loss (labels = ids, no router losses) and every parameter's gradient.
fn run(
    m: &mut Qwen3Model,
    batch: &Batch,
    ctx: &ForwardCtx,
) -> (Vec<f32>, f32, BTreeMap<String, Vec<f32>>, RouteReplay) {
    let out = m.forward(batch, ctx);
    let routes = RouteReplay::from_router(&out.router, top_k(m));
    let logits = to_f32_vec(m.logits(out.hidden.clone(), ctx));
    let loss = m.lm_loss(batch, out.hidden, ctx);
    let value = to_f32_vec(loss.clone())[0];
    let grads = loss.backward();
    let mut visitor = Grads {
        grads: &grads,
        out: BTreeMap::new(),
    };
    m.visit_params(&mut visitor);
    (logits, value, visitor.out, routes)
}

fn replaying(routes: RouteReplay) -> ForwardCtx {
    ForwardCtx::default().with_routes(Some(Arc::new(routes)))
}

fn fixture(name: &str) -> TensorFile {
    let path = reference_dir().join(format!("router_replay/{name}.safetensors"));
    TensorFile::open(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn replaying_a_forwards_own_routes_is_bit_identical() {
    for name in MODELS {
        let mut m = model(name);
        let (ids, shape) = i64s(&fixture(name), "input_ids");
        let batch = Batch::from_ids(&ids, shape[0], shape[1], &m.device());
        let (logits, loss, grads, routes) = run(&mut m, &batch, &ForwardCtx::default());
        assert_eq!(routes.layers.len(), 2, "{name}: two MoE layers recorded");
        let (l2, loss2, g2, again) = run(&mut m, &batch, &replaying(routes.clone()));
        assert_eq!(again, routes, "{name}: replay routes as recorded");
        assert!(
            logits == l2 && loss == loss2,
            "{name}: logits or loss differ"
        );
        assert_eq!(grads.len(), g2.len());
        for (p, g) in &grads {
            assert!(g == &g2[p], "{name}: gradient of {p} differs under replay");
        }
    }
}

#[test]
fn forced_routes_match_transformers() {
    for name in MODELS {
        let f = fixture(name);
        let mut m = model(name);
        let (ids, shape) = i64s(&f, "input_ids");
        let batch = Batch::from_ids(&ids, shape[0], shape[1], &m.device());
        let mut routes = RouteReplay::new(top_k(&m));
        let mut forced = 0;
        for (tensor, _) in f.shapes() {
            if let Some(layer) = tensor.strip_prefix("routes.") {
                routes
                    .layers
                    .insert(layer.parse().unwrap(), i64s(&f, &tensor).0);
                forced += i64s(&f, &format!("forced.{layer}")).0.iter().sum::<i64>();
            }
        }
        assert!(forced > 0, "{name}: the fixture moves some tokens");
        let ctx = replaying(routes.clone());
        // The replayed routes differ from live routing exactly where the fixture moved a
        // token: the mismatch metric's count.
        let out = m.forward(&batch, &ctx);
        let mismatched: usize = (out.router.iter())
            .map(|(_, s)| {
                s.replay
                    .as_ref()
                    .unwrap()
                    .mismatched
                    .iter()
                    .filter(|&&x| x)
                    .count()
            })
            .sum();
        assert_eq!(mismatched as i64, forced, "{name}: mismatched tokens");
        let (logits, loss, grads, used) = run(&mut m, &batch, &ctx);
        assert_eq!(
            used, routes,
            "{name}: the forward used the replayed experts"
        );
        let diff = max_abs_diff(&logits, &f32s(&f, "logits").0);
        assert!(diff <= tol(1e-4, 1e-3), "{name}: logits differ by {diff:e}");
        let want = f32s(&f, "loss").0[0];
        assert!(
            (loss - want).abs() <= tol(1e-5, 1e-3),
            "{name}: loss {loss} vs {want}"
        );
        assert!(grads.keys().any(|p| p.ends_with("mlp.gate.weight")));
        for (p, g) in &grads {
            let rel = relative_error(g, &f32s(&f, &format!("grad.{p}")).0);
            assert!(
                rel <= tol(1e-4, 1e-3),
                "{name}: gradient of {p} off by {rel:e}"
            );
        }
    }
}

/// Every MoE layer's gate gradient rows, `[experts][hidden]`, when every token replays
/// experts `0..k`.
fn gate_rows_replaying_the_first_experts(name: &str) -> Vec<Vec<Vec<f32>>> {
    let mut m = model(name);
    let (ids, shape) = i64s(&fixture(name), "input_ids");
    let batch = Batch::from_ids(&ids, shape[0], shape[1], &m.device());
    let k = top_k(&m);
    let (_, _, _, live) = run(&mut m, &batch, &ForwardCtx::default());
    let mut routes = RouteReplay::new(k);
    for (&layer, ids) in &live.layers {
        let tokens = ids.len() / k;
        let first: Vec<i64> = (0..tokens).flat_map(|_| 0..k as i64).collect();
        routes.layers.insert(layer, first);
    }
    let (_, _, grads, _) = run(&mut m, &batch, &replaying(routes));
    let hidden = m.config.hidden_size;
    (grads.iter().filter(|(p, _)| p.ends_with("mlp.gate.weight")))
        .map(|(_, g)| g.chunks(hidden).map(<[f32]>::to_vec).collect())
        .collect()
}

#[test]
fn with_norm_topk_prob_unreplayed_gate_rows_get_exactly_zero_gradient() {
    let k = 3; // qwen3-moe-norm-sharded: top-3 of 6
    for layer in gate_rows_replaying_the_first_experts("qwen3-moe-norm-sharded") {
        for (e, row) in layer.iter().enumerate() {
            let zero = row.iter().all(|&x| x == 0.0);
            assert_eq!(zero, e >= k, "expert {e}: gate row zero = {zero}");
        }
    }
    // Without renormalisation the softmax denominator reaches every row: the test above
    // tells the two apart.
    for layer in gate_rows_replaying_the_first_experts("qwen3-moe-mixed") {
        assert!(layer.iter().all(|row| row.iter().any(|&x| x != 0.0)));
    }
}

struct Record;

impl StepObserver for Record {
    fn step(&mut self, _: usize, _: &[i64], _: &mut [bool]) {}

    fn record(&self) -> bool {
        true
    }
}

#[test]
fn generation_records_the_routes_and_log_probs_of_a_full_forward() {
    for name in MODELS {
        let m = model(name);
        let k = top_k(&m);
        // Two prompts of different lengths (the shorter left-padded), sampled.
        let rows: [&[i64]; 2] = [&[5, 17, 42, 8, 3], &[70, 2, 9]];
        let mut prompts = Prompts {
            ids: Vec::new(),
            mask: Vec::new(),
            batch: 2,
            seq: 5,
        };
        for r in rows {
            let pad = 5 - r.len();
            prompts
                .ids
                .extend(std::iter::repeat_n(0, pad).chain(r.iter().copied()));
            prompts
                .mask
                .extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, r.len())));
        }
        let cfg = GenerationConfig {
            max_new_tokens: 6,
            eos_token_ids: vec![],
            pad_token_id: 0,
            sampling: Some(moeru_models::sampling::Sampling {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                seed: 3,
            }),
        };
        let g = m.generate_with(&prompts, &cfg, &ForwardCtx::default(), &mut Record);
        let routes = g.routes.as_ref().expect("recorded");
        for (r, prompt) in rows.iter().enumerate() {
            let row = &g.sequences[r * g.len..(r + 1) * g.len];
            let seq: Vec<i64> = row[5 - prompt.len()..].to_vec();
            let batch = Batch::from_ids(&seq, 1, seq.len(), &m.device());
            let out = m.forward(&batch, &ForwardCtx::default());
            let full = RouteReplay::from_router(&out.router, k);
            for (layer, ids) in &routes.layers {
                let from = (r * g.len + 5 - prompt.len()) * k;
                let recorded = &ids[from..(r + 1) * g.len * k];
                let n = recorded.len();
                // Every token but the last was fed, and routed as the full forward routes it.
                assert_eq!(
                    &recorded[..n - k],
                    &full.layers[layer][..n - k],
                    "{name} row {r}"
                );
                assert!(recorded[n - k..].iter().all(|&e| e == LIVE));
                assert!(
                    ids[r * g.len * k..from].iter().all(|&e| e == LIVE),
                    "padding"
                );
            }
            // The recorded log-probs are the full forward's at the sampled tokens.
            let logits = m.logits(out.hidden, &ForwardCtx::default());
            let logps = to_f32_vec(burn::tensor::activation::log_softmax(logits, 2));
            let vocab = m.config.vocab_size;
            for (j, &lp) in g.token_logps[r].iter().enumerate() {
                let at = prompt.len() - 1 + j;
                let want = logps[at * vocab + seq[at + 1] as usize];
                assert!(
                    (lp - want).abs() < 1e-5,
                    "{name} row {r} token {j}: {lp} vs {want}"
                );
            }
        }
    }
}
