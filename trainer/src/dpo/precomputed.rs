//! `dpo.precompute_reference`: every pair's reference log-probs computed once, before the
//! first step, into the run folder (`ref_logps.safetensors`: `ids` I64, `chosen` and
//! `rejected` F32, the values exactly as a live forward gives them) with a record of the
//! dataset and reference they belong to (`ref_logps.json`). A resumed run reads them back; a
//! record that does not match the run is an error, never silently recomputed over.

use std::collections::HashMap;
use std::path::Path;

use moeru_checkpoints::{write_tensors, OwnedTensor, TensorFile};
use moeru_data::pairs::PreferencePair;
use moeru_models::{ForwardCtx, Qwen3Model};
use moeru_parallel::{ProcessGroup, ReduceOp};

use super::reference::Reference;
use crate::error::TrainError;

pub const FILE: &str = "ref_logps.safetensors";
const RECORD: &str = "ref_logps.json";

/// Reference log-probs `[chosen, rejected]` by pair id.
pub struct PrecomputedLogps {
    by_id: HashMap<u64, [f64; 2]>,
}

/// What the values were computed from; a resumed run must match it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// The prepared dataset's fingerprint (`Manifest::fingerprint`).
    pub dataset: String,
    /// `dpo.reference` as the recipe has it.
    pub reference: String,
    pub pairs: usize,
}

impl PrecomputedLogps {
    /// The values of `pairs` as rows (chosen, then rejected).
    pub fn rows(&self, pairs: &[PreferencePair]) -> Vec<f64> {
        let each: Vec<[f64; 2]> = pairs.iter().map(|p| self.pair(p.id)).collect();
        super::reference::rows_of(&each)
    }

    pub fn pair(&self, id: u64) -> [f64; 2] {
        self.by_id[&id]
    }

    /// Scores every pair with the live `reference`: DP rank r takes pairs r, r + dp, …, and
    /// one all-reduce gives every rank all of them (each value has one nonzero term: exact).
    pub fn compute(
        reference: &Reference,
        policy: &Qwen3Model,
        pairs: &[PreferencePair],
        ctx: &ForwardCtx,
        dp: &ProcessGroup,
    ) -> Result<Self, TrainError> {
        let mut flat = vec![0.0f64; 2 * pairs.len()];
        let (n, d) = (pairs.len(), dp.size());
        // Every rank runs the same number of forwards (the last pair again where its share is
        // short): expert-parallel peers, which sit on other DP ranks, exchange in lockstep.
        for k in 0..n.div_ceil(d) {
            let i = k * d + dp.rank();
            let [c, r] = reference.pair_logps(policy, &pairs[i.min(n - 1)], ctx);
            if i < n {
                (flat[2 * i], flat[2 * i + 1]) = (c, r);
            }
        }
        if dp.size() > 1 {
            dp.all_reduce(&mut flat, ReduceOp::Sum)?;
        }
        let by_id = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id, [flat[2 * i], flat[2 * i + 1]]))
            .collect();
        Ok(Self { by_id })
    }

    /// Writes the values and their record into `dir` (the run folder), the record last.
    pub fn save(&self, dir: &Path, record: &Record) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut ids: Vec<u64> = self.by_id.keys().copied().collect();
        ids.sort_unstable();
        let col = |k: usize| -> Vec<f32> { ids.iter().map(|i| self.by_id[i][k] as f32).collect() };
        let n = ids.len();
        let ids_i64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let tensors = [
            ("ids".to_string(), OwnedTensor::i64(&ids_i64, vec![n])),
            ("chosen".to_string(), OwnedTensor::f32(&col(0), vec![n])),
            ("rejected".to_string(), OwnedTensor::f32(&col(1), vec![n])),
        ];
        write_tensors(&dir.join(FILE), &tensors)?;
        let text = serde_json::to_string_pretty(record).unwrap_or_default();
        let path = dir.join(RECORD);
        std::fs::write(&path, text).map_err(|e| io(&path, e))
    }

    /// The values in `dir` when they are there; an error when they belong to another dataset
    /// or reference than `expected`.
    pub fn load(dir: &Path, expected: &Record) -> Result<Option<Self>, TrainError> {
        let (file, record_path) = (dir.join(FILE), dir.join(RECORD));
        if !record_path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&record_path).map_err(|e| io(&record_path, e))?;
        let record: Record = serde_json::from_str(&text).map_err(|e| {
            TrainError::Resume(format!(
                "{}: not a reference record ({e}); delete it and {FILE} to compute them again",
                record_path.display()
            ))
        })?;
        if record != *expected {
            return Err(TrainError::Resume(format!(
                "{}: the precomputed reference log-probs are of dataset {} with reference `{}` ({} pairs), but this run has dataset {} with reference `{}` ({} pairs); delete {} and {FILE} to compute them again, or set a fresh `checkpoint.dir`",
                record_path.display(), record.dataset, record.reference, record.pairs,
                expected.dataset, expected.reference, expected.pairs, RECORD
            )));
        }
        let t = TensorFile::open(&file)?;
        let (ids, _) = t.i64("ids")?;
        let (chosen, _) = t.f32("chosen")?;
        let (rejected, _) = t.f32("rejected")?;
        let by_id = (ids.iter().zip(chosen.iter().zip(&rejected)))
            .map(|(&i, (&c, &r))| (i as u64, [c as f64, r as f64]))
            .collect::<HashMap<_, _>>();
        if by_id.len() != expected.pairs {
            return Err(TrainError::Resume(format!(
                "{}: holds {} pairs but the record says {}; delete it and {RECORD} to compute them again",
                file.display(), by_id.len(), expected.pairs
            )));
        }
        Ok(Some(Self { by_id }))
    }
}

fn io(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Setup(format!("{}: {e}", path.display()))
}
