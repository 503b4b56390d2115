//! Every collective of the threads and TCP backends against values computed here, plus the
//! failure paths: a rank that stops participating, a rank that aborts, ranks out of step.

mod common;

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
                tcp_world(&store, "test", r, n, "job-token", timeout, None).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The shared checks (tests/common) on every rank at once.
fn check_all_ops(groups: Vec<ProcessGroup>) {
    let n = groups.len();
    let results = on_ranks(groups, |r, g| {
        common::check_all_ops(&g);
        common::check_bf16(&g);
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
fn bad_arguments_fail_at_once_on_the_calling_rank() {
    let results = on_ranks(thread_world(2, Duration::from_secs(60)), |_, g| {
        let started = Instant::now();
        let errors = [
            g.all_to_all(&[1i64, 2], &[2], &[1, 1]).unwrap_err(),
            g.broadcast(&mut [0f32], 2).unwrap_err(),
            g.send(&[0u8], 5, 1).unwrap_err(),
            g.reduce_scatter(&[1f32, 2.0, 3.0], ReduceOp::Sum)
                .unwrap_err(),
        ];
        assert!(started.elapsed() < Duration::from_secs(10));
        errors.map(|e| {
            assert!(matches!(e, CommError::BadArgument { .. }), "{e}");
            e.to_string()
        })
    });
    let [a2a, bcast, send, rs] = &results[0];
    assert!(
        a2a.contains("all_to_all") && a2a.contains("1 send sizes"),
        "{a2a}"
    );
    assert!(
        bcast.contains("root 2 is outside the group of 2"),
        "{bcast}"
    );
    assert!(
        send.contains("send/recv") && send.contains("destination 5"),
        "{send}"
    );
    assert!(rs.contains("3 elements do not split into 2"), "{rs}");
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
