//! One bounded fuzz run per target (`MOERU_FUZZ_ITERS`, `MOERU_FUZZ_SEED`), and a replay of
//! every kept regression input. Single allocations over 1 GiB are refused, which aborts the
//! test binary (see `moeru_fuzz::alloc`).

use moeru_fuzz::alloc::CappedAlloc;
use moeru_fuzz::runner::{header, regressions_dir};
use moeru_fuzz::targets::{target, NAMES};
use moeru_fuzz::{run_one, run_target};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc::new(1 << 30);

/// Iterations for `name`: `MOERU_FUZZ_ITERS`, else a CI default sized to the target's cost.
fn iterations(default: u64) -> u64 {
    std::env::var("MOERU_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("MOERU_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn fuzz(name: &str, ci_iters: u64) {
    let t = target(name).expect("known target");
    let stats = run_target(&t, iterations(ci_iters), seed());
    println!("{}", header());
    println!("FUZZ {}", stats.row());
    let findings: Vec<&str> = stats.findings.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(stats.panics, 0, "`{name}` panicked: {findings:#?}");
    assert_eq!(stats.iterations, stats.ok + stats.errors);
}

#[test]
fn recipe() {
    fuzz("recipe", 1000);
}

#[test]
fn config_json() {
    fuzz("config_json", 2000);
}

#[test]
fn safetensors() {
    fuzz("safetensors", 1000);
}

#[test]
fn safetensors_index() {
    fuzz("safetensors_index", 300);
}

#[test]
fn checkpoint_manifest() {
    fuzz("checkpoint_manifest", 1000);
}

#[test]
fn trainer_state() {
    fuzz("trainer_state", 500);
}

#[test]
fn adapter_config() {
    fuzz("adapter_config", 2000);
}

#[test]
fn parquet_shard() {
    fuzz("parquet_shard", 500);
}

#[test]
fn jsonl_chat() {
    fuzz("jsonl_chat", 500);
}

#[test]
fn tokenizer_json() {
    fuzz("tokenizer_json", 500);
}

#[test]
fn wire_store() {
    fuzz("wire_store", 500);
}

#[test]
fn wire_peer() {
    fuzz("wire_peer", 2000);
}

/// Every file under `fuzz/regressions/<target>/` runs through its target without a panic,
/// and a refused input says why.
#[test]
fn regressions_replay() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut replayed = 0;
    for name in NAMES {
        let Ok(entries) = std::fs::read_dir(regressions_dir(name)) else {
            continue;
        };
        let t = target(name).expect("known target");
        for entry in entries.flatten() {
            let input = std::fs::read(entry.path()).expect("read regression input");
            let outcome = run_one(&t, &input, &scratch.path().join("in"));
            let shown = entry.path().display().to_string();
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(msg)) => assert!(!msg.trim().is_empty(), "{shown}: empty error"),
                Err(panic) => panic!("{shown} still panics: {panic}"),
            }
            replayed += 1;
        }
    }
    println!("replayed {replayed} regression inputs");
}
