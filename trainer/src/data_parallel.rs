//! One optimizer step's communication under data parallelism: the global target count, the
//! gradient sum over the DP group (bucketed all-reduce, or reduce-scatter under ZeRO-1), the
//! global gradient norm, the ZeRO-1 shard update and the parameter all-gather. The math is
//! the single-rank math: only the order of the cross-rank sums differs.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::tensor::{Device, Tensor, TensorData};
use moeru_models::params::{param_shapes, to_f32_vec, ParamVisitor, Params};
use moeru_parallel::{CommError, FlatLayout, GradSync, ProcessGroup, ReduceOp, Segment};

use crate::grads::GradBuffer;
use crate::optim::{adamw_update, decays, AdamW, Moments};

/// ZeRO-1: the optimizer state of the flat elements this DP rank owns.
pub struct ShardState {
    pub ranges: Vec<Range<usize>>,
    pub segments: Vec<Segment>,
    /// Moments of the owned elements, concatenated in `ranges` order.
    pub moments: Moments,
}

pub struct DataParallel<'a> {
    /// Bookkeeping sums (target counts, logged metrics) go over all ranks.
    pub world: &'a ProcessGroup,
    pub dp: &'a ProcessGroup,
    pub layout: FlatLayout,
    /// `Some` under ZeRO-1.
    pub zero: Option<ShardState>,
}

impl<'a> DataParallel<'a> {
    /// Lays the parameters of `model` out flat in `bucket_elems` buckets. Under ZeRO-1
    /// (`zero`), this rank's shard of `moments` (full, per parameter; missing = zeros) is kept
    /// and the rest dropped.
    pub fn new<M: Params>(
        world: &'a ProcessGroup,
        dp: &'a ProcessGroup,
        model: &mut M,
        zero: bool,
        bucket_elems: usize,
        moments: &BTreeMap<String, Moments>,
        device: &Device,
    ) -> Self {
        let params = param_shapes(model)
            .into_iter()
            .map(|(name, shape)| (name, shape.iter().product()))
            .collect();
        let layout = FlatLayout::new(params, dp.size(), bucket_elems);
        let zero = zero.then(|| {
            let ranges = layout.shard(dp.rank());
            let segments = layout.segments(&ranges);
            let pick = |f: fn(&Moments) -> &Tensor<1>| -> Tensor<1> {
                let mut v = Vec::new();
                for s in &segments {
                    let slot = &layout.params[s.param];
                    match moments.get(&slot.name) {
                        Some(m) => v.extend_from_slice(
                            &to_f32_vec(f(m).clone())[s.param_offset..s.param_offset + s.len],
                        ),
                        None => v.resize(v.len() + s.len, 0.0),
                    }
                }
                let n = v.len();
                Tensor::from_data(TensorData::new(v, [n]), device)
            };
            ShardState {
                moments: Moments {
                    exp_avg: pick(|m| &m.exp_avg),
                    exp_avg_sq: pick(|m| &m.exp_avg_sq),
                },
                ranges,
                segments,
            }
        });
        Self {
            world,
            dp,
            layout,
            zero,
        }
    }

    /// Σ over all ranks (f64, fixed order).
    pub fn sum(&self, values: &mut [f64]) -> Result<(), CommError> {
        self.world.all_reduce(values, ReduceOp::Sum)
    }

    /// Sums the accumulated gradients over the DP group, clips them to `clip` by the global
    /// norm, and applies AdamW with `lr`. Returns the norm before clipping.
    pub fn step<M: Params>(
        &mut self,
        model: &mut M,
        opt: &mut AdamW,
        grads: &mut GradBuffer,
        lr: f64,
        clip: f64,
    ) -> Result<f64, CommError> {
        let mut flat = Vec::with_capacity(self.layout.total);
        for slot in &self.layout.params {
            match grads.grads.get(&slot.name) {
                Some(g) => flat.extend(to_f32_vec(g.clone())),
                None => flat.resize(flat.len() + slot.len, 0.0),
            }
        }
        let sync = GradSync {
            group: self.dp,
            layout: &self.layout,
        };
        let Some(zero) = &mut self.zero else {
            sync.all_reduce(&mut flat)?;
            let device = grads.grads.values().next().map(|g| g.device());
            for slot in &self.layout.params {
                if let (Some(g), Some(device)) = (grads.grads.get_mut(&slot.name), &device) {
                    let part = flat[slot.offset..slot.offset + slot.len].to_vec();
                    *g = Tensor::from_data(TensorData::new(part, [slot.len]), device);
                }
            }
            let norm = grads.clip(clip);
            opt.step(model, grads, lr);
            return Ok(norm);
        };
        let mut shard = sync.reduce_scatter(&flat)?;
        drop(flat);
        // Global norm: Σ g² of each shard (f64), summed over the DP group.
        let mut sq = [shard.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>()];
        self.dp.all_reduce(&mut sq, ReduceOp::Sum)?;
        let norm = sq[0].sqrt();
        if clip > 0.0 {
            let coef = (clip / (norm + 1e-6)).min(1.0) as f32;
            shard.iter_mut().for_each(|g| *g *= coef);
        }
        opt.steps += 1;
        let mut params = flat_params(model, &self.layout);
        let device = zero.moments.exp_avg.device();
        let (mut new_p, mut new_m, mut new_v) = (Vec::new(), Vec::new(), Vec::new());
        let mut at = 0;
        for s in &zero.segments {
            let name = &self.layout.params[s.param].name;
            let t =
                |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
            let p = t(&params[s.flat_start..s.flat_start + s.len]);
            let g = t(&shard[at..at + s.len]);
            let m = Moments {
                exp_avg: zero.moments.exp_avg.clone().slice(at..at + s.len),
                exp_avg_sq: zero.moments.exp_avg_sq.clone().slice(at..at + s.len),
            };
            let decay = if decays(name) {
                opt.config.weight_decay
            } else {
                0.0
            };
            let (p, m) = adamw_update(&opt.config, opt.steps, lr, decay, p, g, &m);
            new_p.extend(to_f32_vec(p));
            new_m.push(m.exp_avg);
            new_v.push(m.exp_avg_sq);
            at += s.len;
        }
        if !new_m.is_empty() {
            zero.moments = Moments {
                exp_avg: Tensor::cat(new_m, 0),
                exp_avg_sq: Tensor::cat(new_v, 0),
            };
        }
        sync.all_gather(&new_p, &mut params)?;
        set_flat_params(model, &self.layout, &params);
        grads.grads.clear();
        Ok(norm)
    }
}

/// The model's parameters in layout order.
fn flat_params<M: Params>(model: &mut M, layout: &FlatLayout) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl ParamVisitor for Collect {
        fn visit<const D: usize>(&mut self, _: &str, param: &mut Tensor<D>) {
            self.0.extend(to_f32_vec(param.clone().inner()));
        }
    }
    let mut c = Collect(Vec::with_capacity(layout.total));
    model.visit_params(&mut c);
    c.0
}

fn set_flat_params<M: Params>(model: &mut M, layout: &FlatLayout, flat: &[f32]) {
    struct Set<'a> {
        flat: &'a [f32],
        at: usize,
    }
    impl ParamVisitor for Set<'_> {
        fn visit<const D: usize>(&mut self, _: &str, param: &mut Tensor<D>) {
            let dims = param.dims();
            let n = param.shape().num_elements();
            let device = param.clone().inner().device();
            let values = self.flat[self.at..self.at + n].to_vec();
            self.at += n;
            *param = Tensor::from_inner(Tensor::from_data(TensorData::new(values, dims), &device))
                .require_grad();
        }
    }
    debug_assert_eq!(flat.len(), layout.total);
    model.visit_params(&mut Set { flat, at: 0 });
}
