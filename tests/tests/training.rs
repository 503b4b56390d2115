//! 20 AdamW steps (warmup + cosine, clipping, 2 micro-batches of accumulation, aux loss)
//! against the same loop in PyTorch (tests/reference/make_reference.py).

mod common;

use burn::tensor::Device;
use common::*;
use moeru_checkpoints::{load_hf_model, TensorFile};
use moeru_models::Precision;
use moeru_trainer::engine::optim::AdamWConfig;
use moeru_trainer::engine::sync::SyncKind;
use moeru_trainer::engine::{one_rank, Engine, EngineConfig, MicroBatch, OptimizerStart};
use moeru_trainer::objective::{AuxWeights, LmObjective};
use moeru_trainer::recipe::schema::{ScheduleKind, ScheduleSection};
use moeru_trainer::schedule::learning_rate;

#[test]
fn adamw_steps_match_pytorch() {
    let path = reference_dir().join("training/adamw-20-steps.safetensors");
    let refs = TensorFile::open(&path).unwrap();
    let meta = refs.metadata();
    let num = |k: &str| -> f64 { serde_json::from_str(&meta[k]).unwrap() };
    let betas: Vec<f64> = serde_json::from_str(&meta["betas"]).unwrap();
    let model_name: String = serde_json::from_str(&meta["model"]).unwrap();
    let steps = num("steps") as u64;

    let device = Device::flex().autodiff();
    let model = load_hf_model(&model_dir(&model_name), &device).unwrap();
    let config = EngineConfig {
        adamw: AdamWConfig {
            beta1: betas[0],
            beta2: betas[1],
            eps: num("eps"),
            weight_decay: num("weight_decay"),
        },
        clip: num("clip"),
        precision: Precision::F32,
        bucket_elems: 1 << 20,
        sync: SyncKind::Local,
        capacity_factor: None,
    };
    let world = one_rank();
    let mut engine = Engine::new(model, config, &world, OptimizerStart::default());
    let schedule = ScheduleSection {
        kind: ScheduleKind::Cosine,
        warmup_steps: num("warmup") as u64,
        min_lr: num("min_lr"),
    };
    let objective = LmObjective {
        weights: AuxWeights {
            load_balancing: num("aux_coef"),
            z_loss: 0.0,
        },
    };
    let (ids, shape) = refs.i64("input_ids").unwrap();
    let [_, micro, b, s] = [shape[0], shape[1], shape[2], shape[3]];
    let (ref_loss, _) = refs.f32("loss").unwrap();
    let (ref_norm, _) = refs.f32("grad_norm").unwrap();
    let (ref_lr, _) = refs.f32("lr").unwrap();

    for t in 0..steps as usize {
        let lr = learning_rate(num("lr"), &schedule, t as u64, steps);
        assert!(
            (lr as f32 - ref_lr[t]).abs() <= 1e-9,
            "step {t}: lr {lr} vs {}",
            ref_lr[t]
        );
        let batches: Vec<MicroBatch> = (0..micro)
            .map(|m| {
                let start = (t * micro + m) * b * s;
                MicroBatch::from_ids(&ids[start..start + b * s], b, s, &device)
            })
            .collect();
        let r = engine.step(&objective, &batches, lr).unwrap();
        let (loss, norm) = (r.loss as f32, r.grad_norm as f32);
        eprintln!(
            "step {t:2}: loss {loss:.6} (torch {:.6}, diff {:.1e}), grad norm {norm:.5} (torch {:.5})",
            ref_loss[t],
            (loss - ref_loss[t]).abs(),
            ref_norm[t]
        );
        assert!(
            (loss - ref_loss[t]).abs() <= 1e-4,
            "step {t}: loss {loss} vs torch {}",
            ref_loss[t]
        );
        assert!(
            (norm - ref_norm[t]).abs() <= 1e-4 * ref_norm[t].max(1.0),
            "step {t}: grad norm {norm} vs torch {}",
            ref_norm[t]
        );
    }
    assert!(
        ref_loss[steps as usize - 1] < ref_loss[0] - 0.1,
        "the reference run must learn"
    );
}
