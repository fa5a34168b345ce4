//! LoRA on a mixture-of-experts block's parameters: HF PEFT's `target_parameters` (its
//! `ParamWrapper`) on the router's weight and the experts' stacked `gate_up_proj` and
//! `down_proj`, as transformers 5 holds them, and HF PEFT's conversion of the targets that
//! named the experts' linear layers before transformers 5 fused them.
//!
//! A stacked parameter of `E` experts takes `lora_A` `[r·E, in]` (expert `e`'s rows `e·r..`)
//! and `lora_B` `[out, r·E]` (expert `e`'s columns `j·E + e`); expert `e`'s weight gains
//! `scaling · B_e · A_e`. Two targeted parameters of one module nest as HF PEFT's wrappers do:
//! the first (`gate_up_proj`) is saved under `experts.base_layer`, the second under `experts`.

use crate::keys::file_key;
use crate::lora::config::LoraConfig;
use crate::lora::layer::LoraLayer;
use crate::targets::{select_linears, TargetModules, ALL_LINEAR};
use anyhow::{bail, Result};
use candle_core::Tensor;
use peft_models::config::ExpertStorage;
use peft_models::{FeedForward, Llama, LowRank, WeightDelta};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Which parameter of a mixture-of-experts block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Router,
    GateUp,
    Down,
}

/// A parameter that `target_parameters` selects.
#[derive(Clone, Debug)]
pub struct ParamTarget {
    pub layer: usize,
    pub kind: ParamKind,
    /// Its name in transformers' module tree (`model.layers.0.mlp.experts.gate_up_proj`),
    /// which `rank_pattern` and `alpha_pattern` match.
    pub key: String,
    /// The module path its LoRA pair is saved under (`model.layers.0.mlp.experts.base_layer`).
    pub adapter_path: String,
    pub experts: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// gpt-oss's `gate_up_proj`: gate and up interleaved along its outputs (`2j`, `2j + 1`).
    pub interleaved: bool,
}

/// The names HF PEFT turns into parameters on the model types whose experts transformers 5
/// fused (`_MOE_TARGET_MODULE_MAPPING`; Qwen2-MoE is not converted there): each old module
/// name with the parameter it became.
fn converted_names(model_type: &str) -> Option<[(&'static str, &'static str); 4]> {
    match model_type {
        "mixtral" => Some([
            ("gate", "gate.weight"),
            ("w1", "gate_up_proj"),
            ("w3", "gate_up_proj"),
            ("w2", "down_proj"),
        ]),
        "qwen3_moe" | "olmoe" | "glm4_moe" | "ernie4_5_moe" | "deepseek_v3" | "glm4_moe_lite"
        | "deepseek_v2" => Some([
            ("gate", "gate.weight"),
            ("gate_proj", "gate_up_proj"),
            ("up_proj", "gate_up_proj"),
            ("down_proj", "down_proj"),
        ]),
        _ => None,
    }
}

/// HF PEFT's conversion of `target_modules` on Mixtral, Qwen3-MoE, OLMoE, GLM-4.5, ERNIE 4.5
/// MoE, DeepSeek-V2 and V3 and GLM-4.7-Flash: the names of
/// the experts' former linear layers (`gate_proj`, `up_proj`, `down_proj`; Mixtral's `w1`,
/// `w3`, `w2`) and of the router (`gate`) become `target_parameters`, and `all-linear` or a
/// regex first becomes the names it matches (all-linear: the linear layers and all of those).
/// The fused `gate_up_proj` then takes twice the rank and alpha (`rank_pattern`), as the two
/// layers it replaces had. Idempotent: a converted config stays as it is.
pub fn convert_targets(config: &mut LoraConfig, base: &mut Llama) -> Result<()> {
    let Some(names) = converted_names(&base.config.model_type) else {
        return Ok(());
    };
    let Some(targets) = config.target_modules.clone() else {
        return Ok(());
    };
    let listed: Vec<String> = match &targets {
        TargetModules::List(l) => l.clone(),
        TargetModules::Pattern(p) if p == ALL_LINEAR => {
            let selected = select_linears(base, &targets, config.exclude_modules.as_ref())?;
            let mut leaves: BTreeSet<String> = selected.iter().map(|p| leaf(p)).collect();
            leaves.extend(names.iter().map(|(old, _)| old.to_string()));
            leaves.into_iter().collect()
        }
        TargetModules::Pattern(p) => {
            let re = regex::Regex::new(&format!("^(?:{p})$"))?;
            let mut candidates: Vec<String> =
                base.linears_mut().into_iter().map(|(p, _)| p).collect();
            for l in sparse_layers(base) {
                let m = format!("{}.layers.{l}.mlp", base.config.decoder_path());
                candidates.push(format!("{m}.gate"));
                for (old, _) in names.iter().filter(|(old, _)| *old != "gate") {
                    candidates.push(format!("{m}.experts.{old}"));
                }
            }
            let matched: BTreeSet<String> = candidates
                .iter()
                .filter(|c| re.is_match(c))
                .map(|c| leaf(c))
                .collect();
            matched.into_iter().collect()
        }
    };
    let mut parameters: BTreeSet<String> = config
        .target_parameters
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut remaining = Vec::new();
    let mut fused = BTreeSet::new();
    for target in listed {
        let converted = names
            .iter()
            .find(|(old, _)| target == *old || target.ends_with(&format!(".{old}")));
        match converted {
            Some((old, new)) => {
                parameters.insert(new.to_string());
                if *new == "gate_up_proj" {
                    fused.insert(*old);
                }
            }
            None => remaining.push(target),
        }
    }
    let parts: Vec<&str> = names
        .iter()
        .filter(|(_, new)| *new == "gate_up_proj")
        .map(|(old, _)| *old)
        .collect();
    if fused.len() == 1 {
        let missing: Vec<&&str> = parts.iter().filter(|p| !fused.contains(**p)).collect();
        bail!(
            "target {} cannot be adapted without {} too: the experts' {} are one parameter (gate_up_proj) since transformers 5, as HF PEFT says",
            fused.iter().next().expect("one"),
            missing[0],
            parts.join(" and ")
        );
    }
    if fused.len() == parts.len() {
        let key = r".*\.gate_up_proj".to_string();
        config
            .rank_pattern
            .insert(key.clone(), config.r * parts.len());
        config
            .alpha_pattern
            .insert(key, config.lora_alpha * parts.len() as f64);
    }
    if !parameters.is_empty() {
        config.target_parameters = Some(parameters.into_iter().collect());
    }
    config.target_modules = Some(TargetModules::List(remaining));
    Ok(())
}

fn leaf(path: &str) -> String {
    path.rsplit('.').next().unwrap_or(path).to_string()
}

fn sparse_layers(base: &Llama) -> Vec<usize> {
    (0..base.layers.len())
        .filter(|&l| base.config.sparse_moe(l).is_some())
        .collect()
}

/// The parameters `config.target_parameters` selects (a name selects a parameter that it is,
/// or that ends with `.` and it), in layer order; an error where it names some and selects
/// none, or where LoRA on parameters meets what it does not work with (in HF PEFT either).
pub fn param_targets(base: &Llama, config: &LoraConfig) -> Result<Vec<ParamTarget>> {
    let wanted = config.target_parameters.clone().unwrap_or_default();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    if config.lora_dropout != 0.0 {
        bail!(
            "LoRA on parameters (target_parameters {wanted:?}: the experts and router of a mixture-of-experts model, which all-linear or their module names select there, as in HF PEFT) does not work with lora_dropout != 0 (got {}), in HF PEFT either: set lora_dropout to 0 (--lora-dropout 0), or name only attention modules",
            config.lora_dropout
        );
    }
    if config.use_dora {
        bail!(
            "LoRA on parameters (target_parameters) does not work with use_dora, in HF PEFT either"
        );
    }
    if !matches!(config.init_lora_weights, serde_json::Value::Bool(_)) {
        bail!(
            "init_lora_weights={} with LoRA on parameters (target_parameters) is not supported",
            config.init_lora_weights
        );
    }
    if config.layer_indices()?.is_some() {
        bail!("layers_to_transform with LoRA on parameters (target_parameters) is not supported");
    }
    let selects = |key: &str| {
        wanted
            .iter()
            .any(|t| key == t || key.ends_with(&format!(".{t}")))
    };
    let c = &base.config;
    let h = c.hidden_size;
    let mut out = Vec::new();
    for l in sparse_layers(base) {
        let moe = c.sparse_moe(l).expect("a sparse layer");
        let (e, size) = (moe.num_experts, moe.expert_size);
        // transformers 5's module tree (Mixtral's block is `mlp` there too).
        let m = format!("{}.layers.{l}.mlp", c.decoder_path());
        let router = format!("{m}.{}", moe.router);
        let router_key = format!("{router}.weight");
        if selects(&router_key) {
            out.push(ParamTarget {
                layer: l,
                kind: ParamKind::Router,
                key: router_key,
                adapter_path: router,
                experts: 1,
                in_features: h,
                out_features: e,
                interleaved: false,
            });
        }
        let gate_up = format!("{m}.experts.gate_up_proj");
        let down = format!("{m}.experts.down_proj");
        let (gate_up_on, down_on) = (selects(&gate_up), selects(&down));
        if gate_up_on {
            out.push(ParamTarget {
                layer: l,
                kind: ParamKind::GateUp,
                key: gate_up,
                // The inner wrapper where down_proj's wraps it.
                adapter_path: match down_on {
                    true => format!("{m}.experts.base_layer"),
                    false => format!("{m}.experts"),
                },
                experts: e,
                in_features: h,
                out_features: 2 * size,
                interleaved: moe.storage == ExpertStorage::GptOss,
            });
        }
        if down_on {
            out.push(ParamTarget {
                layer: l,
                kind: ParamKind::Down,
                key: down,
                adapter_path: format!("{m}.experts"),
                experts: e,
                in_features: size,
                out_features: h,
                interleaved: false,
            });
        }
    }
    if out.is_empty() {
        bail!(
            "target_parameters {wanted:?} selects no parameter (peft-rs adapts a mixture-of-experts block's router weight, mlp.gate.weight or gpt-oss's mlp.router.weight, and mlp.experts.gate_up_proj and mlp.experts.down_proj)"
        );
    }
    Ok(out)
}

/// The pairs of an adapter saved on transformers 4, one per expert's projection (Qwen's
/// `mlp.experts.3.gate_proj`, Mixtral's `block_sparse_moe.experts.3.w1`), stacked as HF PEFT
/// stacks them when it loads such an adapter: the gate's and up's `lora_A` of each expert one
/// above the other, their `lora_B` block-diagonal, experts interleaved in `lora_B`'s columns
/// (`j · E + e`); Mixtral's router pair renamed from `block_sparse_moe.gate` to `mlp.gate`.
/// `tensors` by file key; nothing changes where there are none.
pub fn stack_expert_pairs(tensors: &mut HashMap<String, Tensor>, base: &Llama) -> Result<()> {
    let c = &base.config;
    let Some(moe) = c
        .moe
        .as_ref()
        .filter(|_| converted_names(&c.model_type).is_some())
    else {
        return Ok(());
    };
    let [gate, up, down] = moe.expert_projections;
    let e_count = moe.num_experts;
    for l in sparse_layers(base) {
        let old = format!("{}.layers.{l}.{}", c.decoder_path(), moe.block);
        let new = format!("{}.layers.{l}.mlp", c.decoder_path());
        for lora in ["lora_A.weight", "lora_B.weight"] {
            if let Some(t) = tensors.remove(&file_key(&format!("{old}.gate"), lora)) {
                tensors.insert(file_key(&format!("{new}.gate"), lora), t);
            }
        }
        let mut take = |proj: &str, lora: &str| -> Result<Option<Vec<Tensor>>> {
            let keys: Vec<String> = (0..e_count)
                .map(|e| file_key(&format!("{old}.experts.{e}.{proj}"), lora))
                .collect();
            let found: Vec<Tensor> = keys.iter().filter_map(|k| tensors.remove(k)).collect();
            match found.len() {
                0 => Ok(None),
                n if n == e_count => Ok(Some(found)),
                n => bail!("{n} of {e_count} experts have {proj}.{lora} in layer {l}: every expert needs its pair"),
            }
        };
        let gate_pair = (take(gate, "lora_A.weight")?, take(gate, "lora_B.weight")?);
        let up_pair = (take(up, "lora_A.weight")?, take(up, "lora_B.weight")?);
        let down_pair = (take(down, "lora_A.weight")?, take(down, "lora_B.weight")?);
        let interleaved = |bs: Vec<Tensor>| -> Result<Tensor> {
            // [E, out, r] -> [out, r·E], column j·E + e.
            let b = Tensor::stack(&bs, 0)?.permute((2, 0, 1))?;
            let (r, e, out) = b.dims3()?;
            Ok(b.contiguous()?.reshape((r * e, out))?.t()?.contiguous()?)
        };
        let has_down = down_pair.0.is_some();
        match (gate_pair, up_pair) {
            ((Some(ga), Some(gb)), (Some(ua), Some(ub))) => {
                let mut a = Vec::new();
                let mut b = Vec::new();
                for e in 0..e_count {
                    a.push(Tensor::cat(&[&ga[e], &ua[e]], 0)?);
                    let (size, r) = gb[e].dims2()?;
                    let zeros = gb[e].zeros_like()?;
                    let top = Tensor::cat(&[&gb[e], &zeros], 1)?;
                    let bottom = Tensor::cat(&[&zeros, &ub[e]], 1)?;
                    let block = Tensor::cat(&[top, bottom], 0)?;
                    debug_assert_eq!(block.dims(), [2 * size, 2 * r]);
                    b.push(block);
                }
                let path = match has_down {
                    true => format!("{new}.experts.base_layer"),
                    false => format!("{new}.experts"),
                };
                tensors.insert(file_key(&path, "lora_A.weight"), Tensor::cat(&a, 0)?);
                tensors.insert(file_key(&path, "lora_B.weight"), interleaved(b)?);
            }
            ((None, None), (None, None)) => {}
            _ => bail!("layer {l}: the experts' {gate} and {up} pairs go together (one parameter, gate_up_proj, since transformers 5)"),
        }
        match down_pair {
            (Some(a), Some(b)) => {
                tensors.insert(
                    file_key(&format!("{new}.experts"), "lora_A.weight"),
                    Tensor::cat(&a, 0)?,
                );
                tensors.insert(
                    file_key(&format!("{new}.experts"), "lora_B.weight"),
                    interleaved(b)?,
                );
            }
            (None, None) => {}
            _ => bail!("layer {l}: the experts' {down} pairs lack lora_A or lora_B"),
        }
    }
    Ok(())
}

/// A stacked LoRA pair as the change of its parameter, in [`peft_models::MoeDeltas`]'s layout
/// (gpt-oss's interleaved gate and up rows put gate first).
struct StackedLora {
    layer: Arc<LoraLayer>,
    experts: usize,
    interleaved: bool,
}

impl WeightDelta for StackedLora {
    fn factors(&self, e: usize) -> candle_core::Result<LowRank> {
        let (a, b) = (self.layer.a.as_tensor(), self.layer.b.as_tensor());
        let (experts, out) = (self.experts, b.dim(0)?);
        let r = a.dim(0)? / experts;
        // Expert e's rows of A, and its columns j·E + e of B.
        let columns: Vec<u32> = (0..r).map(|j| (j * experts + e) as u32).collect();
        let columns = Tensor::new(columns, b.device())?;
        let mut b = b.index_select(&columns, 1)?;
        if self.interleaved {
            // Gate's rows (2j), then up's (2j + 1).
            let rows: Vec<u32> = (0..out as u32)
                .step_by(2)
                .chain((1..out as u32).step_by(2))
                .collect();
            b = b.index_select(&Tensor::new(rows, b.device())?, 0)?;
        }
        Ok(LowRank {
            a: a.narrow(0, e * r, r)?,
            b,
            scale: self.layer.scaling,
        })
    }

    fn delta(&self) -> candle_core::Result<Tensor> {
        let (a, b) = (self.layer.a.as_tensor(), self.layer.b.as_tensor());
        let (rows, inp) = a.dims2()?;
        let out = b.dim(0)?;
        let (e, r) = (self.experts, rows / self.experts);
        let a = a.reshape((e, r, inp))?;
        let b = b.reshape((out, r, e))?.permute((2, 0, 1))?.contiguous()?;
        let delta = (b.matmul(&a)? * self.layer.scaling)?;
        match self.interleaved {
            true => delta
                .reshape((e, out / 2, 2, inp))?
                .transpose(1, 2)?
                .reshape((e, out, inp)),
            false => Ok(delta),
        }
    }
}

/// Makes `layer` the LoRA of `target` in `base`'s forward.
pub fn attach(base: &mut Llama, target: &ParamTarget, layer: Arc<LoraLayer>) -> Result<()> {
    let FeedForward::Sparse(block) = &mut base.layers[target.layer].mlp else {
        bail!("layer {} has no mixture-of-experts block", target.layer);
    };
    let delta: Arc<dyn WeightDelta> = Arc::new(StackedLora {
        layer,
        experts: target.experts,
        interleaved: target.interleaved,
    });
    let slot = match target.kind {
        ParamKind::Router => &mut block.deltas.router,
        ParamKind::GateUp => &mut block.deltas.gate_up,
        ParamKind::Down => &mut block.deltas.down,
    };
    *slot = Some(delta);
    Ok(())
}

/// Folds every parameter LoRA of `base` into the weights it changes.
pub fn merge(base: &mut Llama) -> Result<()> {
    for layer in &mut base.layers {
        if let FeedForward::Sparse(block) = &mut layer.mlp {
            block.merge_deltas()?;
        }
    }
    Ok(())
}
