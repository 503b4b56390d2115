//! Where each routed (token, expert) pair is computed: experts in groups, each group a batched
//! matmul over a `[experts, capacity, hidden]` buffer whose capacity is its busiest expert's
//! load (padding slots carry weight 0).
//!
//! One group padded to the largest load is the fastest layout while loads are even, but an
//! uneven router (at initialisation the residual stream is dominated by attention averages
//! that neighbouring tokens share, so they pick the same experts: the qwen3-moe-16l bench
//! shape's first layer routed its busiest expert 3.7× the mean load) makes that group mostly
//! padding. Experts are then sorted by load and cut into at most `MAX_GROUPS` runs of
//! similar load; idle experts join no group. Each further group costs a gather of its
//! experts' weights (and its scatter-add in backward), so one is added only when it saves
//! more than an eighth of the routed rows.

/// Groups per MoE layer at most.
pub const MAX_GROUPS: usize = 4;

/// One batched expert matmul.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertGroup {
    /// The experts, in the order of the batch dimension; `None`: all, in index order (the
    /// stacked weights are used as they are, with no gather).
    pub experts: Option<Vec<i64>>,
    /// Rows per expert (the group's largest load).
    pub capacity: usize,
    /// Source token of each slot (0 for padding).
    pub slot_token: Vec<i64>,
    /// Index into the flattened `[T·k]` routing weights (0 for padding).
    pub slot_assignment: Vec<i64>,
    /// 1 for a real slot, 0 for padding.
    pub slot_valid: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct RoutingPlan {
    pub groups: Vec<ExpertGroup>,
    /// Assignments per expert.
    pub counts: Vec<u64>,
    /// Rows the expert matmuls compute, padding included.
    pub computed_rows: u64,
}

impl RoutingPlan {
    /// `expert_of[a]` is the expert of assignment `a` = token · top_k + slot, or negative
    /// for an assignment dropped over capacity (no row computes it).
    pub fn new(expert_of: &[i64], top_k: usize, experts: usize) -> Self {
        let mut counts = vec![0u64; experts];
        for &e in expert_of.iter().filter(|&&e| e >= 0) {
            counts[e as usize] += 1;
        }
        let cuts = choose_groups(&counts, counts.iter().sum());
        let mut groups = Vec::with_capacity(cuts.len());
        // Where each expert's rows go: (group, position in the group).
        let mut place = vec![(usize::MAX, 0usize); experts];
        for (g, members) in cuts.iter().enumerate() {
            let capacity = members.iter().map(|&e| counts[e]).max().unwrap_or(0).max(1) as usize;
            let all = members.len() == experts && members.iter().enumerate().all(|(i, &e)| i == e);
            for (j, &e) in members.iter().enumerate() {
                place[e] = (g, j);
            }
            let slots = members.len() * capacity;
            groups.push(ExpertGroup {
                experts: (!all).then(|| members.iter().map(|&e| e as i64).collect()),
                capacity,
                slot_token: vec![0; slots],
                slot_assignment: vec![0; slots],
                slot_valid: vec![0.0; slots],
            });
        }
        let mut fill = vec![0usize; experts];
        for (a, &e) in expert_of.iter().enumerate().filter(|(_, &e)| e >= 0) {
            let e = e as usize;
            let (g, j) = place[e];
            let group = &mut groups[g];
            let slot = j * group.capacity + fill[e];
            fill[e] += 1;
            group.slot_token[slot] = (a / top_k) as i64;
            group.slot_assignment[slot] = a as i64;
            group.slot_valid[slot] = 1.0;
        }
        // Every slot is a row the matmuls compute, padding included.
        let computed_rows = groups.iter().map(|g| g.slot_token.len() as u64).sum();
        Self {
            groups,
            counts,
            computed_rows,
        }
    }
}

/// The experts of each group. All experts in one group while that pads by at most an eighth
/// of the routed rows; else the busy experts sorted by load and cut where the padded rows
/// fall most (exact over contiguous runs of the sorted loads).
fn choose_groups(counts: &[u64], routed: u64) -> Vec<Vec<usize>> {
    let experts = counts.len();
    let max = counts.iter().copied().max().unwrap_or(0).max(1);
    let slack = routed / 8;
    if experts as u64 * max <= routed + slack {
        return vec![(0..experts).collect()];
    }
    let mut busy: Vec<usize> = (0..experts).filter(|&e| counts[e] > 0).collect();
    // By load, heaviest first; ties by index, so the plan is a function of the loads alone.
    busy.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let n = busy.len();
    let load = |i: usize| counts[busy[i]];
    // best[g][i]: fewest padded rows covering busy[i..] with g groups; cut[g][i]: first group's end.
    let mut best = vec![vec![u64::MAX; n + 1]; MAX_GROUPS + 1];
    let mut cut = vec![vec![n; n + 1]; MAX_GROUPS + 1];
    best[0][n] = 0;
    for g in 1..=MAX_GROUPS {
        best[g][n] = 0;
        for i in (0..n).rev() {
            for j in i + 1..=n {
                let rest = best[g - 1][j];
                if rest == u64::MAX {
                    continue;
                }
                let cost = (j - i) as u64 * load(i) + rest;
                if cost < best[g][i] {
                    best[g][i] = cost;
                    cut[g][i] = j;
                }
            }
        }
    }
    // Padded rows of the single group over every expert, which needs no weight gather.
    let mut groups_used = 1;
    let mut rows = experts as u64 * max;
    for (g, by_start) in best.iter().enumerate().skip(2) {
        if rows.saturating_sub(by_start[0]) <= slack {
            break;
        }
        (groups_used, rows) = (g, by_start[0]);
    }
    if groups_used == 1 {
        return vec![(0..experts).collect()];
    }
    let mut out = Vec::with_capacity(groups_used);
    let (mut i, mut g) = (0, groups_used);
    while i < n {
        let j = cut[g][i];
        out.push(busy[i..j].to_vec());
        i = j;
        g -= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Assignments (top-1) with the given per-expert loads.
    fn assignments(loads: &[usize]) -> Vec<i64> {
        loads
            .iter()
            .enumerate()
            .flat_map(|(e, &n)| std::iter::repeat_n(e as i64, n))
            .collect()
    }

    fn check_slots(plan: &RoutingPlan, expert_of: &[i64], top_k: usize, experts: usize) {
        let mut seen = vec![false; expert_of.len()];
        for g in &plan.groups {
            let members: Vec<i64> = g
                .experts
                .clone()
                .unwrap_or_else(|| (0..experts as i64).collect());
            for (slot, &valid) in g.slot_valid.iter().enumerate() {
                if valid == 1.0 {
                    let a = g.slot_assignment[slot] as usize;
                    assert!(!seen[a], "assignment {a} placed twice");
                    seen[a] = true;
                    assert_eq!(expert_of[a], members[slot / g.capacity]);
                    assert_eq!(g.slot_token[slot], (a / top_k) as i64);
                }
            }
        }
        assert!(seen.iter().all(|&s| s), "every assignment has a slot");
    }

    #[test]
    fn even_loads_make_one_group_over_all_experts() {
        // 4 × 32 slots for 125 routed rows: within an eighth.
        let expert_of = assignments(&[30, 32, 31, 32]);
        let plan = RoutingPlan::new(&expert_of, 1, 4);
        assert_eq!(plan.groups.len(), 1);
        assert_eq!(plan.groups[0].experts, None);
        assert_eq!(plan.groups[0].capacity, 32);
        assert_eq!(plan.computed_rows, 128);
        check_slots(&plan, &expert_of, 1, 4);
    }

    #[test]
    fn uneven_loads_are_grouped_and_idle_experts_skipped() {
        // One busy expert, three light, four idle: one group would compute 8 × 40 rows.
        let loads = [2, 0, 40, 0, 3, 0, 2, 0];
        let expert_of = assignments(&loads);
        let plan = RoutingPlan::new(&expert_of, 1, 8);
        assert_eq!(plan.counts, loads.map(|n| n as u64).to_vec());
        let groups: Vec<(Option<Vec<i64>>, usize)> = plan
            .groups
            .iter()
            .map(|g| (g.experts.clone(), g.capacity))
            .collect();
        assert_eq!(groups, vec![(Some(vec![2]), 40), (Some(vec![4, 0, 6]), 3)]);
        assert_eq!(plan.computed_rows, 40 + 9);
        check_slots(&plan, &expert_of, 1, 8);
    }

    /// Fewest padded rows over contiguous runs of `sorted` loads in at most `groups` runs.
    fn brute_force(sorted: &[u64], groups: usize) -> u64 {
        let n = sorted.len();
        let mut best = u64::MAX;
        for mask in 0u32..(1 << (n - 1)) {
            if mask.count_ones() as usize + 1 > groups {
                continue;
            }
            let (mut rows, mut start) = (0, 0);
            for i in 1..=n {
                if i == n || mask & (1 << (i - 1)) != 0 {
                    rows += (i - start) as u64 * sorted[start];
                    start = i;
                }
            }
            best = best.min(rows);
        }
        best
    }

    #[test]
    fn groups_cut_where_padding_falls_most() {
        for (loads, top_k) in [
            (vec![10usize, 100, 1, 12, 9, 90, 10, 2], 2),
            (vec![0, 400, 0, 100, 200, 0, 50, 0], 1),
            (vec![7, 7, 6, 7, 7, 7, 7, 7], 1),
            (vec![0, 0, 0, 30, 0, 0, 0, 0], 1),
        ] {
            let expert_of = assignments(&loads);
            let plan = RoutingPlan::new(&expert_of, top_k, 8);
            check_slots(&plan, &expert_of, top_k, 8);
            let mut busy: Vec<u64> = loads
                .iter()
                .filter(|&&n| n > 0)
                .map(|&n| n as u64)
                .collect();
            busy.sort_unstable_by(|a, b| b.cmp(a));
            // A group is added while it saves more than an eighth of the routed rows.
            let slack = expert_of.len() as u64 / 8;
            let (mut groups, mut rows) = (1, 8 * busy[0]);
            for g in 2..=MAX_GROUPS {
                let r = brute_force(&busy, g);
                if rows.saturating_sub(r) <= slack {
                    break;
                }
                (groups, rows) = (g, r);
            }
            assert!(plan.groups.len() <= groups, "{loads:?}");
            assert_eq!(plan.computed_rows, rows, "{loads:?}");
        }
    }
}
