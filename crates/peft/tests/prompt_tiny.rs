//! Prompt tuning and prefix tuning on a tiny random Llama: only the virtual tokens train, the
//! loss falls, and the saved folder reloads to identical outputs.

use candle_core::{Device, Tensor};
use peft::{PromptInit, PromptModel, Tuned};
use peft_models::testing::{max_abs_diff, tiny_llama};
use peft_ops::cross_entropy_chunked;

fn ids() -> Tensor {
    Tensor::new(&[[3u32, 17, 42, 5, 9, 33, 61, 0]], &Device::Cpu).unwrap()
}

/// Mean next-token loss over `ids()` (virtual rows skipped), and its gradients.
fn loss(model: &PromptModel) -> candle_core::Tensor {
    let (h, off) = model.hidden(&ids(), None, true).unwrap();
    let h = h.narrow(1, off, 8).unwrap().reshape((8, 32)).unwrap();
    let labels = Tensor::new(&[17i64, 42, 5, 9, 33, 61, 0, -100], &Device::Cpu).unwrap();
    let w = model.base.lm_head_weight().unwrap();
    cross_entropy_chunked(&h, &w, &labels, 4).unwrap().0
}

fn train_and_round_trip(model: PromptModel, lr: f64) {
    let model = model;
    let first = loss(&model).to_scalar::<f32>().unwrap();
    for _ in 0..30 {
        let g = model.base.backward(&loss(&model)).unwrap();
        for (k, var) in model.trainable() {
            let grad = g
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {k}"));
            var.set(&(var.as_tensor() - (grad * lr).unwrap()).unwrap())
                .unwrap();
        }
    }
    let last = loss(&model).to_scalar::<f32>().unwrap();
    assert!(last < 0.8 * first, "loss {first} -> {last}");

    let dir = tempfile::tempdir().unwrap();
    Tuned::save(&model, dir.path(), "tiny").unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["inference_mode"], true);
    assert_eq!(cfg["num_virtual_tokens"], 4);
    // One tensor in the file whatever was trained (a projection is stored as its output).
    let reloaded = PromptModel::load(tiny_llama(4, true).unwrap(), dir.path()).unwrap();
    assert_eq!(reloaded.trainable().len(), 1);
    let a = model.forward(&ids(), None, false).unwrap();
    let b = reloaded.forward(&ids(), None, false).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6);
    let mut model = model;
    let (t, all) = model.parameter_counts();
    let n: usize = model.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(t, n);
    assert!(all > t);
}

#[test]
fn prompt_tuning_trains_and_round_trips() {
    let m = PromptModel::new_prompt_tuning(tiny_llama(4, true).unwrap(), 4, PromptInit::Random, 1)
        .unwrap();
    assert_eq!(m.embeddings.dims(), [4, 32]);
    train_and_round_trip(m, 0.5);
}

#[test]
fn prefix_tuning_trains_and_round_trips() {
    // 2 layers × (key, value) × 2 kv heads × head_dim 8.
    let m = PromptModel::new_prefix_tuning(tiny_llama(4, true).unwrap(), 4, 1, None).unwrap();
    assert_eq!(m.embeddings.dims(), [4, 2 * 2 * 2 * 8]);
    assert_eq!(m.config.token_dim, Some(16));
    train_and_round_trip(m, 0.5);
}

/// With `prefix_projection`, the MLP trains (PEFT counts embedding + MLP: 4·16 + (8·16 + 8) +
/// (64·8 + 64)) and the file holds its output in the plain layout.
#[test]
fn prefix_projection_trains_and_saves_its_output() {
    let m = PromptModel::new_prefix_tuning(tiny_llama(4, true).unwrap(), 4, 1, Some(8)).unwrap();
    assert_eq!(m.trainable().len(), 5);
    assert_eq!(m.config.prefix_projection, Some(true));
    let n: usize = m.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(n, 4 * 16 + (8 * 16 + 8) + (64 * 8 + 64));
    train_and_round_trip(m, 0.1);
}

#[test]
fn text_init_repeats_the_text_embeddings() {
    let base = tiny_llama(4, true).unwrap();
    let emb = base.embed_tokens.clone();
    let m = PromptModel::new_prompt_tuning(base, 5, PromptInit::Text(vec![7, 9]), 1).unwrap();
    let want = emb
        .index_select(&Tensor::new(&[7u32, 9, 7, 9, 7], &Device::Cpu).unwrap(), 0)
        .unwrap();
    assert_eq!(max_abs_diff(m.embeddings.as_tensor(), &want), 0.0);
}

/// Gradient checkpointing with prefix tuning: each recomputed layer attends over its prefix,
/// and every trainable tensor (the embedding and, with `prefix_projection`, the MLP) gets the
/// gradients of the plain run. With a padding mask too (the prefix's entries prepended).
#[test]
fn prefix_tuning_gradients_are_those_without_checkpointing() {
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1, 0]], &Device::Cpu).unwrap();
    let grads_of = |projection: Option<usize>, checkpointing: bool, masked: bool| {
        let mut m =
            PromptModel::new_prefix_tuning(tiny_llama(4, true).unwrap(), 4, 1, projection).unwrap();
        m.base.gradient_checkpointing = checkpointing;
        let (h, _) = m.hidden(&ids(), masked.then_some(&mask), true).unwrap();
        let h = h.reshape((8, 32)).unwrap();
        let labels = Tensor::new(&[17i64, 42, 5, 9, 33, 61, 0, -100], &Device::Cpu).unwrap();
        let w = m.base.lm_head_weight().unwrap();
        let loss = cross_entropy_chunked(&h, &w, &labels, 4).unwrap().0;
        let grads = m.base.backward(&loss).unwrap();
        m.trainable()
            .iter()
            .map(|(k, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {k}"));
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect::<Vec<_>>()
    };
    for (projection, masked) in [(None, false), (Some(8), false), (None, true)] {
        let (plain, checkpointed) = (
            grads_of(projection, false, masked),
            grads_of(projection, true, masked),
        );
        assert_eq!(plain.len(), if projection.is_some() { 5 } else { 1 });
        for (a, b) in plain.iter().zip(&checkpointed) {
            assert!(a.iter().any(|x| *x != 0.0));
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
            }
        }
    }
}
