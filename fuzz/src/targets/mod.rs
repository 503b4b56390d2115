//! The fuzz targets, each calling the real moeru parser or loader on a mutated input.

mod checkpoint;
mod data;
mod files;
mod wire;

use std::path::Path;

use crate::runner::{workspace_root, Target};

/// Every target's name, in table order.
pub const NAMES: &[&str] = &[
    "recipe",
    "config_json",
    "safetensors",
    "safetensors_index",
    "checkpoint_manifest",
    "trainer_state",
    "adapter_config",
    "parquet_shard",
    "jsonl_chat",
    "tokenizer_json",
    "wire_store",
    "wire_peer",
];

/// Builds the target `name` (its setup runs now: temp folders, a live server).
pub fn target(name: &str) -> Option<Target> {
    Some(match name {
        "recipe" => files::recipe(),
        "config_json" => files::config_json(),
        "safetensors" => files::safetensors(),
        "safetensors_index" => files::safetensors_index(),
        "adapter_config" => files::adapter_config(),
        "checkpoint_manifest" => checkpoint::manifest(),
        "trainer_state" => checkpoint::trainer_state(),
        "parquet_shard" => data::parquet_shard(),
        "jsonl_chat" => data::jsonl_chat(),
        "tokenizer_json" => data::tokenizer_json(),
        "wire_store" => wire::store(),
        "wire_peer" => wire::peer(),
        _ => return None,
    })
}

/// A committed file of the repository (a seed input).
pub(crate) fn repo_file(rel: &str) -> Vec<u8> {
    let path = workspace_root().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("seed {}: {e}", path.display()))
}

/// Writes `bytes` to `dir/name`, as an error string on failure.
pub(crate) fn put(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(dir.join(name), bytes).map_err(|e| format!("writing {name}: {e}"))
}

/// Copies every file of the committed folder `rel` into `to`.
pub(crate) fn copy_dir(rel: &str, to: &Path) {
    let from = workspace_root().join(rel);
    std::fs::create_dir_all(to).expect("create folder");
    for entry in std::fs::read_dir(&from)
        .expect("read fixture folder")
        .flatten()
    {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy fixture");
        }
    }
}

/// A target with the common settings.
pub(crate) fn target_of(
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    text: bool,
    run: crate::runner::RunFn,
) -> Target {
    let longest = seeds.iter().map(Vec::len).max().unwrap_or(0);
    Target {
        name,
        seeds,
        text,
        max_len: (longest * 2).max(4096),
        run,
        check: None,
        _keep: Vec::new(),
    }
}
