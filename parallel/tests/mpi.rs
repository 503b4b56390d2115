//! The MPI backend under `mpirun` (scripts/mpi-tests.sh runs it with 2 and 4 ranks): every
//! collective against computed values, as tests/collectives.rs checks the threads and TCP
//! backends. With `MOERU_MPI_TEST=timeout` the last rank goes silent and the others must
//! get a timeout diagnostic, print it and exit non-zero, which ends the whole job; with
//! `MOERU_MPI_TEST=abort` the last rank aborts and the job must end at once.
//!
//! A failed check panics, so that rank exits non-zero and mpirun stops the job.

use std::time::{Duration, Instant};

use moeru_parallel::{mpi_world, CommError, ProcessGroup, ReduceOp};

fn main() {
    let mode = std::env::var("MOERU_MPI_TEST").unwrap_or_default();
    match mode.as_str() {
        "" | "ops" => {
            let g = mpi_world(Duration::from_secs(30)).expect("MPI starts");
            check_all_ops(&g);
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

/// The checks of `check_all_ops` in tests/collectives.rs, on this rank.
fn check_all_ops(g: &ProcessGroup) {
    let (r, n) = (g.rank(), g.size());
    assert_eq!(g.name(), "world");
    assert_eq!(g.info().members, (0..n).collect::<Vec<_>>());
    let mut x: Vec<f32> = (0..5).map(|i| (r * 10 + i) as f32 + 0.25).collect();
    g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
    let want: Vec<f32> = (0..5)
        .map(|i| (0..n).map(|q| (q * 10 + i) as f32 + 0.25).sum())
        .collect();
    assert_eq!(x, want);
    let mut m = vec![r as f64, -(r as f64)];
    g.all_reduce(&mut m, ReduceOp::Max).unwrap();
    assert_eq!(m, vec![(n - 1) as f64, 0.0]);
    let mut mean = vec![r as i64 * 2];
    g.all_reduce(&mut mean, ReduceOp::Mean).unwrap();
    assert_eq!(mean[0], (n as i64 - 1));
    let gathered = g.all_gather(&[r as i64, 7]).unwrap();
    assert_eq!(
        gathered,
        (0..n).flat_map(|q| [q as i64, 7]).collect::<Vec<_>>()
    );
    // reduce_scatter: element k of rank q is q*100+k; chunk r sums over q.
    let send: Vec<f32> = (0..2 * n).map(|k| (r * 100 + k) as f32).collect();
    let mine = g.reduce_scatter(&send, ReduceOp::Sum).unwrap();
    let want: Vec<f32> = (2 * r..2 * r + 2)
        .map(|k| (0..n).map(|q| (q * 100 + k) as f32).sum())
        .collect();
    assert_eq!(mine, want);
    // all_to_all with sizes: rank r sends j+1 copies of (r*10+j) to rank j.
    let send_counts: Vec<usize> = (0..n).map(|j| j + 1).collect();
    let send: Vec<i64> = (0..n)
        .flat_map(|j| vec![(r * 10 + j) as i64; j + 1])
        .collect();
    let recv_counts = vec![r + 1; n];
    let got = g.all_to_all(&send, &send_counts, &recv_counts).unwrap();
    let want: Vec<i64> = (0..n)
        .flat_map(|q| vec![(q * 10 + r) as i64; r + 1])
        .collect();
    assert_eq!(got, want);
    let mut b = if r == n - 1 {
        vec![3.5f32, 4.5]
    } else {
        vec![0.0; 2]
    };
    g.broadcast(&mut b, n - 1).unwrap();
    assert_eq!(b, vec![3.5, 4.5]);
    assert_eq!(
        g.broadcast_string(if r == 0 { "hello" } else { "" }, 0)
            .unwrap(),
        "hello"
    );
    // Ring of send/recv.
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;
    g.send(&[r as f32], next, 5).unwrap();
    let mut got = [0f32];
    g.recv(&mut got, prev, 5).unwrap();
    assert_eq!(got[0], prev as f32);
    g.barrier().unwrap();
    // Split into even and odd ranks; sum world ranks inside each.
    let sub = g.split((r % 2) as u32, "parity").unwrap();
    let mut s = vec![r as i64];
    sub.all_reduce(&mut s, ReduceOp::Sum).unwrap();
    let want: i64 = (0..n).filter(|q| q % 2 == r % 2).map(|q| q as i64).sum();
    assert_eq!(s[0], want);
    assert_eq!(sub.name(), "parity");
    let members: Vec<usize> = (0..n).filter(|q| q % 2 == r % 2).collect();
    assert_eq!(sub.info().members, members);
    assert_eq!(sub.rank(), r / 2);
    let t = g.traffic();
    assert_eq!(t["all_reduce"].calls, 3);
    assert_eq!(t["all_reduce"].payload_bytes, 5 * 4 + 2 * 8 + 8);
    assert_eq!(t["reduce_scatter"].payload_bytes as usize, 2 * n * 4);
    assert_eq!(t["all_gather"].wire_bytes as usize, (n - 1) * 16);
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
