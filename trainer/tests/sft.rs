//! The SFT loop on real chat data (Qwen3 tokenizer, assistant-only loss masks), and the loss
//! it logs being the mean over `loss_mask` only, against a mean computed here from logits.

mod common;

use std::path::Path;

use burn::tensor::Device;
use clap::Parser;
use common::{full_logits, metrics, smoke, smoke_base, test_recipe, workspace};
use moeru_checkpoints::load_hf_model;
use moeru_data::cli::{run_data_command, DataCommand};
use moeru_data::{DataLoader, LoaderConfig, PackMode, PackedSample};
use moeru_models::Batch;
use moeru_trainer::recipe::schema::Recipe;
use moeru_trainer::{run_training, RunOptions};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: DataCommand,
}

fn prepare(out: &Path, chat: bool) {
    let fx = workspace().join("data/tests/fixtures");
    let mut args = vec![
        "data".to_string(),
        "prepare".into(),
        "--quiet".into(),
        "--tokenizer".into(),
        fx.join("qwen3/tokenizer.json").display().to_string(),
        "--output".into(),
        out.display().to_string(),
        "--input".into(),
    ];
    if chat {
        args.push(fx.join("chat.jsonl").display().to_string());
        args.push("--chat".into());
    } else {
        args.push(fx.join("text.parquet").display().to_string());
    }
    run_data_command(Cli::parse_from(args).command).unwrap();
}

fn sft_recipe(out: &Path, data: &Path) -> Recipe {
    // A dense Qwen3 wide enough for Qwen3's 151,669-token vocabulary, kept tiny otherwise.
    test_recipe(
        out,
        &[
            ("model.architecture.model_type", &"qwen3"),
            ("model.architecture.vocab_size", &151680),
            ("model.architecture.hidden_size", &16),
            ("model.architecture.num_hidden_layers", &1),
            ("data.task", &"sft"),
            ("data.train", &data.display()),
            ("data.seq_len", &64),
            ("train.micro_batch_size", &2),
            ("train.steps", &2),
            ("schedule.warmup_steps", &0),
        ],
    )
}

#[test]
fn sft_trains_on_chat_data_and_refuses_pretraining_data() {
    let tmp = tempfile::tempdir().unwrap();
    let chat = tmp.path().join("chat");
    prepare(&chat, true);
    let r = run_training(
        &sft_recipe(&tmp.path().join("run"), &chat),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(r.end_step, 2);
    assert!(
        r.last_loss.is_finite() && r.last_loss > 0.0,
        "{}",
        r.last_loss
    );

    let text = tmp.path().join("text");
    prepare(&text, false);
    let err = run_training(
        &sft_recipe(&tmp.path().join("run2"), &text),
        &RunOptions::default(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("data.task: sft") && msg.contains("--chat"),
        "{msg}"
    );
}

/// Next-token cross-entropy at every position of one micro-batch, from the model's full f32
/// logits, in f64 with the log-sum-exp by hand: `(loss, loss_mask[t] == 1)` per position.
fn token_losses(samples: &[PackedSample], model: &moeru_models::Qwen3Model) -> Vec<(f64, bool)> {
    let (b, s) = (samples.len(), samples[0].len());
    let flat = |f: fn(&PackedSample) -> &Vec<i32>| -> Vec<i64> {
        samples
            .iter()
            .flat_map(|x| f(x).iter().map(|&v| v as i64))
            .collect()
    };
    let batch = Batch::packed(
        &flat(|x| &x.input_ids),
        &flat(|x| &x.position_ids),
        &flat(|x| &x.document_ids),
        b,
        s,
        &model.device(),
    );
    let logits = full_logits(model, &batch);
    let vocab = logits.len() / (b * s);
    let mut out = Vec::with_capacity(b * s);
    for (i, sample) in samples.iter().enumerate() {
        for t in 0..s {
            let row = &logits[(i * s + t) * vocab..][..vocab];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let target = row[sample.labels[t] as usize] as f64;
            out.push((lse - target, sample.loss_mask[t] == 1));
        }
    }
    out
}

/// Step 1's logged loss (computed before the first update) is the mean token loss of the first
/// global batch over the positions where `loss_mask` is 1, recomputed here from the same
/// batches and a plain forward of the same model. The mean over all positions is clearly
/// different, so a trainer that ignored the mask (trained on prompts too) fails this.
#[test]
fn the_logged_sft_loss_is_the_mean_over_the_loss_mask() {
    let tmp = tempfile::tempdir().unwrap();
    // The smoke-pretrained MoE on the smoke chat data: a trained model, whose losses on the
    // prompts and on the answers differ.
    let r = test_recipe(
        tmp.path(),
        &[
            ("model.architecture", &"null"),
            ("model.path", &smoke_base().display()),
            ("data.task", &"sft"),
            ("data.train", &smoke("data/chat-train").display()),
            ("data.seq_len", &64),
            ("train.micro_batch_size", &4),
            ("train.grad_accum", &2),
            ("train.steps", &1),
            ("schedule.warmup_steps", &0),
        ],
    );
    run_training(&r, &RunOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let lines = metrics(tmp.path());
    let step1 = lines
        .iter()
        .find(|m| m["step"].as_u64() == Some(1) && m.get("loss").is_some())
        .expect("a metrics line for step 1");
    let trainer = step1["loss"].as_f64().unwrap();

    // The first global batch, as the trainer's loader reads it (trainer/src/run.rs).
    let mut cfg = LoaderConfig::new(
        &r.data.train,
        r.data.seq_len,
        r.train.micro_batch_size,
        r.train.seed,
    );
    cfg.mode = if r.data.pad {
        PackMode::Pad
    } else {
        PackMode::Pack
    };
    cfg.shuffle = r.data.shuffle;
    let mut loader = DataLoader::new(cfg).unwrap();
    let model = load_hf_model(r.model.path.as_ref().unwrap(), &Device::flex()).unwrap();
    let mut per_token = Vec::new();
    for _ in 0..r.train.grad_accum {
        let samples = loader.next_batch().unwrap().expect("a micro-batch");
        per_token.extend(token_losses(&samples, &model));
    }
    let mean = |it: &mut dyn Iterator<Item = f64>| {
        let (sum, n) = it.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
        (sum / n as f64, n)
    };
    let (masked, counted) = mean(&mut per_token.iter().filter(|t| t.1).map(|t| t.0));
    let (unmasked, positions) = mean(&mut per_token.iter().map(|t| t.0));
    eprintln!(
        "step 1 loss: trainer {trainer:.7}, masked mean {masked:.7} over {counted} targets, \
         unmasked mean {unmasked:.7} over {positions} positions"
    );
    assert!(
        0 < counted && counted < positions,
        "{counted} of {positions}"
    );
    assert!(
        (masked - unmasked).abs() > 1e-3,
        "the test cannot tell the masks apart: {masked} vs {unmasked}"
    );
    assert!(
        (trainer - masked).abs() < 1e-5,
        "trainer's step-1 loss {trainer} is not the masked mean {masked} (unmasked {unmasked})"
    );
}
