//! `peft combine` (HF PEFT's `add_weighted_adapter`) on adapter files; scripts/hf/check_combine.py
//! compares the written tensors with HF PEFT's (identical).

use candle_core::{Device, Tensor};
use peft::lora::combine::{combine, Combination, LoraFiles};
use peft::{LoraConfig, TargetModules};
use std::collections::HashMap;

const Q: &str = "model.layers.0.self_attn.q_proj";
const V: &str = "model.layers.0.self_attn.v_proj";

fn randn(seed: u64, shape: (usize, usize)) -> Tensor {
    peft_ops::random_normal(
        seed,
        0,
        &[shape.0, shape.1],
        1.0,
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// An adapter of rank `r` on the given modules (in 6, out 5).
fn adapter(seed: u64, r: usize, alpha: f64, modules: &[&str]) -> LoraFiles {
    let names = modules
        .iter()
        .map(|m| m.rsplit('.').next().unwrap().to_string());
    let config = LoraConfig {
        r,
        lora_alpha: alpha,
        target_modules: Some(TargetModules::List(names.collect())),
        ..Default::default()
    };
    let mut tensors = HashMap::new();
    for (i, m) in modules.iter().enumerate() {
        let s = seed * 10 + i as u64;
        tensors.insert(peft::keys::file_key(m, "lora_A.weight"), randn(s, (r, 6)));
        tensors.insert(
            peft::keys::file_key(m, "lora_B.weight"),
            randn(s + 5, (5, r)),
        );
    }
    LoraFiles { config, tensors }
}

/// `scaling · B · A` of `module` in the files `t` (zeros where it has none).
fn delta(t: &HashMap<String, Tensor>, scaling: f64, module: &str) -> Tensor {
    match (
        t.get(&peft::keys::file_key(module, "lora_A.weight")),
        t.get(&peft::keys::file_key(module, "lora_B.weight")),
    ) {
        (Some(a), Some(b)) => (b.matmul(a).unwrap() * scaling).unwrap(),
        _ => Tensor::zeros((5, 6), candle_core::DType::F32, &Device::Cpu).unwrap(),
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// cat adds exactly the weighted changes of adapters of any ranks and modules, as one adapter
/// of the summed rank whose scaling is 1; the targets are the union.
#[test]
fn cat_adds_the_weighted_changes() {
    let one = adapter(1, 2, 4.0, &[Q, V]);
    let two = adapter(2, 3, 3.0, &[Q]);
    let (config, tensors) = combine(&[one, two], &[0.7, -0.4], Combination::Cat).unwrap();
    assert_eq!((config.r, config.lora_alpha), (5, 5.0));
    assert_eq!(
        config.target_modules,
        Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]))
    );
    let (one, two) = (adapter(1, 2, 4.0, &[Q, V]), adapter(2, 3, 3.0, &[Q]));
    let got: HashMap<String, Tensor> = tensors.into_iter().collect();
    for module in [Q, V] {
        let want = ((delta(&one.tensors, 2.0, module) * 0.7).unwrap()
            + (delta(&two.tensors, 1.0, module) * -0.4).unwrap())
        .unwrap();
        let d = max_diff(&delta(&got, 1.0, module), &want);
        assert!(d < 1e-5, "{module}: {d}");
    }
}

/// linear: PEFT's `A = Σ sign·sqrt(|w s|)·A_i`, `B = Σ sqrt(|w s|)·B_i` over one rank.
#[test]
fn linear_sums_the_scaled_matrices() {
    let (one, two) = (adapter(3, 2, 4.0, &[Q]), adapter(4, 2, 1.0, &[Q]));
    let pick = |f: &LoraFiles, p: &str| f.tensors[&peft::keys::file_key(Q, p)].clone();
    let (a1, b1, a2, b2) = (
        pick(&one, "lora_A.weight"),
        pick(&one, "lora_B.weight"),
        pick(&two, "lora_A.weight"),
        pick(&two, "lora_B.weight"),
    );
    let (config, tensors) = combine(&[one, two], &[0.5, -2.0], Combination::Linear).unwrap();
    assert_eq!(config.r, 2);
    let got: HashMap<String, Tensor> = tensors.into_iter().collect();
    // Scalings 2 and 0.5: w·s = 1 and -1.
    let want_a = (&a1 - &a2).unwrap();
    let want_b = (&b1 + &b2).unwrap();
    assert!(max_diff(&got[&peft::keys::file_key(Q, "lora_A.weight")], &want_a) < 1e-6);
    assert!(max_diff(&got[&peft::keys::file_key(Q, "lora_B.weight")], &want_b) < 1e-6);
}

#[test]
fn what_cannot_be_combined_is_refused() {
    let err = |adapters: Vec<LoraFiles>, how| {
        let n = adapters.len();
        format!("{:#}", combine(&adapters, &vec![1.0; n], how).unwrap_err())
    };
    let ranks = err(
        vec![adapter(1, 2, 2.0, &[Q]), adapter(2, 3, 3.0, &[Q])],
        Combination::Linear,
    );
    assert!(ranks.contains("one rank"), "{ranks}");
    let mut dora = adapter(1, 2, 2.0, &[Q]);
    dora.config.use_dora = true;
    let dora = err(vec![dora, adapter(2, 2, 2.0, &[Q])], Combination::Cat);
    assert!(dora.contains("DoRA adapters cannot be combined"), "{dora}");
    let weights = combine(&[adapter(1, 2, 2.0, &[Q])], &[1.0, 2.0], Combination::Cat).unwrap_err();
    assert_eq!(weights.to_string(), "2 weights for 1 adapters");
    // A malformed adapter: lora_A without lora_B, matrices of a rank its config does not have.
    let mut half = adapter(1, 2, 2.0, &[Q]);
    half.tensors.retain(|k, _| k.contains("lora_A"));
    let half = err(vec![half, adapter(2, 2, 2.0, &[V])], Combination::Cat);
    assert!(half.contains("without its lora_B"), "{half}");
    let mut wide = adapter(1, 3, 2.0, &[Q]);
    wide.config.r = 1;
    let wide = err(vec![wide, adapter(2, 1, 2.0, &[V])], Combination::Cat);
    assert!(wide.contains("more than their configs'"), "{wide}");
}
