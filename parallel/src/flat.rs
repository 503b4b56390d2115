//! One collective on a tensor's values, the one path every tensor collective takes (the
//! differentiable ops of `tensor_ops` and the gradient buckets of the trainer's sync): on the
//! device when the group's communicator reaches the tensor's memory (NCCL and a CUDA tensor
//! on its GPU, `nccl/device.rs`: no host copy), otherwise through the host. The wire dtype is
//! bf16 for a bf16 tensor (half the bytes; reductions add in f32, see `comm::reduce_parts`)
//! and f32 for every other float dtype.
//!
//! Owns: the choice of path, the host path, and what the device path counts. Must not: pick
//! where a model communicates, keep state between calls, or record errors (callers do).

use burn::backend::{try_read_sync, Backend, Dispatch, TensorMetadata};
use burn::tensor::{DType as TensorDType, Shape, Tensor, TensorData};
use half::bf16;

use crate::comm::{DType, ReduceOp};
use crate::error::{CommError, Result};
use crate::group::{Elem, ProcessGroup};

/// A collective on a flat run of elements; sizes count elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collective {
    AllReduce(ReduceOp),
    /// Each rank's input, concatenated in group-rank order.
    AllGather,
    /// The input, summed over the group, cut into equal chunks: this rank's chunk.
    ReduceScatter,
    /// `send[j]` elements to group rank j, `recv[j]` from it (source-rank order).
    AllToAll {
        send: Vec<usize>,
        recv: Vec<usize>,
    },
}

impl Collective {
    /// The op's name in the traffic counters.
    pub fn name(&self) -> &'static str {
        match self {
            Collective::AllReduce(_) => "all_reduce",
            Collective::AllGather => "all_gather",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::AllToAll { .. } => "all_to_all",
        }
    }

    /// Output elements for `input` elements on a group of `p`.
    pub fn output_len(&self, input: usize, p: usize) -> usize {
        match self {
            Collective::AllReduce(_) => input,
            Collective::AllGather => input * p,
            Collective::ReduceScatter => input / p,
            Collective::AllToAll { recv, .. } => recv.iter().sum(),
        }
    }

    /// The op on host values through `group`'s typed collectives (which count its traffic).
    pub fn on_host<T: Elem>(&self, group: &ProcessGroup, mut values: Vec<T>) -> Result<Vec<T>> {
        match self {
            Collective::AllReduce(op) => {
                group.all_reduce(&mut values, *op)?;
                Ok(values)
            }
            Collective::AllGather => group.all_gather(&values),
            Collective::ReduceScatter => group.reduce_scatter(&values, ReduceOp::Sum),
            Collective::AllToAll { send, recv } => group.all_to_all(&values, send, recv),
        }
    }
}

/// The wire dtype of a tensor of `dtype`.
pub fn wire_dtype(dtype: TensorDType) -> DType {
    match dtype {
        TensorDType::BF16 => DType::BF16,
        _ => DType::F32,
    }
}

/// `op` on `x` (a backend primitive) through `group`; the result has `out` as its shape, x's
/// dtype and device.
pub fn run<B: Backend>(
    x: B::FloatTensorPrimitive,
    group: &ProcessGroup,
    op: &Collective,
    out: Shape,
) -> Result<B::FloatTensorPrimitive> {
    #[cfg(feature = "cuda")]
    let x = match crate::nccl::device::run::<B>(x, group, op, &out) {
        Ok(done) => return done,
        Err(x) => x,
    };
    let (dtype, device) = (x.dtype(), x.device());
    let failed = |detail: String| CommError::Backend {
        backend: "burn",
        detail: format!("{} on group `{}`: {detail}", op.name(), group.name()),
    };
    let data = try_read_sync(B::float_into_data(x))
        .ok_or_else(|| failed("this platform cannot read a tensor synchronously".into()))?
        .map_err(|e| failed(format!("reading the tensor: {e}")))?;
    let result = match wire_dtype(dtype) {
        DType::BF16 => {
            let values = data
                .try_into_vec::<bf16>()
                .map_err(|e| failed(format!("{e:?}")))?;
            TensorData::new(checked(op.on_host(group, values)?, &out, &failed)?, out)
        }
        _ => {
            let values = (data.try_into_vec_as::<f32>()).map_err(|e| failed(format!("{e:?}")))?;
            let values = checked(op.on_host(group, values)?, &out, &failed)?;
            TensorData::new(values, out)
                .try_cast(dtype)
                .map_err(|e| failed(format!("the result as {dtype:?}: {e}")))?
        }
    };
    Ok(B::float_from_data(result, &device))
}

fn checked<T>(v: Vec<T>, out: &Shape, failed: &impl Fn(String) -> CommError) -> Result<Vec<T>> {
    match v.len() == out.num_elements() {
        true => Ok(v),
        false => Err(failed(format!(
            "{} values for a result of {out:?}",
            v.len()
        ))),
    }
}

/// `op` on a flat tensor (no autodiff): the trainer's gradient buckets and parameter shards.
pub fn flat(x: Tensor<1>, group: &ProcessGroup, op: &Collective) -> Result<Tensor<1>> {
    let n = op.output_len(x.shape().num_elements(), group.size());
    if let Collective::ReduceScatter = op {
        let len = x.shape().num_elements();
        if !len.is_multiple_of(group.size()) {
            let detail = format!("{len} elements do not split into {} chunks", group.size());
            return Err(group.info().bad("reduce_scatter", detail));
        }
    }
    let out = run::<Dispatch>(x.into_dispatch(), group, op, Shape::new([n]))?;
    Ok(Tensor::from_dispatch(out))
}

/// Sum (or `op`) over the group of a flat tensor.
pub fn all_reduce_flat(x: Tensor<1>, group: &ProcessGroup, op: ReduceOp) -> Result<Tensor<1>> {
    flat(x, group, &Collective::AllReduce(op))
}

/// This rank's chunk of the group's sum of `x` (its length a multiple of the group size).
pub fn reduce_scatter_flat(x: Tensor<1>, group: &ProcessGroup) -> Result<Tensor<1>> {
    flat(x, group, &Collective::ReduceScatter)
}

/// Every rank's `x`, concatenated in group-rank order.
pub fn all_gather_flat(x: Tensor<1>, group: &ProcessGroup) -> Result<Tensor<1>> {
    flat(x, group, &Collective::AllGather)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thread_world;
    use burn::tensor::Device;

    fn on_ranks<R: Send>(n: usize, f: impl Fn(ProcessGroup) -> R + Sync) -> Vec<R> {
        let groups = thread_world(n, std::time::Duration::from_secs(20));
        std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = (groups.into_iter())
                .map(|g| s.spawn(move || f(g)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn values(t: Tensor<1>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec().unwrap()
    }

    #[test]
    fn flat_collectives_match_the_typed_ones() {
        let out = on_ranks(2, |g| {
            let r = g.rank() as f32;
            let x = |v: Vec<f32>| Tensor::<1>::from_floats(v.as_slice(), &Device::default());
            let sum = all_reduce_flat(x(vec![r, 2.0 * r + 1.0]), &g, ReduceOp::Sum).unwrap();
            let mine = reduce_scatter_flat(x(vec![1.0 + r, 10.0 + r]), &g).unwrap();
            let all = all_gather_flat(x(vec![r]), &g).unwrap();
            let bad = reduce_scatter_flat(x(vec![1.0, 2.0, 3.0]), &g).unwrap_err();
            (values(sum), values(mine), values(all), bad.to_string())
        });
        assert_eq!(out[0].0, vec![1.0, 4.0]);
        assert_eq!(
            (out[0].1.clone(), out[1].1.clone()),
            (vec![3.0], vec![21.0])
        );
        assert_eq!(out[1].2, vec![0.0, 1.0]);
        assert!(
            out[0].3.contains("3 elements do not split into 2 chunks"),
            "{}",
            out[0].3
        );
    }

    /// A bf16 tensor moves as bf16: half the bytes of f32, and the sum is f32's, rounded once.
    #[test]
    fn bf16_tensors_go_over_the_wire_as_bf16() {
        let n = 1000;
        let out = on_ranks(2, |g| {
            let r = g.rank() as f32;
            let v: Vec<f32> = (0..n).map(|i| (i as f32).sin() * (r + 1.0) / 3.0).collect();
            let x = Tensor::<1>::from_floats(v.as_slice(), &Device::default());
            let x = x.cast(burn::tensor::FloatDType::BF16);
            let sum = all_reduce_flat(x.clone(), &g, ReduceOp::Sum).unwrap();
            let wide = all_reduce_flat(x.cast(burn::tensor::FloatDType::F32), &g, ReduceOp::Sum);
            let t = g.traffic();
            (
                sum.dtype(),
                values(sum),
                values(wide.unwrap()),
                t["all_reduce"],
            )
        });
        let (dtype, bf, f32_sum, traffic) = &out[0];
        assert_eq!(*dtype, TensorDType::BF16);
        let rounded: Vec<f32> = f32_sum
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(bf, &rounded);
        // One bf16 call of n·2 bytes and one f32 call of n·4.
        assert_eq!(traffic.calls, 2);
        assert_eq!(traffic.payload_bytes, (n * 2 + n * 4) as u64);
    }
}
