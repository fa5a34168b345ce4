//! A LoRA adapter as a GGUF LoRA file that llama.cpp applies to its base at run time
//! (`llama-cli --lora`, `llama-server`, Ollama's `ADAPTER`), laid out as llama.cpp's
//! `convert_lora_to_gguf.py` lays it out: `<base tensor>.lora_a` = A `[r, in]` and `.lora_b` =
//! B `[out, r]` (q/k rows in llama.cpp's order), `adapter.lora.alpha`.

use crate::model::PeftModel;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use peft_models::gguf::{gguf_architecture, gguf_name, llama_cpp_rows, write_gguf, GgufType};
use std::path::Path;

impl PeftModel {
    /// Writes the adapter as a GGUF LoRA at `path`. llama.cpp scales each pair by
    /// `alpha / r`; where PEFT's scaling differs (rsLoRA, `alpha_pattern`), the file has no
    /// alpha and each B carries its own scaling, so llama.cpp computes the same update.
    /// What llama.cpp's LoRA cannot express (DoRA, trained biases or `modules_to_save`,
    /// an adapter on a tied output head) is an error that suggests merging instead.
    pub fn save_gguf_lora(&self, path: &Path, ty: GgufType, name: &str) -> Result<()> {
        if ty.is_mix() {
            let name = ty.name();
            bail!("{name} is a mix for whole models; write a LoRA in f32, f16, bf16 or q8_0");
        }
        let merge = "write the merged model instead (peft merge --output FILE.gguf)";
        if self.adapters.values().any(|l| l.magnitude.is_some()) {
            bail!("llama.cpp's LoRA has no DoRA; {merge}");
        }
        if self.base.embedding_lora.is_some() {
            bail!("llama.cpp's LoRA here holds linear layers' pairs, and this adapter also adapts the embedding; {merge}");
        }
        if self.config.adapts_parameters() {
            bail!("llama.cpp's LoRA here holds linear layers' pairs, and this adapter also adapts a mixture of experts' parameters; {merge}");
        }
        if let Some(key) = self.extra_trainable.keys().next() {
            bail!("llama.cpp's LoRA holds only LoRA pairs, and this adapter also trains {key}; {merge}");
        }
        let c = &self.base.config;
        let arch = gguf_architecture(c)?;
        let plain = self.adapters.values().all(|l| {
            let r = l.a.as_tensor().dim(0).unwrap_or(0) as f64;
            (l.scaling - self.config.lora_alpha / r).abs() <= 1e-9 * l.scaling.abs()
        });
        let mut tensors = Vec::new();
        for (path, layer) in &self.adapters {
            if path == "lm_head" && c.tie_word_embeddings {
                bail!("llama.cpp applies no LoRA to a tied output head (lm_head); {merge}");
            }
            let hf = format!("{path}.weight");
            let base = gguf_name(&hf, arch)
                .with_context(|| format!("llama.cpp has no tensor for {path}"))?;
            let a = layer.a.as_tensor().detach();
            let mut b = layer.b.as_tensor().detach();
            if !plain {
                b = (b * layer.scaling)?;
            }
            tensors.push((format!("{base}.lora_a"), a));
            tensors.push((format!("{base}.lora_b"), llama_cpp_rows(c, &hf, &b)?));
        }
        let mut metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String(arch.into()),
            ),
            ("general.type".into(), Value::String("adapter".into())),
            ("general.name".into(), Value::String(name.into())),
            ("adapter.type".into(), Value::String("lora".into())),
            ("general.quantization_version".into(), Value::U32(2)),
        ];
        if plain {
            metadata.push((
                "adapter.lora.alpha".into(),
                Value::F32(self.config.lora_alpha as f32),
            ));
        }
        write_gguf(path, &metadata, &tensors, ty)
    }
}
