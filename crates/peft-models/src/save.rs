//! Writes a model as an HF folder that transformers loads: config.json, model.safetensors,
//! generation_config.json and the tokenizer files.

use crate::io::{save_safetensors, write_atomic};
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use candle_core::DType;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

pub fn save_hf_model(
    model: &mut Llama,
    tokenizer: Option<&Tokenizer>,
    dir: &Path,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors = model
        .named_tensors()?
        .into_iter()
        .map(|(k, t)| Ok((k, t.detach().to_dtype(dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors(&dir.join("model.safetensors"), &tensors, Some(meta))?;
    let mut config = model.config.raw.clone();
    if let Value::Object(obj) = &mut config {
        obj.insert("torch_dtype".into(), json!(dtype_name(dtype)));
        obj.insert("dtype".into(), json!(dtype_name(dtype)));
        obj.entry("architectures")
            .or_insert(json!(["LlamaForCausalLM"]));
    }
    write_atomic(
        &dir.join("config.json"),
        crate::io::sorted_pretty_json(&config)?.as_bytes(),
    )?;
    let mut generation = json!({});
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.get(key) {
            generation[key] = v.clone();
        }
    }
    if let Some(tok) = tokenizer {
        if generation.get("pad_token_id").is_none() {
            if let Some(p) = tok.pad_token_id() {
                generation["pad_token_id"] = json!(p);
            }
        }
        tok.save_hf(dir)?;
    }
    write_atomic(
        &dir.join("generation_config.json"),
        crate::io::sorted_pretty_json(&generation)?.as_bytes(),
    )
}
