use candle_core::{DType, Result, Tensor, Var};
use peft_models::{Linear, LinearAdapter};
use peft_ops::{dropout_mask, lora_linear, param, Dropout, LinearWeight};
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

    fn dropout(&self, train: bool) -> Option<Dropout> {
        (train && self.dropout > 0.0).then(|| Dropout {
            p: self.dropout,
            seed: self.dropout_seed.get() ^ self.layer_id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        })
    }
}

impl LinearAdapter for LoraLayer {
    fn forward(&self, base: &Linear, x: &Tensor, train: bool) -> Result<Tensor> {
        let (a, b) = (param(self.a.as_tensor()), param(self.b.as_tensor()));
        let w = match &base.weight {
            LinearWeight::Dense(t) => LinearWeight::Dense(param(t)),
            q => q.clone(),
        };
        let bias = base.bias.as_ref().map(param);
        let dropout = self.dropout(train);
        let w_trains = matches!(&w, LinearWeight::Dense(t) if t.track_op());
        if !w_trains && !bias.as_ref().is_some_and(Tensor::track_op) {
            return lora_linear(x, &w, bias.as_ref(), &a, &b, self.scaling, dropout);
        }
        // A trainable base weight or bias (bias="all", full fine-tuning): composed ops.
        let y = base.base_forward(x)?;
        let in_f = base.in_features();
        let rows = x.elem_count() / in_f;
        let mut xa = x.reshape((rows, in_f))?.to_dtype(DType::F32)?;
        if let Some(d) = dropout {
            xa = (&xa * dropout_mask(d.seed, d.p, &[rows, in_f], x.device())?)?;
        }
        let delta = xa.matmul(&a.t()?)?.matmul(&b.t()?)?;
        let delta = (delta * self.scaling)?
            .to_dtype(y.dtype())?
            .reshape(y.shape())?;
        y + delta
    }
}
