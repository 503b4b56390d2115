//! Small filesystem helpers: synced writes, a hashing writer, and the temp-folder-then-rename
//! protocol that keeps half-written output out of the destination.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};

/// Write `bytes` to `path` and fsync it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| DataError::io(path, "creating file", e))?;
    f.write_all(bytes)
        .map_err(|e| DataError::io(path, "writing file", e))?;
    f.sync_all()
        .map_err(|e| DataError::io(path, "syncing file", e))
}

/// A buffered file writer that computes the sha256 and size of what passes through it.
pub struct HashingWriter {
    file: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
}

impl HashingWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).map_err(|e| DataError::io(path, "creating file", e))?;
        Ok(Self {
            file: BufWriter::with_capacity(1 << 20, f),
            hasher: Sha256::new(),
            bytes: 0,
        })
    }

    /// Flush, fsync, and return (bytes, sha256 hex).
    pub fn finish(self, path: &Path) -> Result<(u64, String)> {
        let f = self
            .file
            .into_inner()
            .map_err(|e| DataError::io(path, "writing file", e.into_error()))?;
        f.sync_all()
            .map_err(|e| DataError::io(path, "syncing file", e))?;
        Ok((self.bytes, crate::tokenizer::hex(&self.hasher.finalize())))
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, "opening file", e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| DataError::io(path, "reading file", e))?;
    Ok(crate::tokenizer::hex(&h.finalize()))
}

/// A staging folder next to the destination. Dropped without `commit`, it is removed, so an
/// error never leaves partial output behind.
pub struct StagingDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// Fails if `dest` exists and is not an empty directory.
    pub fn new(dest: &Path) -> Result<Self> {
        if dest.exists() {
            let empty = dest.is_dir()
                && std::fs::read_dir(dest)
                    .map_err(|e| DataError::io(dest, "reading output", e))?
                    .next()
                    .is_none();
            if !empty {
                return Err(DataError::OutputExists {
                    path: dest.to_path_buf(),
                });
            }
        }
        let name = dest
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("output");
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .map_err(|e| DataError::io(&parent, "creating output parent", e))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| DataError::io(&tmp, "removing stale temp", e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| DataError::io(&tmp, "creating temp output", e))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Rename the staging folder onto the destination.
    pub fn commit(mut self) -> Result<()> {
        if self.dest.is_dir() {
            // an empty directory (checked in `new`); rename cannot replace it on every platform
            std::fs::remove_dir(&self.dest)
                .map_err(|e| DataError::io(&self.dest, "replacing empty output", e))?;
        }
        std::fs::rename(&self.tmp, &self.dest)
            .map_err(|e| DataError::io(&self.dest, "renaming temp output", e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
