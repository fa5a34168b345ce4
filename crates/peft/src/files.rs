//! Adapter folder I/O shared by every method: reading `adapter_config.json`, writing it with
//! sorted keys, and writing the folder (weights with `format=pt` metadata, atomically).

use crate::model::{CONFIG_FILE, WEIGHTS_FILE};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use peft_models::io::{load_weights, save_safetensors, write_atomic};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The PyTorch weights file PEFT wrote before safetensors became its default (and still
/// writes with `safe_serialization=False`).
pub const PYTORCH_WEIGHTS_FILE: &str = "adapter_model.bin";

/// The adapter weights in `dir` and the file they came from: `adapter_model.safetensors`, or
/// else `adapter_model.bin`, the order in which HF PEFT looks for them.
pub fn read_adapter_weights(
    dir: &Path,
    device: &Device,
) -> Result<(PathBuf, HashMap<String, Tensor>)> {
    for name in [WEIGHTS_FILE, PYTORCH_WEIGHTS_FILE] {
        let path = dir.join(name);
        if path.exists() {
            let tensors = load_weights(&path, device)?
                .into_iter()
                .map(|(key, t)| (crate::keys::in_current_layout(key), t))
                .collect();
            return Ok((path, tensors));
        }
    }
    bail!(
        "no {WEIGHTS_FILE} (or {PYTORCH_WEIGHTS_FILE}) in {}",
        dir.display()
    )
}

/// Parses a JSON config file, with one-line errors for a missing or malformed file.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    parse_config(&read_text(path)?, path)
}

/// A config file's text, with a one-line error when it is missing or not UTF-8.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Parses config JSON read from `source` (named in the one-line error).
pub fn parse_config<T: DeserializeOwned>(text: &str, source: &Path) -> Result<T> {
    serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("{} is malformed: {e}", source.display()))
}

/// Parses config JSON read from `source` and checks it with `validate`; both kinds of error
/// name `source`.
pub fn parse_validated<T: DeserializeOwned>(
    text: &str,
    source: &Path,
    validate: impl FnOnce(&T) -> Result<()>,
) -> Result<T> {
    let config: T = parse_config(text, source)?;
    validate(&config).with_context(|| format!("in {}", source.display()))?;
    Ok(config)
}

/// What every method's `adapter_config.json` has in common: read and checked on load, and on
/// save marked for inference and given the base model's name where it names none, as PEFT's
/// `save_pretrained` writes it.
pub trait AdapterConfig: Serialize + DeserializeOwned + Clone {
    /// Checks a parsed config for what peft-rs cannot load or train.
    fn validate(&self) -> Result<()>;
    /// The config's `inference_mode` and `base_model_name_or_path`.
    fn saved_fields(&mut self) -> (&mut bool, &mut Option<String>);

    fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(&read_text(path)?, path)
    }

    /// Parses and validates config JSON read from `source` (named in errors).
    fn from_json(text: &str, source: &Path) -> Result<Self> {
        parse_validated(text, source, Self::validate)
    }

    /// JSON with sorted keys, as PEFT writes it.
    fn to_json_string(&self) -> Result<String> {
        sorted_json(self)
    }

    /// The config to save beside weights trained on `base_model_name`.
    fn for_saving(&self, base_model_name: &str) -> Self {
        let mut config = self.clone();
        let (inference_mode, base_model) = config.saved_fields();
        *inference_mode = true;
        base_model.get_or_insert_with(|| base_model_name.to_string());
        config
    }
}

/// Pretty JSON with sorted keys, as PEFT writes its configs.
pub fn sorted_json(config: &impl Serialize) -> Result<String> {
    peft_models::io::sorted_pretty_json(config)
}

/// Detached copies of trainable tensors, for saving.
pub fn detached(trainable: Vec<(String, Var)>) -> Vec<(String, Tensor)> {
    trainable
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().detach()))
        .collect()
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir`, each atomically.
pub fn write_adapter(dir: &Path, tensors: &[(String, Tensor)], config_json: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors(&dir.join(WEIGHTS_FILE), tensors, Some(meta))?;
    write_atomic(&dir.join(CONFIG_FILE), config_json.as_bytes())
}
