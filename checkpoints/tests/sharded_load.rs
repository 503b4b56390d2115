//! A rank's part of a Hugging Face folder, read directly (rows and experts along dim 0 only,
//! the rest read whole and narrowed), equals the whole model's tensors cut by the plan.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::{Device, Tensor};
use moeru_checkpoints::{load_hf_model, load_hf_model_sharded};
use moeru_models::params::{to_f32_vec, ParamVisitor, Params};
use moeru_models::shard::cut_part;
use moeru_models::{Boundaries, ModelShard, Placement};

/// Boundaries that only say where the rank sits (loading runs no collective).
#[derive(Debug)]
struct Part(ModelShard);

impl Boundaries for Part {
    fn shard(&self) -> ModelShard {
        self.0
    }
}

fn tensors<M: Params>(model: &mut M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    struct Collect(Vec<(String, Vec<usize>, Vec<f32>)>);
    impl ParamVisitor for Collect {
        fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
            let values = to_f32_vec(param.clone());
            self.0
                .push((name.to_string(), param.dims().to_vec(), values));
        }
    }
    let mut c = Collect(Vec::new());
    model.visit_params(&mut c);
    c.0
}

#[test]
fn each_rank_reads_exactly_its_part() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/models/qwen3-moe-mixed");
    let device = Device::flex();
    let whole = tensors(&mut load_hf_model(&dir, &device).unwrap());
    for (tp, ep) in [(2, 1), (1, 2), (1, 4), (2, 2)] {
        for (tp_rank, ep_rank) in (0..tp).flat_map(|t| (0..ep).map(move |e| (t, e))) {
            let shard = ModelShard {
                tp,
                tp_rank,
                sequence_parallel: true,
                ep,
                ep_rank,
            };
            let mut part = load_hf_model_sharded(&dir, Arc::new(Part(shard)), &device)
                .unwrap_or_else(|e| panic!("{shard:?}: {e}"));
            let local = tensors(&mut part);
            assert_eq!(local.len(), whole.len());
            for ((name, dims, values), (wname, wdims, wvalues)) in local.iter().zip(&whole) {
                assert_eq!(name, wname);
                let want = match shard.plan(name).placement {
                    Placement::Split(s) => cut_part(wvalues, wdims, &s),
                    Placement::Replicated => wvalues.clone(),
                };
                assert_eq!(values, &want, "{shard:?} {name} {dims:?}");
            }
        }
    }
}
