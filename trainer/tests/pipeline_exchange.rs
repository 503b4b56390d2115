//! The pipeline plans (`moeru_trainer::pipeline::schedule`) run over real messages on thread
//! ranks: every rank walks its plan, each exchange one `ProcessGroup::exchange` of tagged
//! payloads, each compute checking that what it consumes arrived and is the right one. So the
//! plans' peers, directions and per-pair message order hold on a real transport, for 1F1B and
//! interleaved 1F1B, without a deadlock (the collective timeout would fail the test).

use std::time::Duration;

use moeru_parallel::{thread_world, ProcessGroup};
use moeru_trainer::pipeline::schedule::{plan, Action, Compute, Payload, PipelineShape, Transfer};

/// What a transfer carries: its identity, so a receiver sees whether the right one came.
fn payload(t: &Transfer) -> [f32; 3] {
    let kind = match t.payload {
        Payload::Activation => 1.0,
        Payload::Gradient => 2.0,
    };
    [kind, t.mb as f32, t.from_stage as f32]
}

/// Rank `p` runs its plan; returns the computes in the order it ran them.
fn run_rank(group: &ProcessGroup, shape: &PipelineShape, actions: &[Action]) -> Vec<Compute> {
    let p = group.rank();
    let (mut received, mut ran) = (Vec::new(), Vec::new());
    for action in actions {
        match action {
            Action::Exchange(ts) => {
                let sends: Vec<([f32; 3], usize)> = ts
                    .iter()
                    .filter(|t| t.send)
                    .map(|t| (payload(t), t.peer))
                    .collect();
                let send_refs: Vec<(&[f32], usize)> =
                    sends.iter().map(|(b, d)| (&b[..], *d)).collect();
                let wanted: Vec<&Transfer> = ts.iter().filter(|t| !t.send).collect();
                let mut bufs = vec![[0f32; 3]; wanted.len()];
                let mut recvs: Vec<(&mut [f32], usize)> = bufs
                    .iter_mut()
                    .zip(&wanted)
                    .map(|(b, t)| (&mut b[..], t.peer))
                    .collect();
                group
                    .exchange(&send_refs, &mut recvs, 11)
                    .unwrap_or_else(|e| panic!("rank {p}: {e}"));
                for (b, t) in bufs.iter().zip(&wanted) {
                    assert_eq!(*b, payload(t), "rank {p}: got {b:?} for {t:?}");
                    received.push(*b);
                }
            }
            Action::Compute(c) => {
                let stage = c.chunk * shape.pp + p;
                let needs = match c.backward {
                    false => (stage > 0).then(|| [1.0, c.mb as f32, (stage - 1) as f32]),
                    true => {
                        (stage + 1 < shape.stages()).then(|| [2.0, c.mb as f32, (stage + 1) as f32])
                    }
                };
                if let Some(n) = needs {
                    assert!(
                        received.contains(&n),
                        "rank {p}: {c:?} ran before its input {n:?}"
                    );
                }
                ran.push(*c);
            }
        }
    }
    ran
}

fn run_plan(shape: PipelineShape) {
    let plans = plan(&shape).unwrap();
    let groups = thread_world(shape.pp, Duration::from_secs(20));
    let ran: Vec<Vec<Compute>> = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .zip(&plans)
            .map(|(g, actions)| s.spawn(move || run_rank(g, &shape, actions)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &ran {
        assert_eq!(
            r.len(),
            2 * shape.micro_batches * shape.virtual_chunks,
            "{shape:?}"
        );
    }
}

#[test]
fn one_f_one_b_plans_run_over_thread_ranks() {
    for (pp, m) in [(2, 1), (2, 4), (3, 5), (4, 8)] {
        run_plan(PipelineShape {
            pp,
            virtual_chunks: 1,
            micro_batches: m,
            group: pp,
        });
    }
}

#[test]
fn interleaved_plans_run_over_thread_ranks() {
    for (pp, v, m) in [(2, 2, 4), (2, 3, 6), (4, 2, 8), (3, 2, 6)] {
        run_plan(PipelineShape {
            pp,
            virtual_chunks: v,
            micro_batches: m,
            group: pp,
        });
    }
}
