//! Bottleneck adapters (Houlsby, Pfeiffer): a small down-projection, non-linearity and
//! up-projection with a residual, on the output of attention and/or the MLP of every layer.

pub mod config;

pub use config::BottleneckConfig;

use crate::files::AdapterConfig;
use crate::files::{detached, read_adapter_weights, write_adapter};
use crate::keys::file_key;
use crate::model::CONFIG_FILE;
use crate::Tuned;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use peft_models::{BlockAdapter, Llama};
use peft_ops::param;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const ATTENTION: &str = "attention_adapter";
pub const OUTPUT: &str = "output_adapter";
const PARAMS: [&str; 4] = ["down.weight", "down.bias", "up.weight", "up.bias"];

/// One adapter: `h + up(act(down(h)))`, computed in f32.
pub struct Bottleneck {
    /// down.weight, down.bias, up.weight, up.bias.
    pub params: [Var; 4],
    pub non_linearity: String,
}

impl BlockAdapter for Bottleneck {
    fn forward(&self, h: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let [dw, db, uw, ub] = self.params.each_ref().map(|v| param(v.as_tensor()));
        let x = h.to_dtype(DType::F32)?;
        let z = x.broadcast_matmul(&dw.t()?)?.broadcast_add(&db)?;
        let z = match self.non_linearity.as_str() {
            "relu" => z.relu()?,
            "gelu" => z.gelu_erf()?,
            "tanh" => z.tanh()?,
            _ => z.silu()?,
        };
        let up = z.broadcast_matmul(&uw.t()?)?.broadcast_add(&ub)?;
        (x + up)?.to_dtype(h.dtype())
    }
}

pub struct BottleneckModel {
    pub base: Llama,
    pub config: BottleneckConfig,
    /// `model.layers.{i}.{attention_adapter|output_adapter}` -> adapter.
    pub adapters: BTreeMap<String, Arc<Bottleneck>>,
}

impl BottleneckModel {
    fn build(
        mut base: Llama,
        config: BottleneckConfig,
        mut init: impl FnMut(&str, &str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let h = base.config.hidden_size;
        let r = (h / config.reduction_factor).max(1);
        let shapes: [Vec<usize>; 4] = [vec![r, h], vec![r], vec![h, r], vec![h]];
        let device = base.device.clone();
        let decoder = base.config.decoder_path();
        let mut adapters = BTreeMap::new();
        for (i, layer) in base.layers.iter_mut().enumerate() {
            for (place, on) in [
                (ATTENTION, config.mh_adapter),
                (OUTPUT, config.output_adapter),
            ] {
                if !on {
                    continue;
                }
                let path = format!("{decoder}.layers.{i}.{place}");
                let mut vars = Vec::with_capacity(4);
                for (name, shape) in PARAMS.iter().zip(&shapes) {
                    let t = init(&path, name, shape)?
                        .to_device(&device)?
                        .to_dtype(DType::F32)?;
                    vars.push(Var::from_tensor(&t)?);
                }
                let params: [Var; 4] = vars.try_into().map_err(|_| anyhow::anyhow!("4 params"))?;
                let adapter = Arc::new(Bottleneck {
                    params,
                    non_linearity: config.non_linearity.clone(),
                });
                if place == ATTENTION {
                    layer.attn_adapter = Some(adapter.clone());
                } else {
                    layer.mlp_adapter = Some(adapter.clone());
                }
                adapters.insert(path, adapter);
            }
        }
        Ok(Self {
            base,
            config,
            adapters,
        })
    }

    /// Fresh adapters: down ~ N(0, init_scale²), up and biases zero (the identity at first).
    pub fn new(base: Llama, config: BottleneckConfig, seed: u64) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, config.init_scale as f32).context("init_scale")?;
        Self::build(base, config, |_, name, shape| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name == "down.weight" {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            } else {
                vec![0.0; n]
            };
            Ok(Tensor::from_vec(values, shape, &candle_core::Device::Cpu)?)
        })
    }

    /// Loads a bottleneck adapter folder (layout in [`BottleneckConfig`]).
    pub fn load(base: Llama, dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("adapter folder not found: {}", dir.display());
        }
        let config = BottleneckConfig::from_file(&dir.join(CONFIG_FILE))?;
        let (path, mut tensors) = read_adapter_weights(dir, &candle_core::Device::Cpu)?;
        let mut model = Self::build(base, config, |module, name, shape| {
            let key = file_key(module, name);
            let t = tensors
                .remove(&key)
                .with_context(|| format!("{}: missing {key}", path.display()))?;
            if t.dims() != shape {
                bail!(
                    "{}: {key} has shape {:?}, this model needs {shape:?}",
                    path.display(),
                    t.dims()
                );
            }
            Ok(t)
        })?;
        if let Some(key) = tensors.keys().next() {
            bail!("{}: unexpected tensor {key}", path.display());
        }
        model.config.inference_mode = true;
        Ok(model)
    }
}

impl Tuned for BottleneckModel {
    fn base(&self) -> &Llama {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Llama {
        &mut self.base
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (path, a) in &self.adapters {
            for (name, v) in PARAMS.iter().zip(&a.params) {
                out.push((file_key(path, name), v.clone()));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
    fn save(&self, dir: &Path, base_model_name: &str) -> Result<()> {
        let config = self.config.for_saving(base_model_name);
        write_adapter(dir, &detached(self.trainable()), &config.to_json_string()?)
    }
    fn parameter_counts(&mut self) -> (usize, usize) {
        let t: usize = self.trainable().iter().map(|(_, v)| v.elem_count()).sum();
        (t, self.base.parameter_count() + t)
    }
}
