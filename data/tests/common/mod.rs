//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Parser;
use moeru_data::cli::{run_data_command, DataCommand};
use moeru_data::input::InputSpec;
use moeru_data::rng::SplitMix64;
use moeru_data::shard_writer::ShardLayout;
use moeru_data::{prepare, PrepareOptions, PrepareReport};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tokenizer_path() -> PathBuf {
    fixtures().join("qwen3/tokenizer.json")
}

pub fn options(inputs: Vec<PathBuf>, output: &Path, spec: InputSpec) -> PrepareOptions {
    PrepareOptions {
        tokenizer: tokenizer_path(),
        inputs,
        output: output.to_path_buf(),
        spec,
        layout: ShardLayout::default(),
        eos_token: "<|endoftext|>".into(),
        progress: false,
    }
}

pub fn chat_spec() -> InputSpec {
    InputSpec {
        chat: true,
        ..InputSpec::default()
    }
}

/// Deterministic synthetic documents of token ids (lengths 1..=max_len).
pub fn synthetic_docs(n: usize, max_len: u64, seed: u64) -> Vec<Vec<i64>> {
    let mut r = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let len = 1 + r.below(max_len);
            (0..len).map(|_| r.below(151_000) as i64).collect()
        })
        .collect()
}

/// Prepare a pre-tokenized dataset with many small row groups and several shards.
pub fn prepare_ids(
    dir: &Path,
    docs: &[Vec<i64>],
    row_group_tokens: u64,
    shard_tokens: u64,
) -> PrepareReport {
    let input = dir.join("ids.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    for d in docs {
        writeln!(f, "{}", serde_json::json!({ "input_ids": d })).unwrap();
    }
    drop(f);
    let spec = InputSpec {
        ids_field: Some("input_ids".into()),
        ..InputSpec::default()
    };
    let mut opts = options(vec![input], &dir.join("ds"), spec);
    opts.layout = ShardLayout {
        shard_tokens,
        row_group_tokens,
        zstd_level: 1,
    };
    prepare(&opts).unwrap()
}

/// Write `lines` to `dir/name` and return the path.
pub fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

/// Whether the CLI's parser accepts `moeru data ARGS...`.
pub fn parses(args: &[&str]) -> bool {
    Cli::try_parse_from(std::iter::once("moeru-data").chain(args.iter().copied())).is_ok()
}

/// `moeru data ARGS...` through the CLI's own parser and dispatch.
pub fn run(args: &[&str]) -> Result<(), moeru_data::DataError> {
    let cli =
        Cli::try_parse_from(std::iter::once("moeru-data").chain(args.iter().copied())).unwrap();
    run_data_command(cli.cmd)
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: DataCommand,
}
