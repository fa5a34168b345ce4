//! Shared by the op tests that compare against an f32 reference.

use candle_core::{Device, Tensor};

/// f32 values uniform in [-1, 1), the same for the same seed.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest magnitude in `t` (f32).
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// RoPE tables `[t, d / 2]` (cos, sin) with HF's default base.
#[allow(dead_code)] // not every test binary rotates
pub fn rope_tables(t: usize, d: usize) -> (Tensor, Tensor) {
    let half = d / 2;
    let angles: Vec<f32> = (0..t)
        .flat_map(|p| (0..half).map(move |i| p as f32 / 10_000f32.powf(2.0 * i as f32 / d as f32)))
        .collect();
    let a = Tensor::from_vec(angles, (t, half), &Device::Cpu).unwrap();
    (a.cos().unwrap(), a.sin().unwrap())
}
