//! `RecipeError`: every way loading a recipe can fail, each rendered as one line that names the
//! file position (or the `--set` argument), the key, and what was expected.

use std::fmt;
use std::path::PathBuf;

/// Where a value came from: a position in the recipe file, the file as a whole (a default or a
/// missing key), or a `--set` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// 1-based line and column in the recipe file.
    File { line: u64, col: u64 },
    /// No position: the file as a whole.
    Whole,
    /// The full `--set KEY=VALUE` argument.
    Set(String),
}

/// An [`Origin`] together with the recipe file it refers to, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub file: PathBuf,
    pub origin: Origin,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File { line, col } => write!(f, "{}:{line}:{col}", self.file.display()),
            Origin::Whole => write!(f, "{}", self.file.display()),
            Origin::Set(arg) => write!(f, "--set {arg}"),
        }
    }
}

impl Place {
    /// "`key`: " unless the place is a `--set` of exactly that key (which already names it).
    fn key_prefix(&self, key: &str) -> String {
        match &self.origin {
            _ if key.is_empty() => String::new(),
            Origin::Set(arg) if arg.split_once('=').map(|(k, _)| k.trim()) == Some(key) => {
                String::new()
            }
            _ => format!("`{key}`: "),
        }
    }
}

/// A recipe that cannot be loaded. `Display` is always a single line.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{}: cannot read recipe: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: invalid YAML: {msg}")]
    Yaml { at: Place, msg: String },
    #[error("--set {arg}: expected KEY.PATH=VALUE, e.g. `--set train.steps=100`")]
    MalformedSet { arg: String },
    #[error("{at}: unknown key `{key}`; {hint}")]
    UnknownKey {
        at: Place,
        key: String,
        /// "did you mean `x`?" or the list of valid keys there.
        hint: String,
    },
    #[error("{at}: {}expected {expected}, found {found}", at.key_prefix(key))]
    WrongType {
        at: Place,
        key: String,
        expected: String,
        found: String,
    },
    #[error("{at}: missing required key `{key}` ({meaning})")]
    Missing {
        at: Place,
        key: String,
        meaning: String,
    },
    #[error("{at}: {}{msg}", at.key_prefix(key))]
    Invalid { at: Place, key: String, msg: String },
}

impl RecipeError {
    /// The process exit code for this error: 2 (a usage error) for every recipe error.
    pub fn exit_code(&self) -> u8 {
        2
    }

    /// The dotted key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            RecipeError::UnknownKey { key, .. }
            | RecipeError::WrongType { key, .. }
            | RecipeError::Missing { key, .. }
            | RecipeError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Levenshtein distance between two strings (by chars).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// "did you mean `prefix.best`?" for the nearest candidate, or the list of valid keys when
/// nothing is close.
pub fn suggestion(prefix: &str, name: &str, candidates: &[&str]) -> String {
    let full = |c: &str| {
        if prefix.is_empty() {
            c.to_string()
        } else {
            format!("{prefix}.{c}")
        }
    };
    let best = candidates
        .iter()
        .map(|c| (edit_distance(&name.to_lowercase(), c), *c))
        .min();
    match best {
        Some((d, c)) if d <= 2.max(name.chars().count() / 3) => {
            format!("did you mean `{}`?", full(c))
        }
        _ if candidates.is_empty() => format!("`{prefix}` has no sub-keys"),
        _ => {
            let list: Vec<String> = candidates
                .iter()
                .map(|c| format!("`{}`", full(c)))
                .collect();
            format!("valid keys here: {}", list.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("stesp", "steps"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("lr", "lr"), 0);
    }

    #[test]
    fn suggestion_picks_nearest_or_lists() {
        let c = ["steps", "seed", "micro_batch_size"];
        assert_eq!(
            suggestion("train", "stesp", &c),
            "did you mean `train.steps`?"
        );
        assert!(suggestion("train", "zzzzzzzz", &c).starts_with("valid keys here: `train.steps`"));
    }

    #[test]
    fn exit_code_is_two() {
        let e = RecipeError::MalformedSet { arg: "x".into() };
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            e.to_string(),
            "--set x: expected KEY.PATH=VALUE, e.g. `--set train.steps=100`"
        );
    }
}
