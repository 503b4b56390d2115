//! Packing invariants: fixed length, labels never cross a document, positions restart per
//! document, every token of an epoch appears exactly once, shuffling is seeded.

mod common;

use moeru_data::{DataLoader, LoaderConfig, PackMode, PackedSample};

fn samples(
    dir: &std::path::Path,
    mode: PackMode,
    seed: u64,
    shuffle: bool,
    epochs: u64,
) -> Vec<PackedSample> {
    let mut c = LoaderConfig::new(dir, 48, 1, seed);
    c.mode = mode;
    c.shuffle = shuffle;
    c.window_row_groups = 2;
    c.epochs = Some(epochs);
    c.pad_id = Some(-7);
    let mut l = DataLoader::new(c).unwrap();
    let mut out = Vec::new();
    while let Some(b) = l.next_batch().unwrap() {
        out.extend(b);
    }
    out
}

/// Split a sample into its segments: (document id, token ids, labels, mask).
fn check_sample(s: &PackedSample, seq_len: usize) {
    assert_eq!(s.input_ids.len(), seq_len);
    for v in [&s.labels, &s.position_ids, &s.document_ids] {
        assert_eq!(v.len(), seq_len);
    }
    assert_eq!(s.loss_mask.len(), seq_len);
    for t in 0..seq_len {
        if t == 0 || s.document_ids[t] != s.document_ids[t - 1] {
            assert_eq!(s.position_ids[t], 0);
            if t > 0 {
                assert_eq!(s.document_ids[t], s.document_ids[t - 1] + 1);
            }
        } else {
            assert_eq!(s.position_ids[t], s.position_ids[t - 1] + 1);
        }
        if t + 1 < seq_len && s.loss_mask[t] == 1 {
            // the label is the next input token of the same document
            assert_eq!(
                s.document_ids[t + 1],
                s.document_ids[t],
                "label crosses a document at {t}"
            );
            assert_eq!(s.labels[t], s.input_ids[t + 1]);
        }
        if t + 1 < seq_len && s.document_ids[t + 1] != s.document_ids[t] {
            assert_eq!(
                s.loss_mask[t], 0,
                "last token of a document must not predict the next one"
            );
        }
    }
}

fn setup() -> (tempfile::TempDir, Vec<Vec<i64>>) {
    let tmp = tempfile::tempdir().unwrap();
    let docs = common::synthetic_docs(120, 100, 3);
    common::prepare_ids(tmp.path(), &docs, 800, 3000);
    (tmp, docs)
}

#[test]
fn packed_samples_keep_documents_apart() {
    let (tmp, docs) = setup();
    let out = samples(&tmp.path().join("ds"), PackMode::Pack, 5, true, 1);
    out.iter().for_each(|s| check_sample(s, 48));
    // every token of the epoch exactly once: the multiset of non-pad tokens equals the data
    let mut got: Vec<i64> = out
        .iter()
        .flat_map(|s| s.input_ids.iter().filter(|&&t| t != -7).map(|&t| t as i64))
        .collect();
    let mut want: Vec<i64> = docs.iter().flatten().copied().collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    // only the final sample has padding in pack mode
    let padded = out.iter().filter(|s| s.input_ids.contains(&-7)).count();
    assert!(padded <= 1);
    // loss positions: every token except the last of each document predicts a label
    let total_loss: usize = out.iter().map(|s| s.loss_tokens()).sum();
    assert_eq!(total_loss, want.len() - docs.len());
}

#[test]
fn unshuffled_stream_is_the_documents_in_order() {
    let (tmp, docs) = setup();
    let out = samples(&tmp.path().join("ds"), PackMode::Pack, 5, false, 1);
    let got: Vec<i64> = out
        .iter()
        .flat_map(|s| s.input_ids.iter().filter(|&&t| t != -7).map(|&t| t as i64))
        .collect();
    let want: Vec<i64> = docs.iter().flatten().copied().collect();
    assert_eq!(got, want);
}

#[test]
fn pad_mode_puts_one_document_per_sample() {
    let (tmp, docs) = setup();
    let out = samples(&tmp.path().join("ds"), PackMode::Pad, 5, true, 1);
    out.iter().for_each(|s| check_sample(s, 48));
    let expected: usize = docs.iter().map(|d| d.len().div_ceil(48)).sum();
    assert_eq!(out.len(), expected);
    for s in &out {
        // a real document segment first, padding (if any) as the one other segment
        let segs = s.document_ids.iter().max().unwrap() + 1;
        assert!(segs <= 2);
        if segs == 2 {
            let first_pad = s.document_ids.iter().position(|&d| d == 1).unwrap();
            assert!(s.input_ids[first_pad..].iter().all(|&t| t == -7));
            assert!(s.loss_mask[first_pad - 1..].iter().all(|&m| m == 0));
        }
    }
}

#[test]
fn long_document_continues_with_a_label_at_the_sample_end() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = vec![(1..=100).collect::<Vec<i64>>()];
    common::prepare_ids(tmp.path(), &docs, 800, 3000);
    let out = samples(&tmp.path().join("ds"), PackMode::Pack, 0, false, 1);
    assert_eq!(out[0].input_ids[..3], [1, 2, 3]);
    assert_eq!((out[0].labels[47], out[0].loss_mask[47]), (49, 1));
    assert_eq!(out[1].input_ids[0], 49);
    assert_eq!(out[2].input_ids[..4], [97, 98, 99, 100]);
    assert_eq!(out[2].loss_mask[3], 0);
}

#[test]
fn shuffling_is_seeded_and_epochs_differ() {
    let (tmp, _) = setup();
    let dir = tmp.path().join("ds");
    let a = samples(&dir, PackMode::Pack, 5, true, 2);
    let b = samples(&dir, PackMode::Pack, 5, true, 2);
    let c = samples(&dir, PackMode::Pack, 6, true, 2);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let half = a.len() / 2;
    assert_ne!(
        a[..10],
        a[half..half + 10],
        "epoch 2 should be ordered differently"
    );
}

#[test]
fn chat_loss_mask_is_carried_into_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("chat");
    let report = moeru_data::prepare(&common::options(
        vec![common::fixtures().join("chat.jsonl")],
        &out,
        common::chat_spec(),
    ))
    .unwrap();
    let s = samples(&out, PackMode::Pack, 1, true, 1);
    s.iter().for_each(|x| check_sample(x, 48));
    // target mask counts each masked-in token except a document's first (never a label)
    let total: usize = s.iter().map(|x| x.loss_tokens()).sum();
    assert_eq!(total as u64, report.manifest.loss_tokens);
}
