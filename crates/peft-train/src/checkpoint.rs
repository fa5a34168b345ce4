//! Training checkpoints: the adapter (PEFT files), the AdamW moments and the loop position,
//! written to a temporary folder and renamed into place, so a crash never leaves a partial
//! checkpoint. Data order and dropout masks are pure functions of the seed and the step, so
//! the position is all a resumed run needs to continue exactly.

use crate::optim::AdamW;
use anyhow::{bail, Context, Result};
use peft::Tuned;
use peft_models::io::{load_safetensors, save_safetensors, write_atomic};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
/// Prefix of trainable tensors stored in the optimizer file (those the adapter file lacks).
const PARAM_PREFIX: &str = "param.";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const PREFIX: &str = "checkpoint-";

/// Where the loop stood, and the settings a resumed run must share with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub total_steps: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub trained_tokens: usize,
    /// Early stopping's memory: the best eval loss so far and the evaluations since.
    #[serde(default)]
    pub best_eval_loss: Option<f64>,
    #[serde(default)]
    pub evals_without_improvement: usize,
    /// The step of the best evaluation, and the step and eval loss of the best checkpoint
    /// (`load_best_model_at_end`): the best evaluation's, once it was saved.
    #[serde(default)]
    pub best_global_step: Option<usize>,
    #[serde(default)]
    pub best_checkpoint: Option<(usize, f64)>,
    /// The kernel paths tuning chose (`VAR=value`), which a resumed run takes again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_settings: Option<Vec<String>>,
}

impl TrainerState {
    /// How a run with `run`'s settings fails to continue this one's data order and schedule
    /// (`None`: it continues it), or how this state contradicts itself.
    pub fn mismatch(&self, run: &TrainerState) -> Option<String> {
        if self.global_step > self.total_steps {
            return Some(format!(
                "it is at step {} of {}",
                self.global_step, self.total_steps
            ));
        }
        let settings = [
            (
                "total steps",
                self.total_steps as u64,
                run.total_steps as u64,
            ),
            ("seed", self.seed, run.seed),
            ("batch size", self.batch_size as u64, run.batch_size as u64),
            (
                "gradient accumulation",
                self.grad_accum as u64,
                run.grad_accum as u64,
            ),
        ];
        settings
            .iter()
            .find(|(_, saved, ours)| saved != ours)
            .map(|(what, saved, ours)| format!("it has {what} {saved}, this run {ours}"))
    }
}

/// The folder of the checkpoint of `step` under `output`.
pub fn path(output: &Path, step: usize) -> PathBuf {
    output.join(format!("{PREFIX}{step}"))
}

/// Writes `OUTPUT/checkpoint-<step>` and returns its path: what `save_model` writes of
/// `model` (the adapter, or the model, and its tokenizer), the optimizer state and the loop
/// position; without `opt` (transformers' `save_only_model`) no optimizer state, so that it
/// cannot be resumed.
pub fn save(
    output: &Path,
    model: &dyn Tuned,
    opt: Option<&AdamW>,
    state: &TrainerState,
    save_model: &dyn Fn(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = path(output, state.global_step);
    let tmp = output.join(format!(".{PREFIX}{}.tmp", state.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    let written = write_folder(&tmp, model, opt, state, save_model);
    if let Err(e) = written {
        // A full disk or a failed write: drop the partial folder, keep the older checkpoints.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot write checkpoint {}", dir.display())));
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("cannot move checkpoint into {}", dir.display()))?;
    sync_dir(output);
    Ok(dir)
}

/// Makes a rename in `dir` durable (best effort: not every file system syncs folders).
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn write_folder(
    tmp: &Path,
    model: &dyn Tuned,
    opt: Option<&AdamW>,
    state: &TrainerState,
    save_model: &dyn Fn(&Path) -> Result<()>,
) -> Result<()> {
    save_model(tmp)?;
    let state_json = serde_json::to_string_pretty(state)?;
    let Some(opt) = opt else {
        return write_atomic(&tmp.join(STATE_FILE), state_json.as_bytes());
    };
    let keys: Vec<String> = model.trainable().into_iter().map(|(k, _)| k).collect();
    let mut tensors = opt.state_tensors(&keys)?;
    // Trainable tensors the adapter file does not hold as such (a prefix projection is saved
    // as its output) are kept here, so that the run resumes from them.
    let saved = load_safetensors(&tmp.join(model.weights_file()), &candle_core::Device::Cpu)?;
    for (key, var) in model.trainable() {
        if !saved.contains_key(&key) {
            tensors.push((format!("{PARAM_PREFIX}{key}"), var.as_tensor().detach()));
        }
    }
    save_safetensors(&tmp.join(OPTIMIZER_FILE), &tensors, None)?;
    write_atomic(&tmp.join(STATE_FILE), state_json.as_bytes())
}

/// Checkpoint folders under `output`, oldest first.
pub fn list(output: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(output)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(PREFIX)?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Keeps `keep` checkpoints: the newest (always), the one of step `protect` (the best, where
/// a metric picks one), then the newest others, as transformers' `rotate_checkpoints`.
pub fn prune(output: &Path, keep: usize, protect: Option<usize>) -> Result<()> {
    let all = list(output);
    let newest = all.last().map(|(step, _)| *step);
    let protected = |step: usize| Some(step) == newest || Some(step) == protect;
    let n_protected = all.iter().filter(|(step, _)| protected(*step)).count();
    let mut remaining = all.len();
    for (step, dir) in &all {
        if remaining <= keep.max(n_protected) {
            break;
        }
        if !protected(*step) {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
            remaining -= 1;
        }
    }
    Ok(())
}

/// Removes every checkpoint under `output` but the one of `step`.
pub fn keep_only(output: &Path, step: usize) -> Result<()> {
    for (_, dir) in list(output).into_iter().filter(|(s, _)| *s != step) {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(())
}

/// `latest` (the newest checkpoint under `output`) or a checkpoint folder.
pub fn resolve(spec: &Path, output: &Path) -> Result<PathBuf> {
    if spec == Path::new("latest") {
        return list(output)
            .pop()
            .map(|(_, p)| p)
            .with_context(|| format!("--resume latest: no checkpoint in {}", output.display()));
    }
    if !spec.join(STATE_FILE).exists() {
        bail!(
            "{} is not a checkpoint folder (no {STATE_FILE})",
            spec.display()
        );
    }
    Ok(spec.to_path_buf())
}

/// Loads weights and optimizer state of the checkpoint at `dir` into `model` and `opt`.
pub fn load(dir: &Path, model: &dyn Tuned, opt: &mut AdamW) -> Result<TrainerState> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is malformed: {e}", state_path.display()))?;
    let optimizer = dir.join(OPTIMIZER_FILE);
    if !optimizer.exists() {
        bail!(
            "checkpoint {} holds no optimizer state (saved with save_only_model): it cannot be resumed",
            dir.display()
        );
    }
    let moments = load_safetensors(&optimizer, &candle_core::Device::Cpu)?;
    let keys = set_weights(dir, model, &moments)?;
    // Moments of a tensor this model lacks: the checkpoint trained other modules.
    let ours: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
    if let Some(other) = moments
        .keys()
        .filter_map(|k| k.strip_prefix("exp_avg."))
        .find(|k| !k.ends_with(".absmax") && !ours.contains(k))
    {
        bail!(
            "checkpoint {} trains {other}, which this run does not (other method or target modules?)",
            dir.display()
        );
    }
    opt.load_state_tensors(&keys, &moments)
        .with_context(|| format!("checkpoint {}", dir.display()))?;
    Ok(state)
}

/// Loads the trained weights of the checkpoint at `dir` into `model` (not the optimizer).
pub fn load_weights(dir: &Path, model: &dyn Tuned) -> Result<()> {
    let optimizer = dir.join(OPTIMIZER_FILE);
    let moments = match optimizer.exists() {
        true => load_safetensors(&optimizer, &candle_core::Device::Cpu)?,
        false => Default::default(),
    };
    set_weights(dir, model, &moments).map(|_| ())
}

/// Sets every trainable tensor of `model` from the checkpoint at `dir` (its adapter file, or
/// the tensors kept beside the optimizer's moments); returns their keys.
fn set_weights(
    dir: &Path,
    model: &dyn Tuned,
    moments: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<Vec<String>> {
    let device = model.base().device.clone();
    let weights = load_safetensors(&dir.join(model.weights_file()), &device)?;
    let mut keys = Vec::new();
    for (key, var) in model.trainable() {
        let w = match moments.get(&format!("{PARAM_PREFIX}{key}")) {
            Some(w) => w.clone(),
            None => {
                let saved = weights
                    .get(&key)
                    .with_context(|| format!("checkpoint {} lacks {key}", dir.display()))?;
                model.trained_from_saved(&key, saved.clone())?
            }
        }
        .to_device(var.device())?;
        if w.dims() != var.dims() {
            bail!(
                "checkpoint {}: {key} has shape {:?}, the model needs {:?}",
                dir.display(),
                w.dims(),
                var.dims()
            );
        }
        var.set(&w)?;
        keys.push(key);
    }
    Ok(keys)
}
