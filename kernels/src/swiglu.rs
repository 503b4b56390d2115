//! SwiGLU: `y = silu(g) ⊙ u` with `silu(g) = g · σ(g)`, over row views of the gate and up
//! projections (often two column ranges of one fused gate/up product).

use rayon::prelude::*;

use crate::{chunk_rows, exp, Rows};

#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp(-g))
}

multiversion! {
    /// Rows `first..` of the output, as many as `y` holds.
    fn forward_chunk(gate: Rows, up: Rows, first: usize, y: &mut [f32]) {
        for (i, yr) in y.chunks_exact_mut(gate.width).enumerate() {
            let (g, u) = (gate.row(first + i), up.row(first + i));
            for ((o, &gj), &uj) in yr.iter_mut().zip(g).zip(u) {
                *o = gj * sigmoid(gj) * uj;
            }
        }
    }
}

multiversion! {
    fn backward_chunk(gate: Rows, up: Rows, dy: &[f32], first: usize, dg: &mut [f32], du: &mut [f32]) {
        let w = gate.width;
        let rows = dg.chunks_exact_mut(w).zip(du.chunks_exact_mut(w)).zip(dy.chunks_exact(w));
        for (i, ((dgr, dur), dyr)) in rows.enumerate() {
            let (g, u) = (gate.row(first + i), up.row(first + i));
            let lanes = dgr.iter_mut().zip(dur.iter_mut()).zip(dyr.iter().zip(g.iter().zip(u)));
            for ((dgj, duj), (&d, (&gj, &uj))) in lanes {
                let s = sigmoid(gj);
                *duj = d * gj * s;
                // d silu/dg = σ(g)·(1 + g·(1 − σ(g))).
                *dgj = d * uj * s * (1.0 + gj * (1.0 - s));
            }
        }
    }
}

/// `y [rows, width] = silu(gate) ⊙ up`.
pub fn swiglu(gate: Rows, up: Rows, y: &mut [f32]) {
    let w = gate.width;
    assert!(
        up.width == w && up.rows == gate.rows && y.len() == gate.rows * w,
        "swiglu: shapes"
    );
    if w == 0 {
        return;
    }
    let chunk = chunk_rows(w);
    y.par_chunks_mut(chunk * w)
        .enumerate()
        .for_each(|(c, yc)| forward_chunk(gate, up, c * chunk, yc));
}

/// Gradients of [`swiglu`] given `dy [rows, width]`: `d_gate` and `d_up`, both dense.
pub fn swiglu_backward(gate: Rows, up: Rows, dy: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    let w = gate.width;
    assert!(dy.len() == gate.rows * w && d_gate.len() == dy.len() && d_up.len() == dy.len());
    if w == 0 {
        return;
    }
    let chunk = chunk_rows(w);
    d_gate
        .par_chunks_mut(chunk * w)
        .zip(d_up.par_chunks_mut(chunk * w))
        .zip(dy.par_chunks(chunk * w))
        .enumerate()
        .for_each(|(c, ((dg, du), dyc))| backward_chunk(gate, up, dyc, c * chunk, dg, du));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_and_gradients_match_the_formula_on_column_views() {
        let (rows, w) = (19, 13);
        // One [rows, 2w] buffer: gate is columns 0..w, up columns w..2w.
        let both: Vec<f32> = (0..rows * 2 * w)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let view = |offset| Rows {
            data: &both,
            offset,
            stride: 2 * w,
            width: w,
            rows,
        };
        let (gate, up) = (view(0), view(w));
        let dy: Vec<f32> = (0..rows * w)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let mut y = vec![0.0; rows * w];
        swiglu(gate, up, &mut y);
        let (mut dg, mut du) = (vec![0.0; rows * w], vec![0.0; rows * w]);
        swiglu_backward(gate, up, &dy, &mut dg, &mut du);
        let f = |g: f64, u: f64| g / (1.0 + (-g).exp()) * u;
        let h = 1e-5;
        for r in 0..rows {
            for j in 0..w {
                let (g, u, k) = (gate.row(r)[j] as f64, up.row(r)[j] as f64, r * w + j);
                assert!((y[k] as f64 - f(g, u)).abs() < 1e-5 * (1.0 + f(g, u).abs()));
                let num_g = (f(g + h, u) - f(g - h, u)) / (2.0 * h) * dy[k] as f64;
                let num_u = (f(g, u + h) - f(g, u - h)) / (2.0 * h) * dy[k] as f64;
                assert!(
                    (dg[k] as f64 - num_g).abs() < 1e-4 * (1.0 + num_g.abs()),
                    "dg {k}"
                );
                assert!(
                    (du[k] as f64 - num_u).abs() < 1e-4 * (1.0 + num_u.abs()),
                    "du {k}"
                );
            }
        }
    }
}
