//! Reading and writing safetensors files of f32 / i64 tensors.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::CheckpointError;

/// A memory-mapped safetensors file.
pub struct TensorFile {
    pub path: PathBuf,
    map: Mmap,
    /// Parsed once: start of the data section and every tensor's offsets.
    data_start: usize,
    metadata: Metadata,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        // SAFETY: the file is opened read-only and only read through `SafeTensors`, which
        // bounds-checks every access; moeru never writes to a file it has mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(path, e))?;
        let corrupt = |e: safetensors::SafeTensorError| CheckpointError::Corrupt {
            file: path.to_path_buf(),
            reason: e.to_string(),
        };
        // Full validation (offsets, sizes, file length) once; later reads use the offsets.
        SafeTensors::deserialize(&map).map_err(corrupt)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(corrupt)?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            data_start: 8 + header_len,
            metadata,
        })
    }

    /// The file's string metadata (`__metadata__` of the header).
    pub fn metadata(&self) -> HashMap<String, String> {
        self.metadata.metadata().clone().unwrap_or_default()
    }

    /// Tensor names with their shapes.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.metadata
            .tensors()
            .into_iter()
            .map(|(n, info)| (n, info.shape.clone()))
            .collect()
    }

    fn view(&self, name: &str) -> Result<TensorView<'_>, CheckpointError> {
        let corrupt = |reason: String| CheckpointError::Corrupt {
            file: self.path.clone(),
            reason,
        };
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| corrupt(format!("no tensor `{name}`")))?;
        let (start, end) = info.data_offsets;
        let data = &self.map[self.data_start + start..self.data_start + end];
        TensorView::new(info.dtype, info.shape.clone(), data).map_err(|e| corrupt(e.to_string()))
    }

    /// The tensor `name` converted to f32 (from F32, BF16 or F16), with its shape.
    /// The stored dtype of tensor `name`, as safetensors spells it (`F32`, `BF16`, …).
    pub fn dtype(&self, name: &str) -> Result<String, CheckpointError> {
        Ok(format!("{:?}", self.view(name)?.dtype()))
    }

    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), CheckpointError> {
        let view = self.view(name)?;
        Ok((
            to_f32(&view).ok_or_else(|| self.dtype_error(name, &view))?,
            view.shape().to_vec(),
        ))
    }

    /// Rows `rows` (along dim 0) of the tensor `name` converted to f32, decoding only their
    /// bytes, and the tensor's whole shape.
    pub fn f32_rows(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<(Vec<f32>, Vec<usize>), CheckpointError> {
        let view = self.view(name)?;
        let shape = view.shape().to_vec();
        let row_bytes = shape[1..].iter().product::<usize>() * view.dtype().bitsize() / 8;
        let data = &view.data()[rows.start * row_bytes..rows.end * row_bytes];
        let values = decode_f32(view.dtype(), data).ok_or_else(|| self.dtype_error(name, &view))?;
        Ok((values, shape))
    }

    /// The tensor `name` as i64 (from I64 or I32), with its shape.
    pub fn i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>), CheckpointError> {
        let view = self.view(name)?;
        let values = match view.dtype() {
            Dtype::I64 => le_chunks::<8>(view.data())
                .map(i64::from_le_bytes)
                .collect(),
            Dtype::I32 => le_chunks::<4>(view.data())
                .map(|b| i32::from_le_bytes(b) as i64)
                .collect(),
            other => {
                return Err(CheckpointError::UnsupportedDtype {
                    file: self.path.clone(),
                    name: name.into(),
                    dtype: format!("{other:?} (token ids must be I64 or I32)"),
                })
            }
        };
        Ok((values, view.shape().to_vec()))
    }

    fn dtype_error(&self, name: &str, view: &TensorView) -> CheckpointError {
        CheckpointError::UnsupportedDtype {
            file: self.path.clone(),
            name: name.into(),
            dtype: format!("{:?}", view.dtype()),
        }
    }
}

fn le_chunks<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N)
        .map(|c| c.try_into().expect("chunks_exact yields N bytes"))
}

fn to_f32(view: &TensorView) -> Option<Vec<f32>> {
    decode_f32(view.dtype(), view.data())
}

/// Little-endian F32, BF16 or F16 bytes as f32.
fn decode_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => le_chunks::<4>(data).map(f32::from_le_bytes).collect(),
        Dtype::BF16 => le_chunks::<2>(data)
            .map(|b| half::bf16::from_le_bytes(b).to_f32())
            .collect(),
        Dtype::F16 => le_chunks::<2>(data)
            .map(|b| half::f16::from_le_bytes(b).to_f32())
            .collect(),
        _ => return None,
    })
}

/// An owned tensor to be written: little-endian bytes plus dtype and shape.
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn f32(values: &[f32], shape: Vec<usize>) -> Self {
        Self {
            dtype: Dtype::F32,
            shape,
            bytes: le_bytes(values, f32::to_le_bytes),
        }
    }
    pub fn i64(values: &[i64], shape: Vec<usize>) -> Self {
        Self {
            dtype: Dtype::I64,
            shape,
            bytes: le_bytes(values, i64::to_le_bytes),
        }
    }
    /// The values of an F32 tensor.
    pub fn f32_values(&self) -> Vec<f32> {
        assert_eq!(
            self.dtype,
            Dtype::F32,
            "f32_values of a {:?} tensor",
            self.dtype
        );
        le_chunks::<4>(&self.bytes)
            .map(f32::from_le_bytes)
            .collect()
    }

    fn view(&self) -> TensorView<'_> {
        TensorView::new(self.dtype, self.shape.clone(), &self.bytes)
            .expect("OwnedTensor bytes match its shape")
    }
}

/// `values` as little-endian bytes, into a buffer sized once (a byte-wise collect was the
/// larger part of a checkpoint's snapshot time).
fn le_bytes<T: Copy, const N: usize>(values: &[T], to_le: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut bytes = vec![0u8; values.len() * N];
    for (out, v) in bytes.chunks_exact_mut(N).zip(values) {
        out.copy_from_slice(&to_le(*v));
    }
    bytes
}

/// Writes `tensors` to `path` with transformers' `{"format": "pt"}` metadata.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, OwnedTensor)],
) -> Result<(), CheckpointError> {
    let views = tensors.iter().map(|(n, t)| (n.as_str(), t.view()));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| CheckpointError::io(path, e))
}
