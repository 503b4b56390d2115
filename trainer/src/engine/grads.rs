//! Gradients accumulated over micro-batches, flat per parameter, outside the autodiff graph,
//! and the one global-norm clipping every gradient sync uses.
//!
//! Owns: the accumulated gradients of a step. Must not: sum them over ranks (`sync.rs`).

use std::collections::BTreeMap;

use burn::tensor::{Device, Gradients, Tensor, TensorData};
use moeru_models::params::{to_f32_vec, ParamVisitor, Params};
use moeru_parallel::{CommError, ProcessGroup, ReduceOp};

use super::optim::Piece;

/// Flat `[n]` gradient per parameter name.
#[derive(Default)]
pub struct GradBuffer {
    pub grads: BTreeMap<String, Tensor<1>>,
}

impl GradBuffer {
    /// Adds the gradients of one backward pass of the parameters it reached (a pipeline
    /// chunk's or a recomputed piece's backward reaches only its own).
    pub fn accumulate<M: Params>(&mut self, model: &mut M, grads: &Gradients) {
        struct Add<'a> {
            grads: &'a Gradients,
            into: &'a mut BTreeMap<String, Tensor<1>>,
        }
        impl ParamVisitor for Add<'_> {
            fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
                let Some(g) = param.grad(self.grads) else {
                    return;
                };
                let g = g.reshape([param.shape().num_elements()]);
                let sum = match self.into.remove(name) {
                    Some(acc) => acc + g,
                    None => g,
                };
                self.into.insert(name.to_string(), sum);
            }
        }
        model.visit_params(&mut Add {
            grads,
            into: &mut self.grads,
        });
    }

    /// Zeros for every parameter no backward of the step reached.
    pub fn fill_missing<M: Params>(&mut self, model: &mut M) {
        struct Fill<'a>(&'a mut BTreeMap<String, Tensor<1>>);
        impl ParamVisitor for Fill<'_> {
            fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
                if !self.0.contains_key(name) {
                    let n = param.shape().num_elements();
                    let zeros = Tensor::zeros([n], &param.clone().inner().device());
                    self.0.insert(name.to_string(), zeros);
                }
            }
        }
        model.visit_params(&mut Fill(&mut self.grads));
    }
}

/// Clips `grads` (flat pieces) to `max_norm` (0 = off) by their global L2 norm, as
/// `torch.nn.utils.clip_grad_norm_`: the norm of per-piece norms, every piece scaled by
/// `min(1, max_norm / (norm + 1e-6))`. `shards`: the group over whose ranks the pieces are
/// spread (ZeRO-1, model parallelism), whose squared norms are summed (f64); `None` when
/// this rank holds every gradient. `counted`: which pieces this rank counts (a piece
/// replicated over ranks is counted on one of them); empty = all. The per-piece norms are
/// summed in (name, offset) order, whatever order the pieces come in, so a run's norm does
/// not depend on the layout's order. Returns the norm before clipping.
pub fn clip_global_norm(
    pieces: &[Piece],
    grads: &mut [Tensor<1>],
    max_norm: f64,
    shards: Option<&ProcessGroup>,
    counted: &[bool],
    world_order: Option<&NormOrder>,
) -> Result<f64, CommError> {
    let mut order: Vec<usize> = (0..pieces.len())
        .filter(|&i| counted.get(i).copied().unwrap_or(true))
        .collect();
    order.sort_by_key(|&i| (pieces[i].name.as_str(), pieces[i].offset));
    let sorted: Vec<Tensor<1>> = order.iter().map(|&i| grads[i].clone()).collect();
    let norm = match (shards, world_order) {
        (Some(group), Some(world_order)) => match grads.first() {
            Some(g) => ordered_norm(&sorted, group, world_order, &g.device())?,
            None => global_norm(&sorted, shards)?,
        },
        _ => global_norm(&sorted, shards)?,
    };
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        for g in grads.iter_mut() {
            *g = g.clone().mul_scalar(coef as f32);
        }
    }
    Ok(norm)
}

fn global_norm(grads: &[Tensor<1>], shards: Option<&ProcessGroup>) -> Result<f64, CommError> {
    let norms: Vec<Tensor<1>> = grads
        .iter()
        .map(|g| deterministic_sum(g.clone().square()).sqrt())
        .collect();
    let local = (!norms.is_empty()).then(|| Tensor::cat(norms, 0).square().sum());
    match shards {
        None => Ok(local.map_or(0.0, |sq| to_f32_vec(sq.sqrt())[0] as f64)),
        Some(group) => {
            let mut sq = [local.map_or(0.0, |sq| to_f32_vec(sq)[0] as f64)];
            group.all_reduce(&mut sq, ReduceOp::Sum)?;
            Ok(sq[0].sqrt())
        }
    }
}

/// Where this rank's counted pieces sit in the world's order of all counted pieces, by
/// (name, part, offset): with it the global norm adds every rank's per-piece norms in the
/// order of one rank holding them all, so a layout whose pieces are whole parameters (a
/// pipeline's stages) clips exactly as one rank does.
pub struct NormOrder {
    positions: Vec<usize>,
    total: usize,
}

impl NormOrder {
    /// Collective over `world`: `keys` are (name, part, offset) of this rank's counted pieces
    /// in (name, offset) order, as `clip_global_norm` sorts them.
    pub fn new(world: &ProcessGroup, keys: &[(String, usize, usize)]) -> Result<Self, CommError> {
        let mine: String = (keys.iter())
            .map(|(n, p, o)| format!("{n}\t{p}\t{o}\n"))
            .collect();
        let mut all = std::collections::BTreeSet::new();
        for r in 0..world.size() {
            for line in world.broadcast_string(&mine, r)?.lines() {
                let mut f = line.split('\t');
                let name = f.next().unwrap_or_default().to_string();
                let mut num = || f.next().and_then(|x| x.parse::<usize>().ok()).unwrap_or(0);
                let (part, offset) = (num(), num());
                all.insert((name, part, offset));
            }
        }
        let index: BTreeMap<&(String, usize, usize), usize> =
            all.iter().enumerate().map(|(i, k)| (k, i)).collect();
        Ok(Self {
            positions: keys.iter().map(|k| index[k]).collect(),
            total: all.len(),
        })
    }
}

/// The global norm from every rank's per-piece norms placed in the world's order (each
/// position filled by one rank, so the sum over ranks is exact) and then reduced as one rank
/// reduces its own.
fn ordered_norm(
    grads: &[Tensor<1>],
    world: &ProcessGroup,
    order: &NormOrder,
    device: &Device,
) -> Result<f64, CommError> {
    // One read of every piece's norm (a GPU syncs once, not once a piece).
    let norms: Vec<Tensor<1>> = (grads.iter())
        .map(|g| deterministic_sum(g.clone().square()).sqrt())
        .collect();
    let mut all = vec![0f32; order.total];
    if !norms.is_empty() {
        let mine = to_f32_vec(Tensor::cat(norms, 0));
        for (norm, &at) in mine.into_iter().zip(&order.positions) {
            all[at] = norm;
        }
    }
    world.all_reduce(&mut all, ReduceOp::Sum)?;
    let n = all.len();
    let norms = Tensor::<1>::from_data(TensorData::new(all, [n]), device);
    Ok(to_f32_vec(norms.square().sum().sqrt())[0] as f64)
}

/// Elements summed per block: below burn-flex's parallel threshold for a full sum (4 Mi).
const SUM_BLOCK: usize = 1 << 16;

/// Σ of a flat tensor with a fixed summation order. burn-flex sums ≥ 4 Mi contiguous elements
/// with rayon's adaptive reduce, whose combining order may vary run to run; summing fixed
/// blocks first (zero-padded, which adds exact zeros) keeps CPU runs bit-reproducible.
fn deterministic_sum(x: Tensor<1>) -> Tensor<1> {
    let n = x.dims()[0];
    if n <= SUM_BLOCK {
        return x.sum();
    }
    let rows = n.div_ceil(SUM_BLOCK);
    let pad = rows * SUM_BLOCK - n;
    let x = if pad > 0 {
        let device = x.device();
        Tensor::cat(vec![x, Tensor::zeros([pad], &device)], 0)
    } else {
        x
    };
    x.reshape([rows, SUM_BLOCK])
        .sum_dim(1)
        .reshape([rows])
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn block_sum_equals_plain_sum_and_repeats_bitwise() {
        let device = Device::flex();
        let n = 5 * SUM_BLOCK + 123;
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
        let exact: f64 = values.iter().map(|&v| v as f64).sum();
        let x = Tensor::<1>::from_data(TensorData::new(values, [n]), &device);
        let a = to_f32_vec(deterministic_sum(x.clone()))[0];
        let b = to_f32_vec(deterministic_sum(x))[0];
        assert_eq!(a.to_bits(), b.to_bits());
        assert!(((a as f64) - exact).abs() / exact < 1e-6, "{a} vs {exact}");
    }

    #[test]
    fn sharded_norm_equals_whole_norm() {
        let device = Device::flex();
        let t = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
        let whole = [t(&[3.0, 4.0, 1.0]), t(&[2.0])];
        let ranks = moeru_parallel::thread_world(2, std::time::Duration::from_secs(10));
        let piece = |name: &str, offset, len| Piece {
            name: name.into(),
            offset,
            len,
            param_len: 3,
        };
        let pieces = [
            (vec![piece("a", 0, 2)], vec![t(&[3.0, 4.0])]),
            (
                vec![piece("a", 2, 1), piece("b", 0, 1)],
                vec![t(&[1.0]), t(&[2.0])],
            ),
        ];
        let norms: Vec<f64> = std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .iter()
                .zip(pieces)
                .map(|(g, (p, mut v))| {
                    s.spawn(move || clip_global_norm(&p, &mut v, 0.0, Some(g), &[], None).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let one = global_norm(&whole, None).unwrap();
        assert!((one - 30f64.sqrt()).abs() < 1e-6, "{one}");
        for n in norms {
            assert!((n - one).abs() < 1e-6, "{n} vs {one}");
        }
    }
}
