//! A forward-only pass through a pipeline's stages (evaluation): one micro-batch at a time,
//! virtual stage after virtual stage, each receiving the previous stage's rows and sending its
//! own on, so that every send meets a receive already waiting.
//!
//! Owns: nothing across calls. Must not: record a graph (callers pass an inference copy) or
//! train.

use burn::tensor::{Tensor, TensorData};
use moeru_models::params::to_f32_vec;
use moeru_models::{Batch, ForwardCtx, Qwen3Model};
use moeru_parallel::CommError;

use super::executor::PipelineRun;

/// The message tag of the forward-only pass.
const TAG: u32 = 0x5046;

/// The final-norm hidden states `[batch, seq, hidden]` of `batch` on the rank of the last
/// stage; `None` on the others.
pub fn pipeline_hidden(
    run: &PipelineRun,
    model: &Qwen3Model,
    batch: &Batch,
    ctx: &ForwardCtx,
) -> Result<Option<Tensor<3>>, CommError> {
    let (pp, me) = (run.shape.pp, run.group.rank());
    let [b, s] = batch.dims();
    let h = model.config.hidden_size;
    let shard = model.shard();
    let rows = b * s
        / if shard.sequence_parallel() {
            shard.tp
        } else {
            1
        };
    for (stage, layers) in run.stages.iter().enumerate() {
        if stage % pp != me {
            continue;
        }
        let input = match stage {
            0 => None,
            _ => {
                let mut buf = vec![0f32; rows * h];
                run.group.recv(&mut buf, (stage - 1) % pp, TAG)?;
                let data = TensorData::new(buf, [rows, h]);
                Some(Tensor::<2>::from_data(data, &model.device()))
            }
        };
        let last = stage + 1 == run.stages.len();
        let (out, _) = model.stage_forward(batch, input, layers.clone(), last, ctx);
        if last {
            return Ok(Some(out.reshape([b, s, h])));
        }
        run.group.send(&to_f32_vec(out), (stage + 1) % pp, TAG)?;
    }
    Ok(None)
}
