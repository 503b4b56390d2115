//! How `moeru train` joins its job: one rank alone, N ranks as threads of this process, or
//! one process of many (torchrun-style variables from `moeru launch`, or mpirun / srun).

use std::net::SocketAddr;

use moeru_parallel::{
    bind_ip, tcp_world, LaunchEnv, Launcher, ProcessGroup, StoreClient, StoreServer,
};
use moeru_trainer::recipe::schema::Recipe;
use moeru_trainer::run::comm_timeout;
use moeru_trainer::{run_rank, run_threads, run_training, RunOptions, RunSummary, TrainError};

/// Runs this process's part of the job described by the environment, or the whole job when
/// the environment names none.
pub fn run_job(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    let env = LaunchEnv::from_process().map_err(TrainError::Setup)?;
    match env {
        Some(env) if env.world_size > 1 => {
            let world = join(&env, recipe)?;
            let opts = RunOptions {
                local_rank: Some(env.local_rank),
                ..opts.clone()
            };
            run_rank(recipe, &opts, &world)
        }
        _ => {
            let p = &recipe.parallel;
            let ranks = p.dp.max(1) * p.tp * p.pp;
            if ranks > 1 {
                run_threads(recipe, opts, ranks)
            } else {
                run_training(recipe, opts)
            }
        }
    }
}

/// The world group of a process started by a launcher.
fn join(env: &LaunchEnv, recipe: &Recipe) -> Result<ProcessGroup, TrainError> {
    let timeout = comm_timeout(recipe);
    if env.launcher == Launcher::OpenMpi {
        #[cfg(feature = "mpi")]
        return Ok(moeru_parallel::mpi_world(timeout)?);
    }
    let Some(addr) = &env.store_addr else {
        return Err(TrainError::Setup(format!(
            "launch environment: started by {:?} as rank {} of {}, but MASTER_ADDR and MASTER_PORT are not set; set them to a host and free port every rank can reach{}",
            env.launcher,
            env.rank,
            env.world_size,
            if env.launcher == Launcher::OpenMpi {
                ", or build moeru with --features mpi to use MPI"
            } else {
                ""
            }
        )));
    };
    // Under srun / mpirun / plain torchrun variables, rank 0 serves the store itself, on the
    // interface that reaches MASTER_ADDR (or MOERU_BIND), not on every interface.
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
    let _server = if env.rank == 0 && !env.store_hosted {
        let ip = bind_ip(host.trim_matches(['[', ']']), env.bind.as_deref())?;
        Some(StoreServer::bind(
            &format!("{}", SocketAddr::new(ip, port.parse().unwrap_or(0))),
            &env.token,
        )?)
    } else {
        None
    };
    let store = StoreClient::connect(addr, &env.token, timeout)?;
    let bind = match &env.bind {
        Some(text) => Some(bind_ip(host, Some(text))?),
        None => None,
    };
    let prefix = format!("moeru/attempt-{}", env.restart);
    Ok(tcp_world(
        &store,
        &prefix,
        env.rank,
        env.world_size,
        &env.token,
        timeout,
        bind,
    )?)
}
