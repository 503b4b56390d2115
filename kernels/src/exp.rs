//! `exp` on f32 without a libm call, so that loops over it vectorise (glibc's `expf` is a
//! scalar call per element). Cody–Waite range reduction `x = n·ln2 + r`, Cephes' degree-7
//! polynomial for `e^r` on |r| ≤ ln2/2, and `2^n` built in the exponent bits: within 2 ulp
//! of the correctly rounded value over the normal range.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this e^x < 2.6e-38, the smallest normals; the result is 0 there.
const MIN: f32 = -86.6;
const MAX: f32 = 88.722_83;
const ROUNDER: f32 = 12_582_912.0;

/// `e^x`; `0` below −86.6 (where it would be ≤ 2.6e-38), `inf` above 88.7, `NaN` for
/// `NaN`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(MIN, MAX);
    // Round to nearest by adding and removing 1.5·2²³ (`round` is a libm call without
    // SSE4.1); the sum's low mantissa bits are then n itself, read as an integer without a
    // float-to-int conversion (Rust's saturating `as` keeps loops scalar). Wrapping integer
    // ops: an overflow check's branch would too (n is within ±128).
    let t = xc * LOG2E + ROUNDER;
    let n = t - ROUNDER;
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    // Plain products and sums, not `mul_add`: without FMA in the compile target that is a
    // libm call. n·LN2_HI is exact (LN2_HI has 11 significant bits).
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Cephes' expf minimax polynomial: e^r ≈ 1 + r + r²·P(r).
    let mut p: f32 = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let p = p * (r * r) + r + 1.0;
    // 2^(n−1)·2, so that n = 128 (x near the top of the range) stays finite until the end.
    let scale = f32::from_bits((n_int.wrapping_add(126) as u32) << 23);
    let y = p * scale * 2.0;
    let y = if x > MAX { f32::INFINITY } else { y };
    let y = if x < MIN { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::exp;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn is_within_two_ulp_of_the_correctly_rounded_exp() {
        let mut worst = 0;
        let mut x = -86.5f32;
        while x < 88.5 {
            let exact = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp(x), exact));
            x += 0.000_37;
        }
        for x in [88.5f32, 88.7, 1e-8, -1e-8] {
            worst = worst.max(ulps(exp(x), (x as f64).exp() as f32));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn handles_the_ends_of_the_range() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }
}
