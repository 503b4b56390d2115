//! A YAML document as a tree whose every node and key remembers where it came from (file
//! line:column or `--set` argument), parsed with serde-saphyr.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use super::error::Origin;

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub origin: Origin,
    pub value: Value,
}

/// One `key: value` entry of a mapping; `origin` is the key's position.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub origin: Origin,
    pub node: Node,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// An integer that fits in i64 (negative or small).
    Int(i64),
    /// A non-negative integer beyond i64.
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

impl Value {
    /// How an error message shows a found value: scalars as written, containers by kind.
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "null".into(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::UInt(u) => u.to_string(),
            Value::Float(x) => format!("{x:?}"),
            Value::Str(s) => format!("{s:?}"),
            Value::Seq(items) => format!("a list of {} item(s)", items.len()),
            Value::Map(_) => "a mapping".into(),
        }
    }

    /// The JSON value, or the first non-finite float found (JSON cannot hold it).
    pub fn to_json(&self) -> Result<serde_json::Value, f64> {
        use serde_json::Value as J;
        Ok(match self {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::UInt(u) => J::from(*u),
            Value::Float(x) => J::Number(serde_json::Number::from_f64(*x).ok_or(*x)?),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(
                items
                    .iter()
                    .map(|n| n.value.to_json())
                    .collect::<Result<_, _>>()?,
            ),
            Value::Map(entries) => {
                let mut map = serde_json::Map::new();
                for e in entries {
                    map.insert(e.key.clone(), e.node.value.to_json()?);
                }
                J::Object(map)
            }
        })
    }
}

impl Node {
    /// Parse one YAML document. Errors carry serde-saphyr's message and position.
    pub fn parse(text: &str) -> Result<Node, (Origin, String)> {
        serde_saphyr::from_str::<Node>(text).map_err(|e| {
            let origin = match e.location() {
                Some(l) if l.line() > 0 => Origin::File {
                    line: l.line(),
                    col: l.column(),
                },
                _ => Origin::Whole,
            };
            (origin, one_line(&e.without_snippet().to_string()))
        })
    }

    /// Set every origin in this subtree (a `--set` value parsed on its own).
    pub fn set_origin(&mut self, origin: &Origin) {
        self.origin = origin.clone();
        match &mut self.value {
            Value::Seq(items) => items.iter_mut().for_each(|n| n.set_origin(origin)),
            Value::Map(entries) => entries.iter_mut().for_each(|e| {
                e.origin = origin.clone();
                e.node.set_origin(origin);
            }),
            _ => {}
        }
    }

    /// The entry at a dotted path, if present.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        let mut node = self;
        let mut found = None;
        for seg in path.split('.') {
            let Value::Map(entries) = &node.value else {
                return None;
            };
            let e = entries.iter().find(|e| e.key == seg)?;
            node = &e.node;
            found = Some(e);
        }
        found
    }
}

/// Drop serde-saphyr's " at line L, column C" suffix (we print the position first) and keep
/// the message on one line.
fn one_line(msg: &str) -> String {
    let msg = match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains(", column ") => &msg[..i],
        _ => msg,
    };
    let msg = msg.replace(
        ", set DuplicateKeyPolicy in Options if acceptable",
        " (each key may appear only once)",
    );
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn origin_of<T>(s: &Spanned<T>) -> Origin {
    let l = s.referenced;
    if l.line() == 0 {
        Origin::Whole
    } else {
        Origin::File {
            line: l.line(),
            col: l.column(),
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<Value>::deserialize(d)?;
        Ok(Node {
            origin: origin_of(&s),
            value: s.value,
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

/// A mapping key: any scalar, kept as its text.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Str(s) => Ok(KeyText(s)),
            Value::Bool(b) => Ok(KeyText(b.to_string())),
            Value::Int(i) => Ok(KeyText(i.to_string())),
            Value::UInt(u) => Ok(KeyText(u.to_string())),
            Value::Float(x) => Ok(KeyText(x.to_string())),
            Value::Null => Ok(KeyText("null".into())),
            _ => Err(de::Error::custom("mapping keys must be plain scalars")),
        }
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::UInt(v), Value::Int))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        if let Ok(i) = i64::try_from(v) {
            Ok(Value::Int(i))
        } else if let Ok(u) = u64::try_from(v) {
            Ok(Value::UInt(u))
        } else {
            Ok(Value::Str(v.to_string()))
        }
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        match u64::try_from(v) {
            Ok(u) => self.visit_u64(u),
            Err(_) => Ok(Value::Str(v.to_string())),
        }
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = seq.next_element::<Node>()? {
            items.push(n);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(k) = map.next_key::<Spanned<KeyText>>()? {
            let node: Node = map.next_value()?;
            entries.push(Entry {
                key: k.value.0.clone(),
                origin: origin_of(&k),
                node,
            });
        }
        Ok(Value::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: u64, col: u64) -> Origin {
        Origin::File { line, col }
    }

    #[test]
    fn keys_and_values_have_positions() {
        let n = Node::parse("a:\n  b: 5\n  c: [1, x]\nd: {e: null}\n").unwrap();
        let b = n.get("a.b").unwrap();
        assert_eq!(b.origin, at(2, 3));
        assert_eq!(b.node.origin, at(2, 6));
        assert_eq!(b.node.value, Value::Int(5));
        let c = n.get("a.c").unwrap();
        let Value::Seq(items) = &c.node.value else {
            panic!("not a seq")
        };
        assert_eq!(items[1].value, Value::Str("x".into()));
        assert_eq!(n.get("d.e").unwrap().origin, at(4, 5));
        assert_eq!(n.get("d.e").unwrap().node.value, Value::Null);
    }

    #[test]
    fn scalars_are_typed() {
        let n = Node::parse("a: 3e-4\nb: -3\nc: true\nd: '8'\ne: 1.5\n").unwrap();
        assert_eq!(n.get("a").unwrap().node.value, Value::Float(3e-4));
        assert_eq!(n.get("b").unwrap().node.value, Value::Int(-3));
        assert_eq!(n.get("c").unwrap().node.value, Value::Bool(true));
        assert_eq!(n.get("d").unwrap().node.value, Value::Str("8".into()));
        assert_eq!(n.get("e").unwrap().node.value.describe(), "1.5");
    }

    #[test]
    fn syntax_error_has_position_and_one_line() {
        let (origin, msg) = Node::parse("a:\n  b: 1\n  - x\n").unwrap_err();
        assert_eq!(origin, at(3, 5));
        assert!(!msg.contains('\n') && !msg.contains(" at line "), "{msg}");
    }
}
