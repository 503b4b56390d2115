//! A micro-batch on the device: model inputs, next-token targets and their mask.

use burn::tensor::{Device, Int, Tensor, TensorData};
use moeru_data::PackedSample;
use moeru_models::loss::next_token_targets;
use moeru_models::{Batch, DropoutKey, ForwardCtx, RouteReplay};
use std::sync::Arc;

use crate::dpo::PairRows;
use crate::grpo::RolloutRows;

/// Model inputs plus next-token targets and their mask (1 = the target counts).
#[derive(Clone)]
pub struct MicroBatch {
    pub batch: Batch,
    pub targets: Tensor<2, Int>,
    pub mask: Tensor<2>,
    pub target_count: usize,
    pub tokens: usize,
    /// Which LoRA dropout mask the forward draws (`None`: no dropout).
    pub dropout: Option<DropoutKey>,
    /// DPO: the rows are preference pairs (`dpo::pair_micro_batch`).
    pub pairs: Option<PairRows>,
    /// GRPO: the rows are rollouts (`grpo::rollout`).
    pub rollout: Option<RolloutRows>,
    /// MoE router replay: the routes its training forwards use (`moe.router_replay`).
    pub routes: Option<Arc<RouteReplay>>,
}

impl MicroBatch {
    /// The settings of a training forward of this micro-batch: `base` with its dropout key
    /// and routes.
    pub fn ctx(&self, base: &ForwardCtx) -> ForwardCtx {
        (base.clone().with_dropout(self.dropout)).with_routes(self.routes.clone())
    }

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
            pairs: None,
            rollout: None,
            routes: None,
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
            pairs: None,
            rollout: None,
            routes: None,
        }
    }

    /// Rows of (prompt ++ completion, prompt length), right-padded to the longest: targets the
    /// next token, the mask on completion tokens only. A padding tail is its own document
    /// (positions from 0), so no real token attends to it and it attends only to itself.
    pub fn from_completions(rows: &[(Vec<i32>, usize)], device: &Device) -> Self {
        let (b, s) = (
            rows.len(),
            rows.iter().map(|(r, _)| r.len()).max().unwrap_or(1),
        );
        let (mut ids, mut pos, mut docs) = (Vec::new(), Vec::new(), Vec::new());
        let (mut targets, mut mask) = (Vec::new(), Vec::new());
        for (row, prompt) in rows {
            let (len, pad) = (row.len(), s - row.len());
            ids.extend(
                row.iter()
                    .map(|&t| t as i64)
                    .chain(std::iter::repeat_n(0, pad)),
            );
            pos.extend((0..len as i64).chain(0..pad as i64));
            docs.extend(std::iter::repeat_n(0, len).chain(std::iter::repeat_n(1, pad)));
            // Position t predicts token t + 1; it counts when that token is a completion token.
            targets.extend(row[1..].iter().map(|&t| t as i64));
            targets.extend(std::iter::repeat_n(0, pad + 1));
            mask.extend((1..len).map(|t| f32::from(u8::from(t >= *prompt))));
            mask.extend(std::iter::repeat_n(0.0, pad + 1));
        }
        let target_count = mask.iter().filter(|&&m| m > 0.0).count();
        Self {
            batch: Batch::packed(&ids, &pos, &docs, b, s, device),
            targets: Tensor::<2, Int>::from_data(TensorData::new(targets, [b, s]), device),
            mask: Tensor::from_data(TensorData::new(mask, [b, s]), device),
            target_count,
            tokens: rows.iter().map(|(r, _)| r.len()).sum(),
            dropout: None,
            pairs: None,
            rollout: None,
            routes: None,
        }
    }
}
