//! A base model with LoRA adapters injected by module path: creation, PEFT-format save/load,
//! parameter counting and merging.

use crate::files::AdapterConfig;
use crate::files::{detached, read_adapter_weights, write_adapter};
use crate::keys::{file_key, module_path};
use crate::lora::config::LoraConfig;
use crate::lora::init::{SavedBase, WeightInit};
use crate::lora::layer::{DropoutSeed, LoraLayer};
use crate::targets::{excluding_parts, keep_layers, select_linears, selects_module, TargetModules};
use crate::tokens::{
    embedding_path, names_embedding, take_grown_embeddings, GROWN_EMBEDDING, LORA_ROWS,
    TOKEN_ADAPTER_BASE,
};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use peft_models::{EmbeddingLora, Llama};
use peft_ops::{LinearWeight, QuantizedWeight};
use peft_quant::FourBit;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, StandardNormal};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// DoRA's magnitude vector, stored without a `.weight` suffix as PEFT does.
const MAGNITUDE: &str = "lora_magnitude_vector";
/// LoRA's pair on the embedding, as HF PEFT names it (no `.weight`).
const EMBEDDING_A: &str = "lora_embedding_A";
const EMBEDDING_B: &str = "lora_embedding_B";
/// HF PEFT saves the embedding's own weight beside its LoRA pair (`save_embedding_layers`).
const EMBEDDING_BASE: &str = "base_layer.weight";

/// Default LoRA targets when a config names none (PEFT's table for Llama-family models; for
/// Phi-3, which PEFT's table lacks, the fused projection holding q and v; for latent
/// attention, which it lacks too, the projections to the heads' queries and to their keys
/// and values).
fn default_targets(base: &Llama) -> &'static [&'static str] {
    match (&base.config.latent_attention, base.config.fused_projections) {
        (Some(m), _) if m.q_lora_rank.is_some() => &["q_b_proj", "kv_b_proj"],
        (Some(_), _) => &["q_proj", "kv_b_proj"],
        (None, true) => &["qkv_proj"],
        (None, false) => &["q_proj", "v_proj"],
    }
}
pub struct PeftModel {
    pub base: Llama,
    pub config: LoraConfig,
    /// Module path -> its LoRA pair, in model order.
    pub adapters: BTreeMap<String, Arc<LoraLayer>>,
    /// Base tensors made trainable (`bias`, `modules_to_save`), by file key.
    pub extra_trainable: BTreeMap<String, Var>,
    pub dropout_seed: Arc<DropoutSeed>,
    /// PiSSA's or OLoRA's starting A and B by module path, whose product the base weights
    /// gave up: saving subtracts them, so that the adapter applies to the original base.
    pub initial: BTreeMap<String, (Tensor, Tensor)>,
    /// LoftQ's A and B wait for the base's quantization ([`Self::quantize_base`]): set by
    /// [`Self::new`], not by loading an adapter, whose A and B are its own.
    loftq_pending: bool,
    /// Modules outside the language model of an image-text base (its vision tower) that a
    /// loaded HF PEFT adapter changes: text never reaches them, but a merge would have to.
    pub changes_elsewhere: Vec<String>,
}

/// An adapted linear layer of the base, with what the inits from its weight need.
struct AdaptedWeight<'a> {
    path: String,
    /// Its index among all the linear layers (a seed for its random draws).
    index: u64,
    linear: &'a mut peft_models::Linear,
    layer: Arc<LoraLayer>,
    weight: Tensor,
}

/// Every adapted linear layer of `base` with its dense weight, which PiSSA, OLoRA and LoftQ
/// start from: a quantized one is an error.
fn adapted_weights<'a>(
    base: &'a mut Llama,
    adapters: &BTreeMap<String, Arc<LoraLayer>>,
    config: &LoraConfig,
) -> Result<Vec<AdaptedWeight<'a>>> {
    let mut out = Vec::new();
    for (index, (path, linear)) in base.linears_mut().into_iter().enumerate() {
        let Some(layer) = adapters.get(&path) else {
            continue;
        };
        let weight = match &linear.weight {
            LinearWeight::Dense(w) => w.clone(),
            LinearWeight::Quantized(_) => bail!(
                "init_lora_weights={} needs the original weights of {path}, which is quantized (load the base unquantized: peft train --quantize quantizes it after the initialisation)",
                config.init_lora_weights
            ),
        };
        out.push(AdaptedWeight {
            path,
            index: index as u64,
            linear,
            layer: layer.clone(),
            weight,
        });
    }
    Ok(out)
}

/// Checks HF PEFT's `loftq_config` (`{"loftq_bits": 4, "loftq_iter": 1}`, its defaults)
/// against what LoftQ does here: one pass over the base's own 4-bit quantization.
fn loftq_settings(config: &LoraConfig) -> Result<()> {
    let Some(settings) = config.other.get("loftq_config") else {
        return Ok(());
    };
    let get = |key: &str| settings.get(key).and_then(serde_json::Value::as_f64);
    if !settings.is_object()
        || settings
            .as_object()
            .is_some_and(|o| o.keys().any(|k| k != "loftq_bits" && k != "loftq_iter"))
    {
        bail!("loftq_config must be a table of loftq_bits and loftq_iter, got {settings}");
    }
    if get("loftq_bits").is_some_and(|b| b != 4.0) {
        bail!("loftq_config: loftq_bits must be 4 (the base is quantized by --quantize nf4|fp4), got {}", settings["loftq_bits"]);
    }
    if get("loftq_iter").is_some_and(|i| i != 1.0) {
        bail!("loftq_config: loftq_iter must be 1, got {} (more iterations quantize W - B·A instead of W, a base that the adapter would have to ship with)", settings["loftq_iter"]);
    }
    Ok(())
}

fn uniform(rng: &mut impl Rng, shape: (usize, usize), bound: f64) -> Vec<f32> {
    (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
}

impl PeftModel {
    /// Injects freshly initialised adapters (PEFT's init: kaiming-uniform A, zero B; or
    /// PiSSA's and OLoRA's from the base weights, which keep the residual). LoftQ's start as
    /// PEFT's and take their values when [`Self::quantize_base`] quantizes the base.
    pub fn new(mut base: Llama, mut config: LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        crate::lora::experts::convert_targets(&mut config, &mut base)?;
        let weight_init = WeightInit::parse(&config.init_lora_weights)?;
        if weight_init == Some(WeightInit::Loftq) && config.use_dora {
            bail!(
                "init_lora_weights={} with use_dora is not supported",
                config.init_lora_weights
            );
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let embedding = embedding_path(&base);
        let model = Self::build(base, config, |path, r, in_f, out_f, cfg| {
            let dev = candle_core::Device::Cpu;
            let normal = |rng: &mut rand::rngs::StdRng, n: usize| -> Vec<f32> {
                (0..n).map(|_| StandardNormal.sample(rng)).collect()
            };
            let (a, b) = match &cfg.init_lora_weights {
                // HF PEFT's embedding LoRA: A = 0, B ~ N(0, 1) (nn.Embedding's init); both
                // N(0, 1) without its init.
                _ if path == embedding => {
                    if weight_init.is_some() {
                        bail!(
                            "init_lora_weights={} with LoRA on the embedding is not supported",
                            cfg.init_lora_weights
                        );
                    }
                    let a = match cfg.init_lora_weights {
                        serde_json::Value::Bool(false) => normal(&mut rng, r * in_f),
                        _ => vec![0f32; r * in_f],
                    };
                    (a, normal(&mut rng, out_f * r))
                }
                serde_json::Value::String(s) if s == "orthogonal" => {
                    let (a, b) = crate::lora::init::orthogonal(r, in_f, out_f, &mut rng)?;
                    return Ok((a, b));
                }
                serde_json::Value::String(_) => {
                    // "gaussian": A ~ N(0, 1/r), B = 0.
                    let normal = Normal::new(0.0, 1.0 / r as f64).context("gaussian init")?;
                    let a: Vec<f32> = (0..r * in_f)
                        .map(|_| normal.sample(&mut rng) as f32)
                        .collect();
                    (a, vec![0f32; out_f * r])
                }
                // nn.Linear's kaiming_uniform(a=sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                serde_json::Value::Bool(true) => (
                    uniform(&mut rng, (r, in_f), 1.0 / (in_f as f64).sqrt()),
                    vec![0f32; out_f * r],
                ),
                _ => (
                    uniform(&mut rng, (r, in_f), 1.0 / (in_f as f64).sqrt()),
                    uniform(&mut rng, (out_f, r), 1.0 / (r as f64).sqrt()),
                ),
            };
            Ok((
                Tensor::from_vec(a, (r, in_f), &dev)?,
                Tensor::from_vec(b, (out_f, r), &dev)?,
            ))
        })?;
        match weight_init {
            Some(WeightInit::Loftq) => {
                loftq_settings(&model.config)?;
                Ok(Self {
                    loftq_pending: true,
                    ..model
                })
            }
            // PiSSA and OLoRA: the base keeps the residual.
            Some(init) => model.decompose_base(init, seed),
            None => Ok(model),
        }
    }

    /// QLoRA's base: every linear but the head quantized to 4 bits (as [`Llama::quantize`]).
    /// Under LoftQ each adapted linear's A and B then take the principal part of its
    /// quantization error ([`crate::lora::init::loftq`]), the layers in parallel.
    pub fn quantize_base(
        &mut self,
        kind: FourBit,
        double_quant: bool,
        compute_dtype: DType,
    ) -> Result<()> {
        if std::mem::take(&mut self.loftq_pending) {
            let mut targets: Vec<_> =
                adapted_weights(&mut self.base, &self.adapters, &self.config)?
                    .into_iter()
                    .map(|t| (t.linear, t.layer, t.weight))
                    .collect();
            // A chunk at a time (each SVD holds its weight in f64), quantized on this thread
            // (the weights' device may be a GPU), decomposed on the CPU's threads.
            let cpu = candle_core::Device::Cpu;
            for chunk in targets.chunks_mut(rayon::current_num_threads().max(1)) {
                let mut quantized = Vec::with_capacity(chunk.len());
                for (_, _, w) in chunk.iter() {
                    let q = QuantizedWeight::quantize(w, kind, double_quant, compute_dtype)?;
                    let pair = (w.to_device(&cpu)?, q.dequantize()?.to_device(&cpu)?);
                    quantized.push((q, pair));
                }
                let factors: Vec<(Tensor, Tensor)> = chunk
                    .par_iter()
                    .zip(&quantized)
                    .map(|((_, layer, _), (_, (w, dequantized)))| {
                        let r = layer.a.dim(0)?;
                        crate::lora::init::loftq(w, dequantized, r, layer.scaling)
                    })
                    .collect::<Result<_>>()?;
                let done = quantized.into_iter().zip(factors);
                for ((lin, layer, _), ((q, _), (a, b))) in chunk.iter_mut().zip(done) {
                    layer.a.set(&a.to_device(layer.a.device())?)?;
                    layer.b.set(&b.to_device(layer.b.device())?)?;
                    lin.weight = LinearWeight::Quantized(Arc::new(q));
                }
            }
        }
        self.base.quantize(kind, double_quant, compute_dtype)?;
        Ok(())
    }

    /// Sets each adapter from its base weight by `init` and leaves the base the residual,
    /// the layers' decompositions in parallel.
    fn decompose_base(mut self, init: WeightInit, seed: u64) -> Result<Self> {
        let config = &self.config;
        if config.use_rslora && !(config.rank_pattern.is_empty() && config.alpha_pattern.is_empty())
        {
            // HF PEFT cannot convert such an adapter for the original base either.
            bail!("init_lora_weights={} with use_rslora and rank_pattern or alpha_pattern is not supported", config.init_lora_weights);
        }
        let weights: Vec<(String, u64, Tensor)> =
            adapted_weights(&mut self.base, &self.adapters, &self.config)?
                .into_iter()
                .map(|t| (t.path, t.index, t.weight))
                .collect();
        let parts: Vec<(Tensor, Tensor, Tensor)> = weights
            .par_iter()
            .map(|(path, id, w)| {
                let layer = &self.adapters[path];
                init.decompose(
                    &w.to_device(&candle_core::Device::Cpu)?,
                    layer.a.dim(0)?,
                    layer.scaling,
                    seed ^ id,
                )
                .with_context(|| format!("init_lora_weights for {path}"))
            })
            .collect::<Result<_>>()?;
        let mut residuals: HashMap<String, Tensor> = HashMap::new();
        for ((path, _, w), (a, b, residual)) in weights.into_iter().zip(parts) {
            let layer = &self.adapters[&path];
            layer.a.set(&a.to_device(layer.a.device())?)?;
            layer.b.set(&b.to_device(layer.b.device())?)?;
            residuals.insert(
                path.clone(),
                residual.to_device(w.device())?.to_dtype(w.dtype())?,
            );
            self.initial.insert(path, (a, b));
        }
        for (path, lin) in self.base.linears_mut() {
            if let Some(residual) = residuals.remove(&path) {
                lin.weight = LinearWeight::Dense(residual);
            }
        }
        Ok(self)
    }

    /// Wraps the targeted linears; `init(path, r, in, out, config)` gives A and B.
    fn build(
        mut base: Llama,
        mut config: LoraConfig,
        mut init: impl FnMut(&str, usize, usize, usize, &LoraConfig) -> Result<(Tensor, Tensor)>,
    ) -> Result<Self> {
        let device = base.device.clone();
        let targets = config
            .target_modules
            .get_or_insert_with(|| {
                TargetModules::List(
                    default_targets(&base)
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                )
            })
            .clone();
        // HF PEFT's conversion for mixture-of-experts models may leave no module target, only
        // parameters.
        let only_parameters = matches!(&targets, TargetModules::List(l) if l.is_empty())
            && config.adapts_parameters();
        let mut selected = match only_parameters {
            true => Vec::new(),
            false => select_linears(&mut base, &targets, config.exclude_modules.as_ref())?,
        };
        if let Some(indices) = config.layer_indices()? {
            keep_layers(&mut selected, &targets, &indices, &config.layer_patterns()?)?;
        }
        let dropout_seed = Arc::new(DropoutSeed::default());
        let mut adapters = BTreeMap::new();
        for (id, (path, lin)) in base.linears_mut().into_iter().enumerate() {
            if !selected.contains(&path) {
                continue;
            }
            let (r, scaling) = config.rank_and_scaling(&path);
            let (a, b) = init(&path, r, lin.in_features(), lin.out_features(), &config)?;
            let a = a.to_device(&device)?.to_dtype(DType::F32)?;
            let b = b.to_device(&device)?.to_dtype(DType::F32)?;
            // DoRA starts with m = ‖W + sBA‖, so the layer first computes W + sBA.
            let magnitude = if config.use_dora {
                let w = lin.weight.dense()?.to_dtype(DType::F32)?;
                let norm = (w + (b.matmul(&a)? * scaling)?)?.sqr()?.sum(1)?.sqrt()?;
                Some(Var::from_tensor(&norm)?)
            } else {
                None
            };
            let layer = Arc::new(LoraLayer {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                magnitude,
                scaling,
                dropout: config.lora_dropout,
                layer_id: id as u64,
                dropout_seed: dropout_seed.clone(),
            });
            lin.adapter = Some(layer.clone());
            adapters.insert(path, layer);
        }
        for target in crate::lora::experts::param_targets(&base, &config)? {
            let (r, scaling) = config.rank_and_scaling(&target.key);
            let rows = r * target.experts;
            let path = &target.adapter_path;
            let (a, b) = init(path, rows, target.in_features, target.out_features, &config)?;
            let layer = Arc::new(LoraLayer {
                a: Var::from_tensor(&a.to_device(&device)?.to_dtype(DType::F32)?)?,
                b: Var::from_tensor(&b.to_device(&device)?.to_dtype(DType::F32)?)?,
                magnitude: None,
                scaling,
                dropout: 0.0,
                layer_id: adapters.len() as u64,
                dropout_seed: dropout_seed.clone(),
            });
            crate::lora::experts::attach(&mut base, &target, layer.clone())?;
            adapters.insert(target.adapter_path, layer);
        }
        let embedding = embedding_path(&base);
        let named_in_full = matches!(&targets, TargetModules::List(l) if l.contains(&embedding));
        // As HF PEFT: layers_to_transform keeps what has a layer index, or is named in full.
        let embedding_kept = config.layer_indices()?.is_none() || named_in_full;
        if embedding_kept && selects_module(&targets, config.exclude_modules.as_ref(), &embedding)?
        {
            if config.use_dora {
                bail!("use_dora with LoRA on the embedding ({embedding}) is not supported");
            }
            let (r, scaling) = config.rank_and_scaling(&embedding);
            let (vocab, hidden) = base.embed_tokens.dims2()?;
            let (a, b) = init(&embedding, r, vocab, hidden, &config)?;
            base.embedding_lora = Some(EmbeddingLora {
                a: Var::from_tensor(&a.to_device(&device)?.to_dtype(DType::F32)?)?,
                b: Var::from_tensor(&b.to_device(&device)?.to_dtype(DType::F32)?)?,
                scaling,
            });
        } else if adapters.is_empty() {
            bail!("target_modules selects no module");
        }
        let mut model = Self {
            base,
            config,
            adapters,
            extra_trainable: BTreeMap::new(),
            dropout_seed,
            initial: BTreeMap::new(),
            changes_elsewhere: Vec::new(),
            loftq_pending: false,
        };
        model.make_extra_trainable()?;
        Ok(model)
    }

    /// `bias` = all / lora_only and `modules_to_save` turn base tensors into trainable ones.
    fn make_extra_trainable(&mut self) -> Result<()> {
        let bias_mode = self.config.bias.clone();
        let to_save = self.config.modules_to_save.clone().unwrap_or_default();
        let wrapped: Vec<String> = self.adapters.keys().cloned().collect();
        let mut extra = BTreeMap::new();
        let is_embedding = |m: &String| names_embedding(m);
        if self.base.embedding_lora.is_some() {
            if to_save.iter().any(is_embedding) {
                bail!("the embedding is both a LoRA target and in modules_to_save");
            }
            if self.config.token_indices()?.is_some() {
                bail!(
                    "trainable_token_indices and LoRA on the embedding both train it: choose one"
                );
            }
        }
        // A tied head and embedding part when either trains (HF PEFT trains a copy of the
        // module named and leaves the other as it was).
        if to_save.iter().any(|m| m == "lm_head" || is_embedding(m)) {
            self.base.untie_head()?;
        }
        if to_save.iter().any(is_embedding) {
            let var = Var::from_tensor(&self.base.embed_tokens.to_dtype(DType::F32)?)?;
            self.base.embed_tokens = var.as_tensor().clone();
            extra.insert(file_key(&embedding_path(&self.base), "weight"), var);
        }
        for (path, lin) in self.base.linears_mut() {
            let is_wrapped = wrapped.contains(&path);
            let train_bias = bias_mode == "all" || (bias_mode == "lora_only" && is_wrapped);
            if let (true, Some(b)) = (train_bias, &lin.bias) {
                // PEFT keeps the base layer inside the LoRA wrapper: `q_proj.base_layer.bias`.
                let param = if is_wrapped {
                    "base_layer.bias"
                } else {
                    "bias"
                };
                let var = Var::from_tensor(&b.to_dtype(DType::F32)?)?;
                lin.bias = Some(var.as_tensor().clone());
                extra.insert(file_key(&path, param), var);
            }
            if to_save
                .iter()
                .any(|m| path == *m || path.ends_with(&format!(".{m}")))
            {
                if is_wrapped {
                    bail!("{path} is both a LoRA target and in modules_to_save");
                }
                let var = Var::from_tensor(&lin.weight.dense()?.to_dtype(DType::F32)?)?;
                lin.weight = LinearWeight::Dense(var.as_tensor().clone());
                extra.insert(file_key(&path, "weight"), var);
            }
        }
        for m in &to_save {
            if !extra.keys().any(|k| k.ends_with(&format!("{m}.weight"))) {
                bail!("modules_to_save: {m:?} is not a linear module or the embedding of this model (norms are not supported yet)");
            }
        }
        if let Some(indices) = self.config.token_indices()? {
            if to_save.iter().any(is_embedding) {
                bail!("trainable_token_indices and modules_to_save both train the embedding: choose one");
            }
            // Each starts as the token's own row, as HF PEFT's trainable tokens do.
            let var = crate::tokens::attach_token_rows(&mut self.base, indices, true, 0)?;
            extra.insert(file_key(&embedding_path(&self.base), LORA_ROWS), var);
        }
        self.extra_trainable = extra;
        Ok(())
    }

    /// Every trainable tensor under its adapter-file key, in file order.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = Vec::new();
        for (path, l) in &self.adapters {
            out.push((file_key(path, "lora_A.weight"), l.a.clone()));
            out.push((file_key(path, "lora_B.weight"), l.b.clone()));
            if let Some(m) = &l.magnitude {
                out.push((file_key(path, MAGNITUDE), m.clone()));
            }
        }
        if let Some(l) = &self.base.embedding_lora {
            let path = embedding_path(&self.base);
            out.push((file_key(&path, EMBEDDING_A), l.a.clone()));
            out.push((file_key(&path, EMBEDDING_B), l.b.clone()));
        }
        out.extend(
            self.extra_trainable
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// (trainable, all) parameter counts as PEFT's `get_nb_trainable_parameters` reports them:
    /// all = base parameters + adapter parameters (a trained copy of a module counts once more).
    pub fn parameter_counts(&mut self) -> (usize, usize) {
        let trainable: usize = self.trainable().iter().map(|(_, v)| v.elem_count()).sum();
        let adapters: usize = self
            .adapters
            .values()
            .map(|l| {
                l.a.elem_count()
                    + l.b.elem_count()
                    + l.magnitude.as_ref().map_or(0, |m| m.elem_count())
            })
            .sum();
        let embedding: usize = self
            .base
            .embedding_lora
            .as_ref()
            .map_or(0, |l| l.a.elem_count() + l.b.elem_count());
        let modules_to_save: usize = self
            .extra_trainable
            .iter()
            .filter(|(k, _)| k.ends_with(".weight") || k.ends_with(LORA_ROWS))
            .map(|(_, v)| v.elem_count())
            .sum();
        let base = self.base.parameter_count();
        (trainable, base + adapters + embedding + modules_to_save)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` as PEFT's
    /// `save_pretrained` does, each atomically.
    ///
    /// A PiSSA or OLoRA adapter is saved as HF PEFT's `save_pretrained` converts it with
    /// `path_initial_model_for_weight_conversion`: `A' = [A; A₀]`, `B' = [B, −B₀]` at twice
    /// the rank and alpha (√2 alpha with rsLoRA), so that `s·B'·A' = s·B·A − s·B₀·A₀` applies
    /// to the original base weights, and `init_lora_weights` true.
    pub fn save(&self, dir: &Path, base_model_name: &str) -> Result<()> {
        let mut config = self.config.for_saving(base_model_name);
        config.exclude_modules =
            excluding_parts(config.exclude_modules.as_ref(), &self.base.other_parts());
        let mut tensors = detached(self.trainable());
        if self.base.vocab_grown {
            tensors.extend(self.grown_embeddings()?);
        }
        if !self.initial.is_empty() {
            for (key, t) in tensors.iter_mut() {
                let converted = if let Some((a0, _)) =
                    module_path(key, "lora_A.weight").and_then(|p| self.initial.get(p))
                {
                    Tensor::cat(&[&*t, &a0.to_device(t.device())?], 0)?
                } else if let Some((_, b0)) =
                    module_path(key, "lora_B.weight").and_then(|p| self.initial.get(p))
                {
                    Tensor::cat(&[&*t, &b0.to_device(t.device())?.neg()?], 1)?
                } else {
                    continue;
                };
                *t = converted;
            }
            config.init_lora_weights = serde_json::Value::Bool(true);
            config.r *= 2;
            config.lora_alpha *= if config.use_rslora { 2f64.sqrt() } else { 2.0 };
            config.rank_pattern.values_mut().for_each(|r| *r *= 2);
            config.alpha_pattern.values_mut().for_each(|a| *a *= 2.0);
        }
        if WeightInit::parse(&config.init_lora_weights)? == Some(WeightInit::Loftq) {
            // A plain LoRA for the base quantized as it is without LoftQ, as HF PEFT's
            // replace_lora_weights_loftq leaves its config ("loftq" would have HF PEFT
            // quantize and replace the base weights again on load).
            config.init_lora_weights = serde_json::Value::Bool(true);
            config.other.remove("loftq_config");
        }
        write_adapter(dir, &tensors, &config.to_json_string()?)
    }

    /// The grown embedding (and head) as HF PEFT saves them beside trainable token rows: the
    /// token adapter's base layer, for a tied head a copy of it and of the rows, an untied
    /// head's own weight; an adapter of a grown vocabulary so loads on the original base.
    fn grown_embeddings(&self) -> Result<Vec<(String, Tensor)>> {
        let embedding = embedding_path(&self.base);
        let layer = TOKEN_ADAPTER_BASE;
        let embed = self.base.embed_tokens.detach();
        let mut out = vec![(file_key(&embedding, layer), embed.clone())];
        match &self.base.lm_head {
            Some(lin) => out.push((file_key("lm_head", "weight"), lin.weight.dense()?.detach())),
            None => {
                out.push((file_key("lm_head", layer), embed));
                if let Some(rows) = self.extra_trainable.get(&file_key(&embedding, LORA_ROWS)) {
                    out.push((file_key("lm_head", LORA_ROWS), rows.as_tensor().detach()));
                }
            }
        }
        Ok(out)
    }

    /// A trained tensor from the adapter file [`Self::save`] wrote: PiSSA's and OLoRA's
    /// converted A and B hold the trained ones in their first `r` rows and columns.
    pub fn trained_from_saved(&self, key: &str, saved: Tensor) -> Result<Tensor> {
        let initial = |suffix| module_path(key, suffix).and_then(|p| self.initial.get(p));
        Ok(match (initial("lora_A.weight"), initial("lora_B.weight")) {
            (Some((a0, _)), _) if saved.dim(0)? == 2 * a0.dim(0)? => {
                saved.narrow(0, 0, a0.dim(0)?)?
            }
            (_, Some((_, b0))) if saved.dim(1)? == 2 * b0.dim(1)? => {
                saved.narrow(1, 0, b0.dim(1)?)?
            }
            _ => saved,
        })
    }

    /// Loads a PEFT LoRA adapter folder onto `base`. Every tensor in the file must be used and
    /// every adapted module must find its tensors with the right shapes.
    pub fn load(mut base: Llama, dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("adapter folder not found: {}", dir.display());
        }
        let mut config = LoraConfig::from_file(&dir.join(CONFIG_FILE))?;
        // As HF PEFT converts a config on load (one from before transformers 5 fused the
        // experts names their linear layers).
        crate::lora::experts::convert_targets(&mut config, &mut base)?;
        if SavedBase::of(&config.init_lora_weights)? == SavedBase::Residual {
            bail!(
                "{}: init_lora_weights={} marks an adapter for residual base weights (PiSSA, OLoRA, CorDA, LoRA-GA), not the original ones: convert it with HF PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) (peft-rs saves such adapters converted)",
                dir.join(CONFIG_FILE).display(),
                config.init_lora_weights
            );
        }
        let (weights_path, mut tensors) = read_adapter_weights(dir, &candle_core::Device::Cpu)?;
        crate::lora::experts::stack_expert_pairs(&mut tensors, &base)
            .with_context(|| format!("{}", weights_path.display()))?;
        // Before the token rows, whose new ids need the grown embedding.
        take_grown_embeddings(&mut base, &mut tensors, &weights_path, TOKEN_ADAPTER_BASE)?;
        let mut by_path: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        let mut magnitudes: HashMap<String, Tensor> = HashMap::new();
        let keys: Vec<String> = tensors.keys().cloned().collect();
        for key in &keys {
            if let Some(p) = module_path(key, MAGNITUDE) {
                magnitudes.insert(p.to_string(), tensors.remove(key).expect("key listed"));
                continue;
            }
            let (slot, path) = if let Some(p) = module_path(key, "lora_A.weight") {
                (0, p)
            } else if let Some(p) = module_path(key, "lora_B.weight") {
                (1, p)
            } else if let Some(p) = module_path(key, EMBEDDING_A) {
                (0, p)
            } else if let Some(p) = module_path(key, EMBEDDING_B) {
                (1, p)
            } else {
                continue;
            };
            let t = tensors.remove(key).expect("key listed");
            let entry = by_path.entry(path.to_string()).or_default();
            if slot == 0 {
                entry.0 = Some(t)
            } else {
                entry.1 = Some(t)
            }
        }
        // HF PEFT adapts an image-text model's vision tower too where its target_modules name
        // modules there: those pairs are set aside, and remembered where B is not zero.
        let elsewhere = base.other_module_paths();
        let mut changes_elsewhere = Vec::new();
        for path in &elsewhere {
            let Some((_, b)) = by_path.remove(path) else {
                continue;
            };
            let zero = match b {
                Some(b) => {
                    b.abs()?
                        .max_all()?
                        .to_dtype(DType::F32)?
                        .to_scalar::<f32>()?
                        == 0.0
                }
                None => true,
            };
            if !zero || magnitudes.contains_key(path) {
                changes_elsewhere.push(path.clone());
            }
            magnitudes.remove(path);
        }
        let mut model = Self::build(base, config, |path, r, in_f, out_f, _| {
            let (a, b) = by_path.remove(path).with_context(|| {
                format!("{}: no LoRA weights for {path}", weights_path.display())
            })?;
            let a =
                a.with_context(|| format!("{}: no lora_A for {path}", weights_path.display()))?;
            let b =
                b.with_context(|| format!("{}: no lora_B for {path}", weights_path.display()))?;
            if a.dims() != [r, in_f] || b.dims() != [out_f, r] {
                bail!(
                    "{}: {path} has lora_A {:?} and lora_B {:?}, the base model needs [{r}, {in_f}] and [{out_f}, {r}] (adapter made for another model?)",
                    weights_path.display(),
                    a.dims(),
                    b.dims()
                );
            }
            Ok((a, b))
        })?;
        if let Some(path) = by_path.keys().next() {
            bail!(
                "{}: LoRA weights for {path}, which target_modules does not select",
                weights_path.display()
            );
        }
        for (path, layer) in &model.adapters {
            match (&layer.magnitude, magnitudes.remove(path)) {
                (Some(m), Some(t)) => {
                    if t.dims() != m.dims() {
                        bail!(
                            "{}: {path} has a DoRA magnitude of shape {:?}, the model needs {:?}",
                            weights_path.display(),
                            t.dims(),
                            m.dims()
                        );
                    }
                    m.set(&t.to_device(m.device())?.to_dtype(DType::F32)?)?;
                }
                (Some(_), None) => bail!(
                    "{}: use_dora is set but {path} has no {MAGNITUDE}",
                    weights_path.display()
                ),
                (None, _) => {}
            }
        }
        if let Some(path) = magnitudes.keys().next() {
            bail!(
                "{}: a DoRA magnitude for {path}, but use_dora is not set or the module is not targeted",
                weights_path.display()
            );
        }
        for (key, var) in &model.extra_trainable {
            let t = tensors
                .remove(key)
                .with_context(|| format!("{}: missing {key}", weights_path.display()))?;
            if t.dims() != var.dims() {
                bail!(
                    "{}: {key} has shape {:?}, expected {:?}",
                    weights_path.display(),
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        // The embedding and head HF PEFT saves where the vocabulary grew (save_embedding_layers:
        // tokens added, the embedding resized) are the model's.
        // After modules_to_save took the embedding's weight where it trains.
        take_grown_embeddings(
            &mut model.base,
            &mut tensors,
            &weights_path,
            GROWN_EMBEDDING,
        )?;
        // The embedding HF PEFT saved beside its LoRA pair replaces the base's, as loading
        // it into HF's model does (the base's own where it was frozen).
        let embedding_base = file_key(&embedding_path(&model.base), EMBEDDING_BASE);
        if let Some(t) = tensors.remove(&embedding_base) {
            let base = &mut model.base;
            if t.dims() != base.embed_tokens.dims() {
                bail!(
                    "{}: {embedding_base} has shape {:?}, the base's embedding {:?} (a resized vocabulary is not supported)",
                    weights_path.display(),
                    t.dims(),
                    base.embed_tokens.dims()
                );
            }
            base.replace_embeddings(&t, None)?;
        }
        if let Some(key) = tensors.keys().next() {
            bail!("{}: unexpected tensor {key}", weights_path.display());
        }
        model.changes_elsewhere = changes_elsewhere;
        model.config.inference_mode = true;
        Ok(model)
    }

    /// Folds every adapter into its base weight (`W += s B A`) and returns the plain model.
    pub fn merge_and_unload(mut self) -> Result<Llama> {
        if let Some(path) = self.changes_elsewhere.first() {
            bail!(
                "the adapter changes {} module(s) outside the language model ({path}, ...), which peft-rs does not load; it merges adapters of the language model only",
                self.changes_elsewhere.len()
            );
        }
        let adapters = std::mem::take(&mut self.adapters);
        let dtype = self.base.dtype;
        // A trained embedding (modules_to_save) becomes a plain tensor again, with trained
        // token rows in place.
        self.base.merge_token_rows()?;
        let mut embed = self.base.embed_tokens.detach();
        if let Some(lora) = self.base.embedding_lora.take() {
            // A tied head reads the merged embedding, as in HF PEFT's merged model.
            embed = (embed.to_dtype(DType::F32)? + lora.delta()?)?;
        }
        self.base.embed_tokens = embed.to_dtype(dtype)?;
        crate::lora::experts::merge(&mut self.base)?;
        for (_, lin) in self.base.expert_linears_mut() {
            lin.weight = LinearWeight::Dense(lin.weight.dense()?.detach().to_dtype(dtype)?);
        }
        for (path, lin) in self.base.linears_mut() {
            lin.adapter = None;
            // A quantized base is dequantized here: the merged model is dense.
            let weight = lin.weight.dense()?.detach();
            lin.bias = lin
                .bias
                .as_ref()
                .map(|b| b.detach().to_dtype(dtype))
                .transpose()?;
            let weight = match adapters.get(&path) {
                Some(l) => l.merged_weight(&weight)?,
                None => weight,
            };
            lin.weight = LinearWeight::Dense(weight.to_dtype(dtype)?);
        }
        Ok(self.base)
    }
}
