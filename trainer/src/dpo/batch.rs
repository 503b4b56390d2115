//! Preference pairs as one micro-batch, TRL's collator layout: the chosen rows
//! (prompt + chosen) then the rejected rows (prompt + rejected), right-padded to the longest,
//! targets the next token, the mask on completion tokens only.

use burn::tensor::Device;
use moeru_data::pairs::PreferencePair;

use crate::engine::MicroBatch;

/// What a DPO micro-batch carries besides its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRows {
    /// The pairs' dataset ids (keys of precomputed reference log-probs).
    pub ids: Vec<u64>,
    /// Completion tokens per row, chosen rows then rejected rows.
    pub completion_tokens: Vec<f32>,
    /// The rows' reference log-probs; `None`: reference-free. Set before the step.
    pub reference: Option<Vec<f64>>,
}

/// The two sequences of each pair: (prompt ++ completion, prompt length), chosen rows first.
fn rows(pairs: &[PreferencePair]) -> Vec<(Vec<i32>, usize)> {
    let row = |p: &PreferencePair, c: &[i32]| ([p.prompt.as_slice(), c].concat(), p.prompt.len());
    let chosen = pairs.iter().map(|p| row(p, &p.chosen));
    chosen
        .chain(pairs.iter().map(|p| row(p, &p.rejected)))
        .collect()
}

/// Completion tokens per row of `pairs` (TRL's completion-mask sums): every chosen row, then
/// every rejected one.
pub fn completion_tokens(pairs: &[PreferencePair]) -> Vec<f32> {
    let chosen = pairs.iter().map(|p| p.chosen.len() as f32);
    chosen
        .chain(pairs.iter().map(|p| p.rejected.len() as f32))
        .collect()
}

/// `pairs` as one micro-batch on `device` (see [`MicroBatch::from_completions`]).
pub fn pair_micro_batch(pairs: &[PreferencePair], device: &Device) -> MicroBatch {
    let completion_tokens = completion_tokens(pairs);
    MicroBatch {
        pairs: Some(PairRows {
            ids: pairs.iter().map(|p| p.id).collect(),
            completion_tokens,
            reference: None,
        }),
        ..MicroBatch::from_completions(&rows(pairs), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(id: u64, prompt: &[i32], chosen: &[i32], rejected: &[i32]) -> PreferencePair {
        PreferencePair {
            id,
            prompt: prompt.to_vec(),
            chosen: chosen.to_vec(),
            rejected: rejected.to_vec(),
        }
    }

    #[test]
    fn rows_are_chosen_then_rejected_with_completion_targets() {
        let pairs = [
            pair(7, &[5, 6, 7], &[8, 9], &[3]),
            pair(2, &[1, 2], &[4], &[9, 8, 7]),
        ];
        let mb = pair_micro_batch(&pairs, &Device::default());
        let ids: Vec<i64> = mb
            .batch
            .input_ids
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        assert_eq!(
            ids,
            [5, 6, 7, 8, 9, 1, 2, 4, 0, 0, 5, 6, 7, 3, 0, 1, 2, 9, 8, 7]
        );
        let mask: Vec<f32> = mb.mask.to_data().try_to_vec::<f32>().unwrap();
        // Row 0 predicts 8 (t=2) and 9 (t=3); row 3 predicts 9, 8, 7 (t = 1, 2, 3).
        assert_eq!(&mask[..5], &[0.0, 0.0, 1.0, 1.0, 0.0]);
        assert_eq!(&mask[15..], &[0.0, 1.0, 1.0, 1.0, 0.0]);
        let targets: Vec<i64> = mb
            .targets
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        assert_eq!(&targets[15..19], &[2, 9, 8, 7]);
        let docs: Vec<i64> = mb
            .batch
            .document_ids
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        assert_eq!(&docs[5..10], &[0, 0, 0, 1, 1]);
        let rows = mb.pairs.unwrap();
        assert_eq!(rows.ids, [7, 2]);
        assert_eq!(rows.completion_tokens, [2.0, 1.0, 1.0, 3.0]);
        assert_eq!(mb.target_count, 7);
    }
}
