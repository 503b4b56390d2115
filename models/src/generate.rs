//! Generation with a KV cache, as transformers' `generate`: a left-padded prompt batch is
//! prefilled once, then each step feeds only the new tokens with explicit per-row positions;
//! only the last position goes through the LM head; a token is the argmax (greedy) or a
//! seeded draw from the warped logits (see `sampling.rs`); a row stops at one of the EOS ids
//! and is padded with `pad_token_id` from then on, exactly as transformers lays out
//! `sequences`.
//!
//! Owns: the decode loop, the positions and masks of a padded batch, each row's random
//! stream, stopping. Must not: communicate or read files (the caller brings ids and the stop
//! ids).

use burn::tensor::{Int, Tensor, TensorData};

use crate::batch::Batch;
use crate::forward_ctx::ForwardCtx;
use crate::kv_cache::KvCache;
use crate::model::Qwen3Model;
use crate::moe::RouterStats;
use crate::params::to_f32_vec;
use crate::route_replay::{RouteRecorder, RouteReplay};
use crate::sampling::{argmax, mix, Sampling};

/// A prompt batch `[batch, seq]`, row-major: token ids and the attention mask (1 on real
/// tokens). Left padding is what transformers takes; right padding is re-aligned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompts {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub batch: usize,
    pub seq: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// A row stops after generating any of these.
    pub eos_token_ids: Vec<i64>,
    /// What a stopped row is filled with.
    pub pad_token_id: i64,
    /// `None`: greedy.
    pub sampling: Option<Sampling>,
}

/// What [`Qwen3Model::generate`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// `[batch, len]` row-major: the left-padded prompts, then one token a step (`pad` once a
    /// row stopped); fewer than `max_new_tokens` steps when every row stopped early.
    pub sequences: Vec<i64>,
    pub batch: usize,
    pub len: usize,
    /// Per step, the f32 logits `[batch, vocab]` its tokens were chosen from, warped when
    /// sampling (transformers' `scores`); empty when the observer did not keep them.
    pub scores: Vec<Vec<f32>>,
    /// When the observer records: each MoE layer's routes of every position, laid out as
    /// `sequences` (see [`RouteRecorder`]).
    pub routes: Option<RouteReplay>,
    /// When the observer records: per row, the log-probability of each step's token under
    /// the distribution it was drawn from (the warped one when sampling), NaN once stopped.
    pub token_logps: Vec<Vec<f32>>,
    /// Per row, the step whose token finished it (an EOS id, or the observer stopped it);
    /// `None`: it ran to `max_new_tokens`.
    pub stopped_at: Vec<Option<usize>>,
}

impl Prompts {
    /// The same prompts left-padded: each row's real tokens moved to its end, in order.
    pub fn left_padded(&self) -> Prompts {
        let mut out = Prompts {
            ids: vec![0; self.ids.len()],
            mask: vec![0; self.mask.len()],
            ..*self
        };
        for r in 0..self.batch {
            let row = r * self.seq..(r + 1) * self.seq;
            let real: Vec<i64> = (row.clone())
                .filter(|&i| self.mask[i] != 0)
                .map(|i| self.ids[i])
                .collect();
            let start = row.end - real.len();
            out.ids[start..row.end].copy_from_slice(&real);
            out.mask[start..row.end].fill(1);
        }
        out
    }

    /// Each row's random stream: a hash of its real tokens and of how many identical prompts
    /// came before it in the batch, so a prompt draws the same tokens whatever the batch
    /// around it, and repeated prompts draw independent samples.
    pub fn streams(&self) -> Vec<u64> {
        let rows: Vec<Vec<i64>> = (0..self.batch)
            .map(|r| {
                (r * self.seq..(r + 1) * self.seq)
                    .filter(|&i| self.mask[i] != 0)
                    .map(|i| self.ids[i])
                    .collect()
            })
            .collect();
        (0..self.batch)
            .map(|r| {
                let content = rows[r]
                    .iter()
                    .fold(mix(rows[r].len() as u64), |h, &t| mix(h ^ t as u64));
                let before = rows[..r].iter().filter(|o| **o == rows[r]).count();
                mix(content ^ mix(before as u64))
            })
            .collect()
    }

    /// Real tokens per row.
    fn lengths(&self) -> Vec<usize> {
        (0..self.batch)
            .map(|r| {
                self.mask[r * self.seq..(r + 1) * self.seq]
                    .iter()
                    .filter(|&&m| m != 0)
                    .count()
            })
            .collect()
    }
}

/// Watches a generation step by step (streaming, stop strings, timing).
pub trait StepObserver {
    /// Row `r` got `tokens[r]` at `step` (`pad_token_id` once it had finished); `finished`
    /// holds each row's state after the EOS check. Setting an entry stops that row: it is
    /// padded from the next step on, as transformers' stopping criteria do.
    fn step(&mut self, step: usize, tokens: &[i64], finished: &mut [bool]);

    /// Whether [`Generated::scores`] is kept: `[batch, vocab]` f32 a step, too much memory
    /// for long generations with a real vocabulary.
    fn keep_scores(&self) -> bool {
        false
    }

    /// Whether [`Generated::routes`] and [`Generated::token_logps`] are recorded (RL rollouts).
    fn record(&self) -> bool {
        false
    }
}

/// [`Qwen3Model::generate`]'s observer: keeps the scores, stops nothing.
struct KeepScores;

impl StepObserver for KeepScores {
    fn step(&mut self, _: usize, _: &[i64], _: &mut [bool]) {}

    fn keep_scores(&self) -> bool {
        true
    }
}

impl Qwen3Model {
    /// Decodes `prompts` (see the module docs), adapters and precision as `ctx` says. Greedy
    /// argmax ties go to the lowest id, as `torch.argmax`.
    pub fn generate(
        &self,
        prompts: &Prompts,
        cfg: &GenerationConfig,
        ctx: &ForwardCtx,
    ) -> Generated {
        self.generate_with(prompts, cfg, ctx, &mut KeepScores)
    }

    /// [`Self::generate`], telling `observer` each step's tokens; it may stop rows.
    pub fn generate_with(
        &self,
        prompts: &Prompts,
        cfg: &GenerationConfig,
        ctx: &ForwardCtx,
        observer: &mut dyn StepObserver,
    ) -> Generated {
        let streams = prompts.streams();
        self.generate_streams(prompts, &streams, cfg, ctx, observer)
    }

    /// [`Self::generate_with`] with each row's random stream given (`streams[r]` for row
    /// `r`), for callers that name their samples themselves (GRPO: by generation and slot).
    pub fn generate_streams(
        &self,
        prompts: &Prompts,
        streams: &[u64],
        cfg: &GenerationConfig,
        ctx: &ForwardCtx,
        observer: &mut dyn StepObserver,
    ) -> Generated {
        let p = prompts.left_padded();
        let (b, s) = (p.batch, p.seq);
        let lengths = p.lengths();
        let mut cache = KvCache::new(self.layers.len(), s + cfg.max_new_tokens);
        // Keys a row may attend: its real prompt tokens, then every generated one.
        let mut valid: Vec<Vec<bool>> = (0..b)
            .map(|r| p.mask[r * s..(r + 1) * s].iter().map(|&m| m != 0).collect())
            .collect();
        let (mut logits, router) = self.prefill(&p, &mut cache, ctx);
        let k = self
            .config
            .moe
            .as_ref()
            .map_or(0, |m| m.num_experts_per_tok);
        let mut recorder = observer.record().then(|| RouteRecorder::new(b, k));
        if let Some(rec) = &mut recorder {
            rec.prefill(&router, &p.mask);
        }
        let mut rows: Vec<Vec<i64>> = (0..b).map(|r| p.ids[r * s..(r + 1) * s].to_vec()).collect();
        let mut finished = vec![false; b];
        let mut stopped_at = vec![None; b];
        let (mut scores, mut token_logps) = (
            Vec::new(),
            vec![Vec::new(); b * usize::from(observer.record())],
        );
        for step in 0..cfg.max_new_tokens {
            let next = self.choose(&mut logits, cfg, streams, &finished, step);
            if recorder.is_some() {
                let lp = chosen_logps(&logits, &next, &finished);
                token_logps
                    .iter_mut()
                    .zip(lp)
                    .for_each(|(row, x)| row.push(x));
            }
            for r in 0..b {
                finished[r] |= cfg.eos_token_ids.contains(&next[r]);
                rows[r].push(next[r]);
            }
            observer.step(step, &next, &mut finished);
            for r in 0..b {
                if finished[r] && stopped_at[r].is_none() {
                    stopped_at[r] = Some(step);
                }
            }
            if observer.keep_scores() {
                scores.push(std::mem::take(&mut logits));
            }
            if finished.iter().all(|&f| f) || step + 1 == cfg.max_new_tokens {
                break;
            }
            let positions: Vec<i64> = lengths.iter().map(|&n| (n + step) as i64).collect();
            valid.iter_mut().for_each(|v| v.push(true));
            let router;
            (logits, router) = self.decode_step(&next, &positions, &valid, &mut cache, ctx);
            if let Some(rec) = &mut recorder {
                rec.step(&router);
            }
        }
        let len = rows[0].len();
        Generated {
            sequences: rows.concat(),
            batch: b,
            len,
            scores,
            stopped_at,
            routes: recorder.map(|r| r.finish(len)),
            token_logps,
        }
    }

    /// Each row's token from its logits `[b, vocab]` (warped in place when sampling):
    /// `pad_token_id` for finished rows.
    fn choose(
        &self,
        logits: &mut [f32],
        cfg: &GenerationConfig,
        streams: &[u64],
        finished: &[bool],
        step: usize,
    ) -> Vec<i64> {
        let vocab = logits.len() / finished.len();
        (logits.chunks_mut(vocab).enumerate())
            .map(|(r, row)| match (finished[r], &cfg.sampling) {
                (true, _) => cfg.pad_token_id,
                (false, None) => argmax(row) as i64,
                (false, Some(s)) => {
                    s.warp(row);
                    s.draw(row, streams[r], step) as i64
                }
            })
            .collect()
    }

    /// Runs the left-padded prompts through the model, filling `cache`; the last position's
    /// logits `[b, vocab]`. Each pad is its own document, so real tokens never attend to
    /// pads and no pad row is fully masked; real tokens sit at positions 0..n.
    pub(crate) fn prefill(
        &self,
        p: &Prompts,
        cache: &mut KvCache,
        ctx: &ForwardCtx,
    ) -> (Vec<f32>, Vec<(usize, RouterStats)>) {
        let (b, s) = (p.batch, p.seq);
        let mut positions = vec![0i64; b * s];
        let mut documents = vec![0i64; b * s];
        for r in 0..b {
            let mut seen = 0;
            for i in r * s..(r + 1) * s {
                match p.mask[i] != 0 {
                    true => (positions[i], seen) = (seen, seen + 1),
                    false => documents[i] = -1 - (i as i64),
                }
            }
        }
        let batch = Batch::packed(&p.ids, &positions, &documents, b, s, &self.device());
        let bias = Tensor::<3>::zeros([b, s, s], &self.device())
            .mask_fill(batch.attention_block_mask(), f32::NEG_INFINITY)
            .reshape([b, 1, 1, s, s]);
        let (x, router) = self.stack(
            &batch.input_ids,
            &batch.position_ids,
            bias,
            Some(cache),
            ctx,
        );
        (self.last_logits(x, b, s, ctx), router)
    }

    /// One token per row at `positions`, attending the keys `valid` marks (the cached ones
    /// and this one); the logits `[b, vocab]`.
    fn decode_step(
        &self,
        tokens: &[i64],
        positions: &[i64],
        valid: &[Vec<bool>],
        cache: &mut KvCache,
        ctx: &ForwardCtx,
    ) -> (Vec<f32>, Vec<(usize, RouterStats)>) {
        let (b, device) = (tokens.len(), self.device());
        let keys = valid[0].len();
        let int =
            |v: &[i64]| Tensor::<2, Int>::from_data(TensorData::new(v.to_vec(), [b, 1]), &device);
        let bias: Vec<f32> = (valid.iter().flatten())
            .map(|&ok| if ok { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let bias = Tensor::<5>::from_data(TensorData::new(bias, [b, 1, 1, 1, keys]), &device);
        let (x, router) = self.stack(&int(tokens), &int(positions), bias, Some(cache), ctx);
        (self.last_logits(x, b, 1, ctx), router)
    }

    /// f32 logits `[b, vocab]` of the last of `s` positions of the normed rows `x [b·s, h]`.
    fn last_logits(&self, x: Tensor<2>, b: usize, s: usize, ctx: &ForwardCtx) -> Vec<f32> {
        let h = self.config.hidden_size;
        let last = x.reshape([b, s, h]).narrow(1, s - 1, 1);
        to_f32_vec(self.logits(last, ctx))
    }
}

/// Each row's log-probability of `next` under its (warped) logits `[b, vocab]`; NaN for rows
/// already `finished` (their token is padding).
fn chosen_logps(logits: &[f32], next: &[i64], finished: &[bool]) -> Vec<f32> {
    let vocab = logits.len() / next.len().max(1);
    (logits.chunks(vocab).zip(next).zip(finished))
        .map(|((row, &t), &done)| match done {
            true => f32::NAN,
            false => {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&z| ((z - max) as f64).exp()).sum();
                row[t as usize] - max - sum.ln() as f32
            }
        })
        .collect()
}
