//! Rollouts: completions generated with the KV-cache generator for a rank's slots of a
//! generation batch, and rollouts as training micro-batches (prompt ++ completion rows, the
//! loss on completion tokens, the stop token included, as TRL's `completion_mask`).
//!
//! A slot's random stream is a function of the generation index and the slot alone, so the
//! tokens do not depend on the batch around a row, the rank that generates it or a resume.
//!
//! Owns: generating and laying out rollouts. Must not: score them or communicate.

use burn::tensor::{Tensor, TensorData};
use moeru_models::generate::{GenerationConfig, Prompts, StepObserver};
use moeru_models::moe::RouterStats;
use moeru_models::params::to_f32_vec;
use moeru_models::route_replay::LIVE;
use moeru_models::sampling::{mix, Sampling};
use moeru_models::{ForwardCtx, Qwen3Model, RouteReplay};
use std::collections::BTreeMap;
use std::sync::Arc;

use super::objective::token_logps;
use crate::engine::MicroBatch;

/// What a rollout micro-batch carries besides its tokens.
#[derive(Debug, Clone)]
pub struct RolloutRows {
    /// One advantage per row.
    pub advantages: Vec<f32>,
    /// The log-probs `[rows, seq]` of the policy that generated them (`None`: this is that
    /// policy's only update on them, so the live log-probs detached are the old ones).
    pub old: Option<Tensor<2>>,
    /// The reference's log-probs `[rows, seq]` (`None` when `grpo.beta` is 0).
    pub reference: Option<Tensor<2>>,
    /// The log-probs the generator drew the completion tokens with `[rows, seq]` (at
    /// `seq` positions as the targets; `None` unless recorded): the rollout-vs-training
    /// mismatch metrics.
    pub sampled: Option<Tensor<2>>,
}

/// One completion of a generation batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Its index in the generation batch: prompt slot × `num_generations` + sample.
    pub slot: usize,
    /// The prompt set's row.
    pub prompt: usize,
    pub prompt_ids: Vec<i32>,
    /// The completion's ids, the stop token included when it stopped.
    pub completion: Vec<i64>,
    /// It ended at a stop id (else at `max_new_tokens`).
    pub stopped: bool,
    /// When recorded: each MoE layer's routes of the row's tokens (prompt ++ completion,
    /// `[len · top_k]`, the last token [`LIVE`]: it was never fed).
    pub routes: BTreeMap<usize, Vec<i64>>,
    /// When recorded: each completion token's log-prob under the distribution it was drawn
    /// from.
    pub sampled_logps: Vec<f32>,
}

/// How rollouts are generated.
#[derive(Debug, Clone)]
pub struct RolloutConfig {
    pub max_new_tokens: usize,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: i64,
    /// `None`: greedy.
    pub sampling: Option<Sampling>,
    /// Rows decoded together.
    pub batch_size: usize,
    /// Record routes and sampled log-probs (router replay, mismatch metrics).
    pub record: bool,
}

/// Stops nothing and keeps no scores (they would cost `[rows, vocab]` a step); records
/// routes and sampled log-probs when asked.
struct Recording(bool);

impl StepObserver for Recording {
    fn step(&mut self, _: usize, _: &[i64], _: &mut [bool]) {}

    fn record(&self) -> bool {
        self.0
    }
}

/// The random stream of `slot` in generation `generation`.
pub fn stream(generation: u64, slot: usize) -> u64 {
    mix(mix(generation ^ 0x6772_706f) ^ slot as u64)
}

/// Completes `rows` (slot, prompt set row, prompt ids) under `model`, `rows.len()` at most
/// `cfg.batch_size` at a time.
pub fn generate(
    model: &Qwen3Model,
    rows: &[(usize, usize, Vec<i32>)],
    generation: u64,
    cfg: &RolloutConfig,
    ctx: &ForwardCtx,
) -> Vec<Rollout> {
    let gen_cfg = GenerationConfig {
        max_new_tokens: cfg.max_new_tokens,
        eos_token_ids: cfg.eos_token_ids.clone(),
        pad_token_id: cfg.pad_token_id,
        sampling: cfg.sampling.clone(),
    };
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(cfg.batch_size.max(1)) {
        let prompts = left_pad(
            chunk.iter().map(|(_, _, ids)| ids.as_slice()),
            cfg.pad_token_id,
        );
        let streams: Vec<u64> = chunk
            .iter()
            .map(|(slot, ..)| stream(generation, *slot))
            .collect();
        let mut observer = Recording(cfg.record);
        let g = model.generate_streams(&prompts, &streams, &gen_cfg, ctx, &mut observer);
        for (r, (slot, prompt, ids)) in chunk.iter().enumerate() {
            let row = &g.sequences[r * g.len + prompts.seq..(r + 1) * g.len];
            let (completion, stopped) = match g.stopped_at[r] {
                Some(step) => (row[..=step].to_vec(), true),
                None => (row.to_vec(), false),
            };
            let span = (prompts.seq - ids.len(), prompts.seq + completion.len());
            out.push(Rollout {
                slot: *slot,
                prompt: *prompt,
                prompt_ids: ids.clone(),
                routes: row_routes(g.routes.as_ref(), r, g.len, span),
                sampled_logps: match g.routes.is_some() {
                    true => g.token_logps[r][..completion.len()].to_vec(),
                    false => Vec::new(),
                },
                completion,
                stopped,
            });
        }
    }
    out
}

/// Row `r`'s routes over positions `span` of the generated `[rows, len]` layout, the last
/// position live (whether or not other rows' decoding fed it).
fn row_routes(
    routes: Option<&RouteReplay>,
    r: usize,
    len: usize,
    span: (usize, usize),
) -> BTreeMap<usize, Vec<i64>> {
    let Some(routes) = routes else {
        return BTreeMap::new();
    };
    let k = routes.top_k;
    let (from, to) = ((r * len + span.0) * k, (r * len + span.1) * k);
    (routes.layers.iter())
        .map(|(&layer, ids)| {
            let mut row = ids[from..to].to_vec();
            let n = row.len();
            row[n - k..].fill(LIVE);
            (layer, row)
        })
        .collect()
}

/// Prompts `[batch, longest]`, left-padded with `pad`.
fn left_pad<'a>(rows: impl Iterator<Item = &'a [i32]> + Clone, pad: i64) -> Prompts {
    let seq = rows.clone().map(<[i32]>::len).max().unwrap_or(1);
    let (mut ids, mut mask, mut batch) = (Vec::new(), Vec::new(), 0);
    for row in rows {
        let padding = seq - row.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(row.iter().map(|&t| t as i64)));
        mask.extend(std::iter::repeat_n(0, padding).chain(std::iter::repeat_n(1, row.len())));
        batch += 1;
    }
    Prompts {
        ids,
        mask,
        batch,
        seq,
    }
}

/// `rollouts` as one micro-batch with their advantages; a truncated completion's row gets no
/// loss when `mask_truncated`.
pub fn micro_batch(
    rollouts: &[&Rollout],
    advantages: &[f32],
    mask_truncated: bool,
    replay: bool,
    device: &burn::tensor::Device,
) -> MicroBatch {
    let rows: Vec<(Vec<i32>, usize)> = rollouts
        .iter()
        .map(|r| {
            let completion = r.completion.iter().map(|&t| t as i32);
            let row: Vec<i32> = r.prompt_ids.iter().copied().chain(completion).collect();
            (row, r.prompt_ids.len())
        })
        .collect();
    let mut mb = MicroBatch::from_completions(&rows, device);
    if mask_truncated && rollouts.iter().any(|r| !r.stopped) {
        let [b, s] = mb.mask.dims();
        let keep: Vec<f32> = rollouts
            .iter()
            .map(|r| f32::from(u8::from(r.stopped)))
            .collect();
        let keep = Tensor::<2>::from_data(TensorData::new(keep, [b, 1]), device);
        mb.mask = mb.mask * keep.expand([b, s]);
        mb.target_count = to_f32_vec(mb.mask.clone())
            .iter()
            .filter(|&&m| m > 0.0)
            .count();
    }
    mb.rollout = Some(RolloutRows {
        advantages: advantages.to_vec(),
        old: None,
        reference: None,
        sampled: sampled_logps(rollouts, &mb, device),
    });
    if replay {
        mb.routes = Some(Arc::new(routes(rollouts, mb.mask.dims()[1])));
    }
    mb
}

/// The recorded sampled log-probs laid out as `mb`'s targets; `None` unless every rollout
/// has them.
fn sampled_logps(
    rollouts: &[&Rollout],
    mb: &MicroBatch,
    device: &burn::tensor::Device,
) -> Option<Tensor<2>> {
    if rollouts
        .iter()
        .any(|r| r.sampled_logps.len() != r.completion.len())
    {
        return None;
    }
    let [b, s] = mb.mask.dims();
    let mut v = vec![0f32; b * s];
    for (i, r) in rollouts.iter().enumerate() {
        // Position t predicts token t + 1: completion token j is predicted at prompt + j - 1.
        let at = i * s + r.prompt_ids.len() - 1;
        v[at..at + r.completion.len()].copy_from_slice(&r.sampled_logps);
    }
    Some(Tensor::from_data(TensorData::new(v, [b, s]), device))
}

/// The rollouts' recorded routes as `[rows, width]` (padding live).
fn routes(rollouts: &[&Rollout], width: usize) -> RouteReplay {
    let first = rollouts[0];
    let tokens = first.prompt_ids.len() + first.completion.len();
    let k = first
        .routes
        .values()
        .next()
        .map_or(0, |ids| ids.len() / tokens);
    let mut out = RouteReplay::new(k);
    let layers: Vec<usize> = rollouts[0].routes.keys().copied().collect();
    for layer in layers {
        let mut ids = Vec::with_capacity(rollouts.len() * width * k);
        for r in rollouts {
            ids.extend_from_slice(&r.routes[&layer]);
            ids.resize(
                ids.len() + (width - r.prompt_ids.len() - r.completion.len()) * k,
                LIVE,
            );
        }
        out.layers.insert(layer, ids);
    }
    out
}

/// The log-probs `[rows, seq]` `model` gives `mb`'s targets at `temperature`, without a
/// graph, and the forward's router stats.
pub fn score(
    model: &Qwen3Model,
    mb: &MicroBatch,
    temperature: f64,
    ctx: &ForwardCtx,
) -> (Tensor<2>, Vec<(usize, RouterStats)>) {
    let out = model.forward(&mb.batch, ctx);
    let logps = token_logps(model, mb, out.hidden, temperature, ctx).detach();
    (logps, out.router)
}

/// The reward function names, each one's scores per rollout (`None`: unscored), the sums.
pub type LoggedRewards<'a> = (&'a [String], &'a [Vec<Option<f64>>], &'a [f64]);

/// Appends `rollouts` of generation `generation` as JSON lines to `path`: the prompt row,
/// completion ids and text, whether it stopped, the summed reward and each function's
/// (null: unscored). A resumed run appends too, so a generation after the last checkpoint
/// appears twice; the later lines are the resumed run's.
pub fn log_completions(
    path: &std::path::Path,
    generation: u64,
    rollouts: &[Rollout],
    texts: &[String],
    rewards: LoggedRewards<'_>,
) -> Result<(), crate::metrics::MetricsError> {
    use std::io::Write;
    let io = |op, source| crate::metrics::MetricsError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    let (names, scores, total) = rewards;
    let mut text = String::new();
    for (i, r) in rollouts.iter().enumerate() {
        let each: serde_json::Map<String, serde_json::Value> = (names.iter().zip(scores))
            .map(|(n, s)| (n.clone(), serde_json::json!(s[i])))
            .collect();
        let line = serde_json::json!({
            "generation": generation, "slot": r.slot, "prompt_row": r.prompt,
            "completion_ids": r.completion, "text": texts[i], "stopped": r.stopped,
            "reward": total[i], "rewards": each,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let mut f = (std::fs::OpenOptions::new().create(true).append(true))
        .open(path)
        .map_err(|e| io("open", e))?;
    f.write_all(text.as_bytes()).map_err(|e| io("write", e))
}
