//! Streaming access to prepared shards: one row group at a time, never a whole file. Parquet
//! footers are cached per shard (a few KB each); token data is read only for the row group
//! asked for, into buffers the caller recycles, so memory depends on the row-group size, not
//! on the dataset size, and steady-state reading allocates nothing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::ConvertedType;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use crate::column::{find_list_leaf, read_list_i32, ListError, ListLeaf, ListScratch};
use crate::error::{DataError, Location, Result};
use crate::manifest::Manifest;
use crate::shard_writer::{INPUT_IDS, LOSS_MASK};

/// The documents of one row group. Reuse one with [`ShardReader::read_into`] to avoid
/// allocating per row group.
#[derive(Debug, Clone, Default)]
pub struct RowGroupDocs {
    pub ids: Vec<i32>,
    pub mask: Vec<u8>,
    /// `len() + 1` document boundaries into `ids` / `mask`, starting at 0.
    pub offsets: Vec<usize>,
    /// `mask` holds only ones (so refilling it for the next all-ones row group is free).
    mask_is_ones: bool,
}

impl RowGroupDocs {
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Token ids and loss mask of document `i`.
    pub fn doc(&self, i: usize) -> (&[i32], &[u8]) {
        let s = self.offsets[i];
        let e = self.offsets[i + 1];
        (&self.ids[s..e], &self.mask[s..e])
    }
    /// Length of document `i`.
    pub fn doc_len(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i]
    }
}

/// A shard's footer and the leaf columns found in it.
#[derive(Clone)]
struct ShardMeta {
    meta: Arc<ParquetMetaData>,
    ids: ListLeaf,
    mask: Option<ListLeaf>,
}

/// Reads row groups of a prepared dataset's shards.
pub struct ShardReader {
    dir: PathBuf,
    files: Vec<String>,
    vocab_size: u64,
    meta: Vec<Option<ShardMeta>>,
    /// Every loss-mask entry is 1 (pretraining data): skip decoding the mask column.
    all_ones: bool,
    scratch: ListScratch,
    mask_vals: Vec<i32>,
    mask_offsets: Vec<usize>,
}

impl ShardReader {
    pub fn new(dir: &Path, manifest: &Manifest) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: manifest.shards.iter().map(|s| s.file.clone()).collect(),
            vocab_size: manifest.tokenizer.vocab_size,
            meta: vec![None; manifest.shards.len()],
            all_ones: manifest.loss_tokens == manifest.tokens,
            scratch: ListScratch::default(),
            mask_vals: Vec::new(),
            mask_offsets: Vec::new(),
        }
    }

    fn path(&self, shard: usize) -> PathBuf {
        self.dir.join(&self.files[shard])
    }

    /// Read row group `rg` of shard `shard`, validating schema, lengths and token ids.
    pub fn read(&mut self, shard: usize, rg: usize) -> Result<RowGroupDocs> {
        let mut docs = RowGroupDocs::default();
        self.read_into(shard, rg, &mut docs)?;
        Ok(docs)
    }

    /// Like [`Self::read`], reusing the buffers of `out` (its previous contents are replaced).
    pub fn read_into(&mut self, shard: usize, rg: usize, out: &mut RowGroupDocs) -> Result<()> {
        let path = self.path(shard);
        let mut file = File::open(&path).map_err(|e| DataError::io(&path, "opening shard", e))?;
        let sm = match &self.meta[shard] {
            Some(m) => m.clone(),
            None => {
                let m = self.load_meta(&path, &file)?;
                self.meta[shard] = Some(m.clone());
                m
            }
        };
        let n_rg = sm.meta.num_row_groups();
        if rg >= n_rg {
            return Err(DataError::Manifest {
                path: path.clone(),
                msg: format!("row group {rg} requested but the shard has {n_rg}; the manifest does not match the shards, re-run prepare"),
            });
        }
        let rg_meta = sm.meta.row_group(rg);
        let bad = |e: ListError, field: &str| list_error(&path, rg, field, e);
        let bound = self.vocab_size.min(1 << 31) as u32;
        let checked = read_list_i32(
            &mut file,
            rg_meta,
            sm.ids,
            bound,
            &mut self.scratch,
            &mut out.ids,
            &mut out.offsets,
        )
        .map_err(|e| bad(e, INPUT_IDS))?;
        let n = out.ids.len();
        match sm.mask {
            None => {
                if !out.mask_is_ones {
                    out.mask.clear();
                }
                out.mask.resize(n, 1);
                out.mask_is_ones = true;
            }
            Some(leaf) => {
                read_list_i32(
                    &mut file,
                    rg_meta,
                    leaf,
                    u32::MAX,
                    &mut self.scratch,
                    &mut self.mask_vals,
                    &mut self.mask_offsets,
                )
                .map_err(|e| bad(e, LOSS_MASK))?;
                self.check_mask_lengths(&path, rg, out)?;
                out.mask.clear();
                out.mask.extend(self.mask_vals.iter().map(|&m| m as u8));
                out.mask_is_ones = false;
            }
        }
        if checked {
            return Ok(());
        }
        self.check_vocab(&path, rg, &out.ids, &out.offsets)
    }

    fn load_meta(&self, path: &Path, file: &File) -> Result<ShardMeta> {
        let meta = ParquetMetaDataReader::new()
            .parse_and_finish(file)
            .map_err(|e| DataError::parquet(path, e))?;
        check_chunk_ranges(path, file, &meta)?;
        let leaf = |name: &str, want: &str, converted: &[ConvertedType]| {
            let loc = Location {
                file: path.to_path_buf(),
                row: None,
                field: Some(name.into()),
            };
            find_list_leaf(&meta, name, converted).map_err(|found| match found {
                None => DataError::MissingField(
                    loc,
                    "this is not a `moeru data prepare` shard; re-run prepare".into(),
                ),
                Some(found) => {
                    DataError::wrong_type(loc, want, found, "re-run `moeru data prepare`")
                }
            })
        };
        let ids = leaf(
            INPUT_IDS,
            "list<int32>",
            &[ConvertedType::NONE, ConvertedType::INT_32],
        )?;
        let mask = if self.all_ones {
            None
        } else {
            Some(leaf(LOSS_MASK, "list<uint8>", &[ConvertedType::UINT_8])?)
        };
        Ok(ShardMeta {
            meta: Arc::new(meta),
            ids,
            mask,
        })
    }

    /// The mask must have the ids' row lengths.
    fn check_mask_lengths(&self, path: &Path, rg: usize, docs: &RowGroupDocs) -> Result<()> {
        if self.mask_offsets == docs.offsets {
            return Ok(());
        }
        let (oi, om) = (&docs.offsets, &self.mask_offsets);
        let rows = docs.len().min(om.len().saturating_sub(1));
        let r = (0..rows)
            .find(|&r| oi[r + 1] - oi[r] != om[r + 1] - om[r])
            .unwrap_or(rows);
        let len = |o: &[usize]| match (o.get(r), o.get(r + 1)) {
            (Some(a), Some(b)) => (b - a).to_string(),
            _ => "no".into(),
        };
        Err(DataError::Invalid(
            Location {
                file: path.to_path_buf(),
                row: Some(r as u64),
                field: Some(LOSS_MASK.into()),
            },
            format!(
                "row group {rg}: loss_mask has {} entries but input_ids has {}; re-run prepare",
                len(om),
                len(oi)
            ),
        ))
    }

    fn check_vocab(&self, path: &Path, rg: usize, ids: &[i32], offsets: &[usize]) -> Result<()> {
        // one branch-free unsigned compare per id (negative ids wrap to huge values), which
        // vectorizes even on baseline x86-64; locate the row only on failure
        let vocab = self.vocab_size.min(1 << 31) as u32;
        let mut any_bad = false;
        for chunk in ids.chunks(4096) {
            any_bad |= chunk.iter().fold(false, |b, &v| b | (v as u32 >= vocab));
        }
        if !any_bad {
            return Ok(());
        }
        let pos = ids
            .iter()
            .position(|&v| v < 0 || v as u64 >= self.vocab_size)
            .unwrap_or(0);
        let row = offsets.partition_point(|&o| o <= pos).saturating_sub(1);
        Err(DataError::TokenOutOfVocab {
            loc: Location {
                file: path.to_path_buf(),
                row: Some(row as u64),
                field: Some(format!("{INPUT_IDS} (row group {rg})")),
            },
            id: ids[pos] as i64,
            vocab_size: self.vocab_size as usize,
        })
    }
}

fn list_error(path: &Path, rg: usize, field: &str, e: ListError) -> DataError {
    match e {
        ListError::Io(e) => DataError::io(path, "reading shard", e),
        ListError::Parquet(msg) => {
            DataError::parquet(path, format!("row group {rg}, column {field}: {msg}"))
        }
        ListError::NullValue(row) => DataError::Invalid(
            Location {
                file: path.to_path_buf(),
                row: Some(row as u64),
                field: Some(field.into()),
            },
            format!("row group {rg}: null list element; re-run prepare"),
        ),
    }
}

/// Every column chunk's byte range lies inside the file: `parquet` panics on a negative
/// offset or size (`ColumnChunkMetaData::byte_range`), so a corrupt footer is refused here.
fn check_chunk_ranges(path: &Path, file: &File, meta: &ParquetMetaData) -> Result<()> {
    let len = file
        .metadata()
        .map_err(|e| DataError::io(path, "reading shard size", e))?
        .len();
    for (rg, group) in meta.row_groups().iter().enumerate() {
        for col in group.columns() {
            let start = col
                .dictionary_page_offset()
                .unwrap_or(col.data_page_offset());
            let size = col.compressed_size();
            let inside = u64::try_from(start)
                .ok()
                .zip(u64::try_from(size).ok())
                .and_then(|(s, n)| s.checked_add(n))
                .is_some_and(|end| end <= len);
            if !inside {
                return Err(DataError::Manifest {
                    path: path.to_path_buf(),
                    msg: format!(
                        "row group {rg}, column `{}`: chunk at offset {start} of {size} bytes is outside the {len}-byte file (a corrupt shard); re-run `moeru data prepare`",
                        col.column_path()
                    ),
                });
            }
        }
    }
    Ok(())
}
