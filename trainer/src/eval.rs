//! Mean next-token loss and perplexity over a prepared dataset.

use std::path::Path;

use burn::tensor::Tensor;
use moeru_data::{DataLoader, LoaderConfig, PackMode};
use moeru_models::params::{to_f32_vec, ParamVisitor, Params};
use moeru_models::{ForwardCtx, Precision, Qwen3Model};

use crate::engine::MicroBatch;
use crate::error::TrainError;
use crate::pipeline::executor::PipelineRun;
use crate::pipeline::forward::pipeline_hidden;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    pub target_tokens: u64,
}

/// A copy of `model` (adapters included) without autodiff, so evaluation records no graph.
pub fn inference_copy(model: &Qwen3Model) -> Qwen3Model {
    struct Strip;
    impl ParamVisitor for Strip {
        fn visit<const D: usize>(&mut self, _: &str, param: &mut Tensor<D>) {
            *param = param.clone().inner();
        }
    }
    let mut copy = model.clone();
    copy.all_params().visit_params(&mut Strip);
    copy
}

/// One pass over `dir` (no shuffling), `max_batches` micro-batches at most (0 = all), with
/// matmuls in `precision`; through `pipeline`'s stages when `model` is a stage's part (every
/// rank of the pipeline gets the loss).
pub fn evaluate(
    model: &Qwen3Model,
    precision: Precision,
    dir: &Path,
    seq_len: usize,
    micro_batch: usize,
    max_batches: u64,
    pipeline: Option<&PipelineRun>,
) -> Result<EvalResult, TrainError> {
    let model = inference_copy(model);
    let device = model.device();
    let mut cfg = LoaderConfig::new(dir, seq_len, micro_batch, 0);
    cfg.shuffle = false;
    cfg.epochs = Some(1);
    cfg.mode = PackMode::Pack;
    let mut loader = DataLoader::new(cfg)?;
    let (mut sum, mut count, mut batches) = (0f64, 0u64, 0u64);
    while max_batches == 0 || batches < max_batches {
        let Some(samples) = loader.next_batch()? else {
            break;
        };
        let mb = MicroBatch::from_samples(&samples, &device);
        let ctx = ForwardCtx::new(precision);
        let hidden = match pipeline {
            None => Some(model.forward(&mb.batch, &ctx).hidden),
            Some(run) => pipeline_hidden(run, &model, &mb.batch, &ctx)?,
        };
        if let Some(hidden) = hidden {
            let loss = model.token_loss_sum(hidden, mb.targets, mb.mask, &ctx);
            sum += to_f32_vec(loss)[0] as f64;
        }
        count += mb.target_count as u64;
        batches += 1;
    }
    if let Some(run) = pipeline {
        // The sum is the last stage's.
        let mut total = [sum];
        run.group.broadcast(&mut total, run.shape.pp - 1)?;
        sum = total[0];
    }
    if count == 0 {
        return Err(TrainError::Dataset(format!(
            "{}: no evaluation targets (the dataset is smaller than one micro-batch of {micro_batch} × {seq_len} tokens); lower the batch or seq_len",
            dir.display()
        )));
    }
    let loss = sum / count as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        target_tokens: count,
    })
}
