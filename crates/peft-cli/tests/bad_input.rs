//! The bad-input matrix: every mistake a user can make with files, data, adapters, flags and
//! the output folder gives one `error:` line naming the problem, exit code 1, no panic, and
//! leaves no file behind. Then the failures during a run: a full disk while saving keeps the
//! previous checkpoint, a NaN loss names the last good checkpoint, SIGINT during saves leaves
//! only complete checkpoints.

use candle_core::{DType, Device, Tensor};
use std::path::Path;
use std::process::{Command, Output};

fn peft(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

/// Asserts a clean failure: exit code 1, one `error:` line containing `needle`, no panic.
fn assert_one_line_error(out: &Output, what: &str, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: exit code, stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{what}: panic: {stderr}");
    // `peft train` reports what it trains before it starts; the error is the one other line.
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("trainable params: "))
        .collect();
    assert_eq!(lines.len(), 1, "{what}: one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{what}: {stderr}");
    assert!(
        lines[0].contains(needle),
        "{what}: {stderr:?} lacks {needle:?}"
    );
}

struct Case {
    name: &'static str,
    /// Files to create in the case's folder: (name, bytes).
    files: Vec<(&'static str, Vec<u8>)>,
    /// Arguments; `{dir}` is the case's folder, `{model}` the default model.
    args: Vec<&'static str>,
    needle: &'static str,
    needs_model: bool,
}

fn case(
    name: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    args: &[&'static str],
    needle: &'static str,
) -> Case {
    let needs_model = args.contains(&"{model}");
    Case {
        name,
        files,
        args: args.to_vec(),
        needle,
        needs_model,
    }
}

fn safetensors_bytes(tensors: &[(&str, Tensor)]) -> Vec<u8> {
    safetensors::serialize(tensors.iter().map(|(k, t)| (*k, t)), None).unwrap()
}

/// A tiny Llama saved as an HF folder's files.
fn tiny_hf_files() -> Vec<(&'static str, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let mut model = peft_models::testing::tiny_llama(3, true).unwrap();
    peft_models::save::save_hf_model(&mut model, None, dir.path(), DType::F32).unwrap();
    ["config.json", "model.safetensors"]
        .into_iter()
        .map(|f| (f, std::fs::read(dir.path().join(f)).unwrap()))
        .collect()
}

const TRAIN: &[&str] = &["train", "--model", "{model}", "--output", "{dir}/out"];

fn train(data: &'static str, extra: &[&'static str]) -> Vec<&'static str> {
    let mut a = TRAIN.to_vec();
    a.extend(["--data", data]);
    a.extend(extra);
    a
}

fn cases() -> Vec<Case> {
    let tiny = tiny_hf_files();
    let tiny_config = tiny[0].1.clone();
    let tiny_weights = tiny[1].1.clone();
    let st = safetensors_bytes(&[(
        "model.embed_tokens.weight",
        Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap(),
    )]);
    let mut bad_header = st.clone();
    // A header length far beyond the file.
    bad_header[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let mut garbled_json = st.clone();
    garbled_json[8..16].copy_from_slice(b"#!garble");
    let wrong_shape = safetensors_bytes(&[(
        "model.embed_tokens.weight",
        Tensor::zeros((64, 32), DType::F32, &Device::Cpu).unwrap(),
    )]);
    let parquet = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../peft-train/tests/fixtures/pirate_messages.parquet"),
    )
    .unwrap();
    let mut parquet_corrupt = parquet.clone();
    let n = parquet_corrupt.len();
    parquet_corrupt[n - 8..n - 4].copy_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
    let golden = peft_models::testing::golden_dir().join("lora_qv_r8");
    let golden_config = std::fs::read(golden.join("adapter_config.json")).unwrap();
    let golden_weights = std::fs::read(golden.join("adapter_model.safetensors")).unwrap();
    let gguf_header = [
        b"GGUF".as_slice(),
        &3u32.to_le_bytes(),
        &u64::MAX.to_le_bytes(),
        &0u64.to_le_bytes(),
    ]
    .concat();
    let qa = br#"{"prompt": "Who are you?", "completion": "A pirate."}"#.to_vec();
    let tiny_folder = |extra: Vec<(&'static str, Vec<u8>)>| {
        let mut f = vec![
            ("m/config.json", tiny_config.clone()),
            ("m/model.safetensors", tiny_weights.clone()),
        ];
        f.extend(extra);
        f
    };
    let hf = |config: &[u8], weights: Vec<u8>| {
        vec![
            ("m/config.json", config.to_vec()),
            ("m/model.safetensors", weights),
        ]
    };
    let tiny_cfg_with = |model_type: &str, extra: &str| {
        format!(r#"{{"model_type":"{model_type}","hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,"num_attention_heads":4,"vocab_size":64{extra}}}"#).into_bytes()
    };
    let tiny_cfg_of = |model_type: &str| tiny_cfg_with(model_type, "");
    let tiny_cfg = &tiny_cfg_of("llama")[..];
    let logits = |adapter: bool| -> Vec<&'static str> {
        let mut a = vec![
            "logits",
            "--model",
            "{dir}/m",
            "--input-ids",
            "1,2",
            "--out",
            "{dir}/logits.safetensors",
        ];
        if adapter {
            a.extend(["--adapter", "{dir}/a"]);
        }
        a
    };
    let truncated_gguf = peft_models::testing::default_model()
        .map(|m| {
            use std::io::Read;
            let mut head = Vec::new();
            std::fs::File::open(m)
                .unwrap()
                .take(4 << 20)
                .read_to_end(&mut head)
                .unwrap();
            head
        })
        .unwrap_or_default();
    vec![
        // Base model files.
        case("truncated GGUF", vec![("t.gguf", truncated_gguf)], &["inspect", "--model", "{dir}/t.gguf"], "truncated"),
        case("missing model", vec![], &["inspect", "--model", "{dir}/nothing"], "model not found"),
        case("truncated safetensors", hf(tiny_cfg, st[..st.len() / 2].to_vec()), &logits(false), "not a valid safetensors file"),
        case("safetensors header length past the end", hf(tiny_cfg, bad_header), &logits(false), "not a valid safetensors file"),
        case("garbled safetensors header", hf(tiny_cfg, garbled_json), &logits(false), "not a valid safetensors file"),
        case("weight of the wrong shape", hf(tiny_cfg, wrong_shape), &logits(false), "model.embed_tokens.weight has shape [64, 32], expected [64, 64]"),
        case("malformed config.json", hf(b"{\"hidden_size\": ", st.clone()), &logits(false), "config.json is not valid JSON"),
        case("unsupported architecture", hf(&tiny_cfg_of("gpt_neox"), st.clone()), &logits(false), "unsupported model_type \"gpt_neox\""),
        case("partial rotary embeddings outside Phi-3", hf(&tiny_cfg_with("qwen2", r#","partial_rotary_factor":0.75"#), st.clone()), &logits(false), "partial rotary embeddings (partial_rotary_factor 0.75) are supported for phi3 and glm4_moe only"),
        case("partial rotary of an odd number of dims", hf(&tiny_cfg_with("phi3", r#","partial_rotary_factor":0.35"#), st.clone()), &logits(false), "partial_rotary_factor 0.35 rotates 5 of 16 head dims"),
        case("image-text checkpoint without a text_config", hf(&tiny_cfg_of("gemma3"), st.clone()), &logits(false), "model_type \"gemma3\" needs a text_config object"),
        case("image-text checkpoint with another text model", hf(&tiny_cfg_with("gemma3", r#","text_config":{"model_type":"llama"}"#), st.clone()), &logits(false), "the text_config of a \"gemma3\" model has model_type \"llama\", expected \"gemma3_text\""),
        case("logit soft-capping outside Gemma", hf(&tiny_cfg_with("llama", r#","final_logit_softcapping":30.0"#), st.clone()), &logits(false), "soft-capping (final_logit_softcapping) is not supported for llama"),
        case("a soft cap that is not a positive number", hf(&tiny_cfg_with("gemma2", r#","attn_logit_softcapping":-1"#), st.clone()), &logits(false), "attn_logit_softcapping is not a positive number"),
        case("SmolLM3 RoPE flags for another layer count", hf(&tiny_cfg_with("smollm3", r#","no_rope_layers":[1,1,0]"#), st.clone()), &logits(false), "no_rope_layers has 3 entries for 1 layers"),
        case("no weights in the folder", vec![("m/config.json", tiny_cfg.to_vec())], &logits(false), "no model.safetensors"),
        case("garbage GGUF", vec![("g.gguf", b"this is not a gguf file at all".to_vec())], &["inspect", "--model", "{dir}/g.gguf"], "is not a valid GGUF file"),
        case("GGUF with an absurd tensor count", vec![("g.gguf", gguf_header)], &["inspect", "--model", "{dir}/g.gguf"], "g.gguf"),
        // Data files (checked before the model loads).
        case("empty data", vec![("d.jsonl", b"\n\n".to_vec())], &train("{dir}/d.jsonl", &[]), "has no records"),
        case("malformed JSON line", vec![("d.jsonl", b"{\"text\": \"ok\"}\n{\"text\": oops}\n".to_vec())], &train("{dir}/d.jsonl", &[]), "d.jsonl:2: invalid JSON"),
        case("a line that is not an object", vec![("d.jsonl", b"[1, 2]\n".to_vec())], &train("{dir}/d.jsonl", &[]), "d.jsonl:1: expected a JSON object"),
        case("missing data file", vec![], &train("{dir}/absent.jsonl", &[]), "cannot read data file"),
        case("truncated Parquet", vec![("d.parquet", parquet[..parquet.len() / 2].to_vec())], &train("{dir}/d.parquet", &[]), "is not a valid Parquet file"),
        case("corrupted Parquet footer", vec![("d.parquet", parquet_corrupt)], &train("{dir}/d.parquet", &[]), "is not a valid Parquet file"),
        case("CSV header naming a column twice", vec![("d.csv", b"prompt,prompt,completion\na,b,c\n".to_vec())], &train("{dir}/d.csv", &[]), "names column \"prompt\" twice"),
        case("empty conversation", vec![("d.jsonl", b"{\"messages\": []}\n".to_vec())], &train("{dir}/d.jsonl", &[]), "record 1: messages is empty"),
        case("CSV row with extra fields", vec![("d.csv", b"prompt,completion\na,b\nc,d,e\n".to_vec())], &train("{dir}/d.csv", &[]), "d.csv:3"),
        case("column mapping without =", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--columns", "prompt"]), "is not field=column"),
        case("mapped column missing", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--columns", "prompt=question"]), "no column \"question\""),
        case("missing fields", vec![("d.jsonl", b"{\"question\": \"hi\"}\n".to_vec())], &train("{dir}/d.jsonl", &[]), "record 1: no \"text\""),
        case("unknown chat role", vec![("d.jsonl", br#"{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#.to_vec())], &train("{dir}/d.jsonl", &[]), "record 1: unknown chat role \"wizard\""),
        case("sequences longer than max", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--max-seq-length", "3"]), "no record has a token to train on after truncation to 3 tokens"),
        // Adapters.
        case("malformed adapter config", tiny_folder(vec![("a/adapter_config.json", b"{\"r\": 8, \"target_modules\": ".to_vec())]), &logits(true), "adapter_config.json is malformed"),
        case("adapter weights missing", tiny_folder(vec![("a/adapter_config.json", golden_config.clone())]), &logits(true), "adapter_model.safetensors"),
        case("adapter for another base (shape mismatch)", tiny_folder(vec![("a/adapter_config.json", golden_config), ("a/adapter_model.safetensors", golden_weights)]), &logits(true), "adapter made for another model?"),
        // Methods, targets and flags.
        case("unknown method", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--method", "magic"]), "unknown method \"magic\""),
        case("unknown target module", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--target-modules", "q_proj,query_key_value"]), "\"query_key_value\" not found in the model"),
        case("invalid target regex", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--target-modules", "re:(q_proj"]), "invalid regex \"(q_proj\": unclosed group"),
        case("eval split out of range", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--eval-split", "1.5"]), "eval split must be at least 0 and below 1"),
        case("unknown save strategy", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--save-strategy", "hourly"]), "--save-strategy must be steps, epoch or no"),
        case("packing with prompt tuning", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--method", "prompt", "--packing"]), "--packing does not work with prompt tuning"),
        case("malformed TOML recipe", vec![("r.toml", b"lr = = 3".to_vec())], &["train", "--config", "{dir}/r.toml"], "is not valid TOML"),
        case("unknown device", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--device", "tpu"]), "unknown device \"tpu\""),
        // Settings that cannot mean anything.
        case("negative learning rate", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--lr=-1"]), "learning rate must be a finite number of at least 0, got -1"),
        case("NaN learning rate", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--lr", "nan"]), "got NaN"),
        case("beta of 1.5", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--adam-beta1", "1.5"]), "adam_beta1 must be at least 0 and below 1"),
        case("a scheduler option the scheduler lacks", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--lr-scheduler", "linear", "--lr-scheduler-kwargs", r#"{"power": 2}"#]), "the linear scheduler takes no \"power\""),
        case("scheduler options that are not a JSON object", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--lr-scheduler-kwargs", "3"]), "--lr-scheduler-kwargs must be a JSON object"),
        case("cosine_with_min_lr without its floor", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--lr-scheduler", "cosine_with_min_lr"]), "cosine_with_min_lr needs min_lr or min_lr_rate"),
        case("fractional warmup steps above 1", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--warmup-steps", "2.5"]), "warmup_steps must be a whole number of steps or a fraction below 1, got 2.5"),
        case("a recipe naming an option twice", vec![("d.jsonl", qa.clone()), ("r.toml", b"lr = 1e-4\nlearning_rate = 2e-4\n".to_vec())], &train("{dir}/d.jsonl", &["--config", "{dir}/r.toml"]), "learning_rate and lr set the same option"),
        case("a recipe that pushes to the Hub", vec![("d.jsonl", qa.clone()), ("r.toml", b"push_to_hub = true\n".to_vec())], &train("{dir}/d.jsonl", &["--config", "{dir}/r.toml"]), "push_to_hub = true is not supported"),
        case("unknown eval strategy", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--eval-strategy", "hourly"]), "--eval-strategy must be steps, epoch or no"),
        case("zero epochs", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--epochs", "0"]), "the number of epochs must be above 0"),
        case("NEFTune alpha of 0", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--neftune-noise-alpha", "0"]), "neftune_noise_alpha must be a number above 0"),
        case("missing eval data", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--eval-data", "{dir}/absent.jsonl"]), "cannot read data file"),
        case("eval data and an eval split", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--eval-data", "{dir}/d.jsonl", "--eval-split", "0.1"]), "--eval-data and --eval-split both choose the eval set"),
        case("load_best_model_at_end without checkpoints", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--eval-split", "0.2", "--load-best-model-at-end"]), "load_best_model_at_end needs checkpoints to choose from"),
        case("load_best_model_at_end with saves between evaluations", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--eval-split", "0.2", "--load-best-model-at-end", "--eval-steps", "4", "--save-steps", "6"]), "the save steps (6) must be a multiple of the eval steps (4)"),
        case("load_best_model_at_end without eval data", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--load-best-model-at-end", "--save-strategy", "epoch"]), "--load-best-model-at-end needs eval data"),
        case("a best-model metric that is not computed", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--metric-for-best-model", "accuracy"]), "the evaluations compute the eval loss alone"),
        case("a logging integration peft lacks", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--report-to", "tensorboard,wandb"]), "--report-to \"wandb\" is not supported"),
        case("save every 0 steps", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--save-steps", "0"]), "save_steps must be above 0, got 0"),
        case("log every 2.5 steps", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--logging-steps", "2.5"]), "logging_steps must be a whole number of steps, or below 1 a fraction of them"),
        case("lora_alpha 0", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--lora-alpha", "0"]), "lora_alpha must be above 0"),
        case("unknown LoRA init", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--init-lora-weights", "eva"]), "--init-lora-weights must be true, false, gaussian, orthogonal, pissa, pissa_niter_N, olora or loftq, got \"eva\""),
        case("the trainable-tokens method without tokens", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--method", "trainable-tokens"]), "--method trainable-tokens needs --trainable-token-indices"),
        case("trainable tokens that are not ids", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--trainable-token-indices", "1,x"]), "--trainable-token-indices must list token ids, got \"1,x\""),
        case("a trainable token outside the vocabulary", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--trainable-token-indices", "1,99999"]), "trainable tokens: token 99999 is outside the vocabulary (size 49152)"),
        case("DoRA on the embedding", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--target-modules", "q_proj,embed_tokens", "--use-dora", "true"]), "use_dora with LoRA on the embedding (model.embed_tokens) is not supported"),
        case("LoftQ with DoRA", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--quantize", "nf4", "--init-lora-weights", "loftq", "--use-dora", "true"]), "init_lora_weights=\"loftq\" with use_dora is not supported"),
        case("LoftQ of several iterations", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--quantize", "nf4", "--init-lora-weights", "loftq", "--loftq-config", "{\"loftq_bits\": 4, \"loftq_iter\": 5}"]), "loftq_config: loftq_iter must be 1, got 5"),
        case("LoftQ settings that are not JSON", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--quantize", "nf4", "--init-lora-weights", "loftq", "--loftq-config", "bits=4"]), "--loftq-config is not JSON: bits=4"),
        case("PiSSA rank above the weight's", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--init-lora-weights", "olora", "--r", "300"]), "init_lora_weights olora needs r <= min(in, out) = 192, got r = 300"),
        case("IA3 feed-forward module outside the targets", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--method", "ia3", "--feedforward-modules", "up_proj"]), "\"up_proj\" is not a target"),
        case("zero-width prefix projection", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--method", "prefix", "--prefix-projection", "--encoder-hidden-size", "0"]), "encoder_hidden_size of at least 1"),
        case("more virtual tokens than positions", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--method", "prompt", "--num-virtual-tokens", "100000"]), "100000 virtual tokens leave no room"),
        case("repetition penalty of 0", vec![], &["generate", "--model", "{model}", "--prompt", "hi", "--repetition-penalty", "0"], "--repetition-penalty must be above 0"),
        case("bench of 0 steps", vec![], &["bench", "--model", "{model}", "--steps", "0"], "--steps and --batch-size must be at least 1"),
        case("bench rows of 1 token", vec![], &["bench", "--model", "{model}", "--seq-len", "1"], "--seq-len must be at least 2"),
        case("negative temperature", vec![], &["generate", "--model", "{model}", "--prompt", "hi", "--temperature=-1"], "--temperature must be at least 0"),
        case("missing chat template file", vec![("d.jsonl", qa.clone())], &train("{dir}/d.jsonl", &["--chat-template", "{dir}/none.jinja"]), "cannot read the chat template"),
        case("tools that are not JSON", vec![("d.jsonl", b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}], \"tools\": \"[oops\"}\n".to_vec())], &train("{dir}/d.jsonl", &[]), "record 1: tools is not valid JSON"),
        case("chat with a missing adapter folder", vec![], &["chat", "--model", "{model}", "--adapter", "tuned={dir}/nowhere"], "adapter tuned: adapter folder not found"),
        case("chat with a model without a tokenizer", tiny.clone(), &["chat", "--model", "{dir}"], "the model has no tokenizer"),
        case("GGUF of an unknown tensor type", vec![], &["merge", "--model", "{model}", "--output", "{dir}/m.gguf", "--dtype", "q3_k_s"], "unknown GGUF tensor type \"q3_k_s\" (known: f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k)"),
        case("GGUF of a model without a tokenizer", tiny.clone(), &["merge", "--model", "{dir}", "--output", "{dir}/m.gguf"], "the model has no tokenizer, which a GGUF file must carry"),
        case("GGUF LoRA in a k-quant mix", vec![], &["export-lora", "--model", "{model}", "--adapter", concat!(env!("CARGO_MANIFEST_DIR"), "/../peft/tests/fixtures/lora_layers_0_2"), "--output", "{dir}/a.gguf", "--dtype", "q4_k_m"], "q4_k_m is a mix for whole models; write a LoRA in f32, f16, bf16 or q8_0"),
        case("GGUF LoRA of an IA3 adapter", vec![], &["export-lora", "--model", "{model}", "--adapter", concat!(env!("CARGO_MANIFEST_DIR"), "/../peft/tests/fixtures/ia3"), "--output", "{dir}/a.gguf"], "only LoRA adapters can be written as a GGUF LoRA; merge this one instead (peft merge --output FILE.gguf)"),
        case("an aux loss weight for a dense model", vec![("d.jsonl", qa.clone())], &["train", "--model", "{model}", "--data", "{dir}/d.jsonl", "--output", "{dir}/o", "--max-steps", "1", "--router-aux-loss-coef", "0.01"], "router_aux_loss_coef is set to 0.01 but llama is not a mixture-of-experts model"),
        case("compare with an unknown method", vec![("d.jsonl", qa.clone())], &["compare", "--model", "{model}", "--data", "{dir}/d.jsonl", "--output", "{dir}/c", "--methods", "lora,bogus"], "unknown method \"bogus\""),
        // The output folder.
        case("output under a file", vec![("d.jsonl", qa.clone()), ("file", b"x".to_vec())], &["train", "--model", "{model}", "--data", "{dir}/d.jsonl", "--output", "{dir}/file/out", "--max-steps", "1"], "cannot create output folder"),
    ]
}

#[test]
fn bad_input_matrix() {
    let model = peft_models::testing::default_model();
    let all = cases();
    assert!(all.len() >= 25);
    let mut ran = 0;
    for c in all {
        if c.needs_model && model.is_none() {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in &c.files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
        let before = files(dir.path());
        let args: Vec<String> = c
            .args
            .iter()
            .map(|a| {
                let a = a.replace("{dir}", &s(dir.path()));
                match &model {
                    Some(m) => a.replace("{model}", &s(m)),
                    None => a,
                }
            })
            .collect();
        let out = peft(&args);
        assert_one_line_error(&out, c.name, c.needle);
        eprintln!(
            "{}: {}",
            c.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        assert_eq!(files(dir.path()), before, "{}: files left behind", c.name);
        ran += 1;
    }
    eprintln!("{ran} bad-input cases checked");
}

fn smollm2_train(out: &Path, extra: &[&str]) -> Vec<String> {
    let model = peft_models::testing::default_model().unwrap();
    let mut a: Vec<String> = [
        "train",
        "--model",
        &s(&model),
        "--data",
        &s(&peft_models::testing::shipped_data()),
        "--output",
        &s(out),
        "--batch-size",
        "1",
        "--max-seq-length",
        "48",
        "--r",
        "2",
        "--seed",
        "7",
        "--quiet",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    a.extend(extra.iter().map(|a| a.to_string()));
    if !extra.contains(&"--target-modules") {
        a.extend(["--target-modules".into(), "q_proj".into()]);
    }
    a
}

fn tmp_leftovers(dir: &Path) -> Vec<String> {
    files(dir)
        .into_iter()
        .filter(|f| f.contains(".tmp"))
        .collect()
}

/// A disk that fills while a checkpoint is written (a per-file size limit: the adapter fits,
/// the optimizer state does not) and while the final adapter is written: the run stops with
/// one line naming the file, the previous checkpoint and adapter stay byte for byte, and no
/// partial file or folder remains.
#[test]
fn full_disk_keeps_the_previous_checkpoint() {
    if peft_models::testing::default_model().is_none() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    let args = smollm2_train(&out, &["--max-steps", "6", "--save-steps", "2"]);
    assert!(peft(&args).status.success());
    // Back to step 2: the resumed run below writes checkpoint-4 again.
    for later in ["checkpoint-4", "checkpoint-6"] {
        std::fs::remove_dir_all(out.join(later)).unwrap();
    }
    let snapshot = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        files(dir)
            .into_iter()
            .filter(|f| dir.join(f).is_file() && !f.ends_with("metrics.jsonl"))
            .map(|f| (f.clone(), std::fs::read(dir.join(&f)).unwrap()))
            .collect()
    };
    let before = snapshot(&out);
    let adapter = std::fs::metadata(out.join("adapter_model.safetensors"))
        .unwrap()
        .len();
    let optimizer = std::fs::metadata(out.join("checkpoint-2/optimizer.safetensors"))
        .unwrap()
        .len();
    assert!(adapter < optimizer);
    // Limits in KiB.
    let limited = |limit: u64, args: &[String]| -> Output {
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                "trap '' XFSZ; ulimit -f {limit}; exec {} {}",
                env!("CARGO_BIN_EXE_peft"),
                quoted.join(" ")
            ))
            .output()
            .unwrap()
    };
    let mut resume = args.clone();
    resume.extend(["--resume".into(), "latest".into()]);
    // The adapter fits, the optimizer state does not.
    let failed = limited((adapter / 1024 + optimizer / 1024) / 2, &resume);
    assert_one_line_error(&failed, "full disk at a checkpoint", "File too large");
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("cannot write checkpoint"),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    assert_eq!(snapshot(&out), before, "earlier files changed");
    assert_eq!(tmp_leftovers(&out), Vec::<String>::new());

    // No checkpoint due before the end: the final adapter write fails.
    let mut to_end = smollm2_train(&out, &["--max-steps", "6", "--save-steps", "100"]);
    to_end.extend(["--resume".into(), s(&out.join("checkpoint-2"))]);
    // The checkpoint was made with --save-steps 2; the settings that matter are equal.
    let failed = limited(adapter / 1024 / 2, &to_end);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("File too large") && stderr.contains("adapter_model.safetensors"),
        "{stderr}"
    );
    assert_eq!(snapshot(&out), before, "earlier files changed");
    assert_eq!(tmp_leftovers(&out), Vec::<String>::new());
}

/// A learning rate that blows the weights up: after one step the values and the attention
/// output are ~1e30 and their product overflows, so the loss is NaN at step 2; the message
/// names that step and checkpoint-1.
#[test]
fn nan_loss_stops_with_the_last_good_checkpoint() {
    if peft_models::testing::default_model().is_none() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    let args = smollm2_train(
        &out,
        &[
            "--max-steps",
            "5",
            "--save-steps",
            "1",
            "--lr",
            "1e30",
            "--warmup-ratio",
            "0",
            "--target-modules",
            "v_proj,o_proj",
        ],
    );
    let failed = peft(&args);
    assert_one_line_error(
        &failed,
        "NaN loss",
        "at step 2: stopping; the last good checkpoint is",
    );
    assert!(String::from_utf8_lossy(&failed.stderr).contains("checkpoint-1"));
    assert!(out.join("checkpoint-1/trainer_state.json").exists());
}

/// SIGINT sent again and again, also while checkpoints are being written: the run exits with
/// 130 after saving, and every checkpoint folder is complete.
#[test]
fn repeated_sigint_leaves_complete_checkpoints() {
    if peft_models::testing::default_model().is_none() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    let args = smollm2_train(&out, &["--max-steps", "1000", "--save-steps", "1"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while peft_train::checkpoint::list(&out).is_empty() {
        assert!(start.elapsed().as_secs() < 300, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = loop {
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(130));
    for (_, dir) in peft_train::checkpoint::list(&out) {
        for f in [
            "trainer_state.json",
            "optimizer.safetensors",
            "adapter_model.safetensors",
            "adapter_config.json",
        ] {
            assert!(dir.join(f).exists(), "{} lacks {f}", dir.display());
        }
    }
    assert_eq!(tmp_leftovers(&out), Vec::<String>::new());
}
