//! A step's metrics line: the engine's report, the traffic of each mesh group, expert loads.

use moeru_parallel::{ProcessGroup, Traffic};

use crate::metrics::{CommBytes, LayerLoad, StepMetrics};
use crate::objective::{StepReport, REPLAY_MISMATCH, REPLAY_TOKENS};
use crate::session::Session;

/// Traffic counters of the mesh's groups (dp, tp, pp, ep, edp) and the world before a step.
pub struct TrafficMark(Vec<Traffic>);

impl TrafficMark {
    fn groups<'s>(session: &'s Session) -> [&'s ProcessGroup; 6] {
        let g = &session.groups;
        [&g.dp, &g.tp, &g.pp, &g.ep, &g.edp, session.world]
    }

    pub fn take(session: &Session) -> Self {
        Self(Self::groups(session).map(|g| g.traffic()).into())
    }

    /// What each group's collectives moved since the mark (nothing on a world of one).
    pub fn delta(&self, session: &Session) -> Vec<CommBytes> {
        let mut comm = Vec::new();
        if session.world.size() > 1 {
            for (group, before) in Self::groups(session).into_iter().zip(&self.0) {
                traffic_delta(group, before, &mut comm);
            }
        }
        comm
    }
}

fn traffic_delta(group: &ProcessGroup, before: &Traffic, out: &mut Vec<CommBytes>) {
    for (op, t) in group.traffic() {
        let b = before.get(op).copied().unwrap_or_default();
        if t.payload_bytes > b.payload_bytes || t.calls > b.calls {
            out.push(CommBytes {
                group: group.name().to_string(),
                op: op.to_string(),
                payload: t.payload_bytes - b.payload_bytes,
                wire: t.wire_bytes - b.wire_bytes,
                seconds: (t.busy_ns - b.busy_ns) as f64 * 1e-9,
            });
        }
    }
}

pub fn step_metrics(
    done: u64,
    lr: f64,
    r: &StepReport,
    elapsed: f64,
    comm: Vec<CommBytes>,
    ep: usize,
) -> StepMetrics {
    StepMetrics {
        step: done,
        loss: r.loss,
        lr,
        grad_norm: r.grad_norm,
        tokens: r.tokens,
        tokens_per_s: r.tokens as f64 / elapsed,
        aux_loss: r.aux_loss,
        z_loss: r.z_loss,
        expert_load: r
            .expert_counts
            .iter()
            .map(|(layer, counts)| LayerLoad {
                layer: *layer,
                max: counts.iter().copied().max().unwrap_or(0) as f64,
                mean: counts.iter().sum::<u64>() as f64 / counts.len().max(1) as f64,
            })
            .collect(),
        ep_load: ep_load(&r.expert_counts, ep),
        comm,
        task: replay_fractions(&r.task),
    }
}

/// The task metrics with the router-replay counts as fractions of the replayed tokens.
fn replay_fractions(task: &[(String, f64)]) -> Vec<(String, f64)> {
    let tokens = (task.iter().find(|(n, _)| n == REPLAY_TOKENS)).map(|(_, x)| *x);
    (task.iter().filter(|(n, _)| n != REPLAY_TOKENS))
        .map(|(n, x)| match (n.starts_with(REPLAY_MISMATCH), tokens) {
            (true, Some(t)) => (n.clone(), x / t.max(1.0)),
            _ => (n.clone(), *x),
        })
        .collect()
}

/// Rows routed to each of `ep` ranks' experts (contiguous ranges), over every MoE layer of
/// `counts` (global per-expert counts); empty when `ep` is 1.
fn ep_load(counts: &[(usize, Vec<u64>)], ep: usize) -> Vec<u64> {
    let mut load = vec![0; if ep > 1 { ep } else { 0 }];
    for (_, c) in counts.iter().filter(|_| ep > 1) {
        let local = c.len() / ep;
        for (r, chunk) in c.chunks(local.max(1)).enumerate().take(ep) {
            load[r] += chunk.iter().sum::<u64>();
        }
    }
    load
}
