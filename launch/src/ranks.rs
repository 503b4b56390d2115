//! How `moeru train` joins its job: one rank alone, N ranks as threads of this process, or
//! one process of many (torchrun-style variables from `moeru launch`, or mpirun / srun).

use moeru_parallel::{tcp_world, LaunchEnv, Launcher, ProcessGroup, StoreClient, StoreServer};
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
    // Under srun / mpirun / plain torchrun variables, rank 0 serves the store itself.
    let _server = if env.rank == 0 && !env.store_hosted {
        let port = addr.rsplit(':').next().unwrap_or("0");
        Some(StoreServer::bind(&format!("0.0.0.0:{port}"), &env.token)?)
    } else {
        None
    };
    let store = StoreClient::connect(addr, &env.token, timeout)?;
    let prefix = format!("moeru/attempt-{}", env.restart);
    Ok(tcp_world(
        &store,
        &prefix,
        env.rank,
        env.world_size,
        &env.token,
        timeout,
    )?)
}
