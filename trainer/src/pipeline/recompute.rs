//! One stage's forward of one micro-batch and its backward, keeping what `train.recompute`
//! says: the whole graph (`none`); each layer's graph up to a MoE layer's experts, whose input
//! and routing are kept and which run again during backward (`experts`); or only each layer's
//! input, every layer running again during backward (`layers`).
//!
//! burn records one graph per backward and cannot nest a backward inside another, so the
//! recomputed pieces are chained by hand: each piece's input is a fresh leaf, its backward is
//! seeded with `(output · received gradient).sum()`, and the leaf's gradient seeds the piece
//! before it. The pieces are the model's own (`moeru_models::stage`), the same ops as one
//! forward, so every gradient is the one-graph gradient bit for bit.
//!
//! Owns: what a stage keeps between its forward and its backward. Must not: communicate
//! (the collectives inside the layers are the model's), or decide the order of passes.

use std::ops::Range;

use burn::tensor::{Gradients, Tensor};
use moeru_models::decoder::SplitLayer;
use moeru_models::moe::{Routed, RouterStats};
use moeru_models::{Batch, ForwardCtx, Qwen3Model};

use crate::engine::grads::GradBuffer;
use crate::recipe::schema::Recompute;

/// What the backward adds for a piece's MoE layers: the router losses of `stats` onto the
/// seed (reported as they are added).
pub type RouterTerms<'a> = dyn FnMut(Tensor<1>, &[RouterStats]) -> Tensor<1> + 'a;

/// A stage's forward of one micro-batch, kept for its backward.
pub struct StagePass {
    /// The stage's input leaf (absent on the first stage).
    input: Option<Tensor<2>>,
    kept: Kept,
}

enum Kept {
    /// The whole graph, and the router stats it holds.
    Graph(Vec<RouterStats>),
    /// Each layer's input values (`layers`), or each layer's graph as `Piece`s
    /// (`experts`); then the final-norm piece of the last stage.
    Layers(Vec<(usize, Tensor<2>)>, Option<Tensor<2>>),
    Pieces(Vec<Piece>, Option<Tensor<2>>),
}

/// One layer under `experts`: its input leaf and its graph up to the experts.
struct Piece {
    input: Tensor<2>,
    split: SplitLayer,
    layer: usize,
}

/// A fresh leaf holding `x`'s values (on the autodiff device), requiring gradients.
fn leaf(x: &Tensor<2>) -> Tensor<2> {
    Tensor::from_inner(x.clone().inner()).require_grad()
}

/// `x`'s values on the autodiff device, cut from its graph.
fn detached(x: &Tensor<2>) -> Tensor<2> {
    Tensor::from_inner(x.clone().inner())
}

/// Forward of layers `layers` over `input` (the embedding when `None`), the final rows when
/// `last`: this stage's output (with a graph back to the kept pieces), each MoE layer's
/// router stats (with a graph only under `none`), and what the backward needs.
///
/// The forwards that keep no graph run on `frozen`, the model on the same autodiff device with
/// every parameter detached (`Qwen3Model::frozen`), over detached inputs: burn records no
/// step for them, and they round exactly as the graph's forward (burn's forward without
/// autodiff rounds differently in places, and the recomputed pieces must see the values a
/// one-graph forward does).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    mode: Recompute,
    model: &Qwen3Model,
    frozen: &Qwen3Model,
    batch: &Batch,
    input: Option<Tensor<2>>,
    layers: Range<usize>,
    last: bool,
    ctx: &ForwardCtx,
) -> (Tensor<2>, Vec<(usize, RouterStats)>, StagePass) {
    if mode == Recompute::None {
        let (out, router) = model.stage_forward(batch, input.clone(), layers, last, ctx);
        let stats = router.iter().map(|(_, s)| s.clone()).collect();
        let kept = Kept::Graph(stats);
        return (out, router, StagePass { input, kept });
    }
    let inputs = model.layer_inputs(batch);
    let mut x = match &input {
        Some(leaf) => detached(leaf),
        None => frozen.embed_rows(batch),
    };
    let (mut saved, mut pieces, mut router) = (Vec::new(), Vec::new(), Vec::new());
    for i in layers {
        if mode == Recompute::Layers {
            let (y, stats) = frozen.layer_forward(i, x.clone(), &inputs, ctx);
            saved.push((i, x));
            router.extend(stats.map(|s| (i, s)));
            x = y;
            continue;
        }
        let input = leaf(&x);
        let split = model.layer_forward_routed(i, input.clone(), &inputs, ctx);
        x = match &split {
            SplitLayer::Dense(y) => detached(y),
            SplitLayer::Moe {
                residual,
                normed,
                routed,
                stats,
            } => {
                let again = Routed {
                    weights: Tensor::from_inner(routed.weights.clone().inner()),
                    expert_of: routed.expert_of.clone(),
                };
                let (e, rows) = frozen.layer_experts(i, &detached(normed), &again, ctx);
                let mut stats = detached_stats(stats.clone());
                stats.computed_rows = rows;
                router.push((i, stats));
                detached(residual) + detached(&e)
            }
        };
        pieces.push(Piece {
            input,
            split,
            layer: i,
        });
    }
    // The final norm stays on the graph (its input a leaf), so the loss's backward reaches it.
    let (out, norm_input) = match last {
        true => {
            let l = leaf(&x);
            (model.final_rows(l.clone()), Some(l))
        }
        false => (leaf(&x), None),
    };
    let kept = match mode {
        Recompute::Layers => Kept::Layers(saved, norm_input),
        _ => Kept::Pieces(pieces, norm_input),
    };
    (out, router, StagePass { input, kept })
}

/// Router statistics without their graph (what the loads and counts need).
fn detached_stats(s: RouterStats) -> RouterStats {
    RouterStats {
        prob_sum: Tensor::from_inner(s.prob_sum.inner()),
        z_sum: Tensor::from_inner(s.z_sum.inner()),
        ..s
    }
}

impl StagePass {
    /// Backward from `seed` (the last stage's loss, or `(output · g).sum()`), the router
    /// losses added where each MoE layer's graph is; accumulates the gradients of what trains
    /// into `grads` and returns the stage input's gradient (`None` on the first stage).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        self,
        model: &Qwen3Model,
        batch: &Batch,
        output: &Tensor<2>,
        seed: Tensor<1>,
        ctx: &ForwardCtx,
        router: &mut RouterTerms,
        grads: &mut GradBuffer,
    ) -> Option<Tensor<2>> {
        // A handle on the same parameters, to look their gradients up by name.
        let mut params = model.clone();
        let mut add = |g: &Gradients| grads.accumulate(&mut params.trainable(), g);
        let (layers, norm_input) = match self.kept {
            Kept::Graph(stats) => {
                let g = router(seed, &stats).backward();
                add(&g);
                return self.input.map(|x| grad_of(&x, &g));
            }
            Kept::Layers(saved, n) => (Ok(saved), n),
            Kept::Pieces(pieces, n) => (Err(pieces), n),
        };
        // The seed reaches this stage's output: the final norm's input on the last stage.
        let start = norm_input.unwrap_or_else(|| output.clone());
        let g = seed.backward();
        add(&g);
        let mut upstream = grad_of(&start, &g);
        upstream = match layers {
            Ok(saved) => rerun_layers(model, batch, saved, upstream, ctx, router, &mut add),
            Err(pieces) => rerun_experts(model, pieces, upstream, ctx, router, &mut add),
        };
        match self.input {
            Some(_) => Some(upstream),
            None => {
                // The embedding, last: its rows seeded with their gradient (when it trains;
                // under LoRA the base is frozen and the rows have no graph).
                if model.lora_config().is_none() {
                    let x0 = model.embed_rows(batch);
                    add(&(x0 * upstream).sum().backward());
                }
                None
            }
        }
    }
}

/// `layers`: each layer again from its saved input, last first; returns the gradient of the
/// first layer's input.
fn rerun_layers(
    model: &Qwen3Model,
    batch: &Batch,
    saved: Vec<(usize, Tensor<2>)>,
    mut upstream: Tensor<2>,
    ctx: &ForwardCtx,
    router: &mut RouterTerms,
    add: &mut dyn FnMut(&Gradients),
) -> Tensor<2> {
    let inputs = model.layer_inputs(batch);
    for (i, x) in saved.into_iter().rev() {
        let input = leaf(&x);
        let (y, stats) = model.layer_forward(i, input.clone(), &inputs, ctx);
        let mut seed = (y * upstream).sum();
        if let Some(stats) = stats {
            seed = router(seed, &[stats]);
        }
        let g = seed.backward();
        add(&g);
        upstream = grad_of(&input, &g);
    }
    upstream
}

/// `experts`: each MoE layer's experts again from their kept input and routing, then the
/// layer's kept graph seeded with the experts' input gradients; last layer first.
fn rerun_experts(
    model: &Qwen3Model,
    pieces: Vec<Piece>,
    mut upstream: Tensor<2>,
    ctx: &ForwardCtx,
    router: &mut RouterTerms,
    add: &mut dyn FnMut(&Gradients),
) -> Tensor<2> {
    for p in pieces.into_iter().rev() {
        let seed = match p.split {
            SplitLayer::Dense(y) => (y * upstream).sum(),
            SplitLayer::Moe {
                residual,
                normed,
                routed,
                stats,
            } => {
                let normed_leaf = leaf(&normed);
                let weights_leaf =
                    Tensor::from_inner(routed.weights.clone().inner()).require_grad();
                let again = Routed {
                    weights: weights_leaf.clone(),
                    expert_of: routed.expert_of.clone(),
                };
                let (e, _) = model.layer_experts(p.layer, &normed_leaf, &again, ctx);
                let g = (e * upstream.clone()).sum().backward();
                add(&g);
                let (g_normed, g_weights) = (grad_of(&normed_leaf, &g), grad_of(&weights_leaf, &g));
                let seed = (residual * upstream).sum()
                    + (normed * g_normed).sum()
                    + (routed.weights * g_weights).sum();
                router(seed, &[stats])
            }
        };
        let g = seed.backward();
        add(&g);
        upstream = grad_of(&p.input, &g);
    }
    upstream
}

fn grad_of<const D: usize>(x: &Tensor<D>, g: &Gradients) -> Tensor<D> {
    Tensor::from_inner(x.grad(g).expect("a leaf of this backward"))
}
