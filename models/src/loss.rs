//! Next-token log-probabilities and cross-entropy that never materialise `[tokens, vocab]`
//! logits at once.

use burn::tensor::{Int, Tensor};

use crate::boundaries::{Boundaries, Local};
use crate::fused::exp_sum_rows;
use crate::precision::{like, to_f32};

/// The vocabulary rows an LM head weight holds (`start..start + rows`; all of them on one
/// rank), and the boundaries that complete the softmax over every shard: Megatron's
/// vocabulary-parallel cross-entropy, so no rank forms full-vocabulary logits.
#[derive(Debug, Clone, Copy)]
pub struct VocabShard<'a> {
    pub start: usize,
    pub bd: &'a dyn Boundaries,
}

impl VocabShard<'static> {
    /// The whole vocabulary on this rank.
    pub fn whole() -> Self {
        Self {
            start: 0,
            bd: &Local,
        }
    }
}

/// Rows per chunk such that a chunk's logits stay under ~64 Mi elements.
fn chunk_rows(vocab: usize) -> usize {
    ((1usize << 26) / vocab.max(1)).max(1)
}

/// Targets `[batch, seq]` (`input_ids` shifted left) and a mask that is 1 where a next token
/// exists, i.e. everywhere but the last position of each row.
pub fn next_token_targets(input_ids: &Tensor<2, Int>) -> (Tensor<2, Int>, Tensor<2>) {
    let [b, s] = input_ids.dims();
    let device = input_ids.device();
    let shifted = input_ids.clone().narrow(1, 1, s - 1);
    let targets = Tensor::cat(vec![shifted, Tensor::zeros([b, 1], &device)], 1);
    let mask = Tensor::cat(
        vec![
            Tensor::ones([b, s - 1], &device),
            Tensor::zeros([b, 1], &device),
        ],
        1,
    );
    (targets, mask)
}

/// Calls `each(start, logprobs)` for consecutive row chunks of the flattened positions, with
/// `logprobs [len] = (h·Wᵀ)[target] − logsumexp(h·Wᵀ)` (f32) of rows `start..start + len`.
fn for_each_chunk(
    hidden: Tensor<3>,
    weight: &Tensor<2>,
    targets: Tensor<2, Int>,
    step: usize,
    vocab: VocabShard,
    mut each: impl FnMut(usize, Tensor<1>),
) {
    let [b, s, h] = hidden.dims();
    let rows = b * s;
    let hidden = hidden.reshape([rows, h]);
    let targets = targets.reshape([rows, 1]);
    let weight = like(weight.clone(), &hidden);
    let mut start = 0;
    while start < rows {
        let len = step.min(rows - start);
        let logits = to_f32(
            hidden
                .clone()
                .narrow(0, start, len)
                .matmul(weight.clone().transpose()),
        );
        each(
            start,
            target_logprobs(logits, targets.clone().narrow(0, start, len), vocab),
        );
        start += len;
    }
}

/// `logits[target] − logsumexp(logits)` per row of `logits [len, local vocab]` (f32) with
/// `targets [len, 1]`: the max, Σ exp and picked logit are completed over the vocabulary
/// shards; a target outside this shard picks 0 here. On one rank this is the plain
/// expression (the mask selects nothing), with the exponential sum as one op.
fn target_logprobs(logits: Tensor<2>, targets: Tensor<2, Int>, vocab: VocabShard) -> Tensor<1> {
    let [len, local] = logits.dims();
    let max = vocab
        .bd
        .vocab_max(logits.clone().detach().max_dim(1).reshape([len]));
    // Σ exp(logits − max) in one op that does not keep the [len, vocab] exponentials.
    let exp_sum = exp_sum_rows(logits.clone(), max.clone());
    let lse = vocab.bd.vocab_sum(exp_sum).log() + max;
    let shifted = targets.sub_scalar(vocab.start as i64);
    let elsewhere = shifted
        .clone()
        .lower_elem(0)
        .bool_or(shifted.clone().greater_equal_elem(local as i64))
        .reshape([len]);
    let picked = logits
        .gather(1, shifted.clamp(0, local as i64 - 1))
        .reshape([len])
        .mask_fill(elsewhere, 0.0);
    vocab.bd.vocab_sum(picked) - lse
}

/// `log p(target)` `[batch, seq]` (f32, differentiable) under the logits `hidden · Wᵀ`, for
/// `hidden [batch, seq, H]`, `weight [vocab, H]`, `targets [batch, seq]`. The logits matmul
/// runs in the dtype of `hidden`, the log-softmax in f32, chunked over rows.
/// `vocab` says which vocabulary rows `weight` holds.
pub fn token_logprobs(
    hidden: Tensor<3>,
    weight: &Tensor<2>,
    targets: Tensor<2, Int>,
    vocab: VocabShard,
) -> Tensor<2> {
    let step = chunk_rows(weight.dims()[0]);
    token_logprobs_chunked(hidden, weight, targets, step, vocab)
}

/// [`token_logprobs`] with `step` rows per chunk.
pub(crate) fn token_logprobs_chunked(
    hidden: Tensor<3>,
    weight: &Tensor<2>,
    targets: Tensor<2, Int>,
    step: usize,
    vocab: VocabShard,
) -> Tensor<2> {
    let [b, s, _] = hidden.dims();
    let mut chunks = Vec::new();
    for_each_chunk(hidden, weight, targets, step, vocab, |_, lp| {
        chunks.push(lp)
    });
    Tensor::cat(chunks, 0).reshape([b, s])
}

/// `−Σ mask · log p(target)` over all positions (see [`token_logprobs`]), the token
/// cross-entropy summed where `mask [batch, seq]` is 1; positions are ignored by the mask, never
/// by a token id. Training divides by the target count of the whole global batch. Summed per
/// chunk and the chunk sums added in order, so the per-position log-probs are never kept whole.
pub fn token_loss_sum(
    hidden: Tensor<3>,
    weight: &Tensor<2>,
    targets: Tensor<2, Int>,
    mask: Tensor<2>,
    vocab: VocabShard,
) -> Tensor<1> {
    let rows: usize = mask.dims().iter().product();
    let mask = mask.reshape([rows]);
    let step = chunk_rows(weight.dims()[0]);
    let mut total: Option<Tensor<1>> = None;
    for_each_chunk(hidden, weight, targets, step, vocab, |start, lp| {
        let len = lp.dims()[0];
        let part = -(lp * mask.clone().narrow(0, start, len)).sum();
        total = Some(match total.take() {
            Some(t) => t + part,
            None => part,
        });
    });
    total.expect("a batch has at least one row")
}
