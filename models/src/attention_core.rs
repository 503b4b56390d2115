//! Causal attention whose backward recomputes the probabilities instead of keeping them.
//!
//! Autodiff through `softmax(q·kᵀ)·v` keeps every layer's `[heads, seq, seq]` scores and
//! probabilities until backward: at seq 4096 most of a step's memory. This op keeps only
//! q, k, v and the mask, and works on blocks of query positions, so forward and backward hold
//! one block's scores at a time; a block skips the keys after its last query, which the causal
//! mask blocks for all its rows. The arithmetic is the plain expression's (the reference the
//! tests compare against): scores in the matmul dtype, the scale applied in f32 and rounded
//! once, softmax in f32 with the additive mask, probabilities rounded to the matmul dtype for
//! the product with v. Backward sums the k and v gradients over blocks in f32.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
#[cfg(feature = "cuda")]
use burn::backend::Cube;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, TensorMetadata};
use burn::tensor::{DType, FloatDType, Shape, Slice, Tensor};
use burn_flex::FlexTensor;

use crate::backward::register_input_grads;
use crate::flex_buffers::{dense, f32_tensor, slice};

/// f32 scores one block may hold, in bytes: a few such tensors live at once in backward.
const BLOCK_BYTES: usize = 256 << 20;

/// Causal attention over GQA groups: `q [b, g, rep, s, hd]` (query heads g·rep..(g+1)·rep
/// share kv head g), `k, v [b, g, s, hd]`, all in the matmul dtype; `bias [b, 1, 1, s, s]`
/// f32, 0 where allowed and -inf where blocked, with every key after its query blocked.
/// Returns `[b, g, rep, s, hd]` in v's dtype. `block` is the number of query positions per
/// block; [`block_positions`] gives the default.
pub fn causal_attention(
    q: Tensor<5>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Tensor<5>,
    scale: f64,
    block: usize,
) -> Tensor<5> {
    let out = <Dispatch as CausalAttentionOps>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
        scale,
        block,
    );
    Tensor::from_dispatch(out)
}

/// Query positions per block so that one block's f32 scores stay within [`BLOCK_BYTES`].
pub fn block_positions(q_dims: [usize; 5]) -> usize {
    let [b, g, rep, s, _] = q_dims;
    (BLOCK_BYTES / (b * g * rep * s * 4).max(1)).clamp(1, s.max(1))
}

#[backend_extension(Flex, Cube: cfg(feature = "cuda"), Autodiff)]
pub trait CausalAttentionOps: Backend {
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
        block: usize,
    ) -> FloatTensor<Self> {
        let [b, g, rep, s, hd] = q.shape().dims::<5>();
        let dtype = FloatDType::from(v.dtype());
        let outs = blocks(s, block)
            .map(|(t0, t1)| {
                let c = t1 - t0;
                let probs = cast::<Self>(block_probs::<Self>(&q, &k, &bias, scale, t0, t1), dtype);
                let probs = Self::float_reshape(probs, Shape::new([b, g, rep * c, t1]));
                let out = Self::float_matmul(probs, keys::<Self>(&v, t1));
                Self::float_reshape(out, Shape::new([b, g, rep, c, hd]))
            })
            .collect();
        Self::float_cat(outs, 3)
    }

    /// `softmax(scores·scale + mask)` over the last dimension, in f32: `scores [b, g, rep, c,
    /// t1]` in the matmul dtype (the scale applied in f32 and rounded once to it), `mask [b,
    /// 1, 1, c, t1]` f32.
    fn attention_probs(
        scores: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        attention_probs_expression::<Self>(scores, mask, scale)
    }

    /// The gradient of the scores (in `d_probs`' dtype, the matmul dtype) given the f32
    /// probabilities and their gradient.
    fn attention_probs_backward(
        probs: FloatTensor<Self>,
        d_probs: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        attention_probs_backward_expression::<Self>(probs, d_probs, scale)
    }
}

/// f32 on the CPU: one moeru-kernels pass each way (scale, mask and softmax together).
impl CausalAttentionOps for Flex {
    fn attention_probs(scores: FlexTensor, mask: FlexTensor, scale: f64) -> FlexTensor {
        if scores.dtype() != DType::F32 || mask.dtype() != DType::F32 {
            return attention_probs_expression::<Self>(scores, mask, scale);
        }
        let scores = dense(scores);
        let shape = scores.layout().shape().clone();
        let [_, g, rep, c, t1] = shape.dims::<5>();
        let mask = match mask.layout().strides()[4] {
            1 => mask,
            _ => mask.to_contiguous(),
        };
        let (strides, batches) = (mask.layout().strides(), mask.layout().shape()[0]);
        let rows = moeru_kernels::MaskRows {
            data: mask.storage::<f32>(),
            offset: mask.layout().start_offset(),
            batch_stride: if batches == 1 { 0 } else { strides[0] as usize },
            row_stride: strides[3] as usize,
            rows: c,
            heads: g * rep,
        };
        let mut probs = vec![0.0f32; shape.num_elements()];
        moeru_kernels::masked_softmax_rows(slice(&scores), t1, scale as f32, rows, &mut probs);
        f32_tensor(probs, shape)
    }

    fn attention_probs_backward(probs: FlexTensor, d_probs: FlexTensor, scale: f64) -> FlexTensor {
        if d_probs.dtype() != DType::F32 || probs.dtype() != DType::F32 {
            return attention_probs_backward_expression::<Self>(probs, d_probs, scale);
        }
        let (probs, d_probs) = (dense(probs), dense(d_probs));
        let shape = probs.layout().shape().clone();
        let width = shape[shape.num_dims() - 1];
        let mut d_scores = vec![0.0f32; shape.num_elements()];
        let (p, dp) = (slice(&probs), slice(&d_probs));
        moeru_kernels::softmax_backward_rows(p, dp, width, scale as f32, &mut d_scores);
        f32_tensor(d_scores, shape)
    }
}

/// [`CausalAttentionOps::attention_probs`] in backend ops.
fn attention_probs_expression<B: Backend>(
    scores: FloatTensor<B>,
    mask: FloatTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    let dtype = FloatDType::from(scores.dtype());
    let scores = cast::<B>(scaled::<B>(scores, scale, dtype), FloatDType::F32);
    B::softmax(B::float_add(scores, mask), 4)
}

/// [`CausalAttentionOps::attention_probs_backward`] in backend ops.
fn attention_probs_backward_expression<B: Backend>(
    probs: FloatTensor<B>,
    d_probs: FloatTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    let dtype = FloatDType::from(d_probs.dtype());
    let d_probs = cast::<B>(d_probs, FloatDType::F32);
    // Softmax: d_scores = p ⊙ (dp − Σ p ⊙ dp) over keys; the mask is a constant.
    let dot = B::float_sum_dim(B::float_mul(probs.clone(), d_probs.clone()), 4);
    let d_scores = B::float_mul(probs, B::float_sub(d_probs, dot));
    // Back through the cast to f32 and the scaling.
    scaled::<B>(cast::<B>(d_scores, dtype), scale, dtype)
}
#[cfg(feature = "cuda")]
impl CausalAttentionOps for Cube {}

/// `[t0, t1)` ranges of `block` query positions covering `0..s`.
fn blocks(s: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    let block = block.max(1);
    (0..s)
        .step_by(block)
        .map(move |t0| (t0, (t0 + block).min(s)))
}

fn range(t0: usize, t1: usize) -> Slice {
    Slice::new(t0 as isize, Some(t1 as isize), 1)
}

/// `x` in `dtype`, without a copy when it already is.
fn cast<B: Backend>(x: FloatTensor<B>, dtype: FloatDType) -> FloatTensor<B> {
    match x.dtype() == DType::from(dtype) {
        true => x,
        false => B::float_cast(x, dtype),
    }
}

/// `x · s` computed in f32 and rounded once to `dtype`, as torch scales a bf16 tensor by a
/// Python float (precision::scale).
fn scaled<B: Backend>(x: FloatTensor<B>, s: f64, dtype: FloatDType) -> FloatTensor<B> {
    cast::<B>(
        B::float_mul_scalar(cast::<B>(x, FloatDType::F32), s.into()),
        dtype,
    )
}

/// Keys (or values) `0..t1` of `[b, g, s, hd]`.
fn keys<B: Backend>(k: &FloatTensor<B>, t1: usize) -> FloatTensor<B> {
    let all = Slice::full();
    B::float_slice(k.clone(), &[all, all, range(0, t1), all])
}

/// Query positions `t0..t1` of `[b, g, rep, s, hd]` as `[b, g, rep·c, hd]`.
fn queries<B: Backend>(q: &FloatTensor<B>, t0: usize, t1: usize) -> FloatTensor<B> {
    let [b, g, rep, _, hd] = q.shape().dims::<5>();
    let all = Slice::full();
    let block = B::float_slice(q.clone(), &[all, all, all, range(t0, t1), all]);
    B::float_reshape(block, Shape::new([b, g, rep * (t1 - t0), hd]))
}

/// The f32 probabilities `[b, g, rep, c, t1]` of query positions `t0..t1` over keys `0..t1`.
fn block_probs<B: CausalAttentionOps>(
    q: &FloatTensor<B>,
    k: &FloatTensor<B>,
    bias: &FloatTensor<B>,
    scale: f64,
    t0: usize,
    t1: usize,
) -> FloatTensor<B> {
    let [b, g, rep, _, _] = q.shape().dims::<5>();
    let scores = B::float_matmul(
        queries::<B>(q, t0, t1),
        B::float_transpose(keys::<B>(k, t1)),
    );
    let scores = B::float_reshape(scores, Shape::new([b, g, rep, t1 - t0, t1]));
    let all = Slice::full();
    let mask = B::float_slice(bias.clone(), &[all, all, all, range(t0, t1), range(0, t1)]);
    B::attention_probs(scores, mask, scale)
}

/// Gradients of q, k and v (in their dtypes) given the output's gradient `grad`.
fn causal_attention_backward<B: CausalAttentionOps>(
    [q, k, v, bias]: [FloatTensor<B>; 4],
    scale: f64,
    block: usize,
    grad: FloatTensor<B>,
) -> [FloatTensor<B>; 3] {
    let [b, g, rep, s, hd] = q.shape().dims::<5>();
    let dtype = FloatDType::from(q.dtype());
    let device = q.device();
    let f32_zeros = || B::float_zeros(Shape::new([b, g, s, hd]), &device, FloatDType::F32);
    let (mut dk, mut dv, mut dq) = (None, None, Vec::new());
    let all = Slice::full();
    // Sums a block's part (keys 0..t1) into the f32 gradient; a part over every key, as
    // the one block of a short sequence is, becomes the gradient without a zeroed buffer.
    let accumulate = |acc: Option<FloatTensor<B>>, part: FloatTensor<B>, t1: usize| {
        let part = cast::<B>(part, FloatDType::F32);
        if acc.is_none() && t1 == s {
            return Some(part);
        }
        let acc = acc.unwrap_or_else(f32_zeros);
        let at = [all, all, range(0, t1), all];
        let sum = B::float_add(B::float_slice(acc.clone(), &at), part);
        Some(B::float_slice_assign(acc, &at, sum))
    };
    for (t0, t1) in blocks(s, block) {
        let rows = rep * (t1 - t0);
        let probs = block_probs::<B>(&q, &k, &bias, scale, t0, t1);
        let d_out = queries::<B>(&grad, t0, t1);
        // out = cast(probs)·v
        let probs_mm = B::float_reshape(
            cast::<B>(probs.clone(), dtype),
            Shape::new([b, g, rows, t1]),
        );
        let dv_part = B::float_matmul(B::float_transpose(probs_mm), d_out.clone());
        dv = accumulate(dv, dv_part, t1);
        let d_probs = B::float_matmul(d_out, B::float_transpose(keys::<B>(&v, t1)));
        let d_probs = B::float_reshape(d_probs, Shape::new([b, g, rep, t1 - t0, t1]));
        let d_scores = B::attention_probs_backward(probs, d_probs, scale);
        let d_scores = B::float_reshape(d_scores, Shape::new([b, g, rows, t1]));
        let dq_part = B::float_matmul(d_scores.clone(), keys::<B>(&k, t1));
        dq.push(B::float_reshape(
            dq_part,
            Shape::new([b, g, rep, t1 - t0, hd]),
        ));
        let dk_part = B::float_matmul(B::float_transpose(d_scores), queries::<B>(&q, t0, t1));
        dk = accumulate(dk, dk_part, t1);
    }
    let dq = match dq.len() {
        1 => dq.pop().expect("one block"),
        _ => B::float_cat(dq, 3),
    };
    let (dk, dv) = (dk.unwrap_or_else(f32_zeros), dv.unwrap_or_else(f32_zeros));
    [dq, cast::<B>(dk, dtype), cast::<B>(dv, dtype)]
}

#[derive(Debug)]
struct CausalAttentionBackward;

impl<B: CausalAttentionOps> Backward<B, 3> for CausalAttentionBackward {
    /// q, k, v, bias, scale, block.
    type State = ([FloatTensor<B>; 4], f64, usize);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (inputs, scale, block) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let input_grads = causal_attention_backward::<B>(inputs, scale, block, grad);
        let parents = ops.parents.map(|p| p.map(|node| node.id));
        register_input_grads::<B, _>(parents, input_grads, grads);
    }
}

impl<B: Backend + CausalAttentionOps, C: CheckpointStrategy> CausalAttentionOps for Autodiff<B, C> {
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
        block: usize,
    ) -> FloatTensor<Self> {
        let nodes = [q.node(), k.node(), v.node()];
        let [q, k, v, bias] = [q, k, v, bias].map(|t| t.into_primitive());
        let run = |q, k, v, bias| B::causal_attention(q, k, v, bias, scale, block);
        match CausalAttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (
                    [q.clone(), k.clone(), v.clone(), bias.clone()],
                    scale,
                    block,
                );
                prep.finish(state, run(q, k, v, bias))
            }
            OpsKind::UnTracked(prep) => prep.finish(run(q, k, v, bias)),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{activation::softmax, Device, FloatDType, Tensor};

    use super::{block_positions, causal_attention};
    use crate::precision::{cast_to, like, scale, to_f32};
    use crate::test_values::values;
    use crate::Batch;

    const DIMS: [usize; 5] = [2, 2, 3, 7, 4];

    /// The plain expression, autodiff through every op (the attention before this op).
    fn reference(q: Tensor<5>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<5>, s: f64) -> Tensor<5> {
        let [b, g, rep, n, hd] = q.dims();
        let scores = q.reshape([b, g, rep * n, hd]).matmul(k.swap_dims(2, 3));
        let scores = to_f32(scale(scores, s)).reshape([b, g, rep, n, n]) + bias;
        let probs = softmax(scores, 4).reshape([b, g, rep * n, n]);
        like(probs, &v).matmul(v).reshape([b, g, rep, n, hd])
    }

    /// The model's own mask (Batch::attention_block_mask) with two documents in the second
    /// sequence (positions 0..3 and 3..7), as the additive bias the model builds.
    fn mask_bias(device: &Device) -> Tensor<5> {
        let [b, _, _, n, _] = DIMS;
        let positions = [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3]].concat();
        let documents = [[0; 7], [0, 0, 0, 1, 1, 1, 1]].concat();
        let batch = Batch::packed(&[0; 14], &positions, &documents, b, n, device);
        Tensor::<3>::zeros([b, n, n], device)
            .mask_fill(batch.attention_block_mask(), f32::NEG_INFINITY)
            .reshape([b, 1, 1, n, n])
    }

    /// Output and the gradients of q, k, v under a weighted sum, as f32 vectors.
    fn run(blocked: Option<usize>, dtype: FloatDType) -> [Vec<f32>; 4] {
        let device = Device::flex().autodiff();
        let [b, g, _, n, hd] = DIMS;
        let leaf = |t: Tensor<5>| cast_to(t, dtype).detach().require_grad();
        let leaf4 = |t: Tensor<4>| cast_to(t, dtype).detach().require_grad();
        let q = leaf(values(DIMS, 1, &device));
        let k = leaf4(values([b, g, n, hd], 2, &device));
        let v = leaf4(values([b, g, n, hd], 3, &device));
        let bias = mask_bias(&device);
        let s = (hd as f64).powf(-0.5);
        let out = match blocked {
            Some(block) => causal_attention(q.clone(), k.clone(), v.clone(), bias, s, block),
            None => reference(q.clone(), k.clone(), v.clone(), bias, s),
        };
        let w = values(DIMS, 4, &device);
        let grads = (to_f32(out.clone()) * w).sum().backward();
        let vec = |t: Tensor<5>| to_f32(t).into_data().try_to_vec::<f32>().unwrap();
        let vec4 = |t: Tensor<4>| to_f32(t).into_data().try_to_vec::<f32>().unwrap();
        let grad = |t: &Tensor<4>| vec4(t.grad(&grads).unwrap());
        [vec(out), vec(q.grad(&grads).unwrap()), grad(&k), grad(&v)]
    }

    fn assert_close(got: &[Vec<f32>; 4], want: &[Vec<f32>; 4], tol: f32, what: &str) {
        for (i, name) in ["output", "dq", "dk", "dv"].iter().enumerate() {
            for (j, (a, b)) in got[i].iter().zip(&want[i]).enumerate() {
                let err = (a - b).abs() / b.abs().max(1.0);
                assert!(err <= tol, "{what}: {name}[{j}] = {a}, reference {b}");
            }
        }
    }

    #[test]
    fn matches_the_plain_expression_in_f32_for_any_block() {
        let want = run(None, FloatDType::F32);
        for block in [7, 3, 2, 1, 100] {
            assert_close(
                &run(Some(block), FloatDType::F32),
                &want,
                1e-5,
                &format!("block {block}"),
            );
        }
    }

    #[test]
    fn matches_the_plain_expression_in_bf16() {
        let want = run(None, FloatDType::BF16);
        // The softmax backward is one fused formula here and burn's composite there, so f32
        // roundings differ and may flip a bf16 rounding; blocks also sum k and v gradients in f32.
        for block in [7, 3] {
            assert_close(
                &run(Some(block), FloatDType::BF16),
                &want,
                2e-2,
                &format!("block {block}"),
            );
        }
    }

    #[test]
    fn runs_without_autodiff() {
        let device = Device::flex();
        let [b, g, _, n, hd] = DIMS;
        let out = causal_attention(
            values(DIMS, 1, &device),
            values([b, g, n, hd], 2, &device),
            values([b, g, n, hd], 3, &device),
            mask_bias(&device),
            0.5,
            2,
        );
        assert_eq!(out.dims(), DIMS);
    }

    #[test]
    fn blocks_fit_the_budget() {
        assert_eq!(block_positions([1, 4, 8, 4096, 128]), 512);
        assert_eq!(block_positions([2, 2, 3, 7, 4]), 7);
    }
}
