//! Reading raw input records for `prepare`: JSONL, Parquet (as pyarrow / HF datasets write it)
//! and plain text files. Parquet is read batch by batch, never whole.
//!
//! Rows are numbered from 0; in a JSONL file row N is line N+1 (blank lines are skipped but
//! counted). A plain text file is one document (row 0, field `text`).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow::array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;

use crate::chat::Message;
use crate::error::{DataError, Location, Result};
use crate::input_arrow::{messages_at, type_name};

/// Which fields to read and how to interpret them.
#[derive(Debug, Clone)]
pub struct InputSpec {
    /// Chat mode: read `messages_field`; otherwise read `text_field` (or `ids_field`).
    pub chat: bool,
    pub text_field: String,
    pub messages_field: String,
    /// Pre-tokenized input: read token ids from this field instead of text.
    pub ids_field: Option<String>,
    /// Preference (DPO) mode: read prompt / chosen / rejected fields instead.
    pub preference: Option<PreferenceSpec>,
}

/// Which fields hold a preference pair (TRL's names by default), and the prompt length limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceSpec {
    pub prompt_field: String,
    pub chosen_field: String,
    pub rejected_field: String,
    /// When set, a prompt of `seq_len` tokens or more is an error (`--seq-len`).
    pub seq_len: Option<usize>,
}

impl Default for PreferenceSpec {
    fn default() -> Self {
        Self {
            prompt_field: "prompt".into(),
            chosen_field: "chosen".into(),
            rejected_field: "rejected".into(),
            seq_len: None,
        }
    }
}

impl PreferenceSpec {
    /// The three field names, in prompt, chosen, rejected order.
    pub fn fields(&self) -> [&str; 3] {
        [&self.prompt_field, &self.chosen_field, &self.rejected_field]
    }
}

impl Default for InputSpec {
    fn default() -> Self {
        Self {
            chat: false,
            text_field: "text".into(),
            messages_field: "messages".into(),
            ids_field: None,
            preference: None,
        }
    }
}

impl InputSpec {
    /// The field this spec reads (in preference mode: the prompt field).
    pub fn field(&self) -> &str {
        if let Some(p) = &self.preference {
            return &p.prompt_field;
        }
        match (&self.ids_field, self.chat) {
            (Some(f), _) => f,
            (None, true) => &self.messages_field,
            (None, false) => &self.text_field,
        }
    }
}

/// The content of one input row.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Messages(Vec<Message>),
    Ids(Vec<i64>),
    /// A preference pair (preference mode).
    Preference(PreferenceRow),
}

/// One part of a preference row: plain text, or messages (TRL's conversational format).
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Messages(Vec<Message>),
}

/// A preference row as read: prompt, chosen and rejected, each plain or conversational.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceRow {
    pub prompt: Part,
    pub chosen: Part,
    pub rejected: Part,
}

/// One input row and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub row: u64,
    pub content: Content,
}

/// The input format, from the file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Parquet,
    Text,
}

impl Format {
    pub fn of(path: &Path) -> Format {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("jsonl") | Some("json") | Some("ndjson") => Format::Jsonl,
            Some("parquet") | Some("pq") => Format::Parquet,
            _ => Format::Text,
        }
    }
}

/// Expand the `--input` paths: directories are walked (files sorted by path).
pub fn expand_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| DataError::io(p, "reading input", e))?;
        if meta.is_dir() {
            let mut files = Vec::new();
            walk(p, &mut files)?;
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    if out.is_empty() {
        return Err(DataError::NoInputs);
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, "listing input", e))?;
    for entry in entries {
        let path = entry
            .map_err(|e| DataError::io(dir, "listing input", e))?
            .path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// A lazily-read stream of records from one input file.
pub struct RecordReader {
    path: PathBuf,
    spec: InputSpec,
    inner: Inner,
}

enum Inner {
    Jsonl {
        lines: std::io::Lines<BufReader<File>>,
        row: u64,
    },
    Parquet {
        batches: ParquetRecordBatchReader,
        batch: Option<(RecordBatch, usize)>,
        row: u64,
    },
    Text {
        done: bool,
    },
}

impl RecordReader {
    pub fn open(path: &Path, spec: &InputSpec) -> Result<Self> {
        let inner = match Format::of(path) {
            Format::Jsonl => {
                let f = File::open(path).map_err(|e| DataError::io(path, "opening input", e))?;
                Inner::Jsonl {
                    lines: BufReader::new(f).lines(),
                    row: 0,
                }
            }
            Format::Parquet => Inner::Parquet {
                batches: open_parquet(path, spec)?,
                batch: None,
                row: 0,
            },
            Format::Text => Inner::Text { done: false },
        };
        Ok(Self {
            path: path.to_path_buf(),
            spec: spec.clone(),
            inner,
        })
    }

    fn next_record(&mut self) -> Result<Option<Record>> {
        let path = self.path.clone();
        match &mut self.inner {
            Inner::Jsonl { lines, row } => loop {
                let Some(line) = lines.next() else {
                    return Ok(None);
                };
                let line = line.map_err(|e| DataError::io(&path, "reading input", e))?;
                let r = *row;
                *row += 1;
                if line.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| DataError::BadJson(Location::row(&path, r), e.to_string()))?;
                let content = json_content(&path, r, &value, &self.spec)?;
                return Ok(Some(Record { row: r, content }));
            },
            Inner::Parquet {
                batches,
                batch,
                row,
            } => loop {
                if let Some((b, i)) = batch {
                    if *i < b.num_rows() {
                        let r = *row;
                        let content = match &self.spec.preference {
                            Some(p) => crate::input_pref::arrow_row(&path, r, b, *i, p)?,
                            None => arrow_content(&path, r, b.column(0).as_ref(), *i, &self.spec)?,
                        };
                        *i += 1;
                        *row += 1;
                        return Ok(Some(Record { row: r, content }));
                    }
                }
                match batches.next() {
                    None => return Ok(None),
                    Some(b) => {
                        let b: RecordBatch = b.map_err(|e| DataError::parquet(&path, e))?;
                        *batch = Some((b, 0));
                    }
                }
            },
            Inner::Text { done } => {
                if *done {
                    return Ok(None);
                }
                *done = true;
                let bytes =
                    std::fs::read(&path).map_err(|e| DataError::io(&path, "reading input", e))?;
                let text = String::from_utf8(bytes).map_err(|e| {
                    DataError::wrong_type(
                        Location::field(&path, 0, "text"),
                        "UTF-8 text",
                        format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
                        "convert the file to UTF-8",
                    )
                })?;
                if self.spec.chat || self.spec.ids_field.is_some() || self.spec.preference.is_some()
                {
                    return Err(DataError::Invalid(
                        Location::file(&path),
                        "a plain text file has no messages, token ids or preference pairs; use \
                         JSONL or Parquet for --chat, --ids-field and --preference"
                            .into(),
                    ));
                }
                Ok(Some(Record {
                    row: 0,
                    content: Content::Text(text),
                }))
            }
        }
    }
}

impl Iterator for RecordReader {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

fn open_parquet(path: &Path, spec: &InputSpec) -> Result<ParquetRecordBatchReader> {
    let f = File::open(path).map_err(|e| DataError::io(path, "opening input", e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| DataError::parquet(path, e))?;
    let schema = builder.schema().clone();
    let (fields, flags): (Vec<&str>, &str) = match &spec.preference {
        Some(p) => (
            p.fields().to_vec(),
            "--prompt-field / --chosen-field / --rejected-field",
        ),
        None => (vec![spec.field()], "--text-field / --messages-field"),
    };
    let mut roots = Vec::with_capacity(fields.len());
    for field in fields {
        let Some((idx, _)) = schema.fields().find(field) else {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(DataError::MissingField(
                Location {
                    file: path.to_path_buf(),
                    row: None,
                    field: Some(field.to_string()),
                },
                format!("the file's columns are {names:?}; pass the right {flags}"),
            ));
        };
        roots.push(idx);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()
        .map_err(|e| DataError::parquet(path, e))
}

fn json_content(
    path: &Path,
    row: u64,
    value: &serde_json::Value,
    spec: &InputSpec,
) -> Result<Content> {
    let field = spec.field();
    let loc = || Location::field(path, row, field);
    let Some(obj) = value.as_object() else {
        return Err(DataError::wrong_type(
            Location::row(path, row),
            "a JSON object",
            json_type(value),
            "write one JSON object per line",
        ));
    };
    if let Some(p) = &spec.preference {
        return crate::input_pref::json_row(path, row, obj, p);
    }
    let Some(v) = obj.get(field) else {
        let keys: Vec<&String> = obj.keys().collect();
        return Err(DataError::MissingField(
            loc(),
            format!("the row's keys are {keys:?}; pass the right --text-field / --messages-field"),
        ));
    };
    if spec.ids_field.is_some() {
        let arr = v.as_array().ok_or_else(|| {
            DataError::wrong_type(
                loc(),
                "an array of token ids",
                json_type(v),
                "store ids as a list",
            )
        })?;
        let mut ids = Vec::with_capacity(arr.len());
        for x in arr {
            ids.push(x.as_i64().ok_or_else(|| {
                DataError::wrong_type(
                    loc(),
                    "an integer token id",
                    x.to_string(),
                    "store ids as integers",
                )
            })?);
        }
        return Ok(Content::Ids(ids));
    }
    if spec.chat {
        let parsed: Vec<Message> = serde_json::from_value(v.clone()).map_err(|e| {
            DataError::wrong_type(
                loc(),
                "a list of {role, content, reasoning_content?} objects with string values",
                format!("{} ({e})", json_type(v)),
                "write messages in the OpenAI chat format",
            )
        })?;
        return Ok(Content::Messages(parsed));
    }
    match v.as_str() {
        Some(s) => Ok(Content::Text(s.to_string())),
        None => Err(DataError::wrong_type(
            loc(),
            "a string",
            json_type(v),
            "store the text as a string",
        )),
    }
}

pub(crate) fn json_type(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
    .to_string()
}

fn arrow_content(
    path: &Path,
    row: u64,
    col: &dyn Array,
    i: usize,
    spec: &InputSpec,
) -> Result<Content> {
    let field = spec.field();
    let loc = || Location::field(path, row, field);
    if col.is_null(i) {
        return Err(DataError::wrong_type(
            loc(),
            "a value",
            "null",
            "drop rows with null values",
        ));
    }
    if spec.ids_field.is_some() {
        return crate::input_arrow::ids_at(col, i)
            .ok_or_else(|| {
                DataError::wrong_type(
                    loc(),
                    "list<int32 or int64>",
                    type_name(col),
                    "store ids as a list of integers",
                )
            })
            .map(Content::Ids);
    }
    if spec.chat {
        return messages_at(col, i).map_err(|found| {
            DataError::wrong_type(
                loc(),
                "list<struct<role: string, content: string, reasoning_content: string?>> or a JSON string",
                found,
                "write messages in the OpenAI chat format",
            )
        }).map(Content::Messages);
    }
    match crate::input_arrow::str_at(col, i) {
        Some(s) => Ok(Content::Text(s.to_string())),
        None => Err(DataError::wrong_type(
            loc(),
            "string",
            type_name(col),
            "store the text as a string column",
        )),
    }
}
