//! LoRA adapters as GGUF LoRA files for llama.cpp: read back, each pair gives the module's
//! update as llama.cpp computes it (B·A·alpha/r, or B·A where the file has no alpha), with q/k
//! rows in llama.cpp's order; what llama.cpp's LoRA cannot hold is a clear error. That the
//! files equal llama.cpp's `convert_lora_to_gguf.py` output is checked by
//! scripts/hf/check_gguf_export.py.

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use peft::{LoraConfig, PeftModel, TargetModules};
use peft_models::gguf::{permute_rows, GgufType};
use peft_models::testing::{max_abs_diff, tiny_llama};

fn config(use_rslora: bool) -> LoraConfig {
    let mut c = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        use_rslora,
        target_modules: Some(TargetModules::parse_flag("all-linear")),
        init_lora_weights: serde_json::Value::Bool(false),
        ..Default::default()
    };
    // One module of another rank and alpha: its scaling is not the global alpha / r.
    c.rank_pattern.insert("layers.1.mlp.down_proj".into(), 2);
    c
}

/// The update of each module the file holds, as llama.cpp computes it, by HF module path.
fn updates(path: &std::path::Path, heads: (usize, usize)) -> Vec<(String, Tensor)> {
    let mut file = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let md = &content.metadata;
    assert_eq!(md["general.type"].to_string().unwrap(), "adapter");
    assert_eq!(md["adapter.type"].to_string().unwrap(), "lora");
    assert_eq!(md["general.architecture"].to_string().unwrap(), "llama");
    let alpha = md.get("adapter.lora.alpha").map(|v| v.to_f32().unwrap());
    let mut out = Vec::new();
    for name in content.tensor_infos.keys() {
        let Some(base) = name.strip_suffix(".lora_a") else {
            continue;
        };
        let mut read = |n: &str| {
            content
                .tensor(&mut file, n, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
        };
        let a = read(name);
        let mut b = read(&format!("{base}.lora_b"));
        let hf = peft_models::gguf::hf_name(base, "llama").unwrap();
        if hf.contains("q_proj") {
            b = permute_rows(&b, heads.0, true).unwrap();
        } else if hf.contains("k_proj") {
            b = permute_rows(&b, heads.1, true).unwrap();
        }
        let r = a.dim(0).unwrap() as f64;
        let scale = alpha.map_or(1.0, |alpha| alpha as f64 / r);
        let delta = (b.matmul(&a).unwrap() * scale).unwrap();
        out.push((hf.strip_suffix(".weight").unwrap().to_string(), delta));
    }
    out.sort_by(|x, y| x.0.cmp(&y.0));
    out
}

#[test]
fn written_pairs_give_each_modules_update() {
    // llama.cpp scales each pair by alpha / (its own rank): rank_pattern keeps that rule,
    // rsLoRA and alpha_pattern do not, and their B matrices carry the scaling instead.
    let mut alpha_pattern = config(false);
    alpha_pattern
        .alpha_pattern
        .insert("layers.0.self_attn.q_proj".into(), 3.0);
    for (name, cfg, ty, tol, keeps_alpha) in [
        ("rank_pattern", config(false), GgufType::F32, 1e-5, true),
        (
            "rank_pattern in f16",
            config(false),
            GgufType::F16,
            1e-2,
            true,
        ),
        ("rsLoRA", config(true), GgufType::F32, 1e-5, false),
        ("alpha_pattern", alpha_pattern, GgufType::F32, 1e-5, false),
    ] {
        let peft = PeftModel::new(tiny_llama(4, false).unwrap(), cfg, 5).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lora.gguf");
        peft.save_gguf_lora(&path, ty, "tiny").unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        let md = Content::read(&mut file).unwrap().metadata;
        assert_eq!(md.contains_key("adapter.lora.alpha"), keeps_alpha, "{name}");
        if keeps_alpha {
            assert!(matches!(md["adapter.lora.alpha"], Value::F32(a) if a == 8.0));
        }
        let c = &peft.base.config;
        let got = updates(&path, (c.num_attention_heads, c.num_key_value_heads));
        assert_eq!(got.len(), peft.adapters.len());
        for (module, delta) in got {
            let want = peft.adapters[&module].delta_weight().unwrap();
            let d = max_abs_diff(&delta, &want);
            assert!(d < tol, "{name}: {module} differs by {d}");
        }
    }
}

#[test]
fn what_llama_cpp_cannot_hold_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lora.gguf");
    let mut dora = config(false);
    dora.use_dora = true;
    let mut saved = config(false);
    saved.modules_to_save = Some(vec!["lm_head".into()]);
    for (cfg, tied, error) in [
        (dora, false, "llama.cpp's LoRA has no DoRA; write the merged model instead (peft merge --output FILE.gguf)"),
        (saved, false, "llama.cpp's LoRA holds only LoRA pairs, and this adapter also trains base_model.model.lm_head.weight; write the merged model instead (peft merge --output FILE.gguf)"),
    ] {
        let peft = PeftModel::new(tiny_llama(7, tied).unwrap(), cfg, 5).unwrap();
        let err = peft.save_gguf_lora(&path, GgufType::F32, "x").unwrap_err();
        assert_eq!(err.to_string(), error);
        assert!(!path.exists());
    }
}
