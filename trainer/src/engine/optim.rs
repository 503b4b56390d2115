//! AdamW exactly as `torch.optim.AdamW` computes it (decoupled decay, bias correction), with
//! no weight decay on norms and biases. One implementation for every layout: the optimizer
//! updates *pieces* (a whole parameter, or under ZeRO-1 the run of one parameter's elements
//! this rank owns) and owns their moments, which it hands to the checkpoint in either layout.
//!
//! Owns: the moments and the step count. Must not: communicate (the gradient sync gives it
//! its pieces and publishes what it returns) or know which layout the pieces come from
//! beyond what a checkpoint needs.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::tensor::{Device, Tensor, TensorData};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments of a flat run of elements, outside the autodiff graph.
#[derive(Debug, Clone)]
pub struct Moments {
    pub exp_avg: Tensor<1>,
    pub exp_avg_sq: Tensor<1>,
}

/// A flat run of one parameter's elements that this rank updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub name: String,
    /// First element within the parameter.
    pub offset: usize,
    pub len: usize,
    /// Elements of the whole parameter.
    pub param_len: usize,
}

impl Piece {
    pub fn whole(name: &str, len: usize) -> Self {
        Self {
            name: name.to_string(),
            offset: 0,
            len,
            param_len: len,
        }
    }

    pub fn is_whole(&self) -> bool {
        self.offset == 0 && self.len == self.param_len
    }
}

/// Where the pieces sit in the ZeRO-1 flat layout, for the checkpoint's shard files.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardPlacement {
    pub rank: usize,
    pub size: usize,
    /// The flat ranges this rank owns, in order (the pieces, concatenated, fill them).
    pub ranges: Vec<Range<usize>>,
    /// (name, elements) of every parameter in flat order.
    pub params: Vec<(String, usize)>,
}

/// The moments as a checkpoint stores them.
pub enum SavedMoments<'a> {
    /// One pair per parameter, by name.
    Whole(BTreeMap<&'a str, &'a Moments>),
    /// This rank's shard: the pieces' moments, to be concatenated in this (flat) order;
    /// handles, read when the checkpoint file is written.
    Shard {
        placement: &'a ShardPlacement,
        exp_avg: Vec<Tensor<1>>,
        exp_avg_sq: Vec<Tensor<1>>,
    },
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken (torch's `state["step"]`).
    pub steps: u64,
    pieces: Vec<Piece>,
    moments: Vec<Moments>,
    shard: Option<ShardPlacement>,
}

/// Norms and biases are not decayed (the usual LLM practice; torch is told the same by groups).
pub fn decays(name: &str) -> bool {
    !(name.ends_with("norm.weight") || name.ends_with(".bias"))
}

impl AdamW {
    /// An optimizer for `pieces`, with `steps` taken and the moments cut from `whole` (whole
    /// moments per parameter, as a checkpoint restores them; a missing one starts at zero).
    /// `shard`: where the pieces sit under ZeRO-1.
    pub fn new(
        config: AdamWConfig,
        pieces: Vec<Piece>,
        shard: Option<ShardPlacement>,
        steps: u64,
        whole: &BTreeMap<String, Moments>,
        device: &Device,
    ) -> Self {
        let cut = |m: &Tensor<1>, p: &Piece| -> Tensor<1> {
            if p.is_whole() {
                m.clone()
            } else {
                m.clone().slice(p.offset..p.offset + p.len)
            }
        };
        let moments = pieces
            .iter()
            .map(|p| match whole.get(&p.name) {
                Some(m) => Moments {
                    exp_avg: cut(&m.exp_avg, p),
                    exp_avg_sq: cut(&m.exp_avg_sq, p),
                },
                None => Moments {
                    exp_avg: Tensor::zeros([p.len], device),
                    exp_avg_sq: Tensor::zeros([p.len], device),
                },
            })
            .collect();
        Self {
            config,
            steps,
            pieces,
            moments,
            shard,
        }
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The moments of each piece, in piece order.
    pub fn moments(&self) -> &[Moments] {
        &self.moments
    }

    /// Elements whose moments this rank holds.
    pub fn held_elements(&self) -> usize {
        self.pieces.iter().map(|p| p.len).sum()
    }

    /// One update with learning rate `lr` of `params` by `grads` (both flat, one per piece, in
    /// piece order). Returns the new values.
    pub fn step(
        &mut self,
        lr: f64,
        params: Vec<Tensor<1>>,
        grads: Vec<Tensor<1>>,
    ) -> Vec<Tensor<1>> {
        self.steps += 1;
        let mut out = Vec::with_capacity(params.len());
        let it = self
            .pieces
            .iter()
            .zip(&mut self.moments)
            .zip(params.into_iter().zip(grads));
        for ((piece, moments), (p, g)) in it {
            let decay = if decays(&piece.name) {
                self.config.weight_decay
            } else {
                0.0
            };
            // Handed over, so that the update can write them in place.
            let placeholder = Tensor::<1>::empty([0], &p.device());
            let held = Moments {
                exp_avg: placeholder.clone(),
                exp_avg_sq: placeholder,
            };
            let taken = std::mem::replace(moments, held);
            let (p, m) = adamw_update(&self.config, self.steps, lr, decay, p, g, taken);
            *moments = m;
            out.push(p);
        }
        out
    }

    /// The moments in the layout the checkpoint writes.
    pub fn saved_moments(&self) -> SavedMoments<'_> {
        match &self.shard {
            None => SavedMoments::Whole(
                self.pieces
                    .iter()
                    .zip(&self.moments)
                    .map(|(p, m)| (p.name.as_str(), m))
                    .collect(),
            ),
            Some(placement) => SavedMoments::Shard {
                placement,
                exp_avg: self.moments.iter().map(|m| m.exp_avg.clone()).collect(),
                exp_avg_sq: self.moments.iter().map(|m| m.exp_avg_sq.clone()).collect(),
            },
        }
    }
}

/// A flat tensor of `values` on `device`.
pub fn flat_tensor(values: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// One AdamW update of a flat run of elements (a whole parameter, or a piece of one under
/// ZeRO-1: the math is elementwise, so a piece updates exactly as it would in the whole).
/// `steps` counts this step. Returns the new values and moments.
pub fn adamw_update(
    c: &AdamWConfig,
    steps: u64,
    lr: f64,
    decay: f64,
    p: Tensor<1>,
    g: Tensor<1>,
    moments: Moments,
) -> (Tensor<1>, Moments) {
    let t = steps as i32;
    let bias1 = 1.0 - c.beta1.powi(t);
    let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
    let scalars = [
        (1.0 - lr * decay) as f32,
        (1.0 - c.beta1) as f32,
        c.beta2 as f32,
        (1.0 - c.beta2) as f32,
        bias2_sqrt as f32,
        c.eps as f32,
        (lr / bias1) as f32,
    ];
    let (m, v) = (moments.exp_avg, moments.exp_avg_sq);
    // One pass on the CPU (moeru_models::adamw_op); the same arithmetic as torch's AdamW.
    let (p, m, v) = moeru_models::adamw_op::adamw_update(p, g, m, v, scalars);
    (
        p,
        Moments {
            exp_avg: m,
            exp_avg_sq: v,
        },
    )
}
