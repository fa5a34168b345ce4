//! Random values from a counter-based stream, drawn where the tensor lives: the random-weight
//! models of `peft bench --shape` take seconds to build on a GPU instead of minutes on the host
//! (8B values), and NEFTune's noise is drawn beside the embeddings it perturbs.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// `shape` values of N(0, std²) in `dtype` on `device`, from the stream (`seed`, `stream`):
/// element `i` is Box-Muller of two splitmix64 draws of its index, so the values do not depend
/// on the thread count. On CUDA a kernel draws them there, the same up to the last bit of its
/// f64 logarithm and cosine.
pub fn random_normal(
    seed: u64,
    stream: u64,
    shape: &[usize],
    std: f32,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    random_values(seed, stream, shape, Draw::Normal { std }, dtype, device)
}

/// `shape` values uniform in [`low`, `high`) in `dtype` on `device`, from the stream (`seed`,
/// `stream`): element `i` is `low + (high - low) u` with `u` the splitmix64 draw `i + 1` of
/// its index, in f64. On CUDA a kernel draws them there, the same bits.
pub fn random_uniform(
    seed: u64,
    stream: u64,
    shape: &[usize],
    (low, high): (f32, f32),
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    random_values(
        seed,
        stream,
        shape,
        Draw::Uniform { low, high },
        dtype,
        device,
    )
}

/// What a random-values kernel draws.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Draw {
    Normal { std: f32 },
    Uniform { low: f32, high: f32 },
}

impl Draw {
    /// Element `i` of the stream `key`.
    fn value(self, key: u64, i: u64) -> f32 {
        match self {
            Self::Normal { std } => normal_at(key, i, std),
            Self::Uniform { low, high } => uniform_at(key, i, low, high),
        }
    }
}

fn random_values(
    seed: u64,
    stream: u64,
    shape: &[usize],
    draw: Draw,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let key = stream_key(seed, stream);
    #[cfg(feature = "cuda")]
    if device.is_cuda() && matches!(dtype, DType::F32 | DType::BF16) {
        return crate::cuda::random_values(key, draw, shape, dtype, device);
    }
    drawn_on_cpu(shape, dtype, device, |i| draw.value(key, i as u64))
}

/// Values `value(i)` drawn on the host in parallel (bf16: the f32 values rounded), then moved
/// to `device`.
fn drawn_on_cpu(
    shape: &[usize],
    dtype: DType,
    device: &Device,
    value: impl Fn(usize) -> f32 + Sync + Send,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let t = if dtype == DType::BF16 {
        let v: Vec<half::bf16> = (0..n)
            .into_par_iter()
            .map(|i| half::bf16::from_f32(value(i)))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)?
    } else {
        let v: Vec<f32> = (0..n).into_par_iter().map(value).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?
    };
    t.to_device(device)
}

/// The key of stream (`seed`, `stream`).
fn stream_key(seed: u64, stream: u64) -> u64 {
    seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// A uniform value in [0, 1) from draw `i` of `key` (splitmix64; `splitmix_uniform` in
/// kernels/ops.cu).
fn uniform(key: u64, i: u64) -> f64 {
    let mut z = key.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

/// Element `i`: `low + (high - low)` times draw `i + 1`.
fn uniform_at(key: u64, i: u64, low: f32, high: f32) -> f32 {
    (low as f64 + (high as f64 - low as f64) * uniform(key, i + 1)) as f32
}

/// Element `i`: Box-Muller of draws `2i + 1` and `2i + 2`.
fn normal_at(key: u64, i: u64, std: f32) -> f32 {
    let (u1, u2) = (uniform(key, 2 * i + 1).max(1e-300), uniform(key, 2 * i + 2));
    let r = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (r * std as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_standard_normal_in_any_dtype() {
        let t = random_normal(3, 1, &[100_000], 0.5, DType::F32, &Device::Cpu).unwrap();
        let v: Vec<f32> = t.to_vec1().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var.sqrt() - 0.5).abs() < 0.01,
            "{mean} {var}"
        );
        let b = random_normal(3, 1, &[100_000], 0.5, DType::BF16, &Device::Cpu).unwrap();
        let rounded = t.to_dtype(DType::BF16).unwrap();
        let diff = (b.to_dtype(DType::F32).unwrap() - rounded.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "bf16 values are the f32 values rounded");
        let other = random_normal(3, 2, &[4], 0.5, DType::F32, &Device::Cpu).unwrap();
        assert_ne!(other.to_vec1::<f32>().unwrap(), v[..4].to_vec());
    }

    #[test]
    fn draws_uniform_values_in_range() {
        let t = random_uniform(5, 1, &[100_000], (-0.25, 0.25), DType::F32, &Device::Cpu);
        let v: Vec<f32> = t.unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| (-0.25..0.25).contains(x)));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        // Uniform on [-a, a): variance a²/3.
        assert!(
            mean.abs() < 0.003 && (var - 0.0625 / 3.0).abs() < 5e-4,
            "{mean} {var}"
        );
        let again = random_uniform(5, 1, &[8], (-0.25, 0.25), DType::F32, &Device::Cpu);
        assert_eq!(again.unwrap().to_vec1::<f32>().unwrap(), v[..8].to_vec());
    }
}
