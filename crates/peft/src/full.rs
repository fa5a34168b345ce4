//! Full fine-tuning: every tensor of the base model is trained (no adapter). Saved as a
//! complete HF model folder, the baseline the parameter-efficient methods are measured against.

use crate::Tuned;
use anyhow::Result;
use candle_core::Var;
use peft_models::Llama;
use std::path::Path;

/// Weights file of a saved model.
pub const MODEL_FILE: &str = "model.safetensors";

pub struct FullModel {
    pub base: Llama,
    vars: Vec<(String, Var)>,
}

impl FullModel {
    /// Makes every tensor of `base` trainable (fails on a quantized base).
    pub fn new(mut base: Llama) -> Result<Self> {
        let vars = base.make_trainable()?;
        Ok(Self { base, vars })
    }
}

impl Tuned for FullModel {
    fn base(&self) -> &Llama {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Llama {
        &mut self.base
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }
    /// Writes an HF model folder (config.json, model.safetensors, generation_config.json); the
    /// tokenizer files are the caller's to add.
    fn save(&self, dir: &Path, _base_model_name: &str) -> Result<()> {
        let mut model = self.base.clone();
        peft_models::save::save_hf_model(&mut model, None, dir, self.base.dtype)
    }
    fn weights_file(&self) -> &'static str {
        MODEL_FILE
    }
    fn parameter_counts(&mut self) -> (usize, usize) {
        // An image-text model's vision tower stays frozen (on disk).
        let n = self.base.parameter_count();
        (n - self.base.other_parameter_count(), n)
    }
}
