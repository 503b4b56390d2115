//! `--set KEY.PATH=VALUE` overrides: the key path must exist in the schema (anything below
//! `model.architecture` is allowed), the value is a YAML scalar or flow value (`5`, `null`,
//! `[0.9, 0.99]`, `{lr: 1e-3}`). The value replaces the file's; types are checked afterwards
//! with the rest of the recipe, and errors name the `--set` argument.

use std::path::Path;

use super::error::{suggestion, Origin, Place, RecipeError};
use super::keys;
use super::tree::{Entry, Node, Value};

/// Apply one `--set` argument to the parsed recipe tree.
pub fn apply(root: &mut Node, arg: &str, file: &Path) -> Result<(), RecipeError> {
    let malformed = || RecipeError::MalformedSet {
        arg: arg.to_string(),
    };
    let (key, text) = arg.split_once('=').ok_or_else(malformed)?;
    let key = key.trim();
    let segments: Vec<&str> = key.split('.').collect();
    if key.is_empty() || segments.iter().any(|s| s.is_empty()) {
        return Err(malformed());
    }
    let origin = Origin::Set(arg.to_string());
    let place = Place {
        file: file.to_path_buf(),
        origin: origin.clone(),
    };
    check_path(&segments, &place)?;

    let null = Node {
        origin: origin.clone(),
        value: Value::Null,
    };
    let is_path = matches!(
        keys::lookup(key).map(|k| k.kind),
        Some(keys::Kind::Path | keys::Kind::OptPath | keys::Kind::Str)
    );
    let mut value = match Node::parse(text) {
        _ if text.trim().is_empty() => null,
        // A path is taken as written unless it is a YAML string or null, so that
        // `--set checkpoint.dir=/tmp/a: b` or `=2024` need no quoting.
        Ok(n) if is_path && !matches!(n.value, Value::Str(_) | Value::Null) => raw(text, &origin),
        Err(_) if is_path => raw(text, &origin),
        Ok(n) => n,
        Err((_, msg)) => {
            return Err(RecipeError::Yaml {
                at: place.clone(),
                msg,
            })
        }
    };
    value.set_origin(&origin);
    insert(root, &segments, value, &origin);
    Ok(())
}

fn raw(text: &str, origin: &Origin) -> Node {
    Node {
        origin: origin.clone(),
        value: Value::Str(text.trim().to_string()),
    }
}

/// Every prefix of the path must be a schema key (or lie inside a free-form map).
fn check_path(segments: &[&str], place: &Place) -> Result<(), RecipeError> {
    let mut prefix = String::new();
    for seg in segments {
        let path = keys::join(&prefix, seg);
        if !keys::inside_free_map(&path) && keys::lookup(&path).is_none() {
            return Err(RecipeError::UnknownKey {
                at: place.clone(),
                hint: suggestion(&prefix, seg, &keys::children(&prefix)),
                key: path,
            });
        }
        prefix = path;
    }
    Ok(())
}

/// Put `value` at the path, creating (or replacing non-mapping values with) mappings on the way.
fn insert(node: &mut Node, segments: &[&str], value: Node, origin: &Origin) {
    let Some((first, rest)) = segments.split_first() else {
        *node = value;
        return;
    };
    if !matches!(node.value, Value::Map(_)) {
        node.value = Value::Map(Vec::new());
    }
    let Value::Map(entries) = &mut node.value else {
        return;
    };
    let idx = match entries.iter().position(|e| e.key == *first) {
        Some(i) => i,
        None => {
            entries.push(Entry {
                key: first.to_string(),
                origin: origin.clone(),
                node: Node {
                    origin: origin.clone(),
                    value: Value::Null,
                },
            });
            entries.len() - 1
        }
    };
    let entry = &mut entries[idx];
    if rest.is_empty() {
        // The key itself now comes from the override too.
        entry.origin = origin.clone();
    }
    insert(&mut entry.node, rest, value, origin);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Node {
        Node::parse("train:\n  steps: 5\nmodel:\n  architecture: null\n").unwrap()
    }

    #[test]
    fn replaces_and_creates() {
        let mut r = root();
        let f = Path::new("r.yaml");
        apply(&mut r, "train.steps=7", f).unwrap();
        apply(&mut r, "optim.betas=[0.9, 0.99]", f).unwrap();
        apply(&mut r, "model.architecture.hidden_size=64", f).unwrap();
        assert_eq!(r.get("train.steps").unwrap().node.value, Value::Int(7));
        let betas = r.get("optim.betas").unwrap();
        assert!(matches!(&betas.node.value, Value::Seq(v) if v.len() == 2));
        let h = r.get("model.architecture.hidden_size").unwrap();
        assert_eq!(h.node.value, Value::Int(64));
        assert_eq!(
            h.origin,
            Origin::Set("model.architecture.hidden_size=64".into())
        );
    }

    #[test]
    fn paths_need_no_quoting() {
        let mut r = root();
        let f = Path::new("r.yaml");
        apply(&mut r, "checkpoint.dir=/tmp/a: b #c", f).unwrap();
        let dir = r.get("checkpoint.dir").unwrap();
        assert_eq!(dir.node.value, Value::Str("/tmp/a: b #c".into()));
        apply(&mut r, "logging.dir=2024", f).unwrap();
        assert_eq!(
            r.get("logging.dir").unwrap().node.value,
            Value::Str("2024".into())
        );
        apply(&mut r, "data.eval=~", f).unwrap();
        assert_eq!(r.get("data.eval").unwrap().node.value, Value::Null);
    }

    #[test]
    fn empty_value_is_null() {
        let mut r = root();
        apply(&mut r, "data.eval=", Path::new("r.yaml")).unwrap();
        assert_eq!(r.get("data.eval").unwrap().node.value, Value::Null);
    }

    #[test]
    fn rejects_unknown_and_malformed() {
        let mut r = root();
        let f = Path::new("r.yaml");
        let e = apply(&mut r, "train.stesp=5", f).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--set train.stesp=5: unknown key `train.stesp`; did you mean `train.steps`?"
        );
        let e = apply(&mut r, "train.steps.x=5", f).unwrap_err();
        assert!(
            e.to_string().contains("`train.steps` has no sub-keys"),
            "{e}"
        );
        for bad in ["train.steps", "=5", "train..steps=5"] {
            let e = apply(&mut r, bad, f).unwrap_err();
            assert!(matches!(e, RecipeError::MalformedSet { .. }), "{bad}: {e}");
        }
        let e = apply(&mut r, "optim.betas=[0.9", f).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--set optim.betas=[0.9: invalid YAML"),
            "{e}"
        );
    }
}
