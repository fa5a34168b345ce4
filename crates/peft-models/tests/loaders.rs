//! The loaders on tiny models written here: a GGUF file as llama.cpp lays it out (q/k rows
//! permuted, llama.cpp tensor names, metadata config) and a sharded HF folder; PyTorch
//! checkpoints (`pytorch_model.bin`, whole and sharded) written by torch (fixtures from
//! scripts/hf/make_pytorch_fixtures.py).

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use peft_models::testing::{max_abs_diff, tiny_llama};
use peft_models::{load_model, Llama};

fn logits(m: &Llama) -> Tensor {
    let ids = Tensor::new(&[[1u32, 5, 9, 33, 60, 2]], &Device::Cpu).unwrap();
    m.logits(&m.forward(&ids, None, None, false).unwrap())
        .unwrap()
}

fn reload(loaded: peft_models::LoadedModel) -> Llama {
    Llama::from_weights(loaded.config, loaded.weights, &Device::Cpu, DType::F32).unwrap()
}

/// llama.cpp's convert_hf_to_gguf `permute`.
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn gguf_name(hf: &str) -> String {
    let table = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ];
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = hf.strip_prefix("model.layers.").unwrap();
            let (layer, rest) = rest.split_once('.').unwrap();
            let (module, kind) = rest.rsplit_once('.').unwrap();
            let short = table.iter().find(|(h, _)| *h == module).unwrap().1;
            format!("blk.{layer}.{short}.{kind}")
        }
    }
}

fn write_gguf(model: &mut Llama, path: &std::path::Path, dtype: GgmlDType) {
    let c = model.config.clone();
    let mut tensors = Vec::new();
    for (name, t) in model.named_tensors().unwrap() {
        let t = if name.ends_with("q_proj.weight") {
            permute(&t, c.num_attention_heads)
        } else if name.ends_with("k_proj.weight") {
            permute(&t, c.num_key_value_heads)
        } else {
            t
        };
        // Norm vectors stay f32, as llama.cpp keeps them.
        let q = if t.rank() == 1 {
            QTensor::quantize(&t, GgmlDType::F32)
        } else {
            QTensor::quantize(&t, dtype)
        };
        tensors.push((gguf_name(&name), q.unwrap()));
    }
    let tokens: Vec<Value> = (0..c.vocab_size)
        .map(|i| Value::String(format!("t{i}")))
        .collect();
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(c.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            Value::U32(c.intermediate_size as u32),
        ),
        ("llama.block_count", Value::U32(c.num_hidden_layers as u32)),
        (
            "llama.attention.head_count",
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv",
            Value::U32(c.num_key_value_heads as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(c.rope_theta as f32)),
        ("llama.context_length", Value::U32(512)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("default".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(path).unwrap(), &md, &ts).unwrap();
}

#[test]
fn gguf_from_llama_cpp_layout_gives_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut original = tiny_llama(8, false).unwrap();
    let expected = logits(&original);
    for (dtype, tol) in [
        (GgmlDType::F32, 1e-5),
        (GgmlDType::F16, 1e-2),
        (GgmlDType::Q8_0, 0.1),
    ] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        write_gguf(&mut original, &path, dtype);
        let loaded = load_model(&path, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.config.num_key_value_heads, 2);
        assert!(!loaded.config.tie_word_embeddings);
        let d = max_abs_diff(&logits(&reload(loaded)), &expected);
        assert!(d < tol, "{dtype:?}: logits differ by {d}");
    }
}

#[test]
fn sharded_hf_folder_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut original = tiny_llama(9, true).unwrap();
    let expected = logits(&original);
    let tensors = original.named_tensors().unwrap();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        peft_models::io::save_safetensors(&dir.path().join(file), part, None).unwrap();
        for (name, _) in part {
            weight_map.insert(name.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        original.config.raw.to_string(),
    )
    .unwrap();
    let loaded = load_model(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert!(loaded.tokenizer.is_none());
    assert_eq!(max_abs_diff(&logits(&reload(loaded)), &expected), 0.0);
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn pytorch_checkpoints_give_transformers_logits() {
    let reference = peft_models::io::load_safetensors(
        &fixture("tiny_llama_bin/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 3]], &Device::Cpu).unwrap();
    for name in ["tiny_llama_bin", "tiny_llama_bin_sharded"] {
        let loaded = load_model(&fixture(name), &Device::Cpu, DType::F32).unwrap();
        // 2 layers × 9 tensors, the embedding, the final norm and the untied head.
        assert_eq!(loaded.weights.len(), 21, "{name}");
        let m = reload(loaded);
        let got = m
            .logits(&m.forward(&ids, None, None, false).unwrap())
            .unwrap();
        let d = max_abs_diff(&got, &reference["expected_logits"]);
        assert!(d < 1e-5, "{name}: logits differ from transformers' by {d}");
    }
}

#[test]
fn malformed_pytorch_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny_llama_bin/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let good = std::fs::read(fixture("tiny_llama_bin/pytorch_model.bin")).unwrap();
    let bin = dir.path().join("pytorch_model.bin");
    // Not a zip at all, a zip cut short, and a zip whose tensor data is cut short.
    for bytes in [
        b"not a checkpoint".to_vec(),
        good[..good.len() / 2].to_vec(),
        good[..200].to_vec(),
    ] {
        std::fs::write(&bin, &bytes).unwrap();
        let err = match load_model(dir.path(), &Device::Cpu, DType::F32) {
            Ok(_) => panic!("a {}-byte checkpoint loaded", bytes.len()),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("pytorch_model.bin is not a PyTorch checkpoint that can be read"),
            "{err}"
        );
    }
    std::fs::remove_file(&bin).unwrap();
    let err = load_model(dir.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("no model.safetensors, pytorch_model.bin or a shard index of either"),
        "{err}"
    );
}

#[test]
fn missing_weight_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut original = tiny_llama(9, true).unwrap();
    let tensors: Vec<(String, Tensor)> = original
        .named_tensors()
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
        .collect();
    peft_models::io::save_safetensors(&dir.path().join("model.safetensors"), &tensors, None)
        .unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        original.config.raw.to_string(),
    )
    .unwrap();
    let loaded = load_model(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let err = Llama::from_weights(loaded.config, loaded.weights, &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
}

/// The fuzzers' seed inputs (fuzz/seeds, written by fuzz/make_seeds.py) are valid files, so
/// the fuzzers start from inputs that reach the end of each reader. (The GGUF seeds hold only
/// the tensors the loader needs, not whole models.)
#[test]
fn fuzz_seeds_load() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    for (name, hidden, tensors) in [("llama_q8_q4.gguf", 32, 6), ("qwen2_f32.gguf", 4, 3)] {
        let path = seeds.join("gguf").join(name);
        let loaded = load_model(&path, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.config.hidden_size, hidden);
        assert_eq!(loaded.weights.len(), tensors);
        let tokenizer = loaded.tokenizer.as_ref().unwrap();
        assert!(!tokenizer.encode("Hello ab", true).unwrap().is_empty());
    }
    for (name, tensors) in [("lora_pair.safetensors", 2), ("dtypes.safetensors", 7)] {
        let path = seeds.join("safetensors").join(name);
        let loaded = peft_models::io::load_safetensors(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.len(), tensors);
    }
}

/// Little-endian GGUF v3 bytes, laid out by hand so that fields can hold what candle's writer
/// refuses: metadata (u32 or string values), tensor infos (name, dims in GGUF order, ggml type,
/// offset), then `data` at the next multiple of 32.
fn raw_gguf(md: &[(&str, Value)], tensors: &[(&str, &[u64], u32, u64)], data: &[u8]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((md.len() as u64).to_le_bytes());
    for (key, value) in md {
        string(&mut out, key);
        match value {
            Value::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Value::String(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            other => panic!("raw_gguf writes u32 and string values, not {other:?}"),
        }
    }
    for (name, dims, ggml_type, offset) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ggml_type.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.extend(data);
    out
}

fn llama_md(heads: u32) -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(4)),
        ("llama.attention.head_count", Value::U32(heads)),
        ("llama.block_count", Value::U32(1)),
    ]
}

fn gguf_error(bytes: Vec<u8>) -> String {
    let loaded = peft_models::loader::load_gguf_from(
        std::io::Cursor::new(bytes),
        std::path::Path::new("bad.gguf"),
        &Device::Cpu,
        DType::F32,
    );
    format!("{:#}", loaded.err().expect("malformed GGUF loaded"))
}

/// Inputs that once panicked or over-allocated instead of failing with an error.
#[test]
fn malformed_gguf_is_an_error() {
    const F32: u32 = 0;
    // general.alignment 0: candle's reader divides by it.
    let mut md = llama_md(2);
    md.push(("general.alignment", Value::U32(0)));
    let e = gguf_error(raw_gguf(&md, &[], &[]));
    assert!(e.contains("general.alignment is 0"), "{e}");
    // 0 heads: unpermute divides by the head count.
    let e = gguf_error(raw_gguf(
        &llama_md(0),
        &[("blk.0.attn_q.weight", &[4, 0], F32, 0)],
        &[],
    ));
    assert!(e.contains("0 attention heads"), "{e}");
    // An empty tensor: candle viewed its dangling u8 buffer as f32 blocks (fuzz crash).
    let e = gguf_error(raw_gguf(
        &llama_md(2),
        &[("token_embd.weight", &[4, 0], F32, 0)],
        &[],
    ));
    assert!(e.contains("empty or impossible shape"), "{e}");
    // An element count that overflows: the size check overflowed.
    let e = gguf_error(raw_gguf(
        &llama_md(2),
        &[("token_embd.weight", &[1 << 32, 1 << 32, 2], F32, 0)],
        &[],
    ));
    assert!(e.contains("empty or impossible shape"), "{e}");
    // Dimensions whose product is 0 but whose other dimensions overflow when multiplied.
    let e = gguf_error(raw_gguf(
        &llama_md(2),
        &[("blk.0.attn_q.weight", &[1 << 40, 1 << 40, 0], F32, 0)],
        &[],
    ));
    assert!(e.contains("empty or impossible shape"), "{e}");
    // An offset that overflows when added to the data's start.
    let e = gguf_error(raw_gguf(
        &llama_md(2),
        &[("token_embd.weight", &[4, 1], F32, u64::MAX - 8)],
        &[0; 16],
    ));
    assert!(e.contains("is truncated"), "{e}");
}

/// Inputs with which the fuzzers (fuzz/) once crashed, kept in fuzz/regressions/<target>/: each
/// now gives an error.
#[test]
fn fuzz_regressions_are_errors() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    let files = |target: &str| -> Vec<std::path::PathBuf> {
        match std::fs::read_dir(dir.join(target)) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    };
    for path in files("gguf") {
        let bytes = std::fs::read(&path).unwrap();
        let loaded = peft_models::loader::load_gguf_from(
            std::io::Cursor::new(bytes),
            &path,
            &Device::Cpu,
            DType::F32,
        );
        assert!(loaded.is_err(), "{} loaded", path.display());
    }
    for path in files("safetensors") {
        let bytes = std::fs::read(&path).unwrap();
        let loaded = peft_models::io::parse_safetensors(&bytes, &path, &Device::Cpu);
        assert!(loaded.is_err(), "{} loaded", path.display());
    }
}

/// QLoRA's base quantized while it loads is the model that quantizing after the load gives,
/// and no dense decoder linear weight is kept on the way.
#[test]
fn quantize_on_load_equals_quantize_after_load() {
    use peft_models::loader::{load_model_with, QuantizeOnLoad};
    use peft_quant::FourBit;
    let dir = tempfile::tempdir().unwrap();
    let mut original = tiny_llama(10, false).unwrap();
    peft_models::save::save_hf_model(&mut original, None, dir.path(), DType::F32).unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&mut original, &gguf, GgmlDType::F32);
    let q = QuantizeOnLoad {
        kind: FourBit::Nf4,
        double_quant: true,
        compute_dtype: DType::F32,
    };
    for path in [dir.path().to_path_buf(), gguf] {
        let mut after = reload(load_model(&path, &Device::Cpu, DType::F32).unwrap());
        after.quantize(FourBit::Nf4, true, DType::F32).unwrap();
        let loaded = load_model_with(&path, &Device::Cpu, DType::F32, Some(q)).unwrap();
        assert!(loaded.weights.keys().all(|k| !k.ends_with("_proj.weight")));
        assert_eq!(loaded.quantized.len(), 2 * 7);
        let during = Llama::from_loaded(
            loaded.config,
            loaded.weights,
            loaded.quantized,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        assert_eq!(max_abs_diff(&logits(&during), &logits(&after)), 0.0);
        assert_eq!(during.norm.dtype(), DType::F32);
        assert!(during
            .lm_head
            .as_ref()
            .is_some_and(|h| !h.weight.is_quantized()));
    }
}

/// FP8 checkpoints (transformers' FineGrainedFP8: `quant_method: "fp8"`, each linear weight
/// in float8 e4m3 with its `weight_scale_inv`) load dequantized: weight times its scale, per
/// block of `weight_block_size` (the last blocks cut short) or per tensor; activation scales
/// are dropped, and a model saved from it no longer says it is quantized. Other quantization
/// methods, FP8 weights without a config that scales them and a weight without its scale are
/// errors.
#[test]
fn fp8_checkpoints_load_dequantized() {
    let mut original = tiny_llama(4, false).unwrap();
    let tensors = original.named_tensors().unwrap();
    let write = |dir: &std::path::Path,
                 block: Option<usize>,
                 drop_scale: bool,
                 config: serde_json::Value| {
        let mut out = Vec::new();
        let mut expected = std::collections::HashMap::new();
        for (name, w) in &tensors {
            if !(name.starts_with("model.layers.") && name.ends_with("_proj.weight")) {
                out.push((name.clone(), w.clone()));
                continue;
            }
            let (rows, cols) = w.dims2().unwrap();
            let (br, bc) = block.map_or((rows, cols), |b| (b, b));
            let (nr, nc) = (rows.div_ceil(br), cols.div_ceil(bc));
            let mut scale = vec![0f32; nr * nc];
            let values = w.to_vec2::<f32>().unwrap();
            for (i, row) in values.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    let s = &mut scale[(i / br) * nc + j / bc];
                    *s = s.max(v.abs() / 448.0);
                }
            }
            let scale_t = Tensor::from_vec(scale.clone(), (nr, nc), &Device::Cpu).unwrap();
            let full: Vec<f32> = (0..rows * cols)
                .map(|k| scale[(k / cols / br) * nc + (k % cols) / bc])
                .collect();
            let full = Tensor::from_vec(full, (rows, cols), &Device::Cpu).unwrap();
            let q = (w / &full).unwrap().to_dtype(DType::F8E4M3).unwrap();
            expected.insert(
                name.clone(),
                (q.to_dtype(DType::F32).unwrap() * &full).unwrap(),
            );
            out.push((name.clone(), q));
            if !(drop_scale && name == "model.layers.0.mlp.up_proj.weight") {
                let scale_t = match block {
                    Some(_) => scale_t,
                    None => scale_t.reshape(()).unwrap(),
                };
                out.push((format!("{name}_scale_inv"), scale_t));
            }
            out.push((
                name.replace(".weight", ".activation_scale"),
                Tensor::new(&[1f32], &Device::Cpu).unwrap(),
            ));
        }
        peft_models::io::save_safetensors(&dir.join("model.safetensors"), &out, None).unwrap();
        let mut raw = original.config.raw.clone();
        raw["quantization_config"] = config;
        std::fs::write(dir.join("config.json"), raw.to_string()).unwrap();
        expected
    };
    for (block, config) in [
        (
            Some(24),
            serde_json::json!({"quant_method": "fp8", "weight_block_size": [24, 24]}),
        ),
        (
            None,
            serde_json::json!({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": null}),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let expected = write(dir.path(), block, false, config);
        let loaded = load_model(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert!(loaded.config.raw.get("quantization_config").is_none());
        for (name, want) in &expected {
            let got = &loaded.weights[name];
            assert_eq!(max_abs_diff(got, want), 0.0, "{name}, blocks {block:?}");
            // FP8 keeps about 3 significant bits: within 1/8 of each block's largest value.
            let source = &tensors.iter().find(|(n, _)| n == name).unwrap().1;
            let bound = source
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                / 8.0;
            assert!(max_abs_diff(got, source) <= bound, "{name}");
        }
        assert!(!loaded
            .weights
            .keys()
            .any(|k| k.ends_with("_scale_inv") || k.ends_with("activation_scale")));
        reload(loaded);
    }
    let error = |block, drop_scale, config: serde_json::Value| {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), block, drop_scale, config);
        match load_model(dir.path(), &Device::Cpu, DType::F32) {
            Ok(_) => panic!("loaded"),
            Err(e) => format!("{e:#}"),
        }
    };
    let fp8 = serde_json::json!({"quant_method": "fp8", "weight_block_size": [24, 24]});
    let e = error(Some(24), true, fp8);
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight has no"),
        "{e}"
    );
    let e = error(Some(24), false, serde_json::json!({"quant_method": "gptq"}));
    assert!(e.contains("pre-quantized (quant_method \"gptq\")"), "{e}");
    let e = error(Some(24), false, serde_json::Value::Null);
    assert!(
        e.contains("stored in FP8, but config.json has no quantization_config"),
        "{e}"
    );
}

/// bitsandbytes' 4-bit checkpoints (`quant_method: "bitsandbytes"`, `load_in_4bit`: a QLoRA
/// base as transformers saves it, Unsloth's `-bnb-4bit` uploads) load as 4-bit weights, their
/// codes and scales as stored: NF4 with double quantization, and FP4 with plain scales. A part
/// missing is named; bitsandbytes' 8-bit checkpoints are refused.
#[test]
fn bnb_4bit_checkpoints_load_as_stored() {
    use peft_quant::{quantize_4bit, Absmax, FourBit};
    let mut original = tiny_llama(6, false).unwrap();
    let tensors = original.named_tensors().unwrap();
    let write = |dir: &std::path::Path, kind: FourBit, double: bool, drop: Option<&str>| {
        let mut out = Vec::new();
        let mut expected = std::collections::HashMap::new();
        let u8s = |v: Vec<u8>| {
            let n = v.len();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        let f32s = |v: Vec<f32>| {
            let n = v.len();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        for (name, w) in &tensors {
            if !(name.starts_with("model.layers.") && name.ends_with("_proj.weight")) {
                out.push((name.clone(), w.clone()));
                continue;
            }
            let (rows, cols) = w.dims2().unwrap();
            let values: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let q = quantize_4bit(&values, kind, 64, double);
            expected.insert(name.clone(), q.dequantize());
            let n = q.packed.len();
            out.push((
                name.clone(),
                Tensor::from_vec(q.packed.clone(), (n, 1), &Device::Cpu).unwrap(),
            ));
            out.push((format!("{name}.quant_map"), f32s(kind.code().to_vec())));
            let mut state = serde_json::json!({
                "quant_type": kind.name(), "blocksize": 64, "dtype": "float32",
                "shape": [rows, cols],
            });
            match &q.absmax {
                Absmax::Plain(a) => out.push((format!("{name}.absmax"), f32s(a.clone()))),
                Absmax::Double { q: nested, offset } => {
                    out.push((format!("{name}.absmax"), u8s(nested.codes.clone())));
                    out.push((format!("{name}.nested_absmax"), f32s(nested.absmax.clone())));
                    out.push((
                        format!("{name}.nested_quant_map"),
                        f32s(peft_quant::dynamic_map(true).to_vec()),
                    ));
                    state["nested_blocksize"] = 256.into();
                    state["nested_offset"] = (*offset as f64).into();
                }
            }
            let key = format!("{name}.quant_state.bitsandbytes__{}", kind.name());
            out.push((key, u8s(state.to_string().into_bytes())));
        }
        let out: Vec<_> = out
            .into_iter()
            .filter(|(n, _)| Some(n.as_str()) != drop)
            .collect();
        peft_models::io::save_safetensors(&dir.join("model.safetensors"), &out, None).unwrap();
        let mut raw = original.config.raw.clone();
        raw["quantization_config"] = serde_json::json!({
            "quant_method": "bitsandbytes", "load_in_4bit": true,
            "bnb_4bit_quant_type": kind.name(), "bnb_4bit_use_double_quant": double,
        });
        std::fs::write(dir.join("config.json"), raw.to_string()).unwrap();
        expected
    };
    for (kind, double) in [(FourBit::Nf4, true), (FourBit::Fp4, false)] {
        let dir = tempfile::tempdir().unwrap();
        let expected = write(dir.path(), kind, double, None);
        let loaded = load_model(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.quantized.len(), expected.len());
        for (name, want) in &expected {
            let q = &loaded.quantized[name];
            assert_eq!(q.q.kind, kind);
            assert_eq!(&q.q.dequantize(), want, "{name}");
        }
        let (model, _) = loaded.into_model(&Device::Cpu, DType::F32).unwrap();
        assert!(logits(&model)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
    }
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        FourBit::Nf4,
        true,
        Some("model.layers.1.self_attn.k_proj.weight.nested_absmax"),
    );
    let e = format!(
        "{:#}",
        load_model(dir.path(), &Device::Cpu, DType::F32)
            .err()
            .unwrap()
    );
    assert!(
        e.contains("model.layers.1.self_attn.k_proj.weight: no nested_absmax"),
        "{e}"
    );
    let mut raw = original.config.raw.clone();
    raw["quantization_config"] =
        serde_json::json!({"quant_method": "bitsandbytes", "load_in_8bit": true});
    std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
    let e = format!(
        "{:#}",
        load_model(dir.path(), &Device::Cpu, DType::F32)
            .err()
            .unwrap()
    );
    assert!(e.contains("pre-quantized (bitsandbytes' 8-bit)"), "{e}");
}
