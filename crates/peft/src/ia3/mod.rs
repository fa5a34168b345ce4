//! IA3: learned vectors that rescale activations of a frozen base: the output of attention's
//! k/v projections, the input of the feed-forward down projection (PEFT's semantics).

pub mod config;

pub use config::Ia3Config;

use crate::files::AdapterConfig;
use crate::files::{detached, read_adapter_weights, write_adapter};
use crate::keys::{file_key, module_path};
use crate::model::CONFIG_FILE;
use crate::targets::{excluding_parts, select, select_linears, TargetModules};
use crate::Tuned;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use peft_models::{Linear, LinearAdapter, Llama};
use peft_ops::{param, LinearWeight};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// The file key suffix of a vector (PEFT stores it without `.weight`).
const KEY: &str = "ia3_l";

/// One layer's vector: `[out, 1]` scaling the output, or `[1, in]` scaling the input of a
/// feed-forward layer (PEFT's shapes).
pub struct Ia3Layer {
    pub l: Var,
    pub feedforward: bool,
}

impl LinearAdapter for Ia3Layer {
    fn forward(&self, base: &Linear, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let l = param(self.l.as_tensor())
            .flatten_all()?
            .to_dtype(x.dtype())?;
        if self.feedforward {
            base.base_forward(&x.broadcast_mul(&l)?)
        } else {
            base.base_forward(x)?.broadcast_mul(&l)
        }
    }
}

pub struct Ia3Model {
    pub base: Llama,
    pub config: Ia3Config,
    /// Module path -> its vector, in model order.
    pub layers: BTreeMap<String, Arc<Ia3Layer>>,
}

/// The default `names` the model has linear layers of: a mixture-of-experts model whose
/// experts are its only MLPs has no `down_proj` (HF PEFT passes over a default name that
/// matches nothing, as here).
fn present(base: &mut Llama, names: &[&str]) -> TargetModules {
    let paths: Vec<String> = base.linears_mut().into_iter().map(|(p, _)| p).collect();
    let has = |n: &str| paths.iter().any(|p| p.ends_with(&format!(".{n}")));
    TargetModules::List(
        names
            .iter()
            .filter(|n| has(n))
            .map(|s| s.to_string())
            .collect(),
    )
}

impl Ia3Model {
    /// Injects vectors (ones, or `init(path, shape)` when loading).
    fn build(
        mut base: Llama,
        mut config: Ia3Config,
        mut init: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let targets = config
            .target_modules
            .get_or_insert_with(|| match base.config.fused_projections {
                true => present(&mut base, config::DEFAULT_TARGETS_FUSED),
                false => present(&mut base, config::DEFAULT_TARGETS),
            })
            .clone();
        let feedforward = config
            .feedforward_modules
            .get_or_insert_with(|| present(&mut base, config::DEFAULT_FEEDFORWARD))
            .clone();
        // HF PEFT's rule (its config refuses anything else): a feed-forward module is a target.
        if let (TargetModules::List(t), TargetModules::List(f)) = (&targets, &feedforward) {
            if !t.iter().any(|m| m == crate::targets::ALL_LINEAR) {
                if let Some(m) = f.iter().find(|m| !t.contains(m)) {
                    bail!("feedforward_modules must be a subset of target_modules: {m:?} is not a target");
                }
            }
        }
        let selected = select_linears(&mut base, &targets, config.exclude_modules.as_ref())?;
        if selected.is_empty() {
            bail!("IA3 scales linear layers: its target_modules name none (the embedding has no IA3 form)");
        }
        let ff = select(&feedforward, None, &selected, &[], "lm_head").unwrap_or_default();
        let device = base.device.clone();
        let mut layers = BTreeMap::new();
        for (path, lin) in base.linears_mut() {
            if !selected.contains(&path) {
                continue;
            }
            let is_ff = ff.contains(&path);
            let shape = if is_ff {
                vec![1, lin.in_features()]
            } else {
                vec![lin.out_features(), 1]
            };
            let l = init(&path, &shape)?
                .to_device(&device)?
                .to_dtype(DType::F32)?;
            let layer = Arc::new(Ia3Layer {
                l: Var::from_tensor(&l)?,
                feedforward: is_ff,
            });
            lin.adapter = Some(layer.clone());
            layers.insert(path, layer);
        }
        Ok(Self {
            base,
            config,
            layers,
        })
    }

    /// Fresh vectors of ones (PEFT's `init_ia3_weights=True`): the model starts unchanged.
    pub fn new(base: Llama, config: Ia3Config) -> Result<Self> {
        let device = base.device.clone();
        Self::build(base, config, |_, shape| {
            Ok(Tensor::ones(shape, DType::F32, &device)?)
        })
    }

    /// Loads a PEFT IA3 folder onto `base`.
    pub fn load(mut base: Llama, dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("adapter folder not found: {}", dir.display());
        }
        let config = Ia3Config::from_file(&dir.join(CONFIG_FILE))?;
        let (path, mut tensors) = read_adapter_weights(dir, &candle_core::Device::Cpu)?;
        crate::tokens::take_grown_embeddings(
            &mut base,
            &mut tensors,
            &path,
            crate::tokens::GROWN_EMBEDDING,
        )?;
        let mut by_path: HashMap<String, Tensor> = HashMap::new();
        for (key, t) in tensors {
            let module = module_path(&key, KEY)
                .with_context(|| format!("{}: unexpected tensor {key}", path.display()))?
                .to_string();
            by_path.insert(module, t);
        }
        let mut model = Self::build(base, config, |module, shape| {
            let t = by_path
                .remove(module)
                .with_context(|| format!("{}: no {KEY} for {module}", path.display()))?;
            if t.dims() != shape {
                bail!(
                    "{}: {module} has {KEY} of shape {:?}, this model needs {shape:?}",
                    path.display(),
                    t.dims()
                );
            }
            Ok(t)
        })?;
        if let Some(module) = by_path.keys().next() {
            bail!(
                "{}: an {KEY} for {module}, which target_modules does not select",
                path.display()
            );
        }
        model.config.inference_mode = true;
        Ok(model)
    }

    /// Folds each vector into its weight (rows for output scaling, columns for input
    /// scaling) and returns the plain model.
    pub fn merge_and_unload(mut self) -> Result<Llama> {
        let layers = std::mem::take(&mut self.layers);
        let dtype = self.base.dtype;
        for (path, lin) in self.base.linears_mut() {
            lin.adapter = None;
            let Some(layer) = layers.get(&path) else {
                continue;
            };
            let l = layer.l.as_tensor().detach();
            let w = lin.weight.dense()?.detach().to_dtype(DType::F32)?;
            // [out, 1] scales rows, [1, in] scales columns: both broadcast over W [out, in].
            lin.weight = LinearWeight::Dense(w.broadcast_mul(&l)?.to_dtype(dtype)?);
            if !layer.feedforward {
                if let Some(b) = &lin.bias {
                    lin.bias = Some(
                        b.detach()
                            .broadcast_mul(&l.flatten_all()?.to_dtype(b.dtype())?)?,
                    );
                }
            }
        }
        Ok(self.base)
    }
}

impl Tuned for Ia3Model {
    fn base(&self) -> &Llama {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Llama {
        &mut self.base
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .map(|(path, l)| (file_key(path, KEY), l.l.clone()))
            .collect()
    }
    fn save(&self, dir: &Path, base_model_name: &str) -> Result<()> {
        let mut config = self.config.for_saving(base_model_name);
        config.exclude_modules =
            excluding_parts(config.exclude_modules.as_ref(), &self.base.other_parts());
        write_adapter(dir, &detached(self.trainable()), &config.to_json_string()?)
    }
    fn parameter_counts(&mut self) -> (usize, usize) {
        let t: usize = self.layers.values().map(|l| l.l.elem_count()).sum();
        (t, self.base.parameter_count() + t)
    }
}
