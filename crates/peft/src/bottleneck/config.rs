use crate::files::AdapterConfig;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Bottleneck adapters (AdapterHub `adapters`; HF PEFT has none), written to and read from
/// `adapter_config.json` with `peft_type: "BOTTLENECK"`.
///
/// File layout: `adapter_model.safetensors` holds, per decoder layer `i` and placement
/// (`attention_adapter` after the attention block, `output_adapter` after the MLP),
/// `base_model.model.model.layers.{i}.{placement}.down.weight` `[hidden/r, hidden]`,
/// `.down.bias` `[hidden/r]`, `.up.weight` `[hidden, hidden/r]` and `.up.bias` `[hidden]`, f32.
/// Each adapter computes `h + up(act(down(h)))` on its block's output, before the residual add.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BottleneckConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default = "default_task_type")]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    /// `houlsby` (after attention and after the MLP) or `pfeiffer` (after the MLP).
    pub config: String,
    /// Bottleneck width = hidden size / reduction_factor.
    pub reduction_factor: usize,
    /// relu, swish, gelu or tanh.
    pub non_linearity: String,
    /// An adapter after the attention block.
    pub mh_adapter: bool,
    /// An adapter after the MLP block.
    pub output_adapter: bool,
    /// Std of the down projection's N(0, σ²) init; the up projection starts at zero, so a
    /// fresh adapter is the identity.
    #[serde(default = "default_init_scale")]
    pub init_scale: f64,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_peft_type() -> String {
    "BOTTLENECK".into()
}
fn default_task_type() -> Option<String> {
    Some("CAUSAL_LM".into())
}
fn default_init_scale() -> f64 {
    1e-2
}

impl BottleneckConfig {
    /// Houlsby et al. 2019: adapters after attention and after the MLP, swish.
    pub fn houlsby(reduction_factor: usize) -> Self {
        Self::with("houlsby", reduction_factor, "swish", true)
    }

    /// Pfeiffer et al. 2021: one adapter after the MLP, relu.
    pub fn pfeiffer(reduction_factor: usize) -> Self {
        Self::with("pfeiffer", reduction_factor, "relu", false)
    }

    fn with(name: &str, reduction_factor: usize, act: &str, mh_adapter: bool) -> Self {
        Self {
            peft_type: default_peft_type(),
            task_type: default_task_type(),
            base_model_name_or_path: None,
            inference_mode: false,
            config: name.into(),
            reduction_factor,
            non_linearity: act.into(),
            mh_adapter,
            output_adapter: true,
            init_scale: default_init_scale(),
            other: Map::new(),
        }
    }
}

impl AdapterConfig for BottleneckConfig {
    fn saved_fields(&mut self) -> (&mut bool, &mut Option<String>) {
        (&mut self.inference_mode, &mut self.base_model_name_or_path)
    }

    fn validate(&self) -> Result<()> {
        if self.peft_type != "BOTTLENECK" {
            bail!(
                "adapter peft_type is {:?}, expected BOTTLENECK",
                self.peft_type
            );
        }
        if self.reduction_factor == 0 {
            bail!("reduction_factor must be at least 1");
        }
        if !["relu", "swish", "silu", "gelu", "tanh"].contains(&self.non_linearity.as_str()) {
            bail!(
                "non_linearity must be relu, swish, gelu or tanh, got {:?}",
                self.non_linearity
            );
        }
        if !self.mh_adapter && !self.output_adapter {
            bail!("neither mh_adapter nor output_adapter is set: no adapter to place");
        }
        Ok(())
    }
}
