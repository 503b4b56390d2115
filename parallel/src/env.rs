//! Where this process sits in a job, from the launcher's environment: torchrun's variables
//! (set by `moeru launch` too), Slurm's (`srun`) or Open MPI's (`mpirun`).

use std::collections::HashMap;

/// Who started the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
    Torchrun,
    /// SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NTASKS_PER_NODE.
    Slurm,
    /// OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE.
    OpenMpi,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub launcher: Launcher,
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    /// MASTER_ADDR:MASTER_PORT, when set.
    pub store_addr: Option<String>,
    /// The store is served by `moeru launch` (MOERU_STORE_HOSTED=1), not by rank 0.
    pub store_hosted: bool,
    /// MOERU_JOB_TOKEN, else the scheduler's job id, else empty.
    pub token: String,
    /// MOERU_RESTART_COUNT: how many times the launcher restarted the job.
    pub restart: u32,
    /// MOERU_BIND: the local address to listen on (else chosen by `bind::bind_ip`).
    pub bind: Option<String>,
}

fn parse(vars: &HashMap<String, String>, key: &str) -> Result<Option<usize>, String> {
    match vars.get(key) {
        None => Ok(None),
        Some(v) => {
            v.trim().parse().map(Some).map_err(|_| {
                format!("environment variable {key}={v:?} is not a non-negative integer")
            })
        }
    }
}

impl LaunchEnv {
    /// Reads the process environment; `Ok(None)` when nothing says this is a multi-rank job.
    pub fn from_process() -> Result<Option<Self>, String> {
        Self::from_vars(&std::env::vars().collect())
    }

    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Option<Self>, String> {
        let found = [
            (
                Launcher::Torchrun,
                ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
            ),
            (
                Launcher::OpenMpi,
                [
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                    "OMPI_COMM_WORLD_LOCAL_SIZE",
                ],
            ),
            (
                Launcher::Slurm,
                [
                    "SLURM_PROCID",
                    "SLURM_NTASKS",
                    "SLURM_LOCALID",
                    "SLURM_NTASKS_PER_NODE",
                ],
            ),
        ]
        .into_iter()
        .find(|(_, keys)| vars.contains_key(keys[0]) && vars.contains_key(keys[1]));
        let Some((launcher, [rank, size, local, local_size])) = found else {
            return Ok(None);
        };
        let rank = parse(vars, rank)?.unwrap_or(0);
        let world_size = parse(vars, size)?.unwrap_or(1);
        if rank >= world_size {
            return Err(format!(
                "rank {rank} is not below the world size {world_size} in the launcher's environment"
            ));
        }
        let local_rank = parse(vars, local)?.unwrap_or(rank);
        // Slurm writes e.g. "4(x2)" for SLURM_NTASKS_PER_NODE; the leading number is enough.
        let local_world_size = vars
            .get(local_size)
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or(world_size);
        let store_addr = match (vars.get("MASTER_ADDR"), vars.get("MASTER_PORT")) {
            (Some(a), Some(p)) => Some(format!("{a}:{p}")),
            _ => None,
        };
        let token = vars
            .get("MOERU_JOB_TOKEN")
            .or_else(|| vars.get("SLURM_JOB_ID"))
            .or_else(|| vars.get("OMPI_MCA_orte_hnp_uri"))
            .cloned()
            .unwrap_or_default();
        Ok(Some(Self {
            launcher,
            rank,
            world_size,
            local_rank,
            local_world_size,
            store_addr,
            store_hosted: vars.get("MOERU_STORE_HOSTED").is_some_and(|v| v == "1"),
            token,
            restart: vars
                .get("MOERU_RESTART_COUNT")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            bind: vars.get("MOERU_BIND").filter(|v| !v.is_empty()).cloned(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_each_launcher() {
        let t = LaunchEnv::from_vars(&vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("MOERU_JOB_TOKEN", "abc"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                t.launcher,
                t.rank,
                t.world_size,
                t.local_rank,
                t.local_world_size
            ),
            (Launcher::Torchrun, 3, 4, 1, 2)
        );
        assert_eq!(t.store_addr.as_deref(), Some("node0:29500"));
        assert_eq!(t.token, "abc");
        let s = LaunchEnv::from_vars(&vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("SLURM_JOB_ID", "991"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                s.launcher,
                s.rank,
                s.world_size,
                s.local_rank,
                s.local_world_size
            ),
            (Launcher::Slurm, 5, 8, 1, 4)
        );
        assert_eq!(s.token, "991");
        let m = LaunchEnv::from_vars(&vars(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (m.launcher, m.rank, m.world_size),
            (Launcher::OpenMpi, 1, 2)
        );
        assert!(LaunchEnv::from_vars(&vars(&[("PATH", "/bin")]))
            .unwrap()
            .is_none());
        let e = LaunchEnv::from_vars(&vars(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = LaunchEnv::from_vars(&vars(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.contains("rank 2"), "{e}");
    }
}
