//! Where each routed (token, expert) pair is computed: the assignments sorted by expert (a
//! stable sort, so each expert's rows stay in token order), one contiguous row range per
//! expert, for the grouped matmul (grouped_mm.rs). No row is padded: the rows the experts
//! compute are the rows routed, whatever the router's balance.
//!
//! (Before, experts ran as batched matmuls over `[experts, capacity, hidden]` buffers padded
//! to the busiest expert of a group, with up to four load-sorted groups to limit the padding;
//! an uneven router still computed up to 1.7× the routed rows there.)

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingPlan {
    /// Assignments (token · top_k + slot) in row order: by expert, then by assignment.
    pub sorted_assignment: Vec<i64>,
    /// The source token of each row.
    pub sorted_token: Vec<i64>,
    /// Expert e's rows are `offsets[e]..offsets[e + 1]` (`experts + 1` entries).
    pub offsets: Vec<usize>,
    /// Assignments per expert.
    pub counts: Vec<u64>,
    /// Rows the experts' gate/up products compute: the routed rows, an expert with fewer than
    /// `min_rows` (grouped_mm.rs) computed over that many.
    pub computed_rows: u64,
}

impl RoutingPlan {
    /// `expert_of[a]` is the expert of assignment `a` = token · top_k + slot, or negative
    /// for an assignment dropped over capacity (no row computes it); `min_rows`: the least
    /// rows an expert with any is computed over.
    pub fn new(expert_of: &[i64], top_k: usize, experts: usize, min_rows: usize) -> Self {
        let mut counts = vec![0u64; experts];
        for &e in expert_of.iter().filter(|&&e| e >= 0) {
            counts[e as usize] += 1;
        }
        let mut offsets = vec![0usize; experts + 1];
        for e in 0..experts {
            offsets[e + 1] = offsets[e] + counts[e] as usize;
        }
        let routed = offsets[experts];
        let mut next = offsets.clone();
        let mut sorted_assignment = vec![0i64; routed];
        for (a, &e) in expert_of.iter().enumerate().filter(|(_, &e)| e >= 0) {
            let row = &mut next[e as usize];
            sorted_assignment[*row] = a as i64;
            *row += 1;
        }
        let computed_rows = counts
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| n.max(min_rows as u64))
            .sum();
        let sorted_token = sorted_assignment
            .iter()
            .map(|&a| a / top_k as i64)
            .collect();
        Self {
            sorted_assignment,
            sorted_token,
            offsets,
            counts,
            computed_rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_sorted_by_expert_in_token_order_without_padding() {
        // top-2 over 5 tokens and 4 experts; assignment 7 dropped (negative); expert 3 idle.
        let expert_of = [2, 0, 0, 1, 2, 1, 0, -1, 1, 2];
        let plan = RoutingPlan::new(&expert_of, 2, 4, 1);
        assert_eq!(plan.counts, vec![3, 3, 3, 0]);
        assert_eq!(plan.offsets, vec![0, 3, 6, 9, 9]);
        assert_eq!(plan.sorted_assignment, vec![1, 2, 6, 3, 5, 8, 0, 4, 9]);
        assert_eq!(plan.sorted_token, vec![0, 1, 3, 1, 2, 4, 0, 2, 4]);
        assert_eq!(plan.computed_rows, 9);
        for e in 0..4 {
            for row in plan.offsets[e]..plan.offsets[e + 1] {
                assert_eq!(expert_of[plan.sorted_assignment[row] as usize], e as i64);
            }
        }
    }

    #[test]
    fn an_uneven_router_computes_only_its_routed_rows() {
        let loads = [2usize, 0, 40, 0, 3, 0, 2, 0];
        let expert_of: Vec<i64> = loads
            .iter()
            .enumerate()
            .flat_map(|(e, &n)| std::iter::repeat_n(e as i64, n))
            .collect();
        let plan = RoutingPlan::new(&expert_of, 1, 8, 2);
        assert_eq!(plan.computed_rows, 47);
        // Experts with fewer than the least rows are computed over that many.
        assert_eq!(
            RoutingPlan::new(&expert_of, 1, 8, 3).computed_rows,
            40 + 3 + 3 + 3
        );
        assert_eq!(plan.offsets, vec![0, 2, 2, 42, 42, 45, 45, 47, 47]);
    }
}
