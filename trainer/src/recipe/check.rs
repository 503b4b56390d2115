//! Checks a located YAML tree against the key table (`keys.rs`): unknown keys (with the nearest
//! valid key), wrong types (with the expected type and the value found) and missing required
//! keys, each at its file position or `--set` argument. Produces the JSON the schema
//! deserializes from.

use std::path::Path;

use serde_json::Value as J;

use super::error::{suggestion, Origin, Place, RecipeError};
use super::keys::{self, Kind};
use super::tree::{Entry, Node, Value};

/// The checked recipe as JSON (only the keys present; serde fills in defaults).
pub fn check(root: &Node, file: &Path) -> Result<J, RecipeError> {
    let checker = Checker { file };
    match &root.value {
        Value::Map(entries) => checker.map("", entries, &Origin::Whole),
        other => Err(RecipeError::WrongType {
            at: checker.place(&root.origin),
            key: String::new(),
            expected: "a mapping with the sections `model`, `data`, `train`, `checkpoint`, \
                       `logging` (see docs/RECIPES.md)"
                .into(),
            found: match other {
                Value::Null => "an empty document".into(),
                v => v.describe(),
            },
        }),
    }
}

struct Checker<'a> {
    file: &'a Path,
}

impl Checker<'_> {
    fn place(&self, origin: &Origin) -> Place {
        Place {
            file: self.file.to_path_buf(),
            origin: origin.clone(),
        }
    }

    /// A list whose every item `item` accepts; the first it refuses is the error.
    fn list(
        &self,
        path: &str,
        kind: Kind,
        items: &[Node],
        item: impl Fn(&Value) -> Option<J>,
    ) -> Result<J, RecipeError> {
        let mut list = Vec::new();
        for node in items {
            match item(&node.value) {
                Some(x) => list.push(x),
                None => return Err(self.wrong(path, &node.origin, kind, &node.value, "")),
            }
        }
        Ok(J::Array(list))
    }

    fn wrong(
        &self,
        key: &str,
        origin: &Origin,
        kind: Kind,
        found: &Value,
        note: &str,
    ) -> RecipeError {
        RecipeError::WrongType {
            at: self.place(origin),
            key: key.to_string(),
            expected: kind.expected(),
            found: format!("{}{note}", found.describe()),
        }
    }

    /// A section's entries; `origin` is where the section's key is (for "missing" errors).
    fn map(&self, prefix: &str, entries: &[Entry], origin: &Origin) -> Result<J, RecipeError> {
        let mut out = serde_json::Map::new();
        for e in entries {
            let path = keys::join(prefix, &e.key);
            let Some(key) = keys::lookup(&path) else {
                return Err(RecipeError::UnknownKey {
                    at: self.place(&e.origin),
                    hint: suggestion(prefix, &e.key, &keys::children(prefix)),
                    key: path,
                });
            };
            out.insert(e.key.clone(), self.value(&path, key.kind, e)?);
        }
        for name in keys::children(prefix) {
            let path = keys::join(prefix, name);
            match keys::lookup(&path) {
                Some(k) if k.required && !out.contains_key(name) => {
                    return Err(RecipeError::Missing {
                        at: self.place(origin),
                        key: path,
                        meaning: k.meaning.to_string(),
                    });
                }
                _ => {}
            }
        }
        Ok(J::Object(out))
    }

    fn value(&self, path: &str, kind: Kind, e: &Entry) -> Result<J, RecipeError> {
        let node = &e.node;
        let wrong = || self.wrong(path, &node.origin, kind, &node.value, "");
        match (kind, &node.value) {
            (Kind::Section | Kind::OptSection, Value::Map(entries)) => {
                self.map(path, entries, &e.origin)
            }
            (Kind::OptSection, Value::Null) => Ok(J::Null),
            // An empty section (`optim:` with everything commented out) means all defaults.
            (Kind::Section, Value::Null) => self.map(path, &[], &e.origin),
            (Kind::UInt | Kind::OptUInt, Value::Int(i)) if *i >= 0 => Ok(J::from(*i)),
            (Kind::UInt | Kind::OptUInt, Value::UInt(u)) => Ok(J::from(*u)),
            (Kind::OptUInt, Value::Null) => Ok(J::Null),
            (Kind::Float | Kind::OptFloat, v) if number(v).is_some() => Ok(number(v).into()),
            (Kind::OptFloat | Kind::OptPath | Kind::FreeMap, Value::Null) => Ok(J::Null),
            (Kind::Bool, Value::Bool(b)) => Ok(J::Bool(*b)),
            (Kind::Path | Kind::OptPath | Kind::Str, Value::Str(s)) => Ok(J::String(s.clone())),
            (Kind::Enum(values), Value::Str(s)) if values.contains(&s.as_str()) => {
                Ok(J::String(s.clone()))
            }
            (Kind::Enum(values), Value::Str(s)) => {
                let hint = suggestion("", s, values);
                let note = if hint.starts_with("did you mean") {
                    format!("; {hint}")
                } else {
                    String::new()
                };
                Err(self.wrong(path, &node.origin, kind, &node.value, &note))
            }
            (Kind::FloatPair, Value::Seq(items)) if items.len() == 2 => {
                let mut pair = Vec::new();
                for item in items {
                    match number(&item.value) {
                        Some(x) => pair.push(x),
                        None => return Err(self.wrong(path, &item.origin, kind, &item.value, "")),
                    }
                }
                Ok(pair.into())
            }
            (Kind::Names(values), Value::Str(s)) if values.contains(&s.as_str()) => {
                Ok(J::Array(vec![J::String(s.clone())]))
            }
            (Kind::Names(values), Value::Seq(items)) => self.list(path, kind, items, |v| match v {
                Value::Str(s) if values.contains(&s.as_str()) => Some(J::String(s.clone())),
                _ => None,
            }),
            (Kind::OptFloatList | Kind::OptUIntList, Value::Null) => Ok(J::Null),
            (Kind::OptUIntList, Value::Seq(items)) => self.list(path, kind, items, |v| match v {
                Value::Int(i) if *i >= 0 => Some(J::from(*i)),
                Value::UInt(u) => Some(J::from(*u)),
                _ => None,
            }),
            (Kind::OptFloatList, Value::Seq(items)) => {
                self.list(path, kind, items, |v| number(v).map(J::from))
            }
            (Kind::StrList, Value::Seq(items)) => self.list(path, kind, items, |v| match v {
                Value::Str(s) => Some(J::String(s.clone())),
                _ => None,
            }),
            (Kind::MapList, Value::Seq(items)) => {
                let mut out = Vec::new();
                for item in items {
                    match &item.value {
                        Value::Map(_) => {
                            out.push(item.value.to_json().map_err(|x| RecipeError::WrongType {
                                at: self.place(&item.origin),
                                key: path.to_string(),
                                expected: kind.expected(),
                                found: format!("{x}"),
                            })?)
                        }
                        other => return Err(self.wrong(path, &item.origin, kind, other, "")),
                    }
                }
                Ok(J::Array(out))
            }
            (Kind::FreeMap, Value::Map(_)) => {
                node.value.to_json().map_err(|x| RecipeError::WrongType {
                    at: self.place(&node.origin),
                    key: path.to_string(),
                    expected: "finite numbers in config.json fields".into(),
                    found: format!("{x}"),
                })
            }
            _ => Err(wrong()),
        }
    }
}

/// A finite number (integers widen to f64).
fn number(v: &Value) -> Option<f64> {
    let x = match v {
        Value::Int(i) => *i as f64,
        Value::UInt(u) => *u as f64,
        Value::Float(x) => *x,
        _ => return None,
    };
    x.is_finite().then_some(x)
}
