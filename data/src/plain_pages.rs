//! The fast path for the common shard layout: `list<int32>` leaves stored PLAIN in zstd (or
//! uncompressed) data pages (v1 or v2) with no nulls and no empty lists. Pages are taken raw
//! from parquet's page reader (it is told the chunk is uncompressed, so it hands out slices of
//! the chunk buffer), decompressed into one recycled buffer, the values copied once into the
//! output, and document boundaries read off the run-length encoded repetition levels run by
//! run (a long document is one run), never expanded to one level per token.
//!
//! Anything else (dictionary pages, other encodings or codecs, nulls, malformed data) returns
//! `false` and the caller decodes the chunk with the general column reader, which also reports
//! the errors.

use std::sync::Arc;

use parquet::basic::{Compression, Encoding};
use parquet::column::page::{Page, PageReader};
use parquet::file::metadata::ColumnChunkMetaData;
use parquet::file::serialized_reader::SerializedPageReader;

use crate::column::ChunkBytes;

/// Reused buffers of the fast path.
#[derive(Default)]
pub struct PageScratch {
    /// Largest decompressed page accepted (the chunk's uncompressed size, capped).
    max_page: usize,
    /// Values are checked against this bound (as u32, so negative ones fail) while hot...
    pub bound: u32,
    /// ...and this says whether all of them passed.
    pub all_below: bool,
    page: Vec<u8>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

/// Decode the whole column chunk `chunk` into `values` and
/// row boundaries into `offsets` (which holds `[0]` on entry). `false`: not handled.
pub fn decode_plain_list(
    chunk: &Arc<ChunkBytes>,
    col: &ColumnChunkMetaData,
    rows: usize,
    max_def: i16,
    scratch: &mut PageScratch,
    values: &mut Vec<i32>,
    offsets: &mut Vec<usize>,
) -> bool {
    let zstd = match col.compression() {
        Compression::ZSTD(_) => true,
        Compression::UNCOMPRESSED => false,
        _ => return false,
    };
    let Ok(raw_meta) = col
        .clone()
        .into_builder()
        .set_compression(Compression::UNCOMPRESSED)
        .build()
    else {
        return false;
    };
    scratch.max_page = usize::try_from(col.uncompressed_size())
        .unwrap_or(0)
        .min(1 << 30);
    let Ok(mut pages) = SerializedPageReader::new(Arc::clone(chunk), &raw_meta, rows, None) else {
        return false;
    };
    let Some(def_width) = bit_width(max_def) else {
        return false;
    };
    let mut levels = 0usize;
    scratch.all_below = true;
    loop {
        let page = match pages.get_next_page() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(_) => return false,
        };
        let ok = match page {
            Page::DataPage {
                buf,
                num_values,
                encoding,
                def_level_encoding,
                rep_level_encoding,
                ..
            } => {
                if !supported(encoding)
                    || def_level_encoding != Encoding::RLE
                    || rep_level_encoding != Encoding::RLE
                {
                    return false;
                }
                let body: &[u8] = if zstd {
                    if !decompress(scratch, &buf, 0) {
                        return false;
                    }
                    &scratch.page
                } else {
                    &buf
                };
                let n = num_values as usize;
                let Some((rep, rest)) = prefixed(body) else {
                    return false;
                };
                let Some((def, vals)) = prefixed(rest) else {
                    return false;
                };
                // every level is a value: `n` is bounded by the bytes really present
                if !fits(vals, n) {
                    return false;
                }
                page_levels(rep, def, def_width, max_def, n, levels, offsets)
                    && copy_values(
                        vals,
                        n,
                        encoding,
                        values,
                        &mut scratch.all_below,
                        scratch.bound,
                    )
                    && {
                        levels += n;
                        true
                    }
            }
            Page::DataPageV2 {
                buf,
                num_values,
                encoding,
                num_nulls,
                def_levels_byte_len,
                rep_levels_byte_len,
                is_compressed,
                ..
            } => {
                let (r, d) = (rep_levels_byte_len as usize, def_levels_byte_len as usize);
                if !supported(encoding) || num_nulls != 0 || r + d > buf.len() {
                    return false;
                }
                let vals: &[u8] = if zstd && is_compressed {
                    if !decompress(scratch, &buf, r + d) {
                        return false;
                    }
                    &scratch.page
                } else {
                    &buf[r + d..]
                };
                let n = num_values as usize;
                if !fits(vals, n) {
                    return false;
                }
                page_levels(
                    &buf[..r],
                    &buf[r..r + d],
                    def_width,
                    max_def,
                    n,
                    levels,
                    offsets,
                ) && copy_values(
                    vals,
                    n,
                    encoding,
                    values,
                    &mut scratch.all_below,
                    scratch.bound,
                ) && {
                    levels += n;
                    true
                }
            }
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    offsets.push(values.len());
    offsets.len() == rows + 1 && (rows > 0 || values.is_empty())
}

fn bit_width(max: i16) -> Option<u32> {
    (max > 0).then(|| 16 - max.leading_zeros())
}

/// Split a v1 level section (4-byte little-endian length, then the levels) off `b`.
fn prefixed(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(len)?;
    Some((b.get(4..end)?, b.get(end..)?))
}

fn decompress(scratch: &mut PageScratch, src: &[u8], skip: usize) -> bool {
    let src = &src[skip..];
    let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(src) else {
        return false;
    };
    let Ok(size) = usize::try_from(size) else {
        return false;
    };
    if size > scratch.max_page {
        return false; // implausible frame header: let the general reader report it
    }
    if scratch.zstd.is_none() {
        scratch.zstd = zstd::bulk::Decompressor::new().ok();
    }
    let Some(d) = scratch.zstd.as_mut() else {
        return false;
    };
    scratch.page.clear();
    scratch.page.reserve(size);
    matches!(d.decompress_to_buffer(src, &mut scratch.page), Ok(n) if n == size)
}

/// `b` holds at least `n` int32 values.
fn fits(b: &[u8], n: usize) -> bool {
    n.checked_mul(4).is_some_and(|len| len <= b.len())
}

fn supported(e: Encoding) -> bool {
    e == Encoding::PLAIN || e == Encoding::BYTE_STREAM_SPLIT
}

/// Append `n` PLAIN or BYTE_STREAM_SPLIT int32 values from `b`.
fn copy_values(
    b: &[u8],
    n: usize,
    encoding: Encoding,
    values: &mut Vec<i32>,
    all_below: &mut bool,
    bound: u32,
) -> bool {
    let start = values.len();
    let Some(b) = n.checked_mul(4).and_then(|len| b.get(..len)) else {
        return false;
    };
    if encoding == Encoding::BYTE_STREAM_SPLIT {
        // four byte planes: byte k of value i is b[k * n + i]
        let (s0, rest) = b.split_at(n);
        let (s1, rest) = rest.split_at(n);
        let (s2, s3) = rest.split_at(n);
        values.extend(
            s0.iter()
                .zip(s1)
                .zip(s2.iter().zip(s3))
                .map(|((&a, &b), (&c, &d))| i32::from_le_bytes([a, b, c, d])),
        );
    } else {
        values.extend(
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    // the page's values are still in cache: one branch-free unsigned compare each
    let bad = values[start..]
        .iter()
        .fold(false, |b, &v| b | (v as u32 >= bound));
    *all_below &= !bad;
    true
}

/// Read one page's levels: every definition level must be `max_def` (no nulls, no empty
/// lists); each repetition level 0 at page level `i` starts a row at chunk level `base + i`.
fn page_levels(
    rep: &[u8],
    def: &[u8],
    def_width: u32,
    max_def: i16,
    n: usize,
    base: usize,
    offsets: &mut Vec<usize>,
) -> bool {
    let all_max = |value: u64, count: usize, packed: Option<&[u8]>| match packed {
        None => value == max_def as u64 || count == 0,
        Some(bytes) => unpack_all_equal(bytes, def_width, count, max_def as u64),
    };
    if !runs(def, def_width, n, |_, count, value, packed| {
        all_max(value, count, packed)
    }) {
        return false;
    }
    runs(rep, 1, n, |pos, count, value, packed| {
        let at = base + pos;
        let opens_row = match packed {
            None => value == 0,
            Some(b) => b.first().is_some_and(|x| x & 1 == 0),
        };
        if at == 0 && !opens_row {
            return false; // the chunk must open with a row start
        }
        match packed {
            None if value == 0 => offsets.extend((at..at + count).filter(|&i| i > 0)),
            None => {}
            Some(bytes) => {
                for (k, &byte) in bytes.iter().enumerate() {
                    if byte == 0xff {
                        continue;
                    }
                    for bit in 0..8 {
                        let i = k * 8 + bit;
                        if i < count && byte & (1 << bit) == 0 && at + i > 0 {
                            offsets.push(at + i);
                        }
                    }
                }
            }
        }
        true
    })
}

/// Walk the RLE / bit-packed hybrid runs of `b` covering `n` values: `f(pos, count, value,
/// packed)` gets each RLE run's value, or for a bit-packed run its bytes. False when `f` is
/// or the runs do not cover exactly `n` values.
fn runs(
    b: &[u8],
    width: u32,
    n: usize,
    mut f: impl FnMut(usize, usize, u64, Option<&[u8]>) -> bool,
) -> bool {
    let (mut i, mut pos) = (0usize, 0usize);
    let value_bytes = width.div_ceil(8) as usize;
    while pos < n {
        let Some(h) = uleb128(b, &mut i) else {
            return false;
        };
        if h & 1 == 1 {
            let groups = (h >> 1) as usize;
            let Some(len) = groups.checked_mul(width as usize) else {
                return false;
            };
            let Some(bytes) = i.checked_add(len).and_then(|e| b.get(i..e)) else {
                return false;
            };
            let count = (groups * 8).min(n - pos);
            if !f(pos, count, 0, Some(bytes)) {
                return false;
            }
            i += len;
            pos += count;
        } else {
            let count = (h >> 1) as usize;
            let Some(vb) = b.get(i..i + value_bytes) else {
                return false;
            };
            let value = vb.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64);
            i += value_bytes;
            if count == 0 || count > n - pos || !f(pos, count, value, None) {
                return false;
            }
            pos += count;
        }
    }
    pos == n
}

fn uleb128(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Whether the first `count` `width`-bit values packed little-endian in `bytes` all equal `v`.
fn unpack_all_equal(bytes: &[u8], width: u32, count: usize, v: u64) -> bool {
    if width == 1 && v == 1 {
        let full = count / 8;
        let tail = count % 8;
        return bytes[..full].iter().all(|&b| b == 0xff)
            && (tail == 0 || bytes[full] & ((1u8 << tail) - 1) == (1u8 << tail) - 1);
    }
    let mask = (1u64 << width) - 1;
    (0..count).all(|k| {
        let bit = k * width as usize;
        let mut x = 0u64;
        for j in 0..width as usize {
            let p = bit + j;
            x |= (((bytes[p / 8] >> (p % 8)) & 1) as u64) << j;
        }
        x & mask == v
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_from_runs() {
        // rep levels 0,1,1,0,1,1,1,1 bit-packed (one group)
        let rep = [0x03, 0b1111_0110];
        let def = [0x10, 0x01]; // RLE: eight 1s
        let mut o = vec![0];
        assert!(page_levels(&rep, &def, 1, 1, 8, 0, &mut o));
        assert_eq!(o, vec![0, 3]);
        // a null (def 0) is not handled here
        let def = [0x0e, 0x01, 0x02, 0x00];
        assert!(!page_levels(&rep, &def, 1, 1, 8, 0, &mut vec![0]));
    }
}
