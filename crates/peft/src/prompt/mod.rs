//! Prompt tuning and prefix tuning (P-tuning v2): trainable virtual tokens on a frozen base,
//! either prepended to the input embeddings (prompt tuning) or placed ahead of every layer's
//! keys and values (prefix tuning). Files follow PEFT: one `prompt_embeddings` tensor.

pub mod config;

pub use config::{is_prompt_learning, PromptConfig, PREFIX_TUNING, PROMPT_TUNING, P_TUNING};

use crate::files::read_adapter_weights;
use crate::files::write_adapter;
use crate::files::AdapterConfig;
use crate::model::CONFIG_FILE;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use peft_models::{KvCache, Llama};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::path::Path;

/// The adapter file's only tensor.
pub const EMBEDDINGS_KEY: &str = "prompt_embeddings";

/// How prompt tuning initialises its virtual tokens (PEFT's `prompt_tuning_init`).
#[derive(Debug, Clone)]
pub enum PromptInit {
    /// N(0, 1), as `nn.Embedding` initialises.
    Random,
    /// Rows of the model's token embeddings drawn at random.
    SampleVocab,
    /// The embeddings of these tokens, repeated or cut to the number of virtual tokens.
    Text(Vec<u32>),
}

pub struct PromptModel {
    pub base: Llama,
    pub config: PromptConfig,
    /// `[virtual tokens, hidden]` (prompt) or `[virtual tokens, 2 · layers · kv_heads · head_dim]`
    /// (prefix: per layer a key and a value, each `kv_heads × head_dim`).
    pub embeddings: Var,
    /// Prefix tuning's reparameterization while training (`prefix_projection`); `None` once
    /// loaded from a file, which holds its output.
    pub projection: Option<PrefixProjection>,
}

/// PEFT's `prefix_projection`: the prefixes are the output of Embedding → Linear → tanh →
/// Linear while training, and saving stores that output, so the file keeps the plain layout.
pub struct PrefixProjection {
    /// Embedding `[virtual tokens, token_dim]`, then `[hidden, token_dim]` + `[hidden]` and
    /// `[width, hidden]` + `[width]`, under [`PROJECTION_KEYS`].
    pub params: [Var; 5],
}

/// Keys of the projection's tensors (PEFT's `prompt_encoder` module names, adapter name dropped).
pub const PROJECTION_KEYS: [&str; 5] = [
    "prompt_encoder.embedding.weight",
    "prompt_encoder.transform.0.weight",
    "prompt_encoder.transform.0.bias",
    "prompt_encoder.transform.2.weight",
    "prompt_encoder.transform.2.bias",
];

/// Virtual tokens take positions ahead of the real ones: more than the model has would leave
/// no room for the text (and a huge count would only run out of memory).
fn check_fits(base: &Llama, n: usize) -> Result<()> {
    let max = base.config.max_position_embeddings;
    if n >= max {
        bail!("{n} virtual tokens leave no room for text: the model has {max} positions");
    }
    Ok(())
}

/// Prefix tuning fills the key/value cache; on sliding-window layers transformers keeps only
/// the last window of it, which this crate does not reproduce, and partial or interleaved
/// rotary models keep their cached keys' head dims in another order here.
fn check_prefix_supported(base: &Llama) -> Result<()> {
    let c = &base.config;
    let reason = match () {
        _ if c.layer_windows.iter().any(Option::is_some) => "sliding-window layers",
        _ if c.rotary_dim != c.head_dim => "partial rotary embeddings",
        _ if c.rope_interleaved => "interleaved rotary embeddings",
        _ => return Ok(()),
    };
    bail!(
        "prefix tuning and P-tuning v2 are not supported on models with {reason} ({}); use \
         LoRA, IA3 or prompt tuning",
        c.model_type
    )
}

impl PrefixProjection {
    /// PEFT's init: N(0, 1) embedding, `nn.Linear`'s U(±1/√fan_in) layers.
    fn new(
        n: usize,
        token_dim: usize,
        hidden: usize,
        width: usize,
        seed: u64,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED);
        let mut uniform = |len: usize, fan_in: usize| -> Vec<f32> {
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..len)
                .map(|_| rand::Rng::random_range(&mut rng, -bound..bound))
                .collect()
        };
        let tensors = [
            Tensor::from_vec(normal(n * token_dim, seed), (n, token_dim), device)?,
            Tensor::from_vec(
                uniform(hidden * token_dim, token_dim),
                (hidden, token_dim),
                device,
            )?,
            Tensor::from_vec(uniform(hidden, token_dim), hidden, device)?,
            Tensor::from_vec(uniform(width * hidden, hidden), (width, hidden), device)?,
            Tensor::from_vec(uniform(width, hidden), width, device)?,
        ];
        let vars = tensors
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params: vars
                .try_into()
                .map_err(|_| anyhow::anyhow!("5 projection tensors"))?,
        })
    }

    /// `[virtual tokens, width]` prefixes.
    fn forward(&self) -> Result<Tensor> {
        let [e, w1, b1, w2, b2] = self
            .params
            .each_ref()
            .map(|v| peft_ops::param(v.as_tensor()));
        let h = e.matmul(&w1.t()?)?.broadcast_add(&b1)?.tanh()?;
        Ok(h.matmul(&w2.t()?)?.broadcast_add(&b2)?)
    }
}

fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dist = Normal::new(0.0f32, 1.0).expect("valid normal");
    (0..n).map(|_| dist.sample(&mut rng)).collect()
}

impl PromptModel {
    fn base_config(base: &Llama, peft_type: &str, n: usize, token_dim: usize) -> PromptConfig {
        let c = &base.config;
        PromptConfig {
            peft_type: peft_type.into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            num_virtual_tokens: n,
            token_dim: Some(token_dim),
            num_layers: Some(c.num_hidden_layers),
            num_attention_heads: Some(if peft_type == PREFIX_TUNING {
                c.num_key_value_heads
            } else {
                c.num_attention_heads
            }),
            num_transformer_submodules: Some(1),
            prompt_tuning_init: None,
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            prefix_projection: None,
            encoder_hidden_size: None,
            other: Default::default(),
        }
    }

    /// Fresh prompt tuning with `n` virtual tokens.
    pub fn new_prompt_tuning(base: Llama, n: usize, init: PromptInit, seed: u64) -> Result<Self> {
        if n == 0 {
            bail!("prompt tuning needs at least 1 virtual token");
        }
        check_fits(&base, n)?;
        let d = base.config.hidden_size;
        let mut config = Self::base_config(&base, PROMPT_TUNING, n, d);
        let values = match &init {
            PromptInit::Random => Tensor::from_vec(normal(n * d, seed), (n, d), &base.device)?,
            PromptInit::SampleVocab => {
                let vocab = base.config.vocab_size as u32;
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let ids: Vec<u32> = (0..n)
                    .map(|_| rand::Rng::random_range(&mut rng, 0..vocab))
                    .collect();
                base.embedding_rows(&Tensor::new(ids.as_slice(), &base.device)?)?
            }
            PromptInit::Text(ids) => {
                if ids.is_empty() {
                    bail!("the prompt tuning init text has no tokens");
                }
                let ids: Vec<u32> = ids.iter().copied().cycle().take(n).collect();
                base.embedding_rows(&Tensor::new(ids.as_slice(), &base.device)?)?
            }
        };
        config.prompt_tuning_init = Some(
            match init {
                PromptInit::Random => "RANDOM",
                PromptInit::SampleVocab => "SAMPLE_VOCAB",
                PromptInit::Text(_) => "TEXT",
            }
            .into(),
        );
        let embeddings = Var::from_tensor(&values.to_dtype(DType::F32)?)?;
        Ok(Self {
            base,
            config,
            embeddings,
            projection: None,
        })
    }

    /// Fresh prefix tuning (P-tuning v2) with `n` virtual tokens per layer, N(0, 1) init; with
    /// `projection = Some(hidden)`, trained through PEFT's reparameterization MLP.
    pub fn new_prefix_tuning(
        base: Llama,
        n: usize,
        seed: u64,
        projection: Option<usize>,
    ) -> Result<Self> {
        if n == 0 {
            bail!("prefix tuning needs at least 1 virtual token");
        }
        check_fits(&base, n)?;
        check_prefix_supported(&base)?;
        if projection == Some(0) {
            bail!("the prefix projection needs an encoder_hidden_size of at least 1");
        }
        let c = &base.config;
        let token_dim = c.num_key_value_heads * c.head_dim;
        let width = 2 * c.num_hidden_layers * token_dim;
        let mut config = Self::base_config(&base, PREFIX_TUNING, n, token_dim);
        config.prefix_projection = Some(projection.is_some());
        config.encoder_hidden_size = Some(projection.unwrap_or(token_dim));
        let projection = projection
            .map(|hidden| PrefixProjection::new(n, token_dim, hidden, width, seed, &base.device))
            .transpose()?;
        let values = Tensor::from_vec(normal(n * width, seed), (n, width), &base.device)?;
        Ok(Self {
            embeddings: Var::from_tensor(&values)?,
            base,
            config,
            projection,
        })
    }

    /// The `[virtual tokens, width]` shape this model needs.
    fn expected_shape(base: &Llama, config: &PromptConfig) -> (usize, usize) {
        let c = &base.config;
        let n = config.num_virtual_tokens;
        if config.is_prefix() {
            (
                n,
                2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim,
            )
        } else {
            (n, c.hidden_size)
        }
    }

    /// Loads a PEFT prompt- or prefix-tuning folder onto `base`.
    pub fn load(mut base: Llama, dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("adapter folder not found: {}", dir.display());
        }
        let config = PromptConfig::from_file(&dir.join(CONFIG_FILE))?;
        if config.is_prefix() {
            check_prefix_supported(&base)?;
        }
        let (path, mut tensors) = read_adapter_weights(dir, &base.device)?;
        // A grown vocabulary's embedding and head, keyed under `base_model.` alone (prompt
        // learning has no tuner wrapper, whose `model.` LoRA's keys carry).
        for module in [crate::tokens::embedding_path(&base), "lm_head".into()] {
            if let Some(t) = tensors.remove(&format!("base_model.{module}.weight")) {
                tensors.insert(crate::keys::file_key(&module, "weight"), t);
            }
        }
        crate::tokens::take_grown_embeddings(
            &mut base,
            &mut tensors,
            &path,
            crate::tokens::GROWN_EMBEDDING,
        )?;
        let t = tensors
            .remove(EMBEDDINGS_KEY)
            .with_context(|| format!("{} has no {EMBEDDINGS_KEY}", path.display()))?;
        if let Some(extra) = tensors.keys().next() {
            bail!("{}: unexpected tensor {extra}", path.display());
        }
        let want = Self::expected_shape(&base, &config);
        if t.dims() != [want.0, want.1] {
            bail!(
                "{}: {EMBEDDINGS_KEY} has shape {:?}, this model needs [{}, {}]",
                path.display(),
                t.dims(),
                want.0,
                want.1
            );
        }
        Ok(Self {
            base,
            config,
            embeddings: Var::from_tensor(&t.to_dtype(DType::F32)?)?,
            projection: None,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` as PEFT does.
    pub fn save(&self, dir: &Path, base_model_name: &str) -> Result<()> {
        let tensors = [(EMBEDDINGS_KEY.to_string(), self.values()?.detach())];
        let config = self.config.for_saving(base_model_name);
        write_adapter(dir, &tensors, &config.to_json_string()?)
    }

    /// The virtual tokens' values: the plain tensor, or the projection's output.
    pub fn values(&self) -> Result<Tensor> {
        match &self.projection {
            Some(p) => p.forward(),
            None => Ok(peft_ops::param(self.embeddings.as_tensor())),
        }
    }

    /// Trainable tensors by key: the projection's while it exists, else `prompt_embeddings`.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        match &self.projection {
            Some(p) => PROJECTION_KEYS
                .iter()
                .zip(&p.params)
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            None => vec![(EMBEDDINGS_KEY.to_string(), self.embeddings.clone())],
        }
    }

    pub fn num_virtual_tokens(&self) -> usize {
        self.config.num_virtual_tokens
    }

    /// Rows of output that belong to virtual tokens (prompt tuning returns them, as PEFT does).
    pub fn output_offset(&self) -> usize {
        if self.config.is_prefix() {
            0
        } else {
            self.num_virtual_tokens()
        }
    }

    /// Per layer, the virtual keys and values `[batch, kv_heads, virtual tokens, head_dim]`
    /// (no RoPE: PEFT stores them as they go into the cache).
    pub fn prefix_cache(&self, batch: usize) -> Result<KvCache> {
        let c = &self.base.config;
        let (n, layers, kvh, hd) = (
            self.num_virtual_tokens(),
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
        );
        let e = self
            .values()?
            .to_dtype(self.base.dtype)?
            .reshape((n, 2 * layers, kvh, hd))?;
        let mut cache = KvCache::new(layers);
        for l in 0..layers {
            let part = |i: usize| -> Result<Tensor> {
                Ok(e.narrow(1, 2 * l + i, 1)?
                    .squeeze(1)?
                    .transpose(0, 1)?
                    .unsqueeze(0)?
                    .broadcast_as((batch, kvh, n, hd))?
                    .contiguous()?)
            };
            cache.set(l, part(0)?, part(1)?);
        }
        Ok(cache)
    }

    /// `attention_mask` with ones for the virtual tokens in front.
    fn extended_mask(&self, mask: Option<&Tensor>, batch: usize) -> Result<Option<Tensor>> {
        let Some(m) = mask else { return Ok(None) };
        let ones = Tensor::ones((batch, self.num_virtual_tokens()), m.dtype(), m.device())?;
        Ok(Some(Tensor::cat(&[&ones, m], 1)?))
    }

    /// Final hidden states `[batch, (virtual +) seq, hidden]`: prompt tuning's start with its
    /// virtual tokens' rows; prefix tuning's cover the real tokens only (their positions
    /// continue after the prefix, as transformers offsets them by the cache length).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, _) = input_ids.dims2()?;
        let mask = self.extended_mask(attention_mask, b)?;
        if self.config.is_prefix() {
            let mut cache = self.prefix_cache(b)?;
            return self
                .base
                .forward(input_ids, mask.as_ref(), Some(&mut cache), train);
        }
        let prompt = self.values()?.to_dtype(self.base.dtype)?.unsqueeze(0)?;
        let prompt = prompt.broadcast_as((b, prompt.dim(1)?, prompt.dim(2)?))?;
        let embeds = Tensor::cat(&[&prompt, &self.base.input_embeds(input_ids, train)?], 1)?;
        self.base
            .forward_embeds(&embeds, mask.as_ref(), None, train)
    }
}
