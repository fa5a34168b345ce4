//! `adapter_config.json` text through every method's config reader (parse + validate, as
//! `from_file` does), `adapter_type`'s peft_type lookup, and what loading then does with the
//! config before touching weights: resolving target modules (regexes included) against a small
//! Llama's linear layers and LoRA's rank/alpha patterns.

#![no_main]

use libfuzzer_sys::fuzz_target;
use peft::targets::{select, TargetModules};
use peft::{BottleneckConfig, Ia3Config, LoraConfig, PromptConfig};
use std::path::Path;
use std::sync::LazyLock;

/// `Llama::linears_mut` paths of a two-layer model with an output head.
static LINEARS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut paths = Vec::new();
    for l in 0..2 {
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            paths.push(format!("model.layers.{l}.{m}"));
        }
    }
    paths.push("lm_head".into());
    paths
});

fn list(names: &[&str]) -> TargetModules {
    TargetModules::List(names.iter().map(|s| s.to_string()).collect())
}

fuzz_target!(|data: &[u8]| {
    // `read_text` refuses non-UTF-8 files before any parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let source = Path::new("adapter_config.json");
    let _ = peft::peft_type_of(text, source);

    if let Ok(config) = LoraConfig::from_json(text, source) {
        // As PeftModel::build: PEFT's default targets when none are named.
        let targets = config
            .target_modules
            .clone()
            .unwrap_or_else(|| list(&["q_proj", "v_proj"]));
        if let Ok(selected) = select(
            &targets,
            config.exclude_modules.as_ref(),
            &LINEARS,
            "lm_head",
        ) {
            for path in &selected {
                let _ = config.rank_and_scaling(path);
            }
        }
        let _ = config.to_json_string();
    }

    if let Ok(config) = Ia3Config::from_json(text, source) {
        // As Ia3Model::build.
        let targets = config
            .target_modules
            .clone()
            .unwrap_or_else(|| list(peft::ia3::config::DEFAULT_TARGETS));
        let feedforward = config
            .feedforward_modules
            .clone()
            .unwrap_or_else(|| list(peft::ia3::config::DEFAULT_FEEDFORWARD));
        if let Ok(selected) = select(
            &targets,
            config.exclude_modules.as_ref(),
            &LINEARS,
            "lm_head",
        ) {
            let _ = select(&feedforward, None, &selected, "lm_head");
        }
        let _ = config.to_json_string();
    }

    if let Ok(config) = BottleneckConfig::from_json(text, source) {
        let _ = config.to_json_string();
    }

    if let Ok(config) = PromptConfig::from_json(text, source) {
        let _ = config.is_prefix();
        let _ = config.to_json_string();
    }
});
