//! Sampling warpers against transformers' own (tests/reference/make_sampling_reference.py):
//! on committed random logits, each case (single warpers and the whole chain) keeps the same
//! tokens and gives the same log-probabilities within 1e-6.

mod common;

use common::*;
use moeru_checkpoints::TensorFile;
use moeru_models::sampling::{log_softmax, Sampling};

const LOGPROB_TOL: f64 = 1e-6;

fn settings(text: &str) -> Sampling {
    let v: Vec<f64> = text.split(',').map(|x| x.parse().unwrap()).collect();
    Sampling {
        temperature: v[0],
        top_k: v[1] as usize,
        top_p: v[2],
        min_p: v[3],
        seed: 0,
    }
}

#[test]
fn warpers_keep_transformers_tokens_and_log_probs() {
    let file = TensorFile::open(&reference_dir().join("sampling/warpers.safetensors")).unwrap();
    let (logits, shape) = f32s(&file, "logits");
    let vocab = shape[1];
    let meta = file.metadata();
    assert!(meta.len() >= 6, "cases in the fixture: {meta:?}");
    for (case, text) in &meta {
        let sampling = settings(text);
        let (want, _) = f32s(&file, case);
        let mut worst = 0f64;
        for r in 0..shape[0] {
            let row = r * vocab..(r + 1) * vocab;
            let mut ours = logits[row.clone()].to_vec();
            sampling.warp(&mut ours);
            let kept = |v: &[f32]| v.iter().map(|x| x.is_finite()).collect::<Vec<_>>();
            assert_eq!(
                kept(&ours),
                kept(&want[row.clone()]),
                "{case} row {r}: kept set"
            );
            let (a, b) = (log_softmax(&ours), log_softmax(&want[row]));
            for (x, y) in a.iter().zip(&b).filter(|(x, _)| x.is_finite()) {
                worst = worst.max((x - y).abs());
            }
        }
        eprintln!("{case} ({text}): log-probs within {worst:.2e}");
        assert!(worst <= LOGPROB_TOL, "{case}: log-probs differ by {worst}");
    }
}
