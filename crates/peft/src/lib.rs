//! Parameter-efficient fine-tuning: tuners (one module per method), adapter files in
//! Hugging Face PEFT's format, merging.

pub mod adapters;
pub mod bottleneck;
pub mod files;
pub mod full;
pub mod ia3;
pub mod keys;
pub mod lora;
pub mod model;
pub mod prompt;
pub mod targets;
pub mod tokens;
pub mod tuned;

pub use adapters::{Adapter, Adapters};
pub use bottleneck::{BottleneckConfig, BottleneckModel};
pub use files::AdapterConfig;
pub use full::FullModel;
pub use ia3::{Ia3Config, Ia3Model};
pub use lora::config::LoraConfig;
pub use model::PeftModel;
pub use prompt::{PromptConfig, PromptInit, PromptModel};
pub use targets::TargetModules;
pub use tokens::{TokensConfig, TokensModel};
pub use tuned::Tuned;

/// The `peft_type` of the adapter folder at `dir` (`LORA` when its config names none).
pub fn adapter_type(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join(model::CONFIG_FILE);
    if !path.exists() {
        return Ok("LORA".into());
    }
    peft_type_of(&files::read_text(&path)?, &path)
}

/// The base model the adapter folder at `dir` names (`base_model_name_or_path`: a path, or a
/// Hub id), as `AutoPeftModelForCausalLM` finds it; `None` where it names none.
pub fn base_model_of(dir: &std::path::Path) -> anyhow::Result<Option<String>> {
    let path = dir.join(model::CONFIG_FILE);
    let value: serde_json::Value = files::parse_config(&files::read_text(&path)?, &path)?;
    Ok(value
        .get("base_model_name_or_path")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string))
}

/// The `peft_type` named by the adapter config JSON `text` read from `source` (`LORA` when it
/// names none).
pub fn peft_type_of(text: &str, source: &std::path::Path) -> anyhow::Result<String> {
    let value: serde_json::Value = files::parse_config(text, source)?;
    Ok(value
        .get("peft_type")
        .and_then(|v| v.as_str())
        .unwrap_or("LORA")
        .to_string())
}
