//! `moeru launch`: start the ranks of a job on this node, watch them, stop them all when one
//! dies, and optionally restart everyone from the newest valid checkpoint.
//!
//! CPU recipes run the ranks as threads of this process unless `--spawn processes`; processes
//! get torchrun's variables and rendezvous through a TCP store this launcher serves (node 0).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use moeru_parallel::StoreServer;
use moeru_trainer::recipe;
use moeru_trainer::{RunOptions, TrainError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Spawn {
    /// Ranks are threads of the launcher (CPU only, one node).
    Threads,
    /// One `moeru train` process per rank.
    Processes,
}

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// The YAML recipe (keys: docs/RECIPES.md).
    recipe: PathBuf,
    /// Ranks on this node.
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// Nodes in the job (run one launcher per node).
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index, 0 ..= nnodes−1; node 0 serves the rendezvous store.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Address of node 0, reachable from every node.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Port of the rendezvous store on node 0 (0 picks a free one; one node only).
    #[arg(long, default_value_t = 0)]
    master_port: u16,
    /// Restart every rank from the newest valid checkpoint up to K times when one fails.
    #[arg(long, default_value_t = 0)]
    max_restarts: u32,
    /// How to run the ranks (default: threads for a one-node CPU job).
    #[arg(long, value_enum)]
    spawn: Option<Spawn>,
    /// Local address the store and the ranks listen on (default: loopback on one node, else
    /// the interface that reaches --master-addr; never every interface).
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// Shared secret of the job's store; required with --nnodes > 1 (same on every node).
    #[arg(long)]
    job_token: Option<String>,
    /// Override a recipe key, e.g. `--set train.steps=50` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

fn bad(msg: String) -> TrainError {
    TrainError::Setup(msg)
}

pub fn run(args: LaunchArgs) -> Result<(), TrainError> {
    let recipe = recipe::load(&args.recipe, &args.overrides)?;
    if args.nproc_per_node == 0 || args.nnodes == 0 || args.node_rank >= args.nnodes {
        return Err(bad(format!(
            "launch: --nproc-per-node {} --nnodes {} --node-rank {}: need at least one rank and node, and node-rank below nnodes",
            args.nproc_per_node, args.nnodes, args.node_rank
        )));
    }
    let world = args.nproc_per_node * args.nnodes;
    moeru_trainer::run::mesh_for(&recipe, world)?;
    let spawn = args.spawn.unwrap_or(if args.nnodes > 1 {
        Spawn::Processes
    } else {
        Spawn::Threads
    });
    if spawn == Spawn::Threads && args.nnodes > 1 {
        return Err(bad(
            "launch: --spawn threads runs one node; use --spawn processes with --nnodes > 1".into(),
        ));
    }
    let store = match spawn {
        Spawn::Processes => Some(rendezvous(&args)?),
        Spawn::Threads => None,
    };
    let mut restart = 0;
    loop {
        let outcome = match spawn {
            Spawn::Threads => run_threads(&args, world, restart),
            Spawn::Processes => {
                run_processes(&args, world, restart, store.as_ref().expect("store"))
            }
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if restart < args.max_restarts => {
                restart += 1;
                eprintln!(
                    "[launch] {e}; restarting every rank from the newest valid checkpoint (restart {restart} of {})",
                    args.max_restarts
                );
            }
            Err(e) => return Err(e),
        }
    }
}

fn run_threads(args: &LaunchArgs, world: usize, restart: u32) -> Result<(), TrainError> {
    let mut overrides = args.overrides.clone();
    if restart > 0 {
        overrides.push("checkpoint.resume=true".into());
    }
    let recipe = recipe::load(&args.recipe, &overrides)?;
    let opts = RunOptions {
        fault: if restart == 0 {
            crate::cmd_train::fault_from_env()?
        } else {
            None
        },
        ..RunOptions::default()
    };
    let s = moeru_trainer::run_threads(&recipe, &opts, world)?;
    eprintln!(
        "[launch] {world} ranks finished steps {}..{}; last loss {:.4}",
        s.start_step, s.end_step, s.last_loss
    );
    Ok(())
}

fn random_token() -> String {
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // No /dev/urandom: time and pid still make the token unique per job.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes[..16].copy_from_slice(&(t ^ std::process::id() as u128).to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies a child's output to ours line by line with a rank prefix.
fn forward(rank: usize, from: impl Read + Send + 'static, to_stderr: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "[rank {rank}] {line}");
            }
        }
    });
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(9)) => "was killed by signal 9 (SIGKILL)".into(),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".into(),
    }
}

/// Stops every child that is still running: SIGTERM, then SIGKILL after a grace period.
fn stop_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline
        && children
            .iter_mut()
            .any(|(_, c)| matches!(c.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

/// The job token and the store's port; node 0 starts the store, once for every restart.
fn rendezvous(args: &LaunchArgs) -> Result<(String, u16), TrainError> {
    let from_env = std::env::var("MOERU_JOB_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let token = match (args.job_token.as_ref().or(from_env.as_ref()), args.nnodes) {
        (Some(t), _) => t.clone(),
        (None, 1) => random_token(),
        (None, _) => {
            return Err(bad("launch: --nnodes > 1 needs --job-token (or MOERU_JOB_TOKEN), the same on every node, so that only this job's ranks join its store".into()))
        }
    };
    if args.nnodes > 1 && args.master_port == 0 {
        return Err(bad(
            "launch: --nnodes > 1 needs --master-port (a free port on node 0)".into(),
        ));
    }
    // Node 0 serves the store; its thread lives as long as this launcher (restarts use new
    // keys).
    let port = if args.node_rank == 0 {
        let ip = moeru_parallel::bind_ip(&args.master_addr, args.bind.as_deref())?;
        let addr = std::net::SocketAddr::new(ip, args.master_port);
        StoreServer::bind(&addr.to_string(), &token)?.addr().port()
    } else {
        args.master_port
    };
    Ok((token, port))
}

fn run_processes(
    args: &LaunchArgs,
    world: usize,
    restart: u32,
    (token, port): &(String, u16),
) -> Result<(), TrainError> {
    let exe = std::env::current_exe()
        .map_err(|e| TrainError::Rank(format!("launch: cannot find the moeru binary: {e}")))?;
    let mut children = Vec::new();
    for local in 0..args.nproc_per_node {
        let rank = args.node_rank * args.nproc_per_node + local;
        let mut cmd = Command::new(&exe);
        cmd.arg("train").arg(&args.recipe);
        for o in &args.overrides {
            cmd.arg("--set").arg(o);
        }
        if restart > 0 {
            cmd.arg("--set").arg("checkpoint.resume=true");
        }
        cmd.env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", port.to_string())
            .env("MOERU_JOB_TOKEN", token)
            .env("MOERU_STORE_HOSTED", "1")
            .env("MOERU_RESTART_COUNT", restart.to_string())
            .env("MOERU_BIND", args.bind.as_deref().unwrap_or_default())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut children);
                return Err(TrainError::Rank(format!(
                    "launch: cannot start rank {rank}: {e}"
                )));
            }
        };
        eprintln!("[launch] rank {rank}: pid {}", child.id());
        if let Some(out) = child.stdout.take() {
            forward(rank, out, false);
        }
        if let Some(err) = child.stderr.take() {
            forward(rank, err, true);
        }
        children.push((rank, child));
    }
    loop {
        let mut running = 0;
        let mut failed = false;
        for (rank, child) in children.iter_mut() {
            match child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) => failed |= !status.success(),
                Err(e) => {
                    return Err(TrainError::Rank(format!(
                        "launch: waiting for rank {rank}: {e}"
                    )))
                }
            }
        }
        if failed {
            return Err(first_failure(&mut children));
        }
        if running == 0 {
            eprintln!("[launch] all {} local ranks finished", children.len());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Names the rank that failed first and stops the rest. Peers of a dead rank fail moments
/// later ("rank N is gone"), so the launcher looks again after a short pause and blames a rank
/// killed by a signal before one that exited with an error.
fn first_failure(children: &mut [(usize, Child)]) -> TrainError {
    std::thread::sleep(Duration::from_millis(300));
    let mut failures: Vec<(bool, String)> = Vec::new();
    for (rank, child) in children.iter_mut() {
        if let Ok(Some(status)) = child.try_wait() {
            if !status.success() {
                let by_signal = status.code().is_none();
                failures.push((
                    by_signal,
                    format!("rank {rank} (pid {}) {}", child.id(), describe(status)),
                ));
            }
        }
    }
    failures.sort_by_key(|(by_signal, _)| !by_signal);
    let causes: Vec<String> = failures.into_iter().map(|(_, c)| c).collect();
    eprintln!("[launch] {}; stopping the other ranks", causes.join("; "));
    stop_all(children);
    TrainError::Rank(format!("launch: {}", causes.join("; then ")))
}
