//! The key/value cache of generation: each layer's keys and values (after QK-norm and RoPE,
//! in the matmul dtype) for every position seen so far, so a decode step runs only the new
//! tokens through the model.
//!
//! The buffers are allocated once, at the prefill, for every position the generation can
//! reach (`capacity`), and each step writes its keys and values in place (`slice_assign` on
//! a uniquely held buffer is a copy of the new rows only); attention reads the filled prefix
//! through a `narrow` view. Growing by concatenation instead copied the whole cache every
//! step: quadratic in the generated length.
//!
//! Owns: the cached tensors and attention over them. Must not: choose tokens (`generate.rs`)
//! or know about batching and padding beyond the additive mask it is given.

use burn::tensor::activation::softmax;
use burn::tensor::Tensor;

use crate::attention_core::{block_positions, causal_attention};
use crate::precision::{round_to, scale, to_f32};

/// One layer's cache: keys and values `[batch, kv_heads, capacity, head_dim]`, of which the
/// first `len` positions are filled.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    kv: Option<(Tensor<4>, Tensor<4>)>,
    len: usize,
    capacity: usize,
}

/// Every layer's cache, empty until the prefill.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
}

impl KvCache {
    /// A cache for `layers` layers holding up to `capacity` positions (prompt and generated
    /// tokens); the buffers are allocated by the prefill, in its dtype and batch size.
    pub fn new(layers: usize, capacity: usize) -> Self {
        let layer = LayerKv {
            capacity,
            ..LayerKv::default()
        };
        Self {
            layers: vec![layer; layers],
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions the buffers hold.
    pub fn capacity(&self) -> usize {
        self.layers.first().map_or(0, |l| l.capacity)
    }
}

impl LayerKv {
    /// Attention of the new positions' `q [b, g, rep, s, hd]` (query heads g·rep..(g+1)·rep
    /// share kv head g) over the cached keys followed by the new `k, v [b, g, s, hd]`, which
    /// are then cached. `bias` is `[b, 1, 1, s, cached + s]`. The first call (the prefill) is
    /// the training forward's causal attention; later ones use [`cached_attention`].
    pub(crate) fn attend(
        &mut self,
        q: Tensor<5>,
        k: Tensor<4>,
        v: Tensor<4>,
        bias: Tensor<5>,
        scale: f64,
    ) -> Tensor<5> {
        let s = k.dims()[2];
        let end = self.len + s;
        assert!(
            end <= self.capacity,
            "KV cache of {} positions cannot take {end}",
            self.capacity
        );
        let prefill = self.kv.is_none();
        let (kb, vb) = match self.kv.take() {
            Some(kv) => kv,
            None => (self.buffer(&k), self.buffer(&v)),
        };
        // The buffers are held only here, so slice_assign writes the new rows in place.
        let at = [
            0..k.dims()[0],
            0..k.dims()[1],
            self.len..end,
            0..k.dims()[3],
        ];
        let kb = kb.slice_assign(at.clone(), k.clone());
        let vb = vb.slice_assign(at, v.clone());
        self.kv = Some((kb.clone(), vb.clone()));
        self.len = end;
        if prefill {
            let block = block_positions(q.dims());
            return causal_attention(q, k, v, bias, scale, block);
        }
        // Views of the filled prefix; they are dropped before the next step writes.
        let (k, v) = (kb.narrow(2, 0, end), vb.narrow(2, 0, end));
        cached_attention(q, k, v, bias, scale)
    }

    /// Zeros `[b, g, capacity, hd]` in the dtype of `like`.
    fn buffer(&self, like: &Tensor<4>) -> Tensor<4> {
        let [b, g, _, hd] = like.dims();
        let zeros = Tensor::<4>::zeros([b, g, self.capacity, hd], &like.device());
        round_to(zeros, like.dtype())
    }
}

/// `softmax(q·kᵀ·scale + bias)·v` for `q [b, g, rep, s, hd]` over `k, v [b, g, len, hd]`
/// with `bias [b, 1, 1, s, len]` (f32, 0 or -inf), in `causal_attention`'s arithmetic: scores
/// in the matmul dtype, the scale applied in f32 and rounded once, softmax in f32, the
/// probabilities rounded to the matmul dtype for the product with v.
pub fn cached_attention(
    q: Tensor<5>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Tensor<5>,
    s: f64,
) -> Tensor<5> {
    let [b, g, rep, n, hd] = q.dims();
    let len = k.dims()[2];
    let dtype = v.dtype();
    let scores = q.reshape([b, g, rep * n, hd]).matmul(k.swap_dims(2, 3));
    let scores = to_f32(scale(scores, s)).reshape([b, g, rep, n, len]);
    let probs = round_to(softmax(scores + bias, 4), dtype).reshape([b, g, rep * n, len]);
    probs.matmul(v).reshape([b, g, rep, n, hd])
}
