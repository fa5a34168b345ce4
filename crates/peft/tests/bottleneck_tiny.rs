//! Bottleneck adapters on a tiny random Llama: the identity at init, they train (also with
//! gradient checkpointing), and the documented file layout round-trips.

use candle_core::{Device, Tensor};
use peft::{BottleneckConfig, BottleneckModel, Tuned};
use peft_models::testing::{max_abs_diff, tiny_llama};
use peft_ops::cross_entropy_chunked;

fn ids() -> Tensor {
    Tensor::new(&[[3u32, 17, 42, 5, 9, 33, 61, 0]], &Device::Cpu).unwrap()
}

fn logits(m: &peft_models::Llama) -> Tensor {
    m.logits(&m.forward(&ids(), None, None, false).unwrap())
        .unwrap()
}

fn train(model: &BottleneckModel) -> (f32, f32) {
    let labels = Tensor::new(&[17i64, 42, 5, 9, 33, 61, 0, -100], &Device::Cpu).unwrap();
    let loss = |m: &BottleneckModel| {
        let h = m
            .base
            .forward(&ids(), None, None, true)
            .unwrap()
            .squeeze(0)
            .unwrap();
        cross_entropy_chunked(&h, &m.base.lm_head_weight().unwrap(), &labels, 4)
            .unwrap()
            .0
    };
    let first = loss(model).to_scalar::<f32>().unwrap();
    for _ in 0..30 {
        let g = model.base.backward(&loss(model)).unwrap();
        for (k, v) in model.trainable() {
            let grad = g
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {k}"));
            v.set(&(v.as_tensor() - (grad * 0.2).unwrap()).unwrap())
                .unwrap();
        }
    }
    (first, loss(model).to_scalar::<f32>().unwrap())
}

#[test]
fn houlsby_and_pfeiffer_start_as_identity_train_and_round_trip() {
    let before = logits(&tiny_llama(6, true).unwrap());
    for (config, per_layer) in [
        (BottleneckConfig::houlsby(4), 2),
        (BottleneckConfig::pfeiffer(4), 1),
    ] {
        for checkpointing in [false, true] {
            let mut base = tiny_llama(6, true).unwrap();
            base.gradient_checkpointing = checkpointing;
            let mut model = BottleneckModel::new(base, config.clone(), 1).unwrap();
            assert_eq!(model.adapters.len(), 2 * per_layer);
            // hidden 32 / 4 = 8: down 8×32 + 8, up 32×8 + 32 per adapter.
            assert_eq!(
                model.parameter_counts().0,
                2 * per_layer * (8 * 32 + 8 + 32 * 8 + 32)
            );
            assert_eq!(max_abs_diff(&logits(&model.base), &before), 0.0);
            let (first, last) = train(&model);
            assert!(
                last < 0.8 * first,
                "{}: loss {first} -> {last}",
                config.config
            );

            let dir = tempfile::tempdir().unwrap();
            model.save(dir.path(), "tiny").unwrap();
            let names: Vec<String> = model.trainable().into_iter().map(|(k, _)| k).collect();
            assert!(names
                .contains(&"base_model.model.model.layers.1.output_adapter.up.weight".to_string()));
            let reloaded = BottleneckModel::load(tiny_llama(6, true).unwrap(), dir.path()).unwrap();
            assert_eq!(
                max_abs_diff(&logits(&reloaded.base), &logits(&model.base)),
                0.0
            );
        }
    }
}
