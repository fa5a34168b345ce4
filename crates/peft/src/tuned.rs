//! What every method's model offers the trainer and checkpoints: a frozen base, trainable
//! tensors under their file keys, a forward pass and PEFT-format saving.

use crate::{PeftModel, PromptModel};
use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use peft_models::Llama;
use peft_quant::FourBit;
use std::path::Path;

pub trait Tuned {
    fn base(&self) -> &Llama;
    fn base_mut(&mut self) -> &mut Llama;
    /// Trainable tensors by file key, sorted.
    fn trainable(&self) -> Vec<(String, Var)>;
    /// Final hidden states `[batch, rows, hidden]` and how many leading rows belong to
    /// virtual tokens rather than to `input_ids`. By default the base model's forward pass
    /// (adapters that live inside its layers), with no virtual rows.
    fn hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, usize)> {
        Ok((
            self.base()
                .forward(input_ids, attention_mask, None, train)?,
            0,
        ))
    }
    /// Writes the adapter folder as HF PEFT's `save_pretrained` does.
    fn save(&self, dir: &Path, base_model_name: &str) -> Result<()>;
    /// The trainable tensor `key` from what [`Tuned::save`] wrote for it (the same tensor,
    /// but for PiSSA's and OLoRA's converted adapters).
    fn trained_from_saved(&self, _key: &str, saved: Tensor) -> Result<Tensor> {
        Ok(saved)
    }
    /// The file [`Tuned::save`] writes the trainable tensors to.
    fn weights_file(&self) -> &'static str {
        crate::model::WEIGHTS_FILE
    }
    /// QLoRA's base, quantized after the adapters were made: every linear but the head to 4
    /// bits ([`Llama::quantize`]); LoRA's LoftQ initialises A and B from the quantization error.
    fn quantize_base(&mut self, kind: FourBit, double_quant: bool, dtype: DType) -> Result<()> {
        self.base_mut().quantize(kind, double_quant, dtype)
    }
    /// Seed of the dropout masks of the next forward pass (methods without dropout ignore it).
    fn set_dropout_seed(&self, _seed: u64) {}
    /// `(trainable, all)` parameters as PEFT counts them.
    fn parameter_counts(&mut self) -> (usize, usize);
    /// `trainable params: X || all params: Y || trainable%: Z`, as PEFT prints it.
    fn trainable_parameters_line(&mut self) -> String {
        let (t, a) = self.parameter_counts();
        format!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(t),
            thousands(a),
            100.0 * t as f64 / a as f64
        )
    }
}

pub(crate) fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Tuned for PeftModel {
    fn base(&self) -> &Llama {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Llama {
        &mut self.base
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        PeftModel::trainable(self)
    }
    fn save(&self, dir: &Path, base_model_name: &str) -> Result<()> {
        PeftModel::save(self, dir, base_model_name)
    }
    fn trained_from_saved(&self, key: &str, saved: Tensor) -> Result<Tensor> {
        PeftModel::trained_from_saved(self, key, saved)
    }
    fn quantize_base(&mut self, kind: FourBit, double_quant: bool, dtype: DType) -> Result<()> {
        PeftModel::quantize_base(self, kind, double_quant, dtype)
    }
    fn set_dropout_seed(&self, seed: u64) {
        self.dropout_seed.set(seed)
    }
    fn parameter_counts(&mut self) -> (usize, usize) {
        PeftModel::parameter_counts(self)
    }
}

impl Tuned for PromptModel {
    fn base(&self) -> &Llama {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Llama {
        &mut self.base
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        PromptModel::trainable(self)
    }
    fn hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, usize)> {
        Ok((
            self.forward(input_ids, attention_mask, train)?,
            self.output_offset(),
        ))
    }
    fn save(&self, dir: &Path, base_model_name: &str) -> Result<()> {
        PromptModel::save(self, dir, base_model_name)
    }
    fn parameter_counts(&mut self) -> (usize, usize) {
        let t: usize = PromptModel::trainable(self)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        (t, self.base.parameter_count() + t)
    }
}
