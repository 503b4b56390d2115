//! Router replay for MoE RL (R3 / R2): the top-k experts a forward chose for each token,
//! recorded per MoE layer, and given to another forward over the same tokens, which then
//! routes each token to those experts with weights from its own live router softmax (so the
//! router still learns; the discrete choice alone is replayed).
//!
//! Owns: the recorded ids and their comparison with live routing. Must not: compute routing
//! weights (moe.rs does) or know where the routes came from (generation, a scoring forward).

use std::collections::BTreeMap;

/// A token slot that routes live: padding, or a token a generation never fed.
pub const LIVE: i64 = -1;

/// Each MoE layer's top-k expert ids for every token of a forward's rows, token-major
/// (`[rows · seq · top_k]`, rows as the forward's batch lays them out), by global layer index.
/// A token whose ids are [`LIVE`] routes live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteReplay {
    pub top_k: usize,
    pub layers: BTreeMap<usize, Vec<i64>>,
}

impl RouteReplay {
    pub fn new(top_k: usize) -> Self {
        Self {
            top_k,
            layers: BTreeMap::new(),
        }
    }

    /// The routes a forward chose: each MoE layer's top-k ids from its router stats.
    pub fn from_router(router: &[(usize, crate::moe::RouterStats)], top_k: usize) -> Self {
        let mut out = Self::new(top_k);
        for (layer, s) in router {
            out.layers.insert(*layer, s.expert_ids.clone());
        }
        out
    }

    pub fn layer(&self, layer: usize) -> Option<&[i64]> {
        self.layers.get(&layer).map(Vec::as_slice)
    }
}

/// How one layer's replay compared with its live routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Per token: the live top-k set differs from the replayed one (false for live tokens).
    pub mismatched: Vec<bool>,
    /// Tokens that routed live ([`LIVE`] slots).
    pub fallback: usize,
}

/// The experts each token uses when replaying `recorded` over the live top-k `live` (both
/// `[tokens · k]`): the recorded ids, or the live ones where the recording is [`LIVE`].
/// Panics on a recording of the wrong size, out of range or with a repeated expert: routes
/// come from moeru's own forwards, so any of these is a bug in aligning them.
pub fn replayed_ids(
    live: &[i64],
    recorded: &[i64],
    k: usize,
    experts: usize,
) -> (Vec<i64>, ReplayStats) {
    assert_eq!(
        live.len(),
        recorded.len(),
        "router replay: {} recorded ids for {} token slots (top-{k}); the routes are not \
         aligned with this forward's tokens",
        recorded.len(),
        live.len()
    );
    let tokens = live.len() / k.max(1);
    let mut ids = Vec::with_capacity(live.len());
    let mut stats = ReplayStats {
        mismatched: vec![false; tokens],
        fallback: 0,
    };
    for t in 0..tokens {
        let (l, r) = (&live[t * k..(t + 1) * k], &recorded[t * k..(t + 1) * k]);
        if r[0] == LIVE {
            stats.fallback += 1;
            ids.extend_from_slice(l);
            continue;
        }
        for (i, &e) in r.iter().enumerate() {
            assert!(
                (0..experts as i64).contains(&e) && !r[..i].contains(&e),
                "router replay: token {t} replays experts {r:?} of {experts}"
            );
        }
        stats.mismatched[t] = l.iter().any(|e| !r.contains(e));
        ids.extend_from_slice(r);
    }
    (ids, stats)
}

/// The routes of a generation, gathered as it runs: a left-padded prompt batch `[b, s]`
/// through prefill, then one token per row a step. Laid out like `Generated::sequences`
/// (`[b, s + steps]`), with [`LIVE`] at left padding and at the last token, never fed.
#[derive(Debug, Clone)]
pub struct RouteRecorder {
    top_k: usize,
    rows: usize,
    /// Per MoE layer, per row: the ids of each position fed so far.
    layers: BTreeMap<usize, Vec<Vec<i64>>>,
}

impl RouteRecorder {
    pub fn new(rows: usize, top_k: usize) -> Self {
        Self {
            top_k,
            rows,
            layers: BTreeMap::new(),
        }
    }

    /// Prefill's routes over the left-padded prompts (`mask` `[b, s]`, 0 at padding).
    pub fn prefill(&mut self, router: &[(usize, crate::moe::RouterStats)], mask: &[i64]) {
        let (k, b) = (self.top_k, self.rows);
        let s = mask.len() / b.max(1);
        for (layer, stats) in router {
            let rows = (0..b)
                .map(|r| {
                    (0..s)
                        .flat_map(|p| {
                            let at = (r * s + p) * k;
                            let real = mask[r * s + p] != 0;
                            (0..k).map(move |j| (at + j, real))
                        })
                        .map(|(i, real)| if real { stats.expert_ids[i] } else { LIVE })
                        .collect()
                })
                .collect();
            self.layers.insert(*layer, rows);
        }
    }

    /// One decode step's routes: each row's one token.
    pub fn step(&mut self, router: &[(usize, crate::moe::RouterStats)]) {
        let k = self.top_k;
        for (layer, stats) in router {
            let rows = self
                .layers
                .get_mut(layer)
                .expect("prefill recorded every layer");
            for (r, row) in rows.iter_mut().enumerate() {
                row.extend_from_slice(&stats.expert_ids[r * k..(r + 1) * k]);
            }
        }
    }

    /// The routes of `[b, len]` sequences: positions never fed (the last) route live.
    pub fn finish(self, len: usize) -> RouteReplay {
        let k = self.top_k;
        let mut out = RouteReplay::new(k);
        for (layer, rows) in self.layers {
            let mut ids = Vec::with_capacity(self.rows * len * k);
            for row in rows {
                ids.extend_from_slice(&row[..row.len().min(len * k)]);
                ids.resize(ids.len() + (len * k).saturating_sub(row.len()), LIVE);
            }
            out.layers.insert(layer, ids);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_takes_recorded_ids_and_counts_mismatches_and_fallbacks() {
        let live = [0, 1, 2, 3, 1, 0];
        let recorded = [1, 0, LIVE, LIVE, 1, 2];
        let (ids, s) = replayed_ids(&live, &recorded, 2, 4);
        assert_eq!(ids, vec![1, 0, 2, 3, 1, 2]);
        // The first token's set is the same in another order: not a mismatch.
        assert_eq!(s.mismatched, vec![false, false, true]);
        assert_eq!(s.fallback, 1);
    }

    #[test]
    #[should_panic(expected = "replays experts")]
    fn a_repeated_expert_is_refused() {
        replayed_ids(&[0, 1], &[1, 1], 2, 4);
    }
}
