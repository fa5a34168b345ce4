use candle_core::{DType, Result, Tensor, Var};
use peft_models::{Linear, LinearAdapter};
use peft_ops::param;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Seed of the dropout masks of the current micro-step, shared by all layers of a model: each
/// mask is a pure function of (seed, layer), so a resumed run draws the same masks.
#[derive(Debug, Default)]
pub struct DropoutSeed(AtomicU64);

impl DropoutSeed {
    pub fn set(&self, seed: u64) {
        self.0.store(seed, Ordering::Relaxed)
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The trainable low-rank pair of one linear layer. A: `[r, in]`, B: `[out, r]`, both f32.
pub struct LoraLayer {
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
    pub dropout: f64,
    pub layer_id: u64,
    pub dropout_seed: Arc<DropoutSeed>,
}

impl LoraLayer {
    /// `B A · scaling`, shaped like the base weight.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling
    }

    fn dropout_mask(&self, x: &Tensor) -> Result<Tensor> {
        let keep = 1.0 - self.dropout;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(
            self.dropout_seed.get() ^ self.layer_id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f64>() < keep {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(mask, x.shape(), x.device())
    }
}

impl LinearAdapter for LoraLayer {
    fn forward(&self, base: &Linear, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = base.base_forward(x)?;
        let in_f = base.in_features();
        let rows = x.elem_count() / in_f;
        let mut xa = x.reshape((rows, in_f))?.to_dtype(DType::F32)?;
        if train && self.dropout > 0.0 {
            xa = (&xa * self.dropout_mask(&xa)?)?;
        }
        let (a, b) = (param(self.a.as_tensor()), param(self.b.as_tensor()));
        let delta = xa.matmul(&a.t()?)?.matmul(&b.t()?)?;
        let delta = (delta * self.scaling)?
            .to_dtype(y.dtype())?
            .reshape(y.shape())?;
        y + delta
    }
}
