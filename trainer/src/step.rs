//! One optimizer step over the micro-batches of a global batch.

use burn::tensor::{Device, Int, Tensor, TensorData};
use moeru_data::PackedSample;
use moeru_models::loss::next_token_targets;
use moeru_models::params::to_f32_vec;
use moeru_models::{Batch, DropoutKey, Qwen3Model};

use crate::data_parallel::DataParallel;
use crate::grads::GradBuffer;
use crate::optim::AdamW;
use moeru_parallel::CommError;

/// Model inputs plus next-token targets and their mask (1 = the target counts).
pub struct MicroBatch {
    pub batch: Batch,
    pub targets: Tensor<2, Int>,
    pub mask: Tensor<2>,
    pub target_count: usize,
    pub tokens: usize,
    /// Which LoRA dropout mask the forward draws (`None`: no dropout).
    pub dropout: Option<DropoutKey>,
}

impl MicroBatch {
    /// From packed samples of the data loader (position t predicts `labels[t]`).
    pub fn from_samples(samples: &[PackedSample], device: &Device) -> Self {
        let (b, s) = (samples.len(), samples[0].input_ids.len());
        let flat = |f: fn(&PackedSample) -> &Vec<i32>| -> Vec<i64> {
            samples
                .iter()
                .flat_map(|x| f(x).iter().map(|&v| v as i64))
                .collect()
        };
        let batch = Batch::packed(
            &flat(|x| &x.input_ids),
            &flat(|x| &x.position_ids),
            &flat(|x| &x.document_ids),
            b,
            s,
            device,
        );
        let mask: Vec<f32> = samples
            .iter()
            .flat_map(|x| x.loss_mask.iter().map(|&m| m as f32))
            .collect();
        let target_count = mask.iter().filter(|&&m| m > 0.0).count();
        Self {
            batch,
            targets: Tensor::from_data(TensorData::new(flat(|x| &x.labels), [b, s]), device),
            mask: Tensor::from_data(TensorData::new(mask, [b, s]), device),
            target_count,
            tokens: b * s,
            dropout: None,
        }
    }

    /// One document per row, labels = the ids shifted left (transformers' `labels=input_ids`).
    pub fn from_ids(ids: &[i64], b: usize, s: usize, device: &Device) -> Self {
        let batch = Batch::from_ids(ids, b, s, device);
        let (targets, mask) = next_token_targets(&batch.input_ids);
        Self {
            batch,
            targets,
            mask,
            target_count: b * (s - 1),
            tokens: b * s,
            dropout: None,
        }
    }
}

/// Coefficients of the auxiliary router losses.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuxWeights {
    pub load_balancing: f64,
    pub z_loss: f64,
}

#[derive(Debug, Clone, Default)]
pub struct StepResult {
    /// LM loss: Σ token losses / target tokens of the global batch.
    pub loss: f64,
    pub aux_loss: Option<f64>,
    pub z_loss: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens routed to each expert, per MoE layer, summed over micro-batches.
    pub expert_counts: Vec<(usize, Vec<u64>)>,
    /// Rows this rank's expert matmuls computed, padding included, over all MoE layers.
    pub expert_rows_computed: u64,
    pub tokens: u64,
}

/// Forward and backward over `micro`, clip to `clip` (0 = off), AdamW update with `lr`.
///
/// The LM loss is token-weighted over the whole global batch (each micro-batch contributes
/// its token-loss sum / all target tokens), so accumulation equals one big batch; the router
/// losses are averaged over micro-batches. Under data parallelism (`dp`) the global batch is
/// every rank's micro-batches: target counts and reported values are summed over ranks and
/// the gradients over the DP group, so the step equals the single-rank step on all of them.
/// With LoRA attached only the adapters train, each micro-batch with its own dropout mask.
pub fn train_step(
    model: &mut Qwen3Model,
    opt: &mut AdamW,
    micro: &[MicroBatch],
    lr: f64,
    clip: f64,
    weights: AuxWeights,
    dp: Option<&mut DataParallel>,
) -> Result<StepResult, CommError> {
    let mut counts = [
        micro.iter().map(|m| m.target_count).sum::<usize>() as f64,
        micro.len() as f64,
    ];
    if let Some(dp) = &dp {
        dp.sum(&mut counts)?;
    }
    let denom = counts[0].max(1.0) as f32;
    let n = counts[1];
    let mut grads = GradBuffer::default();
    let mut result = StepResult::default();
    for mb in micro {
        model.set_lora_dropout(mb.dropout);
        let out = model.forward(&mb.batch);
        let lm = model
            .token_loss_sum(out.hidden, mb.targets.clone(), mb.mask.clone())
            .div_scalar(denom);
        result.loss += to_f32_vec(lm.clone())[0] as f64;
        let mut loss = lm;
        if let Some(aux) = out.aux_loss {
            *result.aux_loss.get_or_insert(0.0) += to_f32_vec(aux.clone())[0] as f64 / n;
            loss = loss + aux.mul_scalar(weights.load_balancing / n);
        }
        if let Some(z) = out.z_loss {
            *result.z_loss.get_or_insert(0.0) += to_f32_vec(z.clone())[0] as f64 / n;
            if weights.z_loss > 0.0 {
                loss = loss + z.mul_scalar(weights.z_loss / n);
            }
        }
        add_counts(&mut result.expert_counts, &out.router);
        result.expert_rows_computed += out.router.iter().map(|(_, s)| s.computed_rows).sum::<u64>();
        result.tokens += mb.tokens as u64;
        let g = loss.backward();
        // Only what trains gets gradients and optimizer state (LoRA: the adapters).
        grads.accumulate(&mut model.trainable(), &g);
    }
    model.set_lora_dropout(None);
    match dp {
        None => {
            result.grad_norm = grads.clip(clip);
            opt.step(&mut model.trainable(), &mut grads, lr);
        }
        Some(dp) => {
            result.grad_norm = dp.step(&mut model.trainable(), opt, &mut grads, lr, clip)?;
            sum_over_ranks(&mut result, dp)?;
        }
    }
    Ok(result)
}

/// The reported values of the whole global batch, identical on every rank.
fn sum_over_ranks(r: &mut StepResult, dp: &DataParallel) -> Result<(), CommError> {
    let mut v = vec![
        r.loss,
        r.aux_loss.unwrap_or(0.0),
        r.z_loss.unwrap_or(0.0),
        r.tokens as f64,
    ];
    v.extend(
        r.expert_counts
            .iter()
            .flat_map(|(_, c)| c.iter().map(|&x| x as f64)),
    );
    dp.sum(&mut v)?;
    r.loss = v[0];
    r.aux_loss = r.aux_loss.map(|_| v[1]);
    r.z_loss = r.z_loss.map(|_| v[2]);
    r.tokens = v[3] as u64;
    let mut it = v[4..].iter();
    for (_, counts) in &mut r.expert_counts {
        for c in counts.iter_mut() {
            *c = *it.next().unwrap_or(&0.0) as u64;
        }
    }
    Ok(())
}

fn add_counts(
    into: &mut Vec<(usize, Vec<u64>)>,
    router: &[(usize, moeru_models::moe::RouterStats)],
) {
    if into.is_empty() {
        into.extend(
            router
                .iter()
                .map(|(l, s)| (*l, vec![0; s.expert_counts.len()])),
        );
    }
    for ((_, acc), (_, s)) in into.iter_mut().zip(router) {
        for (a, c) in acc.iter_mut().zip(&s.expert_counts) {
            *a += c;
        }
    }
}
