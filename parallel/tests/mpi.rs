//! The MPI backend under `mpirun` (scripts/mpi-tests.sh runs it with 2 and 4 ranks): every
//! collective against computed values, as tests/collectives.rs checks the threads and TCP
//! backends. With `MOERU_MPI_TEST=timeout` the last rank goes silent and the others must
//! get a timeout diagnostic, print it and exit non-zero, which ends the whole job; with
//! `MOERU_MPI_TEST=abort` the last rank aborts and the job must end at once.
//!
//! A failed check panics, so that rank exits non-zero and mpirun stops the job.

mod common;

use std::time::{Duration, Instant};

use common::{check_all_ops, check_bf16};
use moeru_parallel::{mpi_world, CommError, ProcessGroup, ReduceOp};

fn main() {
    let mode = std::env::var("MOERU_MPI_TEST").unwrap_or_default();
    match mode.as_str() {
        "" | "ops" => {
            let g = mpi_world(Duration::from_secs(30)).expect("MPI starts");
            check_all_ops(&g);
            check_bf16(&g);
            check_large_messages(&g);
            g.barrier().unwrap();
            if g.rank() == 0 {
                println!("mpi collectives: ok ({} ranks)", g.size());
            }
        }
        "timeout" => silent_rank_times_out_the_others(),
        "abort" => {
            // The last rank aborts; the others wait in a barrier far longer than the test
            // allows, so only MPI_Abort ending the job lets it pass.
            let g = mpi_world(Duration::from_secs(60)).expect("MPI starts");
            if g.rank() == g.size() - 1 {
                g.abort("test abort");
            }
            let e = g.barrier();
            panic!(
                "rank {}: the barrier returned {e:?} instead of being aborted",
                g.rank()
            );
        }
        other => panic!("unknown MOERU_MPI_TEST mode `{other}` (ops, timeout, abort)"),
    }
}

/// Messages past MPI's eager limit: a send-then-recv ring must not deadlock (sends return
/// once started), and the typed ops must agree on a buffer of a few MB.
fn check_large_messages(g: &ProcessGroup) {
    let (r, n) = (g.rank(), g.size());
    let len = 1 << 20;
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;
    g.send(&vec![r as f32; len], next, 9).unwrap();
    let mut got = vec![0f32; len];
    g.recv(&mut got, prev, 9).unwrap();
    assert!(got.iter().all(|&v| v == prev as f32));
    let mut x: Vec<f64> = (0..len).map(|i| (i % 1000) as f64 + r as f64).collect();
    g.all_reduce(&mut x, ReduceOp::Mean).unwrap();
    let shift = (n - 1) as f64 / 2.0;
    assert!(x
        .iter()
        .enumerate()
        .all(|(i, &v)| v == (i % 1000) as f64 + shift));
    let mut bytes = vec![r as u8; len];
    g.all_reduce(&mut bytes, ReduceOp::Max).unwrap();
    assert!(bytes.iter().all(|&v| v as usize == n - 1));
}

fn silent_rank_times_out_the_others() {
    let timeout = Duration::from_secs(1);
    let g = mpi_world(timeout).expect("MPI starts");
    let (r, n) = (g.rank(), g.size());
    if r == n - 1 {
        // Stops participating; mpirun must kill it once the others exit non-zero.
        std::thread::sleep(Duration::from_secs(60));
        eprintln!("rank {r}: still running after 60 s: mpirun did not end the job");
        std::process::exit(0);
    }
    let started = Instant::now();
    let mut x = vec![1.0f32; 4];
    let e = g.all_reduce(&mut x, ReduceOp::Sum).unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= timeout && waited < timeout + Duration::from_secs(3));
    let msg = e.to_string();
    assert!(
        msg.contains("all_reduce") && msg.contains("timed out"),
        "{msg}"
    );
    match e {
        CommError::Timeout {
            op,
            group,
            rank,
            missing,
            ..
        } => {
            assert_eq!((op, group.as_str(), rank), ("all_reduce", "world", r));
            assert_eq!(missing, (0..n).filter(|&q| q != r).collect::<Vec<_>>());
        }
        other => panic!("expected a timeout, got {other}"),
    }
    println!("mpi timeout: ok (rank {r}): {msg}");
    // Exit without finalizing, as a trainer would on this error: mpirun ends the job.
    std::process::exit(3);
}
