//! Several LoRA adapters made into one, as HF PEFT's `add_weighted_adapter` makes them with
//! `combination_type` "cat" or "linear": the work is on the adapter files alone (no base).
//!
//! - cat: each module's A matrices stacked (each scaled by its weight and its adapter's
//!   scaling) and its B matrices side by side, so that the result adds exactly
//!   `Σ weight_i · ΔW_i`; the rank is the sum of the ranks.
//! - linear: `A = Σ sign_i·sqrt(|w_i s_i|)·A_i`, `B = Σ sqrt(|w_i s_i|)·B_i` over adapters of
//!   one rank (PEFT's arithmetic: not the sum of the deltas, but a LoRA of the same rank).
//!
//! The result has `lora_alpha = r` (a scaling of 1: the scalings are in the matrices) and the
//! union of the adapters' target modules, as PEFT writes it.

use super::config::LoraConfig;
use crate::keys;
use crate::targets::TargetModules;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};

/// How [`combine`] joins the adapters (PEFT's `combination_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    Cat,
    Linear,
}

impl Combination {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cat" => Ok(Self::Cat),
            "linear" => Ok(Self::Linear),
            other => bail!("unknown combination {other:?} (cat or linear)"),
        }
    }
}

/// One adapter's config and weights as read from its folder.
pub struct LoraFiles {
    pub config: LoraConfig,
    pub tensors: HashMap<String, Tensor>,
}

/// The low-rank pair parameter names: PEFT's linear and embedding layers.
const PAIRS: [(&str, &str); 2] = [
    ("lora_A.weight", "lora_B.weight"),
    ("lora_embedding_A", "lora_embedding_B"),
];

/// The combined adapter's config and weights (f32, under PEFT's file keys).
pub fn combine(
    adapters: &[LoraFiles],
    weights: &[f64],
    how: Combination,
) -> Result<(LoraConfig, Vec<(String, Tensor)>)> {
    if adapters.is_empty() {
        bail!("no adapter to combine");
    }
    if weights.len() != adapters.len() {
        bail!("{} weights for {} adapters", weights.len(), adapters.len());
    }
    for (i, a) in adapters.iter().enumerate() {
        check_combinable(&a.config).with_context(|| format!("adapter {}", i + 1))?;
    }
    let first = &adapters[0].config;
    if adapters
        .iter()
        .any(|a| a.config.layers_to_transform != first.layers_to_transform)
    {
        bail!("the adapters train different layers (layers_to_transform): they cannot be combined");
    }
    // PEFT with one adapter combines linearly.
    let how = if adapters.len() == 1 {
        Combination::Linear
    } else {
        how
    };
    let ranks: Vec<usize> = adapters
        .iter()
        .map(|a| {
            a.config
                .rank_pattern
                .values()
                .copied()
                .fold(a.config.r, usize::max)
        })
        .collect();
    let rank = match how {
        Combination::Cat => ranks.iter().sum(),
        Combination::Linear => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                bail!("linear combination needs adapters of one rank, got ranks {ranks:?} (cat takes any)");
            }
            ranks[0]
        }
    };
    // Every module any adapter trains, with its pair's parameter names.
    let mut modules: BTreeMap<String, (&str, &str)> = BTreeMap::new();
    for a in adapters {
        for key in a.tensors.keys() {
            for (pa, pb) in PAIRS {
                if let Some(path) = keys::module_path(key, pa) {
                    modules.insert(path.to_string(), (pa, pb));
                }
            }
        }
    }
    if modules.is_empty() {
        bail!("the adapters hold no LoRA weights");
    }
    let mut out = Vec::new();
    for (path, (pa, pb)) in &modules {
        let (a, b) = combine_module(adapters, weights, how, rank, path, pa, pb)?;
        out.push((keys::file_key(path, pa), a));
        out.push((keys::file_key(path, pb), b));
    }
    let mut config = first.clone();
    config.r = rank;
    config.lora_alpha = rank as f64;
    // The scalings are in the matrices: plain alpha / r = 1 (rsLoRA would scale by sqrt(r)).
    config.use_rslora = false;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    config.target_modules = Some(union_targets(adapters, modules.keys()));
    Ok((config, out))
}

/// Plain LoRA adapters alone: DoRA's magnitudes, trained biases, whole trained modules and
/// trained token rows have no combined form.
fn check_combinable(c: &LoraConfig) -> Result<()> {
    if c.use_dora {
        bail!("DoRA adapters cannot be combined");
    }
    if c.bias != "none" {
        bail!(
            "adapters with trained biases (bias = {:?}) cannot be combined",
            c.bias
        );
    }
    if c.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        bail!("adapters with modules_to_save cannot be combined");
    }
    if c.token_indices()?.is_some() {
        bail!("adapters with trainable_token_indices cannot be combined");
    }
    // Their pairs stack the experts' ranks, which a concatenation would interleave wrongly.
    if c.adapts_parameters() {
        bail!("adapters with LoRA on parameters (target_parameters) cannot be combined");
    }
    Ok(())
}

/// One module's combined A `[rank, in]` and B `[out, rank]`.
fn combine_module(
    adapters: &[LoraFiles],
    weights: &[f64],
    how: Combination,
    rank: usize,
    path: &str,
    pa: &str,
    pb: &str,
) -> Result<(Tensor, Tensor)> {
    let mut parts = Vec::new();
    for (a, &w) in adapters.iter().zip(weights) {
        let get = |p: &str| a.tensors.get(&keys::file_key(path, p));
        let (Some(la), Some(lb)) = (get(pa), get(pb)) else {
            continue;
        };
        let (la, lb) = (la.to_dtype(DType::F32)?, lb.to_dtype(DType::F32)?);
        let (r, inp) = la.dims2()?;
        let (out, rb) = lb.dims2()?;
        if rb != r {
            bail!("{path}: lora_A has rank {r}, lora_B {rb}");
        }
        let scaling = a.config.rank_and_scaling(path).1;
        parts.push((la, lb, w * scaling, inp, out));
    }
    let Some(&(_, _, _, inp, out)) = parts.first() else {
        bail!("{path}: the adapters hold its lora_A without its lora_B, or the reverse");
    };
    if parts.iter().any(|p| p.3 != inp || p.4 != out) {
        bail!("{path}: the adapters' LoRA matrices differ in shape (other base models?)");
    }
    let dev = parts[0].0.device().clone();
    match how {
        Combination::Cat => {
            let a: Vec<Tensor> = parts
                .iter()
                .map(|(a, _, ws, ..)| a.affine(*ws, 0.0))
                .collect::<candle_core::Result<_>>()?;
            let b: Vec<&Tensor> = parts.iter().map(|p| &p.1).collect();
            let (a, b) = (Tensor::cat(&a, 0)?, Tensor::cat(&b, 1)?);
            // Ranks of adapters without this module stay zero, at the end.
            let used = a.dim(0)?;
            let Some(pad) = rank.checked_sub(used) else {
                bail!("{path}: the adapters' matrices have rank {used}, more than their configs' {rank}");
            };
            Ok((
                Tensor::cat(&[a, Tensor::zeros((pad, inp), DType::F32, &dev)?], 0)?,
                Tensor::cat(&[b, Tensor::zeros((out, pad), DType::F32, &dev)?], 1)?,
            ))
        }
        Combination::Linear => {
            let mut a = Tensor::zeros((rank, inp), DType::F32, &dev)?;
            let mut b = Tensor::zeros((out, rank), DType::F32, &dev)?;
            for (la, lb, ws, ..) in &parts {
                if la.dim(0)? != rank {
                    bail!(
                        "{path}: linear combination needs one rank, this module has {}",
                        la.dim(0)?
                    );
                }
                // The sign goes on one side only, or a negative weight would cancel out.
                let root = ws.abs().sqrt();
                a = (a + la.affine(root * ws.signum(), 0.0)?)?;
                b = (b + lb.affine(root, 0.0)?)?;
            }
            Ok((a, b))
        }
    }
}

/// The adapters' target modules together: the union of their lists (as PEFT writes it), or,
/// where one names them by a pattern (`all-linear`, a regex, which PEFT cannot join with a
/// list), the paths of the modules that have weights, which select exactly those.
fn union_targets<'a>(
    adapters: &[LoraFiles],
    modules: impl Iterator<Item = &'a String>,
) -> TargetModules {
    let mut names = Vec::new();
    for a in adapters {
        match &a.config.target_modules {
            Some(TargetModules::List(list)) => names.extend(list.iter().cloned()),
            _ => return TargetModules::List(modules.cloned().collect()),
        }
    }
    names.sort();
    names.dedup();
    TargetModules::List(names)
}
