//! LoRA on a tiny random Llama: merge equivalence, save/load round trip, PEFT file layout,
//! and end-to-end gradients against finite differences.

use candle_core::{DType, Device, Tensor, Var};
use peft::{LoraConfig, PeftModel, TargetModules};
use peft_models::testing::{max_abs_diff, tiny_llama};
use peft_ops::cross_entropy_chunked;

fn ids() -> Tensor {
    Tensor::new(&[[3u32, 17, 42, 5, 9, 33, 61, 0]], &Device::Cpu).unwrap()
}

fn config(targets: &str) -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::parse_flag(targets)),
        // Random B so that the adapter changes the output.
        init_lora_weights: serde_json::Value::Bool(false),
        ..Default::default()
    }
}

/// The training loss of [`ids`] against fixed labels (one ignored), through the chunked head.
fn train_loss(model: &peft_models::Llama) -> Tensor {
    let labels = Tensor::new(&[17i64, 42, 5, 9, 33, 61, 0, -100], &Device::Cpu).unwrap();
    let h = model
        .forward(&ids(), None, None, true)
        .unwrap()
        .squeeze(0)
        .unwrap();
    cross_entropy_chunked(&h, &model.lm_head_weight().unwrap(), &labels, 3)
        .unwrap()
        .0
}

fn logits(model: &peft_models::Llama) -> Tensor {
    let h = model.forward(&ids(), None, None, false).unwrap();
    model.logits(&h).unwrap()
}

#[test]
fn adapter_changes_output_and_merge_matches_unmerged() {
    let base_logits = logits(&tiny_llama(1, true).unwrap());
    let peft = PeftModel::new(tiny_llama(1, true).unwrap(), config("all-linear"), 7).unwrap();
    assert_eq!(peft.adapters.len(), 14);
    let unmerged = logits(&peft.base);
    assert!(
        max_abs_diff(&unmerged, &base_logits) > 1e-2,
        "the adapter must matter"
    );
    let merged = logits(&peft.merge_and_unload().unwrap());
    assert!(max_abs_diff(&merged, &unmerged) < 1e-5);
}

#[test]
fn save_and_load_round_trip_in_peft_layout() {
    let dir = tempfile::tempdir().unwrap();
    let peft = PeftModel::new(tiny_llama(2, false).unwrap(), config("q_proj,v_proj"), 3).unwrap();
    let before = logits(&peft.base);
    peft.save(dir.path(), "tiny").unwrap();

    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8);
    assert_eq!(cfg["inference_mode"], true);
    assert_eq!(cfg["base_model_name_or_path"], "tiny");
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );

    let tensors = peft_models::io::load_safetensors(
        &dir.path().join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensors.len(), 8);
    let a = &tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"];
    assert_eq!((a.dims(), b.dims()), (&[4usize, 32][..], &[16usize, 4][..]));
    assert_eq!(a.dtype(), DType::F32);

    let loaded = PeftModel::load(tiny_llama(2, false).unwrap(), dir.path()).unwrap();
    assert_eq!(max_abs_diff(&logits(&loaded.base), &before), 0.0);
}

#[test]
fn loading_onto_a_model_of_other_shape_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    PeftModel::new(tiny_llama(2, false).unwrap(), config("q_proj"), 3)
        .unwrap()
        .save(dir.path(), "tiny")
        .unwrap();
    // Same adapter, rank rewritten: shapes no longer fit.
    let path = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"r\": 4", "\"r\": 2");
    std::fs::write(&path, text).unwrap();
    let err = PeftModel::load(tiny_llama(2, false).unwrap(), dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("lora_A") && err.contains("[4, 32]"), "{err}");
}

#[test]
fn modules_to_save_and_bias_are_saved_under_peft_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("q_proj");
    cfg.modules_to_save = Some(vec!["lm_head".into()]);
    let mut peft = PeftModel::new(tiny_llama(4, false).unwrap(), cfg, 3).unwrap();
    let (trainable, all) = peft.parameter_counts();
    // 2 layers × (A 4×32 + B 32×4) + lm_head 64×32
    assert_eq!(trainable, 2 * (128 + 128) + 64 * 32);
    assert!(all > trainable);
    peft.save(dir.path(), "tiny").unwrap();
    let tensors = peft_models::io::load_safetensors(
        &dir.path().join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(tensors.contains_key("base_model.model.lm_head.weight"));
    PeftModel::load(tiny_llama(4, false).unwrap(), dir.path()).unwrap();
}

/// On a tied model, `modules_to_save` of the head or the embedding trains a copy of it and
/// leaves the other as it was (HF PEFT's wrapper): each gets its own gradient, both round-trip
/// through the adapter file, and the merged model is untied.
#[test]
fn modules_to_save_unties_a_tied_head_and_embedding() {
    let mut cfg = config("q_proj");
    cfg.modules_to_save = Some(vec!["lm_head".into(), "embed_tokens".into()]);
    let mut peft = PeftModel::new(tiny_llama(4, true).unwrap(), cfg, 3).unwrap();
    // 2 layers × (A 4×32 + B 32×4), and the head and the embedding, 64×32 each.
    assert_eq!(peft.parameter_counts().0, 2 * (128 + 128) + 2 * 64 * 32);
    let grads = peft.base.backward(&train_loss(&peft.base)).unwrap();
    let trainable: std::collections::HashMap<String, Var> = peft.trainable().into_iter().collect();
    let grad_of = |key: &str| -> Tensor {
        let g = grads.get(trainable[key].as_tensor()).unwrap();
        g.abs().unwrap().sum_all().unwrap()
    };
    // The two copies get different gradients: they are no longer one tensor.
    let (gh, ge) = (
        grad_of("base_model.model.lm_head.weight"),
        grad_of("base_model.model.model.embed_tokens.weight"),
    );
    assert!(gh.to_scalar::<f32>().unwrap() > 0.0 && ge.to_scalar::<f32>().unwrap() > 0.0);
    assert!(max_abs_diff(&gh, &ge) > 1e-3);
    // Train both apart, then save, load and merge.
    for key in [
        "base_model.model.lm_head.weight",
        "base_model.model.model.embed_tokens.weight",
    ] {
        let v = &trainable[key];
        v.set(&(v.as_tensor() + 0.1 * v.as_tensor().randn_like(0.0, 1.0).unwrap()).unwrap())
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    peft.save(dir.path(), "tiny").unwrap();
    let want = logits(&peft.base);
    let loaded = PeftModel::load(tiny_llama(4, true).unwrap(), dir.path()).unwrap();
    assert!(max_abs_diff(&logits(&loaded.base), &want) < 1e-6);
    let merged = loaded.merge_and_unload().unwrap();
    assert!(!merged.config.tie_word_embeddings);
    assert_eq!(merged.config.raw["tie_word_embeddings"], false);
    assert!(max_abs_diff(&logits(&merged), &want) < 1e-4);
}

/// The full backward (attention, RoPE, RMSNorm, SwiGLU, chunked loss) against central
/// differences of the loss in a few entries of one LoRA B matrix.
#[test]
fn lora_gradients_match_finite_differences() {
    let peft =
        PeftModel::new(tiny_llama(5, true).unwrap(), config("q_proj,down_proj"), 11).unwrap();
    let loss = |m: &PeftModel| train_loss(&m.base);
    for path in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ] {
        let var: Var = peft.adapters[path].b.clone();
        let grads = peft.base.backward(&loss(&peft)).unwrap();
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let flat: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
        for i in [0, 5, flat.len() - 1] {
            let eps = 1e-2f32;
            let at = |d: f32| {
                let mut v = flat.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&peft).to_scalar::<f32>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&orig).unwrap();
            assert!(
                (numeric - g[i]).abs() < 2e-3 * (1.0 + numeric.abs()),
                "{path}[{i}]: numeric {numeric} vs analytic {}",
                g[i]
            );
        }
    }
}

/// Gradient checkpointing changes memory, not gradients.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let grads_of = |checkpointing: bool| -> Vec<Vec<f32>> {
        let mut cfg = config("all-linear");
        cfg.lora_dropout = 0.1;
        let mut peft = PeftModel::new(tiny_llama(6, true).unwrap(), cfg, 11).unwrap();
        peft.base.gradient_checkpointing = checkpointing;
        peft.dropout_seed.set(99);
        let grads = peft.base.backward(&train_loss(&peft.base)).unwrap();
        peft.trainable()
            .iter()
            .map(|(k, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {k}"));
                g.flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect()
    };
    let (plain, checkpointed) = (grads_of(false), grads_of(true));
    assert_eq!(plain.len(), 28);
    for (a, b) in plain.iter().zip(&checkpointed) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{x} vs {y}");
        }
    }
}

/// DoRA: merging gives the unmerged outputs, a fresh adapter starts as plain LoRA (m =
/// ‖W + sBA‖), and the magnitude's gradient matches finite differences (the norm is a constant
/// in PEFT's backward, so only m is checked this way).
#[test]
fn dora_merges_and_its_magnitude_gradient_matches_finite_differences() {
    let mut cfg = config("q_proj,down_proj");
    cfg.use_dora = true;
    let dora = PeftModel::new(tiny_llama(8, true).unwrap(), cfg.clone(), 3).unwrap();
    let lora = PeftModel::new(tiny_llama(8, true).unwrap(), config("q_proj,down_proj"), 3).unwrap();
    assert!(max_abs_diff(&logits(&dora.base), &logits(&lora.base)) < 1e-5);

    let loss = |m: &PeftModel| train_loss(&m.base);
    let m: Var = dora.adapters["model.layers.1.mlp.down_proj"]
        .magnitude
        .clone()
        .unwrap();
    // Move m off the norm so that the adapter is a real DoRA adapter.
    m.set(&(m.as_tensor() * 1.1).unwrap()).unwrap();
    let g: Vec<f32> = dora
        .base
        .backward(&loss(&dora))
        .unwrap()
        .get(m.as_tensor())
        .unwrap()
        .to_vec1()
        .unwrap();
    let orig = m.as_tensor().copy().unwrap();
    let flat: Vec<f32> = orig.to_vec1().unwrap();
    for i in [0, 7, flat.len() - 1] {
        let at = |d: f32| {
            let mut v = flat.clone();
            v[i] += d;
            m.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&dora).to_scalar::<f32>().unwrap()
        };
        let numeric = (at(1e-2) - at(-1e-2)) / 2e-2;
        m.set(&orig).unwrap();
        assert!(
            (numeric - g[i]).abs() < 2e-3 * (1.0 + numeric.abs()),
            "m[{i}]: {numeric} vs {}",
            g[i]
        );
    }
    let unmerged = logits(&dora.base);
    assert!(
        max_abs_diff(&unmerged, &logits(&lora.base)) > 1e-3,
        "m must matter"
    );
    let dir = tempfile::tempdir().unwrap();
    dora.save(dir.path(), "tiny").unwrap();
    let reloaded = PeftModel::load(tiny_llama(8, true).unwrap(), dir.path()).unwrap();
    assert_eq!(max_abs_diff(&logits(&reloaded.base), &unmerged), 0.0);
    let merged = logits(&dora.merge_and_unload().unwrap());
    assert!(max_abs_diff(&merged, &unmerged) < 1e-5);
}

/// The training loss's gradients for `trainable` (flattened, in order), through
/// `Llama::backward`, and the number of nodes candle's backward walks.
fn taped_or_not(model: &peft_models::Llama, trainable: &[(String, Var)]) -> (Vec<Vec<f32>>, usize) {
    let loss = train_loss(model);
    let nodes = loss.sorted_nodes().len();
    let grads = model.backward(&loss).unwrap();
    let grads = trainable
        .iter()
        .map(|(k, v)| {
            let g = grads.get(v.as_tensor());
            let g = g.unwrap_or_else(|| panic!("no gradient for {k}"));
            g.flatten_all().unwrap().to_vec1().unwrap()
        })
        .collect();
    (grads, nodes)
}

fn assert_same_gradients(graph: &[Vec<f32>], taped: &[Vec<f32>], case: &str) {
    assert_eq!(graph.len(), taped.len(), "{case}");
    for (a, b) in graph.iter().zip(taped) {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + x.abs()),
                "{case}: {x} vs {y}"
            );
        }
    }
}

/// Layer tapes (the decoder stack as one autograd node, `peft_ops::taped`) change how the
/// backward runs, not what it computes: the gradients are those of candle's graph for LoRA on
/// the attention (the MLP then one frozen op), all-linear with dropout, with checkpointing, and
/// for DoRA, whose composed ops the tape does not record (the stack keeps candle's graph).
/// Where the tape serves, candle's backward walks a handful of nodes instead of every op's.
#[test]
fn layer_tapes_give_the_gradients_of_the_graph() {
    let run = |targets: &str, dropout: f64, checkpointing: bool, dora: bool, tape: bool| {
        let mut cfg = config(targets);
        cfg.lora_dropout = dropout;
        cfg.use_dora = dora;
        let mut peft = PeftModel::new(tiny_llama(12, true).unwrap(), cfg, 5).unwrap();
        peft.base.gradient_checkpointing = checkpointing;
        peft.dropout_seed.set(7);
        peft_ops::with_layer_tape(tape, || taped_or_not(&peft.base, &peft.trainable()))
    };
    for (targets, dropout, checkpointing, dora) in [
        ("q_proj,k_proj,v_proj,o_proj", 0.0, false, false),
        ("all-linear", 0.1, false, false),
        ("all-linear", 0.1, true, false),
        ("q_proj,down_proj", 0.0, false, true),
    ] {
        let case = format!("{targets} dropout {dropout} checkpointing {checkpointing} dora {dora}");
        let (graph, graph_nodes) = run(targets, dropout, checkpointing, dora, false);
        let (taped, taped_nodes) = run(targets, dropout, checkpointing, dora, true);
        assert_same_gradients(&graph, &taped, &case);
        if dora {
            assert_eq!(taped_nodes, graph_nodes, "{case}: DoRA keeps the graph");
        } else if checkpointing {
            // A node per layer already; the tape takes the layers' nodes into one.
            assert!(taped_nodes < graph_nodes, "{case}");
        } else {
            // The head and loss, the stack's node and the variables it hangs from.
            assert!(taped_nodes <= 12, "{case}: {taped_nodes} nodes taped");
            assert!(
                graph_nodes >= 30,
                "{case}: {graph_nodes} nodes in the graph"
            );
        }
    }
}

/// q, k and v (or two of them; gate and up) sharing their products over their input
/// (`peft_ops::lora_linears`) give the gradients of the LoRA layers on their own: through
/// candle's graph, a layer tape and gradient checkpointing. Through candle's graph alone,
/// shared, no A of those layers gets its gradient from the graph (they come from the model's
/// grad sink: the sharing ran); with dropout they do (nothing is shared).
#[test]
fn lora_layers_sharing_an_input_give_the_gradients_of_separate_ones() {
    let run = |targets: &str, dropout: f64, checkpointing: bool, tape: bool, shared: bool| {
        let mut cfg = config(targets);
        cfg.lora_dropout = dropout;
        let mut peft = PeftModel::new(tiny_llama(14, true).unwrap(), cfg, 5).unwrap();
        peft.base.gradient_checkpointing = checkpointing;
        peft.dropout_seed.set(3);
        let trainable = peft.trainable();
        peft_ops::with_lora_shared(shared, || {
            peft_ops::with_layer_tape(tape, || {
                let mut graph = train_loss(&peft.base).backward().unwrap();
                let shares = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"];
                let a_from_graph = trainable.iter().any(|(k, v)| {
                    let shared = shares.iter().any(|p| k.contains(p));
                    shared && k.contains("lora_A") && graph.get(v.as_tensor()).is_some()
                });
                // Empties the sink for the backward below.
                peft.base.grad_sink.drain_into(&mut graph).unwrap();
                (taped_or_not(&peft.base, &trainable).0, a_from_graph)
            })
        })
    };
    for (targets, dropout, checkpointing, tape) in [
        ("q_proj,k_proj,v_proj,o_proj", 0.0, false, false),
        ("q_proj,k_proj,v_proj,o_proj", 0.1, false, false),
        ("q_proj,v_proj", 0.0, false, false),
        ("q_proj,k_proj,v_proj,o_proj", 0.0, false, true),
        ("all-linear", 0.0, false, false),
        ("all-linear", 0.0, true, true),
    ] {
        let case = format!("{targets} dropout {dropout} checkpointing {checkpointing} tape {tape}");
        let (alone, _) = run(targets, dropout, checkpointing, tape, false);
        let (shared, a_from_graph) = run(targets, dropout, checkpointing, tape, true);
        assert_same_gradients(&alone, &shared, &case);
        if !tape && !checkpointing {
            assert_eq!(a_from_graph, dropout > 0.0, "{case}: A through the graph");
        }
    }
}

/// Full fine-tuning through the layer tape (every weight and norm a variable, their gradients
/// through the grad sink): the gradients of candle's graph.
#[test]
fn full_fine_tuning_gradients_through_the_layer_tape() {
    use peft::Tuned;
    let run = |tape: bool| {
        let full = peft::FullModel::new(tiny_llama(13, false).unwrap()).unwrap();
        peft_ops::with_layer_tape(tape, || taped_or_not(&full.base, &full.trainable()))
    };
    let ((graph, graph_nodes), (taped, taped_nodes)) = (run(false), run(true));
    assert_same_gradients(&graph, &taped, "full fine-tuning");
    assert!(
        taped_nodes < graph_nodes / 4,
        "{taped_nodes} vs {graph_nodes} nodes"
    );
}

/// LoRA on the embedding (HF PEFT's `lora_embedding_A` `[r, vocab]` and `lora_embedding_B`
/// `[hidden, r]`): each token's row gains `s·B·A[:, token]`. Untied, merging it into the
/// embedding gives the same logits; tied, the head reads the embedding as it was until the
/// merge (as in HF PEFT); the pair trains, saves under HF PEFT's keys and loads back.
#[test]
fn lora_on_the_embedding() {
    let peft = PeftModel::new(
        tiny_llama(6, false).unwrap(),
        config("q_proj,embed_tokens"),
        2,
    )
    .unwrap();
    let lora = peft
        .base
        .embedding_lora
        .clone()
        .expect("the embedding is adapted");
    assert_eq!(lora.a.dims(), [4, 64]);
    let with_q = PeftModel::new(tiny_llama(6, false).unwrap(), config("q_proj"), 2).unwrap();
    let unmerged = logits(&peft.base);
    assert!(max_abs_diff(&unmerged, &logits(&with_q.base)) > 1e-2);
    let dir = tempfile::tempdir().unwrap();
    peft.save(dir.path(), "tiny").unwrap();
    let saved = peft_models::io::load_safetensors(
        &dir.path().join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let key = "base_model.model.model.embed_tokens.lora_embedding_";
    assert_eq!(saved[&format!("{key}A")].dims(), [4, 64]);
    assert_eq!(saved[&format!("{key}B")].dims(), [32, 4]);
    let loaded = PeftModel::load(tiny_llama(6, false).unwrap(), dir.path()).unwrap();
    assert_eq!(max_abs_diff(&logits(&loaded.base), &unmerged), 0.0);
    let merged = logits(&peft.merge_and_unload().unwrap());
    assert!(max_abs_diff(&merged, &unmerged) < 1e-5);

    // Tied: the unmerged head is the embedding as it was.
    let tied = PeftModel::new(tiny_llama(6, true).unwrap(), config("embed_tokens"), 2).unwrap();
    assert!(tied.adapters.is_empty());
    let head = tied.base.lm_head_weight().unwrap();
    assert_eq!(
        max_abs_diff(&head, &tiny_llama(6, true).unwrap().embed_tokens),
        0.0
    );
    // A and B get gradients.
    let loss = train_loss(&tied.base);
    let grads = tied.base.backward(&loss).unwrap();
    let lora = tied.base.embedding_lora.as_ref().unwrap();
    for v in [&lora.a, &lora.b] {
        let g = grads.get(v.as_tensor()).expect("a gradient");
        assert!(
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
    // Not with DoRA, nor with the embedding trained another way.
    let mut dora = config("embed_tokens");
    dora.use_dora = true;
    let err = PeftModel::new(tiny_llama(6, true).unwrap(), dora, 2)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("use_dora with LoRA on the embedding"),
        "{err}"
    );
    let mut both = config("q_proj,embed_tokens");
    both.modules_to_save = Some(vec!["embed_tokens".into()]);
    let err = PeftModel::new(tiny_llama(6, true).unwrap(), both, 2)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("both a LoRA target and in modules_to_save"),
        "{err}"
    );
}

/// An adapter of a grown vocabulary (tokens added, the embedding and head resized, as HF
/// PEFT saves them beside the pairs): the model takes them, at the new size.
#[test]
fn adapters_of_a_grown_vocabulary_bring_their_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let peft = PeftModel::new(tiny_llama(8, false).unwrap(), config("q_proj"), 1).unwrap();
    let before = logits(&peft.base);
    peft.save(dir.path(), "tiny").unwrap();
    let file = dir.path().join("adapter_model.safetensors");
    let mut tensors: Vec<(String, Tensor)> = peft_models::io::load_safetensors(&file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let grow = |t: &Tensor| {
        let extra = Tensor::ones((8, 32), DType::F32, &Device::Cpu).unwrap();
        Tensor::cat(&[t, &extra], 0).unwrap()
    };
    let base = tiny_llama(8, false).unwrap();
    let head = base.lm_head_weight().unwrap();
    tensors.push((
        "base_model.model.model.embed_tokens.weight".into(),
        grow(&base.embed_tokens),
    ));
    tensors.push(("base_model.model.lm_head.weight".into(), grow(&head)));
    peft_models::io::save_safetensors(&file, &tensors, None).unwrap();
    let loaded = PeftModel::load(tiny_llama(8, false).unwrap(), dir.path()).unwrap();
    assert_eq!(loaded.base.config.vocab_size, 72);
    let after = logits(&loaded.base);
    assert_eq!(after.dims(), [1, 8, 72]);
    let old = after.narrow(2, 0, 64).unwrap();
    assert!(max_abs_diff(&old, &before) < 1e-6);
    // An untied head must come with it.
    tensors.retain(|(k, _)| !k.ends_with("lm_head.weight"));
    peft_models::io::save_safetensors(&file, &tensors, None).unwrap();
    let err = PeftModel::load(tiny_llama(8, false).unwrap(), dir.path())
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("no output head of that size"),
        "{err:#}"
    );
}
