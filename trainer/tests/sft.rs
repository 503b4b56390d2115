//! The SFT loop on real chat data (Qwen3 tokenizer, assistant-only loss masks).

use std::path::{Path, PathBuf};

use clap::Parser;
use moeru_data::cli::{run_data_command, DataCommand};
use moeru_trainer::recipe;
use moeru_trainer::{run_training, RunOptions};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: DataCommand,
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
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

fn sft_recipe(out: &Path, data: &Path) -> recipe::Recipe {
    // A dense Qwen3 wide enough for Qwen3's 151,669-token vocabulary, kept tiny otherwise.
    let overrides = [
        "model.architecture.model_type=qwen3".to_string(),
        "model.architecture.vocab_size=151680".into(),
        "model.architecture.hidden_size=16".into(),
        "model.architecture.num_hidden_layers=1".into(),
        "data.task=sft".into(),
        format!("data.train={}", data.display()),
        "data.eval=null".into(),
        "train.eval_every=0".into(),
        "data.seq_len=64".into(),
        "train.micro_batch_size=2".into(),
        "train.steps=2".into(),
        "schedule.warmup_steps=0".into(),
        format!("checkpoint.dir={}", out.join("ckpt").display()),
        format!("logging.dir={}", out.join("logs").display()),
        "logging.progress=false".into(),
    ];
    recipe::load(&workspace().join("recipes/smoke-tiny-moe.yaml"), &overrides)
        .unwrap_or_else(|e| panic!("{e}"))
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
