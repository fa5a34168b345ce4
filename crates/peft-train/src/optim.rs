//! AdamW with PyTorch's semantics (decoupled weight decay, bias correction) and global-norm
//! gradient clipping.

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use peft_quant::{
    dequantize_blockwise, dynamic_map, quantize_blockwise, Blockwise8, BLOCKSIZE_8BIT,
};
use std::collections::HashMap;

/// How AdamW keeps its moments.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum OptimKind {
    /// f32 moments (also bitsandbytes' paged 32-bit AdamW of QLoRA recipes: its paging is
    /// of no use here, see `PagedAdamw8bit`).
    #[default]
    #[value(
        name = "adamw",
        aliases = ["adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "paged_adamw"]
    )]
    #[serde(
        alias = "adamw_torch",
        alias = "adamw_torch_fused",
        alias = "paged_adamw_32bit",
        alias = "paged_adamw"
    )]
    Adamw,
    /// bitsandbytes' 8-bit AdamW: both moments in 8-bit blocks of 256 (signed dynamic map for
    /// the first, unsigned for the second); tensors under 4096 elements keep f32 moments.
    #[value(name = "adamw_8bit", alias = "adamw_bnb_8bit")]
    #[serde(rename = "adamw_8bit", alias = "adamw_bnb_8bit")]
    Adamw8bit,
    /// 8-bit AdamW whose state bitsandbytes may page to host memory under pressure; ours stays
    /// on the parameters' device (a quarter of f32 moments of the adapter, small next to the
    /// model), so this is the same as `adamw_8bit`.
    #[value(name = "paged_adamw_8bit")]
    #[serde(rename = "paged_adamw_8bit")]
    PagedAdamw8bit,
}

/// Tensors with fewer elements keep f32 moments in 8-bit AdamW (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// The moments of one parameter, on its device.
enum Moments {
    /// In the parameter's dtype.
    Dense {
        m: Tensor,
        v: Tensor,
    },
    Q8 {
        m: Q8State,
        v: Q8State,
    },
}

/// One 8-bit moment: a u8 code per element and an f32 scale per block of 256.
struct Q8State {
    codes: Tensor,
    absmax: Tensor,
}

impl Q8State {
    fn zeros(n: usize, device: &Device) -> Result<Self> {
        // Code 0 of an all-zero block dequantizes to 0 whatever the map says.
        Ok(Self {
            codes: Tensor::zeros(n, DType::U8, device)?,
            absmax: Tensor::zeros(n.div_ceil(BLOCKSIZE_8BIT), DType::F32, device)?,
        })
    }

    fn to_host(&self) -> Result<Blockwise8> {
        Ok(Blockwise8 {
            codes: self.codes.flatten_all()?.to_vec1()?,
            absmax: self.absmax.to_vec1()?,
            blocksize: BLOCKSIZE_8BIT,
        })
    }

    fn from_host(q: &Blockwise8, device: &Device) -> Result<Self> {
        Ok(Self {
            codes: Tensor::from_slice(&q.codes, q.codes.len(), device)?,
            absmax: Tensor::from_slice(&q.absmax, q.absmax.len(), device)?,
        })
    }

    fn bytes(&self) -> usize {
        self.codes.elem_count() + 4 * self.absmax.elem_count()
    }
}

/// How one parameter is updated besides the shared settings: its learning rate as a multiple
/// of the scheduled one (LoRA+ raises B's), and whether weight decay applies (transformers
/// exempts biases and norms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamGroup {
    pub lr_scale: f64,
    pub decay: bool,
}

impl Default for ParamGroup {
    fn default() -> Self {
        Self {
            lr_scale: 1.0,
            decay: true,
        }
    }
}

impl ParamGroup {
    /// transformers' Trainer (`get_decay_parameter_names`): no weight decay for a parameter
    /// whose name names a bias or a norm.
    pub fn decays(name: &str) -> bool {
        let name = name.to_lowercase();
        let segment_is_norm = name.split('.').any(|s| s == "norm" || s.ends_with("_norm"));
        !(name.contains("bias")
            || name.contains("layernorm")
            || name.contains("rmsnorm")
            || segment_is_norm)
    }
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    params: Vec<Var>,
    /// Per parameter, an index into `group_list`.
    groups: Vec<usize>,
    group_list: Vec<ParamGroup>,
    moments: Vec<Moments>,
    step: usize,
    signed_map: [f32; 256],
    unsigned_map: [f32; 256],
}

impl AdamW {
    pub fn new(
        params: Vec<Var>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        Self::with_kind(params, beta1, beta2, eps, weight_decay, OptimKind::Adamw)
    }

    pub fn with_kind(
        params: Vec<Var>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        kind: OptimKind,
    ) -> Result<Self> {
        let moments = params
            .iter()
            .map(|p| {
                let n = p.elem_count();
                Ok(if kind != OptimKind::Adamw && n >= MIN_8BIT_SIZE {
                    Moments::Q8 {
                        m: Q8State::zeros(n, p.device())?,
                        v: Q8State::zeros(n, p.device())?,
                    }
                } else {
                    Moments::Dense {
                        m: p.zeros_like()?,
                        v: p.zeros_like()?,
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            groups: vec![0; params.len()],
            group_list: vec![ParamGroup::default()],
            params,
            moments,
            step: 0,
            signed_map: dynamic_map(true),
            unsigned_map: dynamic_map(false),
        })
    }

    pub fn params(&self) -> &[Var] {
        &self.params
    }

    /// Gives each parameter its group (one per parameter, in order).
    pub fn set_groups(&mut self, groups: &[ParamGroup]) -> Result<()> {
        if groups.len() != self.params.len() {
            candle_core::bail!(
                "{} parameter groups for {} parameters",
                groups.len(),
                self.params.len()
            );
        }
        self.group_list.clear();
        self.groups.clear();
        for g in groups {
            let index = match self.group_list.iter().position(|known| known == g) {
                Some(i) => i,
                None => {
                    self.group_list.push(*g);
                    self.group_list.len() - 1
                }
            };
            self.groups.push(index);
        }
        Ok(())
    }

    /// Bytes held by the moments.
    pub fn state_bytes(&self) -> usize {
        self.moments
            .iter()
            .map(|m| match m {
                Moments::Dense { m, v } => {
                    m.dtype().size_in_bytes() * (m.elem_count() + v.elem_count())
                }
                Moments::Q8 { m, v } => m.bytes() + v.bytes(),
            })
            .sum()
    }

    /// The state as named tensors for a checkpoint: `exp_avg.<name>`, `exp_avg_sq.<name>` (f32,
    /// or u8 codes with `<key>.absmax` for 8-bit moments) and `step`; `names` has one entry
    /// per parameter.
    pub fn state_tensors(&self, names: &[String]) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for ((name, p), moments) in names.iter().zip(&self.params).zip(&self.moments) {
            let (m_key, v_key) = (format!("exp_avg.{name}"), format!("exp_avg_sq.{name}"));
            match moments {
                Moments::Dense { m, v } => {
                    out.push((m_key, m.clone()));
                    out.push((v_key, v.clone()));
                }
                Moments::Q8 { m, v } => {
                    for (key, q) in [(m_key, m), (v_key, v)] {
                        let cpu = &Device::Cpu;
                        out.push((format!("{key}.absmax"), q.absmax.to_device(cpu)?));
                        out.push((key, q.codes.to_device(cpu)?.reshape(p.shape())?));
                    }
                }
            }
        }
        out.push((
            "step".into(),
            Tensor::new(&[self.step as u32], &Device::Cpu)?,
        ));
        Ok(out)
    }

    /// Restores what [`AdamW::state_tensors`] wrote; shapes and formats must match.
    pub fn load_state_tensors(
        &mut self,
        names: &[String],
        state: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let get = |k: &str| {
            state
                .get(k)
                .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks {k}")))
        };
        for ((name, p), moments) in names.iter().zip(&self.params).zip(self.moments.iter_mut()) {
            let (m_key, v_key) = (format!("exp_avg.{name}"), format!("exp_avg_sq.{name}"));
            let (m, v) = (get(&m_key)?, get(&v_key)?);
            for t in [m, v] {
                if t.dims() != p.dims() {
                    candle_core::bail!(
                        "optimizer state for {name} has shape {:?}, the parameter {:?}",
                        t.dims(),
                        p.dims()
                    );
                }
            }
            let is_q8 = m.dtype() == DType::U8;
            match moments {
                Moments::Dense { .. } if !is_q8 => {
                    *moments = Moments::Dense {
                        m: m.to_dtype(p.dtype())?.to_device(p.device())?,
                        v: v.to_dtype(p.dtype())?.to_device(p.device())?,
                    }
                }
                Moments::Q8 { .. } if is_q8 => {
                    let load = |t: &Tensor, key: &str| -> Result<Q8State> {
                        let absmax = get(&format!("{key}.absmax"))?;
                        if absmax.elem_count() != p.elem_count().div_ceil(BLOCKSIZE_8BIT) {
                            candle_core::bail!("optimizer state {key}.absmax has the wrong size");
                        }
                        Ok(Q8State {
                            codes: t.flatten_all()?.to_device(p.device())?,
                            absmax: absmax.to_dtype(DType::F32)?.to_device(p.device())?,
                        })
                    };
                    *moments = Moments::Q8 {
                        m: load(m, &m_key)?,
                        v: load(v, &v_key)?,
                    };
                }
                _ => candle_core::bail!(
                    "optimizer state for {name} was saved by another optimizer (--optim adamw vs adamw_8bit)"
                ),
            }
        }
        self.step = get("step")?.to_vec1::<u32>()?[0] as usize;
        Ok(())
    }

    /// Clips the gradients to a global norm of `max_norm` (none when it is 0) and makes one
    /// update with learning rate `lr`; returns the norm before clipping. When that norm is not
    /// finite, nothing is updated. On a GPU both are one kernel launch per kind of tensors
    /// (f32, bf16, 8-bit moments; [`peft_ops::FusedAdamw`]), the gradients left as they are.
    pub fn step_clipped(&mut self, grads: &mut GradStore, max_norm: f64, lr: f64) -> Result<f64> {
        if let Some(fused) = self.fused(grads)? {
            self.step += 1;
            let scalars: Vec<_> = self
                .group_list
                .iter()
                .map(|g| self.scalars(lr, g))
                .collect();
            let norm = fused.step(&scalars, max_norm)?;
            if !norm.is_finite() {
                // The kernels updated nothing.
                self.step -= 1;
            }
            return Ok(norm);
        }
        let norm = clip_grad_norm(grads, &self.params, max_norm)?;
        if norm.is_finite() {
            self.step(grads, lr)?;
        }
        Ok(norm)
    }

    /// The fused GPU step, when every parameter has a gradient and all are contiguous CUDA
    /// tensors of dtypes it serves (f32 or bf16; 8-bit moments with f32 parameters).
    fn fused(&self, grads: &GradStore) -> Result<Option<peft_ops::FusedAdamw>> {
        use peft_ops::SlotMoments;
        if !self.params.first().is_some_and(|p| p.device().is_cuda()) {
            return Ok(None);
        }
        let mut slots = Vec::with_capacity(self.params.len());
        for ((p, moments), &group) in self.params.iter().zip(&self.moments).zip(&self.groups) {
            let Some(grad) = grads.get(p.as_tensor()) else {
                return Ok(None);
            };
            let moments = match moments {
                Moments::Dense { m, v } => SlotMoments::Dense { m, v },
                Moments::Q8 { m, v } => SlotMoments::Q8 {
                    m_codes: &m.codes,
                    m_absmax: &m.absmax,
                    v_codes: &v.codes,
                    v_absmax: &v.absmax,
                },
            };
            slots.push(peft_ops::AdamwSlot {
                param: p.as_tensor(),
                grad,
                moments,
                group,
            });
        }
        peft_ops::FusedAdamw::new(&slots)
    }

    fn bias_corrections(&self) -> (f64, f64) {
        (
            1.0 - self.beta1.powi(self.step as i32),
            1.0 - self.beta2.powi(self.step as i32),
        )
    }

    /// The learning rate and the decay factor (`1 − lr · weight_decay`, or 1 without decay)
    /// of a parameter of `group` at scheduled learning rate `lr`.
    fn group_rates(&self, lr: f64, group: &ParamGroup) -> (f64, f64) {
        let lr = lr * group.lr_scale;
        let decay = match group.decay {
            true => 1.0 - lr * self.weight_decay,
            false => 1.0,
        };
        (lr, decay)
    }

    /// The update's scalars in f32 for `group`, at the current step: the 8-bit path and the
    /// GPU kernels compute in f32.
    fn scalars(&self, lr: f64, group: &ParamGroup) -> peft_ops::AdamwScalars {
        let (bc1, bc2) = self.bias_corrections();
        let (lr, decay) = self.group_rates(lr, group);
        peft_ops::AdamwScalars {
            lr: lr as f32,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            eps: self.eps as f32,
            decay: decay as f32,
            bias_correction1: bc1 as f32,
            bias_correction2: bc2 as f32,
        }
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let (bc1, bc2) = self.bias_corrections();
        // Per group, once: the f32 scalars of the 8-bit path and the f64 rates of the dense one.
        let per_group: Vec<_> = self
            .group_list
            .iter()
            .map(|g| (self.scalars(lr, g), self.group_rates(lr, g)))
            .collect();
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let (s, (lr, decay)) = per_group[self.groups[i]];
            match &mut self.moments[i] {
                Moments::Dense { m, v } => {
                    let g = g.to_dtype(p.dtype())?;
                    let m_new = ((&*m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
                    let v_new = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
                    let denom = ((&v_new / bc2)?.sqrt()? + self.eps)?;
                    let update = ((&m_new / bc1)? / denom)?;
                    let decayed = (p.as_tensor() * decay)?;
                    p.set(&(decayed - (update * lr)?)?)?;
                    *m = m_new;
                    *v = v_new;
                }
                Moments::Q8 { m, v } => {
                    // Dequantize, update in f32, quantize again with fresh block scales.
                    let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    let mut w: Vec<f32> = p
                        .as_tensor()
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1()?;
                    let mut mf = dequantize_blockwise(&m.to_host()?, &self.signed_map);
                    let mut vf = dequantize_blockwise(&v.to_host()?, &self.unsigned_map);
                    let (b1, b2) = (s.beta1, s.beta2);
                    for j in 0..w.len() {
                        mf[j] = b1 * mf[j] + (1.0 - b1) * g[j];
                        vf[j] = b2 * vf[j] + (1.0 - b2) * g[j] * g[j];
                        let update = (mf[j] / s.bias_correction1)
                            / ((vf[j] / s.bias_correction2).sqrt() + s.eps);
                        w[j] = w[j] * s.decay - s.lr * update;
                    }
                    let dev = p.device();
                    let q = |x: &[f32], map| quantize_blockwise(x, map, BLOCKSIZE_8BIT);
                    *m = Q8State::from_host(&q(&mf, &self.signed_map), dev)?;
                    *v = Q8State::from_host(&q(&vf, &self.unsigned_map), dev)?;
                    let t = Tensor::from_vec(w, p.shape(), &Device::Cpu)?
                        .to_dtype(p.dtype())?
                        .to_device(p.device())?;
                    p.set(&t)?;
                }
            }
        }
        Ok(())
    }
}

/// What clipping to `max_norm` multiplies gradients of global norm `norm` by (PyTorch's
/// `max_norm / (norm + 1e-6)` when the norm exceeds it; `max_norm` 0 turns clipping off).
fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
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
    let scale = clip_factor(norm, max_norm);
    if scale != 1.0 {
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

    /// Least squares `|X·W − Y|²` with a 64×128 weight (8192 elements: 8-bit moments) and
    /// noisy targets, so the loss has a floor as real data has.
    fn regression(kind: OptimKind, steps: usize) -> (Vec<f32>, AdamW) {
        use rand::{Rng, SeedableRng};
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut randn = |shape: (usize, usize)| {
            let v: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let x = randn((256, 64));
        let target = randn((64, 128));
        let noise = (randn((256, 128)) * 0.5).unwrap();
        let y = (x.matmul(&target).unwrap() + noise).unwrap();
        let w = Var::from_tensor(&Tensor::zeros((64, 128), DType::F32, &dev).unwrap()).unwrap();
        let mut opt = AdamW::with_kind(vec![w.clone()], 0.9, 0.999, 1e-8, 0.0, kind).unwrap();
        let mut losses = Vec::new();
        for _ in 0..steps {
            let loss = (x.matmul(w.as_tensor()).unwrap() - &y)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            opt.step(&loss.backward().unwrap(), 1e-2).unwrap();
        }
        (losses, opt)
    }

    #[test]
    fn eight_bit_adamw_tracks_f32_with_a_quarter_of_the_state() {
        let (f32_losses, f32_opt) = regression(OptimKind::Adamw, 200);
        let (q8_losses, q8_opt) = regression(OptimKind::Adamw8bit, 200);
        let (a, b) = (f32_losses[199], q8_losses[199]);
        eprintln!("loss {} -> f32 {a}, 8-bit {b}", f32_losses[0]);
        assert!(
            a < 0.05 * f32_losses[0],
            "the regression must converge: {a}"
        );
        assert!(
            ((b - a) / a).abs() <= 0.02,
            "8-bit loss {b} vs f32 {a} after 200 steps"
        );
        let ratio = q8_opt.state_bytes() as f64 / f32_opt.state_bytes() as f64;
        assert!(ratio <= 0.27, "8-bit state is {ratio} of f32");
    }

    #[test]
    fn eight_bit_state_round_trips_exactly() {
        let (_, opt) = regression(OptimKind::Adamw8bit, 5);
        let names = vec!["w".to_string()];
        let saved: HashMap<String, Tensor> =
            opt.state_tensors(&names).unwrap().into_iter().collect();
        let p =
            Var::from_tensor(&Tensor::zeros((64, 128), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let mut fresh =
            AdamW::with_kind(vec![p], 0.9, 0.999, 1e-8, 0.0, OptimKind::Adamw8bit).unwrap();
        fresh.load_state_tensors(&names, &saved).unwrap();
        let again: HashMap<String, Tensor> =
            fresh.state_tensors(&names).unwrap().into_iter().collect();
        for (k, t) in &saved {
            let (a, b) = (t.flatten_all().unwrap(), again[k].flatten_all().unwrap());
            assert_eq!(
                a.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
                b.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
                "{k}"
            );
        }
        let mut f32_opt = AdamW::new(
            vec![Var::new(&[0f32; 4096], &Device::Cpu).unwrap()],
            0.9,
            0.999,
            1e-8,
            0.0,
        )
        .unwrap();
        let err = f32_opt
            .load_state_tensors(&names, &saved)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shape") || err.contains("another optimizer"),
            "{err}"
        );
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
