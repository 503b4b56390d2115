//! Writing tokenized documents into zstd Parquet shards: `input_ids: list<int32>` and
//! `loss_mask: list<uint8>`, one row per document, row groups of about `row_group_tokens`
//! tokens, a new shard every `shard_tokens` tokens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, ListArray, RecordBatch, UInt8Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::error::{DataError, Result};
use crate::fsutil::HashingWriter;
use crate::manifest::{RowGroupInfo, ShardInfo};

pub const INPUT_IDS: &str = "input_ids";
pub const LOSS_MASK: &str = "loss_mask";

/// The Arrow schema of a shard.
pub fn shard_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            INPUT_IDS,
            DataType::List(Arc::new(Field::new_list_field(DataType::Int32, false))),
            false,
        ),
        Field::new(
            LOSS_MASK,
            DataType::List(Arc::new(Field::new_list_field(DataType::UInt8, false))),
            false,
        ),
    ]))
}

/// Sizes of shards and row groups.
#[derive(Debug, Clone, Copy)]
pub struct ShardLayout {
    pub shard_tokens: u64,
    pub row_group_tokens: u64,
    pub zstd_level: i32,
}

impl Default for ShardLayout {
    fn default() -> Self {
        Self {
            shard_tokens: 256 << 20,
            row_group_tokens: 1 << 20,
            zstd_level: 1,
        }
    }
}

struct OpenShard {
    path: PathBuf,
    writer: ArrowWriter<HashingWriter>,
    info: ShardInfo,
}

/// Accumulates documents and writes shards into `dir`.
pub struct ShardWriter {
    dir: PathBuf,
    layout: ShardLayout,
    schema: SchemaRef,
    props: WriterProperties,
    open: Option<OpenShard>,
    ids: Vec<i32>,
    mask: Vec<u8>,
    offsets: Vec<i32>,
    done: Vec<ShardInfo>,
}

impl ShardWriter {
    pub fn new(dir: &Path, layout: ShardLayout) -> Result<Self> {
        let level =
            ZstdLevel::try_new(layout.zstd_level).map_err(|e| DataError::Config(e.to_string()))?;
        let mask_leaf = ColumnPath::new(vec![LOSS_MASK.into(), "list".into(), "item".into()]);
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_dictionary_enabled(false)
            .set_column_dictionary_enabled(mask_leaf, true)
            .set_max_row_group_row_count(None)
            .set_data_page_size_limit(1 << 20)
            .build();
        Ok(Self {
            dir: dir.to_path_buf(),
            layout,
            schema: shard_schema(),
            props,
            open: None,
            ids: Vec::new(),
            mask: Vec::new(),
            offsets: vec![0],
            done: Vec::new(),
        })
    }

    /// Append one document. `ids` and `mask` have the same length (checked by the caller).
    pub fn push(&mut self, ids: &[i32], mask: &[u8]) -> Result<()> {
        debug_assert_eq!(ids.len(), mask.len());
        self.ids.extend_from_slice(ids);
        self.mask.extend_from_slice(mask);
        self.offsets.push(self.ids.len() as i32);
        if self.ids.len() as u64 >= self.layout.row_group_tokens
            || self.ids.len() > (i32::MAX / 2) as usize
        {
            self.flush_row_group()?;
        }
        Ok(())
    }

    fn flush_row_group(&mut self) -> Result<()> {
        let rows = self.offsets.len() - 1;
        if rows == 0 {
            return Ok(());
        }
        if self.open.is_none() {
            let name = format!("shard-{:05}.parquet", self.done.len());
            let path = self.dir.join(&name);
            let file = HashingWriter::create(&path)?;
            let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(self.props.clone()))
                .map_err(|e| DataError::parquet(&path, e))?;
            let info = ShardInfo {
                file: name,
                documents: 0,
                tokens: 0,
                bytes: 0,
                sha256: String::new(),
                row_groups: Vec::new(),
            };
            self.open = Some(OpenShard { path, writer, info });
        }
        let tokens = self.ids.len() as u64;
        let offsets = OffsetBuffer::new(std::mem::replace(&mut self.offsets, vec![0]).into());
        let ids = Int32Array::from(std::mem::take(&mut self.ids));
        let mask = UInt8Array::from(std::mem::take(&mut self.mask));
        let item_i32 = Arc::new(Field::new_list_field(DataType::Int32, false));
        let item_u8 = Arc::new(Field::new_list_field(DataType::UInt8, false));
        let cols: Vec<ArrayRef> = vec![
            Arc::new(ListArray::new(
                item_i32,
                offsets.clone(),
                Arc::new(ids),
                None,
            )),
            Arc::new(ListArray::new(item_u8, offsets, Arc::new(mask), None)),
        ];
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let batch = RecordBatch::try_new(self.schema.clone(), cols)
            .map_err(|e| DataError::parquet(&open.path, e))?;
        open.writer
            .write(&batch)
            .map_err(|e| DataError::parquet(&open.path, e))?;
        open.writer
            .flush()
            .map_err(|e| DataError::parquet(&open.path, e))?;
        open.info.documents += rows as u64;
        open.info.tokens += tokens;
        open.info.row_groups.push(RowGroupInfo {
            rows: rows as u64,
            tokens,
        });
        if open.info.tokens >= self.layout.shard_tokens {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        let Some(mut open) = self.open.take() else {
            return Ok(());
        };
        let inner = open
            .writer
            .into_inner()
            .map_err(|e| DataError::parquet(&open.path, e))?;
        let (bytes, sha) = inner.finish(&open.path)?;
        open.info.bytes = bytes;
        open.info.sha256 = sha;
        self.done.push(open.info);
        Ok(())
    }

    /// Flush everything and return the shards written.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>> {
        self.flush_row_group()?;
        self.close_shard()?;
        Ok(self.done)
    }
}
