//! moeru training checkpoints: `runs/<name>/step-000100/` with a sha256 manifest, written
//! atomically (temp folder, fsync, rename, then `latest`), verified on resume.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::CheckpointError;
use crate::tensor_file::{write_tensors, OwnedTensor};

pub const MANIFEST: &str = "manifest.json";
pub const LATEST: &str = "latest";
const FORMAT: &str = "moeru-checkpoint-1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    /// Mesh the checkpoint was written from: `{"dp": 1, "tp": 1, "ep": 1, "pp": 1}`.
    pub mesh: serde_json::Value,
    pub files: Vec<ManifestEntry>,
}

/// What one checkpoint holds: safetensors files and JSON files, by file name.
#[derive(Default)]
pub struct CheckpointContents {
    pub tensors: Vec<(String, Vec<(String, OwnedTensor)>)>,
    /// Safetensors files whose bytes are produced when the file is written (from tensor
    /// handles the closure holds), so a snapshot costs no copy until then.
    pub held: Vec<(String, HeldTensors)>,
    pub json: Vec<(String, serde_json::Value)>,
}

/// A file's tensors, produced on demand (on the thread that writes the file).
pub type HeldTensors = Box<dyn FnOnce() -> Vec<(String, OwnedTensor)> + Send>;

impl CheckpointContents {
    /// Produces every held file's tensors now (on a GPU: the device-to-host copy, so a
    /// background writer holds host memory only).
    pub fn materialize(&mut self) {
        for (file, held) in std::mem::take(&mut self.held) {
            self.tensors.push((file, held()));
        }
    }
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CheckpointError::io(dir, e))
}

fn sha256_file(path: &Path) -> Result<(u64, String), CheckpointError> {
    let mut file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher).map_err(|e| CheckpointError::io(path, e))?;
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((bytes, hex))
}

/// Creates the empty temp folder `step-NNNNNN.tmp-<tag>` that the files of checkpoint `step`
/// are written into. With many ranks, one rank begins and commits, and every rank writes its
/// own files in between (the tag must be the same for all of them).
pub fn begin_checkpoint(run_dir: &Path, step: u64, tag: &str) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(run_dir).map_err(|e| CheckpointError::io(run_dir, e))?;
    let tmp = run_dir.join(format!("{}.tmp-{tag}", step_dir_name(step)));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
    Ok(tmp)
}

/// Writes `contents` into the temp folder `tmp` (no manifest yet): the tensor files, the held
/// ones (produced one file at a time), then the JSON files. `after_first` runs once, after
/// the first file (or at the end when there is none): a fault-injection point.
pub fn write_contents(
    tmp: &Path,
    contents: CheckpointContents,
    after_first: &dyn Fn(),
) -> Result<(), CheckpointError> {
    let mut written = 0;
    let wrote = |written: &mut usize| {
        *written += 1;
        if *written == 1 {
            after_first();
        }
    };
    for (file, tensors) in &contents.tensors {
        write_tensors(&tmp.join(file), tensors)?;
        wrote(&mut written);
    }
    for (file, held) in contents.held {
        write_tensors(&tmp.join(&file), &held())?;
        wrote(&mut written);
    }
    for (file, value) in &contents.json {
        let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
        std::fs::write(tmp.join(file), text + "\n")
            .map_err(|e| CheckpointError::io(tmp.join(file), e))?;
        wrote(&mut written);
    }
    if written == 0 {
        after_first(); // the point is reached by a rank with nothing to write too
    }
    Ok(())
}

/// Seals the temp folder `tmp`: fsyncs and checksums every file in it into the manifest of
/// `step` written by `mesh`, renames it to `step-NNNNNN`, points `latest` at it and prunes to
/// `keep_last`. `after_rename` runs between the rename and `latest` (a fault-injection point).
pub fn commit_checkpoint(
    run_dir: &Path,
    tmp: &Path,
    (step, mesh): (u64, serde_json::Value),
    keep_last: usize,
    after_rename: &dyn Fn(),
) -> Result<PathBuf, CheckpointError> {
    let name = step_dir_name(step);
    let dest = run_dir.join(&name);
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(tmp).map_err(|e| CheckpointError::io(tmp, e))? {
        let entry = entry.map_err(|e| CheckpointError::io(tmp, e))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if file != MANIFEST {
            entries.push(file);
        }
    }
    entries.sort();
    let mut files = Vec::new();
    for file in entries {
        let path = tmp.join(&file);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| CheckpointError::io(&path, e))?;
        let (bytes, sha256) = sha256_file(&path)?;
        files.push(ManifestEntry {
            name: file,
            bytes,
            sha256,
        });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        step,
        mesh,
        files,
    };
    write_synced(
        &tmp.join(MANIFEST),
        &serde_json::to_string_pretty(&manifest).expect("manifest"),
    )?;
    sync_dir(tmp)?;
    if dest.exists() {
        // A checkpoint of this step already exists (a rerun after a crash): keep the old one
        // aside until the new one is in place, so there is always a complete copy.
        let old = run_dir.join(format!("{name}.old-{}", std::process::id()));
        std::fs::rename(&dest, &old).map_err(|e| CheckpointError::io(&dest, e))?;
        std::fs::rename(tmp, &dest).map_err(|e| CheckpointError::io(&dest, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, &dest).map_err(|e| CheckpointError::io(&dest, e))?;
    }
    sync_dir(run_dir)?;
    after_rename();
    let latest_tmp = run_dir.join(format!("{LATEST}.tmp-{}", std::process::id()));
    write_synced(&latest_tmp, &format!("{name}\n"))?;
    std::fs::rename(&latest_tmp, run_dir.join(LATEST))
        .map_err(|e| CheckpointError::io(run_dir, e))?;
    sync_dir(run_dir)?;
    prune(run_dir, keep_last)?;
    Ok(dest)
}

/// Writes `text` to `path` and fsyncs it.
pub fn write_synced(path: &Path, text: &str) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(|e| CheckpointError::io(path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| CheckpointError::io(path, e))
}

/// Step folders under `run_dir`, newest first (temp folders excluded).
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    if !run_dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(run_dir).map_err(|e| CheckpointError::io(run_dir, e))? {
        let entry = entry.map_err(|e| CheckpointError::io(run_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = parse_step(&name) {
            if entry.path().is_dir() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    Ok(found)
}

fn prune(run_dir: &Path, keep_last: usize) -> Result<(), CheckpointError> {
    if keep_last == 0 {
        return Ok(());
    }
    for (_, dir) in list_checkpoints(run_dir)?.into_iter().skip(keep_last) {
        std::fs::remove_dir_all(&dir).map_err(|e| CheckpointError::io(&dir, e))?;
    }
    Ok(())
}

/// Checks every file of a checkpoint against its manifest (size and sha256).
pub fn verify_checkpoint(dir: &Path) -> Result<Manifest, String> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| format!("{}: invalid manifest: {e}", path.display()))?;
    if manifest.format != FORMAT {
        return Err(format!(
            "{}: unknown format `{}`",
            path.display(),
            manifest.format
        ));
    }
    for entry in &manifest.files {
        let file = checked_entry(dir, &path, &entry.name)?;
        let (bytes, sha) = sha256_file(&file).map_err(|e| e.to_string())?;
        if bytes != entry.bytes {
            return Err(format!(
                "{}: {bytes} bytes, manifest says {}",
                file.display(),
                entry.bytes
            ));
        }
        if sha != entry.sha256 {
            return Err(format!(
                "{}: sha256 differs from the manifest (corrupt)",
                file.display()
            ));
        }
    }
    Ok(manifest)
}

/// The path of manifest entry `name` inside `dir`: a plain file name (no folder, no `..`, not
/// absolute) naming a regular file, so a manifest cannot make a resume read outside its
/// checkpoint or block on a device or FIFO.
fn checked_entry(dir: &Path, manifest: &Path, name: &str) -> Result<PathBuf, String> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && name != MANIFEST;
    if !plain {
        return Err(format!(
            "{}: file entry {name:?} is not a plain file name in the checkpoint folder (corrupt or tampered manifest)",
            manifest.display()
        ));
    }
    let file = dir.join(name);
    match std::fs::symlink_metadata(&file) {
        Ok(meta) if meta.file_type().is_file() => Ok(file),
        Ok(_) => Err(format!(
            "{}: listed in the manifest but not a regular file (a link, folder or device)",
            file.display()
        )),
        Err(e) => Err(format!("{}: {e}", file.display())),
    }
}

/// The outcome of looking for a checkpoint to resume from.
#[derive(Debug, Default)]
pub struct LatestCheckpoint {
    /// The newest checkpoint whose manifest verifies, and its folder.
    pub found: Option<(Manifest, PathBuf)>,
    /// Newer checkpoints that are torn or corrupt, each with the reason.
    pub skipped: Vec<String>,
}

/// Finds the newest checkpoint under `run_dir` whose manifest verifies. Nothing is deleted.
pub fn latest_valid_checkpoint(run_dir: &Path) -> Result<LatestCheckpoint, CheckpointError> {
    let mut latest = LatestCheckpoint::default();
    for (_, dir) in list_checkpoints(run_dir)? {
        match verify_checkpoint(&dir) {
            Ok(manifest) => {
                latest.found = Some((manifest, dir));
                break;
            }
            Err(reason) => latest.skipped.push(reason),
        }
    }
    Ok(latest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A committed one-file checkpoint of step 1 whose manifest lists `name` in place of the
    /// real file (with the real file's size and digest, so only the name is wrong).
    fn tampered(name: &str) -> (tempfile::TempDir, PathBuf) {
        let run = tempfile::tempdir().unwrap();
        let tmp = begin_checkpoint(run.path(), 1, "t").unwrap();
        std::fs::write(tmp.join("a.json"), "{}\n").unwrap();
        let dir =
            commit_checkpoint(run.path(), &tmp, (1, serde_json::json!({})), 0, &|| {}).unwrap();
        verify_checkpoint(&dir).expect("the untouched checkpoint verifies");
        let path = dir.join(MANIFEST);
        let mut manifest: Manifest =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        manifest.files[0].name = name.to_string();
        std::fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
        (run, dir)
    }

    #[test]
    fn manifest_names_outside_the_folder_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("a.json"), "{}\n").unwrap();
        let absolute = outside.path().join("a.json").display().to_string();
        for name in [
            "../a.json",
            "sub/a.json",
            absolute.as_str(),
            "",
            "..",
            MANIFEST,
        ] {
            let (_run, dir) = tampered(name);
            if name == "../a.json" {
                // The escaping path names a file with the right size and digest.
                std::fs::write(dir.parent().unwrap().join("a.json"), "{}\n").unwrap();
            }
            let e = verify_checkpoint(&dir).unwrap_err();
            assert!(e.contains("not a plain file name"), "{name:?}: {e}");
            assert!(e.contains(MANIFEST), "{name:?}: {e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn manifest_entries_that_are_links_or_devices_are_refused() {
        let (_run, dir) = tampered("zero");
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero")).unwrap();
        let e = verify_checkpoint(&dir).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");

        let (_run, dir) = tampered("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(dir.join("fifo"))
            .status()
            .unwrap();
        assert!(made.success());
        // Reading a FIFO would block forever; the check refuses it without opening it.
        let e = verify_checkpoint(&dir).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
