use crate::files::AdapterConfig;
use crate::targets::TargetModules;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// PEFT's `IA3Config`, as written to and read from `adapter_config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ia3Config {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default = "default_task_type")]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    /// Layers that get a vector (PEFT's Llama default: k_proj, v_proj, down_proj).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Targets whose *input* is scaled (PEFT's Llama default: down_proj); the others scale
    /// their output.
    #[serde(default)]
    pub feedforward_modules: Option<TargetModules>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "yes")]
    pub init_ia3_weights: bool,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_peft_type() -> String {
    "IA3".into()
}
fn default_task_type() -> Option<String> {
    Some("CAUSAL_LM".into())
}
fn yes() -> bool {
    true
}

/// PEFT's defaults for Llama-family models (Phi-3, which PEFT's table lacks: its fused
/// `qkv_proj` in place of k and v).
pub const DEFAULT_TARGETS: &[&str] = &["k_proj", "v_proj", "down_proj"];
pub const DEFAULT_TARGETS_FUSED: &[&str] = &["qkv_proj", "down_proj"];
pub const DEFAULT_FEEDFORWARD: &[&str] = &["down_proj"];

impl Default for Ia3Config {
    fn default() -> Self {
        Self {
            peft_type: default_peft_type(),
            task_type: default_task_type(),
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            target_modules: None,
            exclude_modules: None,
            feedforward_modules: None,
            fan_in_fan_out: false,
            modules_to_save: None,
            init_ia3_weights: true,
            other: Map::new(),
        }
    }
}

impl Ia3Config {}

impl AdapterConfig for Ia3Config {
    fn saved_fields(&mut self) -> (&mut bool, &mut Option<String>) {
        (&mut self.inference_mode, &mut self.base_model_name_or_path)
    }

    fn validate(&self) -> Result<()> {
        if self.peft_type != "IA3" {
            bail!("adapter peft_type is {:?}, expected IA3", self.peft_type);
        }
        if self.fan_in_fan_out {
            bail!("fan_in_fan_out=true (GPT-2 Conv1D layers) is not supported for Llama-family models");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            bail!("modules_to_save is not supported with IA3 yet");
        }
        Ok(())
    }
}
