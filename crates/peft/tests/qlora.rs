//! QLoRA on a tiny random Llama: the 4-bit base computes exactly what a dense model holding its
//! dequantized weights computes (forward and LoRA gradients), the adapter files are plain LoRA
//! files that load on the dense base, and merging into the quantized base keeps the outputs.

use candle_core::{DType, Device, Tensor};
use peft::{LoraConfig, PeftModel, TargetModules};
use peft_models::testing::{max_abs_diff, tiny_llama};
use peft_models::Llama;
use peft_ops::{cross_entropy_chunked, LinearWeight};
use peft_quant::FourBit;

fn ids() -> Tensor {
    Tensor::new(&[[3u32, 17, 42, 5, 9, 33, 61, 0]], &Device::Cpu).unwrap()
}

fn logits(model: &Llama) -> Tensor {
    let h = model.forward(&ids(), None, None, false).unwrap();
    model.logits(&h).unwrap()
}

/// `|a − b| / |b|` (Frobenius norms).
fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    norm(&(a - b).unwrap()) / norm(b)
}

fn quantized(seed: u64, kind: FourBit) -> Llama {
    let mut m = tiny_llama(seed, true).unwrap();
    m.quantize(kind, true, DType::F32).unwrap();
    m
}

/// The same model with every quantized weight replaced by its dense dequantized copy.
fn densified(mut m: Llama) -> Llama {
    for (_, lin) in m.linears_mut() {
        assert!(lin.weight.is_quantized());
        lin.weight = LinearWeight::Dense(lin.weight.dense().unwrap());
    }
    m
}

fn config() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::parse_flag("all-linear")),
        init_lora_weights: serde_json::Value::Bool(false),
        ..Default::default()
    }
}

#[test]
fn quantized_base_equals_its_dequantized_weights() {
    for kind in [FourBit::Nf4, FourBit::Fp4] {
        let q = logits(&quantized(1, kind));
        let dense = logits(&densified(quantized(1, kind)));
        assert!(max_abs_diff(&q, &dense) < 1e-5, "{kind:?}");
        // 4 bits do change the model (by how much is checked on SmolLM2: random tiny models
        // amplify weight noise).
        let original = logits(&tiny_llama(1, true).unwrap());
        assert!(relative_error(&q, &original) > 1e-3, "{kind:?}");
    }
}

#[test]
fn lora_gradients_on_the_4bit_base_match_the_dense_equivalent() {
    let labels = Tensor::new(&[17i64, 42, 5, 9, 33, 61, 0, -100], &Device::Cpu).unwrap();
    let loss = |peft: &PeftModel| {
        let h = peft.base.forward(&ids(), None, None, true).unwrap();
        let h = h.reshape((8, 32)).unwrap();
        let w = peft.base.lm_head_weight().unwrap();
        cross_entropy_chunked(&h, &w, &labels, 3).unwrap().0
    };
    let grads = |base: Llama| {
        let peft = PeftModel::new(base, config(), 5).unwrap();
        let g = peft.base.backward(&loss(&peft)).unwrap();
        peft.trainable()
            .into_iter()
            .map(|(k, v)| (k, g.get(v.as_tensor()).unwrap().clone()))
            .collect::<Vec<_>>()
    };
    let q = grads(quantized(2, FourBit::Nf4));
    let d = grads(densified(quantized(2, FourBit::Nf4)));
    // q, k, v and gate, up share their LoRA products over their input on the 4-bit base too:
    // the same gradients as each layer on its own.
    let alone = peft_ops::with_lora_shared(false, || grads(quantized(2, FourBit::Nf4)));
    assert_eq!(q.len(), 28);
    for (((k, a), (_, b)), (_, c)) in q.iter().zip(&d).zip(&alone) {
        assert!(max_abs_diff(a, b) < 1e-5, "{k}");
        assert!(max_abs_diff(a, c) < 1e-5, "{k}: shared and alone");
    }
    // The sharing ran: through candle's graph alone, no A of those layers has a gradient.
    let peft = PeftModel::new(quantized(2, FourBit::Nf4), config(), 5).unwrap();
    let graph = peft_ops::with_layer_tape(false, || loss(&peft).backward().unwrap());
    for (k, v) in peft.trainable() {
        let shares = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"];
        if k.contains("lora_A") && shares.iter().any(|p| k.contains(p)) {
            assert!(graph.get(v.as_tensor()).is_none(), "{k} through the graph");
        }
    }
}

#[test]
fn adapter_loads_on_the_dense_base_and_merges_into_the_4bit_base() {
    let dir = tempfile::tempdir().unwrap();
    let peft = PeftModel::new(quantized(3, FourBit::Nf4), config(), 9).unwrap();
    let trained = logits(&peft.base);
    peft.save(dir.path(), "tiny").unwrap();

    // The same files on the dense base: plain PEFT LoRA weights, loaded as saved.
    let on_dense = PeftModel::load(tiny_llama(3, true).unwrap(), dir.path()).unwrap();
    for ((k, a), (_, b)) in on_dense.trainable().into_iter().zip(peft.trainable()) {
        assert_eq!(max_abs_diff(a.as_tensor(), b.as_tensor()), 0.0, "{k}");
    }
    // Reloaded onto a 4-bit base: identical.
    let on_4bit = PeftModel::load(quantized(3, FourBit::Nf4), dir.path()).unwrap();
    assert_eq!(max_abs_diff(&logits(&on_4bit.base), &trained), 0.0);
    // Merging dequantizes: the merged dense model gives the unmerged outputs.
    let merged = on_4bit.merge_and_unload().unwrap();
    assert!(max_abs_diff(&logits(&merged), &trained) < 1e-5);
}

/// `--compute-dtype bf16`: matmuls in bf16, norms in f32 (prepare_model_for_kbit_training),
/// LoRA weights in f32, and the gradients reach every LoRA tensor.
#[test]
fn bf16_compute_keeps_norms_in_f32_and_trains() {
    let mut f32_model = tiny_llama(6, true).unwrap();
    let model_config = f32_model.config.clone();
    let weights = f32_model
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    let mut base = Llama::from_weights(model_config, weights, &Device::Cpu, DType::BF16).unwrap();
    base.quantize(FourBit::Nf4, true, DType::BF16).unwrap();
    assert_eq!(base.layers[0].post_attention_layernorm.dtype(), DType::F32);
    assert_eq!(base.norm.dtype(), DType::F32);
    let peft = PeftModel::new(base, config(), 5).unwrap();
    let labels = Tensor::new(&[17i64, 42, 5, 9, 33, 61, 0, -100], &Device::Cpu).unwrap();
    let h = peft.base.forward(&ids(), None, None, true).unwrap();
    assert_eq!(h.dtype(), DType::BF16);
    let w = peft.base.lm_head_weight().unwrap();
    let loss = cross_entropy_chunked(&h.reshape((8, 32)).unwrap(), &w, &labels, 4)
        .unwrap()
        .0;
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    let grads = peft.base.backward(&loss).unwrap();
    for (k, v) in peft.trainable() {
        assert_eq!(v.dtype(), DType::F32, "{k}");
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {k}"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite(), "{k}");
    }
}

/// LoftQ: the 4-bit base is quantized as without it, A and B take the principal part of each
/// weight's quantization error, so the model starts closer to the dense one than QLoRA's
/// (whose B is zero); the saved adapter is a plain LoRA that gives those outputs on a base
/// quantized the usual way, and `loftq_config` asks for no more than one pass at 4 bits.
#[test]
fn loftq_starts_closer_to_the_dense_model() {
    let dense = logits(&tiny_llama(6, true).unwrap());
    let quantized_error = relative_error(&logits(&quantized(6, FourBit::Nf4)), &dense);
    let loftq = |r: usize, kind: FourBit| {
        let config = LoraConfig {
            r,
            lora_alpha: 2.0 * r as f64,
            init_lora_weights: "loftq".into(),
            ..config()
        };
        let mut peft = PeftModel::new(tiny_llama(6, true).unwrap(), config, 3).unwrap();
        peft.quantize_base(kind, true, DType::F32).unwrap();
        peft
    };
    let mut peft = loftq(4, FourBit::Nf4);
    assert!(peft
        .base
        .linears_mut()
        .iter()
        .all(|(_, l)| l.weight.is_quantized()));
    let error = relative_error(&logits(&peft.base), &dense);
    assert!(
        error < 0.95 * quantized_error,
        "{error} vs {quantized_error}"
    );
    // At full rank (32: the smaller side of every weight) the correction is the whole error.
    for kind in [FourBit::Nf4, FourBit::Fp4] {
        let error = relative_error(&logits(&loftq(32, kind).base), &dense);
        assert!(error < 1e-4, "{kind:?}: {error}");
    }

    let dir = tempfile::tempdir().unwrap();
    let peft = loftq(4, FourBit::Nf4);
    peft.save(dir.path(), "tiny").unwrap();
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["init_lora_weights"], serde_json::json!(true));
    let reloaded = PeftModel::load(quantized(6, FourBit::Nf4), dir.path()).unwrap();
    assert_eq!(
        max_abs_diff(&logits(&reloaded.base), &logits(&peft.base)),
        0.0
    );

    for (settings, message) in [
        (serde_json::json!({"loftq_bits": 4, "loftq_iter": 1}), None),
        (
            serde_json::json!({"loftq_iter": 5}),
            Some("loftq_iter must be 1"),
        ),
        (
            serde_json::json!({"loftq_bits": 8}),
            Some("loftq_bits must be 4"),
        ),
    ] {
        let mut config = LoraConfig {
            init_lora_weights: "loftq".into(),
            ..config()
        };
        config.other.insert("loftq_config".into(), settings);
        match (
            PeftModel::new(tiny_llama(6, true).unwrap(), config, 3),
            message,
        ) {
            (Ok(_), None) => {}
            (Err(e), Some(m)) => assert!(e.to_string().contains(m), "{e}"),
            (Ok(_), Some(m)) => panic!("accepted where {m}"),
            (Err(e), None) => panic!("{e}"),
        }
    }
}
