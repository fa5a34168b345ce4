use anyhow::{bail, Context, Result};
use peft_ops::{GatedActivation, RouterKind, Scoring};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The fields of a Llama-family `config.json` (Llama 2/3, Mistral, Qwen2/3, SmolLM2/3, Granite,
/// Gemma 2/3, Phi-3, their mixture-of-experts kin and gpt-oss)
/// that the forward pass needs. `raw` keeps the file as read so that `peft merge` writes it back
/// intact.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// The head dims RoPE rotates, the first ones of each head: `head_dim`, or a part of it
    /// (Phi-4-mini's `partial_rotary_factor`; the others pass as they are).
    pub rotary_dim: usize,
    /// RoPE rotates adjacent dims (`2i`, `2i + 1`) together, as GLM's and ERNIE 4.5's do, not
    /// dim `i` with `i + d/2`.
    pub rope_interleaved: bool,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2 always, Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias` covers it too).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm of the queries and keys before RoPE (`q_norm` / `k_norm`).
    pub qk_norm: QkNorm,
    /// Gemma's RMSNorm: weights are offsets from 1 (the scale is `1 + w`, in f32).
    pub norm_adds_one: bool,
    /// Gemma's embeddings are multiplied by `sqrt(hidden_size)` (rounded to their dtype).
    pub scale_embeddings: bool,
    /// The MLP's gate activation: SiLU (Llama, Mistral, Qwen), GELU's tanh approximation
    /// (Gemma's `gelu_pytorch_tanh`).
    pub activation: GatedActivation,
    /// Which RMSNorms a decoder layer has, and where.
    pub norms: LayerNorms,
    /// The attention scores' scale: `head_dim^-1/2` (Gemma: `query_pre_attn_scalar^-1/2`).
    pub attention_scale: f64,
    /// Gemma 2's soft cap of the attention scores: `cap · tanh(scores / cap)` (scaled scores).
    pub attn_softcap: Option<f64>,
    /// Gemma 2's soft cap of the output logits.
    pub final_softcap: Option<f64>,
    /// Granite's multipliers: of the decoder's input embeddings, of each attention and MLP
    /// output before its residual add, and the divisor of the logits (`embedding_multiplier`,
    /// `residual_multiplier`, `logits_scaling`; its `attention_multiplier` is
    /// `attention_scale`).
    pub embedding_multiplier: Option<f64>,
    pub residual_multiplier: Option<f64>,
    pub logits_scaling: Option<f64>,
    /// Per layer, the sliding window of keys its queries see (Gemma's local layers), or
    /// `None` for global attention.
    pub layer_windows: Vec<Option<usize>>,
    /// Per layer, whether RoPE rotates its queries and keys (SmolLM3 leaves every fourth layer
    /// without: its `no_rope_layers`).
    pub layer_rope: Vec<bool>,
    /// Linear RoPE scaling of the global layers (`rope_type: "linear"`): positions divided by it.
    pub rope_linear_factor: Option<f64>,
    /// RoPE base of the sliding-window layers, when they have their own (Gemma 3's
    /// `rope_local_base_freq`; never scaled).
    pub local_rope_theta: Option<f64>,
    /// LongRoPE (Phi-3's 128k-context models): per-frequency factors and a cos/sin scale.
    pub longrope: Option<LongRope>,
    /// YaRN (`rope_type: "yarn"`: Qwen 2.5 and 3's long-context setting).
    pub yarn: Option<Yarn>,
    /// Ministral 3's query scaling past its original context (Llama 4's): queries at
    /// position `p` are multiplied by `1 + beta · ln(1 + ⌊p / original⌋)`, exactly 1 before
    /// `original`.
    pub query_scaling: Option<QueryScaling>,
    /// Phi-3's fused projections: one `qkv_proj` (q, k and v side by side in its output) and
    /// one `gate_up_proj` (gate, then up).
    pub fused_projections: bool,
    /// Mixture-of-experts feed-forward blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss).
    pub moe: Option<Moe>,
    /// gpt-oss's attention sinks: a learned logit per head (`self_attn.sinks`) in each row's
    /// softmax, whose probability is dropped.
    pub attention_sinks: bool,
    /// DeepSeek-V3's multi-head latent attention (GLM-4.7-Flash's too).
    pub latent_attention: Option<LatentAttention>,
    /// The decoder's config as read (an image-text model's `text_config`, with the class
    /// defaults its file leaves out).
    pub raw: Value,
    /// The whole config.json of an image-text checkpoint (Gemma 3 4B and up) whose language
    /// model this is; the vision tower stays on disk. `None` for a causal LM.
    pub image_text: Option<Value>,
}

/// Where a decoder layer's RMSNorms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerNorms {
    /// Llama: the attention's input (`input_layernorm`) and the MLP's
    /// (`post_attention_layernorm`).
    Pre,
    /// Gemma: the attention's input and output (`input_layernorm`,
    /// `post_attention_layernorm`), the MLP's input and output (`pre_feedforward_layernorm`,
    /// `post_feedforward_layernorm`).
    Sandwich,
    /// OLMo 2: the attention's and the MLP's outputs alone (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`), before each residual add.
    Post,
}

impl LayerNorms {
    /// The norms' module names under a layer, in checkpoint order.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            LayerNorms::Pre => &["input_layernorm", "post_attention_layernorm"],
            LayerNorms::Sandwich => &[
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ],
            LayerNorms::Post => &["post_attention_layernorm", "post_feedforward_layernorm"],
        }
    }
}

/// How queries and keys are normed before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Each head over its `head_dim` (Qwen3, Gemma 3).
    PerHead,
    /// The whole projection, all heads at once (OLMo 2).
    Projection,
}

/// A mixture-of-experts feed-forward block, as transformers 5 computes it: a router picks
/// each token's `top_k` experts by softmax probability (renormalized over them when
/// `norm_topk_prob`), whose SwiGLU outputs it sums weighted by those; Qwen2-MoE adds a shared
/// expert gated by a sigmoid.
#[derive(Debug, Clone, PartialEq)]
pub struct Moe {
    pub num_experts: usize,
    pub top_k: usize,
    /// Intermediate size of each expert.
    pub expert_size: usize,
    pub norm_topk_prob: bool,
    /// How the router's logits choose and weigh the experts.
    pub scoring: Scoring,
    /// Where the checkpoint keeps a correction of the router's choice (GLM-4.5's and ERNIE
    /// 4.5's, whose routers compute in f32).
    pub choice_bias: Option<ChoiceBias>,
    /// Intermediate size of the shared experts: Qwen2-MoE's (`mlp.shared_expert`, gated by
    /// `mlp.shared_expert_gate`) or GLM-4.5's and ERNIE 4.5's (`mlp.shared_experts`,
    /// ungated).
    pub shared_expert_size: Option<usize>,
    /// Per layer, whether its feed-forward block is the mixture (Qwen's `mlp_only_layers` and
    /// `decoder_sparse_step` leave some dense).
    pub sparse_layers: Vec<bool>,
    /// Module names in the checkpoint: the block (`mlp`, Mixtral's `block_sparse_moe`) and
    /// each expert's gate, up and down projections (Mixtral's `w1`, `w3`, `w2`).
    pub block: &'static str,
    pub expert_projections: [&'static str; 3],
    /// The router's module name in the block (`gate`; gpt-oss's `router`).
    pub router: &'static str,
    /// gpt-oss's biases: of the router, and of each expert's gate, up and down projections.
    pub biases: bool,
    /// How the checkpoint holds the experts.
    pub storage: ExpertStorage,
    /// The weight of the routers' load-balancing loss that TRL's SFTTrainer adds to the
    /// training loss by default (`router_aux_loss_coef`; 0.01 for OLMoE, 0.001 elsewhere
    /// where the config leaves it out).
    pub router_aux_loss_coef: f64,
}

/// DeepSeek-V3's multi-head latent attention: queries from `q_proj`, or through a low-rank
/// `q_a_proj`, its norm (`q_a_layernorm`) and `q_b_proj`; keys and values from a latent of
/// `kv_lora_rank` (`kv_a_proj_with_mqa`, which also gives one rotated key head shared by all
/// heads, then `kv_a_layernorm` and `kv_b_proj`). Each query and key head has
/// `qk_nope_head_dim` unrotated and `qk_rope_head_dim` rotated dims (`head_dim` their sum:
/// the model's heads hold the rotated dims first, so that RoPE rotates them as a partial
/// rotary one; q·k is the same), each value head `v_head_dim` (zero-padded to `head_dim` in
/// the attention, whose padded outputs are dropped).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentAttention {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// RoPE pairs adjacent rotated dims (`rope_interleave`, as released), not `i` and
    /// `i + r/2`.
    pub rope_interleave: bool,
}

/// Where a checkpoint keeps the correction of a router's choice (`e_score_correction_bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChoiceBias {
    /// GLM-4.5's, `[experts]`, in the router (`mlp.gate.e_score_correction_bias`).
    Router,
    /// ERNIE 4.5's, `[1, experts]` (`mlp.moe_statics.e_score_correction_bias`).
    MoeStatics,
}

impl ChoiceBias {
    /// Its path under a layer.
    pub fn path(self) -> &'static str {
        match self {
            Self::Router => "mlp.gate.e_score_correction_bias",
            Self::MoeStatics => "mlp.moe_statics.e_score_correction_bias",
        }
    }

    /// Its shape on disk.
    pub fn shape(self, experts: usize) -> Vec<usize> {
        match self {
            Self::Router => vec![experts],
            Self::MoeStatics => vec![1, experts],
        }
    }
}

/// How a checkpoint holds a layer's experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertStorage {
    /// One module per expert (`mlp.experts.3.gate_proj`), as transformers 4 saved them.
    PerExpert,
    /// Stacked as transformers 5 holds them (Qwen3-VL-MoE): `mlp.experts.gate_up_proj`
    /// `[experts, 2 · size, hidden]` (gate first) and `mlp.experts.down_proj`; its releases
    /// store both transposed.
    Stacked,
    /// gpt-oss's: stacked and transposed, `gate_up_proj` `[experts, hidden, 2 · size]` with
    /// gate and up interleaved (columns `2j` and `2j + 1`), `down_proj` `[experts, size,
    /// hidden]`, and a bias beside each (`gate_up_proj_bias`, `down_proj_bias`); or
    /// MXFP4-quantized (`*_blocks`, `*_scales`), as OpenAI releases it.
    GptOss,
}

impl Moe {
    /// The router's settings.
    pub fn router_kind(&self) -> RouterKind {
        RouterKind {
            scoring: self.scoring,
            top_k: self.top_k,
            norm_topk_prob: self.norm_topk_prob,
        }
    }

    /// GLM-4.5's and ERNIE 4.5's routers correct their choice by a bias, and compute in f32
    /// as transformers keeps them.
    pub fn has_choice_bias(&self) -> bool {
        self.choice_bias.is_some()
    }

    /// Whether transformers computes a load-balancing loss of these routers (GLM-4.5's and
    /// DeepSeek's have none: they balance by their correction bias, or not at all).
    pub fn has_load_balancing_loss(&self) -> bool {
        matches!(self.scoring, Scoring::Softmax)
    }

    /// Whether the router computes in f32, as transformers keeps GLM-4.5's, ERNIE 4.5's and
    /// DeepSeek's.
    pub fn router_in_f32(&self) -> bool {
        self.has_choice_bias() || matches!(self.scoring, Scoring::LimitedSoftmax { .. })
    }

    /// Module path of the shared experts under a layer, and of their gate where they have one
    /// (Qwen2-MoE's).
    pub fn shared_expert_paths(&self) -> (&'static str, Option<&'static str>) {
        match self.router_in_f32() {
            true => ("mlp.shared_experts", None),
            false => ("mlp.shared_expert", Some("mlp.shared_expert_gate")),
        }
    }

    /// How many layers come before the first with experts.
    pub fn leading_dense_layers(&self) -> usize {
        self.sparse_layers.iter().take_while(|s| !**s).count()
    }

    /// Module path of the router under a layer (`mlp.gate`, gpt-oss's `mlp.router`).
    pub fn router_path(&self) -> String {
        format!("{}.{}", self.block, self.router)
    }

    /// Module paths of expert `e`'s gate, up and down projections under a layer.
    pub fn expert_paths(&self, e: usize) -> [String; 3] {
        self.expert_projections
            .map(|p| format!("{}.experts.{e}.{p}", self.block))
    }
}

/// One linear layer of a decoder layer: its module path under the layer
/// (`self_attn.q_proj`), its output and input sizes, and whether it has a bias.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerLinear {
    pub name: &'static str,
    pub out: usize,
    pub inp: usize,
    pub bias: bool,
}

/// LongRoPE scaling (`rope_type: "longrope"`, formerly `"su"`), as transformers computes it:
/// the inverse frequencies divided by `short_factor`, or by `long_factor` once a sequence
/// reaches past `original_max_position_embeddings`, and cos/sin scaled by `attention_factor`.
#[derive(Debug, Clone)]
pub struct LongRope {
    pub short_factor: Vec<f32>,
    pub long_factor: Vec<f32>,
    pub original_max_position_embeddings: usize,
    pub attention_factor: f64,
}

/// YaRN scaling (`rope_type: "yarn"`), as transformers computes it: each inverse frequency
/// between its own value (pairs that turn more than `beta_fast` times over the original
/// context) and its value divided by `factor` (pairs that turn less than `beta_slow` times),
/// by a linear ramp over the pairs between, and cos/sin scaled by an attention factor. The
/// optional settings are kept as the config names them (`None`: transformers' default), for
/// llama.cpp's converter writes only those.
/// Llama 4's query scaling by position (Ministral 3's `llama_4_scaling_beta`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueryScaling {
    pub beta: f64,
    pub original_max_position_embeddings: usize,
}

impl QueryScaling {
    /// The factor of the queries at `position`.
    pub fn factor(&self, position: usize) -> f64 {
        let periods = (position / self.original_max_position_embeddings) as f64;
        1.0 + self.beta * periods.ln_1p()
    }
}

#[derive(Debug, Clone)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub attention_factor: Option<f64>,
    /// DeepSeek's pair, whose ratio sets the attention factor where the config gives none.
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    /// Whether the ramp's ends are rounded outwards to whole pairs (transformers' default).
    pub truncate: bool,
}

impl Yarn {
    /// The scale of cos and sin: the config's, else `0.1·ln(factor) + 1` (with DeepSeek's
    /// `mscale` and `mscale_all_dim`, the ratio of that formula under each).
    pub fn attention_factor(&self) -> f64 {
        match (self.attention_factor, self.mscale, self.mscale_all_dim) {
            (Some(a), _, _) => a,
            // transformers tests the pair for truth: a 0 counts as absent.
            (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                self.mscale(m) / self.mscale(all)
            }
            _ => self.default_attention_factor(),
        }
    }

    /// The attention factor of the factor alone, `0.1·ln(factor) + 1`.
    pub fn default_attention_factor(&self) -> f64 {
        self.mscale(1.0)
    }

    fn mscale(&self, m: f64) -> f64 {
        match self.factor <= 1.0 {
            true => 1.0,
            false => 0.1 * m * self.factor.ln() + 1.0,
        }
    }

    /// The inverse frequencies of the `rotary_dim` rotated dims with base `theta`, in f32 as
    /// transformers computes them.
    fn inv_freq(&self, theta: f64, rotary_dim: usize) -> Vec<f32> {
        // transformers reads a 0 beta as absent too (`or 32`).
        let beta_fast = self.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0);
        let beta_slow = self.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0);
        let dim = rotary_dim as f64;
        let original = self.original_max_position_embeddings as f64;
        // The pair index at which a frequency turns `rotations` times over the original context.
        let correction = |rotations: f64| {
            dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001;
        }
        // The ends are Python floats, the ramp a float32 tensor.
        let (start, width) = (low as f32, (high - low) as f32);
        let factor = self.factor as f32;
        theta_powers(theta, rotary_dim)
            .enumerate()
            .map(|(i, power)| {
                let ramp = ((i as f32 - start) / width).clamp(0.0, 1.0);
                let extrapolated = 1.0 - ramp;
                (1.0 / (factor * power)) * (1.0 - extrapolated) + (1.0 / power) * extrapolated
            })
            .collect()
    }
}

/// Llama 3.1+ frequency-dependent RoPE scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    /// ERNIE 4.5's: a bias on every linear layer.
    #[serde(default)]
    use_bias: bool,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    #[serde(alias = "_sliding_window_pattern")]
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    partial_rotary_factor: Option<f64>,
    no_rope_layers: Option<Vec<u8>>,
    no_rope_layer_interval: Option<usize>,
    attention_multiplier: Option<f64>,
    embedding_multiplier: Option<f64>,
    residual_multiplier: Option<f64>,
    logits_scaling: Option<f64>,
    #[serde(
        alias = "num_local_experts",
        alias = "n_routed_experts",
        alias = "moe_num_experts"
    )]
    num_experts: Option<usize>,
    #[serde(alias = "moe_k")]
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    shared_expert_intermediate_size: Option<usize>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    swiglu_alpha: Option<f32>,
    swiglu_limit: Option<f32>,
    router_aux_loss_coef: Option<f64>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    rope_interleave: Option<bool>,
    mlp_layer_types: Option<Vec<String>>,
    topk_method: Option<String>,
    #[serde(alias = "moe_num_shared_experts")]
    n_shared_experts: Option<usize>,
    first_k_dense_replace: Option<usize>,
    moe_layer_start_index: Option<i64>,
    moe_layer_end_index: Option<i64>,
    moe_layer_interval: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    routed_scaling_factor: Option<f64>,
    use_qk_norm: Option<bool>,
}

fn default_max_pos() -> usize {
    4096
}

const SUPPORTED: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "smollm3",
    "granite",
    "olmo2",
    "olmo3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "ministral",
    "ministral3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "qwen2_vl_text",
    "qwen2_5_vl_text",
    "qwen3_vl_text",
    "qwen3_vl_moe_text",
    "gpt_oss",
    "ernie4_5",
    "glm4_moe",
    "ernie4_5_moe",
    "deepseek_v3",
    "glm4_moe_lite",
    "deepseek_v2",
];

/// Image-text models whose language model is read (text in, text out; the vision tower is
/// left on disk), by `model_type`, with the `model_type`s their `text_config` may have (the
/// first where it names none).
const IMAGE_TEXT: &[(&str, &[&str])] = &[
    ("gemma3", &["gemma3_text"]),
    // Mistral Small 3.1 and 3.2, Magistral Small; Ministral 3.
    ("mistral3", &["mistral", "ministral3"]),
    // Qwen2-VL, Qwen2.5-VL (Qwen2's layer) and Qwen3-VL (Qwen3's), whose multimodal RoPE is
    // the plain one on text alone (the three position grids are then one).
    ("qwen2_vl", &["qwen2_vl_text"]),
    ("qwen2_5_vl", &["qwen2_5_vl_text"]),
    ("qwen3_vl", &["qwen3_vl_text"]),
    ("qwen3_vl_moe", &["qwen3_vl_moe_text"]),
];

/// The image-text models whose early configs keep the language model's fields at the top
/// level (no `text_config`), as transformers still reads them.
const FLAT_IMAGE_TEXT: &[&str] = &["qwen2_vl", "qwen2_5_vl"];

/// Module path of the decoder (embeddings, layers, final norm) in a causal LM.
pub const CAUSAL_LM_DECODER: &str = "model";
/// Module path of the decoder in an image-text model, as transformers names its modules (and
/// HF PEFT its adapters' keys: `base_model.model.model.language_model.layers.0...`).
pub const IMAGE_TEXT_DECODER: &str = "model.language_model";

/// The class defaults of a model type, which transformers takes where a config leaves a key
/// out: the `text_config` of gemma-3-4b-it gives five values and takes the rest from
/// Gemma3TextConfig's; a Mistral 3 `text_config` may leave out what MistralConfig sets (a
/// window of 4096 among them).
fn class_defaults(model_type: &str) -> Option<Value> {
    Some(match model_type {
        "gemma3_text" => serde_json::json!({
            "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
            "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "max_position_embeddings": 131_072, "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
            "bos_token_id": 2,
        }),
        "mistral" | "ministral" => serde_json::json!({
            "vocab_size": 32_000, "hidden_size": 4096, "intermediate_size": 14_336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "sliding_window": 4096,
            "bos_token_id": 1, "eos_token_id": 2,
        }),
        "ministral3" => serde_json::json!({
            "vocab_size": 131_072, "hidden_size": 4096, "intermediate_size": 14_336,
            "num_hidden_layers": 34, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "max_position_embeddings": 262_144, "rms_norm_eps": 1e-5,
            "pad_token_id": 11, "bos_token_id": 1, "eos_token_id": 2,
            "rope_parameters": {
                "type": "yarn", "rope_theta": 1_000_000.0, "factor": 16.0,
                "original_max_position_embeddings": 16_384, "beta_fast": 32.0,
                "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                "llama_4_scaling_beta": 0.1,
            },
        }),
        // GptOssConfig's, with its YaRN (`__post_init__` sets it where the file has none).
        "gpt_oss" => serde_json::json!({
            "vocab_size": 201_088, "hidden_size": 2880, "intermediate_size": 2880,
            "num_hidden_layers": 36, "num_attention_heads": 64, "num_key_value_heads": 8,
            "head_dim": 64, "num_local_experts": 128, "num_experts_per_tok": 4,
            "sliding_window": 128, "max_position_embeddings": 131_072, "rms_norm_eps": 1e-5,
            "attention_bias": true, "tie_word_embeddings": false, "swiglu_alpha": 1.702,
            "swiglu_limit": 7.0,
        }),
        _ => return None,
    })
}

/// `raw` with the class defaults of its model type filled in where it leaves them out.
fn with_class_defaults(mut raw: Value) -> Value {
    let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
    if let (Some(Value::Object(defaults)), Value::Object(obj)) =
        (class_defaults(model_type), &mut raw)
    {
        for (key, value) in defaults {
            obj.entry(key).or_insert(value);
        }
    }
    raw
}

/// The language model's config of an image-text checkpoint: its `text_config`, with the
/// tying of the embeddings that the top level decides (`tie_word_embeddings`, true unless it
/// says otherwise, whatever `text_config` says: transformers ties by the top level). `None`
/// for a causal LM.
fn image_text_language_config(raw: &Value) -> Result<Option<Value>> {
    let model_type = raw.get("model_type").and_then(Value::as_str);
    let Some((kind, text_kinds)) = IMAGE_TEXT.iter().find(|(k, _)| Some(*k) == model_type) else {
        return Ok(None);
    };
    let flat = || {
        let mut top = raw.clone();
        if let Some(obj) = top.as_object_mut() {
            obj.remove("vision_config");
            obj.remove("model_type");
        }
        top
    };
    let mut text = match raw.get("text_config").filter(|t| t.is_object()) {
        Some(text) => text.clone(),
        None if FLAT_IMAGE_TEXT.contains(kind) => flat(),
        None => bail!("model_type {kind:?} needs a text_config object"),
    };
    let obj = text.as_object_mut().expect("checked to be an object");
    let text_type = obj
        .entry("model_type")
        .or_insert_with(|| text_kinds[0].into());
    if !text_kinds.iter().any(|k| text_type == k) {
        let expected = match text_kinds {
            [one] => format!("{one:?}"),
            many => format!("one of {many:?}"),
        };
        bail!(
            "the text_config of a {kind:?} model has model_type {text_type}, expected {expected}"
        );
    }
    // The classes' defaults: Gemma 3's and Mistral 3's tie, Qwen's VL models' do not.
    let tied = raw
        .get("tie_word_embeddings")
        .cloned()
        .unwrap_or((!kind.starts_with("qwen")).into());
    obj.insert("tie_word_embeddings".into(), tied);
    Ok(Some(text))
}

impl LlamaConfig {
    /// A causal LM's config, or the language model's of a supported image-text model.
    pub fn from_json(raw: Value) -> Result<Self> {
        match image_text_language_config(&raw)? {
            Some(text) => {
                let mut config = Self::from_text_json(text)?;
                config.image_text = Some(raw);
                Ok(config)
            }
            None => Self::from_text_json(raw),
        }
    }

    /// The config objects a saved model writes: the decoder's and, for an image-text model,
    /// the whole config.json around it.
    pub fn files_mut(&mut self) -> impl Iterator<Item = &mut serde_json::Map<String, Value>> {
        [Some(&mut self.raw), self.image_text.as_mut()]
            .into_iter()
            .flatten()
            .filter_map(Value::as_object_mut)
    }

    /// Module path of the decoder: [`CAUSAL_LM_DECODER`] or [`IMAGE_TEXT_DECODER`].
    pub fn decoder_path(&self) -> &'static str {
        match self.image_text {
            Some(_) => IMAGE_TEXT_DECODER,
            None => CAUSAL_LM_DECODER,
        }
    }

    fn from_text_json(raw: Value) -> Result<Self> {
        let raw = with_class_defaults(raw);
        if let Some(other) = raw
            .get("model_type")
            .and_then(Value::as_str)
            .filter(|t| !SUPPORTED.contains(t))
        {
            let image_text: Vec<&str> = IMAGE_TEXT.iter().map(|(t, _)| *t).collect();
            bail!(
                "unsupported model_type {other:?} (supported: {SUPPORTED:?}, and the language model of {image_text:?})"
            );
        }
        let c: RawConfig = serde_json::from_value(raw.clone())
            .context("config.json is not a Llama-family config")?;
        let model_type = c.model_type.clone().unwrap_or_else(|| "llama".into());
        let gemma3 = model_type == "gemma3_text";
        let gemma = gemma3 || model_type == "gemma2";
        // Gemma's soft caps: Gemma 2's default to 50 (scores) and 30 (logits), a null turns
        // one off; Gemma 3 has none unless its config sets them. Other families have none.
        let softcap = |key: &str, gemma2_default: f64| -> Result<Option<f64>> {
            match raw.get(key) {
                Some(Value::Null) => Ok(None),
                Some(v) if gemma => match v.as_f64() {
                    Some(cap) if cap > 0.0 => Ok(Some(cap)),
                    _ => bail!("config.json: {key} is not a positive number: {v}"),
                },
                Some(_) => bail!("logit soft-capping ({key}) is not supported for {model_type}"),
                None => Ok((model_type == "gemma2").then_some(gemma2_default)),
            }
        };
        let attn_softcap = softcap("attn_logit_softcapping", 50.0)?;
        let final_softcap = softcap("final_logit_softcapping", 30.0)?;
        if raw
            .get("use_bidirectional_attention")
            .and_then(Value::as_bool)
            == Some(true)
        {
            bail!("bidirectional attention (use_bidirectional_attention: true) is not supported");
        }
        // transformers 5 moved rope settings into `rope_parameters` (per layer type for Gemma 3:
        // `full_attention` and `sliding_attention`); older files use `rope_theta` +
        // `rope_scaling` (+ Gemma 3's `rope_local_base_freq`).
        let gpt_oss = model_type == "gpt_oss";
        let mut rope = c
            .rope_parameters
            .clone()
            .or(c.rope_scaling.clone())
            .or_else(|| gpt_oss.then(gpt_oss_default_rope));
        let mut local_rope = None;
        if let Some(Value::Object(per_type)) = &rope {
            if per_type.contains_key("full_attention") {
                local_rope = per_type.get("sliding_attention").cloned();
                rope = per_type.get("full_attention").cloned();
            }
        }
        let rope_theta = c
            .rope_theta
            .or_else(|| rope.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(match model_type.as_str() {
                "gemma3_text" => 1_000_000.0,
                "smollm3" => 2_000_000.0,
                "olmo3" => 500_000.0,
                "mixtral" | "qwen2_vl_text" | "qwen2_5_vl_text" => 1_000_000.0,
                "qwen3_vl_text" | "qwen3_vl_moe_text" => 5_000_000.0,
                "gpt_oss" => 150_000.0,
                "ernie4_5" | "ernie4_5_moe" => 500_000.0,
                _ => 10_000.0,
            });
        let rope_type = |r: &Option<Value>| {
            r.as_ref()
                .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string()
        };
        let phi3 = model_type == "phi3";
        let latent_attention = latent_attention(&c, &model_type)?;
        // Latent attention's heads: the unrotated and the rotated query-key dims.
        let head_dim = match latent_attention {
            Some(m) => m.qk_nope_head_dim + m.qk_rope_head_dim,
            None => c
                .head_dim
                .unwrap_or(c.hidden_size / c.num_attention_heads.max(1)),
        };
        // Phi-4-mini and GLM-4.5 rotate the first `partial_rotary_factor` of each head's dims
        // only (GLM-4.5's class default: half); latent attention its rotated dims.
        let glm4_moe = model_type == "glm4_moe";
        let partial_rotary = match latent_attention {
            Some(m) => m.qk_rope_head_dim as f64 / head_dim as f64,
            None => rope
                .as_ref()
                .and_then(|r| r.get("partial_rotary_factor")?.as_f64())
                .or(c.partial_rotary_factor)
                .unwrap_or(if glm4_moe { 0.5 } else { 1.0 }),
        };
        let rotary_dim = match latent_attention {
            Some(m) => m.qk_rope_head_dim,
            None => (head_dim as f64 * partial_rotary) as usize,
        };
        if partial_rotary != 1.0 && !phi3 && !glm4_moe && latent_attention.is_none() {
            bail!(
                "partial rotary embeddings (partial_rotary_factor {partial_rotary}) are supported \
                 for phi3 and glm4_moe only"
            );
        }
        if !(partial_rotary > 0.0 && partial_rotary <= 1.0) {
            bail!("partial_rotary_factor {partial_rotary} is not in (0, 1]");
        }
        if rotary_dim == 0 || rotary_dim % 2 == 1 {
            bail!(
                "partial_rotary_factor {partial_rotary} rotates {rotary_dim} of {head_dim} head \
                 dims; it must rotate an even number, at least two"
            );
        }
        let mut rope_scaling = None;
        let mut rope_linear_factor = None;
        let mut longrope = None;
        let mut yarn = None;
        match rope_type(&rope).as_str() {
            "default" => {}
            // Qwen's VL models: on text alone, the plain RoPE (`mrope_section` splits the
            // frequencies among three position grids, which are then one).
            "mrope" if model_type.contains("_vl_") => {}
            "longrope" | "su" => {
                let r = rope.as_ref().unwrap_or(&Value::Null);
                longrope = Some(long_rope(&c, r, rotary_dim)?);
            }
            "yarn" => yarn = Some(yarn_scaling(&c, rope.as_ref().unwrap_or(&Value::Null))?),
            "llama3" => {
                rope_scaling = Some(
                    serde_json::from_value(rope.clone().unwrap_or_default())
                        .context("rope scaling of type llama3 lacks a field")?,
                )
            }
            "linear" => {
                let factor = rope.as_ref().and_then(|r| r.get("factor")?.as_f64());
                rope_linear_factor =
                    Some(factor.context("rope scaling of type linear lacks its factor")?);
            }
            other => bail!(
                "unsupported rope_type {other:?} (supported: default, linear, llama3, longrope, \
                 yarn)"
            ),
        }
        let query_scaling = match model_type.as_str() {
            "ministral3" => {
                let r = rope.as_ref().unwrap_or(&Value::Null);
                let beta = r.get("llama_4_scaling_beta").and_then(Value::as_f64);
                let original = r
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64);
                match (beta, original) {
                    (Some(beta), Some(original)) if original > 0 => Some(QueryScaling {
                        beta,
                        original_max_position_embeddings: original as usize,
                    }),
                    _ => bail!(
                        "a ministral3 config needs llama_4_scaling_beta and original_max_position_embeddings in its rope parameters"
                    ),
                }
            }
            _ => None,
        };
        if rope_type(&local_rope) != "default" {
            bail!("scaled RoPE on sliding-window layers is not supported");
        }
        let olmo3 = model_type == "olmo3";
        // OLMo 3's sliding layers rotate by the unscaled RoPE of the global base (its scaling,
        // in `rope_scaling`, is the global layers').
        let local_rope_theta = local_rope
            .as_ref()
            .and_then(|r| r.get("rope_theta")?.as_f64())
            .or(c.rope_local_base_freq)
            .or(gemma3.then_some(10_000.0))
            .or(olmo3.then_some(rope_theta));
        if c.num_attention_heads == 0
            || !c.hidden_size.is_multiple_of(c.num_attention_heads) && c.head_dim.is_none()
        {
            bail!("config.json: hidden_size is not divisible by num_attention_heads");
        }
        // Latent attention expands its latent into a key and a value head per query head.
        let num_key_value_heads = match latent_attention {
            Some(_) => c.num_attention_heads,
            None => c.num_key_value_heads.unwrap_or(c.num_attention_heads),
        };
        if num_key_value_heads == 0 || !c.num_attention_heads.is_multiple_of(num_key_value_heads) {
            bail!("config.json: num_attention_heads is not a multiple of num_key_value_heads");
        }
        if raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            bail!("sliding-window attention (use_sliding_window: true) is not supported");
        }
        for dropout in ["attention_dropout", "resid_pdrop", "embd_pdrop"] {
            if let Some(p) = raw
                .get(dropout)
                .and_then(Value::as_f64)
                .filter(|p| *p > 0.0)
            {
                bail!("dropout inside the base model ({dropout} {p}) is not supported");
            }
        }
        let layer_windows = if gemma {
            let pattern = match gemma3 {
                true => GEMMA3_SLIDING_PATTERN,
                false => GEMMA2_SLIDING_PATTERN,
            };
            sliding_layer_windows(&c, pattern)?
        } else if olmo3 {
            sliding_layer_windows(&c, OLMO3_SLIDING_PATTERN)?
        } else if gpt_oss {
            // Every other layer slides, the first one too, as Gemma 2's.
            sliding_layer_windows(&c, GEMMA2_SLIDING_PATTERN)?
        } else if model_type == "ministral" && c.sliding_window.is_some() && c.layer_types.is_some()
        {
            // Ministral 8B (2410): its layer_types say which layers slide.
            sliding_layer_windows(&c, 1)?
        } else if phi3
            || ["mistral", "ministral", "ministral3", "mixtral"].contains(&model_type.as_str())
        {
            // transformers' Phi-3 and Mistral attend over a window on every layer when the
            // config sets one (Mistral 7B v0.1's 4096; one past the context, as the Phi-3 128k
            // models' 262144, never hides a key).
            let window = c.sliding_window.filter(|w| *w < c.max_position_embeddings);
            vec![window; c.num_hidden_layers]
        } else {
            vec![None; c.num_hidden_layers]
        };
        let act = c.hidden_activation.as_deref().or(c.hidden_act.as_deref());
        let activation = match act.unwrap_or(if gemma { "gelu_pytorch_tanh" } else { "silu" }) {
            // gpt-oss's experts clamp theirs whatever `hidden_act` says.
            _ if gpt_oss => GatedActivation::ClampedSwiglu {
                alpha: c.swiglu_alpha.unwrap_or(1.702),
                limit: c.swiglu_limit.unwrap_or(7.0),
            },
            "silu" | "swish" => GatedActivation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" => GatedActivation::GeluTanh,
            other => bail!("unsupported activation {other:?} (supported: silu, gelu_pytorch_tanh)"),
        };
        let granite = model_type == "granite";
        // Granite's multipliers, 1 (none) where the config leaves them out, as its class does.
        let multiplier = |m: Option<f64>| m.filter(|&m| granite && m != 1.0);
        // Gemma's class default for query_pre_attn_scalar is 256, Granite's multiplier 1.
        let attention_scale = match (gemma, c.query_pre_attn_scalar) {
            (true, s) => s.unwrap_or(256.0).powf(-0.5),
            _ if granite => c.attention_multiplier.unwrap_or(1.0),
            // DeepSeek's YaRN also scales the scores by its mscale_all_dim's factor, squared.
            _ if latent_attention.is_some() => {
                let r = rope.as_ref().unwrap_or(&Value::Null);
                let number = |k: &str| r.get(k).and_then(Value::as_f64);
                let m = match (
                    rope_type(&rope).as_str(),
                    number("mscale_all_dim"),
                    number("factor"),
                ) {
                    (t, Some(all), Some(f)) if t != "default" && all != 0.0 && f > 1.0 => {
                        0.1 * all * f.ln() + 1.0
                    }
                    _ => 1.0,
                };
                (head_dim as f64).powf(-0.5) * m * m
            }
            _ => (head_dim as f64).powf(-0.5),
        };
        // Qwen2 always has q/k/v biases, Qwen2-MoE where its `qkv_bias` (default true) says.
        let qkv_bias = match model_type.as_str() {
            "qwen2" | "qwen2_vl_text" | "qwen2_5_vl_text" => true,
            "qwen2_moe" => raw.get("qkv_bias").and_then(Value::as_bool).unwrap_or(true),
            _ => c.attention_bias || c.use_bias,
        };
        let moe = moe(&c, &model_type)?;
        if moe.is_some() {
            refuse_moe_options(&raw)?;
        }
        Ok(Self {
            norm_adds_one: gemma,
            scale_embeddings: gemma,
            activation,
            norms: match (
                gemma,
                model_type.starts_with("olmo") && model_type != "olmoe",
            ) {
                (true, _) => LayerNorms::Sandwich,
                (false, true) => LayerNorms::Post,
                (false, false) => LayerNorms::Pre,
            },
            attention_scale,
            attn_softcap,
            final_softcap,
            embedding_multiplier: multiplier(c.embedding_multiplier),
            residual_multiplier: multiplier(c.residual_multiplier),
            logits_scaling: multiplier(c.logits_scaling),
            layer_windows,
            layer_rope: layer_rope(&c, model_type == "smollm3")?,
            rope_linear_factor,
            local_rope_theta,
            longrope,
            yarn,
            query_scaling,
            fused_projections: phi3,
            moe,
            attention_sinks: gpt_oss,
            latent_attention,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads,
            head_dim,
            rotary_dim,
            rope_interleaved: model_type.starts_with("ernie4_5"),
            vocab_size: c.vocab_size,
            // The class's default, which transformers 5 leaves out of the files it writes.
            rms_norm_eps: c.rms_norm_eps.unwrap_or(match model_type.as_str() {
                "phi3" | "olmo2" | "olmo3" | "olmoe" | "mixtral" | "glm4_moe" | "ernie4_5_moe" => {
                    1e-5
                }
                _ => 1e-6,
            }),
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            // transformers leaves out values equal to the class's defaults: Gemma's and
            // SmolLM3's are tied.
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(
                gemma || ["smollm3", "ernie4_5", "ernie4_5_moe"].contains(&model_type.as_str()),
            ),
            qkv_bias,
            // GLM-4.5's attention_bias leaves o_proj without one.
            o_bias: (c.attention_bias && !glm4_moe) || c.use_bias,
            mlp_bias: c.mlp_bias || c.use_bias,
            qk_norm: match model_type.as_str() {
                "qwen3" | "qwen3_moe" | "qwen3_vl_text" | "qwen3_vl_moe_text" | "gemma3_text" => {
                    QkNorm::PerHead
                }
                "olmo2" | "olmo3" | "olmoe" => QkNorm::Projection,
                "glm4_moe" if c.use_qk_norm == Some(true) => QkNorm::PerHead,
                _ => QkNorm::None,
            },
            model_type,
            raw,
            image_text: None,
        })
    }

    /// The sizes of the query and key norms' scales, when the model norms them.
    pub fn qk_norm_sizes(&self) -> Option<[usize; 2]> {
        let hd = self.head_dim;
        match self.qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead => Some([hd, hd]),
            QkNorm::Projection => {
                Some([self.num_attention_heads * hd, self.num_key_value_heads * hd])
            }
        }
    }

    /// The linear layers of decoder layer `layer`, in checkpoint order: q, k, v, o, gate, up
    /// and down (Phi-3: qkv, o, gate_up and down; a mixture-of-experts layer: q, k, v, o and
    /// Qwen2-MoE's shared expert with its gate, the experts and router being no linear layers
    /// to transformers 5 and HF PEFT). The one description of them that the loader, the module
    /// paths and the shapes of a new model follow.
    pub fn layer_linears(&self, layer: usize) -> Vec<LayerLinear> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let (qkv, o, mlp) = (self.qkv_bias, self.o_bias, self.mlp_bias);
        let linear = |name, out, inp, bias| LayerLinear {
            name,
            out,
            inp,
            bias,
        };
        if self.fused_projections {
            return vec![
                linear("self_attn.qkv_proj", q + 2 * kv, h, qkv),
                linear("self_attn.o_proj", h, q, o),
                linear("mlp.gate_up_proj", 2 * i, h, mlp),
                linear("mlp.down_proj", h, i, mlp),
            ];
        }
        let mut linears = match &self.latent_attention {
            Some(m) => {
                let heads = self.num_attention_heads;
                let bias = self.o_bias;
                let mut attn = match m.q_lora_rank {
                    Some(r) => vec![
                        linear("self_attn.q_a_proj", r, h, bias),
                        linear("self_attn.q_b_proj", q, r, false),
                    ],
                    None => vec![linear("self_attn.q_proj", q, h, false)],
                };
                let kv_b = heads * (m.qk_nope_head_dim + m.v_head_dim);
                attn.extend([
                    linear(
                        "self_attn.kv_a_proj_with_mqa",
                        m.kv_lora_rank + m.qk_rope_head_dim,
                        h,
                        bias,
                    ),
                    linear("self_attn.kv_b_proj", kv_b, m.kv_lora_rank, false),
                    linear("self_attn.o_proj", h, heads * m.v_head_dim, bias),
                ]);
                attn
            }
            None => vec![
                linear("self_attn.q_proj", q, h, qkv),
                linear("self_attn.k_proj", kv, h, qkv),
                linear("self_attn.v_proj", kv, h, qkv),
                linear("self_attn.o_proj", h, q, o),
            ],
        };
        match self.sparse_moe(layer) {
            Some(moe) => {
                if let Some(s) = moe.shared_expert_size {
                    match moe.shared_expert_paths() {
                        ("mlp.shared_experts", _) => linears.extend([
                            linear("mlp.shared_experts.gate_proj", s, h, false),
                            linear("mlp.shared_experts.up_proj", s, h, false),
                            linear("mlp.shared_experts.down_proj", h, s, false),
                        ]),
                        _ => linears.extend([
                            linear("mlp.shared_expert.gate_proj", s, h, false),
                            linear("mlp.shared_expert.up_proj", s, h, false),
                            linear("mlp.shared_expert.down_proj", h, s, false),
                            linear("mlp.shared_expert_gate", 1, h, false),
                        ]),
                    }
                }
            }
            None => linears.extend([
                linear("mlp.gate_proj", i, h, mlp),
                linear("mlp.up_proj", i, h, mlp),
                linear("mlp.down_proj", h, i, mlp),
            ]),
        }
        linears
    }

    /// The names of the attention's linear layers (`q_proj`, `k_proj`, `v_proj`, `o_proj`;
    /// Phi-3's `qkv_proj` and `o_proj`; latent attention's own), as target modules name them.
    pub fn attention_projections(&self) -> Vec<String> {
        self.layer_linears(0)
            .iter()
            .filter_map(|l| l.name.strip_prefix("self_attn."))
            .map(str::to_string)
            .collect()
    }

    /// The mixture-of-experts block of layer `layer`, when it has one.
    pub fn sparse_moe(&self, layer: usize) -> Option<&Moe> {
        self.moe
            .as_ref()
            .filter(|m| m.sparse_layers.get(layer).copied().unwrap_or(false))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(raw).with_context(|| format!("in {}", path.display()))
    }

    /// Inverse frequencies of RoPE, one per pair of head dims (of the global layers), for
    /// sequences within the pretrained length; 0 for the pairs past the rotated dims (see
    /// [`Self::rotary_dim`]), which then pass as they are.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        self.padded(self.rotated_inv_freq())
    }

    /// `freqs` of the rotated pairs, then a 0 for every pair of head dims that is not rotated.
    fn padded(&self, mut freqs: Vec<f32>) -> Vec<f32> {
        freqs.resize(self.head_dim / 2, 0.0);
        freqs
    }

    /// [`Self::rope_inv_freq`] of the rotated pairs.
    fn rotated_inv_freq(&self) -> Vec<f32> {
        if let Some(l) = &self.longrope {
            return long_rope_inv_freq(self.rope_theta, self.rotary_dim, &l.short_factor);
        }
        let base = default_inv_freq(self.rope_theta, self.rotary_dim);
        if let Some(factor) = self.rope_linear_factor {
            return base.into_iter().map(|f| f / factor as f32).collect();
        }
        if let Some(y) = &self.yarn {
            return y.inv_freq(self.rope_theta, self.rotary_dim);
        }
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        let factor = s.factor as f32;
        let (low, high) = (s.low_freq_factor as f32, s.high_freq_factor as f32);
        let old_ctx = s.original_max_position_embeddings as f32;
        let low_wavelen = old_ctx / low;
        let high_wavelen = old_ctx / high;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / factor
                } else {
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
    }

    /// Inverse frequencies of RoPE on the sliding-window layers, when they differ from
    /// [`Self::rope_inv_freq`] (Gemma 3's local base).
    pub fn local_rope_inv_freq(&self) -> Option<Vec<f32>> {
        let theta = self.local_rope_theta?;
        let local = default_inv_freq(theta, self.head_dim);
        // OLMo 3's sliding layers name the global base: without scaling, their tables are the
        // global layers' (not built twice a forward).
        let same = local == self.rope_inv_freq() && self.rope_attention_factor() == 1.0;
        (!same).then_some(local)
    }

    /// The scale of the global layers' cos and sin: LongRoPE's or YaRN's attention factor, else 1.
    pub fn rope_attention_factor(&self) -> f64 {
        match (&self.longrope, &self.yarn) {
            (Some(l), _) => l.attention_factor,
            (None, Some(y)) => y.attention_factor(),
            (None, None) => 1.0,
        }
    }

    /// LongRoPE's inverse frequencies for sequences past the original context (its long
    /// factors), when the model has LongRoPE.
    pub fn long_rope_inv_freq(&self) -> Option<Vec<f32>> {
        let l = self.longrope.as_ref()?;
        let freqs = long_rope_inv_freq(self.rope_theta, self.rotary_dim, &l.long_factor);
        Some(self.padded(freqs))
    }
}

/// LongRoPE's default attention factor for a context grown `scale` times from `original`
/// positions, `sqrt(1 + ln(scale) / ln(original))` (1 when it did not grow): transformers'
/// default, and what llama.cpp's converter always writes.
pub(crate) fn long_rope_attention_factor(scale: f64, original: usize) -> f64 {
    match scale > 1.0 {
        true => (1.0 + scale.ln() / (original as f64).ln()).sqrt(),
        false => 1.0,
    }
}

/// LongRoPE's settings from the rope parameters `r` (the config's `original_max_position_
/// embeddings` wins, as in transformers), its attention factor defaulting to
/// `sqrt(1 + ln(factor) / ln(original))` with factor the context's growth.
fn long_rope(c: &RawConfig, r: &Value, rotary_dim: usize) -> Result<LongRope> {
    let factors = |key: &str| -> Result<Vec<f32>> {
        let values = r
            .get(key)
            .and_then(Value::as_array)
            .with_context(|| format!("longrope scaling lacks its {key}"))?;
        let factors: Option<Vec<f32>> = values.iter().map(|v| Some(v.as_f64()? as f32)).collect();
        let factors = factors.with_context(|| format!("longrope {key} must list numbers"))?;
        if factors.len() != rotary_dim / 2 {
            bail!(
                "longrope {key} has {} values, expected {} (one per rotated pair of head dims)",
                factors.len(),
                rotary_dim / 2
            );
        }
        Ok(factors)
    };
    // transformers' Phi3Config default where neither names it.
    let original = original_context(c, r).unwrap_or(4096);
    let factor = r
        .get("factor")
        .and_then(Value::as_f64)
        .unwrap_or(c.max_position_embeddings as f64 / original as f64);
    let attention_factor = r
        .get("attention_factor")
        .and_then(Value::as_f64)
        .unwrap_or_else(|| long_rope_attention_factor(factor, original));
    Ok(LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

/// The pretrained context of a scaled RoPE: the config's top-level
/// `original_max_position_embeddings`, else the rope parameters' `r` (transformers lets the
/// top-level one win).
fn original_context(c: &RawConfig, r: &Value) -> Option<usize> {
    c.original_max_position_embeddings
        .or_else(|| Some(r.get("original_max_position_embeddings")?.as_u64()? as usize))
}

/// YaRN's settings from the rope parameters `r`: `factor` (null: the context's growth,
/// `max_position_embeddings / original`), the pretrained context (the config's top-level
/// `original_max_position_embeddings`, else the parameters', else `max_position_embeddings`,
/// as transformers' `standardize_rope_params` picks it) and the optional ones.
fn yarn_scaling(c: &RawConfig, r: &Value) -> Result<Yarn> {
    let number = |key: &str| -> Result<Option<f64>> {
        match r.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => bail!("yarn rope scaling: {key} is not a number: {v}"),
            },
        }
    };
    let original = original_context(c, r).unwrap_or(c.max_position_embeddings);
    if original == 0 {
        bail!("yarn rope scaling: original_max_position_embeddings is 0");
    }
    if r.get("factor").is_none() {
        bail!("rope scaling of type yarn lacks its factor");
    }
    let factor = number("factor")?.unwrap_or(c.max_position_embeddings as f64 / original as f64);
    if factor <= 0.0 {
        bail!("yarn rope scaling: factor {factor} is not positive");
    }
    Ok(Yarn {
        factor,
        original_max_position_embeddings: original,
        attention_factor: number("attention_factor")?,
        mscale: number("mscale")?,
        mscale_all_dim: number("mscale_all_dim")?,
        beta_fast: number("beta_fast")?,
        beta_slow: number("beta_slow")?,
        truncate: r.get("truncate").and_then(Value::as_bool).unwrap_or(true),
    })
}

/// LongRoPE's inverse frequencies `1 / (factor_i · theta^(2i/d))`, in f32 as transformers
/// computes them.
fn long_rope_inv_freq(theta: f64, rotary_dim: usize, factors: &[f32]) -> Vec<f32> {
    theta_powers(theta, rotary_dim)
        .zip(factors)
        .map(|(power, f)| 1.0 / (f * power))
        .collect()
}

/// RoPE's inverse frequencies `theta^(-2i/d)`, rounded as transformers rounds them (float32
/// tensors: the exponent in f32, the power rounded to f32, then the reciprocal): some differ
/// from the exact values in the last bit, and models with large attention scores amplify that.
fn default_inv_freq(theta: f64, rotary_dim: usize) -> Vec<f32> {
    theta_powers(theta, rotary_dim)
        .map(|power| 1.0 / power)
        .collect()
}

/// `theta^(2i/d)` for each pair of the `d` rotated head dims, the exponent in f32 and the
/// power rounded to f32 (as transformers' float32 tensors hold them).
fn theta_powers(theta: f64, rotary_dim: usize) -> impl Iterator<Item = f32> {
    (0..rotary_dim / 2).map(move |i| {
        let exponent = (2 * i) as f32 / rotary_dim as f32;
        theta.powf(exponent as f64) as f32
    })
}

/// Which layers rotate by RoPE: SmolLM3's `no_rope_layers` (1: RoPE, 0: none), by default
/// every `no_rope_layer_interval`-th layer (4) without; every layer elsewhere.
/// The mixture-of-experts block of a MoE model type, with its class defaults where the config
/// leaves a field out; `None` for a dense model.
fn moe(c: &RawConfig, model_type: &str) -> Result<Option<Moe>> {
    // (experts, top_k, expert size, shared expert size, norm_topk_prob, aux loss coefficient)
    // by default.
    let (experts, top_k, size, shared, norm, coef) = match model_type {
        "mixtral" => (8, 2, c.intermediate_size, None, true, 0.001),
        "qwen2_moe" => (60, 4, 1408, Some(5632), false, 0.001),
        "qwen3_moe" => (128, 8, 768, None, false, 0.001),
        "qwen3_vl_moe_text" => (60, 4, 1408, None, true, 0.001),
        "olmoe" => (64, 8, c.intermediate_size, None, false, 0.01),
        // gpt-oss: the softmax of the top-k logits, the renormalized top-k probabilities.
        "gpt_oss" => (128, 4, c.intermediate_size, None, true, 0.001),
        // GLM-4.5's shared experts: n_shared_experts of moe_intermediate_size; no aux loss.
        "glm4_moe" => {
            let size = c.moe_intermediate_size.unwrap_or(1408);
            let shared = size * c.n_shared_experts.unwrap_or(1);
            (128, 8, size, Some(shared), true, 0.0)
        }
        // DeepSeek-V2's: two shared experts; weights never renormalized; no aux loss.
        "deepseek_v2" => {
            let size = c.moe_intermediate_size.unwrap_or(1407);
            let shared = size * c.n_shared_experts.unwrap_or(2);
            (64, 6, size, Some(shared), false, 0.0)
        }
        // DeepSeek-V3's and GLM-4.7-Flash's: GLM-4.5's routing and shared experts.
        "deepseek_v3" | "glm4_moe_lite" => {
            let size = c.moe_intermediate_size.unwrap_or(1536);
            let shared = size * c.n_shared_experts.unwrap_or(1);
            (64, 4, size, Some(shared), true, 0.0)
        }
        // ERNIE 4.5's: moe_num_shared_experts of moe_intermediate_size; weights always
        // renormalized.
        "ernie4_5_moe" => {
            let size = c.moe_intermediate_size.unwrap_or(1536);
            let shared = size * c.n_shared_experts.unwrap_or(2);
            (64, 6, size, Some(shared), true, 0.001)
        }
        _ => return Ok(None),
    };
    if model_type == "ernie4_5_moe" && c.use_bias {
        bail!("ERNIE 4.5 MoE with biases (use_bias: true) is not supported");
    }
    let num_experts = c.num_experts.unwrap_or(experts);
    let top_k = c.num_experts_per_tok.unwrap_or(top_k);
    if num_experts == 0 || top_k == 0 || top_k > num_experts {
        bail!("config.json: num_experts_per_tok {top_k} is not between 1 and num_experts {num_experts}");
    }
    let qwen = model_type.starts_with("qwen");
    let glm = matches!(
        model_type,
        "glm4_moe" | "deepseek_v3" | "glm4_moe_lite" | "deepseek_v2"
    );
    let ernie = model_type == "ernie4_5_moe";
    let step = c.decoder_sparse_step.unwrap_or(1).max(1);
    let dense = c.mlp_only_layers.clone().unwrap_or_default();
    // GLM-4.5's first `first_k_dense_replace` layers are dense.
    let first_sparse = match glm {
        true => c.first_k_dense_replace.unwrap_or(match model_type {
            "deepseek_v3" => 3,
            "deepseek_v2" => 0,
            _ => 1,
        }),
        false => 0,
    };
    // ERNIE 4.5's from moe_layer_start_index to moe_layer_end_index (-1: the last), every
    // moe_layer_interval-th.
    let last = c.num_hidden_layers as i64 - 1;
    let ernie_sparse = |l: usize| {
        let (start, interval) = (
            c.moe_layer_start_index.unwrap_or(1),
            c.moe_layer_interval.unwrap_or(1).max(1),
        );
        let end = c.moe_layer_end_index.filter(|&e| e != -1).unwrap_or(last);
        (l + 1).is_multiple_of(interval) && l as i64 >= start && l as i64 <= end
    };
    let sparse_layers = match &c.mlp_layer_types {
        // GLM-4.7-Flash's names each layer's.
        Some(types) if types.len() != c.num_hidden_layers => bail!(
            "config.json: mlp_layer_types has {} entries for {} layers",
            types.len(),
            c.num_hidden_layers
        ),
        Some(types) => types.iter().map(|t| t == "sparse").collect(),
        None => (0..c.num_hidden_layers)
            .map(|l| match ernie {
                true => ernie_sparse(l),
                false => {
                    l >= first_sparse && (!qwen || (!dense.contains(&l) && (l + 1) % step == 0))
                }
            })
            .collect(),
    };
    let v2 = model_type == "deepseek_v2";
    let scoring = match glm {
        true => {
            let (mut n_group, mut topk_group) = (c.n_group.unwrap_or(1), c.topk_group.unwrap_or(1));
            // DeepSeek-V2's `greedy` takes the top-k of all experts.
            let method = c.topk_method.as_deref().unwrap_or("greedy");
            if v2 && method == "greedy" {
                (n_group, topk_group) = (1, 1);
            }
            if n_group == 0
                || !num_experts.is_multiple_of(n_group)
                || topk_group == 0
                || topk_group > n_group
            {
                bail!("config.json: n_group {n_group} and topk_group {topk_group} do not split {num_experts} experts");
            }
            if top_k > topk_group * (num_experts / n_group) {
                bail!("config.json: num_experts_per_tok {top_k} is more than the experts of topk_group {topk_group} groups");
            }
            let scale = c.routed_scaling_factor.unwrap_or(1.0);
            match (v2, method) {
                (true, "greedy" | "group_limited_greedy") => Scoring::LimitedSoftmax {
                    n_group,
                    topk_group,
                    scale,
                },
                (true, other) => bail!(
                    "DeepSeek-V2's topk_method {other:?} is not supported (greedy, group_limited_greedy)"
                ),
                (false, _) => Scoring::Sigmoid {
                    n_group,
                    topk_group,
                    scale,
                },
            }
        }
        false => Scoring::Softmax,
    };
    if v2 && c.mlp_bias {
        bail!("DeepSeek-V2 with MLP biases (mlp_bias: true) is not supported");
    }
    let mixtral = model_type == "mixtral";
    let gpt_oss = model_type == "gpt_oss";
    Ok(Some(Moe {
        num_experts,
        top_k,
        expert_size: match mixtral || gpt_oss || model_type == "olmoe" {
            true => c.intermediate_size,
            false => c.moe_intermediate_size.unwrap_or(size),
        },
        // Mixtral, Qwen3-VL-MoE and gpt-oss always renormalize over the chosen experts.
        scoring,
        choice_bias: match model_type {
            "glm4_moe" | "deepseek_v3" | "glm4_moe_lite" => Some(ChoiceBias::Router),
            "ernie4_5_moe" => Some(ChoiceBias::MoeStatics),
            _ => None,
        },
        // DeepSeek-V2's router never renormalizes, whatever its config says.
        norm_topk_prob: !v2
            && (ernie
                || mixtral
                || gpt_oss
                || model_type == "qwen3_vl_moe_text"
                || c.norm_topk_prob.unwrap_or(norm)),
        shared_expert_size: match glm || ernie {
            true => shared.filter(|_| c.n_shared_experts != Some(0)),
            false => shared.map(|s| c.shared_expert_intermediate_size.unwrap_or(s)),
        },
        sparse_layers,
        block: match mixtral {
            true => "block_sparse_moe",
            false => "mlp",
        },
        expert_projections: match mixtral {
            true => ["w1", "w3", "w2"],
            false => ["gate_proj", "up_proj", "down_proj"],
        },
        router: match gpt_oss {
            true => "router",
            false => "gate",
        },
        biases: gpt_oss,
        router_aux_loss_coef: c.router_aux_loss_coef.unwrap_or(coef),
        storage: match model_type {
            "qwen3_vl_moe_text" => ExpertStorage::Stacked,
            "gpt_oss" => ExpertStorage::GptOss,
            _ => ExpertStorage::PerExpert,
        },
    }))
}

/// GptOssConfig's RoPE where a file names none: YaRN from 4096 positions, 32 times longer.
fn gpt_oss_default_rope() -> Value {
    serde_json::json!({
        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": false, "original_max_position_embeddings": 4096,
    })
}

/// DeepSeek-V3's latent attention, for the model types that have it.
fn latent_attention(c: &RawConfig, model_type: &str) -> Result<Option<LatentAttention>> {
    if !matches!(model_type, "deepseek_v3" | "glm4_moe_lite" | "deepseek_v2") {
        return Ok(None);
    }
    let dims = (
        c.kv_lora_rank.unwrap_or(512),
        c.qk_nope_head_dim.unwrap_or(128),
        c.qk_rope_head_dim.unwrap_or(64),
        c.v_head_dim.unwrap_or(128),
    );
    let (kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim) = dims;
    if qk_rope_head_dim == 0 || qk_rope_head_dim % 2 == 1 || kv_lora_rank == 0 {
        bail!("config.json: qk_rope_head_dim {qk_rope_head_dim} is not even, or kv_lora_rank is 0");
    }
    if v_head_dim > qk_nope_head_dim + qk_rope_head_dim {
        bail!("latent attention with values wider than the query-key heads (v_head_dim {v_head_dim}) is not supported");
    }
    Ok(Some(LatentAttention {
        q_lora_rank: c.q_lora_rank,
        kv_lora_rank,
        qk_nope_head_dim,
        qk_rope_head_dim,
        v_head_dim,
        // DeepSeek-V2 rotates adjacent pairs as complex numbers, always.
        rope_interleave: c.rope_interleave.unwrap_or(true) || model_type == "deepseek_v2",
    }))
}

/// MoE settings whose training behaviour is not implemented, refused by name.
fn refuse_moe_options(raw: &Value) -> Result<()> {
    if let Some(noise) = raw
        .get("router_jitter_noise")
        .and_then(Value::as_f64)
        .filter(|n| *n > 0.0)
    {
        bail!("router jitter noise (router_jitter_noise {noise}) is not supported");
    }
    if let Some(clip) = raw.get("clip_qkv").filter(|v| !v.is_null()) {
        bail!("clipping of the queries, keys and values (clip_qkv {clip}) is not supported");
    }
    Ok(())
}

fn layer_rope(c: &RawConfig, smollm3: bool) -> Result<Vec<bool>> {
    let n = c.num_hidden_layers;
    if !smollm3 {
        return Ok(vec![true; n]);
    }
    match &c.no_rope_layers {
        Some(flags) if flags.len() != n => bail!(
            "config.json: no_rope_layers has {} entries for {n} layers",
            flags.len()
        ),
        Some(flags) => Ok(flags.iter().map(|&f| f != 0).collect()),
        None => {
            let interval = c.no_rope_layer_interval.unwrap_or(SMOLLM3_NO_ROPE_INTERVAL);
            Ok(all_but_every(n, interval))
        }
    }
}

/// The window per layer of Gemma, OLMo 3 and Ministral: `layer_types` where the file has them, else
/// every `sliding_window_pattern`-th layer global, by default every `pattern`-th (Gemma 2:
/// every other one, the first sliding; Gemma 3: every sixth; OLMo 3: every fourth), and the
/// others sliding (transformers' default).
fn sliding_layer_windows(c: &RawConfig, pattern: usize) -> Result<Vec<Option<usize>>> {
    let window = c.sliding_window.unwrap_or(4096);
    let sliding = match &c.layer_types {
        Some(types) => {
            if types.len() != c.num_hidden_layers {
                bail!(
                    "config.json: layer_types has {} entries for {} layers",
                    types.len(),
                    c.num_hidden_layers
                );
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(false),
                    "sliding_attention" => Ok(true),
                    other => bail!("config.json: unknown layer type {other:?}"),
                })
                .collect::<Result<Vec<bool>>>()?
        }
        None => all_but_every(
            c.num_hidden_layers,
            c.sliding_window_pattern.unwrap_or(pattern),
        ),
    };
    Ok(sliding.into_iter().map(|s| s.then_some(window)).collect())
}

/// Gemma 3's default layer pattern (transformers' and llama.cpp's): every sixth layer global.
pub(crate) const GEMMA3_SLIDING_PATTERN: usize = 6;
/// Gemma 2's: every other layer global, the first one sliding.
pub(crate) const GEMMA2_SLIDING_PATTERN: usize = 2;
/// OLMo 3's (transformers' default and llama.cpp's): every fourth layer global.
pub(crate) const OLMO3_SLIDING_PATTERN: usize = 4;
/// SmolLM3's (transformers' default and llama.cpp's rule): every fourth layer without RoPE.
pub(crate) const SMOLLM3_NO_ROPE_INTERVAL: usize = 4;

/// For each of `layers` layers, true but for every `nth` one (layers `nth - 1`, `2·nth - 1`,
/// ...): the sliding layers of a Gemma pattern, the rotated layers of SmolLM3's.
pub(crate) fn all_but_every(layers: usize, nth: usize) -> Vec<bool> {
    let nth = nth.max(1);
    (0..layers).map(|i| (i + 1) % nth != 0).collect()
}
