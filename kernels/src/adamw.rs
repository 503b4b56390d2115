//! One AdamW update in one pass over a parameter's values, gradient and moments (updated in
//! place) (the tensor
//! expression it replaces sweeps memory a dozen times and allocates as many buffers).

use rayon::prelude::*;

/// The step's scalars, each already rounded to f32 as the tensor expression used them.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// `1 − lr·weight_decay`.
    pub keep: f32,
    /// `1 − beta1`.
    pub one_minus_beta1: f32,
    pub beta2: f32,
    /// `1 − beta2`.
    pub one_minus_beta2: f32,
    /// `sqrt(1 − beta2^t)`.
    pub bias2_sqrt: f32,
    pub eps: f32,
    /// `lr / (1 − beta1^t)`.
    pub step_size: f32,
}

const CHUNK: usize = 16 * 1024;

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn update_chunk(
        c: &AdamWStep,
        p: &[f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        p_out: &mut [f32],
    ) {
        let inputs = p.iter().zip(g);
        let outputs = p_out.iter_mut().zip(m.iter_mut().zip(v.iter_mut()));
        for ((&pi, &gi), (po, (mo, vo))) in inputs.zip(outputs) {
            let (mi, vi) = (*mo, *vo);
            // The order of operations of torch's AdamW (and of the expression this replaces):
            // p·(1 − lr·wd); m + (g − m)(1 − β1); v·β2 + g²(1 − β2);
            // p − (m / (sqrt(v) / sqrt(1 − β2^t) + eps))·lr / (1 − β1^t).
            let m1 = mi + (gi - mi) * c.one_minus_beta1;
            let v1 = vi * c.beta2 + (gi * gi) * c.one_minus_beta2;
            let denom = v1.sqrt() / c.bias2_sqrt + c.eps;
            *po = pi * c.keep - (m1 / denom) * c.step_size;
            *mo = m1;
            *vo = v1;
        }
    }
}

/// Writes the updated values of `p` (gradient `g`) to `p_out` and updates the moments `m`,
/// `v` in place.
pub fn adamw(c: &AdamWStep, p: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32], p_out: &mut [f32]) {
    let n = p.len();
    assert!(
        [g.len(), m.len(), v.len(), p_out.len()] == [n; 4],
        "adamw: lengths"
    );
    let moments = m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK));
    let chunks = p_out.par_chunks_mut(CHUNK).zip(moments).enumerate();
    chunks.for_each(|(i, (po, (mc, vc)))| {
        let r = i * CHUNK..(i * CHUNK + po.len());
        update_chunk(c, &p[r.clone()], &g[r], mc, vc, po);
    });
}
