//! Reads a base model from an HF folder (config.json + safetensors, memory-mapped) or a GGUF
//! file into tensors named as in the HF checkpoint, on the requested device and dtype.

use crate::config::{ExpertStorage, LlamaConfig, CAUSAL_LM_DECODER, IMAGE_TEXT_DECODER};
use crate::gguf;
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use peft_ops::QuantizedWeight;
use peft_quant::{Absmax, Blockwise8, FourBit, Quant4};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct LoadedModel {
    pub config: LlamaConfig,
    /// HF names (`model.layers.0.self_attn.q_proj.weight`, ...) to tensors.
    pub weights: HashMap<String, Tensor>,
    /// Decoder linear weights quantized as they were read ([`QuantizeOnLoad`]), by HF name.
    pub quantized: HashMap<String, Arc<QuantizedWeight>>,
    pub tokenizer: Option<Tokenizer>,
    /// An image-text checkpoint's tensors outside its language model, left unread.
    pub other_tensors: Vec<StoredTensor>,
}

impl LoadedModel {
    /// Builds the model's module tree; returns it with the tokenizer.
    pub fn into_model(self, device: &Device, dtype: DType) -> Result<(Llama, Option<Tokenizer>)> {
        let mut model =
            Llama::from_loaded(self.config, self.weights, self.quantized, device, dtype)?;
        model.other_tensors = self.other_tensors;
        Ok((model, self.tokenizer))
    }
}

/// A tensor left in its checkpoint file, by the name it has there.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredTensor {
    pub file: PathBuf,
    pub name: String,
    /// Its number of elements.
    pub elements: usize,
}

/// The module-tree name of an image-text checkpoint's tensor of the language model, as
/// transformers renames them on load (`language_model.model.layers.0...` is
/// `model.language_model.layers.0...`, `language_model.lm_head.weight` is `lm_head.weight`;
/// files saved in the new layout already use those), or `None` for the other parts (vision
/// tower, projector).
pub fn language_model_name(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("language_model.model.") {
        return Some(format!("{IMAGE_TEXT_DECODER}.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("language_model.") {
        return rest.starts_with("lm_head.").then(|| rest.to_string());
    }
    let ours = name.starts_with(&format!("{IMAGE_TEXT_DECODER}.")) || name.starts_with("lm_head.");
    ours.then(|| name.to_string())
}

/// The module-tree name of a language-model tensor that an image-text checkpoint keeps where a
/// causal LM keeps it (`model.layers.0...`, as Qwen2-VL's and Qwen2.5-VL's files do, beside
/// `visual.*`): `model.language_model.layers.0...`.
fn flat_language_model_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("model.")?;
    let part = rest.split('.').next()?;
    ["layers", "embed_tokens", "norm"]
        .contains(&part)
        .then(|| format!("{IMAGE_TEXT_DECODER}.{rest}"))
}

/// The module-tree name of an image-text checkpoint's tensor outside its language model
/// (`vision_tower.encoder...` is `model.vision_tower.encoder...`), as transformers renames them.
pub fn other_part_name(name: &str) -> String {
    match name.starts_with("model.") {
        true => name.to_string(),
        false => format!("model.{name}"),
    }
}

/// The name transformers' `save_pretrained` gives a language-model tensor of an image-text
/// model (the inverse of [`language_model_name`], to the layout the released files use).
/// Qwen2-VL's and Qwen2.5-VL's keep a causal LM's names (`model.layers.0...`); Qwen3-VL's
/// (and Qwen3-VL-MoE's) keep the module tree's.
pub fn image_text_checkpoint_name(kind: &str, name: &str) -> String {
    let decoder = format!("{IMAGE_TEXT_DECODER}.");
    match kind {
        "qwen2_vl" | "qwen2_5_vl" => match name.strip_prefix(&decoder) {
            Some(rest) => format!("model.{rest}"),
            None => name.to_string(),
        },
        "qwen3_vl" | "qwen3_vl_moe" => name.to_string(),
        _ => match name.strip_prefix(&decoder) {
            Some(rest) => format!("language_model.model.{rest}"),
            None => format!("language_model.{name}"),
        },
    }
}

/// QLoRA's 4-bit base, quantized while it loads: each decoder linear weight is quantized as
/// soon as it is read, so that its dense copy lives only meanwhile and the whole model is never
/// held dense. `lm_head` stays dense, as bitsandbytes' loaders leave it.
#[derive(Clone, Copy, Debug)]
pub struct QuantizeOnLoad {
    pub kind: FourBit,
    pub double_quant: bool,
    /// The dtype the dequantized weights are computed in.
    pub compute_dtype: DType,
}

/// Loads `path`: a folder with `config.json`, or a `.gguf` file; where no such path exists,
/// a Hub id (`org/name`: see [`crate::hub`]).
pub fn load_model(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    load_model_with(path, device, dtype, None)
}

/// [`load_model`], quantizing the decoder linear weights on the way when `quantize` says so.
pub fn load_model_with(
    path: &Path,
    device: &Device,
    dtype: DType,
    quantize: Option<QuantizeOnLoad>,
) -> Result<LoadedModel> {
    let path = &crate::hub::locate(path, crate::hub::Wanted::Model)?;
    load_into_store(dtype, quantize, |store| {
        if path.is_dir() {
            load_hf_dir(path, device, store)
        } else {
            load_gguf(path, device, store)
        }
    })
}

/// Runs a loader `read` that puts each tensor into a fresh [`WeightStore`] and returns the
/// config and tokenizer, and gathers all of it into a [`LoadedModel`].
fn load_into_store(
    dtype: DType,
    quantize: Option<QuantizeOnLoad>,
    read: impl FnOnce(&mut WeightStore) -> Result<(LlamaConfig, Option<Tokenizer>)>,
) -> Result<LoadedModel> {
    let mut store = WeightStore {
        dtype,
        quantize,
        weights: HashMap::new(),
        quantized: HashMap::new(),
        other: Vec::new(),
    };
    let (config, tokenizer) = read(&mut store)?;
    Ok(LoadedModel {
        config,
        weights: store.weights,
        quantized: store.quantized,
        tokenizer,
        other_tensors: store.other,
    })
}

/// Where the loaders put each tensor they read: in the model dtype, or quantized.
struct WeightStore {
    dtype: DType,
    quantize: Option<QuantizeOnLoad>,
    weights: HashMap<String, Tensor>,
    quantized: HashMap<String, Arc<QuantizedWeight>>,
    other: Vec<StoredTensor>,
}

impl WeightStore {
    fn insert(&mut self, name: String, t: Tensor) -> Result<()> {
        // FP8 weights reach here dequantized; one that did not came without its scale.
        if t.dtype() == DType::F8E4M3 {
            bail!("{name} is stored in FP8, but config.json has no quantization_config that scales it");
        }
        let in_layers = [CAUSAL_LM_DECODER, IMAGE_TEXT_DECODER].iter().any(|d| {
            name.strip_prefix(d)
                .is_some_and(|r| r.starts_with(".layers."))
        });
        let linear = in_layers
            && t.rank() == 2
            && name
                .strip_suffix(".weight")
                .is_some_and(crate::llama::quantized_in_qlora);
        match self.quantize {
            Some(q) if linear => {
                let w = QuantizedWeight::quantize(&t, q.kind, q.double_quant, q.compute_dtype)
                    .with_context(|| format!("cannot quantize {name}"))?;
                self.quantized.insert(name, Arc::new(w));
            }
            // GLM-4.5's correction of its routers' choice stays f32, as transformers keeps it.
            _ if name.ends_with(".e_score_correction_bias") => {
                self.weights.insert(name, t.to_dtype(DType::F32)?);
            }
            _ => {
                self.weights.insert(name, t.to_dtype(self.dtype)?);
            }
        }
        Ok(())
    }

    /// Takes a tensor of a checkpoint whose linear weights may be stored quantized
    /// (`prequantized`, from its `quantization_config`): an FP8 weight and its
    /// `weight_scale_inv` wait for each other, then go in dequantized (FP8's activation scales
    /// are dropped: the model computes in `dtype`, as transformers' `dequantize=True` does);
    /// the parts of a bitsandbytes 4-bit weight are gathered for [`Bnb4Weights::finish`].
    fn insert_checkpoint_tensor(
        &mut self,
        name: String,
        t: Tensor,
        prequantized: &mut Option<Prequantized>,
    ) -> Result<()> {
        let fp8 = match prequantized {
            Some(Prequantized::Fp8(fp8)) => fp8,
            // Dequantized before the experts are split (see `load_hf_dir`).
            Some(Prequantized::Mxfp4(_)) => return self.insert(name, t),
            Some(Prequantized::Bnb4(bnb)) => match bnb.take(name, t) {
                Some((name, t)) => return self.insert(name, t),
                None => return Ok(()),
            },
            None => return self.insert(name, t),
        };
        if name.ends_with(".activation_scale") || name.ends_with(".input_scale") {
            return Ok(());
        }
        let (weight, part) = match name.strip_suffix("_scale_inv") {
            Some(weight) => (weight.to_string(), Fp8Part::Scale),
            None if t.dtype() == DType::F8E4M3 => (name, Fp8Part::Weight),
            None => return self.insert(name, t),
        };
        if let Some(dense) = fp8.take(weight.clone(), part, t)? {
            self.insert(weight, dense)?;
        }
        Ok(())
    }

    fn contains(&self, name: &str) -> bool {
        self.weights.contains_key(name) || self.quantized.contains_key(name)
    }

    /// Rows (`dim(0)`) of a tensor, dense or quantized.
    fn rows(&self, name: &str) -> Option<usize> {
        match self.weights.get(name) {
            Some(t) => t.dim(0).ok(),
            None => self.quantized.get(name).map(|q| q.out_features),
        }
    }
}

/// How a checkpoint stores its linear weights where they are not plain tensors (its
/// config.json's `quantization_config`).
enum Prequantized {
    Fp8(Fp8Weights),
    Bnb4(Bnb4Weights),
    Mxfp4(Mxfp4Weights),
}

impl Prequantized {
    /// From config.json (`whole`): `None` for plain weights, and an error for the methods
    /// peft-rs does not read.
    fn of(whole: &Value, dir: &Path) -> Result<Option<Self>> {
        let Some(q) = whole.get("quantization_config").filter(|q| !q.is_null()) else {
            return Ok(None);
        };
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("?");
        let flag = |key: &str| {
            [key, &format!("_{key}")]
                .iter()
                .any(|k| q.get(*k).and_then(Value::as_bool) == Some(true))
        };
        let refused = |what: &str| {
            anyhow::anyhow!(
                "{}: the weights are pre-quantized ({what}), which peft-rs does not read; use the model's unquantized weights, with --quantize nf4 for QLoRA",
                dir.join("config.json").display()
            )
        };
        Ok(Some(match method {
            "fp8" => {
                let block = match q.get("weight_block_size") {
                    None | Some(Value::Null) => None,
                    Some(v) => {
                        let sizes: Vec<u64> = v
                            .as_array()
                            .map(|a| a.iter().filter_map(Value::as_u64).collect())
                            .unwrap_or_default();
                        match sizes[..] {
                            [r, c] if r > 0 && c > 0 => Some([r as usize, c as usize]),
                            _ => bail!("quantization_config: weight_block_size is not two positive sizes: {v}"),
                        }
                    }
                };
                Self::Fp8(Fp8Weights {
                    block,
                    weights: HashMap::new(),
                    scales: HashMap::new(),
                })
            }
            "bitsandbytes" if flag("load_in_4bit") => Self::Bnb4(Bnb4Weights {
                parts: HashMap::new(),
            }),
            "bitsandbytes" => return Err(refused("bitsandbytes' 8-bit")),
            "mxfp4" => Self::Mxfp4(Mxfp4Weights {
                parts: HashMap::new(),
            }),
            other => return Err(refused(&format!("quant_method {other:?}"))),
        }))
    }
}

/// gpt-oss's MXFP4 experts as OpenAI releases them: each stacked parameter as `<name>_blocks`
/// `[experts, out, in / 32, 16]` (two FP4 codes a byte) and `<name>_scales` `[experts, out,
/// in / 32]` (powers of two), dequantized as transformers does when it loads them without its
/// kernels (to bf16, exactly: each value has two significant bits).
struct Mxfp4Weights {
    /// By parameter name (`...mlp.experts.gate_up_proj`): its blocks and scales so far.
    parts: HashMap<String, (Option<Tensor>, Option<Tensor>)>,
}

impl Mxfp4Weights {
    /// `(name, t)` as it is, or `None` while a parameter waits for its other part, or the
    /// parameter once both arrived: `[experts, in, out]`, as transformers holds it.
    fn take(&mut self, name: String, t: Tensor) -> Result<Option<(String, Tensor)>> {
        let (param, is_blocks) = match (name.strip_suffix("_blocks"), name.strip_suffix("_scales"))
        {
            (Some(p), _) => (p.to_string(), true),
            (_, Some(p)) => (p.to_string(), false),
            _ => return Ok(Some((name, t))),
        };
        let slot = self.parts.entry(param.clone()).or_default();
        match is_blocks {
            true => slot.0 = Some(t),
            false => slot.1 = Some(t),
        }
        let (Some(blocks), Some(scales)) = slot else {
            return Ok(None);
        };
        let dense = dequantize_mxfp4_param(&param, blocks, scales)?;
        self.parts.remove(&param);
        Ok(Some((param, dense)))
    }

    fn finish(self) -> Result<()> {
        match self.parts.keys().next() {
            Some(name) => {
                bail!("{name}: the checkpoint has its MXFP4 blocks or its scales, not both")
            }
            None => Ok(()),
        }
    }
}

/// One MXFP4 parameter from its blocks and scales, `[experts, in, out]` in bf16.
fn dequantize_mxfp4_param(name: &str, blocks: &Tensor, scales: &Tensor) -> Result<Tensor> {
    let dims = blocks.dims();
    let fits = dims.len() == 4
        && dims[3] == peft_quant::mxfp4::MXFP4_BLOCK_BYTES
        && scales.dims() == &dims[..3]
        && blocks.dtype() == DType::U8
        && scales.dtype() == DType::U8;
    if !fits {
        bail!(
            "{name}: MXFP4 blocks {:?} ({:?}) and scales {:?} ({:?}) do not fit ([experts, out, groups, 16] and [experts, out, groups], u8)",
            dims,
            blocks.dtype(),
            scales.dims(),
            scales.dtype()
        );
    }
    let (experts, out, groups) = (dims[0], dims[1], dims[2]);
    let values = peft_quant::dequantize_mxfp4_bf16(
        &blocks.flatten_all()?.to_vec1::<u8>()?,
        &scales.flatten_all()?.to_vec1::<u8>()?,
    )
    .with_context(|| format!("{name}: MXFP4"))?;
    let inp = groups * peft_quant::mxfp4::MXFP4_BLOCK_VALUES;
    let dense = Tensor::from_vec(values, (experts, out, inp), blocks.device())?;
    Ok(dense.transpose(1, 2)?)
}

/// bitsandbytes' 4-bit checkpoints (`load_in_4bit`: a QLoRA base as transformers saves it,
/// Unsloth's `-bnb-4bit` uploads): the parts of each 4-bit weight, gathered across the files,
/// become that 4-bit weight as it is (not quantized again).
struct Bnb4Weights {
    /// By weight name (`...q_proj.weight`): its packed codes (`packed`) and the parts saved
    /// beside it (`absmax`, `quant_map`, `nested_absmax`, `nested_quant_map`,
    /// `quant_state.bitsandbytes__nf4`).
    parts: HashMap<String, HashMap<String, Tensor>>,
}

/// The parts bitsandbytes saves beside a 4-bit weight, as `<weight>.<part>`.
const BNB4_PARTS: [&str; 6] = [
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
];

impl Bnb4Weights {
    /// Takes `t` where it is part of a 4-bit weight; gives it back otherwise.
    fn take(&mut self, name: String, t: Tensor) -> Option<(String, Tensor)> {
        if name.ends_with(".weight") && t.dtype() == DType::U8 {
            self.parts
                .entry(name)
                .or_default()
                .insert("packed".into(), t);
            return None;
        }
        let part = BNB4_PARTS.iter().find_map(|part| {
            let weight = name.strip_suffix(part)?.strip_suffix('.')?;
            weight
                .ends_with(".weight")
                .then(|| (weight.to_string(), *part))
        });
        match part {
            Some((weight, part)) => {
                self.parts.entry(weight).or_default().insert(part.into(), t);
                None
            }
            None => Some((name, t)),
        }
    }

    /// Every gathered weight as a 4-bit weight computed in `dtype` on `device`.
    fn finish(
        self,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Arc<QuantizedWeight>>> {
        self.parts
            .into_iter()
            .map(|(name, parts)| {
                let q = bnb4_weight(&parts, dtype, device)
                    .with_context(|| format!("the 4-bit weight {name}"))?;
                Ok((name, Arc::new(q)))
            })
            .collect()
    }
}

/// One bitsandbytes 4-bit weight from its saved parts: the codes as they are, the block
/// scales plain or (double quantization) 8-bit around their offset.
fn bnb4_weight(
    parts: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<QuantizedWeight> {
    let part = |key: &str| {
        parts
            .get(key)
            .with_context(|| format!("no {key} beside it"))
    };
    let floats = |key: &str| -> Result<Vec<f32>> {
        Ok(part(key)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    };
    let bytes = |t: &Tensor| -> Result<Vec<u8>> { Ok(t.flatten_all()?.to_vec1::<u8>()?) };
    let (kind, state) = match (
        parts.get("quant_state.bitsandbytes__nf4"),
        parts.get("quant_state.bitsandbytes__fp4"),
    ) {
        (Some(s), _) => (FourBit::Nf4, s),
        (None, Some(s)) => (FourBit::Fp4, s),
        (None, None) => bail!("no quant_state beside it"),
    };
    let state: Value =
        serde_json::from_slice(&bytes(state)?).context("its quant_state is not JSON")?;
    let number = |key: &str| state.get(key).and_then(Value::as_f64);
    let blocksize = number("blocksize").context("its quant_state has no blocksize")? as usize;
    let shape: Vec<usize> = state
        .get("shape")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_u64().map(|d| d as usize))
                .collect()
        })
        .unwrap_or_default();
    let [out_features, in_features] = shape[..] else {
        bail!(
            "its quant_state's shape is not [out, in]: {}",
            state["shape"]
        );
    };
    if floats("quant_map")? != kind.code() {
        bail!("its quant_map is not bitsandbytes' {} code", kind.name());
    }
    let raw_absmax = part("absmax")?;
    let absmax = match raw_absmax.dtype() {
        DType::U8 => {
            if floats("nested_quant_map")? != peft_quant::dynamic_map(true) {
                bail!("its nested_quant_map is not bitsandbytes' signed dynamic map");
            }
            Absmax::Double {
                q: Blockwise8 {
                    codes: bytes(raw_absmax)?,
                    absmax: floats("nested_absmax")?,
                    blocksize: number("nested_blocksize").unwrap_or(256.0) as usize,
                },
                offset: number("nested_offset").context("its quant_state has no nested_offset")?
                    as f32,
            }
        }
        _ => Absmax::Plain(floats("absmax")?),
    };
    let len = out_features * in_features;
    let packed = bytes(part("packed")?)?;
    if packed.len() != len.div_ceil(2) || absmax.values().len() != len.div_ceil(blocksize) {
        bail!("its codes or scales do not fit a [{out_features}, {in_features}] weight in blocks of {blocksize}");
    }
    let q = Quant4 {
        kind,
        blocksize,
        len,
        packed,
        absmax,
    };
    Ok(QuantizedWeight::from_quant4(
        q,
        (out_features, in_features),
        dtype,
        device,
    )?)
}

/// FP8 linear weights (transformers' FineGrainedFP8, `quant_method: "fp8"`: DeepSeek V3, the
/// `-FP8` Qwen 3 releases, Ministral 3) and their scales, met in any order across the files.
struct Fp8Weights {
    /// `weight_block_size`: each scale covers a block of this many rows and columns; `None`
    /// where one scale covers the tensor.
    block: Option<[usize; 2]>,
    weights: HashMap<String, Tensor>,
    scales: HashMap<String, Tensor>,
}

#[derive(Clone, Copy)]
enum Fp8Part {
    Weight,
    Scale,
}

impl Fp8Weights {
    /// Keeps one half of the pair of `weight`; once both are in, its dequantized values.
    fn take(&mut self, weight: String, part: Fp8Part, t: Tensor) -> Result<Option<Tensor>> {
        let (mine, other) = match part {
            Fp8Part::Weight => (&mut self.weights, &mut self.scales),
            Fp8Part::Scale => (&mut self.scales, &mut self.weights),
        };
        let Some(pair) = other.remove(&weight) else {
            mine.insert(weight, t);
            return Ok(None);
        };
        let (w, scale) = match part {
            Fp8Part::Weight => (t, pair),
            Fp8Part::Scale => (pair, t),
        };
        dequantize_fp8(&w, &scale, self.block)
            .with_context(|| format!("cannot dequantize the FP8 weight {weight}"))
            .map(Some)
    }

    /// Fails on a weight or scale whose other half never came.
    fn finish(self) -> Result<()> {
        if let Some(w) = self.weights.keys().next() {
            bail!("the FP8 weight {w} has no {w}_scale_inv");
        }
        if let Some(w) = self.scales.keys().next() {
            bail!("{w}_scale_inv scales no FP8 weight {w}");
        }
        Ok(())
    }
}

/// `w · scale` in f32, a scale per block of `block` rows and columns (the last blocks may be
/// cut short), or one for the tensor: transformers' `_dequantize_fp8_weight`. Computed on the
/// CPU (where FP8 conversion is tested) and returned to `w`'s device.
fn dequantize_fp8(w: &Tensor, scale: &Tensor, block: Option<[usize; 2]>) -> Result<Tensor> {
    let device = w.device().clone();
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    Ok(dequantize_fp8_on_cpu(&cpu(w)?, &cpu(scale)?, block)?.to_device(&device)?)
}

fn dequantize_fp8_on_cpu(w: &Tensor, scale: &Tensor, block: Option<[usize; 2]>) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let Some([br, bc]) = block else {
        if scale.elem_count() != 1 {
            bail!("a per-tensor scale of shape {:?}", scale.dims());
        }
        return Ok(w.broadcast_mul(&scale.flatten_all()?.reshape(())?)?);
    };
    let (nr, nc) = (rows.div_ceil(br), cols.div_ceil(bc));
    if scale.dims() != [nr, nc] {
        bail!(
            "scales of shape {:?} for {rows}x{cols} weights in blocks of {br}x{bc} (expected [{nr}, {nc}])",
            scale.dims()
        );
    }
    let full = scale
        .reshape((nr, 1, nc, 1))?
        .broadcast_as((nr, br, nc, bc))?
        .reshape((nr * br, nc * bc))?
        .narrow(0, 0, rows)?
        .narrow(1, 0, cols)?;
    Ok((w * full)?)
}

/// The weight files of an HF folder, in transformers' order of preference: `model.safetensors`
/// (so a stale index left next to a merged model is ignored), the shards of
/// `model.safetensors.index.json`, then the PyTorch `pytorch_model.bin` and the shards of its
/// index.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for (single, index) in [
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ] {
        if dir.join(single).exists() {
            return Ok(vec![dir.join(single)]);
        }
        let index = dir.join(index);
        if index.exists() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read {}", index.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .with_context(|| format!("{} has no weight_map", index.display()))?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(Value::as_str)
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            return Ok(files);
        }
    }
    bail!(
        "no model.safetensors, pytorch_model.bin or a shard index of either in {}",
        dir.display()
    )
}

fn load_hf_dir(
    dir: &Path,
    device: &Device,
    store: &mut WeightStore,
) -> Result<(LlamaConfig, Option<Tokenizer>)> {
    let mut config = LlamaConfig::from_file(&dir.join("config.json"))?;
    // An image-text checkpoint's names are renamed into the module tree, and the tensors
    // outside its language model are left on disk.
    let image_text = config.image_text.is_some();
    let module_name = |name: &str| match image_text {
        true => language_model_name(name).or_else(|| flat_language_model_name(name)),
        false => Some(name.to_string()),
    };
    let mut other = Vec::new();
    let whole = config.image_text.as_ref().unwrap_or(&config.raw);
    let mut prequantized = Prequantized::of(whole, dir)?;
    let stacked = config
        .moe
        .as_ref()
        .filter(|m| m.storage != ExpertStorage::PerExpert)
        .map(|m| (m.storage, config.hidden_size, m.expert_size));
    // A tensor goes in as it is, or as its experts where the checkpoint stacks them.
    let mut put = |store: &mut WeightStore, name: String, t: Tensor| -> Result<()> {
        let (name, t) = match &mut prequantized {
            Some(Prequantized::Mxfp4(m)) => match m.take(name, t)? {
                Some(taken) => taken,
                None => return Ok(()),
            },
            _ => (name, t),
        };
        let split = |(storage, h, size)| match storage {
            ExpertStorage::GptOss => split_gpt_oss_experts(&name, &t, h, size),
            _ => split_stacked_experts(&name, &t, h, size),
        };
        match stacked.and_then(split) {
            Some(parts) => {
                for (name, t) in parts? {
                    store.insert_checkpoint_tensor(name, t, &mut prequantized)?;
                }
                Ok(())
            }
            None => store.insert_checkpoint_tensor(name, t, &mut prequantized),
        }
    };
    for file in weight_files(dir)? {
        let mut keep = |name: &str, shape: &[usize]| {
            let known = module_name(name).is_some();
            if !known {
                other.push(StoredTensor {
                    file: file.clone(),
                    name: name.to_string(),
                    elements: shape.iter().product(),
                });
            }
            known
        };
        if file.extension().is_some_and(|e| e == "bin") {
            for (name, t) in crate::io::load_pytorch(&file, device)? {
                if keep(&name, t.dims()) {
                    put(store, module_name(&name).expect("kept"), t)?;
                }
            }
            continue;
        }
        let data = std::fs::File::open(&file)
            .with_context(|| format!("cannot open {}", file.display()))?;
        // SAFETY: the map is read-only and dropped before this function returns; a file
        // changed underneath us can at worst yield wrong numbers, which the shape checks catch.
        let mmap = unsafe { memmap2::Mmap::map(&data) }
            .with_context(|| format!("cannot map {}", file.display()))?;
        crate::io::for_each_safetensor(&mmap, &file, device, keep, |name, t| {
            put(store, module_name(&name).expect("kept"), t)
        })?;
    }
    if let Some(stored) = prequantized {
        match stored {
            Prequantized::Fp8(fp8) => fp8.finish()?,
            Prequantized::Bnb4(bnb) => store.quantized.extend(bnb.finish(store.dtype, device)?),
            Prequantized::Mxfp4(mxfp4) => mxfp4.finish()?,
        }
        // A model saved from this one writes its weights unquantized, and says so.
        for file in config.files_mut() {
            file.remove("quantization_config");
        }
    }
    store.other = other;
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Some(Tokenizer::from_hf_dir(dir)?)
    } else {
        None
    };
    Ok((config, tokenizer))
}

/// The experts of a layer's stacked `mlp.experts.gate_up_proj` (`[experts, 2 · size, hidden]`,
/// gate first, as transformers 5 holds it, or `[experts, hidden, 2 · size]`, as Qwen3-VL-MoE's
/// releases store it) or `mlp.experts.down_proj` (`[experts, hidden, size]` or `[experts,
/// size, hidden]`), under one module's names per expert (`mlp.experts.3.gate_proj.weight`);
/// `None` for another tensor.
fn split_stacked_experts(
    name: &str,
    t: &Tensor,
    hidden: usize,
    size: usize,
) -> Option<Result<Vec<(String, Tensor)>>> {
    let (block, kind) = name.rsplit_once(".experts.")?;
    let gate_up = match kind {
        "gate_up_proj" => true,
        "down_proj" => false,
        _ => return None,
    };
    let split = || -> Result<Vec<(String, Tensor)>> {
        let (experts, a, b) = t
            .dims3()
            .with_context(|| format!("{name} is not 3-dimensional"))?;
        let rows = if gate_up { 2 * size } else { hidden };
        let cols = if gate_up { hidden } else { size };
        let t = match (a, b) {
            _ if (a, b) == (rows, cols) => t.clone(),
            _ if (a, b) == (cols, rows) => t.transpose(1, 2)?.contiguous()?,
            _ => bail!(
                "{name} has shape {:?}, expected [{experts}, {rows}, {cols}]",
                t.dims()
            ),
        };
        let mut out = Vec::new();
        for e in 0..experts {
            let w = t.get(e)?;
            let at = |proj: &str| format!("{block}.experts.{e}.{proj}.weight");
            if gate_up {
                out.push((at("gate_proj"), w.narrow(0, 0, size)?.contiguous()?));
                out.push((at("up_proj"), w.narrow(0, size, size)?.contiguous()?));
            } else {
                out.push((at("down_proj"), w));
            }
        }
        Ok(out)
    };
    Some(split())
}

/// The experts of a gpt-oss layer's stacked parameters (see [`ExpertStorage::GptOss`]):
/// `mlp.experts.gate_up_proj` `[experts, hidden, 2 · size]` (gate and up interleaved by
/// column) and its bias, `mlp.experts.down_proj` `[experts, size, hidden]` and its bias, under
/// one module's names per expert (`mlp.experts.3.gate_proj.weight`, `...bias`); `None` for
/// another tensor.
fn split_gpt_oss_experts(
    name: &str,
    t: &Tensor,
    hidden: usize,
    size: usize,
) -> Option<Result<Vec<(String, Tensor)>>> {
    let (block, kind) = name.rsplit_once(".experts.")?;
    let expected = match kind {
        "gate_up_proj" => vec![hidden, 2 * size],
        "gate_up_proj_bias" => vec![2 * size],
        "down_proj" => vec![size, hidden],
        "down_proj_bias" => vec![hidden],
        _ => return None,
    };
    let split = || -> Result<Vec<(String, Tensor)>> {
        if t.rank() != expected.len() + 1 || t.dims()[1..] != expected[..] {
            bail!(
                "{name} has shape {:?}, expected [experts, {}]",
                t.dims(),
                expected
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let mut out = Vec::new();
        for e in 0..t.dim(0)? {
            let at = |proj: &str, what: &str| format!("{block}.experts.{e}.{proj}.{what}");
            let x = t.get(e)?;
            match kind {
                "gate_up_proj" | "gate_up_proj_bias" => {
                    // Rows (of the transposed weight) or values 2j and 2j + 1: gate j, up j.
                    let (pairs, what) = match kind {
                        "gate_up_proj" => {
                            (x.t()?.contiguous()?.reshape((size, 2, hidden))?, "weight")
                        }
                        _ => (x.contiguous()?.reshape((size, 2))?, "bias"),
                    };
                    for (i, proj) in ["gate_proj", "up_proj"].into_iter().enumerate() {
                        let part = pairs.narrow(1, i, 1)?.squeeze(1)?.contiguous()?;
                        out.push((at(proj, what), part));
                    }
                }
                "down_proj" => out.push((at("down_proj", "weight"), x.t()?.contiguous()?)),
                _ => out.push((at("down_proj", "bias"), x)),
            }
        }
        Ok(out)
    };
    Some(split())
}

fn md_u64(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<u64> {
    let v = md
        .get(key)
        .with_context(|| format!("GGUF metadata lacks {key}"))?;
    v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x as u64))
        .map_err(|_| anyhow::anyhow!("GGUF metadata {key} is not an integer"))
}

/// transformers' `layer_types` of a file's layers as llama.cpp reads them: its
/// `attention.sliding_window_pattern` (a flag a layer, or n: every n-th layer global), else
/// `default` (true: the layer slides).
fn sliding_layer_types(
    md: &HashMap<String, gguf_file::Value>,
    key: &str,
    layers: usize,
    default: Vec<bool>,
) -> Vec<&'static str> {
    let sliding = match md.get(key) {
        Some(gguf_file::Value::Array(flags)) => {
            flags.iter().map(|f| f.to_bool().unwrap_or(false)).collect()
        }
        pattern => match pattern.and_then(|v| v.to_u32().ok()).filter(|&n| n > 0) {
            Some(n) => crate::config::all_but_every(layers, n as usize),
            None => default,
        },
    };
    let name = |s: bool| match s {
        true => "sliding_attention",
        false => "full_attention",
    };
    sliding.into_iter().map(name).collect()
}

fn md_f64(md: &HashMap<String, gguf_file::Value>, key: &str) -> Option<f64> {
    let v = md.get(key)?;
    v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
}

/// Bytes of a GGUF tensor's data, or None when its shape is empty or impossible: the element
/// count (or that of its non-zero dimensions, which reshapes multiply) overflows, or it is not a
/// whole number of blocks. candle's reader would view an empty tensor's dangling, unaligned
/// buffer as blocks, which is undefined behaviour.
fn gguf_tensor_bytes(info: &gguf_file::TensorInfo) -> Option<u64> {
    let dims = info.shape.dims();
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d.max(1)))?;
    let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
    let block = info.ggml_dtype.block_size();
    if elems == 0 || !elems.is_multiple_of(block) {
        return None;
    }
    let bytes = (elems / block).checked_mul(info.ggml_dtype.type_size())?;
    u64::try_from(bytes).ok()
}

/// Walks GGUF metadata as candle reads it, without allocating for values.
struct MetadataWalker<'a, R> {
    r: &'a mut R,
    len: u64,
    /// Lengths are u64 from version 2 on, u32 before.
    wide: bool,
    /// Whether the last `general.alignment` (the one candle keeps) is an integer 0.
    zero_alignment: bool,
    tensor_count: u64,
}

const GGUF_ALIGNMENT_KEY: &[u8] = b"general.alignment";
/// candle's limit on nested arrays.
const GGUF_MAX_DEPTH: usize = 64;

impl<R: Read + Seek> MetadataWalker<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).ok()?;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn length(&mut self) -> Option<u64> {
        if self.wide {
            self.bytes().map(u64::from_le_bytes)
        } else {
            self.u32().map(u64::from)
        }
    }

    fn remaining(&mut self) -> Option<u64> {
        Some(self.len.saturating_sub(self.r.stream_position().ok()?))
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        if n > self.remaining()? {
            return None;
        }
        self.r
            .seek(SeekFrom::Current(i64::try_from(n).ok()?))
            .ok()?;
        Some(())
    }

    /// On-disk size of a scalar value type; None for strings, arrays and unknown types.
    fn scalar_size(ty: u32) -> Option<u64> {
        match ty {
            0 | 1 | 7 => Some(1), // u8, i8, bool
            2 | 3 => Some(2),     // u16, i16
            4..=6 => Some(4),     // u32, i32, f32
            10..=12 => Some(8),   // u64, i64, f64
            _ => None,
        }
    }

    fn skip_value(&mut self, ty: u32, depth: usize) -> Option<()> {
        if let Some(size) = Self::scalar_size(ty) {
            return self.skip(size);
        }
        let prefix = if self.wide { 8 } else { 4 };
        match ty {
            8 => {
                let n = self.length()?;
                self.skip(n)
            }
            9 if depth <= GGUF_MAX_DEPTH => {
                let elem = self.u32()?;
                let count = self.length()?;
                let min_size = match elem {
                    8 => prefix,
                    9 => 4 + prefix,
                    _ => return self.skip(count.checked_mul(Self::scalar_size(elem)?)?),
                };
                if count.checked_mul(min_size)? > self.remaining()? {
                    return None;
                }
                for _ in 0..count {
                    self.skip_value(elem, depth + 1)?;
                }
                Some(())
            }
            _ => None,
        }
    }

    fn walk(&mut self) -> Option<()> {
        let magic = self.u32()?;
        let version = self.u32()?;
        if !matches!(magic, 0x4655_4747 | 0x4747_5546) || !(1..=3).contains(&version) {
            return None;
        }
        self.wide = version > 1;
        self.tensor_count = self.length()?;
        let kv_count = self.length()?;
        for _ in 0..kv_count {
            let key_len = self.length()?;
            let is_alignment = if key_len == GGUF_ALIGNMENT_KEY.len() as u64 {
                self.bytes::<17>()? == GGUF_ALIGNMENT_KEY
            } else {
                self.skip(key_len)?;
                false
            };
            let ty = self.u32()?;
            if !is_alignment {
                self.skip_value(ty, 0)?;
                continue;
            }
            // candle takes u8, i8, u16, i16, u32 and i32 alignments, and a default otherwise.
            let size = Self::scalar_size(ty).filter(|_| ty <= 5);
            self.zero_alignment = match size {
                Some(1) => self.bytes::<1>()? == [0],
                Some(2) => self.bytes::<2>()? == [0; 2],
                Some(_) => self.bytes::<4>()? == [0; 4],
                None => {
                    self.skip_value(ty, 0)?;
                    false
                }
            };
        }
        Some(())
    }

    /// After [`Self::walk`]: the names of the tensors whose type is `ty` with the file
    /// positions of their type fields, and where the tensor infos end.
    fn tensor_types_of(&mut self, ty: u32) -> Option<(Vec<(String, u64)>, u64)> {
        let mut found = Vec::new();
        for _ in 0..self.tensor_count {
            let name_len = self.length()?;
            if name_len > self.remaining()? {
                return None;
            }
            let mut name = vec![0u8; usize::try_from(name_len).ok()?];
            self.r.read_exact(&mut name).ok()?;
            let dims = self.u32()?;
            self.skip(u64::from(dims) * if self.wide { 8 } else { 4 })?;
            let at = self.r.stream_position().ok()?;
            if self.u32()? == ty {
                found.push((String::from_utf8_lossy(&name).into_owned(), at));
            }
            self.skip(8)?;
        }
        Some((found, self.r.stream_position().ok()?))
    }
}

/// llama.cpp's MXFP4 tensor type (gpt-oss's experts in its GGUF files), which candle's reader
/// does not know.
const GGML_TYPE_MXFP4: u32 = 39;

/// A GGUF file's header as candle reads it, and apart from it the shapes (candle's order) and
/// data offsets of its MXFP4 tensors: candle reads the header with their type fields read as
/// f32 (the type only sizes the data, which candle reads later), and those tensors are taken
/// out of its infos. One walk of the header finds them and refuses a `general.alignment` of 0,
/// which candle's reader (0.11) divides by unchecked; everything else malformed is left for
/// candle's reader, which checks lengths and counts against the data's size.
fn read_gguf_content<R: Read + Seek>(
    reader: &mut R,
    len: u64,
) -> Result<(gguf_file::Content, HashMap<String, gguf_file::TensorInfo>)> {
    reader.rewind()?;
    let mut walker = MetadataWalker {
        r: reader,
        len,
        wide: true,
        zero_alignment: false,
        tensor_count: 0,
    };
    // A walk that stops early means candle's reader fails there too.
    let walked = walker.walk();
    // candle's reader (0.11) divides by `general.alignment` unchecked: a zero would panic.
    if walker.zero_alignment {
        bail!("general.alignment is 0");
    }
    let mxfp4 = walked.and_then(|_| walker.tensor_types_of(GGML_TYPE_MXFP4));
    let Some((found, end)) = mxfp4.filter(|(found, _)| !found.is_empty()) else {
        reader.rewind()?;
        return Ok((gguf_file::Content::read(reader)?, HashMap::new()));
    };
    reader.rewind()?;
    let mut header = vec![0u8; usize::try_from(end)?];
    reader.read_exact(&mut header)?;
    for (_, at) in &found {
        let at = usize::try_from(*at)?;
        header[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
    }
    let mut content = gguf_file::Content::read(&mut std::io::Cursor::new(&header))?;
    let mut mxfp4 = HashMap::new();
    for (name, _) in found {
        let info = content
            .tensor_infos
            .remove(&name)
            .with_context(|| format!("GGUF tensor {name}"))?;
        mxfp4.insert(name, info);
    }
    Ok((content, mxfp4))
}

/// An MXFP4 tensor's values as f32 (see [`read_gguf_content`]).
fn read_mxfp4<R: Read + Seek>(
    reader: &mut R,
    data_offset: u64,
    info: &gguf_file::TensorInfo,
) -> Result<Tensor> {
    let values = info.shape.elem_count();
    let blocks = values / peft_quant::mxfp4::MXFP4_BLOCK_VALUES;
    if values == 0 || !values.is_multiple_of(peft_quant::mxfp4::MXFP4_BLOCK_VALUES) {
        bail!(
            "an MXFP4 tensor of shape {:?} is not whole blocks",
            info.shape.dims()
        );
    }
    let mut data = vec![0u8; blocks * peft_quant::mxfp4::GGML_MXFP4_BLOCK_BYTES];
    reader.seek(SeekFrom::Start(data_offset + info.offset))?;
    reader.read_exact(&mut data)?;
    let values = peft_quant::mxfp4::dequantize_ggml_mxfp4(&data).context("MXFP4 blocks")?;
    Ok(Tensor::from_vec(values, info.shape.clone(), &Device::Cpu)?)
}

fn load_gguf(
    path: &Path,
    device: &Device,
    store: &mut WeightStore,
) -> Result<(LlamaConfig, Option<Tokenizer>)> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    read_gguf(file, path, device, store)
}

/// Loads a Llama-family model and its tokenizer from GGUF data in `reader` (a file, or bytes in
/// a `std::io::Cursor`), read from its start; `source` names it in errors. Malformed data of any
/// kind is an error, never a panic or an allocation beyond a small multiple of the data's size.
pub fn load_gguf_from<R: Read + Seek>(
    reader: R,
    source: &Path,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel> {
    load_into_store(dtype, None, |store| {
        read_gguf(reader, source, device, store)
    })
}

fn read_gguf<R: Read + Seek>(
    mut reader: R,
    source: &Path,
    device: &Device,
    store: &mut WeightStore,
) -> Result<(LlamaConfig, Option<Tokenizer>)> {
    let path = source;
    let bad = || format!("{} is not a valid GGUF file", path.display());
    let file_len = reader.seek(SeekFrom::End(0))?;
    reader.rewind()?;
    let (content, mxfp4) = read_gguf_content(&mut reader, file_len).with_context(bad)?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .with_context(bad)?;
    // The transformers model type and class of the architecture, where we read it.
    let experts = md_u64(md, &format!("{arch}.expert_count")).unwrap_or(0) as usize;
    let (model_type, class) = match arch.as_str() {
        // llama.cpp's Mixtral is its llama with experts.
        "llama" if experts > 0 => ("mixtral", "MixtralForCausalLM"),
        "llama" => ("llama", "LlamaForCausalLM"),
        "qwen2moe" => ("qwen2_moe", "Qwen2MoeForCausalLM"),
        "qwen3moe" => ("qwen3_moe", "Qwen3MoeForCausalLM"),
        "olmoe" => ("olmoe", "OlmoeForCausalLM"),
        "gpt-oss" => ("gpt_oss", "GptOssForCausalLM"),
        "glm4moe" => ("glm4_moe", "Glm4MoeForCausalLM"),
        // Latent attention: DeepSeek-V3's layers (GLM-4.7-Flash's alike) with a sigmoid
        // router, DeepSeek-V2's with a softmax one.
        "deepseek2" if md_u64(md, "deepseek2.expert_gating_func").ok() == Some(2) => {
            ("deepseek_v3", "DeepseekV3ForCausalLM")
        }
        "deepseek2" => ("deepseek_v2", "DeepseekV2ForCausalLM"),
        "ernie4_5" => ("ernie4_5", "Ernie4_5ForCausalLM"),
        "ernie4_5-moe" => ("ernie4_5_moe", "Ernie4_5_MoeForCausalLM"),
        "mistral" => ("mistral", "MistralForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        "qwen3" => ("qwen3", "Qwen3ForCausalLM"),
        "smollm3" => ("smollm3", "SmolLM3ForCausalLM"),
        "granite" => ("granite", "GraniteForCausalLM"),
        // OLMo 3 is llama.cpp's olmo2 with sliding-window layers.
        "olmo2" if md.contains_key("olmo2.attention.sliding_window") => {
            ("olmo3", "Olmo3ForCausalLM")
        }
        "olmo2" => ("olmo2", "Olmo2ForCausalLM"),
        "gemma2" => ("gemma2", "Gemma2ForCausalLM"),
        "gemma3" => ("gemma3_text", "Gemma3ForCausalLM"),
        "phi3" => ("phi3", "Phi3ForCausalLM"),
        _ => bail!("{}: unsupported GGUF architecture {arch:?}", path.display()),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = md_u64(md, &key("embedding_length"))? as usize;
    let heads = md_u64(md, &key("attention.head_count"))? as usize;
    let kv_heads = md_u64(md, &key("attention.head_count_kv")).unwrap_or(heads as u64) as usize;
    // GLM-4.5's block count includes its multi-token-prediction layers, which are left out.
    let mtp_layers = md_u64(md, &key("nextn_predict_layers")).unwrap_or(0) as usize;
    let layers = (md_u64(md, &key("block_count"))? as usize).saturating_sub(mtp_layers);
    // Phi-3's and GLM-4.5's converters write the rotated dims (partial rotary) as the rope
    // dimensions; elsewhere the rope dimensions are the head's.
    let rope_dims = md_u64(md, &key("rope.dimension_count")).ok();
    let partial_rotary = matches!(arch.as_str(), "phi3" | "glm4moe" | "deepseek2");
    let head_dim = md_u64(md, &key("attention.key_length"))
        .ok()
        .or(rope_dims.filter(|_| !partial_rotary))
        .map(|d| d as usize)
        .unwrap_or(hidden / heads.max(1));
    if heads == 0 || kv_heads == 0 {
        bail!("{}: GGUF metadata gives 0 attention heads", path.display());
    }
    // The checkpoint names of a mixture-of-experts block's router and experts.
    let moe_names = match model_type {
        "mixtral" => Some(("block_sparse_moe", ["w1", "w3", "w2"])),
        _ if experts > 0 => Some(("mlp", ["gate_proj", "up_proj", "down_proj"])),
        _ => None,
    };
    // gpt-oss's router is `mlp.router`, with a bias as its experts have.
    let router = match model_type {
        "gpt_oss" => "router",
        _ => "gate",
    };

    // Data can be truncated even when the header parses: check that every tensor fits.
    for (name, info) in &content.tensor_infos {
        let bytes = gguf_tensor_bytes(info).with_context(|| {
            format!(
                "{}: tensor {name} has an empty or impossible shape {:?} for {:?}",
                path.display(),
                info.shape.dims(),
                info.ggml_dtype
            )
        })?;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes));
        if end.is_none_or(|end| end > file_len) {
            bail!(
                "{} is truncated: tensor {name} lies past the end of the file",
                path.display()
            );
        }
    }
    for (name, info) in &mxfp4 {
        let blocks = info.shape.elem_count() / peft_quant::mxfp4::MXFP4_BLOCK_VALUES;
        let bytes = (blocks * peft_quant::mxfp4::GGML_MXFP4_BLOCK_BYTES) as u64;
        let end = content.tensor_data_offset + info.offset + bytes;
        if end > file_len {
            bail!(
                "{} is truncated: tensor {name} lies past the end of the file",
                path.display()
            );
        }
    }
    // A tensor's values as f32 (on the CPU).
    let read = |reader: &mut R, name: &str| -> Result<Tensor> {
        match mxfp4.get(name) {
            Some(info) => read_mxfp4(reader, content.tensor_data_offset, info)
                .with_context(|| format!("{}: tensor {name}", path.display())),
            None => Ok(content
                .tensor(reader, name, &Device::Cpu)
                .with_context(bad)?
                .dequantize(&Device::Cpu)?),
        }
    };

    // Latent attention's kv_b_proj, split in two by llama.cpp (see `gguf::split_kv_b`).
    let mut kv_b_parts: HashMap<usize, [Option<Tensor>; 2]> = HashMap::new();
    for name in content.tensor_infos.keys().chain(mxfp4.keys()) {
        let layer_of = |n: &str| {
            n.strip_prefix("blk.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        };
        if layer_of(name).is_some_and(|l| l >= layers) {
            continue;
        }
        let split = ["attn_k_b.weight", "attn_v_b.weight"]
            .iter()
            .position(|p| name.ends_with(&format!(".{p}")));
        if let (Some(l), Some(part)) = (layer_of(name), split) {
            kv_b_parts.entry(l).or_default()[part] = Some(read(&mut reader, name)?);
            continue;
        }
        if let (Some((block, projections)), Some((layer, kind))) =
            (moe_names, gguf::moe_tensor(name))
        {
            let t = read(&mut reader, name)?;
            let p = format!("model.layers.{layer}.{block}");
            let what = name.rsplit('.').next().unwrap_or("weight");
            match kind {
                gguf::MoeTensor::Router => store.insert(format!("{p}.{router}.{what}"), t)?,
                gguf::MoeTensor::Experts(k) => {
                    // Weights `[experts, rows, cols]`, gpt-oss's biases `[experts, rows]`.
                    let rank = if what == "weight" { 3 } else { 2 };
                    if t.rank() != rank || t.dim(0)? != experts {
                        bail!(
                            "{}: {name} is not {experts} stacked experts",
                            path.display()
                        );
                    }
                    for e in 0..experts {
                        let hf = format!("{p}.experts.{e}.{}.{what}", projections[k]);
                        store.insert(hf, t.get(e)?.to_device(device)?)?;
                    }
                }
            }
            continue;
        }
        let Some(hf) = gguf::hf_name(name, &arch) else {
            continue;
        };
        let mut t = read(&mut reader, name)?;
        if gguf::permutes_qk(&arch) {
            if hf.contains("self_attn.q_proj") {
                t = gguf::permute_rows(&t, heads, true)?;
            } else if hf.contains("self_attn.k_proj") {
                t = gguf::permute_rows(&t, kv_heads, true)?;
            }
        }
        if let Some(offset) = gguf::norm_offset(&arch, &hf) {
            t = (t - offset)?;
        }
        store.insert(hf, t.to_device(device)?)?;
    }
    for (l, parts) in kv_b_parts {
        let [Some(k_b), Some(v_b)] = parts else {
            bail!(
                "{}: layer {l} has one of attn_k_b and attn_v_b",
                path.display()
            );
        };
        let kv_b = gguf::join_kv_b(&k_b, &v_b)?;
        let name = format!("model.layers.{l}.self_attn.kv_b_proj.weight");
        store.insert(name, kv_b.to_device(device)?)?;
    }
    let rope_scaling = match content.tensor_infos.contains_key("rope_freqs.weight") {
        true => {
            let factors = content
                .tensor(&mut reader, "rope_freqs.weight", &Device::Cpu)
                .with_context(bad)?
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let theta = md_f64(md, &key("rope.freq_base")).unwrap_or(10_000.0);
            Some(
                llama3_rope_scaling(&factors, theta, head_dim)
                    .with_context(|| format!("{}: rope_freqs.weight", path.display()))?,
            )
        }
        false => None,
    };
    let vocab = store
        .rows("model.embed_tokens.weight")
        .with_context(|| format!("{}: no token_embd.weight", path.display()))?;
    let tie = !store.contains("lm_head.weight");
    let tokenizer = Tokenizer::from_gguf_metadata(md)
        .with_context(|| format!("{}: tokenizer metadata", path.display()))?;
    let (bos, eos) = (tokenizer.bos_token_id(), tokenizer.eos_token_id());
    // Phi-3's ffn_up holds gate and up; a mixture of experts' layers have no dense MLP.
    let intermediate = match arch.as_str() {
        "phi3" => store
            .rows("model.layers.0.mlp.gate_up_proj.weight")
            .map(|r| r / 2),
        _ if experts > 0 => md_u64(md, &key("feed_forward_length"))
            .ok()
            .map(|n| n as usize),
        _ => store.rows("model.layers.0.mlp.up_proj.weight"),
    }
    .with_context(|| format!("{}: no blk.0.ffn_up.weight", path.display()))?;
    let gemma = gguf::is_gemma(&arch);
    let mut raw = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": md_f64(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        "rope_theta": md_f64(md, &key("rope.freq_base"))
            .unwrap_or(if arch == "gemma3" { 1e6 } else { 1e4 }),
        "max_position_embeddings": md_u64(md, &key("context_length")).unwrap_or(4096),
        "tie_word_embeddings": tie,
        "hidden_act": if gemma { "gelu_pytorch_tanh" } else { "silu" },
        "torch_dtype": "float32",
    });
    if gemma {
        // As llama.cpp reads a Gemma file (see `gguf::gemma_llama_cpp_layout`). Gemma 2's
        // window and soft caps have defaults there, the same as the config's (which then
        // apply: 4096, 50 and 30).
        match md_u64(md, &key("attention.sliding_window")) {
            Ok(window) => raw["sliding_window"] = json!(window),
            Err(e) if arch == "gemma3" => {
                let at = path.display();
                return Err(e.context(format!("{at}: gemma3 without a sliding window")));
            }
            Err(_) => {}
        }
        let (sliding, scale_dim) =
            gguf::gemma_llama_cpp_layout(&arch, layers, hidden, heads, head_dim);
        let pattern = key("attention.sliding_window_pattern");
        raw["layer_types"] = json!(sliding_layer_types(md, &pattern, layers, sliding));
        let local_base = md_f64(md, &key("rope.freq_base_swa"));
        if arch == "gemma3" || local_base.is_some() {
            raw["rope_local_base_freq"] = json!(local_base.unwrap_or(10_000.0));
        }
        raw["query_pre_attn_scalar"] = json!(scale_dim);
        // llama.cpp's gemma3 caps no scores, whatever the file says.
        let caps: &[&str] = match arch.as_str() {
            "gemma2" => &["attn_logit_softcapping", "final_logit_softcapping"],
            _ => &["final_logit_softcapping"],
        };
        for &name in caps {
            if let Some(cap) = md_f64(md, &key(name)).filter(|&cap| cap > 0.0) {
                raw[name] = json!(cap);
            }
        }
    }
    if let Some((block, projections)) = moe_names {
        // As llama.cpp runs them: every layer's experts (GLM-4.5's after its dense ones),
        // renormalized by Qwen3-MoE and Mixtral.
        let first = md_u64(md, &key("leading_dense_block_count")).unwrap_or(0);
        let size = store
            .rows(&format!(
                "model.layers.{first}.{block}.experts.0.{}.weight",
                projections[1]
            ))
            .with_context(|| format!("{}: no blk.0.ffn_up_exps.weight", path.display()))?;
        let count_key = match model_type {
            "mixtral" | "gpt_oss" => "num_local_experts",
            "glm4_moe" | "deepseek_v3" | "deepseek_v2" => "n_routed_experts",
            "ernie4_5_moe" => "moe_num_experts",
            _ => "num_experts",
        };
        raw[count_key] = json!(experts);
        let used = md_u64(md, &key("expert_used_count"))?;
        match model_type {
            "ernie4_5_moe" => raw["moe_k"] = json!(used),
            _ => raw["num_experts_per_tok"] = json!(used),
        }
        match model_type {
            "mixtral" => raw["intermediate_size"] = json!(size),
            "gpt_oss" => {
                // As llama.cpp runs it: every other layer over the window (the first one
                // too), the SwiGLU's defaults. Its YaRN as the checkpoints set it (llama.cpp
                // rounds the ramp's ends, transformers does not).
                raw["intermediate_size"] = json!(size);
                raw["sliding_window"] = json!(md_u64(md, &key("attention.sliding_window"))?);
                let every_other = crate::config::all_but_every(layers, 2);
                let pattern = key("attention.sliding_window_pattern");
                raw["layer_types"] = json!(sliding_layer_types(md, &pattern, layers, every_other));
            }
            "olmoe" => {
                raw["intermediate_size"] = json!(size);
                raw["norm_topk_prob"] = json!(false);
            }
            "ernie4_5_moe" => {
                // As llama.cpp runs it: experts on every layer after the leading dense ones.
                raw["moe_intermediate_size"] = json!(size);
                raw["moe_layer_start_index"] = json!(first);
                raw["moe_layer_interval"] = json!(1);
                let shared = md_u64(md, &key("expert_shared_feed_forward_length")).unwrap_or(0);
                raw["moe_num_shared_experts"] = json!(shared / size.max(1) as u64);
            }
            // GLM-4.5's routing, DeepSeek's too: leading dense layers, shared experts, scaled
            // (and renormalized) weights, groups of experts.
            "glm4_moe" | "deepseek_v3" | "deepseek_v2" => {
                raw["moe_intermediate_size"] = json!(size);
                raw["first_k_dense_replace"] = json!(first);
                raw["n_shared_experts"] = json!(md_u64(md, &key("expert_shared_count"))?);
                let norm = md
                    .get(&key("expert_weights_norm"))
                    .and_then(|v| v.to_bool().ok());
                raw["norm_topk_prob"] = json!(norm.unwrap_or(false));
                raw["routed_scaling_factor"] =
                    json!(md_f64(md, &key("expert_weights_scale")).unwrap_or(1.0));
                let groups = md_u64(md, &key("expert_group_count")).unwrap_or(1);
                raw["n_group"] = json!(groups);
                raw["topk_group"] = json!(md_u64(md, &key("expert_group_used_count")).unwrap_or(1));
                if model_type == "glm4_moe" {
                    let rotated = rope_dims.unwrap_or(head_dim as u64) as f64;
                    raw["partial_rotary_factor"] = json!(rotated / head_dim as f64);
                    raw["use_qk_norm"] =
                        json!(store.contains("model.layers.0.self_attn.q_norm.weight"));
                    raw["attention_bias"] =
                        json!(store.contains("model.layers.0.self_attn.q_proj.bias"));
                } else {
                    if model_type == "deepseek_v2" {
                        let method = if groups > 1 {
                            "group_limited_greedy"
                        } else {
                            "greedy"
                        };
                        raw["topk_method"] = json!(method);
                    }
                    // Latent attention's sizes: the heads' from the "mla" lengths.
                    let rot = rope_dims.unwrap_or(0);
                    let k_mla = md_u64(md, &key("attention.key_length_mla"))?;
                    raw["q_lora_rank"] = json!(md_u64(md, &key("attention.q_lora_rank")).ok());
                    raw["kv_lora_rank"] = json!(md_u64(md, &key("attention.kv_lora_rank"))?);
                    raw["qk_rope_head_dim"] = json!(rot);
                    raw["qk_nope_head_dim"] = json!(k_mla.saturating_sub(rot));
                    raw["v_head_dim"] = json!(md_u64(md, &key("attention.value_length_mla"))?);
                    raw["num_key_value_heads"] = json!(heads);
                    raw["head_dim"] = json!(rot);
                }
            }
            _ => {
                raw["moe_intermediate_size"] = json!(size);
                raw["norm_topk_prob"] = json!(model_type == "qwen3_moe");
            }
        }
        if let Some(shared) = store.rows("model.layers.0.mlp.shared_expert.up_proj.weight") {
            raw["shared_expert_intermediate_size"] = json!(shared);
        }
    }
    if model_type == "olmo3" {
        // As llama.cpp reads it: the file's pattern, else every fourth layer global.
        raw["sliding_window"] = json!(md_u64(md, &key("attention.sliding_window"))?);
        let every_fourth =
            crate::config::all_but_every(layers, crate::config::OLMO3_SLIDING_PATTERN);
        let pattern = key("attention.sliding_window_pattern");
        raw["layer_types"] = json!(sliding_layer_types(md, &pattern, layers, every_fourth));
        if let Some(base) = md_f64(md, &key("rope.freq_base_swa")) {
            raw["rope_local_base_freq"] = json!(base);
        }
    }
    if arch == "granite" {
        for (hf, gguf_key) in gguf::GRANITE_MULTIPLIERS {
            if let Some(m) = md_f64(md, &key(gguf_key)) {
                raw[hf] = json!(m);
            }
        }
        // llama.cpp scales scores by head_dim^-1/2 where the file gives no scale.
        if raw.get("attention_multiplier").is_none() {
            raw["attention_multiplier"] = json!((head_dim as f64).powf(-0.5));
        }
    }
    if arch == "phi3" {
        if let Some(rotated) = rope_dims.filter(|&d| (d as usize) < head_dim) {
            raw["partial_rotary_factor"] = json!(rotated as f64 / head_dim as f64);
        }
        let window = md_u64(md, &key("attention.sliding_window")).unwrap_or(0);
        raw["sliding_window"] = if window > 0 {
            json!(window)
        } else {
            json!(null)
        };
        let original = md_u64(md, &key("rope.scaling.original_context_length")).ok();
        raw["original_max_position_embeddings"] = json!(original.unwrap_or(4096));
        let mut factors = |name: &str| -> Result<Option<Vec<f32>>> {
            if !content.tensor_infos.contains_key(name) {
                return Ok(None);
            }
            let t = content
                .tensor(&mut reader, name, &Device::Cpu)
                .with_context(bad)?;
            Ok(Some(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?))
        };
        if let (Some(long), Some(short)) = (
            factors("rope_factors_long.weight")?,
            factors("rope_factors_short.weight")?,
        ) {
            let mut longrope = json!({"rope_type": "longrope", "long_factor": long,
                "short_factor": short});
            if let Some(a) = md_f64(md, &key("rope.scaling.attn_factor")) {
                longrope["attention_factor"] = json!(a);
            }
            raw["rope_scaling"] = longrope;
        }
    }
    if let Some(scaling) = rope_scaling {
        raw["rope_scaling"] = scaling;
    }
    let scaling_type = md
        .get(&key("rope.scaling.type"))
        .and_then(|v| v.to_string().ok());
    match scaling_type.map(String::as_str) {
        Some("linear") => {
            let factor = md_f64(md, &key("rope.scaling.factor")).with_context(|| {
                format!("{}: linear rope scaling without a factor", path.display())
            })?;
            raw["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
        }
        Some("yarn") => {
            let missing =
                |what: &str| format!("{}: yarn rope scaling without {what}", path.display());
            let factor =
                md_f64(md, &key("rope.scaling.factor")).with_context(|| missing("a factor"))?;
            let original = md_u64(md, &key("rope.scaling.original_context_length"))
                .with_context(|| missing("its original_context_length"))?;
            let mut yarn = json!({"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": original});
            for (gguf_key, hf, _) in gguf::YARN_OPTIONAL {
                if let Some(v) = md_f64(md, &key(&format!("rope.scaling.{gguf_key}"))) {
                    yarn[hf] = json!(v);
                }
            }
            if model_type == "gpt_oss" {
                yarn["truncate"] = json!(false);
            }
            raw["rope_scaling"] = yarn;
        }
        _ => {}
    }
    // Biases beyond Qwen2's q/k/v ones (Llama's `attention_bias`, `mlp_bias`) show as tensors.
    let has = |name: &str| store.contains(&format!("model.layers.0.{name}.bias"));
    if has("self_attn.o_proj") {
        raw["attention_bias"] = json!(true);
    }
    if has("mlp.up_proj") {
        raw["mlp_bias"] = json!(true);
    }
    if let Some(b) = bos {
        raw["bos_token_id"] = json!(b);
    }
    if let Some(e) = eos {
        raw["eos_token_id"] = json!(e);
    }
    let config = LlamaConfig::from_json(raw)
        .with_context(|| format!("{}: GGUF metadata", path.display()))?;
    Ok((config, Some(tokenizer)))
}

/// The Llama 3 rope scaling (`rope_type: "llama3"`) whose per-frequency factors are `factors`,
/// the `rope_freqs.weight` llama.cpp's converter writes for Llama 3.1 and later. GGUF keeps only
/// the factors; every released Llama 3.x uses low/high frequency factors 1 and 4 and an original
/// context of 8192 with its own scaling factor (the largest of the factors), which this checks.
fn llama3_rope_scaling(factors: &[f32], theta: f64, head_dim: usize) -> Result<Value> {
    if factors.len() != head_dim / 2 {
        bail!(
            "{} rope factors for head_dim {head_dim} (expected {})",
            factors.len(),
            head_dim / 2
        );
    }
    let factor = factors.iter().copied().fold(1.0f32, f32::max);
    let scaling = json!({
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    });
    let config = LlamaConfig::from_json(json!({
        "hidden_size": head_dim, "intermediate_size": 1, "num_hidden_layers": 1,
        "num_attention_heads": 1, "vocab_size": 1, "rope_theta": theta, "rope_scaling": scaling,
    }))?;
    let expected = gguf::rope_freq_factors(&config).context("no llama3 rope scaling")?;
    if expected
        .iter()
        .zip(factors)
        .any(|(want, got)| (want - got).abs() > 1e-3 * want)
    {
        bail!("rope factors that are not Llama 3's scaling (low 1, high 4, context 8192) are not supported");
    }
    Ok(scaling)
}
