//! The SFT loop: shuffled batches, gradient accumulation normalised by the number of trained
//! tokens in the whole accumulated batch (as transformers does since 4.46), clipping, AdamW,
//! warmup + decay, evaluation on a held-out split with early stopping, checkpoints, a progress
//! bar, metrics JSONL and adapter saving.

use crate::checkpoint::{self, TrainerState};
use crate::data::{epoch_order, Batch, Example};
use crate::optim::{AdamW, OptimKind, ParamGroup};
use crate::schedule::{LrSchedule, SchedulerKind, Warmup};
use crate::tensorboard::{self, EventWriter};
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use peft::Tuned;
use peft_models::tokenizer::Tokenizer;
use peft_ops::{add_grad, cross_entropy_sum_stats, KernelTuning, Pass, TokenStats, Tuning};
use rand::SeedableRng;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Rows of logits materialised at once by the loss (rows × vocab × 4 bytes).
const LOSS_CHUNK_ELEMS: usize = 8 << 20;
/// GPUs have the memory for larger chunks and pay per launch: fewer, bigger matmuls.
const LOSS_CHUNK_ELEMS_GPU: usize = 64 << 20;
/// Kernel tuning checks the gradients of the trainable tensors up to this size.
const CHECKED_GRAD_ELEMS: usize = 32 << 20;

/// LoRA+'s learning rate of LoRA on the embedding (HF PEFT's default `loraplus_lr_embedding`).
const LORAPLUS_LR_EMBEDDING: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct TrainArgs {
    /// Passes over the data; a fraction trains that share of the last pass (transformers'
    /// `num_train_epochs`: the steps are rounded up).
    pub epochs: f64,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    /// Examples per evaluation batch (transformers' `per_device_eval_batch_size`), which the
    /// eval loss depends on (each batch's mean token loss, weighted by its examples); `None`:
    /// `batch_size` (transformers' default is 8).
    pub eval_batch_size: Option<usize>,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup: Warmup,
    pub scheduler: SchedulerKind,
    /// transformers' `lr_scheduler_kwargs` (`{"min_lr_rate": 0.1}`, ...).
    pub scheduler_kwargs: serde_json::Map<String, serde_json::Value>,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// f32 or 8-bit moments.
    pub optim: OptimKind,
    /// LoRA+: the learning rate of LoRA's B matrices (and of 1-D tensors: DoRA's magnitudes,
    /// biases) as a multiple of A's, as HF PEFT's `create_loraplus_optimizer`.
    pub loraplus_lr_ratio: Option<f64>,
    pub seed: u64,
    pub logging_steps: usize,
    /// Also log the first step (transformers' `logging_first_step`).
    pub logging_first_step: bool,
    pub save_every_epoch: bool,
    /// Also write a checkpoint at the end of every epoch (TRL's `save_strategy="epoch"`).
    pub save_checkpoint_every_epoch: bool,
    /// Write a checkpoint (adapter + optimizer + position) every N optimizer steps.
    pub save_steps: Option<usize>,
    /// Keep only the newest K checkpoints.
    pub save_total_limit: Option<usize>,
    /// Checkpoints without the optimizer state (transformers' `save_only_model`): a quarter of
    /// the size for LoRA, but not resumable.
    pub save_only_model: bool,
    /// Continue from this checkpoint folder (or `latest` under the output folder).
    pub resume_from: Option<PathBuf>,
    /// Set (e.g. by a Ctrl-C handler) to stop after the current step with a checkpoint.
    pub interrupt: Option<Arc<AtomicBool>>,
    pub output_dir: PathBuf,
    pub base_model_name: String,
    /// Saved with the model in every folder the run writes (checkpoints, epochs, the output),
    /// as TRL saves its tokenizer: set where it is not the base's (a chat template or tokens
    /// of its own) or where the folder is a whole model (full fine-tuning).
    pub tokenizer: Option<Tokenizer>,
    pub show_progress: bool,
    /// Without the progress bar, where metrics lines go.
    pub echo: Echo,
    /// Batches of similar lengths (transformers' `group_by_length`).
    pub group_by_length: bool,
    /// Batches padded to a multiple of this many positions (TRL's `pad_to_multiple_of`; 1:
    /// to the longest example).
    pub pad_to_multiple_of: usize,
    /// Evaluate on the held-out examples every N steps (and at the end); `None`: at the end
    /// of every epoch.
    pub eval_steps: Option<usize>,
    /// Stop when the eval loss has not improved by more than `early_stopping_threshold` for
    /// this many evaluations in a row.
    pub early_stopping_patience: Option<usize>,
    pub early_stopping_threshold: f64,
    /// At the end, take the weights of the checkpoint with the lowest eval loss and save
    /// those (transformers' `load_best_model_at_end` with the eval loss as the metric); that
    /// checkpoint outlives `save_total_limit`'s pruning.
    pub load_best_model_at_end: bool,
    /// Also log the metrics lines as TensorBoard scalars into this folder (transformers'
    /// `report_to="tensorboard"`).
    pub tensorboard_dir: Option<PathBuf>,
    /// Whether to time the interchangeable kernel paths on the first batch and keep the
    /// fastest (see [`peft_ops::tune`]; by default on GPUs).
    pub kernel_tuning: KernelTuning,
    /// The weight of the routers' load-balancing loss of a mixture-of-experts model in the
    /// loss (TRL's `router_aux_loss_coef`; 0: none); `None`: the model config's.
    pub router_aux_loss_coef: Option<f64>,
}

/// Where metrics lines go when no progress bar is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    Stderr,
    /// `--json`: stdout, for scripts.
    Stdout,
    Off,
}

/// The defaults `peft train` applies to options left unset: TRL's SFT defaults, but for
/// LoRA's usual learning rate (2e-4, TRL's 2e-5 suits full fine-tuning) with a cosine decay
/// after 3% warmup, and a log line every step (TRL: every 10).
impl Default for TrainArgs {
    fn default() -> Self {
        Self {
            epochs: 1.0,
            max_steps: None,
            batch_size: 4,
            eval_batch_size: None,
            grad_accum: 1,
            lr: 2e-4,
            warmup: Warmup::Ratio(0.03),
            scheduler: SchedulerKind::Cosine,
            scheduler_kwargs: serde_json::Map::new(),
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            optim: OptimKind::Adamw,
            loraplus_lr_ratio: None,
            seed: 42,
            logging_steps: 1,
            logging_first_step: false,
            save_every_epoch: false,
            save_steps: None,
            save_total_limit: None,
            save_only_model: false,
            resume_from: None,
            interrupt: None,
            output_dir: PathBuf::new(),
            base_model_name: String::new(),
            tokenizer: None,
            show_progress: true,
            echo: Echo::Stderr,
            group_by_length: false,
            pad_to_multiple_of: 1,
            eval_steps: None,
            early_stopping_patience: None,
            early_stopping_threshold: 0.0,
            load_best_model_at_end: false,
            tensorboard_dir: None,
            save_checkpoint_every_epoch: false,
            kernel_tuning: KernelTuning::Auto,
            router_aux_loss_coef: None,
        }
    }
}

impl TrainArgs {
    /// Fails on settings that cannot mean anything (a negative learning rate, a beta of 1.5,
    /// a step interval of 0), naming the setting, before anything runs.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 || self.eval_batch_size == Some(0) {
            bail!("batch sizes and gradient accumulation must be at least 1");
        }
        if !(self.epochs.is_finite() && self.epochs > 0.0) {
            bail!("the number of epochs must be above 0, got {}", self.epochs);
        }
        if self.pad_to_multiple_of == 0 {
            bail!("pad_to_multiple_of must be at least 1");
        }
        if let Some(r) = self.loraplus_lr_ratio {
            if !(r.is_finite() && r > 0.0) {
                bail!("loraplus_lr_ratio must be a number above 0, got {r}");
            }
        }
        let at_least_zero = [
            ("learning rate", self.lr),
            ("max_grad_norm", self.max_grad_norm),
            ("weight decay", self.weight_decay),
            ("adam_epsilon", self.adam_eps),
            ("early_stopping_threshold", self.early_stopping_threshold),
            (
                "router_aux_loss_coef",
                self.router_aux_loss_coef.unwrap_or(0.0),
            ),
        ];
        if let Some((what, v)) = at_least_zero
            .iter()
            .find(|(_, v)| !(v.is_finite() && *v >= 0.0))
        {
            bail!("the {what} must be a finite number of at least 0, got {v}");
        }
        let below_one = [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ];
        if let Some((what, v)) = below_one.iter().find(|(_, v)| !(0.0..1.0).contains(v)) {
            bail!("{what} must be at least 0 and below 1, got {v}");
        }
        self.warmup.validate()?;
        // The scheduler's kwargs, checked before anything loads (over a nominal run without
        // warmup: the real length is known once the data is).
        LrSchedule::new(
            self.scheduler,
            self.lr,
            Warmup::Steps(0),
            1 << 40,
            &self.scheduler_kwargs,
        )?;
        let intervals = [
            ("logging steps", Some(self.logging_steps)),
            ("save steps", self.save_steps),
            ("eval steps", self.eval_steps),
            ("early stopping patience", self.early_stopping_patience),
        ];
        if let Some((what, _)) = intervals.iter().find(|(_, v)| *v == Some(0)) {
            bail!("the {what} must be at least 1");
        }
        if self.load_best_model_at_end {
            self.check_best_model_saves()?;
        }
        Ok(())
    }

    /// Whether the run has a best checkpoint to keep, as transformers has one when a metric
    /// chooses it: to load at the end, or for early stopping. It survives
    /// `save_total_limit`'s pruning, and is the one left when the limit is 1.
    fn tracks_best(&self) -> bool {
        self.load_best_model_at_end || self.early_stopping_patience.is_some()
    }

    /// Optimizer steps of one pass over `examples` examples.
    /// Writes `model` into `dir` as the run saves it: the adapter (or model) and the tokenizer.
    fn save_model(&self, model: &dyn Tuned, dir: &Path) -> Result<()> {
        model.save(dir, &self.base_model_name)?;
        match &self.tokenizer {
            Some(tok) => tok.save_hf(dir),
            None => Ok(()),
        }
    }

    pub fn steps_per_epoch(&self, examples: usize) -> usize {
        examples
            .div_ceil(self.batch_size.max(1))
            .div_ceil(self.grad_accum.max(1))
    }

    /// The run's optimizer steps over `examples` examples: `max_steps`, else the epochs' (a
    /// fraction of one rounded up, as transformers does).
    pub fn total_steps(&self, examples: usize) -> usize {
        let per_epoch = self.steps_per_epoch(examples);
        self.max_steps
            .unwrap_or((self.epochs * per_epoch as f64).ceil() as usize)
    }

    /// transformers' rule for `load_best_model_at_end`: checkpoints where the evaluations are
    /// (both by epoch, or saved every M steps with M a multiple of the eval interval), so that
    /// the best evaluation has one.
    fn check_best_model_saves(&self) -> Result<()> {
        match (
            self.eval_steps,
            self.save_steps,
            self.save_checkpoint_every_epoch,
        ) {
            (None, _, true) => Ok(()),
            (Some(eval), Some(save), _) if save % eval == 0 => Ok(()),
            (Some(eval), Some(save), _) => bail!(
                "load_best_model_at_end needs a checkpoint at evaluations: the save steps \
                 ({save}) must be a multiple of the eval steps ({eval})"
            ),
            (None, None, false) | (Some(_), None, false) => bail!(
                "load_best_model_at_end needs checkpoints to choose from (--save-steps N or \
                 --save-strategy epoch)"
            ),
            (None, Some(_), _) => bail!(
                "load_best_model_at_end needs checkpoints where the evaluations are: the eval \
                 set is evaluated every epoch, checkpoints are saved by steps (--save-strategy \
                 epoch, or --eval-steps N)"
            ),
            (Some(_), None, true) => bail!(
                "load_best_model_at_end needs checkpoints where the evaluations are: the eval \
                 set is evaluated by steps, checkpoints are saved every epoch (--save-steps N, \
                 or --eval-strategy epoch)"
            ),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    /// Mean training loss of every optimizer step.
    pub losses: Vec<f64>,
    pub trained_tokens: usize,
    pub seconds: f64,
    /// `(step, eval loss)` of every evaluation of this run.
    pub evals: Vec<(usize, f64)>,
    /// Early stopping ended the run before its last step.
    pub stopped_early: bool,
    /// The kernel paths tuning chose (`VAR=value`), if it ran.
    pub kernel_settings: Option<Vec<String>>,
    /// With `load_best_model_at_end`: the step and eval loss of the checkpoint whose weights
    /// were saved.
    pub best_checkpoint: Option<(usize, f64)>,
}

impl TrainSummary {
    pub fn tokens_per_s(&self) -> f64 {
        self.trained_tokens as f64 / self.seconds.max(1e-9)
    }
}

/// The run was stopped on request after `step`; `checkpoint` holds its state.
#[derive(Debug)]
pub struct Interrupted {
    pub step: usize,
    pub checkpoint: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted after step {}: checkpoint saved to {} (continue with --resume latest)",
            self.step,
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// A NaN or infinite loss or gradient: the step is not applied.
#[derive(Debug)]
pub struct NonFinite {
    pub what: &'static str,
    pub value: f64,
    pub step: usize,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is {} at step {}", self.what, self.value, self.step)
    }
}

impl std::error::Error for NonFinite {}

pub struct StepOutput {
    pub loss: f64,
    pub grad_norm: f64,
    /// Each micro-batch's [`TokenMetrics`], which TRL averages over a logging interval.
    pub token_metrics: Vec<TokenMetrics>,
}

/// What TRL's SFT trainer logs beside the loss for a batch: the mean entropy of the
/// next-token distributions at the labelled positions and the share of them whose label is the
/// most likely token (`entropy`, `mean_token_accuracy`; 0 for a batch without labels), and a
/// mixture-of-experts model's load-balancing loss, unweighted (`aux_loss`, where it is on).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TokenMetrics {
    pub entropy: f64,
    pub mean_token_accuracy: f64,
    pub aux_loss: Option<f64>,
}

/// A batch's loss and what [`TokenMetrics`] reads of it, on the device.
pub struct BatchLoss {
    /// The loss to take the backward of: the token loss's share, plus the load-balancing
    /// loss's where it is on.
    pub loss: Tensor,
    pub stats: TokenStats,
    /// The load-balancing loss, unweighted.
    pub aux: Option<Tensor>,
}

fn read_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl TokenMetrics {
    fn read(batch: &BatchLoss, labelled: usize) -> Result<Self> {
        let aux_loss = batch.aux.as_ref().map(read_f64).transpose()?;
        if labelled == 0 {
            return Ok(Self {
                aux_loss,
                ..Self::default()
            });
        }
        Ok(Self {
            entropy: read_f64(&batch.stats.entropy_sum)? / labelled as f64,
            mean_token_accuracy: read_f64(&batch.stats.top1)? / labelled as f64,
            aux_loss,
        })
    }

    /// The mean of each metric over `all` (TRL's average over the batches since the last log).
    pub fn mean(all: &[TokenMetrics]) -> Self {
        let n = all.len().max(1) as f64;
        let aux: Vec<f64> = all.iter().filter_map(|m| m.aux_loss).collect();
        Self {
            entropy: all.iter().map(|m| m.entropy).sum::<f64>() / n,
            mean_token_accuracy: all.iter().map(|m| m.mean_token_accuracy).sum::<f64>() / n,
            aux_loss: (!aux.is_empty()).then(|| aux.iter().sum::<f64>() / aux.len() as f64),
        }
    }

    /// Adds the metrics to a metrics line, each key after `prefix` (`eval_`).
    fn log(&self, line: &mut serde_json::Value, prefix: &str) {
        line[format!("{prefix}entropy")] = json!(self.entropy);
        line[format!("{prefix}mean_token_accuracy")] = json!(self.mean_token_accuracy);
        if let Some(aux) = self.aux_loss {
            line[format!("{prefix}aux_loss")] = json!(aux);
        }
    }
}

/// An evaluation: the loss as transformers' Trainer reports it and TRL's token metrics.
#[derive(Clone, Copy, Debug)]
pub struct EvalMetrics {
    pub loss: f64,
    pub tokens: TokenMetrics,
}

pub struct Trainer<'a> {
    pub model: &'a mut dyn Tuned,
    pub args: TrainArgs,
    pub pad_id: u32,
}

/// Per-micro-batch dropout seed: a pure function of (seed, step, micro-batch).
fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ ((step as u64) << 20) ^ micro as u64
}

impl Trainer<'_> {
    /// Seeds the random draws of the next training forward: dropout masks and NEFTune noise.
    fn set_seeds(&self, seed: u64) {
        self.model.set_dropout_seed(seed);
        if let Some(neftune) = &self.model.base().neftune {
            neftune.set_seed(seed);
        }
    }

    /// Summed token loss of one batch, divided by `denom`, ready for backward (`train`:
    /// dropout on), plus the load-balancing loss of a mixture-of-experts model's routers
    /// weighted by [`Self::router_aux_loss_coef`].
    pub fn batch_loss(&self, batch: &Batch, denom: usize, train: bool) -> Result<Tensor> {
        Ok(self.batch_loss_stats(batch, denom, 1, train)?.loss)
    }

    /// The weight of the routers' load-balancing loss in the loss, as TRL's SFTTrainer sets
    /// it: the run's `router_aux_loss_coef`, by default the model config's; `None` when it
    /// is 0 or the model has no experts (where a weight set for it is an error).
    pub fn router_aux_loss_coef(&self) -> Result<Option<f64>> {
        let asked = self.args.router_aux_loss_coef;
        match &self.model.base().config.moe {
            Some(moe) if !moe.has_load_balancing_loss() && asked.is_some_and(|c| c != 0.0) => {
                bail!(
                    "router_aux_loss_coef is set, but {}'s routers have no load-balancing loss \
                     in transformers",
                    self.model.base().config.model_type
                )
            }
            Some(moe) => Ok(Some(asked.unwrap_or(moe.router_aux_loss_coef)).filter(|&c| c != 0.0)),
            None if asked.is_some_and(|c| c != 0.0) => bail!(
                "router_aux_loss_coef is set to {} but {} is not a mixture-of-experts model, \
                 whose routers' load-balancing loss it weights",
                asked.unwrap_or_default(),
                self.model.base().config.model_type
            ),
            None => Ok(None),
        }
    }

    /// [`Self::batch_loss`] and what [`TokenMetrics`] reads (on the device, unread), in a
    /// step over `micro_batches` micro-batches (TRL divides the load-balancing loss, a mean
    /// over each micro-batch, by their number).
    pub fn batch_loss_stats(
        &self,
        batch: &Batch,
        denom: usize,
        micro_batches: usize,
        train: bool,
    ) -> Result<BatchLoss> {
        let base = self.model.base();
        let coef = self.router_aux_loss_coef()?;
        let balance = match coef {
            Some(_) => base.load_balance(&batch.token_mask()?),
            None => None,
        };
        let forward = || {
            self.model
                .hidden(&batch.input_ids, batch.attention_mask.as_ref(), train)
        };
        let (hidden, virtual_rows) = match &balance {
            Some(b) => base.balancing(b, forward)??,
            None => forward()?,
        };
        // Rows of virtual tokens (prompt tuning) carry no label.
        let hidden = hidden.narrow(1, virtual_rows, batch.input_ids.dim(1)?)?;
        let (b, t, d) = hidden.dims3()?;
        let hidden = base.head_input(&hidden.reshape((b * t, d))?)?;
        let labels = batch.labels.flatten_all()?;
        let weight = &base.lm_head_weight()?;
        let elems = if weight.device().is_cpu() {
            LOSS_CHUNK_ELEMS
        } else {
            LOSS_CHUNK_ELEMS_GPU
        };
        let rows = (elems / weight.dim(0)?).max(1);
        // A trainable head (full fine-tuning, modules_to_save) gets its gradient too.
        let softcap = base.config.final_softcap;
        let (mut loss, stats) =
            cross_entropy_sum_stats(&hidden, weight, &labels, denom, rows, softcap)?;
        let aux = match (balance, coef) {
            (Some(balance), Some(coef)) => {
                let weight = coef / micro_batches.max(1) as f64;
                let aux = balance.finish(weight)?;
                if let Some(aux) = &aux {
                    let dtype = loss.dtype();
                    loss = (loss + (aux * weight)?.to_dtype(dtype)?)?;
                }
                aux
            }
            _ => None,
        };
        Ok(BatchLoss { loss, stats, aux })
    }

    /// One optimizer step over the micro-batches of an accumulation group.
    pub fn step(
        &mut self,
        opt: &mut AdamW,
        batches: &[Batch],
        step: usize,
        lr: f64,
    ) -> Result<StepOutput> {
        let seed = self.args.seed;
        let denom: usize = batches.iter().map(|b| b.n_trained).sum();
        let mut acc: Option<GradStore> = None;
        // The losses stay on the device until the optimizer step is queued: on a GPU, reading
        // one back would stall the host mid-step while the device drains its queue.
        let mut outs = Vec::with_capacity(batches.len());
        for (micro, batch) in batches.iter().enumerate() {
            self.set_seeds(dropout_seed(seed, step, micro));
            let mut out = self.batch_loss_stats(batch, denom, batches.len(), true)?;
            let grads = self.model.base().backward(&out.loss)?;
            out.loss = out.loss.detach();
            outs.push(out);
            acc = Some(match acc {
                None => grads,
                Some(mut acc) => {
                    for p in opt.params() {
                        if let Some(g) = grads.get(p.as_tensor()) {
                            add_grad(&mut acc, p.id(), g.clone())?;
                        }
                    }
                    acc
                }
            });
        }
        let mut grads = acc.context("empty accumulation group")?;
        // A non-finite loss stops the run below, before anything is saved (its gradients are
        // then almost always non-finite too, and the optimizer skips them).
        let grad_norm = opt.step_clipped(&mut grads, self.args.max_grad_norm, lr)?;
        let mut loss = 0f64;
        for out in &outs {
            loss += read_f64(&out.loss)?;
        }
        if !loss.is_finite() {
            return Err(NonFinite {
                what: "training loss",
                value: loss,
                step: step + 1,
            }
            .into());
        }
        if !grad_norm.is_finite() {
            return Err(NonFinite {
                what: "gradient norm",
                value: grad_norm,
                step: step + 1,
            }
            .into());
        }
        let token_metrics = outs
            .iter()
            .zip(batches)
            .map(|(s, b)| TokenMetrics::read(s, b.n_trained))
            .collect::<Result<_>>()?;
        Ok(StepOutput {
            loss,
            grad_norm,
            token_metrics,
        })
    }

    /// Times forward and backward passes over `batch` under each of the interchangeable kernel
    /// paths that apply ([`peft_ops::tune`]; each path must reproduce the loss and the
    /// gradients' norm of the starting paths, within their memory) and leaves the fastest set
    /// for the rest of the process; `None` where [`TrainArgs::kernel_tuning`] is off for this
    /// device. Nothing is trained: the gradients are dropped, and the memory a hungrier path
    /// reserved is handed back. The device's peak-memory window starts anew at each pass.
    pub fn tune_kernels(&mut self, batch: &Batch) -> Result<Option<Tuning>> {
        let device = self.model.base().device.clone();
        let wanted = self.args.kernel_tuning.wanted(device.is_cuda());
        if !wanted.map_err(anyhow::Error::msg)? {
            return Ok(None);
        }
        let seed = dropout_seed(self.args.seed, 0, 0);
        let params: Vec<Var> = self.model.trainable().into_iter().map(|(_, v)| v).collect();
        // The gradients checked: all of a LoRA's, without the largest tensors of full
        // fine-tuning (an f64 copy of each is summed).
        let checked: Vec<Var> = params
            .into_iter()
            .filter(|v| v.elem_count() <= CHECKED_GRAD_ELEMS)
            .collect();
        let sink = self.model.base().grad_sink.clone();
        let tuning = peft_ops::tune(&peft_ops::knobs(), device.is_cuda(), || -> Result<Pass> {
            // A pass that failed midway may have left parameter gradients behind.
            sink.clear()?;
            device.synchronize()?;
            peft_ops::reset_peak_memory(&device)?;
            let start = Instant::now();
            self.set_seeds(seed);
            let loss = self.batch_loss(batch, batch.n_trained, true)?;
            let grads = self.model.base().backward(&loss)?;
            device.synchronize()?;
            let seconds = start.elapsed().as_secs_f64();
            let peak_bytes = peft_ops::peak_memory(&device)?;
            let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let results = vec![loss, crate::optim::grad_norm(&grads, &checked)?];
            Ok(Pass {
                seconds,
                results,
                peak_bytes,
            })
        })?;
        sink.clear()?;
        peft_ops::release_unused_memory(&device)?;
        Ok(Some(tuning))
    }

    /// Eval loss over `examples` (dropout off, no gradients) in batches of the eval batch
    /// size, as transformers' Trainer reports it: each batch's mean token loss, weighted by
    /// the batch's examples.
    pub fn eval_loss(&self, examples: &[Example]) -> Result<f64> {
        Ok(self.evaluate(examples)?.loss)
    }

    /// [`Self::eval_loss`] and TRL's token metrics: the mean over the eval batches of each
    /// batch's.
    pub fn evaluate(&self, examples: &[Example]) -> Result<EvalMetrics> {
        let device = self.model.base().device.clone();
        let (mut sum, mut count) = (0f64, 0usize);
        let mut tokens = Vec::new();
        let batch_size = self.args.eval_batch_size.unwrap_or(self.args.batch_size);
        for chunk in examples.chunks(batch_size.max(1)) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let batch = Batch::padded(&refs, self.pad_id, self.args.pad_to_multiple_of, &device)?;
            let out =
                peft_ops::no_grad(|| self.batch_loss_stats(&batch, batch.n_trained, 1, false))?;
            sum += read_f64(&out.loss)? * chunk.len() as f64;
            count += chunk.len();
            tokens.push(TokenMetrics::read(&out, batch.n_trained)?);
        }
        Ok(EvalMetrics {
            loss: sum / count.max(1) as f64,
            tokens: TokenMetrics::mean(&tokens),
        })
    }

    /// AdamW over the model's trainable tensors with this run's hyper-parameters: no weight
    /// decay for biases and norms (transformers' rule), LoRA+'s learning rates where asked.
    pub fn optimizer(&self) -> Result<AdamW> {
        let a = &self.args;
        let trainable = self.model.trainable();
        let groups: Vec<ParamGroup> = trainable
            .iter()
            .map(|(name, var)| ParamGroup {
                lr_scale: match a.loraplus_lr_ratio {
                    // create_loraplus_optimizer's loraplus_lr_embedding: 1e-6 for LoRA on the
                    // embedding, whatever the learning rate.
                    Some(_) if name.contains("lora_embedding_") => LORAPLUS_LR_EMBEDDING / a.lr,
                    Some(ratio) if name.contains("lora_B") || var.rank() == 1 => ratio,
                    _ => 1.0,
                },
                decay: ParamGroup::decays(name),
            })
            .collect();
        let params: Vec<_> = trainable.into_iter().map(|(_, v)| v).collect();
        let mut opt = AdamW::with_kind(
            params,
            a.adam_beta1,
            a.adam_beta2,
            a.adam_eps,
            a.weight_decay,
            a.optim,
        )?;
        opt.set_groups(&groups)?;
        Ok(opt)
    }

    pub fn train(&mut self, examples: &[Example]) -> Result<TrainSummary> {
        self.train_with_eval(examples, &[])
    }

    /// Trains on `examples`; with `eval` non-empty, evaluates on it (every `eval_steps`, at
    /// the end of every epoch without them, and at the end) and stops early if asked to.
    pub fn train_with_eval(
        &mut self,
        examples: &[Example],
        eval: &[Example],
    ) -> Result<TrainSummary> {
        let a = self.args.clone();
        a.validate()?;
        self.router_aux_loss_coef()?;
        if examples.is_empty() {
            bail!("nothing to train on: no examples");
        }
        if a.load_best_model_at_end && eval.is_empty() {
            bail!("load_best_model_at_end needs an eval set to choose by (--eval-split or --eval-data)");
        }
        let total_steps = a.total_steps(examples.len());
        if total_steps == 0 {
            bail!("nothing to train: 0 steps");
        }
        let schedule = LrSchedule::new(
            a.scheduler,
            a.lr,
            a.warmup,
            total_steps,
            &a.scheduler_kwargs,
        )?;
        let mut opt = self.optimizer()?;
        std::fs::create_dir_all(&a.output_dir)
            .with_context(|| format!("cannot create output folder {}", a.output_dir.display()))?;
        let mut state = TrainerState {
            global_step: 0,
            total_steps,
            seed: a.seed,
            batch_size: a.batch_size,
            grad_accum: a.grad_accum,
            trained_tokens: 0,
            best_eval_loss: None,
            best_global_step: None,
            best_checkpoint: None,
            evals_without_improvement: 0,
            kernel_settings: None,
        };
        let mut last_checkpoint = None;
        if let Some(spec) = &a.resume_from {
            let dir = checkpoint::resolve(spec, &a.output_dir)?;
            let saved = checkpoint::load(&dir, &*self.model, &mut opt)?;
            if let Some(why) = saved.mismatch(&state) {
                bail!("cannot resume from checkpoint {}: {why}", dir.display());
            }
            state = saved;
            last_checkpoint = Some(dir);
        }
        let start_step = state.global_step;
        let resumed_tokens = state.trained_tokens;
        let metrics_path = a.output_dir.join("metrics.jsonl");
        if start_step > 0 && metrics_path.exists() {
            // Lines logged after the checkpoint belong to the interrupted run: drop them.
            let text = std::fs::read_to_string(&metrics_path)
                .with_context(|| format!("cannot read {}", metrics_path.display()))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step")?.as_u64())
                        .is_some_and(|s| s as usize <= start_step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            peft_models::io::write_atomic(&metrics_path, kept.as_bytes())?;
        }
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(start_step > 0)
            .truncate(start_step == 0)
            .open(&metrics_path)
            .with_context(|| format!("cannot write {}", metrics_path.display()))?;
        let mut tensorboard = a
            .tensorboard_dir
            .as_deref()
            .map(|dir| EventWriter::create(dir, tensorboard::now()))
            .transpose()?;

        let bar = if a.show_progress {
            ProgressBar::new(total_steps as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} step {pos}/{len} {msg} ETA {eta}",
            )
            .expect("valid template"),
        );
        let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
        let device = self.model.base().device.clone();
        let start = Instant::now();
        let mut summary = TrainSummary {
            steps: 0,
            losses: Vec::new(),
            trained_tokens: 0,
            seconds: 0.0,
            evals: Vec::new(),
            stopped_early: false,
            kernel_settings: None,
            best_checkpoint: None,
        };
        let mut step = 0;
        let mut epoch = 0;
        // Losses of the steps, and token metrics of the micro-batches, since the last line.
        let mut since_log: Vec<f64> = Vec::new();
        let mut tokens_since_log: Vec<TokenMetrics> = Vec::new();
        // The kernel paths are timed on the first batch this run trains on; a resumed run
        // takes the ones its checkpoint names (the same paths: the same rounding).
        let mut tuned = false;
        if let Some(settings) = &state.kernel_settings {
            if a.kernel_tuning
                .wanted(device.is_cuda())
                .map_err(anyhow::Error::msg)?
            {
                peft_ops::apply_settings(settings).map_err(anyhow::Error::msg)?;
                summary.kernel_settings = Some(settings.clone());
                tuned = true;
            }
        }
        'epochs: while step < total_steps {
            let order = epoch_order(&lengths, a.batch_size, a.group_by_length, &mut rng);
            let batches: Vec<&[usize]> = order.chunks(a.batch_size).collect();
            let groups: Vec<&[&[usize]]> = batches.chunks(a.grad_accum).collect();
            for (g, group) in groups.iter().enumerate() {
                if step >= total_steps {
                    break;
                }
                if step < start_step {
                    // Replays the data order of the run being resumed.
                    step += 1;
                    continue;
                }
                let batches = group
                    .iter()
                    .map(|ids| {
                        let exs: Vec<&Example> = ids.iter().map(|&i| &examples[i]).collect();
                        Batch::padded(&exs, self.pad_id, self.args.pad_to_multiple_of, &device)
                    })
                    .collect::<Result<Vec<_>>>()?;
                if !tuned {
                    tuned = true;
                    if let Some(tuning) = self.tune_kernels(&batches[0])? {
                        summary.kernel_settings = Some(tuning.settings.clone());
                        for line in tuning.report() {
                            if a.show_progress {
                                bar.println(line);
                            } else if a.echo != Echo::Off {
                                eprintln!("{line}");
                            }
                        }
                    }
                }
                summary.trained_tokens += batches.iter().map(|b| b.n_tokens).sum::<usize>();
                let lr = schedule.lr(step);
                let StepOutput {
                    loss,
                    grad_norm,
                    token_metrics,
                } = self
                    .step(&mut opt, &batches, step, lr)
                    .map_err(|e| stop_note(e, last_checkpoint.as_deref()))?;
                step += 1;
                summary.losses.push(loss);
                since_log.push(loss);
                tokens_since_log.extend(token_metrics);
                let elapsed = start.elapsed().as_secs_f64();
                let tps = summary.trained_tokens as f64 / elapsed.max(1e-9);
                let end_of_epoch = g + 1 == groups.len();
                // TRL's num_tokens: the tokens trained on so far, padding aside.
                let num_tokens = resumed_tokens + summary.trained_tokens;
                let mut line = json!({
                    "step": step,
                    "epoch": epoch as f64 + (g + 1) as f64 / groups.len() as f64,
                    "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                    "num_tokens": num_tokens,
                });
                let eval_now = !eval.is_empty()
                    && (step == total_steps
                        || match a.eval_steps {
                            Some(n) => n > 0 && step % n == 0,
                            None => end_of_epoch,
                        });
                let mut stop_early = false;
                if eval_now {
                    let metrics = self.evaluate(eval)?;
                    let eval_loss = metrics.loss;
                    summary.evals.push((step, eval_loss));
                    line["eval_loss"] = json!(eval_loss);
                    line["eval_perplexity"] = json!(eval_loss.exp());
                    metrics.tokens.log(&mut line, "eval_");
                    // As transformers: early stopping counts evaluations that do not beat the
                    // best loss so far by more than the threshold; the best is any lower loss.
                    let best = state.best_eval_loss;
                    match best.is_none_or(|best| eval_loss < best - a.early_stopping_threshold) {
                        true => state.evals_without_improvement = 0,
                        false => state.evals_without_improvement += 1,
                    }
                    // transformers starts from an infinite best: a NaN loss is never the best.
                    if eval_loss.is_finite() && best.is_none_or(|best| eval_loss < best) {
                        state.best_eval_loss = Some(eval_loss);
                        state.best_global_step = Some(step);
                    }
                    stop_early = a
                        .early_stopping_patience
                        .is_some_and(|p| state.evals_without_improvement >= p.max(1));
                }
                if step % a.logging_steps.max(1) == 0
                    || (a.logging_first_step && step == 1)
                    || step == total_steps
                    || eval_now
                    || stop_early
                {
                    // The mean over the steps since the last line, as transformers logs it.
                    line["loss"] = json!(since_log.iter().sum::<f64>() / since_log.len() as f64);
                    since_log.clear();
                    TokenMetrics::mean(&tokens_since_log).log(&mut line, "");
                    tokens_since_log.clear();
                    writeln!(metrics, "{line}")
                        .with_context(|| format!("cannot write {}", metrics_path.display()))?;
                    if let Some(events) = &mut tensorboard {
                        log_scalars(events, &line, step)?;
                    }
                    if !a.show_progress {
                        match a.echo {
                            Echo::Stderr => eprintln!("{line}"),
                            Echo::Stdout => println!("{line}"),
                            Echo::Off => {}
                        }
                    }
                }
                // Ctrl-C at the last step just lets the run finish.
                let interrupted = step < total_steps
                    && a.interrupt
                        .as_ref()
                        .is_some_and(|f| f.load(Ordering::SeqCst));
                // On schedule, and at the last step (transformers' Trainer saves there by
                // steps, and by epoch also when the run ends within an epoch).
                let scheduled = a
                    .save_steps
                    .is_some_and(|n| n > 0 && (step % n == 0 || step == total_steps))
                    || (a.save_checkpoint_every_epoch && (end_of_epoch || step == total_steps));
                if scheduled || interrupted {
                    state.global_step = step;
                    state.trained_tokens = num_tokens;
                    state.kernel_settings = summary.kernel_settings.clone();
                    // The best evaluation's checkpoint, once it has one (this one, or one
                    // saved at that step before).
                    if let (Some(best), Some(loss)) = (state.best_global_step, state.best_eval_loss)
                    {
                        if best == step || checkpoint::path(&a.output_dir, best).exists() {
                            state.best_checkpoint = Some((best, loss));
                        }
                    }
                    // Ctrl-C's checkpoint is for resuming: it keeps the optimizer state.
                    let with_optimizer = !a.save_only_model || interrupted;
                    let dir = checkpoint::save(
                        &a.output_dir,
                        &*self.model,
                        with_optimizer.then_some(&opt),
                        &state,
                        &|dir| a.save_model(&*self.model, dir),
                    )?;
                    if let Some(k) = a.save_total_limit {
                        let keep = state
                            .best_checkpoint
                            .filter(|_| a.tracks_best())
                            .map(|(step, _)| step);
                        checkpoint::prune(&a.output_dir, k.max(1), keep)?;
                    }
                    last_checkpoint = Some(dir.clone());
                    if interrupted {
                        bar.abandon();
                        return Err(Interrupted {
                            step,
                            checkpoint: dir,
                        }
                        .into());
                    }
                }
                bar.set_position(step as u64);
                bar.set_message(format!(
                    "epoch {} loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s",
                    epoch + 1
                ));
                if stop_early {
                    summary.stopped_early = true;
                    break 'epochs;
                }
            }
            epoch += 1;
            if a.save_every_epoch && step < total_steps {
                a.save_model(&*self.model, &a.output_dir.join(format!("epoch-{epoch}")))?;
            }
        }
        bar.finish();
        summary.steps = step;
        summary.seconds = start.elapsed().as_secs_f64();
        if let Some((best, loss)) = state.best_checkpoint.filter(|_| a.tracks_best()) {
            if a.load_best_model_at_end {
                checkpoint::load_weights(&checkpoint::path(&a.output_dir, best), &*self.model)?;
                summary.best_checkpoint = Some((best, loss));
            }
            if a.save_total_limit == Some(1) {
                // transformers keeps the best checkpoint alone then.
                checkpoint::keep_only(&a.output_dir, best)?;
            }
        }
        a.save_model(&*self.model, &a.output_dir)?;
        Ok(summary)
    }
}

/// A metrics line's values as TensorBoard scalars at `step`, as transformers'
/// TensorBoardCallback logs them.
fn log_scalars(events: &mut EventWriter, line: &serde_json::Value, step: usize) -> Result<()> {
    let wall_time = tensorboard::now();
    let values = line.as_object().into_iter().flatten();
    for (key, value) in values.filter(|(key, _)| *key != "step") {
        if let Some(v) = value.as_f64() {
            events.scalar(&tensorboard::tag(key), v, step as u64, wall_time)?;
        }
    }
    events.flush()
}

/// Adds where to continue from to an error that stopped the run.
fn stop_note(e: anyhow::Error, last_checkpoint: Option<&std::path::Path>) -> anyhow::Error {
    if e.downcast_ref::<NonFinite>().is_none() {
        return e;
    }
    let note = match last_checkpoint {
        Some(dir) => format!(
            "stopping; the last good checkpoint is {} (continue with --resume, e.g. at a lower learning rate)",
            dir.display()
        ),
        None => "stopping; no checkpoint was saved in this run (--save-steps N writes them)".into(),
    };
    anyhow::anyhow!("{e}: {note}")
}
