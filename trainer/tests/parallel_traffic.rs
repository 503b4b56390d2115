//! The traffic each model-parallel layout moves per step, counted by group and op on rank 0
//! and checked against its analytic volume (as `data_parallel.rs` checks DP's): tensor
//! parallelism with and without sequence parallelism, expert parallelism's all-to-all, and
//! the whole dp2·tp2·ep4 layout with ZeRO-1, every group at once.

mod common;

use std::path::Path;

use common::layout::{layout, part_params, recipe_for, Layout};
use common::{metrics, step_dir, Set};
use moeru_models::Qwen3Config;
use moeru_trainer::{run_threads, RunOptions};

/// Every layer dense (a MoE layer would come every fifth layer of four).
const DENSE: [Set; 1] = [("model.architecture.decoder_sparse_step", &5)];

/// Runs 2 steps of one micro-batch each on `lay` under `out`.
fn run_two_steps(out: &Path, lay: Layout, model: &[Set]) {
    let mut rec = recipe_for(out, lay, model);
    (
        rec.train.steps,
        rec.train.grad_accum,
        rec.schedule.warmup_steps,
    ) = (2, 1, 0);
    run_threads(&rec, &RunOptions::default(), lay.dp * lay.tp).unwrap();
}

/// Asserts that the tp group all-gathered and reduce-scattered `bytes` of activations each.
fn assert_sp_crossings(m: &serde_json::Value, bytes: u64, what: &str) {
    assert_eq!(comm(m, "tp", "all_gather", "payload"), bytes, "{what}");
    assert_eq!(comm(m, "tp", "reduce_scatter", "payload"), bytes, "{what}");
}

/// Bytes rank 0's collectives moved on `group` with `op` in step line `m` (`payload` or
/// `wire`).
fn comm(m: &serde_json::Value, group: &str, op: &str, what: &str) -> u64 {
    m["comm"][group][op][what].as_u64().unwrap_or(0)
}

/// The world's all-reduce of a step: the global norm's per-piece norms (one f32 for each
/// optimizer piece the world counts, placed in one order; engine/grads.rs `NormOrder`). The
/// pieces are counted independently, as the entries of every rank's optimizer slice map in
/// the step-2 checkpoint (each rank writes exactly the pieces it counts).
fn norm_bytes(out: &Path) -> u64 {
    let dir = step_dir(out, 2);
    let maps = std::fs::read_dir(&dir).unwrap().filter_map(|e| {
        let path = e.ok()?.path();
        let name = path.file_name()?.to_str()?.to_string();
        (name.starts_with("optim-r") && name.ends_with(".json")).then_some(path)
    });
    let pieces: usize = maps
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            serde_json::from_str::<Vec<serde_json::Value>>(&text)
                .unwrap()
                .len()
        })
        .sum();
    assert!(pieces > 0, "no slice maps in {}", dir.display());
    4 * pieces as u64
}

/// The tensor-parallel traffic of a dense model against its analytic volume: per micro-batch
/// of R tokens, L layers, hidden H, head_dim D (f32 on the wire; a tp2 ring moves each
/// all-reduce's bytes once, each gather's and scatter's half).
#[test]
fn tensor_parallel_traffic_equals_the_analytic_volume() {
    let (r, h, d, l) = (2 * 64u64, 64u64, 16u64, 4u64);
    for sp in [false, true] {
        let out = tempfile::tempdir().unwrap();
        let lay = layout(1, 2, 1, sp, false);
        run_two_steps(out.path(), lay, &DENSE);
        // Activations [R, H] cross the tp boundary at the embedding, twice a layer (attention
        // and MLP) and before the LM head, once forward and once backward; the
        // vocabulary-parallel loss all-reduces a max and two sums per token.
        let crossings = 2 * (2 * l + 1);
        let loss = 4 * 3 * r;
        for m in metrics(out.path()).iter().filter(|m| m["loss"].is_f64()) {
            let what = format!("sp {sp} step {}", m["step"]);
            let all_reduce = comm(m, "tp", "all_reduce", "payload");
            if sp {
                // Gathers before column-parallel layers, reduce-scatters after row-parallel
                // ones (and their adjoints); every replicated weight's gradient is partial
                // (two norms and the QK-norms a layer, the final norm), and the router-loss
                // shares are summed (two f64).
                let activations = crossings * r * h * 4;
                assert_sp_crossings(m, activations, &what);
                assert_eq!(
                    comm(m, "tp", "all_gather", "wire"),
                    activations / 2,
                    "{what}"
                );
                let partial = 4 * (l * (2 * h + 2 * d) + h);
                assert_eq!(all_reduce, loss + partial + 16, "{what}");
            } else {
                let partial = 4 * 2 * d * l;
                assert_eq!(all_reduce, crossings * r * h * 4 + loss + partial, "{what}");
                assert!(m["comm"]["tp"].get("all_gather").is_none(), "{what}");
            }
            assert_eq!(comm(m, "tp", "all_reduce", "wire"), all_reduce, "{what}");
            // The global norm's per-piece norms are the only other collective of the step.
            assert_eq!(
                comm(m, "world", "all_reduce", "payload"),
                norm_bytes(out.path()),
                "{what}"
            );
        }
    }
}

/// The tensor-parallel traffic of the MoE (1 dense + 3 MoE layers) under sequence
/// parallelism: only attention and the dense MLP are tensor-parallel regions (experts run on
/// each rank's rows); the load-balancing loss sums the E router counts over tp once per
/// micro-batch, and every replicated weight's gradient (the routers' too) is partial.
#[test]
fn moe_tensor_parallel_traffic_equals_the_analytic_volume() {
    let (r, h, d, l, dense, experts) = (2 * 64u64, 64u64, 16u64, 4u64, 1u64, 4u64);
    let moe = l - dense;
    let out = tempfile::tempdir().unwrap();
    let lay = layout(1, 2, 1, true, false);
    run_two_steps(out.path(), lay, &[]);
    let activations = 2 * (l + dense + 1) * r * h * 4;
    let partial = 4 * (l * (2 * h + 2 * d) + h + moe * experts * h);
    let shares = 8 * (2 + experts * moe);
    for m in metrics(out.path()).iter().filter(|m| m["loss"].is_f64()) {
        let what = format!("step {}", m["step"]);
        assert_sp_crossings(m, activations, &what);
        let all_reduce = comm(m, "tp", "all_reduce", "payload");
        assert_eq!(
            all_reduce,
            4 * 3 * r + 8 * experts + partial + shares,
            "{what}"
        );
        assert!(
            m["comm"].get("ep").is_none(),
            "{what}: no expert parallelism"
        );
    }
}

/// The all-to-all traffic of expert parallelism against its volume: per MoE layer and
/// micro-batch, the count exchange (E i64), the rank's routed rows out and their gradients
/// back (R_local × k rows each), and the rows its experts received back and their gradients
/// (the rows logged as its `ep_load`, since its EP group holds every routing rank here).
#[test]
fn expert_parallel_traffic_equals_the_routed_rows() {
    let (h, k, experts, moe_layers) = (64u64, 2u64, 4u64, 3u64);
    for lay in [layout(2, 1, 2, false, false), layout(1, 2, 2, true, false)] {
        let out = tempfile::tempdir().unwrap();
        run_two_steps(out.path(), lay, &[]);
        let routed = 2 * 64 / lay.tp as u64 * k;
        for m in metrics(out.path()).iter().filter(|m| m["loss"].is_f64()) {
            let what = format!("{lay:?} step {}", m["step"]);
            let received = m["ep_load"][0].as_u64().unwrap();
            let load: u64 = (0..lay.ep).map(|i| m["ep_load"][i].as_u64().unwrap()).sum();
            assert_eq!(
                load,
                moe_layers * routed * (lay.dp * lay.tp) as u64,
                "{what}"
            );
            let want = moe_layers * (8 * experts + 2 * routed * h * 4) + 2 * received * h * 4;
            assert_eq!(comm(m, "ep", "all_to_all", "payload"), want, "{what}");
        }
    }
}

/// dp2·tp2·ep4 with ZeRO-1 (4 ranks): every group's traffic at once. tp: the MoE's SP
/// crossings, the vocabulary-parallel loss, the partial gradients and the token shares, as
/// under tp2 alone; ep (all four ranks): the count exchange and the routed rows; dp: ZeRO-1's
/// reduce-scatter of the dense gradients and all-gather of the dense parameters this rank
/// holds (its tp part; one bucket, padded to a multiple of dp), plus the pre-step counts and
/// the reported sums; the expert-data-parallel group has one rank and moves nothing; world:
/// the global norm's f64.
#[test]
fn dp2_tp2_ep4_traffic_equals_the_analytic_volume() {
    let (r, h, d, k, l, dense, experts) = (2 * 64u64, 64u64, 16u64, 2u64, 4u64, 1u64, 4u64);
    let moe = l - dense;
    let lay = layout(2, 2, 4, true, true);
    let out = tempfile::tempdir().unwrap();
    run_two_steps(out.path(), lay, &[]);
    let c = recipe_for(out.path(), lay, &[]).model.architecture.unwrap();
    let c = Qwen3Config::from_map(c, Path::new("recipe")).unwrap();
    let local_experts =
        moe * experts / 4 * 3 * c.moe.as_ref().unwrap().moe_intermediate_size as u64 * h;
    let dense_part = part_params(&c, 2, 4) - local_experts;
    let padded = dense_part.div_ceil(2) * 2;
    let activations = 2 * (l + dense + 1) * r * h * 4;
    let partial = 4 * (l * (2 * h + 2 * d) + h + moe * experts * h);
    let shares = 8 * (2 + experts * moe);
    let routed = r / 2 * k;
    for m in metrics(out.path()).iter().filter(|m| m["loss"].is_f64()) {
        let what = format!("step {}", m["step"]);
        assert_sp_crossings(m, activations, &what);
        let tp_all_reduce = 4 * 3 * r + 8 * experts + partial + shares;
        assert_eq!(
            comm(m, "tp", "all_reduce", "payload"),
            tp_all_reduce,
            "{what}"
        );
        let received = m["ep_load"][0].as_u64().unwrap();
        let load: u64 = (0..4).map(|i| m["ep_load"][i].as_u64().unwrap()).sum();
        assert_eq!(load, moe * routed * 4, "{what}");
        let all_to_all = moe * (8 * experts + 2 * routed * h * 4) + 2 * received * h * 4;
        assert_eq!(comm(m, "ep", "all_to_all", "payload"), all_to_all, "{what}");
        assert_eq!(
            comm(m, "dp", "reduce_scatter", "payload"),
            4 * padded,
            "{what}"
        );
        assert_eq!(comm(m, "dp", "all_gather", "payload"), 4 * padded, "{what}");
        let reported = 8 * (4 + experts * moe);
        assert_eq!(
            comm(m, "dp", "all_reduce", "payload"),
            8 * 2 + reported,
            "{what}"
        );
        assert!(m["comm"].get("edp").is_none(), "{what}: {}", m["comm"]);
        assert_eq!(
            comm(m, "world", "all_reduce", "payload"),
            norm_bytes(out.path()),
            "{what}"
        );
    }
}

/// Under `precision: bf16` the activations that enter a matmul cross ranks in bf16: the
/// inputs of q/k/v and gate/up (the SP gathers and their adjoint reduce-scatters) and the
/// row-parallel outputs, 2 bytes an element; the embedding's output, the LM head's input and
/// their adjoints stay f32, as the residual stream is. The expert dispatch sends the routed
/// rows in bf16 (and their gradients come back in bf16); the experts' outputs go back in f32.
/// Each run's losses stay within bf16's reach of the one-rank bf16 run of its model.
#[test]
fn bf16_activations_cross_ranks_as_bf16() {
    let (r, h, k, l, experts, moe) = (2 * 64u64, 64u64, 2u64, 4u64, 4u64, 3u64);
    let bf16: Set = ("precision", &"bf16");
    let one = tempfile::tempdir().unwrap();
    run_two_steps(one.path(), layout(1, 1, 1, false, false), &[bf16]);
    let one_dense = tempfile::tempdir().unwrap();
    run_two_steps(
        one_dense.path(),
        layout(1, 1, 1, false, false),
        &[bf16, DENSE[0]],
    );
    let dense = tempfile::tempdir().unwrap();
    run_two_steps(
        dense.path(),
        layout(1, 2, 1, true, false),
        &[bf16, DENSE[0]],
    );
    let ep = tempfile::tempdir().unwrap();
    run_two_steps(ep.path(), layout(2, 1, 2, false, false), &[bf16]);
    for m in metrics(dense.path()).iter().filter(|m| m["loss"].is_f64()) {
        let activations = (4 * l * 2 + 2 * 4) * r * h;
        assert_sp_crossings(m, activations, &format!("dense tp2 step {}", m["step"]));
    }
    // Each dp rank routes its own micro-batch of R tokens (no tensor parallelism).
    let routed = r * k;
    for m in metrics(ep.path()).iter().filter(|m| m["loss"].is_f64()) {
        let received = m["ep_load"][0].as_u64().unwrap();
        let want = moe * (8 * experts + routed * h * (2 + 4)) + received * h * (4 + 2);
        let what = format!("dp2·ep2 step {}", m["step"]);
        assert_eq!(comm(m, "ep", "all_to_all", "payload"), want, "{what}");
    }
    for (what, run, one) in [("dense tp2", &dense, &one_dense), ("dp2·ep2", &ep, &one)] {
        let (losses, reference) = (common::losses(run.path()), common::losses(one.path()));
        assert_eq!(
            (losses.len(), reference.len()),
            (2, 2),
            "{what}: two steps each"
        );
        for (a, b) in reference.iter().zip(&losses) {
            assert!(
                (a - b).abs() < 2e-2 * a.abs(),
                "bf16 {what} {b} vs one rank {a}"
            );
        }
    }
}
