//! The global document stream: epochs of row groups in a seeded order, grouped into windows of
//! `window_row_groups` row groups whose documents are shuffled together (the bounded shuffle
//! buffer). A position in the stream is (epoch, window, document-in-window, token offset); every
//! permutation is a pure function of (seed, epoch, window), so a position alone resumes it.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::manifest::Manifest;
use crate::reader::{RowGroupDocs, ShardReader};
use crate::rng::{derive, permutation};

/// Where the next token comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Position {
    pub epoch: u64,
    pub window: u64,
    /// Index into the window's shuffled document order.
    pub doc: u64,
    /// Tokens of that document already consumed.
    pub offset: u64,
}

/// Shuffling options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShuffleConfig {
    pub seed: u64,
    /// Shuffle row groups (and so shards) per epoch and documents within a window.
    pub shuffle: bool,
    /// Row groups per shuffle window (the shuffle buffer's size in row groups).
    pub window_row_groups: u64,
}

/// A loaded window: its row groups and the shuffled order of its documents.
struct Window {
    epoch: u64,
    index: u64,
    groups: Vec<(usize, usize, RowGroupDocs)>,
    /// For each position in the shuffled order: (group index, row).
    order: Vec<(u32, u32)>,
}

/// The current document: its token ids, prepared loss mask, and the offset already consumed.
pub type DocView<'a> = (&'a [i32], &'a [u8], usize);

/// The document stream over a prepared dataset.
pub struct DocStream {
    reader: ShardReader,
    /// All (shard, row group) pairs with at least one row, in manifest order.
    groups: Vec<(usize, usize)>,
    cfg: ShuffleConfig,
    pos: Position,
    window: Option<Window>,
    /// Epoch whose row-group order is cached in `epoch_order`.
    epoch_order: Option<(u64, Vec<u32>)>,
}

impl DocStream {
    pub fn new(dir: &std::path::Path, manifest: &Manifest, cfg: ShuffleConfig) -> Result<Self> {
        if cfg.window_row_groups == 0 {
            return Err(DataError::Config(
                "shuffle window must be at least 1 row group".into(),
            ));
        }
        let mut groups = Vec::new();
        for (s, shard) in manifest.shards.iter().enumerate() {
            for (g, rg) in shard.row_groups.iter().enumerate() {
                if rg.rows > 0 {
                    groups.push((s, g));
                }
            }
        }
        if groups.is_empty() || manifest.tokens == 0 {
            return Err(DataError::EmptyInput(dir.to_path_buf()));
        }
        Ok(Self {
            reader: ShardReader::new(dir, manifest),
            groups,
            cfg,
            pos: Position::default(),
            window: None,
            epoch_order: None,
        })
    }

    pub fn position(&self) -> Position {
        self.pos
    }

    /// Jump to `pos` (the window is loaded lazily).
    pub fn seek(&mut self, pos: Position) {
        self.pos = pos;
    }

    pub fn windows_per_epoch(&self) -> u64 {
        (self.groups.len() as u64).div_ceil(self.cfg.window_row_groups)
    }

    /// The (shard, row group, row) the next token comes from, when its window is loaded.
    pub fn source(&self) -> Option<(usize, usize, u64)> {
        let w = self.window.as_ref()?;
        if w.epoch != self.pos.epoch || w.index != self.pos.window {
            return None;
        }
        let &(g, row) = w.order.get(self.pos.doc as usize)?;
        let (s, rg, _) = &w.groups[g as usize];
        Some((*s, *rg, row as u64))
    }

    fn epoch_order(&mut self, epoch: u64) {
        let stale = self.epoch_order.as_ref().is_none_or(|(e, _)| *e != epoch);
        if stale {
            let n = self.groups.len();
            let order = if self.cfg.shuffle {
                permutation(n, derive(self.cfg.seed, &[1, epoch]))
            } else {
                (0..n as u32).collect()
            };
            self.epoch_order = Some((epoch, order));
        }
    }

    fn load_window(&mut self, epoch: u64, index: u64) -> Result<()> {
        // recycle the old window's buffers for the new one: memory holds one window at a time
        let mut spare: Vec<RowGroupDocs> = self
            .window
            .take()
            .map(|w| w.groups.into_iter().map(|(_, _, d)| d).collect())
            .unwrap_or_default();
        let w = self.cfg.window_row_groups as usize;
        let start = index as usize * w;
        let picked: Vec<(usize, usize)> = {
            self.epoch_order(epoch);
            let order = self
                .epoch_order
                .as_ref()
                .map_or(&[][..], |(_, o)| o.as_slice());
            let end = (start + w).min(order.len());
            order[start.min(end)..end]
                .iter()
                .map(|&i| self.groups[i as usize])
                .collect()
        };
        let mut groups = Vec::with_capacity(picked.len());
        let mut order = Vec::new();
        for (gi, (s, rg)) in picked.into_iter().enumerate() {
            let mut docs = spare.pop().unwrap_or_default();
            self.reader.read_into(s, rg, &mut docs)?;
            order.extend((0..docs.len() as u32).map(|r| (gi as u32, r)));
            groups.push((s, rg, docs));
        }
        if self.cfg.shuffle {
            let perm = permutation(order.len(), derive(self.cfg.seed, &[2, epoch, index]));
            order = perm.into_iter().map(|i| order[i as usize]).collect();
        }
        self.window = Some(Window {
            epoch,
            index,
            groups,
            order,
        });
        Ok(())
    }

    /// The current document (ids, mask) and the offset into it, loading windows and moving to
    /// the next epoch as needed. `None` once `max_epochs` epochs are done.
    pub fn current(&mut self, max_epochs: Option<u64>) -> Result<Option<DocView<'_>>> {
        let (g, row) = loop {
            if max_epochs.is_some_and(|m| self.pos.epoch >= m) {
                return Ok(None);
            }
            if self.pos.window >= self.windows_per_epoch() {
                self.pos = Position {
                    epoch: self.pos.epoch + 1,
                    ..Position::default()
                };
                continue;
            }
            let loaded = self
                .window
                .as_ref()
                .is_some_and(|w| w.epoch == self.pos.epoch && w.index == self.pos.window);
            if !loaded {
                self.load_window(self.pos.epoch, self.pos.window)?;
            }
            let Some(w) = self.window.as_ref() else {
                continue;
            };
            let Some(&(g, row)) = w.order.get(self.pos.doc as usize) else {
                self.pos = Position {
                    window: self.pos.window + 1,
                    doc: 0,
                    offset: 0,
                    ..self.pos
                };
                continue;
            };
            let len = w.groups[g as usize].2.doc_len(row as usize);
            if self.pos.offset as usize >= len {
                self.pos.doc += 1;
                self.pos.offset = 0;
                continue;
            }
            break (g, row);
        };
        let w = self
            .window
            .as_ref()
            .ok_or_else(|| DataError::Config("shuffle window not loaded".into()))?;
        let (ids, mask) = w.groups[g as usize].2.doc(row as usize);
        Ok(Some((ids, mask, self.pos.offset as usize)))
    }

    /// Consume `n` tokens of the current document (moving on when it is finished).
    pub fn advance(&mut self, n: usize, doc_len: usize) {
        let off = self.pos.offset as usize + n;
        if off >= doc_len {
            self.pos.doc += 1;
            self.pos.offset = 0;
        } else {
            self.pos.offset = off as u64;
        }
    }
}
