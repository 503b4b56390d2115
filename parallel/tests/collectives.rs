//! Every collective of the threads and TCP backends against values computed here, plus the
//! failure paths: a rank that stops participating, a rank that aborts, ranks out of step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moeru_parallel::{
    tcp_world, thread_world, CommError, ProcessGroup, ReduceOp, StoreClient, StoreServer,
};

/// Runs `f(rank, group)` on every rank in its own thread; results in rank order.
fn on_ranks<T: Send + 'static>(
    groups: Vec<ProcessGroup>,
    f: impl Fn(usize, ProcessGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(r, g)| {
            let f = f.clone();
            std::thread::spawn(move || f(r, g))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn tcp_groups(n: usize, timeout: Duration) -> Vec<ProcessGroup> {
    let server = StoreServer::bind("127.0.0.1:0", "job-token").unwrap();
    let addr = server.addr().to_string();
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let store =
                    StoreClient::connect(&addr, "job-token", Duration::from_secs(10)).unwrap();
                tcp_world(&store, "test", r, n, "job-token", timeout).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn check_all_ops(groups: Vec<ProcessGroup>) {
    let n = groups.len();
    let results = on_ranks(groups, move |r, g| {
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
        let t = g.traffic();
        assert_eq!(t["all_reduce"].calls, 3);
        assert_eq!(t["all_reduce"].payload_bytes, 5 * 4 + 2 * 8 + 8);
        assert_eq!(t["reduce_scatter"].payload_bytes as usize, 2 * n * 4);
        assert_eq!(t["all_gather"].wire_bytes as usize, (n - 1) * 16);
        r
    });
    assert_eq!(results, (0..n).collect::<Vec<_>>());
}

#[test]
fn thread_collectives_compute_the_expected_values() {
    for n in [1, 2, 3, 4] {
        check_all_ops(thread_world(n, Duration::from_secs(20)));
    }
}

#[test]
fn tcp_collectives_compute_the_expected_values() {
    for n in [2, 3] {
        check_all_ops(tcp_groups(n, Duration::from_secs(20)));
    }
}

#[test]
fn all_reduce_order_is_fixed_so_ranks_agree_bitwise() {
    let results = on_ranks(thread_world(4, Duration::from_secs(20)), |r, g| {
        let mut x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7 + r * 13) % 97) as f32 * 1e-3 + 1e4 * (r % 2) as f32)
            .collect();
        g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        x
    });
    for r in &results[1..] {
        assert!(r
            .iter()
            .zip(&results[0])
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

fn expect_timeout(groups: Vec<ProcessGroup>, timeout: Duration) {
    let started = Instant::now();
    let n = groups.len();
    let results = on_ranks(groups, move |r, g| {
        if r == n - 1 {
            // Stops participating: sleeps through everyone's timeout.
            std::thread::sleep(timeout + Duration::from_millis(500));
            return None;
        }
        let mut x = vec![1.0f32; 4];
        Some(g.all_reduce(&mut x, ReduceOp::Sum).unwrap_err())
    });
    assert!(started.elapsed() < timeout + Duration::from_secs(5));
    for e in results.into_iter().flatten() {
        match &e {
            CommError::Timeout {
                op,
                group,
                missing,
                members,
                ..
            } => {
                assert_eq!((*op, group.as_str()), ("all_reduce", "world"));
                assert_eq!(missing, &vec![n - 1]);
                assert_eq!(members.len(), n);
            }
            other => panic!("expected a timeout, got {other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("all_reduce") && msg.contains(&format!("still waiting for [{}]", n - 1)),
            "{msg}"
        );
    }
}

#[test]
fn a_silent_rank_times_out_everyone_else_with_a_diagnostic() {
    let timeout = Duration::from_millis(800);
    expect_timeout(thread_world(3, timeout), timeout);
    expect_timeout(tcp_groups(3, timeout), timeout);
}

#[test]
fn an_aborting_rank_releases_the_others_at_once() {
    let results = on_ranks(thread_world(3, Duration::from_secs(60)), |r, g| {
        if r == 2 {
            g.abort("out of memory");
            return None;
        }
        let started = Instant::now();
        let e = g.barrier().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        Some(e.to_string())
    });
    for msg in results.into_iter().flatten() {
        assert!(msg.contains("rank 2 failed: out of memory"), "{msg}");
    }
}

#[test]
fn a_tcp_rank_that_exits_fails_its_peers_at_once() {
    let results = on_ranks(tcp_groups(2, Duration::from_secs(60)), |r, g| {
        if r == 1 {
            drop(g); // closes the sockets, as a killed process would
            return None;
        }
        let started = Instant::now();
        let e = g.barrier().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        Some(e.to_string())
    });
    let msg = results[0].as_ref().unwrap();
    assert!(msg.contains("rank 1 is gone"), "{msg}");
}

#[test]
fn ranks_out_of_step_are_reported() {
    let results = on_ranks(thread_world(2, Duration::from_secs(5)), |r, g| {
        if r == 0 {
            g.barrier().map_err(|e| e.to_string())
        } else {
            g.all_gather(&[1.0f32])
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    });
    let msg = results[0].as_ref().unwrap_err();
    assert!(
        msg.contains("out of step") && msg.contains("all_gather"),
        "{msg}"
    );
}

#[test]
fn the_store_refuses_another_jobs_token() {
    let server = StoreServer::bind("127.0.0.1:0", "right").unwrap();
    let addr = server.addr().to_string();
    let e = StoreClient::connect(&addr, "wrong", Duration::from_secs(5))
        .err()
        .unwrap();
    assert!(e.to_string().contains("refused this job's token"), "{e}");
    let c = StoreClient::connect(&addr, "right", Duration::from_millis(300)).unwrap();
    c.set("k", b"v").unwrap();
    assert_eq!(c.get("k").unwrap(), b"v");
    assert_eq!(c.add("n", 2).unwrap(), 2);
    assert_eq!(c.add("n", 3).unwrap(), 5);
    let e = c.get("never").unwrap_err().to_string();
    assert!(e.contains("`never`"), "{e}");
}
