//! Runs a target's iterations inside `catch_unwind`, counts outcomes, keeps panicking inputs.
//!
//! Environment: `MOERU_FUZZ_SAVE=1` writes each new panic's input to
//! `fuzz/regressions/<target>/<fnv>.bin` (by hand only; CI never writes into the tree);
//! `MOERU_FUZZ_TRACE=1` writes every input to `target/fuzz-current-<target>.bin` before it
//! runs (to reproduce an abort or a hang); `MOERU_FUZZ_HANG_S` (default 60) is how long one
//! iteration may take before the watchdog aborts the process.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use crate::mutate::mutate;
use crate::rng::{fnv1a, Rng};

/// What a target does with one input: `Err` (a clean error) is the expected outcome for a
/// bad input; a panic is a finding. The path is an empty scratch folder for this input.
pub type RunFn = Box<dyn Fn(&[u8], &Path) -> Result<(), String> + Send + Sync>;

/// A fuzz target: seed inputs (real files from the repository) and the code under test.
pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
    /// Whether token-level text mutations apply.
    pub text: bool,
    /// Mutated inputs are cut to this many bytes (keeps every iteration bounded).
    pub max_len: usize,
    pub run: RunFn,
    /// Runs after every 100 iterations and at the end: a health check of a live server.
    pub check: Option<Box<dyn Fn() -> Result<(), String> + Send + Sync>>,
    /// Keeps setup state (temp folders, servers) alive as long as the target.
    pub _keep: Vec<Box<dyn Send + Sync>>,
}

/// The outcome counts of one run.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub target: String,
    pub iterations: u64,
    pub ok: u64,
    pub errors: u64,
    pub panics: u64,
    pub seconds: f64,
    /// Distinct panic messages (with locations) and the first input of each.
    pub findings: Vec<(String, Vec<u8>)>,
}

impl Stats {
    /// One table row: target, iterations, ok, errors, panics, seconds.
    pub fn row(&self) -> String {
        format!(
            "{:<20} {:>10} {:>10} {:>10} {:>7} {:>9.1}",
            self.target, self.iterations, self.ok, self.errors, self.panics, self.seconds
        )
    }
}

/// The table header matching [`Stats::row`].
pub fn header() -> String {
    format!(
        "{:<20} {:>10} {:>10} {:>10} {:>7} {:>9}",
        "target", "iterations", "ok", "errors", "panics", "seconds"
    )
}

thread_local! {
    static IN_FUZZ: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Panics on threads the code under test started (a server's connection threads), which no
/// `catch_unwind` of the runner sees.
static BACKGROUND: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs (once) a panic hook that records panics of fuzz iterations and of moeru's own
/// background threads silently, and leaves every other panic (test assertions) to the
/// default hook.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = describe(info);
            if IN_FUZZ.with(Cell::get) {
                LAST_PANIC.with(|p| *p.borrow_mut() = msg);
            } else if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("moeru"))
            {
                BACKGROUND
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(msg);
            } else {
                default(info);
            }
        }));
    });
}

fn describe(info: &std::panic::PanicHookInfo) -> String {
    let payload = info.payload();
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic)".into());
    let at = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let thread = std::thread::current().name().unwrap_or("?").to_string();
    format!("{text} at {at} (thread {thread})")
}

/// Panics recorded on background threads since the last call (and clears them).
pub fn take_background_panics() -> Vec<String> {
    std::mem::take(&mut *BACKGROUND.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs `input` through `target` once. `Ok(Ok(()))`: accepted; `Ok(Err(msg))`: a clean
/// error; `Err(panic)`: a finding.
pub fn run_one(
    target: &Target,
    input: &[u8],
    scratch: &Path,
) -> Result<Result<(), String>, String> {
    install_hook();
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).map_err(|e| format!("scratch {}: {e}", scratch.display()))?;
    IN_FUZZ.with(|f| f.set(true));
    let result = catch_unwind(AssertUnwindSafe(|| (target.run)(input, scratch)));
    IN_FUZZ.with(|f| f.set(false));
    result.map_err(|_| LAST_PANIC.with(|p| std::mem::take(&mut *p.borrow_mut())))
}

fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// The workspace root (the fuzz crate's parent folder).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/ has a parent")
        .to_path_buf()
}

/// Where a target's kept regression inputs live.
pub fn regressions_dir(target: &str) -> PathBuf {
    workspace_root().join("fuzz/regressions").join(target)
}

/// A watchdog that aborts the process when one iteration runs longer than the hang limit.
struct Watchdog {
    started_ms: Arc<AtomicU64>,
}

impl Watchdog {
    fn start(name: &'static str, t0: Instant) -> Self {
        let limit = std::env::var("MOERU_FUZZ_HANG_S")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(60);
        let started_ms = Arc::new(AtomicU64::new(u64::MAX));
        let weak = Arc::downgrade(&started_ms);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let Some(s) = weak.upgrade() else { return };
            let since = s.load(Ordering::Relaxed);
            let now = t0.elapsed().as_millis() as u64;
            if since != u64::MAX && now.saturating_sub(since) > limit * 1000 {
                eprintln!("fuzz target `{name}`: one input ran over {limit}s (a hang); rerun with MOERU_FUZZ_TRACE=1 and replay target/fuzz-current-{name}.bin");
                std::process::abort();
            }
        });
        Self { started_ms }
    }
}

/// Runs `iters` iterations of `target` from `seed`: first every seed input as is, then
/// mutations of seeds (and of mutated inputs the target accepted).
pub fn run_target(target: &Target, iters: u64, seed: u64) -> Stats {
    let mut rng = Rng::new(seed ^ fnv1a(target.name.as_bytes()));
    let scratch_root = tempfile::tempdir().expect("temp dir");
    let scratch = scratch_root.path().join("in");
    let trace = env_on("MOERU_FUZZ_TRACE")
        .then(|| workspace_root().join(format!("target/fuzz-current-{}.bin", target.name)));
    let t0 = Instant::now();
    let dog = Watchdog::start(target.name, t0);
    let mut stats = Stats {
        target: target.name.into(),
        ..Stats::default()
    };
    let mut accepted: Vec<Vec<u8>> = Vec::new();
    for i in 0..iters {
        let input = next_input(target, &mut rng, i, &accepted);
        if let Some(path) = &trace {
            let _ = std::fs::write(path, &input);
        }
        dog.started_ms
            .store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        let outcome = run_one(target, &input, &scratch);
        dog.started_ms.store(u64::MAX, Ordering::Relaxed);
        stats.iterations += 1;
        match outcome {
            Ok(Ok(())) => {
                stats.ok += 1;
                if i >= target.seeds.len() as u64 && accepted.len() < 256 {
                    accepted.push(input);
                }
            }
            Ok(Err(_)) => stats.errors += 1,
            Err(msg) => record_panic(&mut stats, target.name, msg, input),
        }
        if (i + 1) % 100 == 0 || i + 1 == iters {
            health_check(target, &mut stats);
        }
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    stats
}

fn next_input(target: &Target, rng: &mut Rng, i: u64, accepted: &[Vec<u8>]) -> Vec<u8> {
    if let Some(s) = target.seeds.get(i as usize) {
        return s.clone();
    }
    let base = if !accepted.is_empty() && rng.one_in(4) {
        rng.pick(accepted)
    } else {
        rng.pick(&target.seeds)
    };
    let other = rng.pick(&target.seeds);
    mutate(rng, base, other, target.text, target.max_len)
}

fn health_check(target: &Target, stats: &mut Stats) {
    if let Some(check) = &target.check {
        if let Err(e) = check() {
            record_panic(
                stats,
                target.name,
                format!("health check failed: {e}"),
                Vec::new(),
            );
        }
    }
    for msg in take_background_panics() {
        record_panic(stats, target.name, msg, Vec::new());
    }
}

fn record_panic(stats: &mut Stats, name: &str, msg: String, input: Vec<u8>) {
    stats.panics += 1;
    let place = msg.split(" at ").nth(1).unwrap_or(&msg).to_string();
    if stats.findings.iter().any(|(m, _)| m.contains(&place)) {
        return;
    }
    if env_on("MOERU_FUZZ_SAVE") && !input.is_empty() {
        let dir = regressions_dir(name);
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{:016x}.bin", fnv1a(&input)));
        let _ = std::fs::write(&path, &input);
        eprintln!("fuzz `{name}`: kept {}", path.display());
    }
    eprintln!("fuzz `{name}`: PANIC {msg}");
    stats.findings.push((msg, input));
}
