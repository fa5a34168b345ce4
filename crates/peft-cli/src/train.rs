use crate::plot::{write_loss_chart, Series};
use crate::{load_base_with, model_name, DTypeArg, QuantArg};
use anyhow::{bail, Context, Result};
use peft::{
    Adapter, BottleneckConfig, BottleneckModel, FullModel, Ia3Config, Ia3Model, LoraConfig,
    PeftModel, PromptInit, PromptModel, TargetModules, TokensConfig, TokensModel, Tuned,
};
use peft_models::loader::QuantizeOnLoad;
use peft_models::tokenizer::Tokenizer;
use peft_models::{Llama, Neftune};
use peft_train::{
    load_data, map_columns, pack, parse_column_mapping, split_eval, tokenize_records_with, Echo,
    Example, LossOn, OptimKind, SchedulerKind, TrainArgs, Trainer, Truncation, Warmup,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Flags of `peft train`. A TOML recipe (`--config`) may set any of them under the same
/// name (snake_case); flags given on the command line win.
#[derive(clap::Args, Serialize, Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct TrainCmd {
    /// TOML recipe with any of these options.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// HF model folder, .gguf file, or Hub id (`org/name`, downloaded into the Hub cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// JSONL, Parquet, CSV or TSV data, or a Hub data set id (its training split): `text`,
    /// `messages`, `prompt`/`completion` or Alpaca `instruction`/`input`/`output` records.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Column mapping, `field=column,...` (e.g. `prompt=question,completion=answer`).
    #[arg(long)]
    columns: Option<String>,
    /// Folder for the adapter, metrics.jsonl, loss.svg/png, checkpoints and per-epoch adapters.
    #[arg(long)]
    output: Option<PathBuf>,
    /// lora, dora, ia3, prompt (prompt tuning), prefix or ptuning-v2 (prefix tuning: virtual
    /// keys and values at every layer), adapter (bottleneck adapters), trainable-tokens (the
    /// embedding rows of --trainable-token-indices alone), or full (full fine-tuning: every
    /// weight trained, saved as a complete model folder).
    #[arg(long)]
    method: Option<String>,
    /// Continue training an adapter (a folder of any method, or a Hub id): its config sets the
    /// method and its options, its weights are where training starts, as HF PEFT's
    /// `PeftModel.from_pretrained(model, adapter, is_trainable=True)` (axolotl's
    /// `lora_model_dir`); without --model, the base is the one its config names.
    #[arg(long)]
    #[serde(alias = "lora_model_dir")]
    adapter: Option<PathBuf>,
    /// Bottleneck adapters: houlsby (after attention and MLP) or pfeiffer (after the MLP).
    #[arg(long)]
    adapter_config: Option<String>,
    /// Bottleneck width = hidden size / this (default 16).
    #[arg(long)]
    reduction_factor: Option<usize>,
    /// Bottleneck non-linearity: relu, swish, gelu or tanh.
    #[arg(long)]
    non_linearity: Option<String>,
    /// IA3: targets whose input (not output) is scaled (default down_proj).
    #[arg(long)]
    feedforward_modules: Option<String>,
    /// Virtual tokens of prompt and prefix tuning.
    #[arg(long)]
    num_virtual_tokens: Option<usize>,
    /// Prefix tuning: train the prefixes through an MLP (saved as its output, as PEFT does).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    prefix_projection: Option<bool>,
    /// Hidden width of the prefix projection MLP (default 512).
    #[arg(long)]
    encoder_hidden_size: Option<usize>,
    /// Prompt tuning init: random, sample_vocab or text.
    #[arg(long)]
    prompt_tuning_init: Option<String>,
    #[arg(long)]
    prompt_tuning_init_text: Option<String>,
    #[arg(long)]
    r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Comma-separated names (suffix match), `all-linear`, or `re:<full-match regex>`.
    #[arg(long)]
    target_modules: Option<String>,
    #[arg(long)]
    exclude_modules: Option<String>,
    /// Parameters LoRA adapts directly (HF PEFT's `target_parameters`): a mixture-of-experts
    /// block's `gate.weight`, `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`.
    #[arg(long)]
    target_parameters: Option<String>,
    /// none | all | lora_only
    #[arg(long)]
    bias: Option<String>,
    #[arg(long)]
    use_rslora: Option<bool>,
    /// DoRA: a trainable magnitude per output row (also `--method dora`).
    #[arg(long)]
    use_dora: Option<bool>,
    /// Comma-separated modules trained in full and saved with the adapter: linear layers,
    /// lm_head, embed_tokens (a tied head and embedding are untied, as in HF PEFT).
    #[arg(long)]
    modules_to_save: Option<String>,
    /// true (kaiming-uniform A, zero B), false, gaussian, orthogonal (A and B both nonzero
    /// with B·A = 0; even r); pissa (A and B from the top
    /// singular vectors of each base weight, which keeps the rest), pissa_niter_N (the same by
    /// a randomized SVD with N subspace iterations: large models) or olora (from its QR
    /// decomposition). Those save the adapter converted for the original base, as HF PEFT's
    /// path_initial_model_for_weight_conversion does (rank and alpha doubled). loftq (QLoRA:
    /// A and B from the top singular vectors of each weight's 4-bit quantization error, as HF
    /// PEFT's replace_lora_weights_loftq; implies --quantize nf4).
    #[arg(long)]
    init_lora_weights: Option<String>,
    /// HF PEFT's LoftQConfig as JSON (`{"loftq_bits": 4, "loftq_iter": 1}`, the only values
    /// taken: LoftQ here corrects the base's own 4-bit quantization).
    #[arg(long)]
    loftq_config: Option<String>,
    /// Train the embedding rows of these tokens (comma-separated ids), as HF PEFT's
    /// trainable_token_indices: new or untrained special tokens without training the whole
    /// embedding (a tied head uses the trained rows too).
    #[arg(long)]
    trainable_token_indices: Option<String>,
    /// Add these special tokens (comma-separated; e.g. a chat template's that the base lacks)
    /// to the tokenizer, grow the embedding to hold them (a multiple of 64 rows, as TRL's
    /// clone_chat_template), and train their rows (LoRA's trainable_token_indices); the
    /// adapter then carries the grown embedding and OUTPUT the tokenizer.
    #[arg(long)]
    add_special_tokens: Option<String>,
    /// Only the target modules of these layers (comma-separated indices, e.g. 0,1,2).
    #[arg(long)]
    layers_to_transform: Option<String>,
    /// Conversations: loss on the assistant's replies only (default true; TRL's default is
    /// false, every token).
    #[arg(long)]
    assistant_only_loss: Option<bool>,
    /// A Jinja chat template file to use instead of the model's (for example one of TRL's
    /// training templates, whose `{% generation %}` blocks mark the assistant text to train
    /// on), or a tokenizer (folder or Hub id) whose template, EOS token and added tokens are
    /// taken, as TRL's chat_template_path (clone_chat_template: the embedding grows to a
    /// multiple of 64 and the new tokens' rows train, LoRA). The tokenizer with it is saved in
    /// OUTPUT, where generate, chat and merge find it.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Prompt/completion records: loss on the completion only (default true, as TRL).
    #[arg(long)]
    completion_only_loss: Option<bool>,
    #[arg(long)]
    max_steps: Option<usize>,
    /// Passes over the data (a fraction such as 0.5 trains that share of the steps).
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Examples per evaluation batch (TRL's `per_device_eval_batch_size`; the eval loss is
    /// each batch's mean token loss, weighted by its examples); default: --batch-size (TRL's
    /// default is 8).
    #[arg(long)]
    eval_batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// Fraction of the optimizer steps spent warming up (default 0.03).
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// Warmup steps: a count, or a fraction of the steps below 1 (transformers 5's
    /// `warmup_steps`); wins over --warmup-ratio.
    #[arg(long)]
    warmup_steps: Option<f64>,
    /// transformers' `lr_scheduler_type` (default cosine); `constant` has no warmup, as there.
    #[arg(long, value_enum, alias = "lr-scheduler-type")]
    lr_scheduler: Option<SchedulerKind>,
    /// The scheduler's options as JSON, as transformers' `lr_scheduler_kwargs`:
    /// `{"min_lr_rate": 0.1}` (cosine_with_min_lr), `{"num_cycles": 3}`, `{"power": 2,
    /// "lr_end": 1e-6}`, `{"num_decay_steps": 100}` (warmup_stable_decay), ...
    #[arg(long)]
    lr_scheduler_kwargs: Option<String>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    adam_beta1: Option<f64>,
    #[arg(long)]
    adam_beta2: Option<f64>,
    #[arg(long)]
    adam_epsilon: Option<f64>,
    /// Longer examples are cut to this many tokens (default 1024); with --packing, the length
    /// of a packed row.
    #[arg(long)]
    max_seq_length: Option<usize>,
    /// Pack several examples into each row of --max-seq-length tokens (best-fit decreasing).
    /// Packed examples keep their own positions and do not attend to each other.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    packing: Option<bool>,
    /// keep_start (default) or keep_end: which end of a record longer than --max-seq-length
    /// is kept (TRL's `truncation_mode`).
    #[arg(long)]
    truncation_mode: Option<String>,
    /// Pack the eval set too (TRL's `eval_packing`; default: as --packing). The eval loss is
    /// each batch's mean, so packing changes it.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    eval_packing: Option<bool>,
    /// Batch examples of similar length together (less padding).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    group_by_length: Option<bool>,
    /// Pad each batch to a multiple of this many tokens (default 1: to its longest example).
    /// Fewer distinct lengths: cuDNN's attention (on GPUs) plans per length, and 64 or 128
    /// keeps every batch on it.
    #[arg(long)]
    pad_to_multiple_of: Option<usize>,
    /// Fraction of the records held out for evaluation (e.g. 0.1).
    #[arg(long)]
    eval_split: Option<f64>,
    /// Evaluate on this data instead (TRL's `eval_dataset`): a file or a Hub data set split
    /// (`org/name/test`), in any format --data takes, with the same --columns.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// NEFTune: noise of ±alpha/sqrt(seq·hidden) on the input embeddings in training (TRL's
    /// `neftune_noise_alpha`; 5 is the paper's usual value).
    #[arg(long)]
    neftune_noise_alpha: Option<f64>,
    /// When to evaluate: steps (every --eval-steps, by default every --logging-steps, or 10
    /// steps), epoch (at the end of every epoch) or no (never); without it, every --eval-steps
    /// if given, else every epoch. An eval set is evaluated at the end too.
    #[arg(long)]
    eval_strategy: Option<String>,
    /// Evaluate every N steps (default: at the end of every epoch) and at the end; below 1, a
    /// fraction of the run's steps (0.1: ten evaluations), as transformers reads it.
    #[arg(long)]
    eval_steps: Option<f64>,
    /// Stop when the eval loss has not improved for this many evaluations in a row.
    #[arg(long)]
    early_stopping_patience: Option<usize>,
    /// An improvement must lower the eval loss by more than this (default 0).
    #[arg(long)]
    early_stopping_threshold: Option<f64>,
    /// At the end, save the weights of the checkpoint with the lowest eval loss
    /// (transformers' `load_best_model_at_end`). Needs checkpoints where the evaluations are
    /// (both every epoch, or --save-steps a multiple of --eval-steps); that checkpoint is kept
    /// beyond --save-total-limit.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    load_best_model_at_end: Option<bool>,
    /// What picks the best checkpoint: the eval loss (`loss` or `eval_loss`), the metric the
    /// evaluations compute.
    #[arg(long)]
    metric_for_best_model: Option<String>,
    /// Whether a higher metric is better: false, for the loss.
    #[arg(long)]
    greater_is_better: Option<bool>,
    #[arg(long)]
    seed: Option<u64>,
    /// Compute dtype (and dtype of the unquantized weights); default bf16, as TRL's, where the
    /// hardware has it. On a CPU, bf16 is mixed precision: f32 weights with bf16 matmuls
    /// (AVX512-BF16), as PyTorch's CPU autocast; without AVX512-BF16 it computes in f32.
    #[arg(long, value_enum, visible_alias = "compute-dtype")]
    dtype: Option<DTypeArg>,
    /// QLoRA: quantize the base's linear layers to 4 bits on load (lm_head stays dense).
    /// Turns gradient checkpointing on unless it is set to false.
    #[arg(long, value_enum)]
    quantize: Option<QuantArg>,
    /// Also quantize the 4-bit scales (8-bit, blocks of 256): 0.127 instead of 0.5 bit/param.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    double_quant: Option<bool>,
    /// LoRA+: LoRA's B matrices learn at this multiple of the learning rate (16 in the paper;
    /// HF PEFT's `loraplus_lr_ratio`).
    #[arg(long)]
    loraplus_lr_ratio: Option<f64>,
    /// adamw (f32 moments), adamw_8bit or paged_adamw_8bit (8-bit moments).
    #[arg(long, value_enum)]
    optim: Option<OptimKind>,
    /// Mixture-of-experts models: the weight of the routers' load-balancing loss in the loss
    /// (TRL's `router_aux_loss_coef`); by default the model config's, 0 leaves it out.
    #[arg(long)]
    router_aux_loss_coef: Option<f64>,
    /// cpu (default), cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Recompute each decoder layer in the backward pass (less memory, ~1/3 more compute).
    #[arg(long)]
    gradient_checkpointing: Option<bool>,
    /// Log every N steps (default 1); below 1, a fraction of the run's steps.
    #[arg(long)]
    logging_steps: Option<f64>,
    /// Also log the first step (transformers' `logging_first_step`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    logging_first_step: Option<bool>,
    /// No progress bar: the metrics lines on stderr instead (transformers' `disable_tqdm`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    disable_tqdm: Option<bool>,
    /// tensorboard (or all): also log the metrics as TensorBoard scalars (`train/loss`,
    /// `eval/loss`, ...) in OUTPUT/runs/<date>_<host>, or in $TENSORBOARD_LOGGING_DIR, as
    /// transformers does; none (the default): metrics.jsonl and the loss plot alone.
    #[arg(long)]
    report_to: Option<String>,
    /// Also save the adapter after every epoch (OUTPUT/epoch-N).
    #[arg(long)]
    save_every_epoch: Option<bool>,
    /// Write a checkpoint (adapter, optimizer state, position) every N steps
    /// (OUTPUT/checkpoint-N); below 1, a fraction of the run's steps.
    #[arg(long)]
    save_steps: Option<f64>,
    /// When to write checkpoints: steps (every --save-steps, the default), epoch (at the end of
    /// every epoch) or no.
    #[arg(long)]
    save_strategy: Option<String>,
    /// Checkpoints without the optimizer state (transformers' `save_only_model`): smaller,
    /// but not resumable (Ctrl-C's checkpoint keeps it).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    save_only_model: Option<bool>,
    /// Keep only the newest K checkpoints.
    #[arg(long)]
    save_total_limit: Option<usize>,
    /// Continue a run from a checkpoint folder, or `latest` in --output; the loss sequence
    /// continues exactly as if the run had not stopped.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// auto (default: on GPUs), on or off: before training, time a forward and backward pass
    /// of the first batch under each interchangeable kernel path (cuDNN's attention or ours,
    /// cuBLAS's LoRA products or ours, ...) and keep the fastest, as PyTorch's
    /// `cudnn.benchmark`. The environment variable of a path (docs/gpu.md) fixes it.
    #[arg(long)]
    kernel_tuning: Option<String>,
    /// No progress bar and no metrics lines: the trainable-parameters line, the final summary
    /// line and errors.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    quiet: Option<bool>,
    /// For scripts: no progress bar; every metrics line, then a summary object, as JSON on
    /// stdout.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    json: Option<bool>,
}

/// TRL `SFTConfig` / transformers `TrainingArguments` names a recipe may use for our options,
/// so that settings copied from a Python script read as they are.
const TRL_NAMES: &[(&str, &str)] = &[
    ("learning_rate", "lr"),
    ("num_train_epochs", "epochs"),
    ("per_device_train_batch_size", "batch_size"),
    ("per_device_eval_batch_size", "eval_batch_size"),
    ("gradient_accumulation_steps", "grad_accum"),
    ("lr_scheduler_type", "lr_scheduler"),
    ("max_length", "max_seq_length"),
    ("output_dir", "output"),
    ("chat_template_path", "chat_template"),
];

/// TRL / transformers settings that change nothing peft computes (data loader workers,
/// kernels and compilation, run names): a recipe may keep them, and is told they do nothing.
const NO_EFFECT: &[&str] = &[
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataset_num_proc",
    "use_liger_kernel",
    "torch_compile",
    "gradient_checkpointing_kwargs",
    "remove_unused_columns",
    "ddp_find_unused_parameters",
    "tf32",
    "run_name",
    "save_safetensors",
];

/// Recipe values overlaid with the flags that were given.
fn merged(cmd: TrainCmd) -> Result<TrainCmd> {
    let Some(path) = &cmd.config else {
        return Ok(cmd);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read recipe {}", path.display()))?;
    let recipe: toml::Value = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not valid TOML: {e}", path.display()))?;
    let mut base = serde_json::to_value(recipe)?;
    // Module lists may be TOML arrays, as in HF configs: the flags take them comma-separated.
    if let Value::Object(b) = &mut base {
        for key in [
            "target_modules",
            "exclude_modules",
            "target_parameters",
            "modules_to_save",
            "feedforward_modules",
            "layers_to_transform",
            "report_to",
            "trainable_token_indices",
        ] {
            let items = match b.get(key) {
                Some(Value::Array(items)) => items.clone(),
                Some(n @ Value::Number(_)) => vec![n.clone()],
                _ => continue,
            };
            let names = items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect::<Option<Vec<String>>>()
                .with_context(|| format!("recipe {}: {key} must list names", path.display()))?;
            b.insert(key.to_string(), Value::String(names.join(",")));
        }
        // A table in a recipe, JSON text as a flag.
        for key in ["lr_scheduler_kwargs", "loftq_config"] {
            if let Some(table @ Value::Object(_)) = b.get(key) {
                let text = table.to_string();
                b.insert(key.into(), Value::String(text));
            }
        }
        // TRL's precision switches and text column, as our options.
        for (flag, dtype) in [("bf16", "bf16"), ("fp16", "f16")] {
            match b.remove(flag) {
                None => {}
                // `bf16 = false` asks for f32; `fp16 = false` asks for nothing.
                Some(Value::Bool(on)) if !b.contains_key("dtype") && (on || flag == "bf16") => {
                    let dtype = if on { dtype } else { "f32" };
                    b.insert("dtype".into(), Value::String(dtype.into()));
                }
                Some(Value::Bool(_)) => {}
                Some(v) => bail!(
                    "recipe {}: {flag} must be true or false, got {v}",
                    path.display()
                ),
            }
        }
        if let Some(field) = b.remove("dataset_text_field") {
            let Value::String(field) = field else {
                bail!(
                    "recipe {}: dataset_text_field must name a column",
                    path.display()
                );
            };
            let mapping = match b.get("columns").and_then(Value::as_str) {
                Some(columns) => format!("{columns},text={field}"),
                None => format!("text={field}"),
            };
            b.insert("columns".into(), Value::String(mapping));
        }
        let ignored: Vec<&str> = NO_EFFECT
            .iter()
            .copied()
            .filter(|k| b.remove(*k).is_some())
            .collect();
        if !ignored.is_empty() {
            eprintln!(
                "note: recipe {}: {} change nothing in peft",
                path.display(),
                ignored.join(", ")
            );
        }
        // Settings with one value peft has (TRL's best-fit packing, no upload).
        let one_value = [
            ("packing_strategy", Value::from("bfd")),
            ("push_to_hub", Value::Bool(false)),
        ];
        for (key, ours) in one_value {
            match b.remove(key) {
                Some(v) if v != ours => bail!(
                    "recipe {}: {key} = {v} is not supported (peft has {ours})",
                    path.display()
                ),
                _ => {}
            }
        }
        for (trl, ours) in TRL_NAMES {
            if let Some(v) = b.remove(*trl) {
                if b.contains_key(*ours) {
                    bail!(
                        "recipe {}: {trl} and {ours} set the same option: keep one",
                        path.display()
                    );
                }
                b.insert(ours.to_string(), v);
            }
        }
    }
    // A warmup ratio given as a flag wins over the recipe's warmup steps (which would win
    // over any ratio once both are set).
    if cmd.warmup_ratio.is_some() && cmd.warmup_steps.is_none() {
        if let Value::Object(b) = &mut base {
            b.remove("warmup_steps");
        }
    }
    let flags = serde_json::to_value(&cmd)?;
    if let (Value::Object(b), Value::Object(f)) = (&mut base, flags) {
        for (k, v) in f {
            if !v.is_null() {
                b.insert(k, v);
            }
        }
    }
    let mut out: TrainCmd = serde_json::from_value(base.clone()).map_err(|e| {
        // serde names the expected type, not the key: find the key that fails alone.
        let key = base.as_object().and_then(|b| {
            b.iter().find_map(|(k, v)| {
                let alone = serde_json::json!({ k.clone(): v.clone() });
                serde_json::from_value::<TrainCmd>(alone)
                    .is_err()
                    .then_some(k)
            })
        });
        match key {
            Some(k) => anyhow::anyhow!("recipe {}: {k}: {e}", path.display()),
            None => anyhow::anyhow!("recipe {}: {e}", path.display()),
        }
    })?;
    out.config = cmd.config;
    Ok(out)
}

fn require<T>(v: Option<T>, name: &str) -> Result<T> {
    v.with_context(|| {
        format!(
            "--{name} is required (flag or recipe key {})",
            name.replace('-', "_")
        )
    })
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The model of `method` on `base`, configured by the method's options in `c`.
pub fn build_model(
    method: &str,
    base: Llama,
    c: &TrainCmd,
    tok: &Tokenizer,
    seed: u64,
) -> Result<Box<dyn Tuned>> {
    let init = match c.init_lora_weights.as_deref().unwrap_or("true") {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        other => {
            let init = Value::String(other.into());
            peft::lora::init::WeightInit::parse(&init).map_err(|_| {
                anyhow::anyhow!("--init-lora-weights must be true, false, gaussian, orthogonal, pissa, pissa_niter_N, olora or loftq, got {other:?}")
            })?;
            init
        }
    };
    let r = c.r.unwrap_or(16);
    let mut other = serde_json::Map::new();
    if let Some(text) = &c.loftq_config {
        let settings: Value = serde_json::from_str(text)
            .with_context(|| format!("--loftq-config is not JSON: {text}"))?;
        other.insert("loftq_config".into(), settings);
    }
    let token_ids = c
        .trainable_token_indices
        .as_deref()
        .map(|ids| {
            list(ids)
                .iter()
                .map(|t| t.parse::<u32>())
                .collect::<std::result::Result<Vec<u32>, _>>()
                .map_err(|_| {
                    anyhow::anyhow!("--trainable-token-indices must list token ids, got {ids:?}")
                })
        })
        .transpose()?;
    if let Some(ids) = &token_ids {
        other.insert("trainable_token_indices".into(), Value::from(ids.clone()));
    }
    let lora = LoraConfig {
        r,
        lora_alpha: c.lora_alpha.unwrap_or(2.0 * r as f64),
        lora_dropout: c.lora_dropout.unwrap_or(0.05),
        target_modules: Some(match (&c.target_modules, &c.target_parameters) {
            (Some(t), _) => TargetModules::parse_flag(t),
            // Parameters alone, as HF PEFT takes target_parameters without target_modules.
            (None, Some(_)) => TargetModules::List(Vec::new()),
            // The attention projections (Phi-3 fuses q, k and v into one; latent attention
            // has five).
            (None, None) => TargetModules::List(base.config.attention_projections()),
        }),
        target_parameters: c.target_parameters.as_deref().map(list),
        exclude_modules: c.exclude_modules.as_deref().map(TargetModules::parse_flag),
        bias: c.bias.clone().unwrap_or_else(|| "none".into()),
        use_rslora: c.use_rslora.unwrap_or(false),
        use_dora: c.use_dora.unwrap_or(method == "dora"),
        modules_to_save: c.modules_to_save.as_deref().map(list),
        init_lora_weights: init,
        layers_to_transform: c
            .layers_to_transform
            .as_deref()
            .map(parse_layers)
            .transpose()?,
        other,
        ..Default::default()
    };
    let virtual_tokens = c.num_virtual_tokens.unwrap_or(20);
    Ok(match method {
        "prompt" => {
            let init = match c.prompt_tuning_init.as_deref().unwrap_or("random") {
                "random" => PromptInit::Random,
                "sample_vocab" => PromptInit::SampleVocab,
                "text" => {
                    let text = c
                        .prompt_tuning_init_text
                        .as_deref()
                        .context("--prompt-tuning-init text needs --prompt-tuning-init-text")?;
                    PromptInit::Text(tok.encode(text, false)?)
                }
                other => bail!(
                    "--prompt-tuning-init must be random, sample_vocab or text, got {other:?}"
                ),
            };
            let mut m = PromptModel::new_prompt_tuning(base, virtual_tokens, init, seed)?;
            m.config.prompt_tuning_init_text = c.prompt_tuning_init_text.clone();
            if m.config.prompt_tuning_init.as_deref() == Some("TEXT") {
                m.config.tokenizer_name_or_path = c.model.as_deref().map(model_name);
            }
            Box::new(m)
        }
        "adapter" => {
            let factor = c.reduction_factor.unwrap_or(16);
            let mut config = match c.adapter_config.as_deref().unwrap_or("pfeiffer") {
                "houlsby" => BottleneckConfig::houlsby(factor),
                "pfeiffer" => BottleneckConfig::pfeiffer(factor),
                other => bail!("--adapter-config must be houlsby or pfeiffer, got {other:?}"),
            };
            if let Some(act) = &c.non_linearity {
                config.non_linearity = act.clone();
            }
            Box::new(BottleneckModel::new(base, config, seed)?)
        }
        "ia3" => {
            let config = Ia3Config {
                target_modules: c.target_modules.as_deref().map(TargetModules::parse_flag),
                exclude_modules: c.exclude_modules.as_deref().map(TargetModules::parse_flag),
                feedforward_modules: c
                    .feedforward_modules
                    .as_deref()
                    .map(TargetModules::parse_flag),
                ..Default::default()
            };
            Box::new(Ia3Model::new(base, config)?)
        }
        "full" => Box::new(FullModel::new(base)?),
        "trainable-tokens" => {
            let ids =
                token_ids.context("--method trainable-tokens needs --trainable-token-indices")?;
            Box::new(TokensModel::new(base, TokensConfig::new(&ids), seed)?)
        }
        "prefix" | "ptuning-v2" => Box::new(PromptModel::new_prefix_tuning(
            base,
            virtual_tokens,
            seed,
            c.prefix_projection
                .unwrap_or(false)
                .then_some(c.encoder_hidden_size.unwrap_or(512)),
        )?),
        _ => Box::new(PeftModel::new(base, lora, seed)?),
    })
}

/// `--method` values.
const METHODS: &[&str] = &[
    "lora",
    "dora",
    "ia3",
    "prompt",
    "prefix",
    "ptuning-v2",
    "adapter",
    "trainable-tokens",
    "full",
];

/// The methods that train LoRA pairs.
fn is_lora(method: &str) -> bool {
    matches!(method, "lora" | "dora")
}

/// `--layers-to-transform 0,1,2` as HF's `layers_to_transform` list.
fn parse_layers(spec: &str) -> Result<Value> {
    spec.split(',')
        .map(|i| {
            i.trim().parse::<u64>().map(Value::from).map_err(|_| {
                anyhow::anyhow!(
                    "--layers-to-transform takes layer indices like 0,1,2, got {spec:?}"
                )
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Value::Array)
}

/// Options set (by flag or recipe) that `method` does not read: a note, not an error, since a
/// recipe may serve several methods.
fn ignored_flags(c: &TrainCmd, method: &str) -> Vec<&'static str> {
    method_options(c, method)
        .iter()
        .filter(|(_, set, read)| *set && !*read)
        .map(|(flag, ..)| *flag)
        .collect()
}

/// The method, as `peft train --method` names it, of an adapter whose config says `peft_type`.
fn method_of(peft_type: &str) -> &'static str {
    match peft_type {
        "IA3" => "ia3",
        "BOTTLENECK" => "adapter",
        "PROMPT_TUNING" | "P_TUNING" => "prompt",
        "PREFIX_TUNING" => "prefix",
        "TRAINABLE_TOKENS" => "trainable-tokens",
        _ => "lora",
    }
}

/// The method of the adapter `dir` that `--adapter` continues; a `--method` that names another
/// one, or an option of the method's config given again, is an error.
fn continued_method(c: &TrainCmd, dir: &Path) -> Result<String> {
    let method = method_of(&peft::adapter_type(dir)?);
    let alike = |given: &str| {
        given == method
            || is_lora(given) && is_lora(method)
            || given == "ptuning-v2" && method == "prefix"
    };
    if let Some(given) = c.method.as_deref().filter(|m| !alike(m)) {
        bail!(
            "--method {given} does not match the adapter in {}, a {method} adapter (--adapter continues it as it is)",
            dir.display()
        );
    }
    // Optimizer settings stay the run's own.
    let from_config: Vec<&str> = method_options(c, method)
        .iter()
        .filter(|(flag, set, _)| *set && *flag != "--loraplus-lr-ratio")
        .map(|(flag, ..)| *flag)
        .collect();
    if !from_config.is_empty() {
        bail!(
            "{} set what the adapter's config in {} sets; drop {} to continue it (--adapter)",
            from_config.join(", "),
            dir.display(),
            if from_config.len() == 1 { "it" } else { "them" }
        );
    }
    Ok(method.to_string())
}

/// Each method option: its flag, whether it is set, and whether `method` reads it.
fn method_options(c: &TrainCmd, method: &str) -> Vec<(&'static str, bool, bool)> {
    let lora = is_lora(method);
    let ia3 = method == "ia3";
    let prompt = method == "prompt";
    let prefix = matches!(method, "prefix" | "ptuning-v2");
    let adapter = method == "adapter";
    let options = [
        ("--r", c.r.is_some(), lora),
        ("--lora-alpha", c.lora_alpha.is_some(), lora),
        ("--lora-dropout", c.lora_dropout.is_some(), lora),
        ("--use-rslora", c.use_rslora.is_some(), lora),
        ("--use-dora", c.use_dora.is_some(), lora),
        ("--bias", c.bias.is_some(), lora),
        ("--init-lora-weights", c.init_lora_weights.is_some(), lora),
        ("--loftq-config", c.loftq_config.is_some(), lora),
        (
            "--trainable-token-indices",
            c.trainable_token_indices.is_some(),
            lora || method == "trainable-tokens",
        ),
        ("--loraplus-lr-ratio", c.loraplus_lr_ratio.is_some(), lora),
        ("--add-special-tokens", c.add_special_tokens.is_some(), lora),
        (
            "--layers-to-transform",
            c.layers_to_transform.is_some(),
            lora,
        ),
        ("--modules-to-save", c.modules_to_save.is_some(), lora),
        ("--target-parameters", c.target_parameters.is_some(), lora),
        ("--target-modules", c.target_modules.is_some(), lora || ia3),
        (
            "--exclude-modules",
            c.exclude_modules.is_some(),
            lora || ia3,
        ),
        (
            "--feedforward-modules",
            c.feedforward_modules.is_some(),
            ia3,
        ),
        (
            "--num-virtual-tokens",
            c.num_virtual_tokens.is_some(),
            prompt || prefix,
        ),
        ("--prefix-projection", c.prefix_projection.is_some(), prefix),
        (
            "--encoder-hidden-size",
            c.encoder_hidden_size.is_some(),
            prefix,
        ),
        (
            "--prompt-tuning-init",
            c.prompt_tuning_init.is_some(),
            prompt,
        ),
        (
            "--prompt-tuning-init-text",
            c.prompt_tuning_init_text.is_some(),
            prompt,
        ),
        ("--adapter-config", c.adapter_config.is_some(), adapter),
        ("--reduction-factor", c.reduction_factor.is_some(), adapter),
        ("--non-linearity", c.non_linearity.is_some(), adapter),
    ];
    options.to_vec()
}

/// Fails on a `--method` value that is not one of [`METHODS`].
pub fn check_method(method: &str) -> Result<()> {
    if !METHODS.contains(&method) {
        bail!(
            "unknown method {method:?} (available: {})",
            METHODS.join(", ")
        );
    }
    Ok(())
}

pub fn run(cmd: TrainCmd) -> Result<()> {
    let mut c = merged(cmd)?;
    let data_path = require(c.data.clone(), "data")?;
    let output = require(c.output.clone(), "output")?;
    let adapter = c
        .adapter
        .as_deref()
        .map(|dir| peft_models::hub::locate(dir, peft_models::hub::Wanted::Adapter))
        .transpose()?;
    let method = match &adapter {
        Some(dir) => continued_method(&c, dir)?,
        None => c.method.clone().unwrap_or_else(|| "lora".into()),
    };
    let model_path = match (&c.model, &adapter) {
        (None, Some(dir)) => crate::base_model(None, Some(&mut dir.clone()))?,
        _ => require(c.model.clone(), "model")?,
    };
    check_method(&method)?;
    if c.add_special_tokens.is_some() && !is_lora(&method) {
        bail!("--add-special-tokens works with LoRA (--method lora or dora)");
    }
    let ignored = ignored_flags(&c, &method);
    if !ignored.is_empty() {
        eprintln!(
            "note: {} {} no effect with --method {method}",
            ignored.join(", "),
            if ignored.len() == 1 { "has" } else { "have" }
        );
    }
    let quiet = c.quiet.unwrap_or(false);
    let json_mode = c.json.unwrap_or(false);
    let packing = c.packing.unwrap_or(false);
    if (packing || c.eval_packing == Some(true)) && method == "prompt" {
        bail!("--packing does not work with prompt tuning: its virtual tokens lead a row, so only the first packed example would see them");
    }
    let logging = interval(c.logging_steps, "logging_steps")?;
    let eval_steps = interval(c.eval_steps, "eval_steps")?;
    let save_steps = interval(c.save_steps, "save_steps")?;
    let (save, save_checkpoint_every_epoch) = match c.save_strategy.as_deref() {
        None | Some("steps") => (save_steps, false),
        Some("epoch") => (None, true),
        Some("no") => (None, false),
        Some(other) => bail!("--save-strategy must be steps, epoch or no, got {other:?}"),
    };
    let (eval, evaluate) = match c.eval_strategy.as_deref() {
        None => (eval_steps, true),
        // transformers' default is the logging interval; ours logs every step, so without
        // either set, TRL's logging interval of 10.
        Some("steps") => (eval_steps.or(logging).or(Some(Interval::Steps(10))), true),
        Some("epoch") => (None, true),
        Some("no") => (None, false),
        Some(other) => bail!("--eval-strategy must be steps, epoch or no, got {other:?}"),
    };
    let intervals = Intervals {
        logging,
        eval,
        save,
    };
    // Whole-step intervals here, fractions once the run's length is known (`resolve`); until
    // then a fraction stands in as its share of a million steps, as transformers checks
    // fractions against each other.
    let steps = |i: Option<Interval>| i.map(|i| i.steps(1_000_000));
    let d = TrainArgs::default();
    let mut args = TrainArgs {
        epochs: c.epochs.unwrap_or(d.epochs),
        max_steps: c.max_steps,
        batch_size: c.batch_size.unwrap_or(d.batch_size),
        eval_batch_size: c.eval_batch_size,
        grad_accum: c.grad_accum.unwrap_or(d.grad_accum),
        lr: c.lr.unwrap_or(d.lr),
        warmup: match (c.warmup_steps, c.warmup_ratio) {
            (Some(steps), _) => Warmup::from_warmup_steps(steps)?,
            (None, Some(ratio)) => Warmup::Ratio(ratio),
            (None, None) => d.warmup,
        },
        scheduler: c.lr_scheduler.unwrap_or(d.scheduler),
        scheduler_kwargs: match &c.lr_scheduler_kwargs {
            Some(text) => match serde_json::from_str(text) {
                Ok(Value::Object(map)) => map,
                _ => bail!(
                    "--lr-scheduler-kwargs must be a JSON object such as '{{\"min_lr_rate\": 0.1}}', got {text:?}"
                ),
            },
            None => d.scheduler_kwargs.clone(),
        },
        max_grad_norm: c.max_grad_norm.unwrap_or(d.max_grad_norm),
        weight_decay: c.weight_decay.unwrap_or(d.weight_decay),
        adam_beta1: c.adam_beta1.unwrap_or(d.adam_beta1),
        adam_beta2: c.adam_beta2.unwrap_or(d.adam_beta2),
        adam_eps: c.adam_epsilon.unwrap_or(d.adam_eps),
        optim: c.optim.unwrap_or(d.optim),
        // LoRA's alone (IA3's vectors are 1-D too, and would be sped up).
        loraplus_lr_ratio: c.loraplus_lr_ratio.filter(|_| is_lora(&method)),
        seed: c.seed.unwrap_or(d.seed),
        logging_steps: steps(logging).unwrap_or(d.logging_steps),
        save_every_epoch: c.save_every_epoch.unwrap_or(d.save_every_epoch),
        save_steps: steps(save),
        save_checkpoint_every_epoch,
        save_total_limit: c.save_total_limit,
        save_only_model: c.save_only_model.unwrap_or(false),
        resume_from: c.resume.clone(),
        interrupt: Some(interrupt_flag()?),
        output_dir: output.clone(),
        base_model_name: model_name(&model_path),
        // Set below, once the tokenizer is settled.
        tokenizer: None,
        show_progress: !quiet && !json_mode && !c.disable_tqdm.unwrap_or(false),
        echo: if json_mode {
            Echo::Stdout
        } else if quiet {
            Echo::Off
        } else {
            Echo::Stderr
        },
        group_by_length: c.group_by_length.unwrap_or(false),
        pad_to_multiple_of: c.pad_to_multiple_of.unwrap_or(1),
        eval_steps: steps(eval),
        early_stopping_patience: c.early_stopping_patience,
        early_stopping_threshold: c.early_stopping_threshold.unwrap_or(0.0),
        load_best_model_at_end: c.load_best_model_at_end.unwrap_or(false),
        logging_first_step: c.logging_first_step.unwrap_or(false),
        tensorboard_dir: tensorboard_dir(c.report_to.as_deref(), &output)?,
        kernel_tuning: match &c.kernel_tuning {
            Some(v) => peft_ops::KernelTuning::parse(v).map_err(anyhow::Error::msg)?,
            None => d.kernel_tuning,
        },
        router_aux_loss_coef: c.router_aux_loss_coef,
    };
    let eval_split = c.eval_split.unwrap_or(0.0);
    if c.eval_data.is_some() && eval_split > 0.0 {
        bail!("--eval-data and --eval-split both choose the eval set: keep one");
    }
    check_best_metric(&c)?;
    let needs_evals = [
        (
            "--early-stopping-patience",
            c.early_stopping_patience.is_some(),
        ),
        ("--load-best-model-at-end", args.load_best_model_at_end),
    ];
    for (flag, _) in needs_evals.iter().filter(|(_, set)| *set) {
        if !evaluate {
            bail!("{flag} needs evaluations: --eval-strategy is no");
        }
        if eval_split == 0.0 && c.eval_data.is_none() {
            bail!("{flag} needs eval data (--eval-split 0.1 or --eval-data FILE)");
        }
    }
    args.validate()?;
    if let (Some(dir), false) = (&args.tensorboard_dir, quiet || json_mode) {
        eprintln!("TensorBoard logs go to {}", dir.display());
    }
    let neftune = c.neftune_noise_alpha.map(Neftune::new).transpose()?;
    let max_seq_length = c.max_seq_length.unwrap_or(1024);
    let truncation = c
        .truncation_mode
        .as_deref()
        .map(Truncation::parse)
        .transpose()?
        .unwrap_or_default();

    // Cheap checks first: a bad data file should fail before the model loads.
    let columns = c.columns.as_deref().map(parse_column_mapping).transpose()?;
    let read = |path: &Path| -> Result<Vec<Value>> {
        let mut records = load_data(path)?;
        if let Some(columns) = &columns {
            map_columns(&mut records, columns).with_context(|| format!("in {}", path.display()))?;
        }
        Ok(records)
    };
    let records = read(&data_path)?;
    let eval_records = c
        .eval_data
        .as_deref()
        .map(|path| read(path).map(|records| (path, records)))
        .transpose()?;
    check_output_folder(&output)?;
    let device = peft_ops::open_device(c.device.as_deref().unwrap_or("cpu"))?;
    let dtype = DTypeArg::for_training(c.dtype, &device);
    let weight_init = c.init_lora_weights.as_deref().and_then(|init| {
        peft::lora::init::WeightInit::parse(&Value::String(init.into())).unwrap_or(None)
    });
    let loftq = weight_init == Some(peft::lora::init::WeightInit::Loftq);
    // LoftQ corrects a 4-bit base: HF PEFT's quantizes to NF4 (loftq_bits 4) by itself.
    let quant = match (c.quantize, loftq) {
        (None, true) => {
            if !quiet {
                eprintln!("note: --init-lora-weights loftq quantizes the base: --quantize nf4");
            }
            Some(QuantArg::Nf4)
        }
        (q, _) => q,
    };
    let quantize = quant.map(|q| QuantizeOnLoad {
        kind: q.kind(),
        double_quant: c.double_quant.unwrap_or(false),
        compute_dtype: dtype,
    });
    // PiSSA and OLoRA decompose the weights as they are, so a QLoRA base is quantized after,
    // its residual (QPiSSA: less quantization error than the weights themselves would have);
    // LoftQ compares the weights with their quantization.
    let quantize_later = quantize.filter(|_| weight_init.is_some());
    let quantize_on_load = quantize.filter(|_| weight_init.is_none());
    let (mut base, tok) = load_base_with(&model_path, dtype, &device, quantize_on_load)?;
    // prepare_model_for_kbit_training's default: checkpointing on for a quantized base
    // (quantized here, or stored in 4 bits: a bitsandbytes checkpoint).
    let stored_4bit = base
        .linears_mut()
        .iter()
        .any(|(_, l)| matches!(l.weight, peft_ops::LinearWeight::Quantized(_)));
    base.gradient_checkpointing = c
        .gradient_checkpointing
        .unwrap_or(quant.is_some() || stored_4bit);
    base.neftune = neftune;
    // A continued adapter's own tokenizer (its chat template, its added tokens) tokenizes the
    // data as it did in the run that made it.
    let continued_tok = adapter
        .as_deref()
        .map(crate::saved_tokenizer)
        .transpose()?
        .flatten();
    let adapter_has_tokenizer = continued_tok.is_some();
    let mut own_tokenizer = adapter_has_tokenizer || c.chat_template.is_some();
    let mut tok = continued_tok
        .or(tok)
        .context("the model has no tokenizer")?;
    // TRL's chat_template_path: a template file, or a tokenizer (folder or Hub id) whose
    // template, EOS token and added tokens are cloned (clone_chat_template).
    let mut added = Vec::new();
    let mut cloned = false;
    if let Some(path) = &c.chat_template {
        let jinja = path.extension().is_some_and(|e| e == "jinja" || e == "j2");
        if path.is_file() || jinja {
            let template = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the chat template {}", path.display()))?;
            tok.set_chat_template(template);
        } else {
            let dir = peft_models::hub::locate(path, peft_models::hub::Wanted::Tokenizer)
                .with_context(|| {
                    format!(
                        "--chat-template {}: neither a template file nor a tokenizer folder or Hub id",
                        path.display()
                    )
                })?;
            let source = peft_models::tokenizer::Tokenizer::from_hf_dir(&dir)?;
            added = tok
                .clone_chat_template(&source)
                .with_context(|| format!("--chat-template {}", path.display()))?;
            cloned = true;
        }
    }
    if let Some(tokens) = c.add_special_tokens.as_deref() {
        added.extend(tok.add_special_tokens(&list(tokens))?);
    }
    if !added.is_empty() {
        if !is_lora(&method) {
            bail!(
                "--chat-template adds tokens to the tokenizer ({}), which works with LoRA (--method lora or dora)",
                added.len()
            );
        }
        // TRL's clone_chat_template: a multiple of 64 rows, and for a cloned template
        // placeholder tokens up to that size, which train too.
        base.grow_vocab(tok.vocab_size().max(base.config.vocab_size).div_ceil(64) * 64)?;
        if cloned {
            added.extend(tok.fill_vocab(base.config.vocab_size)?);
        }
        let mut trained = c
            .trainable_token_indices
            .clone()
            .map(|l| list(&l))
            .unwrap_or_default();
        trained.extend(added.iter().map(|id| id.to_string()));
        c.trainable_token_indices = Some(trained.join(","));
        if !quiet {
            eprintln!(
                "added {} tokens (ids {}..={}): the vocabulary has {} rows, their rows train",
                added.len(),
                added.iter().min().unwrap_or(&0),
                added.iter().max().unwrap_or(&0),
                base.config.vocab_size
            );
            if base.lm_head.is_some() {
                eprintln!(
                    "note: the head is not tied to the embedding: the new tokens' output rows train only with --modules-to-save lm_head"
                );
            }
        }
        own_tokenizer = true;
    }
    let loss_on = LossOn {
        assistant_only: c.assistant_only_loss.unwrap_or(true),
        completion_only: c.completion_only_loss.unwrap_or(true),
    };
    let tokenize = |records: &[Value], path: &Path| -> Result<Vec<Example>> {
        let tokenized = tokenize_records_with(records, &tok, max_seq_length, loss_on, truncation)
            .with_context(|| format!("in {}", path.display()))?;
        if tokenized.truncated > 0 && !quiet {
            eprintln!(
                "note: {} of {} records of {} are longer than {max_seq_length} tokens and were cut (--max-seq-length)",
                tokenized.truncated,
                records.len(),
                path.display()
            );
        }
        if tokenized.dropped > 0 && !quiet {
            eprintln!(
                "note: {} records of {} have no trained token after truncation and were skipped",
                tokenized.dropped,
                path.display()
            );
        }
        Ok(tokenized.examples)
    };
    let examples = tokenize(&records, &data_path)?;
    let (mut examples, mut eval) = match &eval_records {
        Some((path, records)) => (examples, tokenize(records, path)?),
        None => split_eval(examples, eval_split, args.seed)?,
    };
    if !evaluate {
        // Held out all the same (the split was asked for), never evaluated.
        eval.clear();
    }
    if packing {
        let n = examples.len();
        examples = pack(&examples, max_seq_length);
        if !quiet {
            eprintln!(
                "packing: {n} examples in {} rows of up to {max_seq_length} tokens",
                examples.len()
            );
        }
    }
    if c.eval_packing.unwrap_or(packing) && !eval.is_empty() {
        eval = pack(&eval, max_seq_length);
    }
    intervals.resolve(&mut args, examples.len())?;
    let mut model = match &adapter {
        Some(dir) => {
            let vocab = base.config.vocab_size;
            let loaded = Adapter::load(base, dir)?;
            let grown = loaded.model().config.vocab_size;
            if !adapter_has_tokenizer {
                // The data would be tokenized without the added tokens.
                crate::base_tokenizer_fits(dir, vocab, grown)?;
            }
            if grown != vocab && !is_lora(&method) {
                bail!(
                    "the {method} adapter in {} grows the vocabulary from {vocab} to {grown} tokens; continuing such an adapter works with LoRA",
                    dir.display()
                );
            }
            loaded.into_tuned()
        }
        None => build_model(&method, base, &c, &tok, args.seed)?,
    };
    if let Some(q) = quantize_later {
        model.quantize_base(q.kind, q.double_quant, q.compute_dtype)?;
    }
    // On stderr also with --quiet: PEFT's print_trainable_parameters line is how users check
    // what they train.
    eprintln!("{}", model.trainable_parameters_line());
    let pad_id = tok.pad_token_id().unwrap_or(0);
    // A complete model folder (loadable by `peft generate --model` and by transformers), or,
    // beside the adapter, the tokenizer the data went through where it is not the base's, as
    // TRL saves it.
    args.tokenizer = (method == "full" || own_tokenizer).then(|| tok.clone());
    let summary = Trainer {
        model: model.as_mut(),
        args,
        pad_id,
    }
    .train_with_eval(&examples, &eval)?;
    save_tokenizer_note(&output, &model_path, &method)?;
    plot_metrics(&output)?;
    let first = summary.losses.first().copied().unwrap_or(f64::NAN);
    let last = summary.losses.last().copied().unwrap_or(f64::NAN);
    let eval_loss = summary.evals.last().map(|e| e.1);
    if json_mode {
        let line = serde_json::json!({
            "event": "done", "steps": summary.steps, "seconds": summary.seconds,
            "tokens_per_s": summary.tokens_per_s(), "loss_first": first, "loss_last": last,
            "eval_loss": eval_loss, "stopped_early": summary.stopped_early, "output": output,
            "kernel_tuning": summary.kernel_settings,
            "best_checkpoint": summary.best_checkpoint.map(|(step, loss)| {
                serde_json::json!({"step": step, "eval_loss": loss})
            }),
        });
        println!("{line}");
        return Ok(());
    }
    let eval_note = eval_loss
        .map(|l| format!("; eval loss {l:.4} (perplexity {:.2})", l.exp()))
        .unwrap_or_default();
    let early = if summary.stopped_early {
        " (early stopping: the eval loss stopped improving)"
    } else {
        ""
    };
    let best_note = summary
        .best_checkpoint
        .map(|(step, loss)| format!(" (the best checkpoint's: step {step}, eval loss {loss:.4})"))
        .unwrap_or_default();
    println!(
        "trained {} steps{early} in {:.1}s ({:.1} tokens/s); loss {first:.4} -> {last:.4}{eval_note}; {}{best_note} saved to {}",
        summary.steps,
        summary.seconds,
        summary.tokens_per_s(),
        if method == "full" { "model" } else { "adapter" },
        output.display()
    );
    Ok(())
}

/// A step interval as transformers reads `logging_steps`, `eval_steps` and `save_steps`: a
/// whole number of steps, or below 1 a fraction of the run's steps (rounded up).
#[derive(Clone, Copy)]
enum Interval {
    Steps(usize),
    Fraction(f64),
}

impl Interval {
    fn steps(self, total: usize) -> usize {
        match self {
            Interval::Steps(n) => n,
            Interval::Fraction(f) => (total as f64 * f).ceil() as usize,
        }
    }
}

fn interval(v: Option<f64>, name: &str) -> Result<Option<Interval>> {
    let Some(v) = v else { return Ok(None) };
    if !(v.is_finite() && v > 0.0) {
        bail!("{name} must be above 0, got {v}");
    }
    if v < 1.0 {
        return Ok(Some(Interval::Fraction(v)));
    }
    if v.fract() != 0.0 {
        bail!("{name} must be a whole number of steps, or below 1 a fraction of them, got {v}");
    }
    Ok(Some(Interval::Steps(v as usize)))
}

/// The step intervals the run takes (the eval interval after its fallback to the logging
/// one, none where the strategy is by epoch or no), fractions among them resolved once the
/// run's length is known.
struct Intervals {
    logging: Option<Interval>,
    eval: Option<Interval>,
    save: Option<Interval>,
}

impl Intervals {
    /// Sets the intervals of `args` for a run over `examples` training examples.
    fn resolve(&self, args: &mut TrainArgs, examples: usize) -> Result<()> {
        let total = args.total_steps(examples);
        if let Some(logging) = self.logging {
            args.logging_steps = logging.steps(total);
        }
        args.eval_steps = self.eval.map(|i| i.steps(total));
        args.save_steps = self.save.map(|i| i.steps(total));
        // Fractions that are multiples of each other stay so once rounded (0.1 and 0.2 of 11
        // steps: every 2 and 4, not 2 and 3), as transformers compares the fractions.
        if let (Some(Interval::Fraction(e)), Some(Interval::Fraction(s)), Some(eval)) =
            (self.eval, self.save, args.eval_steps)
        {
            let ratio = s / e;
            if (ratio - ratio.round()).abs() < 1e-9 && ratio >= 1.0 {
                args.save_steps = Some(eval * ratio.round() as usize);
            }
        }
        args.validate()
    }
}

/// Where `--report-to` asks for TensorBoard logs (transformers' `report_to`: a comma-separated
/// list; `all` is every integration there is, here TensorBoard).
fn tensorboard_dir(report_to: Option<&str>, output: &Path) -> Result<Option<PathBuf>> {
    let mut tensorboard = false;
    for target in list(report_to.unwrap_or("none")) {
        match target.as_str() {
            "tensorboard" | "all" => tensorboard = true,
            "none" => {}
            other => bail!(
                "--report-to {other:?} is not supported: peft logs to TensorBoard (tensorboard) \
                 and metrics.jsonl"
            ),
        }
    }
    Ok(tensorboard.then(|| peft_train::tensorboard::default_log_dir(output)))
}

/// The best checkpoint is the one of the lowest eval loss: the one metric evaluations compute.
fn check_best_metric(c: &TrainCmd) -> Result<()> {
    if let Some(metric) = &c.metric_for_best_model {
        if !matches!(metric.as_str(), "loss" | "eval_loss") {
            bail!(
                "--metric-for-best-model {metric:?}: the evaluations compute the eval loss \
                 alone (loss or eval_loss)"
            );
        }
    }
    if c.greater_is_better == Some(true) {
        bail!("--greater-is-better true would pick the checkpoint of the highest eval loss");
    }
    Ok(())
}

/// `OUTPUT/loss.svg` and `loss.png` from `metrics.jsonl` (the whole run, resumed parts
/// included): training loss per logged step, and the eval loss where evaluated.
fn plot_metrics(output: &Path) -> Result<()> {
    let path = output.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(Value::as_f64) else {
            continue;
        };
        if let Some(l) = v.get("loss").and_then(Value::as_f64) {
            train.push((step, l));
        }
        if let Some(l) = v.get("eval_loss").and_then(Value::as_f64) {
            eval.push((step, l));
        }
    }
    let mut series = vec![Series {
        name: "train loss".into(),
        points: train,
    }];
    if !eval.is_empty() {
        series.push(Series {
            name: "eval loss".into(),
            points: eval,
        });
    }
    write_loss_chart(&output.join("loss"), "loss per step", &series)
}

/// Fails early (before the model loads, creating nothing) when `output` cannot become a
/// folder: it, or the nearest existing folder above it, is a file or read-only.
fn check_output_folder(output: &Path) -> Result<()> {
    let mut existing = output;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => return Ok(()),
        }
    }
    let meta = std::fs::metadata(existing)
        .with_context(|| format!("cannot create output folder {}", output.display()))?;
    if !meta.is_dir() {
        bail!(
            "cannot create output folder {}: {} is not a folder",
            output.display(),
            existing.display()
        );
    }
    if meta.permissions().readonly() {
        bail!(
            "cannot create output folder {}: {} is read-only",
            output.display(),
            existing.display()
        );
    }
    // A folder in the place of a file the run ends by writing would fail only at the end.
    for name in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "model.safetensors",
    ] {
        let path = output.join(name);
        if path.is_dir() {
            bail!(
                "{} is a folder: the run would fail to write it",
                path.display()
            );
        }
    }
    Ok(())
}

/// PEFT adapters do not carry a tokenizer; we record which base they were trained on.
fn save_tokenizer_note(output: &Path, model: &Path, method: &str) -> Result<()> {
    let what = if method == "full" {
        "Model fine-tuned (every weight) with peft-rs from"
    } else {
        "Adapter trained with peft-rs on base model:"
    };
    let text = format!("{what} {}\n", model.display());
    peft_models::io::write_atomic(&output.join("README.md"), text.as_bytes())
}

/// A flag raised by Ctrl-C (SIGINT) or SIGTERM: the trainer finishes its step, writes a
/// checkpoint and stops.
fn interrupt_flag() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let raised = flag.clone();
    ctrlc::set_handler(move || raised.store(true, std::sync::atomic::Ordering::SeqCst))
        .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}"))?;
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fractions of the run's steps are rounded up once its length is known; eval and save
    /// fractions that are multiples of each other stay multiples (transformers compares the
    /// fractions), so load_best_model_at_end keeps a checkpoint at every evaluation.
    #[test]
    fn fractional_intervals_resolve_against_the_run_length() {
        let intervals = Intervals {
            logging: interval(Some(0.25), "logging_steps").unwrap(),
            eval: interval(Some(0.1), "eval_steps").unwrap(),
            save: interval(Some(0.2), "save_steps").unwrap(),
        };
        let mut args = TrainArgs {
            max_steps: Some(11),
            eval_steps: Some(100_000),
            save_steps: Some(200_000),
            load_best_model_at_end: true,
            ..Default::default()
        };
        intervals.resolve(&mut args, 40).unwrap();
        // 0.2 · 11 rounds up to 3, which would miss the evaluations every 2 steps.
        assert_eq!(
            (args.logging_steps, args.eval_steps, args.save_steps),
            (3, Some(2), Some(4))
        );
        assert!(interval(Some(2.5), "x").is_err());
        assert!(interval(Some(0.0), "x").is_err());
    }
}
