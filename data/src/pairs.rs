//! Preference (DPO) pairs: how a pair is stored, and the loader that streams them.
//!
//! **Storage.** A pair is one document of the ordinary shard format (`prepare --preference`,
//! manifest `mode: "preference"`): its ids are `prompt ++ chosen ++ rejected` and its
//! `loss_mask` column holds a part code per token — [`PROMPT`] (0), [`CHOSEN`] (1),
//! [`REJECTED`] (2) — in that order, each part non-empty. Shards, manifest, sha256, shuffle
//! windows and exact resume are those of every dataset ([`DocStream`]).
//!
//! **The pair stream** depends only on the dataset, `seed` and the shuffle settings, never on
//! `dp_size` or `micro_batch`. Global batch `g` is the next `micro_batch * dp_size` pairs of the
//! stream; rank `r` takes pairs `r·micro_batch .. (r+1)·micro_batch` (contiguous blocks, as
//! [`crate::DataLoader`]). Every rank walks the whole stream, so all ranks hold the same
//! [`LoaderState`], and a state saved at one `dp_size` resumes at any other.
//!
//! **Truncation** is TRL's `max_length` with `truncation_mode="keep_start"`: prompt+chosen and
//! prompt+rejected are each cut to their first `seq_len` tokens. A pair whose prompt alone is
//! `>= seq_len` tokens is an error (TRL drops it) naming the shard file, its row and `prompt`.
//!
//! This module must not tokenize (that is `preference.rs`) or pack pairs into samples; pair
//! ids are the key for precomputed reference log-probs, so they must stay the manifest-order
//! row index whatever the shuffle.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Location, Result};
use crate::loader::{check_resumable, LoaderState, StreamKind, STATE_VERSION};
use crate::manifest::Manifest;
use crate::sample::PackMode;
use crate::stream::{DocStream, ShuffleConfig};

/// The manifest `mode` of a preference dataset.
pub const PREFERENCE_MODE: &str = "preference";
/// Part code of a prompt token.
pub const PROMPT: u8 = 0;
/// Part code of a chosen-completion token.
pub const CHOSEN: u8 = 1;
/// Part code of a rejected-completion token.
pub const REJECTED: u8 = 2;

/// One preference pair as stored; `id` = the pair's row index in the dataset in manifest order
/// (shard, row group, row), stable across epochs/shuffles — used as a key for precomputed
/// reference log-probs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferencePair {
    pub id: u64,
    pub prompt: Vec<i32>,
    pub chosen: Vec<i32>,
    pub rejected: Vec<i32>,
}

/// The stored document of a pair: ids `prompt ++ chosen ++ rejected` and their part codes.
pub fn pair_document(prompt: &[i32], chosen: &[i32], rejected: &[i32]) -> (Vec<i32>, Vec<u8>) {
    let ids = [prompt, chosen, rejected].concat();
    let mut mask = vec![PROMPT; prompt.len()];
    mask.resize(prompt.len() + chosen.len(), CHOSEN);
    mask.resize(ids.len(), REJECTED);
    (ids, mask)
}

/// Split a stored document into (prompt, chosen, rejected); `None` unless the part codes are
/// 0…0 1…1 2…2 with every part non-empty.
pub fn split_document<'a>(ids: &'a [i32], mask: &[u8]) -> Option<[&'a [i32]; 3]> {
    if ids.len() != mask.len() || !mask.windows(2).all(|w| w[0] <= w[1]) {
        return None;
    }
    let c = mask.iter().position(|&m| m != PROMPT)?;
    let r = mask.iter().position(|&m| m == REJECTED)?;
    let valid = c > 0 && mask[c] == CHOSEN && r > c && mask[mask.len() - 1] == REJECTED;
    valid.then(|| [&ids[..c], &ids[c..r], &ids[r..]])
}

/// How to build a [`PairLoader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairLoaderConfig {
    /// A `moeru data prepare --preference` output directory.
    pub dir: PathBuf,
    /// Pairs per rank per `next_batch`.
    pub micro_batch: usize,
    pub seed: u64,
    pub dp_rank: usize,
    pub dp_size: usize,
    /// Shuffle row groups per epoch and pairs within each window.
    pub shuffle: bool,
    /// Row groups per shuffle window (bounded shuffle buffer).
    pub window_row_groups: u64,
    /// Stop after this many epochs (`None`: cycle forever).
    pub epochs: Option<u64>,
    /// TRL's `max_length`: prompt+chosen and prompt+rejected are cut to this many tokens.
    pub seq_len: usize,
}

impl PairLoaderConfig {
    /// Defaults: rank 0 of 1, shuffling with 8-row-group windows, endless epochs.
    pub fn new(dir: impl Into<PathBuf>, seq_len: usize, micro_batch: usize, seed: u64) -> Self {
        Self {
            dir: dir.into(),
            micro_batch,
            seed,
            dp_rank: 0,
            dp_size: 1,
            shuffle: true,
            window_row_groups: 8,
            epochs: None,
            seq_len,
        }
    }

    pub fn with_rank(mut self, dp_rank: usize, dp_size: usize) -> Self {
        self.dp_rank = dp_rank;
        self.dp_size = dp_size;
        self
    }
}

/// A rank's view of the global pair stream.
pub struct PairLoader {
    cfg: PairLoaderConfig,
    manifest: Manifest,
    stream: DocStream,
    /// Pair id of row 0 of each (shard, row group), and that row's index within its shard.
    bases: Vec<Vec<(u64, u64)>>,
    pairs: u64,
}

impl PairLoader {
    /// Open a preference dataset; errors if its manifest's mode is not `preference`.
    pub fn new(cfg: PairLoaderConfig) -> Result<Self> {
        validate(&cfg)?;
        let manifest = Manifest::read(&cfg.dir)?;
        if manifest.mode != PREFERENCE_MODE {
            return Err(DataError::Manifest {
                path: cfg.dir.clone(),
                msg: format!(
                    "mode is {:?}, not \"preference\", so it holds no preference pairs; prepare \
                     the data with `moeru data prepare --preference`",
                    manifest.mode
                ),
            });
        }
        let shuffle = ShuffleConfig {
            seed: cfg.seed,
            shuffle: cfg.shuffle,
            window_row_groups: cfg.window_row_groups,
        };
        let stream = DocStream::new(&cfg.dir, &manifest, shuffle)?;
        let mut id = 0;
        let bases = manifest
            .shards
            .iter()
            .map(|s| {
                let mut in_shard = 0;
                s.row_groups
                    .iter()
                    .map(|rg| {
                        let b = (id, in_shard);
                        id += rg.rows;
                        in_shard += rg.rows;
                        b
                    })
                    .collect()
            })
            .collect();
        Ok(Self {
            cfg,
            manifest,
            stream,
            bases,
            pairs: 0,
        })
    }

    /// Build a loader and position it at `state` (saved at any dp_size).
    pub fn from_state(cfg: PairLoaderConfig, state: &LoaderState) -> Result<Self> {
        let (rank, size) = (cfg.dp_rank, cfg.dp_size);
        let mut l = Self::new(cfg)?;
        l.resume(state, rank, size)?;
        Ok(l)
    }

    pub fn config(&self) -> &PairLoaderConfig {
        &self.cfg
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The state after the last `next_batch`; identical on every rank.
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
            mode: PackMode::Pad,
            shuffle: self.cfg.shuffle,
            window_row_groups: self.cfg.window_row_groups,
            stream: StreamKind::Pairs,
            position: self.stream.position(),
            samples: self.pairs,
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
        self.pairs = state.samples;
        Ok(())
    }

    /// This rank's `micro_batch` pairs of the next global batch of `micro_batch * dp_size`
    /// pairs; `None` when the configured epochs are exhausted (an incomplete last global batch
    /// is dropped).
    pub fn next_batch(&mut self) -> Result<Option<Vec<PreferencePair>>> {
        let (m, d, r) = (self.cfg.micro_batch, self.cfg.dp_size, self.cfg.dp_rank);
        let mut out = Vec::with_capacity(m);
        for j in 0..m * d {
            let Some(pair) = self.next_pair()? else {
                return Ok(None);
            };
            if j / m == r {
                out.push(pair);
            }
        }
        self.pairs += (m * d) as u64;
        Ok(Some(out))
    }

    /// The next pair of the global stream, truncated; every rank checks every pair it walks,
    /// so all ranks fail alike on a bad one.
    fn next_pair(&mut self) -> Result<Option<PreferencePair>> {
        let Some((ids, mask, _)) = self.stream.current(self.cfg.epochs)? else {
            return Ok(None);
        };
        let len = ids.len();
        let parts = split_document(ids, mask).map(|p| p.map(<[i32]>::to_vec));
        let (s, rg, row) = self
            .stream
            .source()
            .ok_or_else(|| DataError::Config("pair stream has no current row".into()))?;
        self.stream.advance(len, len);
        let (base, in_shard) = self.bases[s][rg];
        let at = || {
            let file = self.cfg.dir.join(&self.manifest.shards[s].file);
            (file, in_shard + row)
        };
        let Some([prompt, mut chosen, mut rejected]) = parts else {
            let (file, row) = at();
            return Err(DataError::Invalid(
                Location::field(&file, row, "loss_mask"),
                "is not a preference pair (part codes 0 = prompt, 1 = chosen, 2 = rejected, in \
                 that order, each non-empty); prepare the data with `moeru data prepare \
                 --preference`"
                    .into(),
            ));
        };
        let n = self.cfg.seq_len;
        if prompt.len() >= n {
            let (file, row) = at();
            return Err(DataError::Invalid(
                Location::field(&file, row, "prompt"),
                format!(
                    "prompt is {} tokens; data.seq_len is {n}; shorten it or raise data.seq_len",
                    prompt.len()
                ),
            ));
        }
        chosen.truncate(n - prompt.len());
        rejected.truncate(n - prompt.len());
        Ok(Some(PreferencePair {
            id: base + row,
            prompt,
            chosen,
            rejected,
        }))
    }

    /// Every pair of the dataset once, in manifest order (id order), truncated to `seq_len`:
    /// for precomputing reference log-probs.
    pub fn all_pairs(dir: &Path, seq_len: usize) -> Result<Vec<PreferencePair>> {
        let mut cfg = PairLoaderConfig::new(dir, seq_len, 1, 0);
        cfg.shuffle = false;
        cfg.epochs = Some(1);
        let mut loader = PairLoader::new(cfg)?;
        let mut out = Vec::with_capacity(loader.manifest.documents as usize);
        while let Some(p) = loader.next_pair()? {
            out.push(p);
        }
        Ok(out)
    }
}

fn validate(cfg: &PairLoaderConfig) -> Result<()> {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_round_trip() {
        let (ids, mask) = pair_document(&[1, 2], &[3], &[4, 5, 6]);
        assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(mask, vec![0, 0, 1, 2, 2, 2]);
        let [p, c, r] = split_document(&ids, &mask).unwrap();
        assert_eq!((p, c, r), (&[1, 2][..], &[3][..], &[4, 5, 6][..]));
    }

    #[test]
    fn bad_part_codes_are_rejected() {
        let ids = [1, 2, 3];
        for mask in [[0, 0, 1], [1, 1, 2], [0, 2, 2], [0, 2, 1], [0, 1, 3]] {
            assert!(split_document(&ids, &mask).is_none(), "{mask:?}");
        }
        assert!(split_document(&ids, &[0, 1]).is_none());
    }
}
