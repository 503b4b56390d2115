//! The training data loader: packs the global document stream into fixed-length samples and
//! hands each data-parallel rank its share, with a JSON-serializable state for exact resume.
//!
//! The **global sample stream** depends only on the dataset, `seed`, `seq_len`, the pack mode
//! and the shuffle settings, never on `dp_size` or `micro_batch`. Global batch `g` is the next
//! `micro_batch * dp_size` samples of that stream; within it, rank `r` takes samples
//! `r·micro_batch .. (r+1)·micro_batch`. Contiguous blocks keep each micro-batch the same set
//! of samples whatever the DP size (DP=2 rank 1's micro-batch is DP=1's second micro-batch
//! under gradient accumulation), which matters for per-micro-batch losses such as the MoE
//! load-balancing loss. Every rank walks the whole stream (it skips copying other ranks' samples), so
//! all ranks hold the same state after each step, and a state saved at one `dp_size` resumes
//! at any other with the same global stream.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::manifest::Manifest;
use crate::sample::{PackMode, PackedSample};
use crate::stream::{DocStream, Position, ShuffleConfig};

/// How to build a loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderConfig {
    /// A `moeru data prepare` output directory.
    pub dir: PathBuf,
    pub seq_len: usize,
    /// Samples per rank per `next_batch`.
    pub micro_batch: usize,
    pub seed: u64,
    pub dp_rank: usize,
    pub dp_size: usize,
    pub mode: PackMode,
    /// Shuffle row groups per epoch and documents within each window.
    pub shuffle: bool,
    /// Row groups per shuffle window (bounded shuffle buffer), default 8.
    pub window_row_groups: u64,
    /// Stop after this many epochs (`None`: cycle forever).
    pub epochs: Option<u64>,
    /// Token id for padding; default: the manifest's pad id, else 0.
    pub pad_id: Option<i32>,
}

impl LoaderConfig {
    /// Defaults: rank 0 of 1, packing, shuffling with 8-row-group windows, endless epochs.
    pub fn new(dir: impl Into<PathBuf>, seq_len: usize, micro_batch: usize, seed: u64) -> Self {
        Self {
            dir: dir.into(),
            seq_len,
            micro_batch,
            seed,
            dp_rank: 0,
            dp_size: 1,
            mode: PackMode::Pack,
            shuffle: true,
            window_row_groups: 8,
            epochs: None,
            pad_id: None,
        }
    }

    pub fn with_rank(mut self, dp_rank: usize, dp_size: usize) -> Self {
        self.dp_rank = dp_rank;
        self.dp_size = dp_size;
        self
    }
}

/// Everything needed to continue a loader exactly where it was: the global stream position
/// (epoch, window, document, token offset) plus the settings that define the stream. The RNG
/// is counter-based (a function of seed, epoch and window), so `seed` is its whole state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub version: u32,
    /// Fingerprint of the dataset's shards (see `Manifest::fingerprint`).
    pub dataset: String,
    pub seed: u64,
    pub seq_len: usize,
    pub mode: PackMode,
    pub shuffle: bool,
    pub window_row_groups: u64,
    /// What the stream yields: packed samples ([`DataLoader`]) or preference pairs
    /// ([`crate::pairs::PairLoader`]); a state resumes only a loader of the same kind.
    #[serde(default, skip_serializing_if = "StreamKind::is_samples")]
    pub stream: StreamKind,
    #[serde(flatten)]
    pub position: Position,
    /// Global samples (pairs, for a pair stream) consumed so far.
    pub samples: u64,
    /// Informational: where the next token comes from (shard file, row group, row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<(String, usize, u64)>,
}

/// The kind of loader a [`LoaderState`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// Packed (or padded) samples of `seq_len` tokens.
    #[default]
    Samples,
    /// Preference pairs, one stored document each (`mode` is then `pad`: nothing is packed).
    Pairs,
    /// Prompts of a JSONL prompt set (`crate::prompts`); `samples` counts prompts drawn.
    Prompts,
}

impl StreamKind {
    fn is_samples(&self) -> bool {
        *self == StreamKind::Samples
    }
}

impl LoaderState {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| DataError::StateMismatch(format!("invalid loader state JSON: {e}")))
    }
}

pub const STATE_VERSION: u32 = 1;

/// A rank's view of the global packed sample stream.
pub struct DataLoader {
    cfg: LoaderConfig,
    manifest: Manifest,
    stream: DocStream,
    pad_id: i32,
    samples: u64,
}

impl DataLoader {
    pub fn new(cfg: LoaderConfig) -> Result<Self> {
        validate(&cfg)?;
        let manifest = Manifest::read(&cfg.dir)?;
        if manifest.mode == crate::pairs::PREFERENCE_MODE {
            return Err(DataError::Manifest {
                path: cfg.dir.clone(),
                msg: "holds preference pairs (mode \"preference\"), which are not packed into \
                      samples; train on it with `data.task: dpo`, or prepare the \
                      data without --preference"
                    .into(),
            });
        }
        let shuffle = ShuffleConfig {
            seed: cfg.seed,
            shuffle: cfg.shuffle,
            window_row_groups: cfg.window_row_groups,
        };
        let stream = DocStream::new(&cfg.dir, &manifest, shuffle)?;
        let pad_id = cfg
            .pad_id
            .unwrap_or_else(|| manifest.tokenizer.eos_id.map_or(0, |e| e as i32));
        Ok(Self {
            cfg,
            manifest,
            stream,
            pad_id,
            samples: 0,
        })
    }

    /// Build a loader and position it at `state` (saved at any dp_size).
    pub fn from_state(cfg: LoaderConfig, state: &LoaderState) -> Result<Self> {
        let (rank, size) = (cfg.dp_rank, cfg.dp_size);
        let mut l = Self::new(cfg)?;
        l.resume(state, rank, size)?;
        Ok(l)
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// The state after the last `next_batch`: resuming from it yields the samples that would
    /// have come next. Identical on every rank.
    pub fn state(&self) -> LoaderState {
        let source = self
            .stream
            .source()
            .map(|(s, rg, row)| (self.manifest.shards[s].file.clone(), rg, row));
        LoaderState {
            version: STATE_VERSION,
            dataset: self.manifest.fingerprint(),
            seed: self.cfg.seed,
            seq_len: self.cfg.seq_len,
            mode: self.cfg.mode,
            shuffle: self.cfg.shuffle,
            window_row_groups: self.cfg.window_row_groups,
            stream: StreamKind::Samples,
            position: self.stream.position(),
            samples: self.samples,
            source,
        }
    }

    /// Continue from `state` as rank `dp_rank` of `dp_size`.
    pub fn resume(&mut self, state: &LoaderState, dp_rank: usize, dp_size: usize) -> Result<()> {
        check_resumable(state, &self.state())?;
        let mut cfg = self.cfg.clone();
        cfg.dp_rank = dp_rank;
        cfg.dp_size = dp_size;
        validate(&cfg)?;
        self.cfg = cfg;
        self.stream.seek(state.position);
        self.samples = state.samples;
        Ok(())
    }

    /// This rank's `micro_batch` samples of the next global batch; `None` when the configured
    /// epochs are exhausted (an incomplete last global batch is dropped).
    pub fn next_batch(&mut self) -> Result<Option<Vec<PackedSample>>> {
        let (m, d, r) = (self.cfg.micro_batch, self.cfg.dp_size, self.cfg.dp_rank);
        let mut out = Vec::with_capacity(m);
        for j in 0..m * d {
            if j / m == r {
                let mut s = PackedSample::with_capacity(self.cfg.seq_len);
                if !self.fill(Some(&mut s))? {
                    return Ok(None);
                }
                out.push(s);
            } else if !self.fill(None)? {
                return Ok(None);
            }
        }
        // A resumed state's count is read from a file; a corrupt one must not overflow.
        self.samples = self
            .samples
            .checked_add((m * d) as u64)
            .ok_or_else(|| DataError::Manifest {
                path: self.cfg.dir.clone(),
                msg: format!(
                    "the loader state counts {} samples, too many to go on from; the checkpoint's trainer_state.json is corrupt, resume from an earlier checkpoint",
                    self.samples
                ),
            })?;
        Ok(Some(out))
    }

    /// Produce the next global sample into `sink`, or only advance past it when `sink` is
    /// `None`. Returns false when the stream has ended before the sample got any token.
    fn fill(&mut self, mut sink: Option<&mut PackedSample>) -> Result<bool> {
        let seq_len = self.cfg.seq_len;
        let mut filled = 0;
        while filled < seq_len {
            let Some((ids, mask, off)) = self.stream.current(self.cfg.epochs)? else {
                break;
            };
            let len = ids.len();
            let n = (seq_len - filled).min(len - off);
            if let Some(s) = sink.as_deref_mut() {
                let last = (off + n < len).then(|| (ids[off + n], mask[off + n]));
                s.push_segment(
                    &ids[off..off + n],
                    &mask[off + 1..off + n],
                    last,
                    self.pad_id,
                );
            }
            filled += n;
            self.stream.advance(n, len);
            if self.cfg.mode == PackMode::Pad && off + n == len {
                break;
            }
        }
        if filled == 0 {
            return Ok(false);
        }
        if let Some(s) = sink {
            s.pad_to(seq_len, self.pad_id);
        }
        Ok(true)
    }
}

fn validate(cfg: &LoaderConfig) -> Result<()> {
    if cfg.seq_len < 2 {
        return Err(DataError::Config(format!(
            "seq_len is {}; it must be at least 2",
            cfg.seq_len
        )));
    }
    if cfg.micro_batch == 0 {
        return Err(DataError::Config(
            "micro_batch is 0; it must be at least 1".into(),
        ));
    }
    if cfg.dp_size == 0 || cfg.dp_rank >= cfg.dp_size {
        return Err(DataError::Config(format!(
            "dp_rank {} of dp_size {}; need dp_size >= 1 and 0 <= dp_rank < dp_size",
            cfg.dp_rank, cfg.dp_size
        )));
    }
    if cfg.seq_len > i32::MAX as usize {
        return Err(DataError::Config(format!(
            "seq_len {} does not fit i32 position ids",
            cfg.seq_len
        )));
    }
    Ok(())
}

/// Refuse to resume from `saved` when it was saved with other data or data settings than the
/// loader whose fresh state is `now` (the position and consumed count are not compared).
pub(crate) fn check_resumable(saved: &LoaderState, now: &LoaderState) -> Result<()> {
    let checks: [(&str, String, String); 8] = [
        (
            "version",
            saved.version.to_string(),
            now.version.to_string(),
        ),
        ("dataset", saved.dataset.clone(), now.dataset.clone()),
        ("seed", saved.seed.to_string(), now.seed.to_string()),
        (
            "seq_len",
            saved.seq_len.to_string(),
            now.seq_len.to_string(),
        ),
        (
            "mode",
            format!("{:?}", saved.mode),
            format!("{:?}", now.mode),
        ),
        (
            "shuffle",
            saved.shuffle.to_string(),
            now.shuffle.to_string(),
        ),
        (
            "window_row_groups",
            saved.window_row_groups.to_string(),
            now.window_row_groups.to_string(),
        ),
        (
            "stream",
            format!("{:?}", saved.stream),
            format!("{:?}", now.stream),
        ),
    ];
    for (key, saved, now) in checks {
        if saved != now {
            return Err(DataError::StateMismatch(format!(
                "`{key}` was {saved} when the state was saved but is {now} now; resume with the \
                 same data and data settings, or start the data stream afresh"
            )));
        }
    }
    Ok(())
}
