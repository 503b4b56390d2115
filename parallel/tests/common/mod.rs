//! The collective checks every backend's tests share: tests/collectives.rs runs them on the
//! threads and TCP backends, tests/mpi.rs under mpirun.

use moeru_parallel::{ProcessGroup, ReduceOp};

/// Every typed collective of `g` against values computed here, on this rank; all ranks of
/// the world group call it together.
pub fn check_all_ops(g: &ProcessGroup) {
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

/// bf16 on the wire: gathers exact; sums and means added in f32 in rank order and rounded
/// once (MPI reduces it as f32), so they equal the f32 wire's results rounded.
pub fn check_bf16(g: &ProcessGroup) {
    use half::bf16;
    let (r, n) = (g.rank(), g.size());
    let value =
        |q: usize, i: usize| bf16::from_f32((q as f32 + 1.0) * (0.1 * i as f32 + 1.0 / 3.0));
    let sum = |i: usize| (0..n).map(|q| value(q, i).to_f32()).sum::<f32>();
    let len = 2 * n;
    let mine: Vec<bf16> = (0..len).map(|i| value(r, i)).collect();
    let mut x = mine.clone();
    g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
    assert_eq!(
        x,
        (0..len).map(|i| bf16::from_f32(sum(i))).collect::<Vec<_>>()
    );
    let mut x = mine.clone();
    g.all_reduce(&mut x, ReduceOp::Mean).unwrap();
    let mean: Vec<bf16> = (0..len)
        .map(|i| bf16::from_f32(sum(i) / n as f32))
        .collect();
    assert_eq!(x, mean);
    let chunk = g.reduce_scatter(&mine, ReduceOp::Sum).unwrap();
    let want: Vec<bf16> = (2 * r..2 * r + 2).map(|i| bf16::from_f32(sum(i))).collect();
    assert_eq!(chunk, want);
    let all = g.all_gather(&mine[..1]).unwrap();
    assert_eq!(all, (0..n).map(|q| value(q, 0)).collect::<Vec<_>>());
}
