//! Adapter folders of any method, loaded by their `peft_type`, and several adapters on one base
//! that inference switches between, as HF PEFT's `load_adapter` / `set_adapter` /
//! `disable_adapter` / `delete_adapter` do.
//!
//! Each loaded adapter wraps its own copy of the base's module tree. The copies share every
//! base tensor (candle tensors are reference-counted), so an adapter costs its own weights
//! only, and switching is choosing another tree: nothing is patched or recomputed.

use crate::prompt::is_prompt_learning;
use crate::{BottleneckModel, Ia3Model, PeftModel, PromptModel, TokensModel, Tuned};
use anyhow::{bail, Result};
use candle_core::Tensor;
use peft_models::Llama;
use std::path::Path;

/// One loaded adapter folder.
// Every variant holds a whole model tree; the size difference is a few fields, and there are
// few adapters.
#[allow(clippy::large_enum_variant)]
pub enum Adapter {
    Lora(PeftModel),
    Ia3(Ia3Model),
    Bottleneck(BottleneckModel),
    /// Prompt tuning, P-tuning or prefix tuning.
    Prompt(PromptModel),
    /// Trainable tokens.
    Tokens(TokensModel),
}

impl Adapter {
    /// Loads the adapter folder `dir` (or, where no such folder exists, the Hub repository it
    /// names: see [`peft_models::hub`]) onto `base`, as its `adapter_config.json` names the
    /// method (LoRA when it names none).
    pub fn load(base: Llama, dir: &Path) -> Result<Self> {
        let dir = &peft_models::hub::locate(dir, peft_models::hub::Wanted::Adapter)?;
        Ok(match crate::adapter_type(dir)?.as_str() {
            t if is_prompt_learning(t) => Self::Prompt(PromptModel::load(base, dir)?),
            "IA3" => Self::Ia3(Ia3Model::load(base, dir)?),
            "BOTTLENECK" => Self::Bottleneck(BottleneckModel::load(base, dir)?),
            "TRAINABLE_TOKENS" => Self::Tokens(TokensModel::load(base, dir)?),
            _ => Self::Lora(PeftModel::load(base, dir)?),
        })
    }

    /// The method, as `adapter_config.json` names it.
    pub fn peft_type(&self) -> &str {
        match self {
            Self::Lora(_) => "LORA",
            Self::Ia3(_) => "IA3",
            Self::Bottleneck(_) => "BOTTLENECK",
            Self::Prompt(m) => &m.config.peft_type,
            Self::Tokens(_) => "TRAINABLE_TOKENS",
        }
    }

    /// The adapter as a model to train further.
    pub fn into_tuned(self) -> Box<dyn Tuned> {
        match self {
            Self::Lora(m) => Box::new(m),
            Self::Ia3(m) => Box::new(m),
            Self::Bottleneck(m) => Box::new(m),
            Self::Prompt(m) => Box::new(m),
            Self::Tokens(m) => Box::new(m),
        }
    }

    pub fn tuned(&self) -> &dyn Tuned {
        match self {
            Self::Lora(m) => m,
            Self::Ia3(m) => m,
            Self::Bottleneck(m) => m,
            Self::Prompt(m) => m,
            Self::Tokens(m) => m,
        }
    }

    pub fn tuned_mut(&mut self) -> &mut dyn Tuned {
        match self {
            Self::Lora(m) => m,
            Self::Ia3(m) => m,
            Self::Bottleneck(m) => m,
            Self::Prompt(m) => m,
            Self::Tokens(m) => m,
        }
    }

    /// The base with this adapter inside its layers (prompt learning's virtual tokens live
    /// outside it: see [`Adapter::logits`]).
    pub fn model(&self) -> &Llama {
        self.tuned().base()
    }

    /// Logits `[batch, rows, vocab]` for `input_ids`, as PEFT's model returns them: prompt
    /// tuning's start with its virtual tokens' rows.
    pub fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (hidden, _) = self.tuned().hidden(input_ids, None, false)?;
        self.model().logits(&hidden)
    }

    /// Folds the adapter into the base weights (LoRA, DoRA, IA3, trainable tokens) and returns
    /// the plain model.
    pub fn merge_and_unload(self) -> Result<Llama> {
        match self {
            Self::Lora(m) => m.merge_and_unload(),
            Self::Ia3(m) => m.merge_and_unload(),
            Self::Tokens(m) => m.merge_and_unload(),
            other => bail!(
                "{} adapters add computation and cannot be merged into the weights",
                other.peft_type()
            ),
        }
    }
}

/// A base model and named adapters, at most one of them active (HF PEFT's multi-adapter
/// `PeftModel`). With none active, inference runs the base as it was loaded.
pub struct Adapters {
    base: Llama,
    loaded: Vec<(String, Adapter)>,
    active: Option<usize>,
}

impl Adapters {
    /// `base` must carry no adapter: each loaded one wraps a copy of it.
    pub fn new(base: Llama) -> Self {
        Self {
            base,
            loaded: Vec::new(),
            active: None,
        }
    }

    /// Loads `dir` under `name`; the active adapter stays as it was.
    pub fn load_adapter(&mut self, name: &str, dir: &Path) -> Result<()> {
        if name.is_empty() {
            bail!("an adapter name cannot be empty");
        }
        if self.index(name).is_some() {
            bail!("an adapter named {name:?} is already loaded");
        }
        let adapter = Adapter::load(self.base.clone(), dir)?;
        self.loaded.push((name.to_string(), adapter));
        Ok(())
    }

    /// Makes `name` the adapter that inference runs.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.active = Some(self.require(name)?);
        Ok(())
    }

    /// Runs the base alone until an adapter is set again.
    pub fn disable_adapter(&mut self) {
        self.active = None;
    }

    /// Unloads `name`; when it was active, the base runs alone.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        let i = self.require(name)?;
        self.loaded.remove(i);
        self.active = match self.active {
            Some(a) if a == i => None,
            Some(a) if a > i => Some(a - 1),
            other => other,
        };
        Ok(())
    }

    /// The active adapter and its name, `None` when the base runs alone.
    pub fn active(&self) -> Option<(&str, &Adapter)> {
        self.active
            .map(|i| (self.loaded[i].0.as_str(), &self.loaded[i].1))
    }

    /// The loaded adapters' names, in loading order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.loaded.iter().map(|(n, _)| n.as_str())
    }

    pub fn get(&self, name: &str) -> Option<&Adapter> {
        self.index(name).map(|i| &self.loaded[i].1)
    }

    /// The base as loaded, without any adapter.
    pub fn base(&self) -> &Llama {
        &self.base
    }

    /// Logits of the active adapter (or of the base alone) for `input_ids`.
    pub fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        match self.active() {
            Some((_, a)) => a.logits(input_ids),
            None => self
                .base
                .logits(&self.base.forward(input_ids, None, None, false)?),
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.loaded.iter().position(|(n, _)| n == name)
    }

    fn require(&self, name: &str) -> Result<usize> {
        self.index(name).ok_or_else(|| {
            let names: Vec<&str> = self.names().collect();
            anyhow::anyhow!(
                "no adapter named {name:?} is loaded (loaded: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })
    }
}
