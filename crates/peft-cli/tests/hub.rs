//! `peft` with Hub ids for the model, the adapter and the data, as TRL users name them,
//! against a stand-in Hub on a local port (the environment variables of Python's
//! `huggingface_hub` point the binary at it and at a fresh cache).

#[path = "../../peft-models/tests/support/mock_hub.rs"]
mod mock_hub;

use mock_hub::{Content, MockHub, MockRepo};
use std::path::Path;
use std::process::{Command, Output};

const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

fn repo(files: Vec<(&str, Content)>) -> MockRepo {
    MockRepo {
        files: files.into_iter().map(|(n, c)| (n.to_string(), c)).collect(),
        token: None,
        commit: COMMIT.into(),
    }
}

/// Runs `peft` against `hub` with the cache in `home` (online, or offline).
fn peft(hub: &MockHub, home: &Path, offline: bool, args: &[&str]) -> Output {
    command(hub, home, offline, args)
        .output()
        .expect("the binary runs")
}

fn command(hub: &MockHub, home: &Path, offline: bool, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peft"));
    cmd.args(args)
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    cmd
}

fn succeeds(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn hub_ids_name_the_model_adapter_and_data() {
    let Some(model) = peft_models::testing::default_model() else {
        return;
    };
    let golden = peft_models::testing::golden_dir().join("lora_qv_r8");
    let hub = MockHub::start();
    hub.add(
        "models",
        "org/SmolLM2-GGUF",
        repo(vec![
            ("README.md", Content::Bytes(b"# SmolLM2".to_vec())),
            (
                "SmolLM2-135M-Instruct.Q4_1.gguf",
                Content::File(model.clone()),
            ),
        ]),
    );
    hub.add(
        "models",
        "org/lora",
        repo(
            [
                "adapter_config.json",
                "adapter_model.safetensors",
                "expected.safetensors",
            ]
            .map(|f| (f, Content::File(golden.join(f))))
            .into(),
        ),
    );
    hub.add(
        "datasets",
        "org/pirate-qa",
        repo(vec![
            (
                "data/train-00000-of-00001.jsonl",
                Content::File(peft_models::testing::shipped_data()),
            ),
            (
                "data/test-00000-of-00001.jsonl",
                Content::Bytes(b"not read".to_vec()),
            ),
        ]),
    );
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let logits = |model: &str, adapter: &str, out: &Path, offline: bool| {
        let args = [
            "logits",
            "--model",
            model,
            "--adapter",
            adapter,
            "--input-ids",
            "1,2,3",
            "--out",
        ];
        let mut args: Vec<&str> = args.to_vec();
        let out = s(out);
        args.push(&out);
        succeeds(peft(&hub, &home, offline, &args));
    };

    // The same logits as from the local files.
    let (local, by_id) = (dir.path().join("local.st"), dir.path().join("hub.st"));
    logits(&s(&model), &s(&golden), &local, false);
    logits("org/SmolLM2-GGUF", "org/lora", &by_id, false);
    assert_eq!(
        std::fs::read(&local).unwrap(),
        std::fs::read(&by_id).unwrap()
    );
    let cached = home.join("hub/models--org--lora/snapshots").join(COMMIT);
    assert!(cached.join("adapter_model.safetensors").exists());
    assert!(!cached.join("expected.safetensors").exists());

    // Offline, from the cache: no request at all.
    hub.take_log();
    logits("org/SmolLM2-GGUF", "org/lora", &by_id, true);
    assert_eq!(hub.take_log(), Vec::<String>::new());
    assert_eq!(
        std::fs::read(&local).unwrap(),
        std::fs::read(&by_id).unwrap()
    );

    // Training from Hub ids records the model's id, as HF PEFT does, so that
    // `AutoPeftModelForCausalLM` finds the base from the adapter alone.
    let adapter = dir.path().join("adapter");
    let out = succeeds(peft(
        &hub,
        &home,
        false,
        &[
            "train",
            "--model",
            "org/SmolLM2-GGUF",
            "--data",
            "org/pirate-qa",
            "--output",
            &s(&adapter),
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--quiet",
            "true",
        ],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("downloading 1 file of org/pirate-qa"),
        "{stderr}"
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["base_model_name_or_path"], "org/SmolLM2-GGUF");
    // Without --model, the base the adapter's config names (here from the cache, offline).
    let out = succeeds(peft(
        &hub,
        &home,
        true,
        &[
            "generate",
            "--adapter",
            &s(&adapter),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
        ],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("note: the base model is org/SmolLM2-GGUF, as the adapter's config names it"),
        "{stderr}"
    );
    assert!(!out.stdout.is_empty());

    // HF_HUB_CACHE places the cache itself, over HF_HOME (Python's order).
    let elsewhere = dir.path().join("elsewhere");
    let out = command(
        &hub,
        &home,
        false,
        &["inspect", "--model", "org/SmolLM2-GGUF"],
    )
    .env("HF_HUB_CACHE", &elsewhere)
    .output()
    .unwrap();
    succeeds(out);
    assert!(elsewhere
        .join("models--org--SmolLM2-GGUF/snapshots")
        .join(COMMIT)
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        .exists());

    // A name that is neither a path nor a repository: one line that says so.
    let out = peft(&hub, &home, false, &["inspect", "--model", "org/missing"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: model not found: no local file or folder org/missing, and no repository org/missing on the Hub (a private one needs HF_TOKEN)"
    );
}
