//! One AdamW update in one pass over a parameter's values, gradient and moments (the tensor
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
        m: &[f32],
        v: &[f32],
        p_out: &mut [f32],
        m_out: &mut [f32],
        v_out: &mut [f32],
    ) {
        let inputs = p.iter().zip(g).zip(m.iter().zip(v));
        let outputs = p_out.iter_mut().zip(m_out.iter_mut().zip(v_out.iter_mut()));
        for (((&pi, &gi), (&mi, &vi)), (po, (mo, vo))) in inputs.zip(outputs) {
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

/// Writes the updated values and moments of `p` (gradient `g`, moments `m`, `v`).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    c: &AdamWStep,
    p: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
    p_out: &mut [f32],
    m_out: &mut [f32],
    v_out: &mut [f32],
) {
    let n = p.len();
    assert!(
        [
            g.len(),
            m.len(),
            v.len(),
            p_out.len(),
            m_out.len(),
            v_out.len()
        ] == [n; 6]
    );
    let outs = p_out
        .par_chunks_mut(CHUNK)
        .zip(m_out.par_chunks_mut(CHUNK).zip(v_out.par_chunks_mut(CHUNK)));
    outs.enumerate().for_each(|(i, (po, (mo, vo)))| {
        let r = i * CHUNK..(i * CHUNK + po.len());
        let (pi, gi, mi, vi) = (&p[r.clone()], &g[r.clone()], &m[r.clone()], &v[r]);
        update_chunk(c, pi, gi, mi, vi, po, mo, vo);
    });
}
