//! Runs one pipeline rank's plan (`schedule.rs`) over its stage model for one step: each
//! forward takes the previous stage's activation as a leaf that requires gradients, each
//! backward is seeded with the next stage's gradient of that activation, and each exchange is
//! one grouped send/receive over the pipeline group, so neighbours never wait on each other's
//! blocking sends.
//!
//! The MoE load-balancing loss is transformers' over every layer of a forward, a product of
//! the whole forward's assignment counts and each layer's router probabilities: the counts
//! travel with the activations (each stage adds its layers'), the last stage sends the total
//! back with the gradient, and each stage adds its layers' share of the loss to its backward
//! (`Qwen3Model::stage_router_losses`), which gives every router exactly the one-rank gradient.
//!
//! Owns: the activations, saved graphs and messages in flight during one step. Must not:
//! decide the order (`schedule.rs`), sync or apply gradients (the engine does).

use std::collections::BTreeMap;
use std::ops::Range;

use burn::tensor::{Tensor, TensorData};
use moeru_models::moe::RouterStats;
use moeru_models::params::{to_f32_vec, ParamVisitor, Params};
use moeru_models::{ForwardCtx, Qwen3Model};
use moeru_parallel::{CommError, ProcessGroup, ReduceOp};

use super::recompute::{self, StagePass};
use super::schedule::{Action, Compute, Payload, PipelineShape, Transfer};
use crate::engine::grads::GradBuffer;
use crate::engine::MicroBatch;
use crate::objective::{Objective, StepReport};
use crate::recipe::schema::Recompute;

/// The message tag of the pipeline's exchanges.
const TAG: u32 = 0x5050;

/// The tied embedding's name: held by the first stage (the input) and the last (the head).
pub const TIED: &str = "model.embed_tokens.weight";

/// One rank's pipeline: its plan and the layers of every virtual stage.
pub struct PipelineRun<'g> {
    pub group: &'g ProcessGroup,
    pub shape: PipelineShape,
    /// The layer range of each virtual stage.
    pub stages: Vec<Range<usize>>,
    /// This rank's actions, in order.
    pub plan: Vec<Action>,
    /// A tied embedding: the group of its two copies, whose gradients are summed.
    pub tied: Option<&'g ProcessGroup>,
    /// What a forward keeps for its backward (`train.recompute`).
    pub recompute: Recompute,
}

/// What a forward left for its backward.
struct Saved {
    pass: StagePass,
    /// The stage's output rows (the final rows on the last stage).
    output: Tensor<2>,
    /// The last stage's loss.
    loss: Option<Tensor<1>>,
    /// The assignment counts: of the stages so far, or on the last stage the whole forward's.
    counts: Vec<f32>,
}

/// What one step's computes share: the inputs and the messages in flight.
struct Step<'a> {
    model: &'a mut Qwen3Model,
    /// Under recompute, the model with its parameters detached (the forwards that keep no
    /// graph).
    frozen: Option<Qwen3Model>,
    objective: &'a dyn Objective,
    micro: &'a [MicroBatch],
    base: ForwardCtx,
    counts: &'a [f64],
    report: &'a mut StepReport,
    grads: GradBuffer,
    saved: BTreeMap<(usize, usize), Saved>,
    /// Messages by (payload, micro-batch, sending virtual stage): rows, then the
    /// assignment counts.
    inbox: BTreeMap<(u8, usize, usize), Vec<f32>>,
    outbox: BTreeMap<(u8, usize, usize), Vec<f32>>,
    /// The computes in the order they ran (for the tests of the executed order).
    ran: Vec<Compute>,
}

fn key(payload: Payload, mb: usize, from_stage: usize) -> (u8, usize, usize) {
    (payload as u8, mb, from_stage)
}

impl PipelineRun<'_> {
    /// Runs the plan over `micro` and returns the accumulated gradients of this rank's
    /// trainable parameters and the computes in the order they ran.
    pub fn run(
        &self,
        model: &mut Qwen3Model,
        objective: &dyn Objective,
        micro: &[MicroBatch],
        base: ForwardCtx,
        counts: &[f64],
        report: &mut StepReport,
    ) -> Result<(GradBuffer, Vec<Compute>), CommError> {
        let frozen = (self.recompute != Recompute::None).then(|| model.frozen());
        let mut step = Step {
            model,
            frozen,
            objective,
            micro,
            base,
            counts,
            report,
            grads: GradBuffer::default(),
            saved: BTreeMap::new(),
            inbox: BTreeMap::new(),
            outbox: BTreeMap::new(),
            ran: Vec::new(),
        };
        for action in &self.plan {
            match action {
                Action::Compute(c) if !c.backward => self.forward(&mut step, *c),
                Action::Compute(c) => self.backward(&mut step, *c),
                Action::Exchange(transfers) => self.exchange(&mut step, transfers)?,
            }
            if let Action::Compute(c) = action {
                step.ran.push(*c);
            }
        }
        Ok((step.grads, step.ran))
    }

    /// Sums the tied embedding's gradient over its two copies (the input's on the first
    /// stage, the head's on the last), so that both update alike and stay equal.
    pub fn sum_tied(&self, grads: &mut GradBuffer) -> Result<(), CommError> {
        let Some(group) = self.tied.filter(|g| g.size() > 1) else {
            return Ok(());
        };
        let Some(g) = grads.grads.get_mut(TIED) else {
            return Ok(());
        };
        let device = g.device();
        let mut flat = to_f32_vec(g.clone());
        group.all_reduce(&mut flat, ReduceOp::Sum)?;
        let n = flat.len();
        *g = Tensor::<1>::from_data(TensorData::new(flat, [n]), &device);
        Ok(())
    }

    /// Whether the tied embedding's two copies are equal bit for bit, as their identical
    /// updates keep them (true without a tied embedding).
    pub fn tied_copies_equal(&self, model: &Qwen3Model) -> Result<bool, CommError> {
        let Some(group) = self.tied.filter(|g| g.size() > 1) else {
            return Ok(true);
        };
        struct Digest(u64);
        impl ParamVisitor for Digest {
            fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
                if name == TIED {
                    for x in to_f32_vec(param.clone()) {
                        self.0 = (self.0 ^ x.to_bits() as u64).wrapping_mul(0x0100_0000_01b3);
                    }
                }
            }
        }
        let mut d = Digest(0xcbf2_9ce4_8422_2325);
        // A clone shares the tensors; visiting needs it mutable.
        model.clone().visit_params(&mut d);
        // Two f64 halves carry the 64-bit digest exactly.
        let mine = [(d.0 >> 32) as f64, (d.0 & 0xffff_ffff) as f64];
        let all = group.all_gather(&mine)?;
        Ok(all.chunks(2).all(|c| c == mine))
    }

    fn stage_of(&self, c: Compute) -> usize {
        c.chunk * self.shape.pp + self.group.rank()
    }

    fn is_last(&self, stage: usize) -> bool {
        stage + 1 == self.stages.len()
    }

    /// Forward of micro-batch `c.mb` through virtual stage `c`'s layers.
    fn forward(&self, st: &mut Step, c: Compute) {
        let stage = self.stage_of(c);
        let micro = st.micro;
        let mb = &micro[c.mb];
        let [b, s] = mb.batch.dims();
        let h = st.model.config.hidden_size;
        let (input, mut counts) = match stage {
            0 => (None, vec![0.0; experts(st.model)]),
            _ => {
                let msg = take(&mut st.inbox, key(Payload::Activation, c.mb, stage - 1));
                let (leaf, counts) = self.unpack(st, c.mb, msg);
                (Some(leaf.require_grad()), counts)
            }
        };
        let ctx = mb.ctx(&st.base);
        let last = self.is_last(stage);
        let layers = self.stages[stage].clone();
        let model = &*st.model;
        let frozen = st.frozen.as_ref().unwrap_or(model);
        let (output, router, pass) = recompute::forward(
            self.recompute,
            model,
            frozen,
            &mb.batch,
            input,
            layers,
            last,
            &ctx,
        );
        st.report.add_router(&router);
        let stats: Vec<RouterStats> = router.into_iter().map(|(_, s)| s).collect();
        add_counts(&mut counts, model.stage_counts(&stats));
        let loss = match last {
            true => {
                let hidden = output.clone().reshape([b, s, h]);
                Some((st.objective).head_loss(model, mb, hidden, &ctx, st.counts, st.report))
            }
            false => {
                let msg = pack(&output, &counts);
                st.outbox.insert(key(Payload::Activation, c.mb, stage), msg);
                None
            }
        };
        let saved = Saved {
            pass,
            output,
            loss,
            counts,
        };
        st.saved.insert((c.mb, c.chunk), saved);
    }

    /// Backward of micro-batch `c.mb` through virtual stage `c`: from the loss on the last
    /// stage, else seeded with the received gradient of the stage's output; the gradient of
    /// the stage's input goes back with the whole forward's counts.
    fn backward(&self, st: &mut Step, c: Compute) {
        let stage = self.stage_of(c);
        let saved = (st.saved.remove(&(c.mb, c.chunk))).expect("the plan runs a forward first");
        let (seed, counts) = match saved.loss {
            Some(loss) => (loss, saved.counts),
            None => {
                let msg = take(&mut st.inbox, key(Payload::Gradient, c.mb, stage + 1));
                let (grad, counts) = self.unpack(st, c.mb, msg);
                ((saved.output.clone() * grad).sum(), counts)
            }
        };
        let mb = &st.micro[c.mb];
        let ctx = mb.ctx(&st.base);
        let whole: Vec<u64> = counts.iter().map(|&c| c as u64).collect();
        let (model, report) = (&*st.model, &mut *st.report);
        let (objective, step_counts) = (st.objective, st.counts);
        let mut terms = |seed: Tensor<1>, stats: &[RouterStats]| {
            add_router_losses(model, objective, step_counts, report, seed, stats, &whole)
        };
        let grad = (saved.pass).backward(
            model,
            &mb.batch,
            &saved.output,
            seed,
            &ctx,
            &mut terms,
            &mut st.grads,
        );
        if let Some(grad) = grad {
            let msg = pack(&grad, &counts);
            st.outbox.insert(key(Payload::Gradient, c.mb, stage), msg);
        }
    }

    /// One grouped exchange: the sends the previous computes produced, the receives the
    /// next ones need (sized from the micro-batch: rows of `hidden`, then the counts).
    fn exchange(&self, st: &mut Step, transfers: &[Transfer]) -> Result<(), CommError> {
        let sends: Vec<(Vec<f32>, usize)> = (transfers.iter().filter(|t| t.send))
            .map(|t| {
                let msg = take(&mut st.outbox, key(t.payload, t.mb, t.from_stage));
                (msg, t.peer)
            })
            .collect();
        let wanted: Vec<&Transfer> = transfers.iter().filter(|t| !t.send).collect();
        let mut bufs: Vec<Vec<f32>> = (wanted.iter())
            .map(|t| vec![0.0; self.message_len(st, t.mb)])
            .collect();
        let send_refs: Vec<(&[f32], usize)> = sends.iter().map(|(m, p)| (&m[..], *p)).collect();
        let mut recvs: Vec<(&mut [f32], usize)> = (bufs.iter_mut().zip(&wanted))
            .map(|(b, t)| (&mut b[..], t.peer))
            .collect();
        self.group.exchange(&send_refs, &mut recvs, TAG)?;
        for (buf, t) in bufs.into_iter().zip(wanted) {
            st.inbox.insert(key(t.payload, t.mb, t.from_stage), buf);
        }
        Ok(())
    }

    /// This rank's rows of micro-batch `mb`'s residual stream: a tensor-parallel rank's
    /// share under sequence parallelism.
    fn local_rows(&self, st: &Step, mb: usize) -> usize {
        let [b, s] = st.micro[mb].batch.dims();
        let shard = st.model.shard();
        let shards = if shard.sequence_parallel() {
            shard.tp
        } else {
            1
        };
        b * s / shards
    }

    /// Floats in a message of micro-batch `mb`: its rows, then one count per expert on a
    /// MoE model.
    fn message_len(&self, st: &Step, mb: usize) -> usize {
        self.local_rows(st, mb) * st.model.config.hidden_size + experts(st.model)
    }

    /// A message's rows `[local rows, hidden]` and counts.
    fn unpack(&self, st: &Step, mb: usize, mut msg: Vec<f32>) -> (Tensor<2>, Vec<f32>) {
        let (rows, h) = (self.local_rows(st, mb), st.model.config.hidden_size);
        let counts = msg.split_off(rows * h);
        let t = Tensor::<2>::from_data(TensorData::new(msg, [rows, h]), &st.model.device());
        (t, counts)
    }
}

/// Experts per MoE layer (0 on a dense model): the length of the counts a message carries.
fn experts(model: &Qwen3Model) -> usize {
    model.config.moe.as_ref().map_or(0, |m| m.num_experts)
}

fn take(map: &mut BTreeMap<(u8, usize, usize), Vec<f32>>, k: (u8, usize, usize)) -> Vec<f32> {
    map.remove(&k)
        .unwrap_or_else(|| panic!("pipeline message {k:?} is missing: the plan is inconsistent"))
}

/// `rows` flat, then `counts`.
fn pack(rows: &Tensor<2>, counts: &[f32]) -> Vec<f32> {
    let mut msg = to_f32_vec(rows.clone());
    msg.extend_from_slice(counts);
    msg
}

/// Adds this stage's assignment counts to those received (exact in f32 below 2²⁴).
fn add_counts(acc: &mut [f32], mine: Option<Vec<u64>>) {
    let Some(mine) = mine else { return };
    for (a, m) in acc.iter_mut().zip(mine) {
        *a += m as f32;
    }
}

/// `seed` plus the shares of the router losses of `stats`' layers (given the whole forward's
/// assignment `counts`), weighted and averaged over micro-batches as the whole model's are
/// and added in the same order (`RouterOut::add_to`), and reported.
fn add_router_losses(
    model: &Qwen3Model,
    objective: &dyn Objective,
    step_counts: &[f64],
    report: &mut StepReport,
    mut seed: Tensor<1>,
    stats: &[RouterStats],
    counts: &[u64],
) -> Tensor<1> {
    let (aux, z) = model.stage_router_losses(stats, counts);
    let (w, n) = (objective.aux_weights(), step_counts[1]);
    if let Some(aux) = aux {
        *report.aux_loss.get_or_insert(0.0) += to_f32_vec(aux.clone())[0] as f64 / n;
        seed = seed + aux.mul_scalar(w.load_balancing / n);
    }
    if let Some(z) = z {
        *report.z_loss.get_or_insert(0.0) += to_f32_vec(z.clone())[0] as f64 / n;
        if w.z_loss > 0.0 {
            seed = seed + z.mul_scalar(w.z_loss / n);
        }
    }
    seed
}
