//! The recipe's identity for checkpoints: sha256 of a canonical JSON form (object keys sorted
//! at every level, no whitespace), so key order in the YAML file does not matter but every
//! value does.

use sha2::{Digest, Sha256};

use super::schema::Recipe;

/// Canonical JSON: keys sorted at every level, compact.
pub fn canonical_json(recipe: &Recipe) -> String {
    // Serializing plain structs, maps with string keys, paths and finite floats cannot fail;
    // fall back to Debug output rather than panic if it ever does.
    match serde_json::to_value(recipe) {
        Ok(v) => sorted(&v).to_string(),
        Err(_) => format!("{recipe:?}"),
    }
}

/// A copy with object keys in sorted order, whatever map type serde_json was built with.
fn sorted(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        J::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut out = serde_json::Map::new();
            for k in keys {
                out.insert(k.clone(), sorted(&map[k]));
            }
            J::Object(out)
        }
        J::Array(items) => J::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// sha256 hex of [`canonical_json`], leaving out what does not change the training math: the
/// parallel layout (a checkpoint resumes at another DP size), `checkpoint.resume` and
/// `checkpoint.async` (both write the same files).
pub fn recipe_hash(recipe: &Recipe) -> String {
    let mut r = recipe.clone();
    r.parallel = Default::default();
    r.checkpoint.resume = true;
    r.checkpoint.asynchronous = false;
    let digest = Sha256::digest(canonical_json(&r).as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
