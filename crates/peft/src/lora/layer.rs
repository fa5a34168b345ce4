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
    /// DoRA's magnitude `m` `[out]` (f32): the layer computes `m ⊙ (W + sBA) / ‖W + sBA‖`,
    /// the norm taken per output row and treated as a constant in the backward (as PEFT does).
    pub magnitude: Option<Var>,
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

    /// `‖W + sBA‖` per output row (f32, detached): DoRA's denominator.
    pub fn weight_norm(&self, weight: &Tensor) -> Result<Tensor> {
        (weight.detach().to_dtype(DType::F32)? + self.delta_weight()?.detach())?
            .sqr()?
            .sum(1)?
            .sqrt()
    }

    /// The weight this layer stands for: `W + sBA`, or DoRA's `m ⊙ (W + sBA) / ‖W + sBA‖`.
    pub fn merged_weight(&self, weight: &Tensor) -> Result<Tensor> {
        let w = (weight.detach().to_dtype(DType::F32)? + self.delta_weight()?.detach())?;
        match &self.magnitude {
            None => Ok(w),
            Some(m) => {
                let scale = (m.as_tensor().detach() / self.weight_norm(weight)?)?;
                w.broadcast_mul(&scale.unsqueeze(1)?)
            }
        }
    }

    /// DoRA's forward (PEFT's `DoraLinearLayer`): with `scale = m / ‖W + sBA‖`,
    /// `scale · (x·Wᵀ + s·lora(x)) + bias`; with dropout in training, the base term keeps
    /// the undropped input: `x·Wᵀ + (scale − 1)·drop(x)·Wᵀ + scale · s·lora(drop(x)) + bias`.
    fn dora_forward(&self, base: &Linear, m: &Var, x: &Tensor, train: bool) -> Result<Tensor> {
        let plain = Linear {
            weight: base.weight.clone(),
            bias: None,
            adapter: None,
        };
        let scale = (param(m.as_tensor()) / self.weight_norm(&base.weight.dense()?)?)?;
        let (a, b) = (param(self.a.as_tensor()), param(self.b.as_tensor()));
        let in_f = base.in_features();
        let rows = x.elem_count() / in_f;
        let dropout = self.dropout(train);
        let xd = match dropout {
            Some(d) => {
                let mask = dropout_mask(d.seed, d.p, &[rows, in_f], x.device())?;
                (x.reshape((rows, in_f))?.to_dtype(DType::F32)? * mask)?
                    .to_dtype(x.dtype())?
                    .reshape(x.shape())?
            }
            None => x.clone(),
        };
        let lora = xd
            .reshape((rows, in_f))?
            .to_dtype(DType::F32)?
            .matmul(&a.t()?)?
            .matmul(&b.t()?)?;
        let lora = (lora * self.scaling)?.reshape(plain.output_shape(x))?;
        let base_d = plain.base_forward(&xd)?.to_dtype(DType::F32)?;
        let mut y = (base_d.broadcast_mul(&scale)? + lora.broadcast_mul(&scale)?)?;
        if dropout.is_some() {
            // Swap the dropped base term for the undropped one.
            let base_x = plain.base_forward(x)?.to_dtype(DType::F32)?;
            y = ((y - base_d)? + base_x)?;
        }
        let y = y.to_dtype(x.dtype())?;
        match &base.bias {
            Some(bias) => y.broadcast_add(&param(bias)),
            None => Ok(y),
        }
    }

    fn dropout(&self, train: bool) -> Option<Dropout> {
        (train && self.dropout > 0.0).then(|| Dropout {
            p: self.dropout,
            seed: self.dropout_seed.get() ^ self.layer_id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        })
    }
}

impl LinearAdapter for LoraLayer {
    fn low_rank(&self, train: bool) -> Option<(Tensor, Tensor, f64)> {
        if self.magnitude.is_some() || self.dropout(train).is_some() {
            return None;
        }
        let (a, b) = (param(self.a.as_tensor()), param(self.b.as_tensor()));
        Some((a, b, self.scaling))
    }

    fn forward(&self, base: &Linear, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(m) = &self.magnitude {
            return self.dora_forward(base, m, x, train);
        }
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
