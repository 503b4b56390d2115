//! Recipe loading: YAML file → `--set` overrides → key/type check → [`Recipe`] → validation.
//!
//! Every error is a [`RecipeError`] whose `Display` is one line naming the file position (or
//! the `--set` argument), the key, and the fix; the CLI exits with [`RecipeError::exit_code`].
//! docs/RECIPES.md documents every key.

pub mod check;
pub mod dpo;
pub mod error;
pub mod grpo;
pub mod hash;
pub mod keys;
pub mod overrides;
pub mod schema;
pub mod tree;
pub mod validate;

use std::path::Path;

pub use self::error::{Origin, Place, RecipeError};
pub use self::hash::{canonical_json, recipe_hash};
pub use self::schema::{
    CheckpointSection, DataSection, LoggingSection, ModelSection, MoeSection, OptimSection,
    ParallelSection, Precision, Recipe, ScheduleKind, ScheduleSection, TaskKind, TrainSection,
};

/// Read a recipe file, apply `--set KEY.PATH=VALUE` overrides (in order), check and validate.
/// Relative paths inside the recipe are kept as written (the trainer resolves them against the
/// current working directory).
pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(&text, path, overrides)
}

/// [`load`] from text already read; `file` is only used in error messages.
pub fn load_str(text: &str, file: &Path, overrides: &[String]) -> Result<Recipe, RecipeError> {
    let place = |origin: Origin| Place {
        file: file.to_path_buf(),
        origin,
    };
    let mut root = tree::Node::parse(text).map_err(|(origin, msg)| RecipeError::Yaml {
        at: place(origin),
        msg,
    })?;
    for arg in overrides {
        overrides::apply(&mut root, arg, file)?;
    }
    let json = check::check(&root, file)?;
    // The check above mirrors the schema (tests keep the two in step), so this only fails if
    // they drift apart; report it on one line anyway.
    let recipe: Recipe = serde_json::from_value(json).map_err(|e| RecipeError::Invalid {
        at: place(Origin::Whole),
        key: String::new(),
        msg: format!("does not match the recipe schema: {e}"),
    })?;
    validate::validate(&recipe).map_err(|v| {
        // Point at the override that caused it, if one of the keys involved was overridden;
        // else at the key's value in the file.
        let origins: Vec<Origin> = std::iter::once(v.key)
            .chain(v.related.iter().copied())
            .filter_map(|k| root.get(k).map(|e| e.node.origin.clone()))
            .collect();
        let origin = origins
            .iter()
            .find(|o| matches!(o, Origin::Set(_)))
            .or(origins.first())
            .cloned()
            .unwrap_or(Origin::Whole);
        RecipeError::Invalid {
            at: place(origin),
            key: v.key.to_string(),
            msg: v.msg,
        }
    })?;
    Ok(recipe)
}

/// The effective recipe as YAML (every key, defaults included), to save next to a run.
/// `load` of this text gives back the same recipe.
pub fn to_yaml(recipe: &Recipe) -> String {
    serde_saphyr::to_string(recipe).unwrap_or_else(|_| {
        // Serializing plain data cannot fail; JSON is valid YAML as a fallback.
        serde_json::to_string_pretty(recipe).unwrap_or_default()
    })
}
