//! Getting strings, token ids and chat messages out of Arrow arrays of the shapes pyarrow and
//! HF datasets write (string / large_string / string_view, list / large_list, structs).

use arrow::array::{
    Array, AsArray, Int32Array, Int64Array, LargeStringArray, StringArray, StringViewArray,
    StructArray,
};
use arrow::datatypes::DataType;

use crate::chat::Message;

/// The Arrow type of a column, for error messages.
pub fn type_name(col: &dyn Array) -> String {
    col.data_type().to_string()
}

/// The string at row `i`, if the column is a string column.
pub fn str_at(col: &dyn Array, i: usize) -> Option<&str> {
    let any = col.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        return Some(a.value(i));
    }
    if let Some(a) = any.downcast_ref::<LargeStringArray>() {
        return Some(a.value(i));
    }
    if let Some(a) = any.downcast_ref::<StringViewArray>() {
        return Some(a.value(i));
    }
    None
}

fn list_item(col: &dyn Array, i: usize) -> Option<std::sync::Arc<dyn Array>> {
    match col.data_type() {
        DataType::List(_) => Some(col.as_list::<i32>().value(i)),
        DataType::LargeList(_) => Some(col.as_list::<i64>().value(i)),
        _ => None,
    }
}

/// Token ids at row `i` of a list<int32|int64> column.
pub fn ids_at(col: &dyn Array, i: usize) -> Option<Vec<i64>> {
    let item = list_item(col, i)?;
    let any = item.as_any();
    if let Some(a) = any.downcast_ref::<Int32Array>() {
        return Some(a.values().iter().map(|&v| v as i64).collect());
    }
    if let Some(a) = any.downcast_ref::<Int64Array>() {
        return Some(a.values().to_vec());
    }
    None
}

/// Chat messages at row `i`: list<struct<role, content, reasoning_content?>>, or a string
/// holding the messages as JSON. `Err` carries a description of what was found instead.
pub fn messages_at(col: &dyn Array, i: usize) -> Result<Vec<Message>, String> {
    if let Some(s) = str_at(col, i) {
        return serde_json::from_str(s)
            .map_err(|e| format!("a string that is not messages JSON ({e})"));
    }
    let Some(item) = list_item(col, i) else {
        return Err(type_name(col));
    };
    let Some(st) = item.as_any().downcast_ref::<StructArray>() else {
        return Err(type_name(col));
    };
    let role = st
        .column_by_name("role")
        .ok_or_else(|| format!("{} without a `role` field", type_name(col)))?;
    let content = st
        .column_by_name("content")
        .ok_or_else(|| format!("{} without a `content` field", type_name(col)))?;
    let reasoning = st.column_by_name("reasoning_content");
    let mut out = Vec::with_capacity(st.len());
    for j in 0..st.len() {
        let role_str = if role.is_null(j) {
            None
        } else {
            str_at(role.as_ref(), j)
        };
        let Some(role_str) = role_str else {
            return Err(format!(
                "message {j} with a null or non-string `role` ({})",
                role.data_type()
            ));
        };
        // A null content is an empty message (HF datasets writes None for empty turns).
        let content = if content.is_null(j) {
            ""
        } else {
            str_at(content.as_ref(), j).ok_or_else(|| {
                format!(
                    "message {j} with a non-string `content` ({})",
                    content.data_type()
                )
            })?
        };
        let reasoning_content = match reasoning {
            Some(r) if !r.is_null(j) => Some(
                str_at(r.as_ref(), j)
                    .ok_or_else(|| format!("message {j} with a non-string `reasoning_content`"))?
                    .to_string(),
            ),
            _ => None,
        };
        out.push(Message {
            role: role_str.to_string(),
            content: content.to_string(),
            reasoning_content,
        });
    }
    Ok(out)
}
