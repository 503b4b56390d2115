//! Exact resume: the global sample stream after save/resume equals the uninterrupted stream,
//! also when the number of data-parallel ranks changes; and it never depends on dp_size.

mod common;

use std::path::Path;

use moeru_data::{DataLoader, LoaderConfig, LoaderState, PackMode, PackedSample};

fn cfg(dir: &Path, mode: PackMode) -> LoaderConfig {
    let mut c = LoaderConfig::new(dir, 64, 2, 1234);
    c.window_row_groups = 3;
    c.mode = mode;
    c
}

/// Run `dp` ranks for `steps` global batches; return the global samples in order and the
/// state (checked identical on every rank).
fn run_ranks(
    base: &LoaderConfig,
    dp: usize,
    steps: usize,
    from: Option<&LoaderState>,
) -> (Vec<PackedSample>, LoaderState) {
    let mut loaders: Vec<DataLoader> = (0..dp)
        .map(|r| {
            let c = base.clone().with_rank(r, dp);
            match from {
                // resume through JSON, as a checkpoint would
                Some(s) => {
                    DataLoader::from_state(c, &LoaderState::from_json(&s.to_json()).unwrap())
                        .unwrap()
                }
                None => DataLoader::new(c).unwrap(),
            }
        })
        .collect();
    let mut global = Vec::new();
    for _ in 0..steps {
        let per_rank: Vec<Vec<PackedSample>> = loaders
            .iter_mut()
            .map(|l| l.next_batch().unwrap().unwrap())
            .collect();
        let m = base.micro_batch;
        for j in 0..m * dp {
            global.push(per_rank[j / m][j % m].clone());
        }
    }
    let state = loaders[0].state();
    for l in &loaders[1..] {
        assert_eq!(l.state(), state, "ranks disagree on the loader state");
    }
    (global, state)
}

fn check_resume(mode: PackMode, dp_save: usize, dp_resume: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let docs = common::synthetic_docs(300, 150, 7);
    let report = common::prepare_ids(tmp.path(), &docs, 1500, 6000);
    assert!(report.manifest.shards.len() >= 3);
    let dir = tmp.path().join("ds");
    let base = cfg(&dir, mode);
    let total_tokens = report.manifest.tokens as usize;
    // enough steps to cross several windows and an epoch boundary
    let n_global = 2 * total_tokens / 64 + 37;
    let (reference, _) = run_ranks(&base, 1, n_global.div_ceil(2), None);

    let steps_before = 21 / dp_save + 5; // 2*dp_save*steps samples before saving
    let (before, state) = run_ranks(&base, dp_save, steps_before, None);
    assert_eq!(state.samples as usize, before.len());
    let remaining = reference.len() - before.len();
    let steps_after = remaining / (2 * dp_resume);
    let (after, _) = run_ranks(&base, dp_resume, steps_after, Some(&state));
    let stream: Vec<PackedSample> = before.into_iter().chain(after).collect();
    assert!(stream.len() > reference.len() / 2);
    for (i, (got, want)) in stream.iter().zip(&reference).enumerate() {
        assert_eq!(
            got, want,
            "global sample {i} differs (dp {dp_save} -> {dp_resume})"
        );
    }
}

#[test]
fn resume_dp1_to_dp1() {
    check_resume(PackMode::Pack, 1, 1);
}

#[test]
fn resume_dp2_to_dp2() {
    check_resume(PackMode::Pack, 2, 2);
}

#[test]
fn resume_dp2_to_dp4() {
    check_resume(PackMode::Pack, 2, 4);
}

#[test]
fn resume_dp4_to_dp1() {
    check_resume(PackMode::Pack, 4, 1);
}

#[test]
fn resume_dp2_to_dp4_pad_mode() {
    check_resume(PackMode::Pad, 2, 4);
}

#[test]
fn state_serializes_position_fields() {
    let tmp = tempfile::tempdir().unwrap();
    common::prepare_ids(tmp.path(), &common::synthetic_docs(50, 100, 1), 500, 2000);
    let mut l = DataLoader::new(cfg(&tmp.path().join("ds"), PackMode::Pack)).unwrap();
    l.next_batch().unwrap();
    let json: serde_json::Value = serde_json::from_str(&l.state().to_json()).unwrap();
    for key in [
        "epoch", "window", "doc", "offset", "seed", "samples", "dataset", "source",
    ] {
        assert!(json.get(key).is_some(), "state JSON lacks `{key}`: {json}");
    }
}

#[test]
fn resume_rejects_different_seed() {
    let tmp = tempfile::tempdir().unwrap();
    common::prepare_ids(tmp.path(), &common::synthetic_docs(50, 100, 1), 500, 2000);
    let dir = tmp.path().join("ds");
    let state = DataLoader::new(cfg(&dir, PackMode::Pack)).unwrap().state();
    let mut other = cfg(&dir, PackMode::Pack);
    other.seed = 99;
    let err = DataLoader::from_state(other, &state)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`seed` was 1234") && err.contains("99"),
        "{err}"
    );
}
