//! The tensor collectives over thread ranks, each rank with its own tensors: every op's forward
//! against values computed here and its backward against the adjoint identity
//! Σ_r ⟨op(x)_r, g_r⟩ = Σ_r ⟨x_r, op*(g)_r⟩; a peer gone inside a backward; the collective count
//! under gradient checkpointing; bf16; and the ops without autodiff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::{DType, Device, FloatDType, GradientCheckpointingStrategy, Tensor, TensorData};
use moeru_parallel::{
    all_reduce_max, all_to_all_rows, sp_gather, sp_reduce_scatter, thread_world, tp_copy,
    tp_reduce, CommHandle, ReduceOp,
};

const COLS: usize = 3;

/// Runs `f(rank, handle)` on every rank of a thread world in its own thread; results in rank
/// order.
fn on_ranks<T: Send + 'static>(
    n: usize,
    timeout: Duration,
    f: impl Fn(usize, CommHandle) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = thread_world(n, timeout)
        .into_iter()
        .enumerate()
        .map(|(r, g)| {
            let f = f.clone();
            std::thread::spawn(move || f(r, CommHandle::new(Arc::new(g))))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Deterministic values in [-1, 1), a different stream per seed.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn tensor(v: Vec<f32>, rows: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v, [rows, COLS]), device)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Copy,
    Reduce,
    Gather,
    ReduceScatter,
    AllToAll,
}

const OPS: [Op; 5] = [
    Op::Copy,
    Op::Reduce,
    Op::Gather,
    Op::ReduceScatter,
    Op::AllToAll,
];

/// Rows rank `r` sends to rank `j` in the all-to-all: unequal, 0 from rank 0 to rank 1.
fn a2a_rows(r: usize, j: usize) -> usize {
    (r + 2 * j + 1) % 3
}

/// Input and output rows of `op` on rank `r` of `n`.
fn rows(op: Op, r: usize, n: usize) -> (usize, usize) {
    match op {
        Op::Copy | Op::Reduce => (4, 4),
        Op::Gather => (2, 2 * n),
        Op::ReduceScatter => (2 * n, 2),
        Op::AllToAll => (
            (0..n).map(|j| a2a_rows(r, j)).sum(),
            (0..n).map(|j| a2a_rows(j, r)).sum(),
        ),
    }
}

fn apply(op: Op, x: Tensor<2>, r: usize, h: &CommHandle) -> Tensor<2> {
    let n = h.size();
    match op {
        Op::Copy => tp_copy(x, h),
        Op::Reduce => tp_reduce(x, h),
        Op::Gather => sp_gather(x, h),
        Op::ReduceScatter => sp_reduce_scatter(x, h),
        Op::AllToAll => {
            let send: Vec<usize> = (0..n).map(|j| a2a_rows(r, j)).collect();
            let recv: Vec<usize> = (0..n).map(|j| a2a_rows(j, r)).collect();
            all_to_all_rows(x, &send, &recv, h)
        }
    }
}

/// What `op` gives rank `r`, computed from every rank's input `xs`.
fn expected(op: Op, xs: &[Vec<f32>], r: usize) -> Vec<f32> {
    let n = xs.len();
    let sum = || -> Vec<f32> {
        (0..xs[0].len())
            .map(|i| xs.iter().map(|x| x[i]).sum())
            .collect()
    };
    match op {
        Op::Copy => xs[r].clone(),
        Op::Reduce => sum(),
        Op::Gather => xs.concat(),
        Op::ReduceScatter => sum()[2 * r * COLS..2 * (r + 1) * COLS].to_vec(),
        Op::AllToAll => (0..n)
            .flat_map(|j| {
                let start: usize = (0..r).map(|k| a2a_rows(j, k)).sum();
                xs[j][start * COLS..(start + a2a_rows(j, r)) * COLS].to_vec()
            })
            .collect(),
    }
}

/// One rank's run of `op`: its input, output, and (under autodiff) the dots summed over
/// ranks, `[Σ ⟨y, g⟩, Σ ⟨x, ∂(y·g)/∂x⟩]`.
struct RankRun {
    x: Vec<f32>,
    y: Vec<f32>,
    dots: Option<[f64; 2]>,
}

fn run_rank(op: Op, r: usize, h: &CommHandle, autodiff: bool) -> RankRun {
    let device = match autodiff {
        true => Device::flex().autodiff(),
        false => Device::flex(),
    };
    let (rows_in, rows_out) = rows(op, r, h.size());
    // tp_copy's input and tp_reduce's output (hence its cotangent) are one value replicated
    // over the group: the adjoint identity counts them once.
    let copy = matches!(op, Op::Copy);
    let reduce = matches!(op, Op::Reduce);
    let xv = values(rows_in * COLS, if copy { 1 } else { 1 + r as u64 });
    let x = tensor(xv.clone(), rows_in, &device);
    let x = if autodiff { x.require_grad() } else { x };
    let y = apply(op, x.clone(), r, h);
    assert_eq!(y.dims(), [rows_out, COLS], "{op:?} output on rank {r}");
    let yv = host(y.clone());
    let dots = autodiff.then(|| {
        let gv = values(rows_out * COLS, if reduce { 100 } else { 100 + r as u64 });
        let grads = (y * tensor(gv.clone(), rows_out, &device)).sum().backward();
        let grad = host(x.grad(&grads).expect("x has a gradient"));
        let mut dots = [dot(&yv, &gv), dot(&xv, &grad)];
        h.group().all_reduce(&mut dots, ReduceOp::Sum).unwrap();
        let n = h.size() as f64;
        if copy {
            dots[1] /= n;
        }
        if reduce {
            dots[0] /= n;
        }
        dots
    });
    h.take_error().unwrap();
    RankRun { x: xv, y: yv, dots }
}

/// Every op on `n` ranks: forward values, and the adjoint identity under autodiff.
fn check_ops(n: usize, autodiff: bool) {
    for op in OPS {
        let runs = on_ranks(n, Duration::from_secs(20), move |r, h| {
            run_rank(op, r, &h, autodiff)
        });
        let xs: Vec<Vec<f32>> = runs.iter().map(|run| run.x.clone()).collect();
        for (r, run) in runs.iter().enumerate() {
            let want = expected(op, &xs, r);
            for (i, (a, b)) in run.y.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6,
                    "{op:?} n={n} rank {r} [{i}]: {a} vs {b}"
                );
            }
            if let Some([lhs, rhs]) = run.dots {
                let rel = (lhs - rhs).abs() / lhs.abs().max(rhs.abs());
                eprintln!(
                    "{op:?} n={n} rank {r}: Σ⟨y,g⟩ = {lhs:.9}, Σ⟨x,grad⟩ = {rhs:.9}, rel {rel:.1e}"
                );
                assert!(rel <= 1e-5, "{op:?} n={n}: {lhs} vs {rhs}");
            }
        }
    }
}

#[test]
fn each_op_is_the_adjoint_of_its_backward() {
    for n in [1, 2, 4] {
        check_ops(n, true);
    }
}

#[test]
fn ops_run_without_autodiff() {
    check_ops(2, false);
    // A 3-d tensor through the dimension-generic tp ops.
    let outs = on_ranks(2, Duration::from_secs(20), |r, h| {
        let device = Device::flex();
        let x = Tensor::<3>::from_data(TensorData::new(values(12, r as u64), [2, 2, 3]), &device);
        let (copy, sum) = (tp_copy(x.clone(), &h), tp_reduce(x.clone(), &h));
        (host(x), host(copy), host(sum))
    });
    for (x, copy, sum) in &outs {
        assert_eq!(x, copy);
        let want: Vec<f32> = (0..12).map(|i| outs[0].0[i] + outs[1].0[i]).collect();
        assert_eq!(sum, &want);
    }
}

#[test]
fn all_reduce_max_is_the_elementwise_max_and_detached() {
    let outs = on_ranks(4, Duration::from_secs(20), |r, h| {
        let x = tensor(values(6, 7 + r as u64), 2, &Device::flex().autodiff()).require_grad();
        let m = all_reduce_max(x.clone(), &h);
        assert!(!m.is_require_grad());
        let traffic = h.group().traffic()["all_reduce"];
        (host(x), host(m), traffic.calls, traffic.payload_bytes)
    });
    let want: Vec<f32> = (0..6)
        .map(|i| outs.iter().map(|o| o.0[i]).fold(f32::MIN, f32::max))
        .collect();
    for (_, m, calls, payload) in outs {
        assert_eq!((m, calls, payload), (want.clone(), 1, 24));
    }
}

#[test]
fn bf16_moves_as_bf16_is_summed_in_f32_and_returned_as_bf16() {
    let outs = on_ranks(2, Duration::from_secs(20), |r, h| {
        let device = Device::flex().autodiff();
        let x = tensor(values(6, 3 + r as u64), 2, &device).cast(FloatDType::BF16);
        let x = x.require_grad();
        let y = tp_reduce(tp_copy(x.clone(), &h), &h);
        assert_eq!(y.dtype(), DType::BF16);
        let grads = y.clone().sum().backward();
        let grad = x.grad(&grads).unwrap();
        assert_eq!(grad.dtype(), DType::BF16);
        // Forward and backward each all-reduce 6 bf16 values: 12 bytes, not f32's 24.
        let t = h.group().traffic()["all_reduce"];
        assert_eq!((t.calls, t.payload_bytes, t.wire_bytes), (2, 24, 24));
        (host(x), host(y), host(grad))
    });
    for (_, y, grad) in &outs {
        for (i, got) in y.iter().enumerate() {
            let want = burn::tensor::bf16::from_f32(outs[0].0[i] + outs[1].0[i]).to_f32();
            assert_eq!(*got, want);
        }
        // d/dx of Σ tp_reduce(tp_copy(x)): tp_copy's backward sums the ones over both ranks.
        assert_eq!(grad, &vec![2.0; 6]);
    }
}

/// Rank 1 runs tp_copy's forward, then leaves (`abort`: says so; otherwise it just returns);
/// rank 0's backward must come back within the timeout with the error in its handle.
fn peer_leaves_before_backward(abort: bool) {
    let timeout = Duration::from_secs(2);
    let outs = on_ranks(2, timeout, move |r, h| {
        let device = Device::flex().autodiff();
        let x = tensor(values(6, 1), 2, &device).require_grad();
        let y = tp_copy(x.clone(), &h);
        if r == 1 {
            if abort {
                h.group().abort("rank 1 leaves");
            }
            return None;
        }
        let start = Instant::now();
        let grads = (y * 3.0).sum().backward();
        let elapsed = start.elapsed();
        let grad = host(x.grad(&grads).unwrap());
        // Held error: the next op returns zeros at once, without communicating.
        let calls = h.group().traffic()["all_reduce"].calls;
        let start = Instant::now();
        let later = host(tp_reduce(x.detach(), &h));
        let later_elapsed = start.elapsed();
        assert_eq!(h.group().traffic()["all_reduce"].calls, calls);
        let err = h.take_error().unwrap_err().to_string();
        h.take_error().unwrap();
        Some((elapsed, later_elapsed, grad, later, err))
    });
    let (elapsed, later_elapsed, grad, later, err) = outs[0].clone().unwrap();
    eprintln!("abort={abort}: backward returned after {elapsed:?}: {err}");
    assert!(elapsed < timeout + Duration::from_secs(3), "{elapsed:?}");
    assert!(
        later_elapsed < Duration::from_millis(500),
        "{later_elapsed:?}"
    );
    assert_eq!((grad, later), (vec![0.0; 6], vec![0.0; 6]));
    assert!(
        err.contains("tp_copy backward (all_reduce) on group `world`"),
        "{err}"
    );
}

#[test]
fn a_peer_gone_inside_backward_is_an_error_not_a_hang() {
    peer_leaves_before_backward(false);
    peer_leaves_before_backward(true);
}

#[test]
fn bad_sizes_are_errors_naming_the_op() {
    let errs = on_ranks(2, Duration::from_secs(2), |_, h| {
        let y = sp_reduce_scatter(tensor(values(9, 1), 3, &Device::flex()), &h);
        assert_eq!((y.dims(), host(y)), ([1, COLS], vec![0.0; COLS]));
        h.take_error().unwrap_err().to_string()
    });
    for e in errs {
        assert!(
            e.contains("sp_reduce_scatter (reduce_scatter) on group `world`"),
            "{e}"
        );
        assert!(e.contains("3 rows do not split into 2 equal chunks"), "{e}");
    }
    let errs = on_ranks(1, Duration::from_secs(2), |_, h| {
        let y = all_to_all_rows(tensor(values(6, 1), 2, &Device::flex()), &[2], &[1], &h);
        assert_eq!(y.dims(), [1, COLS]);
        h.take_error().unwrap_err().to_string()
    });
    assert!(
        errs[0].contains("all_to_all_rows (all_to_all)"),
        "{}",
        errs[0]
    );
}

/// A graph with the tp ops between memory-bound ops; returns x's gradient.
fn tp_block(h: &CommHandle, device: &Device) -> Vec<f32> {
    let x = tensor(values(12, 5 + h.rank() as u64), 4, device).require_grad();
    let a = (x.clone() * 0.5).exp() + 1.0;
    let b = tp_copy(a, h);
    let c = (b.clone() * b).tanh();
    let d = tp_reduce(c, h);
    let grads = (d.exp() * 0.25).sum().backward();
    host(x.grad(&grads).unwrap())
}

#[test]
fn checkpointing_does_not_recompute_collectives() {
    let outs = on_ranks(2, Duration::from_secs(20), |_, h| {
        let checkpointed = Device::flex().autodiff().gradient_checkpointing();
        assert_eq!(
            checkpointed.gradient_checkpointing_strategy(),
            Some(GradientCheckpointingStrategy::Balanced)
        );
        let calls = || h.group().traffic().get("all_reduce").map_or(0, |t| t.calls);
        let plain_grad = tp_block(&h, &Device::flex().autodiff());
        let plain = calls();
        let grad = tp_block(&h, &checkpointed);
        h.take_error().unwrap();
        (plain, calls() - plain, plain_grad, grad)
    });
    for (plain, checkpointed, plain_grad, grad) in outs {
        eprintln!("all_reduce calls: {plain} plain, {checkpointed} checkpointed");
        // One in tp_reduce's forward, one in tp_copy's backward.
        assert_eq!((plain, checkpointed), (2, 2));
        assert_eq!(plain_grad, grad);
    }
}

#[test]
fn size_one_groups_are_identities_and_counted() {
    let outs = on_ranks(1, Duration::from_secs(2), |_, h| {
        let x = tensor(values(6, 1), 2, &Device::flex().autodiff()).require_grad();
        let y = sp_gather(
            sp_reduce_scatter(tp_reduce(tp_copy(x.clone(), &h), &h), &h),
            &h,
        );
        let y = all_to_all_rows(y, &[2], &[2], &h);
        let grads = (y.clone() * 2.0).sum().backward();
        let traffic = h.group().traffic();
        (
            host(x.clone()),
            host(y),
            host(x.grad(&grads).unwrap()),
            traffic,
        )
    });
    let (x, y, grad, traffic) = &outs[0];
    assert_eq!((y, grad), (x, &vec![2.0; 6]));
    for (op, calls) in [
        ("all_reduce", 2),
        ("reduce_scatter", 2),
        ("all_gather", 2),
        ("all_to_all", 2),
    ] {
        let t = traffic[op];
        assert_eq!(
            (t.calls, t.payload_bytes, t.wire_bytes),
            (calls, calls * 24, 0),
            "{op}"
        );
    }
}
