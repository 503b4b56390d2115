//! A model cut by tensor, sequence and expert parallelism over thread ranks gives the one-rank
//! model's losses, router counts and (once each rank's gradients are completed over their
//! groups and joined into whole tensors) gradients.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use burn::tensor::{Device, Gradients, Tensor};
use moeru_models::init::RandomInit;
use moeru_models::loss::next_token_targets;
use moeru_models::params::{to_f32_vec, ParamVisitor, Params};
use moeru_models::shard::join_parts;
use moeru_models::{Batch, ForwardCtx, ModelShard, Placement, Qwen3Config, Qwen3Model};
use moeru_parallel::boundaries::ShardBoundaries;
use moeru_parallel::tensor_ops::CommHandle;
use moeru_parallel::{thread_world, DeviceMesh, MeshSizes, ProcessGroup, ReduceOp};

const AUX: f32 = 0.1;
const Z: f32 = 0.01;
const TOL: f32 = 1e-5;

fn config(moe: bool) -> Qwen3Config {
    let json = serde_json::json!({
        "model_type": if moe { "qwen3_moe" } else { "qwen3" },
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2,
        "norm_topk_prob": true, "mlp_only_layers": [0], "tie_word_embeddings": false,
        "initializer_range": 0.2,
    });
    let serde_json::Value::Object(map) = json else {
        unreachable!()
    };
    Qwen3Config::from_map(map, std::path::Path::new("test")).unwrap()
}

/// Data-parallel rank `d`'s batch: 2 rows of 8 tokens.
fn batch(d: usize, device: &Device) -> Batch {
    let ids: Vec<i64> = (0..16)
        .map(|i| ((i * 7 + d * 13 + i * i) % 64) as i64)
        .collect();
    Batch::from_ids(&ids, 2, 8, device)
}

/// What a forward reports: the LM loss, the router losses (this rank's share), and the
/// router counts per MoE layer.
struct Outcome {
    loss: Tensor<1>,
    lm: f64,
    aux: f64,
    counts: Vec<Vec<u64>>,
}

fn forward(model: &Qwen3Model, batch: &Batch, denom: f32) -> Outcome {
    let ctx = ForwardCtx::default();
    let out = model.forward(batch, &ctx);
    let (targets, mask) = next_token_targets(&batch.input_ids);
    let lm = model
        .token_loss_sum(out.hidden, targets, mask, &ctx)
        .div_scalar(denom);
    let scalar = |t: &Tensor<1>| to_f32_vec(t.clone())[0] as f64;
    let mut outcome = Outcome {
        lm: scalar(&lm),
        loss: lm,
        aux: 0.0,
        counts: out
            .router
            .iter()
            .map(|(_, s)| s.expert_counts.clone())
            .collect(),
    };
    if let (Some(a), Some(z)) = (out.aux_loss, out.z_loss) {
        let router = a.mul_scalar(AUX) + z.mul_scalar(Z);
        outcome.aux = scalar(&router);
        outcome.loss = outcome.loss + router;
    }
    outcome
}

/// Every parameter's gradient (zeros where none), flat, with its local shape.
fn grads_of(model: &mut Qwen3Model, grads: &Gradients) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    struct Collect<'a>(&'a Gradients, BTreeMap<String, (Vec<usize>, Vec<f32>)>);
    impl ParamVisitor for Collect<'_> {
        fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
            let dims = param.dims().to_vec();
            let g = match param.grad(self.0) {
                Some(g) => to_f32_vec(g),
                None => vec![0.0; dims.iter().product()],
            };
            self.1.insert(name.to_string(), (dims, g));
        }
    }
    let mut c = Collect(grads, BTreeMap::new());
    model.visit_params(&mut c);
    c.1
}

fn init(c: &Qwen3Config) -> RandomInit {
    RandomInit {
        seed: 11,
        std: c.initializer_range,
    }
}

/// Summed LM loss, summed router losses, router counts per layer, gradients by name.
type Oracle = (f64, f64, Vec<Vec<u64>>, BTreeMap<String, Vec<f32>>);

/// The one-rank model on all `dp` batches: summed losses, counts per layer, gradients.
fn oracle(dp: usize, moe: bool) -> Oracle {
    let device = Device::flex().autodiff();
    let c = config(moe);
    let mut model = Qwen3Model::new(c.clone(), &mut init(&c), &device).unwrap();
    let denom = (dp * 14) as f32;
    let (mut lm, mut aux, mut counts, mut total) = (0.0, 0.0, Vec::new(), None);
    for d in 0..dp {
        let o = forward(&model, &batch(d, &device), denom);
        lm += o.lm;
        aux += o.aux;
        add_counts(&mut counts, &o.counts);
        total = Some(match total {
            Some(t) => t + o.loss,
            None => o.loss,
        });
    }
    let grads = total.unwrap().backward();
    let grads = grads_of(&mut model, &grads)
        .into_iter()
        .map(|(n, (_, g))| (n, g))
        .collect();
    (lm, aux, counts, grads)
}

fn add_counts(acc: &mut Vec<Vec<u64>>, counts: &[Vec<u64>]) {
    if acc.is_empty() {
        acc.extend(counts.iter().map(|c| vec![0; c.len()]));
    }
    for (a, c) in acc.iter_mut().zip(counts) {
        for (x, y) in a.iter_mut().zip(c) {
            *x += y;
        }
    }
}

fn sum(g: &ProcessGroup, v: &mut [f32]) {
    g.all_reduce(v, ReduceOp::Sum).unwrap();
}

struct Layout {
    dp: usize,
    tp: usize,
    ep: usize,
    sp: bool,
    moe: bool,
}

/// Runs `layout` on thread ranks and checks each against the oracle.
fn check(layout: Layout) {
    let Layout {
        dp,
        tp,
        ep,
        sp,
        moe,
    } = layout;
    let want = Arc::new(oracle(dp, moe));
    let mesh = DeviceMesh::new(MeshSizes { dp, pp: 1, tp, ep }, dp * tp).unwrap();
    let ranks: Vec<_> = thread_world(dp * tp, Duration::from_secs(30))
        .into_iter()
        .map(|world| {
            let (mesh, want) = (mesh.clone(), want.clone());
            thread::spawn(move || rank(&mesh, &world, sp, moe, &want))
        })
        .collect();
    for r in ranks {
        r.join().unwrap();
    }
}

fn rank(mesh: &DeviceMesh, world: &ProcessGroup, sp: bool, moe: bool, want: &Oracle) {
    let groups = mesh.groups(world).unwrap();
    let (tp, ep) = (groups.tp.clone(), groups.ep.clone());
    let shard = ModelShard {
        tp: tp.size(),
        tp_rank: tp.rank(),
        sequence_parallel: sp,
        ep: ep.size(),
        ep_rank: ep.rank(),
    };
    let bd = ShardBoundaries::new(
        shard,
        CommHandle::new(tp.clone()),
        CommHandle::new(ep.clone()),
    );
    let device = Device::flex().autodiff();
    let c = config(moe);
    let mut model =
        Qwen3Model::new_sharded(c.clone(), &mut init(&c), Arc::new(bd.clone()), &device).unwrap();
    let o = forward(
        &model,
        &batch(groups.dp.rank(), &device),
        (groups.dp.size() * 14) as f32,
    );
    let grads = o.loss.backward();
    bd.take_error().unwrap();
    // Under sequence parallelism the tensor-parallel ranks hold disjoint tokens: their router
    // shares and counts add up; the LM loss is every tensor-parallel rank's alike.
    let token_owners = shard.sequence_parallel().then_some(&*tp);
    let mut values = [o.lm, o.aux];
    groups.dp.all_reduce(&mut values, ReduceOp::Sum).unwrap();
    if let Some(g) = token_owners {
        g.all_reduce(&mut values[1..], ReduceOp::Sum).unwrap();
    }
    let what = format!(
        "rank {} (tp {} ep {})",
        world.rank(),
        shard.tp_rank,
        shard.ep_rank
    );
    assert!(
        (values[0] - want.0).abs() < 1e-5,
        "{what}: lm {} vs {}",
        values[0],
        want.0
    );
    assert!(
        (values[1] - want.1).abs() < 1e-5,
        "{what}: aux {} vs {}",
        values[1],
        want.1
    );
    let mut counts: Vec<i64> = o.counts.iter().flatten().map(|&c| c as i64).collect();
    groups.dp.all_reduce(&mut counts, ReduceOp::Sum).unwrap();
    if let Some(g) = token_owners {
        g.all_reduce(&mut counts, ReduceOp::Sum).unwrap();
    }
    let want_counts: Vec<i64> = want.2.iter().flatten().map(|&c| c as i64).collect();
    assert_eq!(counts, want_counts, "{what}: router counts");
    for (name, (dims, mut g)) in grads_of(&mut model, &grads) {
        let plan = shard.plan(&name);
        let parts_group = if plan.expert {
            sum(&groups.edp, &mut g);
            &*ep
        } else {
            if plan.tp_partial {
                sum(&tp, &mut g);
            }
            sum(&groups.dp, &mut g);
            &*tp
        };
        if let Placement::Split(s) = plan.placement {
            g = join_parts(&parts_group.all_gather(&g).unwrap(), s.parts, &dims, s.dim);
        }
        let w = &want.3[&name];
        assert_eq!(g.len(), w.len(), "{what}: {name}");
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= TOL * b.abs().max(1.0),
                "{what}: d {name}[{i}] = {a}, one rank {b}"
            );
        }
    }
}

#[test]
fn tp2_dense_without_and_with_sequence_parallelism() {
    for sp in [false, true] {
        check(Layout {
            dp: 1,
            tp: 2,
            ep: 1,
            sp,
            moe: false,
        });
    }
}

#[test]
fn tp2_moe_with_sequence_parallelism() {
    check(Layout {
        dp: 1,
        tp: 2,
        ep: 1,
        sp: true,
        moe: true,
    });
}

#[test]
fn dp2_ep2() {
    check(Layout {
        dp: 2,
        tp: 1,
        ep: 2,
        sp: false,
        moe: true,
    });
}

#[test]
fn tp2_ep2_folded_over_the_tensor_group() {
    check(Layout {
        dp: 1,
        tp: 2,
        ep: 2,
        sp: true,
        moe: true,
    });
}

#[test]
fn dp2_tp2_ep4() {
    check(Layout {
        dp: 2,
        tp: 2,
        ep: 4,
        sp: true,
        moe: true,
    });
}
