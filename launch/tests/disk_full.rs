//! A disk that fills during a save: the checkpoint directory is a 2.2 MB tmpfs (made by the
//! test in its own user and mount namespaces, `unshare -rm`) that holds one checkpoint of the
//! tiny MoE (1.5 MB) but not two. The second save fails with one clear error line naming the
//! full disk, the intact previous checkpoint and the fix; its partial folder is removed;
//! `latest` still names the first one, whose files are those of an unconstrained run; after
//! the disk grows, `--set checkpoint.resume=true` continues from it to the same final weights
//! as the uninterrupted run. The same holds for an asynchronous save.

mod common;

use std::path::Path;
use std::process::Command;

use common::{moeru_command, p, TINY_MOE};

fn args(ckpt: &Path, logs: &Path, asynchronous: bool) -> Vec<String> {
    [
        "train.steps=8",
        "checkpoint.every=4",
        "checkpoint.keep_last=0",
        "logging.progress=false",
        "logging.tensorboard=false",
        "data.eval=null",
        "train.eval_every=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("checkpoint.dir={}", ckpt.display()),
        format!("logging.dir={}", logs.display()),
        format!("checkpoint.async={asynchronous}"),
    ])
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

/// The shell steps run inside the namespaces; `$1` is the moeru binary, `$2` the output dir,
/// `$3` the tmpfs mount point, the rest the training arguments.
const SCRIPT: &str = r#"
set -u
exe=$1; out=$2; ck=$3; shift 3
mount -t tmpfs -o size=2200k tmpfs "$ck" || exit 90
"$exe" train "$@" > "$out/full.stdout" 2> "$out/full.stderr"; echo $? > "$out/full.rc"
ls -a "$ck" > "$out/full.ls"
cat "$ck/latest" > "$out/full.latest"
cp -r "$ck/step-000004" "$out/kept"
mount -o remount,size=8m "$ck" || exit 91
"$exe" train "$@" --set checkpoint.resume=true > "$out/resume.stdout" 2> "$out/resume.stderr"
echo $? > "$out/resume.rc"
cp "$ck/step-000008/model.safetensors" "$out/final.safetensors"
"#;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_full_disk_fails_the_save_cleanly_and_the_previous_checkpoint_resumes() {
    check_full_disk(false);
}

/// The same with `checkpoint.async`: the background writer's failure surfaces when the run
/// waits for its final save, with the same line.
#[test]
fn a_full_disk_fails_an_async_save_cleanly_too() {
    check_full_disk(true);
}

fn check_full_disk(asynchronous: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (free, full) = (dir.path().join("free"), dir.path().join("full"));
    std::fs::create_dir_all(full.join("ckpt")).unwrap();
    let ok = moeru_command()
        .args(["train", TINY_MOE])
        .args(args(&free.join("ckpt"), &free.join("logs"), asynchronous))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let status = Command::new("unshare")
        .args(["-rm", "sh", "-c", SCRIPT, "sh", env!("CARGO_BIN_EXE_moeru")])
        .args([p(&full), p(&full.join("ckpt")), TINY_MOE])
        .args(args(&full.join("ckpt"), &full.join("logs"), asynchronous))
        .current_dir(common::workspace())
        .status()
        .expect("this test needs util-linux's `unshare` to mount a small tmpfs");
    assert!(
        status.success(),
        "the namespace script failed ({status}): `unshare -rm` must be allowed to mount a tmpfs"
    );

    let stderr = read(&full.join("full.stderr"));
    assert_eq!(read(&full.join("full.rc")).trim(), "1", "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    let errors = stderr.lines().filter(|l| l.starts_with("error")).count();
    assert_eq!(errors, 1, "{stderr}");
    for part in [
        "error: could not save checkpoint step-000008",
        "No space left on device",
        "partial files were removed",
        "step-000004 is intact",
        "--set checkpoint.resume=true",
    ] {
        assert!(last.contains(part), "missing {part:?} in {stderr}");
    }
    let listing = read(&full.join("full.ls"));
    assert!(
        !listing.contains("tmp-"),
        "a partial folder was left: {listing}"
    );
    assert!(!listing.contains("step-000008"), "{listing}");
    assert_eq!(read(&full.join("full.latest")).trim(), "step-000004");
    for file in ["model.safetensors", "optim.safetensors"] {
        let kept = std::fs::read(full.join("kept").join(file)).unwrap();
        let free_copy = std::fs::read(free.join("ckpt/step-000004").join(file)).unwrap();
        assert!(kept == free_copy, "{file} of the kept checkpoint differs");
    }

    let resumed = read(&full.join("resume.stderr")) + &read(&full.join("resume.stdout"));
    assert_eq!(read(&full.join("resume.rc")).trim(), "0", "{resumed}");
    assert!(resumed.contains("trained steps 4..8"), "{resumed}");
    let final_full = std::fs::read(full.join("final.safetensors")).unwrap();
    let final_free = std::fs::read(free.join("ckpt/step-000008/model.safetensors")).unwrap();
    assert!(
        final_full == final_free,
        "resumed weights differ from the uninterrupted run"
    );
}
