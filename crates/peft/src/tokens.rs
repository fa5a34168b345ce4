//! Trainable tokens: only the embedding rows of some tokens train (new or never-trained special
//! tokens), as HF PEFT's `TrainableTokensConfig` (`peft_type: "TRAINABLE_TOKENS"`) and LoRA's
//! `trainable_token_indices` do. The rows replace the embedding's for those tokens in the
//! input and, where the head is tied to the embedding, in the head ([`TokenRows`]).

use crate::files::AdapterConfig;
use crate::files::{read_adapter_weights, write_adapter};
use crate::keys::file_key;
use crate::model::CONFIG_FILE;
use crate::Tuned;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use peft_models::config::{CAUSAL_LM_DECODER, IMAGE_TEXT_DECODER};
use peft_models::{Llama, TokenRows};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The input embedding's module path in a causal LM.
const CAUSAL_LM_EMBEDDING: &str = "model.embed_tokens";

/// The input embedding's module path in `base`.
pub(crate) fn embedding_path(base: &Llama) -> String {
    format!("{}.embed_tokens", base.config.decoder_path())
}
/// The rows' key under the embedding as LoRA's `trainable_token_indices` saves them.
pub(crate) const LORA_ROWS: &str = "token_adapter.trainable_tokens_delta";
/// The rows' key under a module as the trainable-tokens method saves them.
const ROWS: &str = "trainable_tokens_delta";

/// Token ids as HF PEFT lists them: distinct, in the order of the saved rows.
pub(crate) fn parse_token_ids(list: &Value, what: &str) -> Result<Vec<u32>> {
    let ids: Option<Vec<u32>> = list.as_array().and_then(|items| {
        items
            .iter()
            .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect()
    });
    let ids = ids.with_context(|| format!("{what} must list token ids, got {list}"))?;
    if ids.is_empty() {
        bail!("{what} lists no token");
    }
    let mut seen = HashSet::new();
    if let Some(t) = ids.iter().find(|t| !seen.insert(**t)) {
        bail!("{what} lists token {t} twice");
    }
    Ok(ids)
}

/// Where HF PEFT saves the embedding (and head) of a grown vocabulary beside an adapter: as the
/// modules' own weights (`save_embedding_layers`: tokens added, the embedding resized), or,
/// with `trainable_token_indices` (TRL's recipe for added tokens: resize, then train their
/// rows), as the token adapter's base layer, a tied head's copy of the rows beside it.
pub(crate) const GROWN_EMBEDDING: &str = "weight";
pub(crate) const TOKEN_ADAPTER_BASE: &str = "token_adapter.base_layer.weight";

/// Takes from `tensors` (an adapter file's, `source`) the embedding saved as `layer` (one of
/// the two above) with its head (there, else an untied head's own weight), into `base`, at
/// their size, so that the rows of the new tokens have a place.
pub(crate) fn take_grown_embeddings(
    base: &mut Llama,
    tensors: &mut HashMap<String, Tensor>,
    source: &Path,
    layer: &str,
) -> Result<()> {
    let embed_key = file_key(&embedding_path(base), layer);
    let Some(embed) = tensors.remove(&embed_key) else {
        return Ok(());
    };
    let head = tensors
        .remove(&file_key("lm_head", layer))
        .or_else(|| tensors.remove(&file_key("lm_head", GROWN_EMBEDDING)));
    if layer == TOKEN_ADAPTER_BASE && base.lm_head.is_none() {
        // The tied head's rows are the embedding's.
        tensors.remove(&file_key("lm_head", LORA_ROWS));
    }
    base.replace_embeddings(&embed, head.as_ref())
        .with_context(|| format!("{}: {embed_key}", source.display()))?;
    base.vocab_grown = true;
    Ok(())
}

/// Whether `module` names the input embedding (by its name or its path).
pub(crate) fn names_embedding(module: &str) -> bool {
    [CAUSAL_LM_DECODER, IMAGE_TEXT_DECODER]
        .iter()
        .any(|d| module.strip_prefix(d) == Some(".embed_tokens"))
        || module == "embed_tokens"
}

/// Gives `base` trainable rows for `indices` (checked against its vocabulary), each starting
/// as the token's own row or, without `own_rows`, as N(0, 1) draws from `seed`; returns the
/// variable that holds them.
pub(crate) fn attach_token_rows(
    base: &mut Llama,
    indices: Vec<u32>,
    own_rows: bool,
    seed: u64,
) -> Result<Var> {
    let vocab = base.config.vocab_size;
    if let Some(bad) = indices.iter().find(|&&t| t as usize >= vocab) {
        bail!("trainable tokens: token {bad} is outside the vocabulary (size {vocab})");
    }
    let start = match own_rows {
        true => {
            let ids = Tensor::new(indices.as_slice(), &base.device)?;
            base.embed_tokens
                .index_select(&ids, 0)?
                .to_dtype(DType::F32)?
        }
        // torch.randn's distribution (not its draws).
        false => {
            let shape = (indices.len(), base.config.hidden_size);
            let mut rng = StdRng::seed_from_u64(seed);
            let values: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            Tensor::from_vec(values, shape, &base.device)?
        }
    };
    let var = Var::from_tensor(&start)?;
    base.token_rows = Some(TokenRows {
        indices,
        rows: var.as_tensor().clone(),
    });
    Ok(var)
}

/// HF PEFT's `TrainableTokensConfig`, as written to and read from `adapter_config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokensConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    /// The tokens whose rows train, in the order of the saved rows.
    pub token_indices: Value,
    /// The embedding (HF PEFT's default: the model's input embedding).
    #[serde(default = "default_target")]
    pub target_modules: Value,
    /// Rows start as the tokens' own (true) or random (false).
    #[serde(default = "yes")]
    pub init_weights: bool,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn default_peft_type() -> String {
    "TRAINABLE_TOKENS".into()
}
fn default_target() -> Value {
    Value::String(CAUSAL_LM_EMBEDDING.into())
}
fn yes() -> bool {
    true
}

impl TokensConfig {
    pub fn new(token_indices: &[u32]) -> Self {
        Self {
            peft_type: default_peft_type(),
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            token_indices: Value::from(token_indices.to_vec()),
            target_modules: default_target(),
            init_weights: true,
            other: Map::new(),
        }
    }

    pub fn indices(&self) -> Result<Vec<u32>> {
        parse_token_ids(&self.token_indices, "token_indices")
    }
}

impl AdapterConfig for TokensConfig {
    fn saved_fields(&mut self) -> (&mut bool, &mut Option<String>) {
        (&mut self.inference_mode, &mut self.base_model_name_or_path)
    }

    fn validate(&self) -> Result<()> {
        if self.peft_type != "TRAINABLE_TOKENS" {
            bail!(
                "adapter peft_type is {:?}, expected TRAINABLE_TOKENS",
                self.peft_type
            );
        }
        let embedding = match &self.target_modules {
            Value::String(m) => names_embedding(m),
            Value::Array(ms) => ms.iter().all(|m| m.as_str().is_some_and(names_embedding)),
            _ => false,
        };
        if !embedding {
            bail!(
                "trainable tokens: only the input embedding (embed_tokens) is supported as target_modules, got {}",
                self.target_modules
            );
        }
        self.indices().map(|_| ())
    }
}

/// A frozen base whose embedding rows of some tokens train.
pub struct TokensModel {
    pub base: Llama,
    pub config: TokensConfig,
    rows: Var,
}

impl TokensModel {
    pub fn new(mut base: Llama, mut config: TokensConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        // The embedding by its path in this model, so that HF PEFT finds it in an image-text
        // model too.
        if config.target_modules.as_str().is_some_and(names_embedding) {
            config.target_modules = Value::String(embedding_path(&base));
        }
        let rows = attach_token_rows(&mut base, config.indices()?, config.init_weights, seed)?;
        Ok(Self { base, config, rows })
    }

    /// Loads a trainable-tokens adapter folder onto `base`: the embedding's rows, and for a
    /// tied head the same rows under its key, as HF PEFT saves them.
    pub fn load(base: Llama, dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("adapter folder not found: {}", dir.display());
        }
        let mut config = TokensConfig::from_file(&dir.join(CONFIG_FILE))?;
        let (path, mut tensors) = read_adapter_weights(dir, &candle_core::Device::Cpu)?;
        let mut model = Self::new(base, config.clone(), 0)?;
        let key = file_key(&embedding_path(&model.base), ROWS);
        let rows = tensors
            .remove(&key)
            .with_context(|| format!("{}: missing {key}", path.display()))?;
        if rows.dims() != model.rows.dims() {
            bail!(
                "{}: {key} has shape {:?}, expected {:?}",
                path.display(),
                rows.dims(),
                model.rows.dims()
            );
        }
        let head_key = file_key("lm_head", ROWS);
        if let Some(head) = tensors.remove(&head_key) {
            // Tied: the head's rows are the embedding's.
            if model.base.lm_head.is_some() || head.dims() != rows.dims() {
                bail!(
                    "{}: {head_key} for a head that is not tied to the embedding",
                    path.display()
                );
            }
        }
        if let Some(key) = tensors.keys().next() {
            bail!("{}: unexpected tensor {key}", path.display());
        }
        model
            .rows
            .set(&rows.to_device(model.rows.device())?.to_dtype(DType::F32)?)?;
        config.inference_mode = true;
        model.config = config;
        Ok(model)
    }

    /// Writes the rows into the embedding and returns the plain model.
    pub fn merge_and_unload(mut self) -> Result<Llama> {
        self.base.merge_token_rows()?;
        Ok(self.base)
    }
}

impl Tuned for TokensModel {
    fn base(&self) -> &Llama {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Llama {
        &mut self.base
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        vec![(
            file_key(&embedding_path(&self.base), ROWS),
            self.rows.clone(),
        )]
    }
    fn save(&self, dir: &Path, base_model_name: &str) -> Result<()> {
        let config = self.config.for_saving(base_model_name);
        let rows = self.rows.as_tensor().detach();
        let mut tensors = vec![(file_key(&embedding_path(&self.base), ROWS), rows.clone())];
        if self.base.lm_head.is_none() {
            tensors.push((file_key("lm_head", ROWS), rows));
        }
        write_adapter(dir, &tensors, &config.to_json_string()?)
    }
    fn parameter_counts(&mut self) -> (usize, usize) {
        let t = self.rows.elem_count();
        (t, self.base.parameter_count() + t)
    }
}
