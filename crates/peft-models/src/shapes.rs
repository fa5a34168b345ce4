//! Random-weight Llama models of well-known shapes, built directly on the device: throughput
//! and memory depend on the shape alone, so benchmarks need no checkpoint download.

use crate::config::LlamaConfig;
use crate::llama::Llama;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::HashMap;

/// Shape names accepted by [`shape_config`].
pub const SHAPES: &[&str] = &["smollm2-135m", "llama-3.2-1b", "llama-3-8b"];

/// The config of a named shape (the same shapes as `shared/gpu/anchor_hf.py`).
pub fn shape_config(name: &str) -> Result<LlamaConfig> {
    let (h, layers, heads, kv, inter, vocab, tied) = match name {
        "smollm2-135m" | "smol" => (576, 30, 9, 3, 1536, 49152, true),
        "llama-3.2-1b" | "1b" => (2048, 16, 32, 8, 8192, 128256, true),
        "llama-3-8b" | "8b" => (4096, 32, 32, 8, 14336, 128256, false),
        _ => bail!(
            "unknown model shape {name:?} (known: {})",
            SHAPES.join(", ")
        ),
    };
    LlamaConfig::from_json(json!({
        "model_type": "llama", "hidden_size": h, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter,
        "vocab_size": vocab, "tie_word_embeddings": tied, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 8192,
    }))
}

/// A model of `config` with N(0, 0.02²) weights (HF's `initializer_range`) and unit norms.
/// The weights are a pure function of `seed` and the tensor ([`peft_ops::random_normal`]),
/// drawn on the device: the same seed gives the same model on every device (on a GPU, up to
/// the last bit of a rare value).
pub fn random_llama(
    config: LlamaConfig,
    device: &Device,
    dtype: DType,
    seed: u64,
) -> Result<Llama> {
    let c = &config;
    let mut stream = 0u64;
    let mut randn = |shape: &[usize]| -> Result<Tensor> {
        stream += 1;
        Ok(peft_ops::random_normal(
            seed, stream, shape, 0.02, dtype, device,
        )?)
    };
    let w = llama_weights(c, |kind, shape| match kind {
        WeightKind::Matrix => randn(shape),
        // A norm at its init scales by 1 (Gemma stores the scale as an offset from 1).
        WeightKind::Norm if c.norm_adds_one => Ok(Tensor::zeros(shape, dtype, device)?),
        WeightKind::Norm => Ok(Tensor::ones(shape, dtype, device)?),
        WeightKind::Bias => Ok(Tensor::zeros(shape, dtype, device)?),
    })?;
    Llama::from_weights(config, w, device, dtype)
}

/// What an initialiser is asked for.
pub enum WeightKind {
    /// Embeddings and projections.
    Matrix,
    /// RMSNorm scales.
    Norm,
    /// Projection biases (models with attention or MLP biases).
    Bias,
}

/// Every tensor of a Llama of `config`, under its checkpoint name, from `init(kind, shape)`
/// called in checkpoint order: embeddings; per layer the projections of
/// [`LlamaConfig::layer_linears`] (each with its bias where it has one), a mixture-of-experts
/// block's router and experts, then the two norms
/// (Gemma's four, and the query and key norms of Qwen3 and Gemma 3); the final norm; `lm_head`
/// when untied.
pub fn llama_weights(
    c: &LlamaConfig,
    mut init: impl FnMut(WeightKind, &[usize]) -> Result<Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let h = c.hidden_size;
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        init(WeightKind::Matrix, &[c.vocab_size, h])?,
    );
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for lin in &c.layer_linears(l) {
            let name = lin.name;
            w.insert(
                format!("{p}.{name}.weight"),
                init(WeightKind::Matrix, &[lin.out, lin.inp])?,
            );
            if lin.bias {
                w.insert(
                    format!("{p}.{name}.bias"),
                    init(WeightKind::Bias, &[lin.out])?,
                );
            }
        }
        if let Some(moe) = c.sparse_moe(l) {
            let (e, size) = (moe.num_experts, moe.expert_size);
            let router = format!("{p}.{}", moe.router_path());
            w.insert(
                format!("{router}.weight"),
                init(WeightKind::Matrix, &[e, h])?,
            );
            if moe.biases {
                w.insert(format!("{router}.bias"), init(WeightKind::Bias, &[e])?);
            }
            if let Some(cb) = moe.choice_bias {
                let name = format!("{p}.{}", cb.path());
                w.insert(name, init(WeightKind::Bias, &cb.shape(e))?);
            }
            for expert in 0..e {
                let shapes = [[size, h], [size, h], [h, size]];
                for (path, shape) in moe.expert_paths(expert).iter().zip(shapes) {
                    w.insert(
                        format!("{p}.{path}.weight"),
                        init(WeightKind::Matrix, &shape)?,
                    );
                    if moe.biases {
                        w.insert(
                            format!("{p}.{path}.bias"),
                            init(WeightKind::Bias, &shape[..1])?,
                        );
                    }
                }
            }
        }
        if let Some(m) = &c.latent_attention {
            if let Some(r) = m.q_lora_rank {
                let name = format!("{p}.self_attn.q_a_layernorm.weight");
                w.insert(name, init(WeightKind::Norm, &[r])?);
            }
            let name = format!("{p}.self_attn.kv_a_layernorm.weight");
            w.insert(name, init(WeightKind::Norm, &[m.kv_lora_rank])?);
        }
        if c.attention_sinks {
            w.insert(
                format!("{p}.self_attn.sinks"),
                init(WeightKind::Bias, &[c.num_attention_heads])?,
            );
        }
        for norm in c.norms.names() {
            w.insert(format!("{p}.{norm}.weight"), init(WeightKind::Norm, &[h])?);
        }
        if let Some(sizes) = c.qk_norm_sizes() {
            for (norm, size) in ["q_norm", "k_norm"].into_iter().zip(sizes) {
                w.insert(
                    format!("{p}.self_attn.{norm}.weight"),
                    init(WeightKind::Norm, &[size])?,
                );
            }
        }
    }
    w.insert(
        "model.norm.weight".to_string(),
        init(WeightKind::Norm, &[h])?,
    );
    if !c.tie_word_embeddings {
        w.insert(
            "lm_head.weight".to_string(),
            init(WeightKind::Matrix, &[c.vocab_size, h])?,
        );
    }
    Ok(w)
}
