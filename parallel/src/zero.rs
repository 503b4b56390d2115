//! Data-parallel gradient sync over a flat view of the parameters, in buckets, with or
//! without ZeRO-1. The flat buffer is the parameters in model order; each bucket is padded to
//! a multiple of the DP size and split into equal chunks, chunk r of every bucket belonging to
//! DP rank r (as Megatron's distributed optimizer), so a reduce-scatter per bucket leaves each
//! rank the summed gradients of exactly the elements whose optimizer state it owns.

use std::ops::Range;

use burn::tensor::{Device, Tensor};

use crate::comm::ReduceOp;
use crate::error::Result;
use crate::flat::{all_gather_flat, all_reduce_flat, reduce_scatter_flat};
use crate::group::ProcessGroup;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSlot {
    pub name: String,
    /// Start in the flat buffer.
    pub offset: usize,
    pub len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub start: usize,
    pub len: usize,
    /// Elements per DP rank: `len` rounded up to a multiple of the DP size, divided by it.
    pub chunk: usize,
}

/// A contiguous run of one parameter inside a flat range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Index into `FlatLayout::params`.
    pub param: usize,
    /// Offset inside the parameter.
    pub param_offset: usize,
    /// Start in the flat buffer.
    pub flat_start: usize,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    pub params: Vec<ParamSlot>,
    pub total: usize,
    pub buckets: Vec<Bucket>,
    pub dp: usize,
}

impl FlatLayout {
    /// `params` in model order as (name, elements); buckets of `bucket_elems` (≥ 1).
    pub fn new(params: Vec<(String, usize)>, dp: usize, bucket_elems: usize) -> Self {
        let mut offset = 0;
        let params: Vec<ParamSlot> = params
            .into_iter()
            .map(|(name, len)| {
                offset += len;
                ParamSlot {
                    name,
                    offset: offset - len,
                    len,
                }
            })
            .collect();
        let total = offset;
        let step = bucket_elems.max(1);
        let buckets = (0..total)
            .step_by(step)
            .map(|start| {
                let len = step.min(total - start);
                Bucket {
                    start,
                    len,
                    chunk: len.div_ceil(dp),
                }
            })
            .collect();
        Self {
            params,
            total,
            buckets,
            dp,
        }
    }

    /// Padded elements over all buckets (what the reduce-scatters and all-gathers move).
    pub fn padded_total(&self) -> usize {
        self.buckets.iter().map(|b| b.chunk * self.dp).sum()
    }

    /// The flat ranges DP rank `r` owns (one per bucket, padding excluded; may be empty).
    pub fn shard(&self, r: usize) -> Vec<Range<usize>> {
        self.buckets
            .iter()
            .map(|b| {
                let lo = (r * b.chunk).min(b.len);
                let hi = ((r + 1) * b.chunk).min(b.len);
                b.start + lo..b.start + hi
            })
            .collect()
    }

    /// The parameter pieces covering `ranges`, in flat order.
    pub fn segments(&self, ranges: &[Range<usize>]) -> Vec<Segment> {
        let mut out = Vec::new();
        for range in ranges {
            let first = self
                .params
                .partition_point(|p| p.offset + p.len <= range.start);
            for (i, p) in self.params.iter().enumerate().skip(first) {
                if p.offset >= range.end {
                    break;
                }
                let lo = range.start.max(p.offset);
                let hi = range.end.min(p.offset + p.len);
                if hi > lo {
                    out.push(Segment {
                        param: i,
                        param_offset: lo - p.offset,
                        flat_start: lo,
                        len: hi - lo,
                    });
                }
            }
        }
        out
    }
}

/// Gradient and parameter traffic of data parallelism on the DP group, on flat tensors that
/// stay where they are (a GPU's memory under NCCL: `flat.rs`).
pub struct GradSync<'a> {
    pub group: &'a ProcessGroup,
    pub layout: &'a FlatLayout,
}

impl GradSync<'_> {
    /// Sums `flat` gradients over the DP group, bucket by bucket (plain DP).
    pub fn all_reduce(&self, flat: Tensor<1>) -> Result<Tensor<1>> {
        let buckets = &self.layout.buckets;
        if let [b] = buckets.as_slice() {
            debug_assert_eq!(b.len, self.layout.total);
            return all_reduce_flat(flat, self.group, ReduceOp::Sum);
        }
        let mut out = Vec::with_capacity(buckets.len());
        for b in buckets {
            let part = flat.clone().slice(b.start..b.start + b.len);
            out.push(all_reduce_flat(part, self.group, ReduceOp::Sum)?);
        }
        Ok(cat(out, &flat.device()))
    }

    /// ZeRO-1: the summed gradients of this rank's shard, concatenated in shard order.
    pub fn reduce_scatter(&self, flat: Tensor<1>) -> Result<Tensor<1>> {
        let (me, dp, device) = (self.group.rank(), self.layout.dp, flat.device());
        let mut out = Vec::with_capacity(self.layout.buckets.len());
        for (b, range) in self.layout.buckets.iter().zip(self.layout.shard(me)) {
            let part = flat.clone().slice(b.start..b.start + b.len);
            let padded = pad(part, b.chunk * dp, &device);
            let mine = reduce_scatter_flat(padded, self.group)?;
            out.push(mine.slice(0..range.len()));
        }
        Ok(cat(out, &device))
    }

    /// ZeRO-1: every rank's updated shard (each passes its own, in `reduce_scatter`'s
    /// layout), gathered into the whole flat buffer.
    pub fn all_gather(&self, shard: Tensor<1>) -> Result<Tensor<1>> {
        let (me, device) = (self.group.rank(), shard.device());
        let mut at = 0;
        let mut out = Vec::with_capacity(self.layout.buckets.len());
        for (b, range) in self.layout.buckets.iter().zip(self.layout.shard(me)) {
            let piece = shard.clone().slice(at..at + range.len());
            at += range.len();
            let full = all_gather_flat(pad(piece, b.chunk, &device), self.group)?;
            out.push(full.slice(0..b.len));
        }
        Ok(cat(out, &device))
    }
}

/// `x` with zeros appended up to `len` elements.
fn pad(x: Tensor<1>, len: usize, device: &Device) -> Tensor<1> {
    let n = x.shape().num_elements();
    match len > n {
        true => Tensor::cat(vec![x, Tensor::zeros([len - n], device)], 0),
        false => x,
    }
}

/// The parts end to end (none: an empty tensor).
pub fn cat(mut parts: Vec<Tensor<1>>, device: &Device) -> Tensor<1> {
    match parts.len() {
        0 => Tensor::zeros([0], device),
        1 => parts.remove(0),
        _ => Tensor::cat(parts, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_element_once() {
        let params = vec![
            ("a".to_string(), 7),
            ("b".to_string(), 5),
            ("c".to_string(), 11),
        ];
        for dp in 1..5 {
            for bucket in [1, 4, 6, 100] {
                let l = FlatLayout::new(params.clone(), dp, bucket);
                let mut seen = vec![0; l.total];
                for r in 0..dp {
                    let segs = l.segments(&l.shard(r));
                    for s in segs {
                        let p = &l.params[s.param];
                        assert!(s.param_offset + s.len <= p.len);
                        assert_eq!(p.offset + s.param_offset, s.flat_start);
                        for x in &mut seen[s.flat_start..s.flat_start + s.len] {
                            *x += 1;
                        }
                    }
                }
                assert!(
                    seen.iter().all(|&c| c == 1),
                    "dp {dp} bucket {bucket}: {seen:?}"
                );
                assert_eq!(l.padded_total() % dp, 0);
            }
        }
    }
}
