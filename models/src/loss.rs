//! Next-token cross-entropy that never materialises `[tokens, vocab]` log-probabilities at once.

use burn::tensor::{Int, Tensor};

use crate::layers::logsumexp_rows;
use crate::precision::{f32, like};

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

/// Mean over masked-in positions of `logsumexp(h·Wᵀ) − (h·Wᵀ)[target]`.
///
/// `hidden [batch, seq, H]`, `weight [vocab, H]`, `targets [batch, seq]`, `mask [batch, seq]`
/// (1 = counts). Positions are ignored by the mask, never by a token id.
pub fn causal_lm_loss(
    hidden: Tensor<3>,
    weight: &Tensor<2>,
    targets: Tensor<2, Int>,
    mask: Tensor<2>,
) -> Tensor<1> {
    let count = mask.clone().sum();
    token_loss_sum(hidden, weight, targets, mask) / count
}

/// Σ over masked-in positions of the token cross-entropy (see [`causal_lm_loss`]); training
/// divides by the target count of the whole global batch. The logits matmul runs in the dtype
/// of `hidden`; the softmax and the sum run in f32.
pub fn token_loss_sum(
    hidden: Tensor<3>,
    weight: &Tensor<2>,
    targets: Tensor<2, Int>,
    mask: Tensor<2>,
) -> Tensor<1> {
    let [b, s, h] = hidden.dims();
    let rows = b * s;
    let hidden = hidden.reshape([rows, h]);
    let targets = targets.reshape([rows, 1]);
    let mask = mask.reshape([rows]);
    let step = chunk_rows(weight.dims()[0]);
    let weight = like(weight.clone(), &hidden);
    let mut total: Option<Tensor<1>> = None;
    let mut start = 0;
    while start < rows {
        let len = step.min(rows - start);
        let logits = f32(hidden
            .clone()
            .narrow(0, start, len)
            .matmul(weight.clone().transpose()));
        let lse = logsumexp_rows(logits.clone());
        let picked = logits
            .gather(1, targets.clone().narrow(0, start, len))
            .reshape([len]);
        let part = ((lse - picked) * mask.clone().narrow(0, start, len)).sum();
        total = Some(match total {
            Some(t) => t + part,
            None => part,
        });
        start += len;
    }
    total.expect("a batch has at least one row")
}
