use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The fields of a Llama-family `config.json` (Llama 2/3, Mistral, Qwen2/3, SmolLM2) that the
/// forward pass needs. `raw` keeps the file as read so that `peft merge` writes it back intact.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2 always, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias` covers it too).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm of each query and key head before RoPE (Qwen3's `q_norm` / `k_norm`).
    pub qk_norm: bool,
    pub raw: Value,
}

/// Llama 3.1+ frequency-dependent RoPE scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

impl LlamaConfig {
    pub fn from_json(raw: Value) -> Result<Self> {
        let c: RawConfig = serde_json::from_value(raw.clone())
            .context("config.json is not a Llama-family config")?;
        let model_type = c.model_type.unwrap_or_else(|| "llama".into());
        if !SUPPORTED.contains(&model_type.as_str()) {
            bail!("unsupported model_type {model_type:?} (supported: {SUPPORTED:?})");
        }
        // transformers 5 moved rope settings into `rope_parameters`; older files use
        // `rope_theta` + `rope_scaling`.
        let rope = c.rope_parameters.or(c.rope_scaling);
        let rope_theta = c
            .rope_theta
            .or_else(|| rope.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10_000.0);
        let rope_type = rope
            .as_ref()
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let rope_scaling = match rope_type {
            "default" => None,
            "llama3" => Some(
                serde_json::from_value(rope.clone().unwrap_or_default())
                    .context("rope scaling of type llama3 lacks a field")?,
            ),
            other => bail!("unsupported rope_type {other:?} (supported: default, llama3)"),
        };
        if c.num_attention_heads == 0
            || !c.hidden_size.is_multiple_of(c.num_attention_heads) && c.head_dim.is_none()
        {
            bail!("config.json: hidden_size is not divisible by num_attention_heads");
        }
        let num_key_value_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        if num_key_value_heads == 0 || !c.num_attention_heads.is_multiple_of(num_key_value_heads) {
            bail!("config.json: num_attention_heads is not a multiple of num_key_value_heads");
        }
        if raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            bail!("sliding-window attention (use_sliding_window: true) is not supported");
        }
        let qwen = model_type == "qwen2";
        Ok(Self {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads,
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            qkv_bias: qwen || c.attention_bias,
            o_bias: c.attention_bias,
            mlp_bias: c.mlp_bias,
            qk_norm: model_type == "qwen3",
            model_type,
            raw,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(raw).with_context(|| format!("in {}", path.display()))
    }

    /// Inverse frequencies of RoPE, one per pair of head dims.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        // Rounded as transformers rounds them (float32 tensors: the exponent in f32, the
        // power rounded to f32, then the reciprocal): some differ from the exact values in
        // the last bit, and models with large attention scores amplify that.
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / d as f32;
                1.0 / self.rope_theta.powf(exponent as f64) as f32
            })
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        let factor = s.factor as f32;
        let (low, high) = (s.low_freq_factor as f32, s.high_freq_factor as f32);
        let old_ctx = s.original_max_position_embeddings as f32;
        let low_wavelen = old_ctx / low;
        let high_wavelen = old_ctx / high;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / factor
                } else {
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
    }
}
