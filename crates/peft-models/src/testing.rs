//! Tiny random Llama models for unit tests (no files needed).

use crate::config::LlamaConfig;
use crate::llama::Llama;
use crate::shapes::WeightKind;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

/// A 2-layer GQA Llama (hidden 32, MLP 64, 4 heads, 2 kv heads, vocab 64) with N(0, 0.2²) weights.
pub fn tiny_llama(seed: u64, tie_word_embeddings: bool) -> Result<Llama> {
    let config = LlamaConfig::from_json(json!({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": tie_word_embeddings,
    }))?;
    let dev = Device::Cpu;
    let mut rng = SeededNormal::new(seed);
    let mut randn = |shape: &[usize]| rng.tensor(shape, 0.2, &dev);
    let w = crate::shapes::llama_weights(&config, |kind, shape| match kind {
        WeightKind::Matrix => randn(shape),
        WeightKind::Norm => Ok((randn(shape)? + 1.0)?),
        WeightKind::Bias => randn(shape),
    })?;
    Llama::from_weights(config, w, &dev, DType::F32)
}

/// N(0, std²) values from a seed by splitmix64 + Box-Muller, the same on every platform
/// (candle's CPU `randn` takes no seed, so tests that compare numbers draw from this).
pub struct SeededNormal {
    state: u64,
}

impl SeededNormal {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_add(0x9E37_79B9_7F4A_7C15),
        }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn tensor(&mut self, shape: &[usize], std: f64, dev: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let (u1, u2) = (self.uniform().max(1e-12), self.uniform());
                (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, dev)?)
    }
}

fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The default GGUF model for integration tests (`scripts/fetch-model.sh` fetches it;
/// `PEFT_TEST_MODEL` overrides the path). `None` means skip, unless `PEFT_REQUIRE_MODEL` is
/// set (the test script sets it, so a missing model fails there).
pub fn default_model() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PEFT_TEST_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("PEFT_REQUIRE_MODEL").is_none(),
        "{} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    eprintln!(
        "skipping: {} not found (run scripts/fetch-model.sh)",
        path.display()
    );
    None
}

/// `../shared/golden` beside the checkout: HF PEFT's reference outputs.
pub fn golden_dir() -> std::path::PathBuf {
    repo_root().join("../shared/golden")
}

/// The shipped training data.
pub fn shipped_data() -> std::path::PathBuf {
    repo_root().join("data/pirate_qa.jsonl")
}

/// Largest absolute element-wise difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
}

/// Largest absolute element of a tensor (a scale for relative tolerances).
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
