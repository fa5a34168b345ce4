use crate::files::AdapterConfig;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// PEFT's `PromptTuningConfig` / `PrefixTuningConfig` (`peft_type` tells which), as written to
/// and read from `adapter_config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptConfig {
    /// `PROMPT_TUNING`, `PREFIX_TUNING` (P-tuning v2 is prefix tuning in PEFT) or, loaded
    /// only, `P_TUNING`.
    pub peft_type: String,
    #[serde(default = "default_task_type")]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    pub num_virtual_tokens: usize,
    /// Width of one virtual token: the hidden size for prompt tuning, `kv_heads × head_dim`
    /// for prefix tuning (PEFT sizes prefixes for grouped-query attention).
    #[serde(default)]
    pub token_dim: Option<usize>,
    #[serde(default)]
    pub num_layers: Option<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    #[serde(default = "one")]
    pub num_transformer_submodules: Option<usize>,
    /// Prompt tuning: `RANDOM`, `SAMPLE_VOCAB` or `TEXT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init_text: Option<String>,
    /// Where the init text's tokenizer is: HF PEFT refuses a `TEXT` config without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_name_or_path: Option<String>,
    /// Prefix tuning: train through an MLP (folded into plain embeddings on save).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_projection: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hidden_size: Option<usize>,
    /// Fields we do not interpret, kept for the round trip.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_task_type() -> Option<String> {
    Some("CAUSAL_LM".into())
}

fn one() -> Option<usize> {
    Some(1)
}

pub const PROMPT_TUNING: &str = "PROMPT_TUNING";
pub const PREFIX_TUNING: &str = "PREFIX_TUNING";
/// PEFT's P-tuning: a prompt encoder (MLP or LSTM) trains the virtual tokens, and its output
/// is what the adapter file holds; loaded, it is prompt tuning with those rows.
pub const P_TUNING: &str = "P_TUNING";

/// Whether an adapter of `peft_type` puts virtual tokens ahead of the input.
pub fn is_prompt_learning(peft_type: &str) -> bool {
    [PROMPT_TUNING, PREFIX_TUNING, P_TUNING].contains(&peft_type)
}

impl PromptConfig {
    pub fn is_prefix(&self) -> bool {
        self.peft_type == PREFIX_TUNING
    }
}

impl AdapterConfig for PromptConfig {
    fn saved_fields(&mut self) -> (&mut bool, &mut Option<String>) {
        (&mut self.inference_mode, &mut self.base_model_name_or_path)
    }

    fn validate(&self) -> Result<()> {
        if !is_prompt_learning(&self.peft_type) {
            bail!(
                "peft_type {:?} is not prompt, prefix or P-tuning",
                self.peft_type
            );
        }
        if self.num_virtual_tokens == 0 {
            bail!("num_virtual_tokens must be at least 1");
        }
        Ok(())
    }
}
