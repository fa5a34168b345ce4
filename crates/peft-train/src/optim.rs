//! AdamW with PyTorch's semantics (decoupled weight decay, bias correction) and global-norm
//! gradient clipping.

use candle_core::{backprop::GradStore, Result, Tensor, Var};

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
}

impl AdamW {
    pub fn new(
        params: Vec<Var>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let m = params
            .iter()
            .map(|p| p.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            params,
            m,
            v,
            step: 0,
        })
    }

    pub fn params(&self) -> &[Var] {
        &self.params
    }

    /// Steps taken and the first and second moments, one per parameter (for checkpoints).
    pub fn state(&self) -> (usize, &[Tensor], &[Tensor]) {
        (self.step, &self.m, &self.v)
    }

    /// Restores what [`AdamW::state`] returned; shapes must match the parameters.
    pub fn set_state(&mut self, step: usize, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<()> {
        if m.len() != self.params.len() || v.len() != self.params.len() {
            candle_core::bail!(
                "optimizer state has {} tensors for {} parameters",
                m.len(),
                self.params.len()
            );
        }
        for ((p, m), v) in self.params.iter().zip(&m).zip(&v) {
            if m.dims() != p.dims() || v.dims() != p.dims() {
                candle_core::bail!(
                    "optimizer state shape {:?} does not fit parameter {:?}",
                    m.dims(),
                    p.dims()
                );
            }
        }
        self.step = step;
        self.m = m;
        self.v = v;
        Ok(())
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(p.dtype())?;
            let m = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let decayed = (p.as_tensor() * (1.0 - lr * self.weight_decay))?;
            p.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Global L2 norm of the gradients of `params`. The squares are summed on the device and read
/// back once: one host synchronisation per step, not one per tensor.
pub fn grad_norm(grads: &GradStore, params: &[Var]) -> Result<f64> {
    let mut sum: Option<Tensor> = None;
    for p in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            let sq = g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?;
            sum = Some(match sum {
                Some(s) => (s + sq)?,
                None => sq,
            });
        }
    }
    match sum {
        Some(s) => Ok(s.to_scalar::<f64>()?.sqrt()),
        None => Ok(0.0),
    }
}

/// Scales gradients so that their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, params)?;
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for p in params {
            if let Some(g) = grads.remove(p.as_tensor()) {
                grads.insert(p.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One step of AdamW against values computed by hand from PyTorch's update rule.
    #[test]
    fn matches_pytorch_rule() {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let loss = (p.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let grads = loss.backward().unwrap();
        let mut opt = AdamW::new(vec![p.clone()], 0.9, 0.999, 1e-8, 0.01).unwrap();
        opt.step(&grads, 0.1).unwrap();
        // First step: m̂ = g, v̂ = g², update = g/(|g|+eps) = sign(g).
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        let expected = [
            1.0 * (1.0 - 0.1 * 0.01) - 0.1,
            -2.0 * (1.0 - 0.1 * 0.01) + 0.1,
        ];
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let p = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let loss = (p.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let mut grads = loss.backward().unwrap();
        let norm = clip_grad_norm(&mut grads, std::slice::from_ref(&p), 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let after = grad_norm(&grads, &[p]).unwrap();
        assert!((after - 1.0).abs() < 1e-5);
    }
}
