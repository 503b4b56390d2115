//! Decoding one `list<integer>` leaf column chunk of a row group with parquet's low-level column
//! reader, into caller-owned, recycled buffers: the compressed chunk is read with one `read`
//! into a reused buffer, pages are decoded straight into the output vector, and document
//! offsets come from the repetition levels in one vectorizable pass. Nothing here allocates
//! per row group once the buffers have grown to the row-group size.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use parquet::basic::{ConvertedType, Type as PhysicalType};
use parquet::column::reader::{get_column_reader, get_typed_column_reader};
use parquet::data_type::Int32Type;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, RowGroupMetaData};
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::serialized_reader::SerializedPageReader;

use crate::plain_pages::{decode_plain_list, PageScratch};

/// Reused buffers for reading list columns.
#[derive(Default)]
pub struct ListScratch {
    chunk: Vec<u8>,
    pages: PageScratch,
    def: Vec<i16>,
    rep: Vec<i16>,
}

/// Why a column chunk could not be decoded.
#[derive(Debug)]
pub enum ListError {
    Io(std::io::Error),
    Parquet(String),
    /// A null list element (row given): token columns have no nulls.
    NullValue(usize),
}

impl From<ParquetError> for ListError {
    fn from(e: ParquetError) -> Self {
        ListError::Parquet(e.to_string())
    }
}

/// Where a shard's list leaf lives and how its levels look.
#[derive(Debug, Clone, Copy)]
pub struct ListLeaf {
    /// Leaf column index in the Parquet schema.
    pub index: usize,
    pub max_def: i16,
}

/// Find the leaf column of the top-level `list<int32-physical>` field `name` whose converted
/// type is one of `converted`. `Err(None)`: no such field; `Err(Some(found))`: it exists with
/// another shape.
pub fn find_list_leaf(
    meta: &ParquetMetaData,
    name: &str,
    converted: &[ConvertedType],
) -> Result<ListLeaf, Option<String>> {
    let schema = meta.file_metadata().schema_descr();
    for i in 0..schema.num_columns() {
        let c = schema.column(i);
        if c.path().parts().first().map(String::as_str) != Some(name) {
            continue;
        }
        let ok = c.physical_type() == PhysicalType::INT32
            && converted.contains(&c.converted_type())
            && c.max_rep_level() == 1
            && (1..=3).contains(&c.max_def_level());
        if !ok {
            return Err(Some(format!(
                "{} {} {} (repetition level {})",
                c.path(),
                c.physical_type(),
                c.converted_type(),
                c.max_rep_level()
            )));
        }
        return Ok(ListLeaf {
            index: i,
            max_def: c.max_def_level(),
        });
    }
    Err(None)
}

/// The bytes of one column chunk, addressed by file offset (what the page reader asks for).
pub struct ChunkBytes {
    pub start: u64,
    pub data: Bytes,
}

impl Length for ChunkBytes {
    fn len(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

impl ChunkBytes {
    fn offset(&self, start: u64, length: usize) -> parquet::errors::Result<usize> {
        start
            .checked_sub(self.start)
            .and_then(|s| usize::try_from(s).ok())
            .filter(|&s| s.checked_add(length).is_some_and(|e| e <= self.data.len()))
            .ok_or_else(|| {
                ParquetError::EOF(format!(
                    "page at offset {start} (+{length}) lies outside its column chunk"
                ))
            })
    }
}

impl ChunkReader for ChunkBytes {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let s = self.offset(start, 0)?;
        Ok(self.data.slice(s..).reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let s = self.offset(start, length)?;
        Ok(self.data.slice(s..s + length))
    }
}

/// Decode the values of list leaf `leaf` in row group `rg` into `values` (replaced) and the
/// row boundaries into `offsets` (replaced; `rows + 1` entries starting at 0). `Ok(true)`: every
/// value was also checked to lie in `[0, bound)`; `Ok(false)`: not checked.
pub fn read_list_i32(
    file: &mut File,
    rg_meta: &RowGroupMetaData,
    leaf: ListLeaf,
    bound: u32,
    scratch: &mut ListScratch,
    values: &mut Vec<i32>,
    offsets: &mut Vec<usize>,
) -> Result<bool, ListError> {
    values.clear();
    offsets.clear();
    offsets.push(0);
    let col = rg_meta.column(leaf.index);
    let (start, len) = col.byte_range();
    let file_len = file.metadata().map_err(ListError::Io)?.len();
    if start.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(ListError::Parquet(format!(
            "column chunk at {start} (+{len}) lies beyond the end of the file ({file_len} bytes)"
        )));
    }
    let len = usize::try_from(len).map_err(|e| ListError::Parquet(e.to_string()))?;
    let mut chunk = std::mem::take(&mut scratch.chunk);
    chunk.clear();
    chunk.reserve(len);
    file.seek(SeekFrom::Start(start)).map_err(ListError::Io)?;
    // read_to_end fills the spare capacity without zeroing it first
    let got = Read::by_ref(file)
        .take(len as u64)
        .read_to_end(&mut chunk)
        .map_err(ListError::Io)?;
    if got != len {
        return Err(ListError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("column chunk of {len} bytes ends after {got}"),
        )));
    }
    let chunk = Arc::new(ChunkBytes {
        start,
        data: Bytes::from(chunk),
    });
    let rows = usize::try_from(rg_meta.num_rows()).unwrap_or(usize::MAX);
    scratch.pages.bound = bound;
    let fast = decode_plain_list(
        &chunk,
        col,
        rows,
        leaf.max_def,
        &mut scratch.pages,
        values,
        offsets,
    );
    let result = if fast {
        Ok(scratch.pages.all_below)
    } else {
        values.clear();
        offsets.clear();
        offsets.push(0);
        decode(&chunk, rg_meta, leaf, scratch, values, offsets).map(|()| false)
    };
    // take the chunk buffer back for the next row group (the page readers are gone by now)
    if let Some(m) = Arc::into_inner(chunk).and_then(|c| c.data.try_into_mut().ok()) {
        scratch.chunk = m.into();
    }
    result
}

fn decode(
    chunk: &Arc<ChunkBytes>,
    rg_meta: &RowGroupMetaData,
    leaf: ListLeaf,
    scratch: &mut ListScratch,
    values: &mut Vec<i32>,
    offsets: &mut Vec<usize>,
) -> Result<(), ListError> {
    let col = rg_meta.column(leaf.index);
    let rows =
        usize::try_from(rg_meta.num_rows()).map_err(|e| ListError::Parquet(e.to_string()))?;
    // a capacity hint only: never trust the footer with an allocation
    let levels = usize::try_from(col.num_values()).unwrap_or(0).min(1 << 24);
    let pages = SerializedPageReader::new(Arc::clone(chunk), col, rows, None)?;
    let descr = col.column_descr_ptr();
    let mut reader =
        get_typed_column_reader::<Int32Type>(get_column_reader(descr, Box::new(pages)));
    scratch.def.clear();
    scratch.rep.clear();
    values.reserve(levels);
    scratch.def.reserve(levels);
    scratch.rep.reserve(levels);
    let (records, _, n_levels) = reader.read_records(
        usize::MAX,
        Some(&mut scratch.def),
        Some(&mut scratch.rep),
        values,
    )?;
    drop(reader);
    if records != rows || n_levels != scratch.rep.len() || n_levels != scratch.def.len() {
        return Err(ListError::Parquet(format!(
            "column chunk has {records} rows and {n_levels} levels, the row group says {rows} rows"
        )));
    }
    offsets_from_levels(
        &scratch.rep,
        &scratch.def,
        leaf.max_def,
        values.len(),
        offsets,
    )
}

/// Row boundaries from repetition levels (0 starts a row) and definition levels (`max_def`:
/// a value; below it on a row start: an empty or null list; below it inside a row: a null
/// element, an error).
fn offsets_from_levels(
    rep: &[i16],
    def: &[i16],
    max_def: i16,
    n_values: usize,
    offsets: &mut Vec<usize>,
) -> Result<(), ListError> {
    const W: usize = 64;
    if rep.is_empty() {
        return if n_values == 0 {
            Ok(())
        } else {
            Err(ListError::Parquet(format!(
                "{n_values} values but no levels"
            )))
        };
    }
    let dense = def.iter().fold(i16::MAX, |a, &d| a.min(d)) >= max_def;
    if dense {
        // every level is a value: a row starts wherever the repetition level is 0
        for (c, chunk) in rep.chunks(W).enumerate() {
            if chunk.iter().fold(i16::MAX, |a, &r| a.min(r)) == 0 {
                for (j, &r) in chunk.iter().enumerate() {
                    if r == 0 && c * W + j > 0 {
                        offsets.push(c * W + j);
                    }
                }
            }
        }
        offsets.push(n_values);
    } else {
        let mut v = 0usize;
        for (i, (&r, &d)) in rep.iter().zip(def).enumerate() {
            if r == 0 && i > 0 {
                offsets.push(v);
            }
            if d >= max_def {
                v += 1;
            } else if r != 0 {
                return Err(ListError::NullValue(offsets.len() - 1));
            }
        }
        offsets.push(v);
    }
    if offsets.last() != Some(&n_values) {
        return Err(ListError::Parquet(format!(
            "levels describe {} values but {n_values} were decoded",
            offsets.last().copied().unwrap_or(0)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_dense_and_sparse() {
        let mut o = Vec::new();
        o.push(0);
        offsets_from_levels(&[0, 1, 1, 0, 0, 1], &[1; 6], 1, 6, &mut o).unwrap();
        assert_eq!(o, vec![0, 3, 4, 6]);
        let mut o = vec![0];
        // rows: [a, b], [], [c]
        offsets_from_levels(&[0, 1, 0, 0], &[1, 1, 0, 1], 1, 3, &mut o).unwrap();
        assert_eq!(o, vec![0, 2, 2, 3]);
        let mut o = vec![0];
        assert!(offsets_from_levels(&[0, 1], &[2, 1], 2, 1, &mut o).is_err());
    }
}
