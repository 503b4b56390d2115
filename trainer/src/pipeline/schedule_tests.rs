use super::*;

fn shape(pp: usize, v: usize, m: usize) -> PipelineShape {
    PipelineShape {
        pp,
        virtual_chunks: v,
        micro_batches: m,
        group: pp,
    }
}

/// `F0 F1 B0 …` for a compute order (chunks shown as `F0.1` when there are several).
fn render(order: &[Compute], chunks: bool) -> String {
    let one = |c: &Compute| {
        let k = if c.backward { 'B' } else { 'F' };
        match chunks {
            true => format!("{k}{}.{}", c.mb, c.chunk),
            false => format!("{k}{}", c.mb),
        }
    };
    order.iter().map(one).collect::<Vec<_>>().join(" ")
}

#[test]
fn one_f_one_b_matches_megatron() {
    let s = shape(2, 1, 4);
    assert_eq!(
        render(&compute_order(&s, 0), false),
        "F0 F1 B0 F2 B1 F3 B2 B3"
    );
    assert_eq!(
        render(&compute_order(&s, 1), false),
        "F0 B0 F1 B1 F2 B2 F3 B3"
    );
    let s = shape(4, 1, 8);
    let w: Vec<usize> = (0..4).map(|p| warmup(&s, p)).collect();
    assert_eq!(w, [3, 2, 1, 0]);
    // Fewer micro-batches than stages: every forward first.
    assert_eq!(warmup(&shape(4, 1, 2), 0), 2);
    assert_eq!(
        render(&compute_order(&shape(4, 1, 2), 0), false),
        "F0 F1 B0 B1"
    );
}

#[test]
fn interleaved_matches_megatron() {
    // The design note's example: pp 2, v 2, m 4; rank 0 warms up 4, rank 1 warms up 2.
    let s = shape(2, 2, 4);
    assert_eq!((warmup(&s, 0), warmup(&s, 1)), (4, 2));
    assert_eq!(
        render(&compute_order(&s, 0), true),
        "F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0"
    );
    // Megatron: (pp − p − 1)·2 + (v − 1)·group, capped at m·v.
    let s = PipelineShape {
        pp: 4,
        virtual_chunks: 2,
        micro_batches: 8,
        group: 4,
    };
    let w: Vec<usize> = (0..4).map(|p| warmup(&s, p)).collect();
    assert_eq!(w, [10, 8, 6, 4]);
    assert_eq!(warmup(&shape(4, 3, 4), 1), 12);
    assert_eq!(warmup(&shape(4, 3, 4), 3), 8);
    assert_eq!(warmup(&shape(4, 4, 4), 0), 16, "capped at m·v");
}

#[test]
fn every_compute_once_and_backwards_in_micro_batch_order() {
    for (pp, v, m) in [
        (1, 1, 3),
        (2, 1, 5),
        (4, 1, 8),
        (2, 2, 4),
        (2, 3, 6),
        (4, 2, 8),
        (3, 2, 7),
    ] {
        let s = PipelineShape {
            group: pp,
            ..shape(pp, v, m)
        };
        for p in 0..pp {
            let order = compute_order(&s, p);
            assert_eq!(order.len(), 2 * m * v, "{s:?} rank {p}");
            for chunk in 0..v {
                for backward in [false, true] {
                    let mbs: Vec<usize> = (order.iter())
                        .filter(|c| c.chunk == chunk && c.backward == backward)
                        .map(|c| c.mb)
                        .collect();
                    assert_eq!(
                        mbs,
                        (0..m).collect::<Vec<_>>(),
                        "{s:?} rank {p} chunk {chunk}"
                    );
                }
            }
        }
    }
}

#[test]
fn one_f_one_b_keeps_at_most_pp_minus_p_in_flight() {
    let s = shape(4, 1, 8);
    for p in 0..4 {
        let (mut live, mut most) = (0i64, 0i64);
        for c in compute_order(&s, p) {
            live += if c.backward { -1 } else { 1 };
            most = most.max(live);
        }
        assert_eq!(most as usize, 4 - p, "rank {p}");
    }
}

#[test]
fn plans_run_without_deadlock_under_grouped_exchanges() {
    let mut n = 0;
    for pp in 1..=4 {
        for m in 1..=9 {
            simulate(&shape(pp, 1, m), &plan(&shape(pp, 1, m)).unwrap())
                .unwrap_or_else(|e| panic!("1F1B pp {pp} m {m}: {e}"));
            n += 1;
            for v in 2..=3 {
                let s = shape(pp, v, m);
                if pp > 1 && s.check().is_ok() {
                    simulate(&s, &plan(&s).unwrap()).unwrap_or_else(|e| panic!("{s:?}: {e}"));
                    n += 1;
                }
            }
        }
    }
    assert!(n > 50, "{n} layouts");
}

#[test]
fn exchanges_pair_sends_with_the_next_receive() {
    let plans = plan(&shape(2, 1, 4)).unwrap();
    // Rank 0 in steady state: its forward's send and the backward's receive go out together.
    let grouped = plans[0]
        .iter()
        .any(|a| matches!(a, Action::Exchange(ts) if ts.len() == 2 && ts[0].send && !ts[1].send));
    assert!(grouped, "{:?}", plans[0]);
    let last = plans[1].iter().filter(|a| matches!(a, Action::Exchange(ts) if ts.iter().any(|t| t.send && t.payload == Payload::Activation))).count();
    assert_eq!(last, 0, "the last stage sends no activation");
}

#[test]
fn the_simulator_finds_a_deadlock() {
    let s = shape(2, 1, 2);
    let mut plans = plan(&s).unwrap();
    // Rank 1 waits for the gradient of micro-batch 1 before it sends any: a cycle.
    let first = plans[1]
        .iter()
        .position(|a| matches!(a, Action::Exchange(_)))
        .unwrap();
    plans[1].insert(
        first,
        Action::Exchange(vec![Transfer {
            send: false,
            peer: 0,
            payload: Payload::Gradient,
            mb: 1,
            from_stage: 0,
        }]),
    );
    let e = simulate(&s, &plans).unwrap_err();
    assert!(e.contains("deadlock"), "{e}");
}

#[test]
fn shapes_that_cannot_be_scheduled_are_refused() {
    assert!(shape(0, 1, 4).check().is_err());
    assert!(shape(1, 2, 4)
        .check()
        .unwrap_err()
        .contains("at least 2 pipeline ranks"));
    let e = PipelineShape {
        pp: 4,
        virtual_chunks: 2,
        micro_batches: 3,
        group: 4,
    }
    .check()
    .unwrap_err();
    assert!(e.contains("group"), "{e}");
    let e = PipelineShape {
        pp: 4,
        virtual_chunks: 2,
        micro_batches: 9,
        group: 6,
    }
    .check()
    .unwrap_err();
    assert!(e.contains("% group"), "{e}");
}
