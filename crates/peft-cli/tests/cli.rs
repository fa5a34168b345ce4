//! The `peft` binary end to end: the train -> generate -> logits -> merge -> inspect path on
//! SmolLM2, exact resume after SIGKILL, Ctrl-C, and `peft compare` (bad input: bad_input.rs).

use peft_models::testing::max_abs_diff;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn peft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Runs `peft` and asserts that it succeeded, showing its stderr where it did not.
fn succeeds(args: &[&str]) -> Output {
    let out = peft(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    out
}

/// Asserts a clean failure: exit code 1, a single `error:` line naming `needle`, no panic.
fn fails_with(args: &[&str], needle: &str) {
    let out = peft(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1 for {args:?}, stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected for {args:?}: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr:?} lacks {needle:?}"
    );
}

/// Runs the binary with `input` on stdin.
fn peft_with_input(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One short `peft train` step of `model` on `data` into `out` (a batch of two rows of up to
/// 64 tokens, quiet) with the `extra` flags; asserts that it succeeded.
fn train_one_step(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--model",
        s(model),
        "--data",
        s(data),
        "--output",
        s(out),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    succeeds(&args)
}

/// The JSON objects `--json` printed, one a line.
fn json_lines(run: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&run.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("stdout is JSON lines"))
        .collect()
}

#[test]
fn unknown_device_and_shape() {
    fails_with(
        &["bench", "--shape", "smollm2-135m", "--device", "tpu"],
        "unknown device \"tpu\"",
    );
    fails_with(
        &["bench", "--shape", "gpt-5"],
        "unknown model shape \"gpt-5\"",
    );
    if !cfg!(feature = "cuda") {
        fails_with(
            &["bench", "--shape", "smollm2-135m", "--device", "cuda"],
            "built without CUDA support",
        );
    }
}

/// `peft bench --mode attention` times one layer's attention of a shape alone (no model
/// built): the record names the shape's heads and head size and holds finite times and rates;
/// a mode without a shape is refused.
#[test]
fn bench_times_attention_alone() {
    let args = [
        "bench",
        "--mode",
        "attention",
        "--shape",
        "llama-3.2-1b",
        "--batch-size",
        "1",
        "--seq-len",
        "64",
        "--warmup",
        "0",
        "--steps",
        "2",
        "--threads",
        "2",
    ];
    let out = peft(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(
        (r["heads"].as_u64(), r["kv_heads"].as_u64()),
        (Some(32), Some(8))
    );
    assert_eq!(r["head_dim"], 64);
    for key in ["fwd_ms", "fwd_bwd_ms", "fwd_tflops"] {
        let x = r[key].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "{key}: {x}");
    }
    let out = peft(&["bench", "--mode", "attention", "--model", "nowhere"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--shape"));
}

/// `peft bench --method prompt|prefix` trains HF's 20 virtual tokens on a random SmolLM2
/// shape: the trainable counts are PEFT's (prompt: 20 × hidden; prefix: 20 × a key and a
/// value per layer), and the loss falls on the fixed batch.
#[test]
fn bench_trains_prompt_and_prefix_tuning() {
    // SmolLM2-135M: hidden 576, 30 layers, 3 kv heads of 64.
    for (method, trainable) in [("prompt", 20 * 576), ("prefix", 20 * 2 * 30 * 3 * 64)] {
        let out = peft(&[
            "bench",
            "--shape",
            "smollm2-135m",
            "--method",
            method,
            "--batch-size",
            "1",
            "--seq-len",
            "16",
            "--warmup",
            "0",
            "--steps",
            "3",
            "--lr",
            "0.1",
            "--threads",
            "2",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{method}: {stderr}");
        let line = String::from_utf8_lossy(&out.stdout);
        let r: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(r["trainable_params"], trainable, "{method}");
        assert_eq!(r["num_virtual_tokens"], 20, "{method}");
        // The settings that change how a step runs are part of the record.
        assert_eq!(r["layer_tape"], true, "{method}");
        assert_eq!(r["lora_shared"], true, "{method}");
        assert_eq!(r["lora_cublas"], false, "{method}");
        assert_eq!(r["flash_wide"], false, "{method}");
        assert_eq!(r["flash_wide_backward"], false, "{method}");
        let losses: Vec<f64> = serde_json::from_value(r["losses"].clone()).unwrap();
        assert!(
            losses[2] < losses[0],
            "{method}: the loss must fall: {losses:?}"
        );
    }
    fails_with(
        &[
            "bench",
            "--shape",
            "smollm2-135m",
            "--method",
            "prefix",
            "--mode",
            "forward",
        ],
        "measures training only",
    );
    fails_with(
        &["bench", "--shape", "smollm2-135m", "--method", "ia4"],
        "unknown method \"ia4\"",
    );
}

#[test]
fn train_generate_logits_merge_inspect() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    let recipe = write(
        dir.path(),
        "recipe.toml",
        b"r = 8\nlora_alpha = 16\nbatch_size = 2\nmax_steps = 2\nlr = 1e-3\nquiet = true\n",
    );
    let data = peft_models::testing::shipped_data();
    let out = succeeds(&[
        "train",
        "--config",
        s(&recipe),
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--output",
        s(&adapter),
        "--target-modules",
        "q_proj,v_proj",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("trainable params: 460,800 || all params: 134,975,808 || trainable%: 0.3414"),
        "{stderr}"
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_u64()),
        (Some(8), Some(16))
    );
    assert_eq!(
        std::fs::read_to_string(adapter.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );

    let question = "What is the capital of France?";
    let generate = |adapter: Option<&Path>| {
        let mut args = vec![
            "generate",
            "--model",
            s(&model),
            "--prompt",
            question,
            "--chat",
            "--max-new-tokens",
            "8",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        let out = peft(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (tuned, plain) = (generate(Some(&adapter)), generate(None));
    assert!(!tuned.trim().is_empty());
    // The adapter changes the answer, so the chat check below tells the two apart.
    assert_ne!(tuned, plain);

    // `peft chat` loads the base once and switches: each reply is what `generate` gives with
    // the same adapter (or none), until a bad adapter name stops the script.
    let script = format!(
        "{question}\n/base\n/reset\n{question}\n/adapter tuned\n/reset\n\n{question}\n/adapter other\n{question}\n"
    );
    let out = peft_with_input(
        &[
            "chat",
            "--model",
            s(&model),
            "--adapter",
            &format!("tuned={}", s(&adapter)),
            "--max-new-tokens",
            "8",
        ],
        &script,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{tuned}{plain}{tuned}")
    );
    assert_eq!(
        stderr.lines().last(),
        Some("error: input line 9: no adapter named \"other\" is loaded (loaded: tuned)")
    );

    let ids = "504,3575,282,4649,314,7042,30,378";
    let unmerged = dir.path().join("unmerged.safetensors");
    let merged = dir.path().join("merged.safetensors");
    for (path, extra) in [(&unmerged, None), (&merged, Some("--merged"))] {
        let mut args = vec![
            "logits",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--input-ids",
            ids,
            "--out",
            s(path),
        ];
        args.extend(extra);
        assert!(peft(&args).status.success());
    }
    let load = |p: &Path| {
        peft_models::io::load_safetensors(p, &candle_core::Device::Cpu).unwrap()["logits"].clone()
    };
    let (a, b) = (load(&unmerged), load(&merged));
    assert_eq!(a.dims(), &[1, 8, 49152]);
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-3, "merged vs unmerged {diff}");

    // `peft merge` of the adapter into `output` (a folder, or a .gguf file).
    let merge = |output: &Path, extra: &[&str]| {
        let mut args = vec![
            "merge",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--output",
            s(output),
        ];
        args.extend(extra);
        succeeds(&args);
    };
    let merged_dir = dir.path().join("merged");
    merge(&merged_dir, &[]);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(merged_dir.join(f).exists(), "{f} missing");
    }
    // The merged HF folder loads back and gives the merged logits.
    let logits_of = |model: &Path, name: &str| {
        let out = dir.path().join(name);
        succeeds(&[
            "logits",
            "--model",
            s(model),
            "--input-ids",
            ids,
            "--out",
            s(&out),
        ]);
        load(&out)
    };
    let diff = max_abs_diff(
        &logits_of(&merged_dir, "reloaded.safetensors"),
        &load(&merged),
    );
    assert!(diff < 1e-4, "HF folder vs in-memory merge {diff}");

    // The same merge as a GGUF file for llama.cpp, in f32: the same logits again.
    let gguf = dir.path().join("out/merged.gguf");
    merge(&gguf, &["--dtype", "f32"]);
    let diff = max_abs_diff(&logits_of(&gguf, "from_gguf.safetensors"), &load(&merged));
    assert!(diff < 1e-4, "GGUF file vs in-memory merge {diff}");
    // The adapter alone as a GGUF LoRA for llama.cpp.
    let lora = dir.path().join("lora.gguf");
    succeeds(&[
        "export-lora",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--output",
        s(&lora),
    ]);
    let mut file = std::fs::File::open(&lora).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    assert_eq!(
        content.metadata["adapter.type"].to_string().unwrap(),
        "lora"
    );
    assert_eq!(
        content.tensor_infos.len(),
        2 * 30 * 2,
        "q_proj and v_proj pairs of 30 layers"
    );
    fails_with(
        &["merge", "--model", s(&model), "--output", s(&merged_dir), "--dtype", "q8_0"],
        "--dtype \"q8_0\" is not a dtype for a model folder (f32, bf16, f16; quantized types need a .gguf output)",
    );

    let out = peft(&["inspect", "--model", s(&model), "--adapter", s(&adapter)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("trainable params: 460,800"));
}

fn losses(dir: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].to_string())
        })
        .collect()
}

fn wait_for(what: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !what() {
        assert!(start.elapsed().as_secs() < 300, "timed out");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// SIGKILL mid-run, resume from the last checkpoint: every logged loss equals the
/// uninterrupted run's, bit for bit. SIGINT stops with a checkpoint and exit code 130.
#[test]
fn killed_run_resumes_exactly_and_ctrl_c_saves() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let data = peft_models::testing::shipped_data();
    let root = tempfile::tempdir().unwrap();
    let args = |out: &Path, steps: &str| -> Vec<String> {
        [
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--output",
            s(out),
            "--batch-size",
            "1",
            "--max-seq-length",
            "48",
            "--max-steps",
            steps,
            "--save-steps",
            "2",
            "--lr",
            "1e-3",
            "--seed",
            "7",
            "--quiet",
            "true",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let bin = env!("CARGO_BIN_EXE_peft");
    let full = root.path().join("full");
    assert!(Command::new(bin)
        .args(args(&full, "6"))
        .output()
        .unwrap()
        .status
        .success());
    let expected = losses(&full);
    assert_eq!(expected.len(), 6);

    let killed = root.path().join("killed");
    let mut child = Command::new(bin)
        .args(args(&killed, "6"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(|| {
        killed
            .join("checkpoint-2")
            .join("trainer_state.json")
            .exists()
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut resume = args(&killed, "6");
    resume.extend(["--resume".to_string(), "latest".to_string()]);
    let out = Command::new(bin).args(&resume).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(losses(&killed), expected);

    let stopped = root.path().join("stopped");
    let child = Command::new(bin)
        .args(args(&stopped, "1000"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(|| !losses(&stopped).is_empty());
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted after step"), "{stderr}");
    let (step, dir) = peft_train::checkpoint::list(&stopped)
        .pop()
        .expect("a checkpoint");
    assert!(step >= 1 && dir.join("adapter_model.safetensors").exists());
}

/// `peft compare` trains each method in its own process and writes the table, JSON and plot.
#[test]
fn compare_writes_table_json_and_plot() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = peft_models::testing::shipped_data();
    succeeds(&[
        "compare",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--output",
        s(dir.path()),
        "--methods",
        "ia3,prompt",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("compare.json")).unwrap())
            .unwrap();
    let methods = json["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 2);
    assert_eq!(methods[0]["trainable_params"], 57_600);
    for m in methods {
        assert!(m["eval_loss"].as_f64().unwrap().is_finite());
        assert!(m["peak_rss_mib"].as_f64().unwrap() > 0.0);
    }
    assert!(std::fs::read_to_string(dir.path().join("compare.md"))
        .unwrap()
        .contains("| ia3 |"));
    assert!(std::fs::read_to_string(dir.path().join("compare.svg"))
        .unwrap()
        .contains("<svg"));
    assert!(dir.path().join("prompt/adapter_model.safetensors").exists());
}

/// Parquet data, a held-out split evaluated every 2 steps, packing, length grouping and
/// `--json`: stdout holds one JSON object per step (eval loss where evaluated) and a summary;
/// the loss plot is written as SVG and PNG.
#[test]
fn train_with_eval_packing_and_json() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let data = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../peft-train/tests/fixtures/pirate_messages.parquet");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let run = peft(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--output",
        s(&out),
        "--batch-size",
        "2",
        "--max-seq-length",
        "96",
        "--packing",
        "--group-by-length",
        "--eval-split",
        "0.25",
        "--eval-steps",
        "2",
        "--max-steps",
        "3",
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let lines = json_lines(&run);
    assert_eq!(lines.len(), 4, "{lines:?}");
    let evaluated: Vec<u64> = lines[..3]
        .iter()
        .filter(|l| l["eval_loss"].is_f64())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evaluated, [2, 3]);
    let done = &lines[3];
    assert_eq!(done["event"], "done");
    assert_eq!(done["steps"], 3);
    assert_eq!(done["eval_loss"], lines[2]["eval_loss"]);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.contains("eval loss") && svg.contains("train loss"));
}

/// `peft chat` feeds each turn after the conversation already in its cache: the replies are
/// those of recomputing the whole conversation (which a command between turns forces).
#[test]
fn chat_turns_continue_from_the_cached_conversation() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let args = ["chat", "--model", s(&model), "--max-new-tokens", "12"];
    let cached = peft_with_input(
        &args,
        "What is the capital of France?\nAnd of Spain?\nWhich did I ask first?\n",
    );
    let fresh = peft_with_input(
        &args,
        "What is the capital of France?\n/adapters\nAnd of Spain?\n/adapters\nWhich did I ask first?\n",
    );
    assert!(cached.status.success() && fresh.status.success());
    let replies = String::from_utf8(cached.stdout).unwrap();
    assert_eq!(replies.lines().count(), 3, "{replies}");
    assert_eq!(replies, String::from_utf8(fresh.stdout).unwrap());
}

/// A TOML recipe in TRL's names (`learning_rate`, `lr_scheduler_type`, `warmup_steps`,
/// `lr_scheduler_kwargs` as a table, ...) with NEFTune and a separate eval file: the learning
/// rates are transformers' `cosine_with_min_lr` ones, the eval file is evaluated, and the
/// noise changes the first loss (the same data and weights without it give another).
#[test]
fn trl_recipe_with_scheduler_options_neftune_and_eval_data() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let data = peft_models::testing::shipped_data();
    let dir = tempfile::tempdir().unwrap();
    let eval = write(
        dir.path(),
        "eval.jsonl",
        br#"{"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Arr, a pirate!"}]}
{"prompt": "Where is the treasure?", "completion": "Buried on the isle, matey."}
"#,
    );
    let recipe = write(
        dir.path(),
        "sft.toml",
        br#"learning_rate = 1e-3
lr_scheduler_type = "cosine_with_min_lr"
warmup_steps = 1
max_steps = 4
per_device_train_batch_size = 2
max_length = 64
neftune_noise_alpha = 5.0

[lr_scheduler_kwargs]
min_lr_rate = 0.1
"#,
    );
    let out = dir.path().join("run");
    let run = succeeds(&[
        "train",
        "--config",
        s(&recipe),
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--eval-data",
        s(&eval),
        "--output",
        s(&out),
        "--json",
    ]);
    let lines = json_lines(&run);
    assert_eq!(lines.len(), 5, "{lines:?}");
    // Warmup to 1e-3 over one step, then a cosine from 1e-3 down toward 1e-4 over 3 steps.
    for (line, want) in lines.iter().zip([0.0, 1e-3, 0.775e-3, 0.325e-3]) {
        let lr = line["lr"].as_f64().unwrap();
        assert!(
            (lr - want).abs() < 1e-12,
            "{line}: lr {lr}, expected {want}"
        );
    }
    assert!(lines[3]["eval_loss"].as_f64().unwrap().is_finite());
    assert_eq!(lines[4]["eval_loss"], lines[3]["eval_loss"]);
    let plain = succeeds(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--output",
        s(&dir.path().join("plain")),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
        "--json",
    ]);
    let plain: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&plain.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let (noisy, clean) = (
        lines[0]["loss"].as_f64().unwrap(),
        plain["loss"].as_f64().unwrap(),
    );
    assert!(
        (noisy - clean).abs() > 1e-4 && (noisy - clean).abs() < 0.5,
        "first loss {noisy} with NEFTune, {clean} without"
    );
}

/// More of TRL's names in a recipe: `output_dir`, a fractional `num_train_epochs` (the steps
/// rounded up, as transformers does), `dataset_text_field`, `bf16 = false` and
/// `eval_strategy = "steps"` (every logging step when no `eval_steps` is set).
#[test]
fn trl_recipe_names_epochs_fraction_text_field_and_eval_strategy() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (0..10)
        .map(|i| format!("{{\"content\": \"Arr, matey number {i} sails the seven seas.\"}}\n"))
        .collect();
    let data = write(dir.path(), "text.jsonl", lines.as_bytes());
    let out = dir.path().join("from-recipe");
    let recipe = format!(
        "output_dir = {:?}\nnum_train_epochs = 0.5\nper_device_train_batch_size = 2\n\
         dataset_text_field = \"content\"\nbf16 = false\neval_strategy = \"steps\"\n\
         eval_split = 0.2\nlogging_steps = 1\n",
        s(&out)
    );
    let recipe = write(dir.path(), "sft.toml", recipe.as_bytes());
    let run = succeeds(&[
        "train",
        "--config",
        s(&recipe),
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--json",
    ]);
    let lines = json_lines(&run);
    // 8 training records in batches of 2: 4 steps an epoch, half of them.
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[..2].iter().all(|l| l["eval_loss"].is_f64()),
        "{lines:?}"
    );
    assert_eq!(lines[2]["steps"], 2);
    assert!(out.join("adapter_model.safetensors").exists());
}

/// `--init-lora-weights loftq` quantizes the base to NF4 and starts the adapter from its
/// quantization error: on the 4-bit base (`peft logits --quantize nf4`) the untrained adapter
/// brings the logits closer to the unquantized model's; `generate --quantize` runs there.
#[test]
fn loftq_adapter_corrects_the_4bit_base() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("loftq");
    let data = peft_models::testing::shipped_data();
    let out = succeeds(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--output",
        s(&adapter),
        "--init-lora-weights",
        "loftq",
        "--target-modules",
        "all-linear",
        "--r",
        "16",
        "--lora-alpha",
        "16",
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--lr",
        "1e-12",
        "--dtype",
        "f32",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("note: --init-lora-weights loftq quantizes the base: --quantize nf4"),
        "{stderr}"
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["init_lora_weights"], serde_json::json!(true));

    let logits = |extra: &[&str]| {
        let path = dir.path().join("logits.safetensors");
        let mut args = vec![
            "logits",
            "--model",
            s(&model),
            "--input-ids",
            "504,3575,282,4649,314,7042,30,378",
            "--out",
            s(&path),
        ];
        args.extend(extra);
        succeeds(&args);
        peft_models::io::load_safetensors(&path, &candle_core::Device::Cpu).unwrap()["logits"]
            .clone()
    };
    let dense = logits(&[]);
    let quantized = logits(&["--quantize", "nf4"]);
    let corrected = logits(&["--quantize", "nf4", "--adapter", s(&adapter)]);
    let distance = |t: &candle_core::Tensor| {
        let d = (t - &dense).unwrap().sqr().unwrap().sum_all().unwrap();
        d.to_scalar::<f32>().unwrap().sqrt()
    };
    let (before, after) = (distance(&quantized), distance(&corrected));
    assert!(after < 0.95 * before, "{after} vs {before}");

    let out = succeeds(&[
        "generate",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--quantize",
        "nf4",
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--max-new-tokens",
        "4",
    ]);
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

/// `--adapter` continues an adapter: its config sets the method (DoRA here), its weights are
/// the start, and its base is the one its config names. With a learning rate of 0 the adapter
/// is written back as it was, and its first loss is the trained adapter's, below the base's.
#[test]
fn train_continues_an_adapter() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let data = peft_models::testing::shipped_data();
    let dir = tempfile::tempdir().unwrap();
    let (first, continued, fresh) = (
        dir.path().join("first"),
        dir.path().join("continued"),
        dir.path().join("fresh"),
    );
    let common = [
        "--data",
        s(&data),
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
        "--warmup-steps",
        "0",
        "--json",
    ];
    let run = |extra: &[&str]| -> serde_json::Value {
        let args: Vec<&str> = ["train"]
            .iter()
            .chain(&common)
            .chain(extra)
            .copied()
            .collect();
        let out = succeeds(&args);
        json_lines(&out).pop().expect("a summary line")
    };
    run(&[
        "--model",
        s(&model),
        "--output",
        s(&first),
        "--method",
        "dora",
        "--r",
        "4",
        "--target-modules",
        "q_proj,v_proj",
        "--max-steps",
        "4",
        "--lr",
        "5e-3",
    ]);
    let resumed = run(&[
        "--adapter",
        s(&first),
        "--output",
        s(&continued),
        "--max-steps",
        "1",
        "--lr",
        "0",
    ]);
    let base = run(&[
        "--model",
        s(&model),
        "--output",
        s(&fresh),
        "--max-steps",
        "1",
        "--lr",
        "0",
    ]);
    let (resumed, base) = (
        resumed["loss_first"].as_f64().unwrap(),
        base["loss_first"].as_f64().unwrap(),
    );
    assert!(
        resumed < base - 0.1,
        "continued at {resumed}, the base at {base}"
    );
    let read = |d: &Path| {
        let config = std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
        let tensors = peft_models::io::load_safetensors(
            &d.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        (
            serde_json::from_str::<serde_json::Value>(&config).unwrap(),
            tensors,
        )
    };
    let ((c1, t1), (c2, t2)) = (read(&first), read(&continued));
    assert_eq!(c1, c2);
    assert_eq!(c2["use_dora"], true);
    assert_eq!(t1.len(), t2.len());
    for (key, t) in &t1 {
        assert_eq!(max_abs_diff(t, &t2[key]), 0.0, "{key}");
    }
    // The config decides the method and its options.
    let again = dir.path().join("again");
    let adapter = [
        "train",
        "--adapter",
        s(&first),
        "--data",
        s(&data),
        "--output",
        s(&again),
    ];
    fails_with(
        &[&adapter[..], &["--r", "8"]].concat(),
        "--r set what the adapter's config",
    );
    fails_with(
        &[&adapter[..], &["--method", "ia3"]].concat(),
        "--method ia3 does not match",
    );
}

/// `--add-special-tokens` adds tokens the base lacks, grows the embedding to a multiple of 64
/// rows and trains their rows: the adapter names them as trainable tokens, OUTPUT holds the
/// tokenizer with them, and the adapter runs them (at the grown size) in `peft logits`.
#[test]
fn train_adds_special_tokens() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let data = peft_models::testing::shipped_data();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("added");
    train_one_step(
        &model,
        &data,
        &out,
        &["--add-special-tokens", "<tool>,</tool>,<|im_end|>"],
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    // <|im_end|> is SmolLM2's already: only the two new tokens are added.
    assert_eq!(
        config["trainable_token_indices"],
        serde_json::json!([49152, 49153])
    );
    let tok = peft_models::tokenizer::Tokenizer::from_hf_dir(&out).unwrap();
    assert_eq!(tok.token_to_id("</tool>"), Some(49153));
    let logits = dir.path().join("logits.safetensors");
    succeeds(&[
        "logits",
        "--model",
        s(&model),
        "--adapter",
        s(&out),
        "--input-ids",
        "1,49152,49153",
        "--out",
        s(&logits),
    ]);
    let t = peft_models::io::load_safetensors(&logits, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["logits"].dims(), [1, 3, 49216]);
    // The adapter trains on with its tokenizer, and chats with it.
    let continued = dir.path().join("continued");
    train_one_step(&model, &data, &continued, &["--adapter", s(&out)]);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(continued.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["trainable_token_indices"],
        serde_json::json!([49152, 49153])
    );
    let tok = peft_models::tokenizer::Tokenizer::from_hf_dir(&continued).unwrap();
    assert_eq!(tok.token_to_id("<tool>"), Some(49152));
    let chat = peft_with_input(
        &[
            "chat",
            "--model",
            s(&model),
            "--adapter",
            s(&continued),
            "--max-new-tokens",
            "3",
        ],
        "Hi\n",
    );
    assert!(
        chat.status.success(),
        "{}",
        String::from_utf8_lossy(&chat.stderr)
    );
    fails_with(
        &[
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--output",
            s(&dir.path().join("ia3")),
            "--method",
            "ia3",
            "--add-special-tokens",
            "<tool>",
        ],
        "--add-special-tokens works with LoRA",
    );
}

/// A run with a chat template of its own saves its tokenizer beside the adapter (and in its
/// checkpoints), as TRL does, and whatever runs the adapter (generate, chat, a continued run) renders with it.
#[test]
fn an_adapter_keeps_its_chat_template() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let data = peft_models::testing::shipped_data();
    let dir = tempfile::tempdir().unwrap();
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>\n\
                    {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}";
    let template_file = write(dir.path(), "chat.jinja", template.as_bytes());
    let out = dir.path().join("templated");
    train_one_step(
        &model,
        &data,
        &out,
        &["--chat-template", s(&template_file), "--save-steps", "1"],
    );
    for folder in [out.clone(), out.join("checkpoint-1")] {
        assert_eq!(
            std::fs::read_to_string(folder.join("chat_template.jinja")).unwrap(),
            template
        );
    }
    // A template that refuses to render shows which tokenizer each command took.
    write(
        &out,
        "chat_template.jinja",
        b"{{ raise_exception('the adapter template') }}",
    );
    fails_with(
        &[
            "generate",
            "--model",
            s(&model),
            "--adapter",
            s(&out),
            "--chat",
            "--prompt",
            "Hi",
        ],
        "the adapter template",
    );
    let chat = peft_with_input(
        &["chat", "--model", s(&model), "--adapter", s(&out)],
        "Hi\n",
    );
    let stderr = String::from_utf8_lossy(&chat.stderr);
    assert!(
        !chat.status.success() && stderr.contains("the adapter template"),
        "{stderr}"
    );
    let continued = peft(&[
        "train",
        "--adapter",
        s(&out),
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--output",
        s(&dir.path().join("continued")),
        "--max-steps",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&continued.stderr);
    assert!(
        !continued.status.success() && stderr.contains("the adapter template"),
        "{stderr}"
    );
    // Without a template of its own, the adapter folder holds no tokenizer.
    let plain = dir.path().join("plain");
    train_one_step(&model, &data, &plain, &[]);
    assert!(!plain.join("tokenizer.json").exists());
}

/// `--chat-template` naming a tokenizer (TRL's `chat_template_path`, clone_chat_template):
/// its template and EOS token are taken, the tokens it added that the base lacks are added
/// in its order, the embedding grows to a multiple of 64 filled by TRL's placeholder tokens,
/// and all of them train as trainable_token_indices.
#[test]
fn train_clones_a_tokenizers_chat_template() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let data = peft_models::testing::shipped_data();
    let dir = tempfile::tempdir().unwrap();
    let gguf =
        candle_core::quantized::gguf_file::Content::read(&mut std::fs::File::open(&model).unwrap())
            .unwrap();
    let mut source = peft_models::tokenizer::Tokenizer::from_gguf_metadata(&gguf.metadata).unwrap();
    let extra = ["<think>", "</think>", "<|eot|>", "<|im_start|>"].map(String::from);
    // <|im_start|> is SmolLM2's already.
    assert_eq!(source.add_special_tokens(&extra).unwrap().len(), 3);
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|eot|>\n\
                    {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    source.set_chat_template(template.into());
    let source_dir = dir.path().join("source");
    source.save_hf(&source_dir).unwrap();
    let config_path = source_dir.join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["eos_token"] = "<|eot|>".into();
    std::fs::write(&config_path, config.to_string()).unwrap();

    let out = dir.path().join("cloned");
    train_one_step(&model, &data, &out, &["--chat-template", s(&source_dir)]);
    let tok = peft_models::tokenizer::Tokenizer::from_hf_dir(&out).unwrap();
    assert_eq!(tok.token_to_id("<think>"), Some(49152));
    assert_eq!(tok.token_to_id("<|eot|>"), Some(49154));
    assert_eq!(tok.token_to_id("<extra_id_0>"), Some(49155));
    assert_eq!(tok.vocab_size(), 49216);
    assert_eq!(tok.eos_token_id(), Some(49154));
    assert_eq!(
        std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(),
        template
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["trainable_token_indices"],
        serde_json::json!((49152..49216).collect::<Vec<u32>>())
    );
    // A merged model stops at the template's EOS as well as the base's.
    let merged = dir.path().join("merged");
    succeeds(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&out),
        "--output",
        s(&merged),
    ]);
    let generation: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(merged.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(generation["eos_token_id"], serde_json::json!([49154, 2]));
    fails_with(
        &[
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--output",
            s(&dir.path().join("missing")),
            "--chat-template",
            s(&dir.path().join("no-such-tokenizer")),
        ],
        "neither a template file nor a tokenizer folder or Hub id",
    );
}

/// A random model of `config` (its vocabulary SmolLM2's, whose tokenizer it takes from the
/// default model `gguf`) saved as an HF folder at `dir`.
fn save_small_model(gguf: &Path, mut config: serde_json::Value, seed: u64, dir: &Path) {
    let loaded =
        peft_models::load_model(gguf, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    config["vocab_size"] = serde_json::json!(loaded.config.vocab_size);
    let config = peft_models::LlamaConfig::from_json(config).unwrap();
    let device = candle_core::Device::Cpu;
    let mut m =
        peft_models::shapes::random_llama(config, &device, candle_core::DType::F32, seed).unwrap();
    let tokenizer = loaded.tokenizer.as_ref();
    peft_models::save::save_hf_model(&mut m, tokenizer, dir, candle_core::DType::F32).unwrap();
}

/// A small random Qwen3-MoE with SmolLM2's tokenizer, saved as an HF folder, through the
/// binary: all-linear LoRA reaches the experts and router as parameters (HF PEFT's
/// conversion), where dropout is an error naming the flag; `--target-parameters` names them
/// alone; the adapter merges into a GGUF file; `inspect` describes the experts.
#[test]
fn mixture_of_experts_models_train_merge_and_inspect() {
    let Some(gguf) = peft_models::testing::default_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("qwen3-moe");
    let config = serde_json::json!({
        "model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "norm_topk_prob": true, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2,
    });
    save_small_model(&gguf, config, 3, &model);
    let data = peft_models::testing::shipped_data();
    let adapter = dir.path().join("all-linear");
    let flags = ["--target-modules", "all-linear", "--lora-dropout", "0"];
    train_one_step(&model, &data, &adapter, &flags);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let mut params: Vec<&str> = cfg["target_parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    params.sort();
    assert_eq!(params, ["down_proj", "gate.weight", "gate_up_proj"]);
    assert_eq!(cfg["rank_pattern"][r".*\.gate_up_proj"], 32);
    let saved = peft_models::io::load_safetensors(
        &adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let a = &saved["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"];
    assert_eq!(a.dims(), [32 * 4, 64]);
    // The routers' load-balancing loss, on by default as in TRL, logged beside the loss.
    let logged = |dir: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    let aux = logged(&adapter)["aux_loss"].as_f64();
    assert!(aux.is_some_and(|a| a > 1.0), "{:?}", logged(&adapter));

    fails_with(
        &[
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--output",
            s(&dir.path().join("dropout")),
            "--target-modules",
            "all-linear",
            "--max-steps",
            "1",
        ],
        "lora_dropout",
    );

    let only = dir.path().join("parameters");
    let flags = [
        "--target-parameters",
        "mlp.experts.down_proj",
        "--lora-dropout",
        "0",
        "--router-aux-loss-coef",
        "0",
    ];
    train_one_step(&model, &data, &only, &flags);
    assert!(logged(&only).get("aux_loss").is_none(), "{}", logged(&only));
    let only_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(only.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(only_cfg["target_modules"], serde_json::json!([]));

    let merged = dir.path().join("merged.gguf");
    succeeds(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--output",
        s(&merged),
    ]);
    let back = peft_models::load_model(&merged, &candle_core::Device::Cpu, candle_core::DType::F32)
        .unwrap();
    assert_eq!(back.config.model_type, "qwen3_moe");
    // llama.cpp's LoRA files hold linear layers' pairs: the merged model is the way there.
    let lora_gguf = dir.path().join("lora.gguf");
    let args = [
        "export-lora",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
    ];
    fails_with(
        &[&args[..], &["--output", s(&lora_gguf)]].concat(),
        "merged model",
    );
    let out = succeeds(&["inspect", "--model", s(&model)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("mixture of experts on 2 of 2 layers: 4 experts of 32, 2 per token"),
        "{stdout}"
    );
}

/// gpt-oss (a small random one with SmolLM2's tokenizer): QLoRA with LoRA on its attention and,
/// by `--target-parameters`, on its router and 4-bit experts, in bf16 with gradient
/// checkpointing; generation with the adapter; the merged HF folder keeps gpt-oss's layout,
/// the merged GGUF reads back as gpt-oss.
#[test]
fn gpt_oss_trains_quantized_generates_and_merges() {
    let Some(gguf) = peft_models::testing::default_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("gpt-oss");
    let config = serde_json::json!({
        "model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
        "bos_token_id": 1, "eos_token_id": 2,
    });
    save_small_model(&gguf, config, 5, &model);
    let data = peft_models::testing::shipped_data();
    let adapter = dir.path().join("qlora");
    let flags = [
        "--target-modules",
        "all-linear",
        "--target-parameters",
        "mlp.router.weight,mlp.experts.gate_up_proj,mlp.experts.down_proj",
        "--lora-dropout",
        "0",
        "--quantize",
        "nf4",
        "--dtype",
        "bf16",
        "--gradient-checkpointing",
        "true",
    ];
    train_one_step(&model, &data, &adapter, &flags);
    let saved = peft_models::io::load_safetensors(
        &adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let key = |k: &str| format!("base_model.model.model.layers.1.{k}.weight");
    // r = 16, stacked over 4 experts.
    assert_eq!(saved[&key("mlp.router.lora_A")].dims(), [16, 64]);
    assert_eq!(
        saved[&key("mlp.experts.base_layer.lora_B")].dims(),
        [128, 16 * 4]
    );
    assert_eq!(saved[&key("mlp.experts.lora_A")].dims(), [16 * 4, 64]);
    assert!(saved.contains_key(&key("self_attn.o_proj.lora_B")));

    let out = succeeds(&[
        "generate",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "4",
    ]);
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());

    let merged = dir.path().join("merged");
    let args = ["merge", "--model", s(&model), "--adapter", s(&adapter)];
    succeeds(&[&args[..], &["--output", s(&merged)]].concat());
    let written = peft_models::io::load_safetensors(
        &merged.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        written["model.layers.0.mlp.experts.gate_up_proj"].dims(),
        [4, 64, 128]
    );
    assert_eq!(written["model.layers.0.self_attn.sinks"].dims(), [4]);
    let gguf_out = dir.path().join("merged.gguf");
    succeeds(&[&args[..], &["--output", s(&gguf_out)]].concat());
    let back = peft_models::load_model(
        &gguf_out,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    assert_eq!(back.config.model_type, "gpt_oss");
    assert!(back.config.attention_sinks);
    let out = succeeds(&["inspect", "--model", s(&model)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("attention sinks"), "{stdout}");
    assert!(
        stdout.contains("target_parameters: router.weight"),
        "{stdout}"
    );
}
