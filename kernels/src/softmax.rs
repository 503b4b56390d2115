//! Softmax over the rows of a dense `[rows, width]` matrix, and its backward.

use rayon::prelude::*;

use crate::{chunk_rows, exp, rms_norm::dot};

multiversion! {
    fn forward_chunk(x: &[f32], width: usize, y: &mut [f32]) {
        for (yr, xr) in y.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
            let max = xr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = exp(v - max);
            }
            let inv = 1.0 / yr.iter().sum::<f32>();
            yr.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

multiversion! {
    fn backward_chunk(y: &[f32], dy: &[f32], width: usize, dx: &mut [f32]) {
        let rows = dx.chunks_exact_mut(width).zip(y.chunks_exact(width).zip(dy.chunks_exact(width)));
        for (dxr, (yr, dyr)) in rows {
            let s = dot(yr, dyr);
            for ((o, &p), &d) in dxr.iter_mut().zip(yr).zip(dyr) {
                *o = p * (d - s);
            }
        }
    }
}

/// `y = softmax(x)` per row (`x` may hold `-inf`; a row of only `-inf` gives NaN, as torch).
pub fn softmax_rows(x: &[f32], width: usize, y: &mut [f32]) {
    assert!(
        x.len() == y.len() && x.len().is_multiple_of(width.max(1)),
        "softmax: shapes"
    );
    if width == 0 {
        return;
    }
    let chunk = chunk_rows(width) * width;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| forward_chunk(xc, width, yc));
}

/// `dx = y ⊙ (dy − Σ y ⊙ dy)` per row, given the softmax output `y`.
pub fn softmax_backward_rows(y: &[f32], dy: &[f32], width: usize, dx: &mut [f32]) {
    assert!(
        y.len() == dy.len() && y.len() == dx.len(),
        "softmax: shapes"
    );
    if width == 0 {
        return;
    }
    let chunk = chunk_rows(width) * width;
    dx.par_chunks_mut(chunk)
        .zip(y.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .for_each(|(dxc, (yc, dyc))| backward_chunk(yc, dyc, width, dxc));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_formula_with_masked_entries() {
        let width = 11;
        let mut x: Vec<f32> = (0..5 * width)
            .map(|i| ((i * 29 % 47) as f32 - 23.0) / 5.0)
            .collect();
        x[3] = f32::NEG_INFINITY;
        x[width + 10] = f32::NEG_INFINITY;
        let dy: Vec<f32> = (0..5 * width)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0)
            .collect();
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        softmax_rows(&x, width, &mut y);
        softmax_backward_rows(&y, &dy, width, &mut dx);
        for r in 0..5 {
            let row = &x[r * width..(r + 1) * width];
            let max = row
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, |m, v| m.max(v as f64));
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|v| v / sum).collect();
            let s: f64 = (0..width).map(|j| p[j] * dy[r * width + j] as f64).sum();
            for (j, pj) in p.iter().enumerate() {
                let k = r * width + j;
                assert!((y[k] as f64 - pj).abs() < 1e-6, "y {k}");
                assert!(
                    (dx[k] as f64 - pj * (dy[k] as f64 - s)).abs() < 1e-5,
                    "dx {k}"
                );
            }
        }
        assert_eq!(y[3], 0.0);
        assert_eq!(dx[3], 0.0);
    }
}
