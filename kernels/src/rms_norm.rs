//! RMSNorm over rows: `y = (x · r) ⊙ w` with `r = 1 / sqrt(mean(x²) + eps)` per row.

use rayon::prelude::*;

use crate::chunk_rows;

/// `Σ a_i·b_i` in eight lanes (so it vectorises), the lanes summed at the end.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += xa[l] * xb[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mean = dot(x, x) / x.len() as f32;
    1.0 / (mean + eps).sqrt()
}

multiversion! {
    fn forward_chunk(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
        for (yr, xr) in y.chunks_exact_mut(w.len()).zip(x.chunks_exact(w.len())) {
            let r = inv_rms(xr, eps);
            for ((o, &xi), &wi) in yr.iter_mut().zip(xr).zip(w) {
                *o = (xi * r) * wi;
            }
        }
    }
}

multiversion! {
    /// Adds this chunk's share of `dw` to `dw_part`; `dn` is scratch of `w.len()`.
    fn backward_chunk(
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        eps: f32,
        dx: &mut [f32],
        dw_part: &mut [f32],
        dn: &mut [f32],
    ) {
        let d = w.len();
        let rows = dx.chunks_exact_mut(d).zip(x.chunks_exact(d).zip(dy.chunks_exact(d)));
        for (dxr, (xr, dyr)) in rows {
            let r = inv_rms(xr, eps);
            for ((((n, acc), &g), &xi), &wi) in dn.iter_mut().zip(dw_part.iter_mut()).zip(dyr).zip(xr).zip(w) {
                *n = g * wi;
                *acc += g * (xi * r);
            }
            // d/dx of x·r: r·dn − x·r³·mean(dn ⊙ x).
            let c = r * r * r * dot(dn, xr) / d as f32;
            for ((o, &n), &xi) in dxr.iter_mut().zip(dn.iter()).zip(xr) {
                *o = r * n - c * xi;
            }
        }
    }
}

/// `y [rows, d] = rms_norm(x [rows, d]) ⊙ w [d]`, `d = w.len()`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let d = w.len();
    assert!(
        x.len() == y.len() && x.len().is_multiple_of(d.max(1)),
        "rms_norm: shapes"
    );
    if d == 0 {
        return;
    }
    let chunk = chunk_rows(d) * d;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| forward_chunk(xc, w, eps, yc));
}

/// Gradients of [`rms_norm`] given `dy`: `dx` (written) and `dw` (written, summed over the
/// rows chunk by chunk in a fixed order).
pub fn rms_norm_backward(
    x: &[f32],
    w: &[f32],
    eps: f32,
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
) {
    let d = w.len();
    assert!(
        x.len() == dy.len() && x.len() == dx.len() && dw.len() == d,
        "rms_norm: shapes"
    );
    dw.fill(0.0);
    if d == 0 {
        return;
    }
    let chunk = chunk_rows(d) * d;
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dxc, (xc, dyc))| {
            let (mut dw_part, mut dn) = (vec![0.0f32; d], vec![0.0f32; d]);
            backward_chunk(xc, dyc, w, eps, dxc, &mut dw_part, &mut dn);
            dw_part
        })
        .collect();
    for part in partials {
        for (acc, p) in dw.iter_mut().zip(part) {
            *acc += p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32)
            .map(|v| v / (1u32 << 24) as f32 * 4.0 - 2.0)
            .collect()
    }

    /// f64 reference: the plain formula.
    fn reference(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
        let d = w.len();
        x.chunks(d)
            .flat_map(|r| {
                let inv = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
                r.iter().zip(w).map(move |(v, wi)| v * inv * wi)
            })
            .collect()
    }

    /// Forward against the f64 formula; gradients against central differences of the
    /// scalar `Σ dy ⊙ y` (over more rows than one chunk, so partial `dw`s are summed).
    #[test]
    fn forward_and_gradients_match_the_formula() {
        let (rows, d, eps) = (1100, 24, 1e-6);
        let (x, w, dy) = (values(rows * d, 1), values(d, 2), values(rows * d, 3));
        let mut y = vec![0.0; rows * d];
        rms_norm(&x, &w, eps as f32, &mut y);
        let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let (x64, w64, dy64) = (f64s(&x), f64s(&w), f64s(&dy));
        for (a, b) in y.iter().zip(reference(&x64, &w64, eps)) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        let (mut dx, mut dw) = (vec![0.0; rows * d], vec![0.0; d]);
        rms_norm_backward(&x, &w, eps as f32, &dy, &mut dx, &mut dw);
        let loss = |x: &[f64], w: &[f64]| -> f64 {
            reference(x, w, eps)
                .iter()
                .zip(&dy64)
                .map(|(a, b)| a * b)
                .sum()
        };
        let h = 1e-6;
        for i in [0, 5, d + 3, rows * d - 1] {
            let (mut xp, mut xm) = (x64.clone(), x64.clone());
            xp[i] += h;
            xm[i] -= h;
            let num = (loss(&xp, &w64) - loss(&xm, &w64)) / (2.0 * h);
            assert!(
                (dx[i] as f64 - num).abs() < 1e-4,
                "dx[{i}] {} vs {num}",
                dx[i]
            );
        }
        for j in [0, 7, d - 1] {
            let (mut wp, mut wm) = (w64.clone(), w64.clone());
            wp[j] += h;
            wm[j] -= h;
            let num = (loss(&x64, &wp) - loss(&x64, &wm)) / (2.0 * h);
            assert!(
                (dw[j] as f64 - num).abs() < 2e-3 * num.abs().max(1.0),
                "dw[{j}] {} vs {num}",
                dw[j]
            );
        }
    }
}
