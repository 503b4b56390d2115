//! Reading one preference row (TRL's `prompt` / `chosen` / `rejected`) out of a JSON object or
//! an Arrow record batch. Owns only the shape checks: each field present, non-null, and a string
//! (plain format) or a list of messages (conversational format), all three in the same format;
//! the format is decided by the prompt's type. Tokenizing is `preference.rs`'s job.

use std::path::Path;

use arrow::array::{Array, RecordBatch};
use serde_json::{Map, Value};

use crate::chat::Message;
use crate::error::{DataError, Location, Result};
use crate::input::{json_type, Content, Part, PreferenceRow, PreferenceSpec};
use crate::input_arrow::{messages_at, str_at, type_name};

const MESSAGES: &str = "a list of {role, content, reasoning_content?} objects with string values";
const FIX: &str = "write the prompt, chosen and rejected fields all as strings (plain) or all as \
                   lists of messages (conversational), as TRL's preference format";

/// The preference row of a JSON object.
pub(crate) fn json_row(
    path: &Path,
    row: u64,
    obj: &Map<String, Value>,
    spec: &PreferenceSpec,
) -> Result<Content> {
    let get = |field: &str| -> Result<&Value> {
        obj.get(field).ok_or_else(|| {
            let keys: Vec<&String> = obj.keys().collect();
            DataError::MissingField(
                Location::field(path, row, field),
                format!(
                    "the row's keys are {keys:?}; pass the right --prompt-field / \
                     --chosen-field / --rejected-field"
                ),
            )
        })
    };
    let [pf, cf, rf] = spec.fields();
    let (p, c, r) = (get(pf)?, get(cf)?, get(rf)?);
    let conversational = p.is_array();
    let part = |field: &str, v: &Value| -> Result<Part> {
        let loc = || Location::field(path, row, field);
        match (conversational, v) {
            (false, Value::String(s)) => Ok(Part::Text(s.clone())),
            (false, _) => Err(DataError::wrong_type(
                loc(),
                "a string (the prompt is a string: plain format)",
                json_type(v),
                FIX,
            )),
            (true, Value::Array(_)) => serde_json::from_value::<Vec<Message>>(v.clone())
                .map(Part::Messages)
                .map_err(|e| {
                    DataError::wrong_type(
                        loc(),
                        MESSAGES,
                        format!("{} ({e})", json_type(v)),
                        "write messages in the OpenAI chat format",
                    )
                }),
            (true, _) => Err(DataError::wrong_type(
                loc(),
                "a list of messages (the prompt is a list: conversational format)",
                json_type(v),
                FIX,
            )),
        }
    };
    if !conversational && !p.is_string() {
        return Err(DataError::wrong_type(
            Location::field(path, row, pf),
            "a string (plain format) or a list of messages (conversational format)",
            json_type(p),
            FIX,
        ));
    }
    Ok(Content::Preference(PreferenceRow {
        prompt: part(pf, p)?,
        chosen: part(cf, c)?,
        rejected: part(rf, r)?,
    }))
}

/// The preference row at row `i` of a record batch holding (at least) the three columns.
pub(crate) fn arrow_row(
    path: &Path,
    row: u64,
    batch: &RecordBatch,
    i: usize,
    spec: &PreferenceSpec,
) -> Result<Content> {
    let [pf, cf, rf] = spec.fields();
    let col = |field: &str| -> Result<&dyn Array> {
        let c = batch.column_by_name(field).ok_or_else(|| {
            DataError::MissingField(
                Location::field(path, row, field),
                "the column is missing from the batch".into(),
            )
        })?;
        if c.is_null(i) {
            return Err(DataError::wrong_type(
                Location::field(path, row, field),
                "a value",
                "null",
                "drop rows with null values",
            ));
        }
        Ok(c.as_ref())
    };
    let (p, c, r) = (col(pf)?, col(cf)?, col(rf)?);
    let conversational = str_at(p, i).is_none();
    let part = |field: &str, a: &dyn Array| -> Result<Part> {
        let loc = || Location::field(path, row, field);
        if !conversational {
            return str_at(a, i)
                .map(|s| Part::Text(s.to_string()))
                .ok_or_else(|| {
                    DataError::wrong_type(
                        loc(),
                        "string (the prompt is a string column: plain format)",
                        type_name(a),
                        FIX,
                    )
                });
        }
        if str_at(a, i).is_some() {
            return Err(DataError::wrong_type(
                loc(),
                "list<struct<role, content>> (the prompt is a list of messages)",
                type_name(a),
                FIX,
            ));
        }
        messages_at(a, i)
            .map(Part::Messages)
            .map_err(|found| DataError::wrong_type(loc(), MESSAGES, found, FIX))
    };
    Ok(Content::Preference(PreferenceRow {
        prompt: part(pf, p)?,
        chosen: part(cf, c)?,
        rejected: part(rf, r)?,
    }))
}
