//! `e^x` over slices of f32, vectorized: the CPU kernels' softmax, loss and SiLU spend their
//! non-matmul time there. A branch-free polynomial (Cephes' `expf`: Cody–Waite reduction by
//! ln 2, degree-6 polynomial, relative error under 2e-7) that loops compile to AVX-512 or AVX2
//! where the CPU has them, picked at run time as the dropout masks are.

/// `x ↦ e^x` in place.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { exp_avx512(xs) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { exp_avx2(xs) };
        }
    }
    exp_loop(xs)
}

/// `x ↦ e^x` in place, returning `Σ x·e^x` (the loss's entropy term), summed in f64 lanes.
pub(crate) fn exp_in_place_moment(xs: &mut [f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { exp_moment_avx512(xs) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { exp_moment_avx2(xs) };
        }
    }
    exp_moment_loop(xs)
}

#[inline(always)]
fn exp_moment_loop(xs: &mut [f32]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (x, a) in chunk.iter_mut().zip(&mut acc) {
            let e = exp(*x);
            // 0, not NaN, for x = −∞ (a masked logit).
            *a += if e > 0.0 { (*x * e) as f64 } else { 0.0 };
            *x = e;
        }
    }
    let mut tail = 0f64;
    for x in chunks.into_remainder() {
        let e = exp(*x);
        tail += if e > 0.0 { (*x * e) as f64 } else { 0.0 };
        *x = e;
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_moment_avx512(xs: &mut [f32]) -> f64 {
    exp_moment_loop(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_moment_avx2(xs: &mut [f32]) -> f64 {
    exp_moment_loop(xs)
}

#[inline(always)]
fn exp_loop(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(xs: &mut [f32]) {
    exp_loop(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(xs: &mut [f32]) {
    exp_loop(xs)
}

/// `e^x`: 0 below -87.3 (where f32 stops being normal), +inf above 88.3 (a little early: the
/// largest f32 is e^88.72).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2^23 rounds to the nearest integer (ties to even) without a branch.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.3, 88.3);
    let t = clamped * LOG2E + ROUND;
    let n = t - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n by the exponent bits (n within [-126, 127]), n read from t's low mantissa bits: a
    // float-to-int cast would not vectorize.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    let y = y * scale;
    if x < -87.3 {
        0.0
    } else if x > 88.3 {
        f32::INFINITY
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 2e-7 relative of f64's exp over the range softmax, loss and SiLU use, 0 and
    /// infinity at the ends, and the same through every dispatch path.
    #[test]
    fn matches_f64_exp() {
        let mut xs: Vec<f32> = (0..200_001).map(|i| -100.0 + i as f32 * 0.001).collect();
        xs.extend([
            f32::NEG_INFINITY,
            -1e30,
            -87.3,
            0.0,
            -0.0,
            88.0,
            88.3,
            89.0,
            1e30,
            f32::INFINITY,
        ]);
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        let mut scalar = xs.clone();
        exp_loop(&mut scalar);
        for ((&x, &y), &s) in xs.iter().zip(&ys).zip(&scalar) {
            assert_eq!(y.to_bits(), s.to_bits(), "dispatch differs at {x}");
            let want = (x as f64).exp();
            if x < -87.3 {
                assert_eq!(y, 0.0, "{x}");
            } else if x > 88.3 {
                assert_eq!(y, f32::INFINITY, "{x}");
            } else {
                let rel = ((y as f64 - want) / want).abs();
                assert!(rel < 2e-7, "exp({x}) = {y}, want {want} ({rel:e})");
            }
        }
    }

    /// The moment's exponentials are `exp_in_place`'s and `Σ x·e^x` is their sum, with 0 for
    /// −∞ (shifted logits are at most 0).
    #[test]
    fn moment_sums_x_times_exp() {
        let mut xs: Vec<f32> = (0..100_003).map(|i| -100.0 + i as f32 * 0.001).collect();
        xs.push(f32::NEG_INFINITY);
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        let mut with_moment = xs.clone();
        let moment = exp_in_place_moment(&mut with_moment);
        assert_eq!(with_moment, ys);
        let want: f64 = xs
            .iter()
            .zip(&ys)
            .filter(|(_, &y)| y > 0.0)
            .map(|(&x, &y)| (x * y) as f64)
            .sum();
        assert!(
            (moment - want).abs() <= 1e-9 * want.abs(),
            "{moment} vs {want}"
        );
        assert!(want < -1.0);
    }
}
