//! Softmax over the rows of a dense `[rows, width]` matrix, and its backward.

use rayon::prelude::*;

use crate::{chunk_rows, exp, rms_norm::dot};

/// The additive mask rows of an attention block: row `i` of batch `b` is
/// `data[offset + b·batch_stride + i·row_stride ..][..width]`, shared by every head.
#[derive(Clone, Copy, Debug)]
pub struct MaskRows<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub batch_stride: usize,
    pub row_stride: usize,
    /// Query rows per head (the mask's rows per batch).
    pub rows: usize,
    /// Heads per batch sharing the mask.
    pub heads: usize,
}

impl MaskRows<'_> {
    fn row(&self, score_row: usize, width: usize) -> &[f32] {
        let per_batch = self.rows * self.heads;
        let (b, i) = (score_row / per_batch, score_row % self.rows);
        let start = self.offset + b * self.batch_stride + i * self.row_stride;
        &self.data[start..start + width]
    }
}

/// The largest value (`-inf` for none), in eight lanes so that it vectorises.
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    for c in chunks {
        for l in 0..8 {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    lanes.iter().fold(tail, |a, &v| a.max(v))
}

/// `Σ x` in eight lanes.
#[inline(always)]
fn sum_of(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            lanes[l] += c[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

multiversion! {
    /// Rows `first..` of `softmax(x·scale + mask)`, as many as `y` holds.
    fn forward_chunk(x: &[f32], width: usize, scale: f32, mask: MaskRows, first: usize, y: &mut [f32]) {
        for (i, (yr, xr)) in y.chunks_exact_mut(width).zip(x.chunks_exact(width)).enumerate() {
            let m = mask.row(first + i, width);
            for ((o, &v), &mv) in yr.iter_mut().zip(xr).zip(m) {
                *o = v * scale + mv;
            }
            let max = max_of(yr);
            for o in yr.iter_mut() {
                *o = exp(*o - max);
            }
            let inv = 1.0 / sum_of(yr);
            yr.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

multiversion! {
    fn backward_chunk(y: &[f32], dy: &[f32], width: usize, scale: f32, dx: &mut [f32]) {
        let rows = dx.chunks_exact_mut(width).zip(y.chunks_exact(width).zip(dy.chunks_exact(width)));
        for (dxr, (yr, dyr)) in rows {
            let s = dot(yr, dyr);
            for ((o, &p), &d) in dxr.iter_mut().zip(yr).zip(dyr) {
                *o = (p * (d - s)) * scale;
            }
        }
    }
}

/// `y = softmax(x·scale + mask)` per row of `x [rows, width]` (the mask may hold `-inf`; a
/// row blocked everywhere gives NaN, as torch).
pub fn masked_softmax_rows(x: &[f32], width: usize, scale: f32, mask: MaskRows, y: &mut [f32]) {
    assert!(
        x.len() == y.len() && x.len().is_multiple_of(width.max(1)),
        "softmax: shapes"
    );
    if width == 0 {
        return;
    }
    let chunk = chunk_rows(width);
    y.par_chunks_mut(chunk * width)
        .zip(x.par_chunks(chunk * width))
        .enumerate()
        .for_each(|(c, (yc, xc))| forward_chunk(xc, width, scale, mask, c * chunk, yc));
}

/// The gradient of the softmax input times `scale`: `dx = (y ⊙ (dy − Σ y ⊙ dy))·scale` per
/// row, given the softmax output `y`.
pub fn softmax_backward_rows(y: &[f32], dy: &[f32], width: usize, scale: f32, dx: &mut [f32]) {
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
        .for_each(|(dxc, (yc, dyc))| backward_chunk(yc, dyc, width, scale, dxc));
}

multiversion! {
    fn exp_sum_chunk(x: &[f32], width: usize, max: &[f32], out: &mut [f32]) {
        for ((o, xr), &m) in out.iter_mut().zip(x.chunks_exact(width)).zip(max) {
            let mut lanes = [0.0f32; 8];
            let chunks = xr.chunks_exact(8);
            let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - m)).sum();
            for c in chunks {
                for l in 0..8 {
                    lanes[l] += exp(c[l] - m);
                }
            }
            *o = lanes.iter().sum::<f32>() + tail;
        }
    }
}

multiversion! {
    fn exp_sum_backward_chunk(x: &[f32], width: usize, max: &[f32], g: &[f32], dx: &mut [f32]) {
        let rows = dx.chunks_exact_mut(width).zip(x.chunks_exact(width)).zip(max.iter().zip(g));
        for ((dxr, xr), (&m, &gi)) in rows {
            for (o, &v) in dxr.iter_mut().zip(xr) {
                *o = exp(v - m) * gi;
            }
        }
    }
}

/// `out[i] = Σ_j exp(x[i, j] − max[i])` over the rows of `x [rows, width]` (the sum inside a
/// log-sum-exp, without keeping the exponentials).
pub fn exp_sum_rows(x: &[f32], width: usize, max: &[f32], out: &mut [f32]) {
    assert!(
        x.len() == out.len() * width && max.len() == out.len(),
        "exp_sum_rows: shapes"
    );
    if width == 0 {
        out.fill(0.0);
        return;
    }
    let chunk = chunk_rows(width);
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk * width).zip(max.par_chunks(chunk)))
        .for_each(|(oc, (xc, mc))| exp_sum_chunk(xc, width, mc, oc));
}

/// The gradient of [`exp_sum_rows`] given `g [rows]`: `dx[i, j] = g[i] · exp(x[i, j] − max[i])`
/// (`max` held constant, as the detached max of a log-sum-exp is).
pub fn exp_sum_rows_backward(x: &[f32], width: usize, max: &[f32], g: &[f32], dx: &mut [f32]) {
    assert!(x.len() == dx.len() && x.len() == g.len() * width && max.len() == g.len());
    if width == 0 {
        return;
    }
    let chunk = chunk_rows(width);
    dx.par_chunks_mut(chunk * width)
        .zip(x.par_chunks(chunk * width))
        .zip(max.par_chunks(chunk).zip(g.par_chunks(chunk)))
        .for_each(|((dxc, xc), (mc, gc))| exp_sum_backward_chunk(xc, width, mc, gc, dxc));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two batches of two heads of three query rows over 11 keys; the mask blocks some keys.
    #[test]
    fn matches_the_formula_with_a_shared_mask() {
        let (width, heads, rows, batches, scale) = (11, 2, 3, 2, 0.7f32);
        let n = batches * heads * rows * width;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 29 % 47) as f32 - 23.0) / 5.0)
            .collect();
        let mut mask = vec![0.0f32; batches * rows * width];
        mask[3] = f32::NEG_INFINITY;
        mask[rows * width + width + 10] = f32::NEG_INFINITY;
        let m = MaskRows {
            data: &mask,
            offset: 0,
            batch_stride: rows * width,
            row_stride: width,
            rows,
            heads,
        };
        let dy: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
        let (mut y, mut dx) = (vec![0.0; n], vec![0.0; n]);
        masked_softmax_rows(&x, width, scale, m, &mut y);
        softmax_backward_rows(&y, &dy, width, scale, &mut dx);
        for r in 0..n / width {
            let mrow = m.row(r, width);
            let row: Vec<f64> = (0..width)
                .map(|j| x[r * width + j] as f64 * scale as f64 + mrow[j] as f64)
                .collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row.iter().map(|&v| (v - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|v| v / sum).collect();
            let s: f64 = (0..width).map(|j| p[j] * dy[r * width + j] as f64).sum();
            for (j, pj) in p.iter().enumerate() {
                let k = r * width + j;
                assert!((y[k] as f64 - pj).abs() < 1e-6, "y {k}");
                let want = pj * (dy[k] as f64 - s) * scale as f64;
                assert!((dx[k] as f64 - want).abs() < 1e-5, "dx {k}");
            }
        }
        // Row 0 of batch 0 blocks key 3 in both heads; batch 1 row 1 blocks key 10.
        assert_eq!(y[3], 0.0);
        assert_eq!(y[rows * width + 3], 0.0);
        let b1 = heads * rows * width;
        assert_eq!(y[b1 + width + 10], 0.0);
        assert_eq!(y[b1 + rows * width + width + 10], 0.0);
    }

    #[test]
    fn exp_sums_and_their_gradient_match_the_formula() {
        let (rows, width) = (300, 37);
        let x: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 6.0)
            .collect();
        let max: Vec<f32> = x
            .chunks(width)
            .map(|r| r.iter().cloned().fold(f32::MIN, f32::max))
            .collect();
        let g: Vec<f32> = (0..rows).map(|i| (i % 7) as f32 - 3.0).collect();
        let (mut out, mut dx) = (vec![0.0; rows], vec![0.0; rows * width]);
        exp_sum_rows(&x, width, &max, &mut out);
        exp_sum_rows_backward(&x, width, &max, &g, &mut dx);
        for r in 0..rows {
            let e: Vec<f64> = (0..width)
                .map(|j| (x[r * width + j] as f64 - max[r] as f64).exp())
                .collect();
            let want: f64 = e.iter().sum();
            assert!((out[r] as f64 - want).abs() < 1e-5 * want, "row {r}");
            for (j, ej) in e.iter().enumerate() {
                let k = r * width + j;
                assert!((dx[k] as f64 - ej * g[r] as f64).abs() < 1e-5, "dx {k}");
            }
        }
    }
}
