use crate::files::AdapterConfig;
use crate::targets::{TargetModules, ALL_LINEAR};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// PEFT's `LoraConfig`, as written to and read from `adapter_config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraConfig {
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
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_r_f64")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Parameters adapted directly (a mixture-of-experts block's router and stacked experts:
    /// see [`crate::lora::experts`]).
    #[serde(default)]
    pub target_parameters: Option<Vec<String>>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "default_init")]
    pub init_lora_weights: Value,
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    #[serde(default)]
    pub layers_pattern: Option<Value>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Fields of newer PEFT versions we do not interpret; kept so a round trip preserves them.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_task_type() -> Option<String> {
    Some("CAUSAL_LM".into())
}
fn default_r() -> usize {
    8
}
fn default_r_f64() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_init() -> Value {
    Value::Bool(true)
}

/// Fields PEFT may set that change the adapter's math. We refuse such adapters when the value
/// is not the default rather than load them wrongly.
const UNSUPPORTED_IF_SET: &[&str] = &[
    "alora_invocation_tokens",
    "arrow_config",
    "layer_replication",
    "velora_config",
    "monteclora_config",
    "kasa_config",
];

impl Default for LoraConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Map::new())).expect("defaults deserialize")
    }
}

impl LoraConfig {
    /// Scale of `B A`: alpha / r, or alpha / sqrt(r) with rsLoRA. `module_path` selects
    /// `rank_pattern` / `alpha_pattern` overrides (PEFT matches them as `(.*\.)?key$`).
    pub fn rank_and_scaling(&self, module_path: &str) -> (usize, f64) {
        let matches = |key: &str| {
            regex::Regex::new(&format!(r"^(.*\.)?(?:{key})$"))
                .map(|re| re.is_match(module_path))
                .unwrap_or(false)
        };
        let r = self
            .rank_pattern
            .iter()
            .find(|(k, _)| matches(k))
            .map(|(_, &r)| r)
            .unwrap_or(self.r);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| matches(k))
            .map(|(_, &a)| a)
            .unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        (r, scale)
    }

    /// Whether the adapter adapts parameters directly (`target_parameters`: a mixture of
    /// experts' router and experts), which some writers and combinations cannot express.
    pub fn adapts_parameters(&self) -> bool {
        self.target_parameters
            .as_ref()
            .is_some_and(|p| !p.is_empty())
    }

    /// The layer indices `layers_to_transform` keeps (an int or a list of ints; `None`, or
    /// an empty list: every layer).
    pub fn layer_indices(&self) -> Result<Option<Vec<usize>>> {
        let bad = || anyhow::anyhow!("layers_to_transform must be a layer index or a list of them");
        let index = |v: &Value| v.as_u64().map(|i| i as usize).ok_or_else(bad);
        Ok(match &self.layers_to_transform {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) if items.is_empty() => None,
            Some(Value::Array(items)) => Some(items.iter().map(index).collect::<Result<_>>()?),
            Some(v) => Some(vec![index(v)?]),
        })
    }

    /// `layers_pattern`: names of the layer list whose index `layers_to_transform` reads (a
    /// string or a list; empty: the name before the last index in the path).
    pub fn layer_patterns(&self) -> Result<Vec<String>> {
        let bad = || anyhow::anyhow!("layers_pattern must be a name or a list of names");
        Ok(match &self.layers_pattern {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad()),
        })
    }

    /// JSON as PEFT writes it: sorted keys, two-space indent, `inference_mode: true`.
    /// `trainable_token_indices`, as a list or as `{"embed_tokens": [...]}` (the only
    /// embedding of these models): the tokens whose embedding rows train, in the order of the
    /// saved rows.
    pub fn token_indices(&self) -> Result<Option<Vec<u32>>> {
        let what = "trainable_token_indices";
        let list = match self.other.get(what) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(by_module)) => {
                let mut entries = by_module.iter();
                match (entries.next(), entries.next()) {
                    (Some((m, list)), None) if crate::tokens::names_embedding(m) => list,
                    _ => bail!(
                        "{what}: only the input embedding (embed_tokens) takes trainable tokens here, got {}",
                        Value::Object(by_module.clone())
                    ),
                }
            }
            Some(list) => list,
        };
        crate::tokens::parse_token_ids(list, what).map(Some)
    }
}

impl AdapterConfig for LoraConfig {
    fn saved_fields(&mut self) -> (&mut bool, &mut Option<String>) {
        (&mut self.inference_mode, &mut self.base_model_name_or_path)
    }

    fn validate(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            bail!(
                "adapter peft_type {:?} is not supported (peft-rs loads LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, P_TUNING and BOTTLENECK)",
                self.peft_type
            );
        }
        if self.r == 0 {
            bail!("r must be positive");
        }
        if let Some((key, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            bail!("rank_pattern gives {key:?} rank 0; ranks must be positive");
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            bail!("lora_alpha must be above 0, got {}", self.lora_alpha);
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("lora_dropout must be in [0, 1), got {}", self.lora_dropout);
        }
        if !["none", "all", "lora_only"].contains(&self.bias.as_str()) {
            bail!("bias must be none, all or lora_only, got {:?}", self.bias);
        }
        if self.fan_in_fan_out {
            bail!("fan_in_fan_out=true (GPT-2 Conv1D layers) is not supported for Llama-family models");
        }
        let layers = self.layer_indices()?;
        self.layer_patterns()?;
        if layers.is_some()
            && matches!(self.target_modules, Some(TargetModules::Pattern(ref p)) if p != ALL_LINEAR)
        {
            bail!(
                "layers_to_transform cannot be used when target_modules is a regex (as in HF PEFT)"
            );
        }
        self.token_indices()?;
        crate::lora::init::SavedBase::of(&self.init_lora_weights)?;
        for key in UNSUPPORTED_IF_SET {
            if let Some(v) = self.other.get(*key) {
                let empty = v.as_array().is_some_and(Vec::is_empty);
                let default = v.is_null() || v == &Value::Bool(false) || empty;
                if !default {
                    bail!("adapter_config.json sets {key}, which peft-rs does not support");
                }
            }
        }
        for key in ["use_qalora", "use_bdlora", "lora_bias"] {
            if self.other.get(key).is_some_and(|v| v == &Value::Bool(true)) {
                bail!("adapter_config.json sets {key}=true, which peft-rs does not support");
            }
        }
        Ok(())
    }

    fn to_json_string(&self) -> Result<String> {
        let mut v = serde_json::to_value(self)?;
        let obj = v
            .as_object_mut()
            .context("config serializes to an object")?;
        obj.insert("inference_mode".into(), Value::Bool(true));
        // PEFT writes integers for integral alphas (lora_alpha: 16).
        if self.lora_alpha.fract() == 0.0 {
            obj.insert("lora_alpha".into(), Value::from(self.lora_alpha as i64));
        }
        crate::files::sorted_json(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn golden_config_parses_with_scaling() {
        let text = r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"use_rslora":true,
            "target_modules":"all-linear","task_type":"CAUSAL_LM","megatron_core":"megatron.core"}"#;
        let c: LoraConfig = serde_json::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.rank_and_scaling("model.layers.0.mlp.up_proj"), (4, 4.0));
        assert_eq!(
            c.target_modules,
            Some(TargetModules::Pattern("all-linear".into()))
        );
        let out = c.to_json_string().unwrap();
        assert!(out.contains("\"megatron_core\": \"megatron.core\""));
        assert!(out.contains("\"lora_alpha\": 8,"));
    }

    #[test]
    fn rank_pattern_overrides() {
        let mut c = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            ..Default::default()
        };
        c.rank_pattern.insert("q_proj".into(), 4);
        assert_eq!(
            c.rank_and_scaling("model.layers.0.self_attn.q_proj"),
            (4, 4.0)
        );
        assert_eq!(
            c.rank_and_scaling("model.layers.0.self_attn.v_proj"),
            (8, 2.0)
        );
    }

    #[test]
    fn from_json_errors_name_the_source() {
        let source = Path::new("dir/adapter_config.json");
        let e = LoraConfig::from_json("{\"r\": ", source).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("dir/adapter_config.json is malformed: "),
            "{e}"
        );
        let e =
            LoraConfig::from_json(r#"{"r":8,"rank_pattern":{"q_proj":0}}"#, source).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "in dir/adapter_config.json: rank_pattern gives \"q_proj\" rank 0; ranks must be positive"
        );
    }

    #[test]
    fn unsupported_fields_are_refused() {
        let c: LoraConfig = serde_json::from_str(r#"{"r":8,"layer_replication":[[0,4]]}"#).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("layer_replication"));
    }
}
