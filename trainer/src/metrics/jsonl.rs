//! `metrics.jsonl`: one JSON object per line, flushed per line, trimmed to the resume step.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::MetricsError;

/// File name of the JSON-lines log inside the metrics directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends JSON lines to `metrics.jsonl`.
pub struct JsonlWriter {
    path: PathBuf,
    file: File,
}

impl JsonlWriter {
    /// Opens `dir/metrics.jsonl` for appending after dropping every line whose `step` is greater
    /// than `resume_step` (the file is rewritten atomically: temp file, fsync, rename).
    /// `resume_step == 0` starts an empty file.
    pub fn open(dir: &Path, resume_step: u64) -> Result<Self, MetricsError> {
        let path = dir.join(METRICS_FILE);
        if resume_step == 0 {
            File::create(&path).map_err(|e| MetricsError::io("create", &path, e))?;
        } else {
            let kept = read_lines_up_to(&path, resume_step)?;
            rewrite_atomically(&path, &kept)?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| MetricsError::io("open", &path, e))?;
        Ok(JsonlWriter { path, file })
    }

    /// Writes `value` as one line and flushes it to the OS.
    pub fn write(&mut self, value: &Value) -> Result<(), MetricsError> {
        let mut line = value.to_string();
        line.push('\n');
        // `File` is unbuffered: one write_all per line, so a crash leaves at most one partial line.
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| MetricsError::io("write", &self.path, e))
    }

    /// Flushes file data to disk.
    pub fn sync(&mut self) -> Result<(), MetricsError> {
        self.file
            .sync_data()
            .map_err(|e| MetricsError::io("sync", &self.path, e))
    }
}

/// The lines of `path` whose `step` is at most `max_step`, verbatim (missing file: none).
/// A last line that does not parse (torn write) is dropped; an earlier one is an error.
fn read_lines_up_to(path: &Path, max_step: u64) -> Result<Vec<String>, MetricsError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(MetricsError::io("open", path, e)),
    };
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|e| MetricsError::io("read", path, e))?;
    let mut kept = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let step = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(Value::as_u64));
        match step {
            Some(s) if s <= max_step => kept.push(line.clone()),
            Some(_) => {}
            None if i + 1 == lines.len() => {}
            None => {
                return Err(MetricsError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                })
            }
        }
    }
    Ok(kept)
}

fn rewrite_atomically(path: &Path, lines: &[String]) -> Result<(), MetricsError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    let mut file = File::create(&tmp).map_err(|e| MetricsError::io("create", &tmp, e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| MetricsError::io("write", &tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| MetricsError::io("rename", &tmp, e))
}

/// Reads every line of a `metrics.jsonl` (for tests and tools). The file's floats are exact
/// (shortest round-trip text); serde_json's default parser may read some back one ulp off.
pub fn read_metrics(path: &Path) -> Result<Vec<Value>, MetricsError> {
    let text = fs::read_to_string(path).map_err(|e| MetricsError::io("read", path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|_| MetricsError::Corrupt {
                path: path.to_path_buf(),
                line: i + 1,
            })
        })
        .collect()
}
