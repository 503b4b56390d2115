//! Pipeline schedules as data: for each pipeline rank, the list of what it does in one step —
//! forward or backward of micro-batch `mb` on its model chunk `chunk`, and the grouped
//! point-to-point exchanges between them — computed by a pure function (no tensors), as
//! Megatron-Core's `forward_backward_pipelining_without_interleaving` (1F1B) and
//! `..._with_interleaving` (interleaved 1F1B) order them.
//!
//! Chunk `c` of rank `p` is virtual stage `c·pp + p`; a forward on virtual stage `s` needs the
//! activation of stage `s − 1` and a backward the gradient of stage `s + 1`. Every exchange is a
//! group of transfers posted together (NCCL group semantics: all of its sends and receives
//! progress at once, the group completes when all have), made of the sends the previous
//! compute produced and the receives the next compute needs; so two neighbours that both send
//! first cannot deadlock. [`simulate`] checks a plan under exactly those semantics.
//!
//! Owns: the order of computes and exchanges. Must not: touch tensors or communicate.

/// One compute of a rank: forward or backward of micro-batch `mb` on local chunk `chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compute {
    pub backward: bool,
    pub mb: usize,
    pub chunk: usize,
}

/// What a transfer carries: a stage's output activation (forward) or its input gradient
/// (backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Activation,
    Gradient,
}

/// One side of a point-to-point transfer of micro-batch `mb`'s payload from virtual stage
/// `from_stage` (to the next stage for an activation, the previous for a gradient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub send: bool,
    /// The pipeline rank on the other side.
    pub peer: usize,
    pub payload: Payload,
    pub mb: usize,
    pub from_stage: usize,
}

/// One action of a rank's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Compute(Compute),
    /// Transfers posted together; the action completes when all of them have.
    Exchange(Vec<Transfer>),
}

/// The pipeline layout a schedule is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineShape {
    /// Pipeline ranks.
    pub pp: usize,
    /// Model chunks per rank (1: plain 1F1B).
    pub virtual_chunks: usize,
    /// Micro-batches per step (`train.grad_accum`).
    pub micro_batches: usize,
    /// Interleaved only: micro-batches per group of a chunk (Megatron's
    /// `microbatch_group_size_per_vp_stage`, default `pp`).
    pub group: usize,
}

impl PipelineShape {
    pub fn stages(&self) -> usize {
        self.pp * self.virtual_chunks
    }

    /// Why this layout cannot be scheduled, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        let (pp, v, m, n) = (self.pp, self.virtual_chunks, self.micro_batches, self.group);
        if pp == 0 || v == 0 || m == 0 {
            return Err(format!(
                "pp {pp}, virtual chunks {v} and micro-batches {m} must each be at least 1"
            ));
        }
        if v > 1 && pp < 2 {
            return Err(format!(
                "{v} virtual chunks need at least 2 pipeline ranks; pp is {pp}"
            ));
        }
        if v > 1 && !(pp..=m).contains(&n) {
            return Err(format!("the interleaved schedule needs pp ≤ group ≤ micro-batches; group is {n}, pp {pp}, micro-batches {m}"));
        }
        if v > 1 && m % n != 0 && m % n < pp {
            return Err(format!("the interleaved schedule needs micro-batches % group to be 0 or at least pp; {m} % {n} = {} with pp {pp}", m % n));
        }
        Ok(())
    }
}

/// Forwards before the first backward on rank `p` (Megatron's `num_warmup_microbatches`),
/// counted in computes of (micro-batch, chunk).
pub fn warmup(shape: &PipelineShape, p: usize) -> usize {
    let (pp, v, m) = (shape.pp, shape.virtual_chunks, shape.micro_batches);
    if v == 1 {
        return (pp - p - 1).min(m);
    }
    ((pp - p - 1) * 2 + (v - 1) * shape.group).min(m * v)
}

/// Megatron's schedule table: groups of `group` micro-batches, each group through every chunk
/// in turn; the last group takes whatever micro-batches are left.
fn schedule_table(shape: &PipelineShape) -> Vec<(usize, usize)> {
    let (v, m, n) = (
        shape.virtual_chunks,
        shape.micro_batches,
        shape.group.max(1),
    );
    let mut table = Vec::with_capacity(m * v);
    let mut start = 0;
    while start < m {
        let end = if start + n >= m { m } else { start + n };
        for chunk in 0..v {
            table.extend((start..end).map(|mb| (mb, chunk)));
        }
        start = end;
    }
    table
}

/// Rank `p`'s computes in order: warmup forwards, then one forward and one backward at a
/// time, then the remaining backwards.
pub fn compute_order(shape: &PipelineShape, p: usize) -> Vec<Compute> {
    let v = shape.virtual_chunks;
    let table = if v == 1 {
        (0..shape.micro_batches).map(|mb| (mb, 0)).collect()
    } else {
        schedule_table(shape)
    };
    let fwd = |k: usize| Compute {
        backward: false,
        mb: table[k].0,
        chunk: table[k].1,
    };
    let bwd = |k: usize| Compute {
        backward: true,
        mb: table[k].0,
        chunk: v - 1 - table[k].1,
    };
    let (total, w) = (table.len(), warmup(shape, p));
    let mut order: Vec<Compute> = (0..w).map(fwd).collect();
    for k in 0..total - w {
        order.push(fwd(k + w));
        order.push(bwd(k));
    }
    order.extend((total - w..total).map(bwd));
    order
}

/// The virtual stage of rank `p`'s chunk `chunk`.
fn stage_of(shape: &PipelineShape, p: usize, chunk: usize) -> usize {
    chunk * shape.pp + p
}

/// The rank and chunk holding virtual stage `s`.
fn place_of(shape: &PipelineShape, s: usize) -> (usize, usize) {
    (s % shape.pp, s / shape.pp)
}

/// What `c` on rank `p` must receive before it runs, and sends once it has.
fn transfers(shape: &PipelineShape, p: usize, c: Compute) -> (Option<Transfer>, Option<Transfer>) {
    let s = stage_of(shape, p, c.chunk);
    let last = shape.stages() - 1;
    let (payload, before, after) = match c.backward {
        false => (
            Payload::Activation,
            s.checked_sub(1),
            (s < last).then_some(s + 1),
        ),
        true => (
            Payload::Gradient,
            (s < last).then_some(s + 1),
            s.checked_sub(1),
        ),
    };
    let recv = before.map(|from| Transfer {
        send: false,
        peer: place_of(shape, from).0,
        payload,
        mb: c.mb,
        from_stage: from,
    });
    let send = after.map(|to| Transfer {
        send: true,
        peer: place_of(shape, to).0,
        payload,
        mb: c.mb,
        from_stage: s,
    });
    (recv, send)
}

/// Every rank's plan for one step of `shape`.
pub fn plan(shape: &PipelineShape) -> Result<Vec<Vec<Action>>, String> {
    shape.check()?;
    Ok((0..shape.pp).map(|p| rank_plan(shape, p)).collect())
}

/// Rank `p`'s computes in blocks, each preceded by one exchange of the previous block's sends
/// and this block's receives. 1F1B: every compute is a block (Megatron's
/// `send_forward_recv_backward` / `send_backward_recv_forward`). Interleaved: a steady-state
/// forward and backward form one block, as Megatron runs both before its one
/// `send_forward_backward_recv_forward_backward`. The last sends go in a final exchange.
fn rank_plan(shape: &PipelineShape, p: usize) -> Vec<Action> {
    let order = compute_order(shape, p);
    let w = warmup(shape, p);
    let steady = order.len() / 2 - w;
    let paired = |i: usize| shape.virtual_chunks > 1 && i >= w && i < w + 2 * steady;
    let mut blocks: Vec<&[Compute]> = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let n = if paired(i) { 2 } else { 1 };
        blocks.push(&order[i..i + n]);
        i += n;
    }
    let mut actions = Vec::new();
    let mut sends: Vec<Transfer> = Vec::new();
    for block in blocks {
        let io: Vec<_> = block.iter().map(|&c| transfers(shape, p, c)).collect();
        let group: Vec<Transfer> = sends
            .drain(..)
            .chain(io.iter().filter_map(|x| x.0))
            .collect();
        if !group.is_empty() {
            actions.push(Action::Exchange(group));
        }
        actions.extend(block.iter().map(|&c| Action::Compute(c)));
        sends.extend(io.iter().filter_map(|x| x.1));
    }
    if !sends.is_empty() {
        actions.push(Action::Exchange(sends));
    }
    actions
}

/// Runs `plans` (one per rank) under grouped rendezvous semantics: a transfer completes when
/// both its sides are posted, an exchange when all of its transfers have, and a compute needs
/// its input received. Errors on a deadlock (naming each rank's blocked action), a receive of
/// something never sent, or a backward before its forward.
pub fn simulate(shape: &PipelineShape, plans: &[Vec<Action>]) -> Result<(), String> {
    let key = |t: &Transfer, me: usize| {
        (
            t.payload == Payload::Activation,
            t.mb,
            t.from_stage,
            if t.send { me } else { t.peer },
        )
    };
    let mut at = vec![0usize; plans.len()];
    let mut done: Vec<Vec<(bool, usize, usize, usize)>> = vec![Vec::new(); plans.len()];
    let mut computed: Vec<Vec<Compute>> = vec![Vec::new(); plans.len()];
    loop {
        let mut progressed = false;
        for p in 0..plans.len() {
            let Some(action) = plans[p].get(at[p]) else {
                continue;
            };
            let ready = match action {
                Action::Compute(c) => {
                    if c.backward
                        && !computed[p].contains(&Compute {
                            backward: false,
                            ..*c
                        })
                    {
                        return Err(format!("rank {p}: backward of {c:?} before its forward"));
                    }
                    true
                }
                // Each transfer's counterpart is posted now (the peer's current action holds
                // it) or was, in an exchange the peer has completed.
                Action::Exchange(ts) => ts.iter().all(|t| {
                    let posted = match plans[t.peer].get(at[t.peer]) {
                        Some(Action::Exchange(theirs)) => theirs
                            .iter()
                            .any(|u| u.send != t.send && key(u, t.peer) == key(t, p)),
                        _ => false,
                    };
                    posted || done[t.peer].contains(&key(t, p))
                }),
            };
            if ready {
                if let Action::Compute(c) = action {
                    computed[p].push(*c);
                }
                if let Action::Exchange(ts) = action {
                    done[p].extend(ts.iter().map(|t| key(t, p)));
                }
                at[p] += 1;
                progressed = true;
            }
        }
        if at.iter().zip(plans).all(|(a, plan)| *a == plan.len()) {
            return check_complete(shape, &computed);
        }
        if !progressed {
            let blocked: Vec<String> = (0..plans.len())
                .map(|p| format!("rank {p} at {:?}", plans[p].get(at[p])))
                .collect();
            return Err(format!("deadlock: {}", blocked.join("; ")));
        }
    }
}

/// Every rank ran each (micro-batch, chunk) forward and backward once.
fn check_complete(shape: &PipelineShape, computed: &[Vec<Compute>]) -> Result<(), String> {
    for (p, cs) in computed.iter().enumerate() {
        let want = 2 * shape.micro_batches * shape.virtual_chunks;
        if cs.len() != want {
            return Err(format!("rank {p}: {} computes, want {want}", cs.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
