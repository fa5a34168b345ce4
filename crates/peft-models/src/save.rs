//! Writes a model as an HF folder that transformers loads: config.json, model.safetensors,
//! generation_config.json and the tokenizer files.

use crate::config::ExpertStorage;
use crate::io::{save_safetensors, write_atomic};
use crate::llama::Llama;
use crate::loader::{image_text_checkpoint_name, StoredTensor};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// `tensors` with each layer's experts (`mlp.experts.3.gate_proj.weight`, ...) stacked as the
/// checkpoints that so store them hold them (see [`ExpertStorage`]): `mlp.experts.gate_up_proj`
/// `[experts, 2 · size, hidden]` (gate first) and `mlp.experts.down_proj` `[experts, hidden,
/// size]`; gpt-oss's transposed, gate and up interleaved, with their biases.
fn stacked_experts(
    tensors: Vec<(String, Tensor)>,
    storage: ExpertStorage,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    // Per block and kind (weight, bias), per expert: gate, up, down.
    type Experts = Vec<[Option<Tensor>; 3]>;
    let mut blocks: std::collections::BTreeMap<(String, String), Experts> = Default::default();
    for (name, t) in tensors {
        let parsed = name.rsplit_once(".experts.").and_then(|(block, rest)| {
            let (e, rest) = rest.split_once('.')?;
            let (proj, what) = rest.split_once('.')?;
            let slot = ["gate_proj", "up_proj", "down_proj"]
                .iter()
                .position(|p| *p == proj)?;
            let what = ["weight", "bias"].into_iter().find(|w| *w == what)?;
            Some((
                block.to_string(),
                what.to_string(),
                e.parse::<usize>().ok()?,
                slot,
            ))
        });
        let Some((block, what, e, slot)) = parsed else {
            out.push((name, t));
            continue;
        };
        let experts = blocks.entry((block, what)).or_default();
        if experts.len() <= e {
            experts.resize(e + 1, [None, None, None]);
        }
        experts[e][slot] = Some(t);
    }
    let gpt_oss = storage == ExpertStorage::GptOss;
    for ((block, what), experts) in blocks {
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for (e, [gate, up, d]) in experts.into_iter().enumerate() {
            let missing = || anyhow::anyhow!("{block}: expert {e} lacks a projection's {what}");
            let (gate, up, d) = (
                gate.ok_or_else(missing)?,
                up.ok_or_else(missing)?,
                d.ok_or_else(missing)?,
            );
            match gpt_oss {
                // Gate j and up j side by side; weights as `[in, out]`.
                true => {
                    let pairs = Tensor::stack(&[&gate, &up], 1)?;
                    let mut shape = gate.dims().to_vec();
                    shape[0] *= 2;
                    let fused = pairs.reshape(shape)?;
                    match what.as_str() {
                        "weight" => {
                            gate_up.push(fused.t()?.contiguous()?);
                            down.push(d.t()?.contiguous()?);
                        }
                        _ => {
                            gate_up.push(fused);
                            down.push(d);
                        }
                    }
                }
                false => {
                    gate_up.push(Tensor::cat(&[gate, up], 0)?);
                    down.push(d);
                }
            }
        }
        let suffix = match what.as_str() {
            "weight" => "",
            _ => "_bias",
        };
        out.push((
            format!("{block}.experts.gate_up_proj{suffix}"),
            Tensor::stack(&gate_up, 0)?,
        ));
        out.push((
            format!("{block}.experts.down_proj{suffix}"),
            Tensor::stack(&down, 0)?,
        ));
    }
    Ok(out)
}

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
    let kind = model
        .config
        .image_text
        .as_ref()
        .and_then(|whole| whole.get("model_type")?.as_str())
        .map(str::to_string);
    let mut tensors = model
        .named_tensors()?
        .into_iter()
        .map(|(k, t)| {
            let name = match &kind {
                Some(kind) => image_text_checkpoint_name(kind, &k),
                None => k,
            };
            // GLM-4.5's choice corrections stay f32, as transformers keeps and saves them.
            let dtype = match name.ends_with(".e_score_correction_bias") {
                true => DType::F32,
                false => dtype,
            };
            Ok((name, t.detach().to_dtype(dtype)?))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(m) = model.config.moe.as_ref() {
        if m.storage != ExpertStorage::PerExpert {
            tensors = stacked_experts(tensors, m.storage)?;
        }
    }
    tensors.extend(read_stored(&model.other_tensors, dtype)?);
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors(&dir.join("model.safetensors"), &tensors, Some(meta))?;
    let mut config = match &model.config.image_text {
        Some(whole) => {
            let mut whole = whole.clone();
            whole["text_config"] = model.config.raw.clone();
            copy_processor_files(&model.other_tensors, dir)?;
            whole
        }
        None => model.config.raw.clone(),
    };
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
        // Generation stops at the tokenizer's EOS too where it is not the model's (a chat
        // template of its own), as TRL's SFT trainer adds it to the generation config.
        if let Some(eos) = tok.eos_token_id().map(|e| json!(e)) {
            let listed = match generation.get("eos_token_id") {
                Some(Value::Array(ids)) => ids.clone(),
                Some(Value::Null) | None => Vec::new(),
                Some(id) => vec![id.clone()],
            };
            if !listed.contains(&eos) {
                generation["eos_token_id"] = match listed.is_empty() {
                    true => eos,
                    false => Value::Array([vec![eos], listed].concat()),
                };
            }
        }
        tok.save_hf(dir)?;
    }
    write_atomic(
        &dir.join("generation_config.json"),
        crate::io::sorted_pretty_json(&generation)?.as_bytes(),
    )
}

/// The tensors `stored` names, read from their files; floating-point ones in `dtype`.
fn read_stored(stored: &[StoredTensor], dtype: DType) -> Result<Vec<(String, Tensor)>> {
    let mut files: Vec<&Path> = stored.iter().map(|s| s.file.as_path()).collect();
    files.sort();
    files.dedup();
    let mut out = Vec::with_capacity(stored.len());
    for file in files {
        let names: HashSet<&str> = stored
            .iter()
            .filter(|s| s.file == file)
            .map(|s| s.name.as_str())
            .collect();
        let mut take = |name: String, t: Tensor| -> Result<()> {
            // FP8 and bitsandbytes' 4-bit parts only read right with the checkpoint's
            // quantization_config, which a model saved with its language model dequantized
            // drops.
            if t.dtype() == DType::F8E4M3 || name.contains(".quant_state.") {
                bail!(
                    "{name} (outside the language model) is stored quantized, which the saved model could not read: save from the model's unquantized weights"
                );
            }
            let t = match t.dtype().is_float() {
                true => t.to_dtype(dtype)?,
                false => t,
            };
            out.push((name, t));
            Ok(())
        };
        if file.extension().is_some_and(|e| e == "bin") {
            for (name, t) in crate::io::load_pytorch(file, &Device::Cpu)? {
                if names.contains(name.as_str()) {
                    take(name, t)?;
                }
            }
            continue;
        }
        let data =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        // SAFETY: read-only, and dropped before this function returns (see the loader).
        let mmap = unsafe { memmap2::Mmap::map(&data) }
            .with_context(|| format!("cannot map {}", file.display()))?;
        let wanted = |name: &str, _: &[usize]| names.contains(name);
        crate::io::for_each_safetensor(&mmap, file, &Device::Cpu, wanted, &mut take)?;
    }
    if out.len() != stored.len() {
        bail!(
            "the checkpoint's files changed since it was loaded: {} of its {} tensors outside the language model are left",
            out.len(),
            stored.len()
        );
    }
    Ok(out)
}

/// An image-text model's processor settings (image size, normalisation, the processor's
/// class), copied from the folder its weights came from, so that the saved model still takes
/// images.
fn copy_processor_files(stored: &[StoredTensor], dir: &Path) -> Result<()> {
    let Some(source) = stored.first().and_then(|s| s.file.parent()) else {
        return Ok(());
    };
    for name in ["preprocessor_config.json", "processor_config.json"] {
        let from = source.join(name);
        if from.is_file() && source != dir {
            let bytes =
                std::fs::read(&from).with_context(|| format!("cannot read {}", from.display()))?;
            write_atomic(&dir.join(name), &bytes)?;
        }
    }
    Ok(())
}
