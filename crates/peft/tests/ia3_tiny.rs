//! IA3 on a tiny random Llama: starts as the base model, its vectors train, the folder
//! round-trips, and merging gives the unmerged outputs.

use candle_core::{Device, Tensor};
use peft::{Ia3Config, Ia3Model, Tuned};
use peft_models::testing::{max_abs_diff, tiny_llama};
use peft_ops::cross_entropy_chunked;

fn ids() -> Tensor {
    Tensor::new(&[[3u32, 17, 42, 5, 9, 33, 61, 0]], &Device::Cpu).unwrap()
}

fn logits(m: &peft_models::Llama) -> Tensor {
    m.logits(&m.forward(&ids(), None, None, false).unwrap())
        .unwrap()
}

#[test]
fn ia3_trains_round_trips_and_merges() {
    let before = logits(&tiny_llama(5, true).unwrap());
    let model = Ia3Model::new(tiny_llama(5, true).unwrap(), Ia3Config::default()).unwrap();
    // k_proj, v_proj ([out, 1]) and down_proj ([1, in]) in 2 layers.
    assert_eq!(model.layers.len(), 6);
    assert_eq!(
        model.layers["model.layers.0.mlp.down_proj"].l.dims(),
        [1, 64]
    );
    assert_eq!(
        model.layers["model.layers.0.self_attn.k_proj"].l.dims(),
        [16, 1]
    );
    assert_eq!(max_abs_diff(&logits(&model.base), &before), 0.0);

    let labels = Tensor::new(&[17i64, 42, 5, 9, 33, 61, 0, -100], &Device::Cpu).unwrap();
    let loss = |m: &Ia3Model| {
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
    let first = loss(&model).to_scalar::<f32>().unwrap();
    for _ in 0..30 {
        let g = model.base.backward(&loss(&model)).unwrap();
        for (_, v) in model.trainable() {
            let grad = g.get(v.as_tensor()).expect("every vector gets a gradient");
            v.set(&(v.as_tensor() - (grad * 0.5).unwrap()).unwrap())
                .unwrap();
        }
    }
    let last = loss(&model).to_scalar::<f32>().unwrap();
    assert!(last < 0.8 * first, "loss {first} -> {last}");

    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path(), "tiny").unwrap();
    let trained = logits(&model.base);
    let reloaded = Ia3Model::load(tiny_llama(5, true).unwrap(), dir.path()).unwrap();
    assert_eq!(max_abs_diff(&logits(&reloaded.base), &trained), 0.0);
    let merged = logits(&reloaded.merge_and_unload().unwrap());
    assert!(max_abs_diff(&merged, &trained) < 1e-5);
}
