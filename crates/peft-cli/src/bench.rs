//! `peft bench`: training-step throughput and memory on random tokens, one JSON line.

use crate::{load_base, DTypeArg, QuantArg};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use peft::{FullModel, LoraConfig, PeftModel, PromptInit, PromptModel, TargetModules, Tuned};
use peft_train::{Batch, OptimKind, SchedulerKind, TrainArgs, Trainer};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum BenchMode {
    /// Training steps: forward, backward, AdamW.
    Train,
    /// Forward passes only (base + unmerged adapter), full logits.
    Forward,
    /// Greedy generation, adapter unmerged and merged taking turns (tokens/s of the best of
    /// --steps runs each).
    Generate,
    /// One layer's causal self-attention of the --shape, alone: forward, and forward with
    /// backward (the flash kernels on a GPU in bf16), in ms and TFLOP/s. Seconds where a whole
    /// training step needs the model: for comparing attention kernels.
    Attention,
}

#[derive(clap::Args)]
pub struct BenchCmd {
    #[arg(long, value_enum, default_value = "train")]
    mode: BenchMode,
    /// New tokens per generation (generate mode).
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// HF model folder, .gguf file, or Hub id (`org/name`).
    #[arg(long, required_unless_present = "shape", conflicts_with = "shape")]
    model: Option<PathBuf>,
    /// Random weights of a named shape instead of a model file: smollm2-135m, llama-3.2-1b,
    /// llama-3-8b (speed and memory depend on the shape alone).
    #[arg(long)]
    shape: Option<String>,
    /// lora; full (full fine-tuning: every weight trained, the baseline); prompt (prompt
    /// tuning) or prefix (prefix tuning), with --num-virtual-tokens.
    #[arg(long, default_value = "lora")]
    method: String,
    /// Virtual tokens of prompt and prefix tuning (20 as in HF's figures).
    #[arg(long, default_value_t = 20)]
    num_virtual_tokens: usize,
    #[arg(long, default_value_t = 16)]
    r: usize,
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    /// 0.05 as in HF's benchmark script, so both sides draw dropout masks.
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj")]
    target_modules: String,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// QLoRA: quantize the base's linear layers to 4 bits.
    #[arg(long, value_enum)]
    quantize: Option<QuantArg>,
    #[arg(long)]
    double_quant: bool,
    #[arg(long, value_enum, default_value = "adamw")]
    optim: OptimKind,
    /// auto (on GPUs), on or off: time the interchangeable kernel paths on the batch before
    /// the warmup steps and keep the fastest, as `peft train` does (see its --kernel-tuning).
    #[arg(long, default_value = "auto", value_parser = peft_ops::KernelTuning::parse)]
    kernel_tuning: peft_ops::KernelTuning,
    /// Also time the forward pass alone and forward + backward (median of 3 each).
    #[arg(long)]
    phases: bool,
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// What `peft bench` trains.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Lora,
    Full,
    Prompt,
    Prefix,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    if cmd.mode == BenchMode::Attention {
        return bench_attention(&cmd);
    }
    let method = match cmd.method.as_str() {
        "lora" => Method::Lora,
        "full" => Method::Full,
        "prompt" => Method::Prompt,
        "prefix" => Method::Prefix,
        other => bail!("unknown method {other:?} (available: lora, full, prompt, prefix)"),
    };
    if method != Method::Lora && cmd.mode != BenchMode::Train {
        bail!(
            "--method {} measures training only (--mode train)",
            cmd.method
        );
    }
    if cmd.steps == 0 || cmd.batch_size == 0 {
        bail!("--steps and --batch-size must be at least 1");
    }
    // A training row needs a token and the next one to predict; generation needs a prompt.
    if cmd.seq_len < 2 && cmd.mode == BenchMode::Train || cmd.seq_len == 0 {
        bail!("--seq-len must be at least 2 for training and 1 otherwise");
    }
    let full = method == Method::Full;
    if let Some(n) = cmd.threads {
        crate::set_threads(n)?;
    }
    let device = peft_ops::open_device(&cmd.device)?;
    let dtype = cmd.dtype.on(&device);
    let (mut base, tok) = match (&cmd.model, &cmd.shape) {
        (Some(path), _) => load_base(path, dtype, &device)?,
        (None, Some(shape)) => {
            let config = peft_models::shapes::shape_config(shape)?;
            let model = peft_models::shapes::random_llama(config, &device, dtype, 0)?;
            (model, None)
        }
        (None, None) => bail!("give --model PATH or --shape NAME"),
    };
    let max = base.config.max_position_embeddings;
    if cmd.seq_len > max {
        bail!(
            "--seq-len {} is longer than the model's {max} positions",
            cmd.seq_len
        );
    }
    let base_params = base.parameter_count();
    if let Some(q) = cmd.quantize {
        base.quantize(q.kind(), cmd.double_quant, dtype)?;
    }
    base.gradient_checkpointing = cmd.gradient_checkpointing;
    let vocab = base.config.vocab_size as u32;
    let flops_per_token = model_flops_per_token(&base.config, base_params, cmd.seq_len, full);
    let config = LoraConfig {
        r: cmd.r,
        lora_alpha: cmd.lora_alpha,
        lora_dropout: cmd.lora_dropout,
        target_modules: Some(TargetModules::parse_flag(&cmd.target_modules)),
        ..Default::default()
    };
    let n = cmd.num_virtual_tokens;
    let mut model: Box<dyn Tuned> = match method {
        Method::Full => Box::new(FullModel::new(base)?),
        Method::Prompt => Box::new(PromptModel::new_prompt_tuning(
            base,
            n,
            PromptInit::Random,
            0,
        )?),
        Method::Prefix => Box::new(PromptModel::new_prefix_tuning(base, n, 0, None)?),
        Method::Lora => {
            let model = PeftModel::new(base, config, 0)?;
            match cmd.mode {
                BenchMode::Train | BenchMode::Attention => Box::new(model),
                BenchMode::Forward => return bench_forward(&cmd, &model),
                BenchMode::Generate => {
                    let tok = tok.context("generate mode needs the model's tokenizer")?;
                    return bench_generate(&cmd, model, &tok);
                }
            }
        }
    };
    let args = TrainArgs {
        batch_size: cmd.batch_size,
        lr: cmd.lr,
        scheduler: SchedulerKind::Constant,
        optim: cmd.optim,
        seed: 0,
        show_progress: false,
        kernel_tuning: cmd.kernel_tuning,
        ..Default::default()
    };
    let mut trainer = Trainer {
        model: model.as_mut(),
        args,
        pad_id: 0,
    };
    let mut opt = trainer.optimizer()?;
    // One fixed random batch: the same data every step, so the loss must fall.
    let ids: Vec<Vec<u32>> = random_ids(&cmd, vocab, &device)?.to_vec2()?;
    let examples: Vec<peft_train::Example> = ids
        .into_iter()
        .map(|c| peft_train::Example {
            labels: c.iter().map(|&t| t as i64).collect(),
            input_ids: c,
            packed: Vec::new(),
        })
        .collect();
    let refs: Vec<&peft_train::Example> = examples.iter().collect();
    let batch = Batch::new(&refs, 0, &device)?;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    // Tuning's passes need no more memory than the starting paths' (it rejects flips that do),
    // and a training step more than a pass: the peak is measured over the steps.
    let tuning = trainer.tune_kernels(&batch)?;
    for line in tuning.iter().flat_map(|t| t.report()) {
        eprintln!("{line}");
    }
    device.synchronize()?;
    peft_ops::reset_peak_memory(&device)?;
    // The attention passes cuDNN runs in the steps below (tuning's passes not counted).
    let cudnn_runs_before = peft_ops::cudnn_attention_runs();
    for step in 0..cmd.warmup + cmd.steps {
        let t = Instant::now();
        let out = trainer.step(&mut opt, std::slice::from_ref(&batch), step, cmd.lr)?;
        // Make sure queued device work is finished before the clock stops.
        device.synchronize()?;
        losses.push(out.loss);
        if step >= cmd.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let step_median = median(&times);
    let phases = if cmd.phases {
        let timed = |backward: bool| -> Result<f64> {
            let mut secs = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                let loss = trainer.batch_loss(&batch, batch.n_trained, true)?;
                if backward {
                    trainer.model.base().backward(&loss)?;
                }
                device.synchronize()?;
                secs.push(t.elapsed().as_secs_f64());
            }
            Ok(median(&secs))
        };
        let forward = timed(false)?;
        let forward_backward = timed(true)?;
        Some(json!({"forward_s": forward, "forward_backward_s": forward_backward}))
    } else {
        None
    };
    let total: f64 = times.iter().sum();
    let tokens = (cmd.batch_size * cmd.seq_len * cmd.steps) as f64;
    let (trainable, all) = model.parameter_counts();
    let peak_device_mib = peft_ops::peak_memory(&device)?.map(|b| b as f64 / (1 << 20) as f64);
    let tokens_per_s = tokens / total;
    // Our GPU kernel groups that PEFT_CUDA_OFF turned off for this run (none on the CPU).
    let kernels_off: Vec<&str> = if device.is_cuda() {
        let off = peft_ops::cuda_kernels_off().map_err(anyhow::Error::msg)?;
        off.iter().map(|k| k.name()).collect()
    } else {
        Vec::new()
    };
    println!(
        "{}",
        json!({
            "method": cmd.method, "num_virtual_tokens": matches!(method, Method::Prompt | Method::Prefix).then_some(n), "r": cmd.r, "lora_dropout": cmd.lora_dropout, "target_modules": cmd.target_modules,
            "batch_size": cmd.batch_size, "seq_len": cmd.seq_len, "steps": cmd.steps,
            "gradient_checkpointing": cmd.gradient_checkpointing,
            "quantize": cmd.quantize.map(|q| q.kind().name()), "double_quant": cmd.double_quant,
            "optim": cmd.optim, "optimizer_state_bytes": opt.state_bytes(),
            "threads": cmd.threads.unwrap_or_else(candle_core::utils::get_num_threads),
            "dtype": format!("{:?}", cmd.dtype).to_lowercase(), "device": cmd.device,
            "shape": cmd.shape, "tokens_per_s": tokens_per_s, "step_s_median": step_median,
            "peak_rss_mib": peak_rss_mib(), "peak_device_mib": peak_device_mib,
            "model_tflops": flops_per_token * tokens_per_s / 1e12, "phases": phases,
            "loss_first": losses.first(), "loss_last": losses.last(), "losses": losses,
            "trainable_params": trainable, "all_params": all, "cuda_kernels_off": kernels_off,
            "layer_tape": peft_ops::layer_tape_enabled(),
            "tape_gather": peft_ops::layer_tape_enabled() && peft_ops::tape_gather_enabled(),
            "lora_shared": peft_ops::lora_shared(),
            "lora_cublas": device.is_cuda() && peft_ops::lora_cublas(),
            "flash_wide": device.is_cuda() && peft_ops::flash_wide(),
            "flash_wide_backward": device.is_cuda() && peft_ops::flash_wide_backward(),
            "attention_cudnn": device.is_cuda() && peft_ops::attention_cudnn(),
            "cudnn_attention_runs": peft_ops::cudnn_attention_runs() - cudnn_runs_before,
            "cudnn_version": peft_ops::cudnn_version(),
            "kernel_tuning": tuning.as_ref().map(tuning_json),
        })
    );
    Ok(())
}

/// What kernel tuning tried and chose, for the benchmark's JSON line.
fn tuning_json(t: &peft_ops::Tuning) -> serde_json::Value {
    let trials: Vec<_> = t
        .trials
        .iter()
        .map(|trial| match &trial.seconds {
            Ok(s) => json!({"flipped": trial.flipped, "pass_s": s, "kept": trial.kept}),
            Err(e) => json!({"flipped": trial.flipped, "error": e}),
        })
        .collect();
    json!({"settings": t.settings, "passes": t.passes, "trials": trials})
}

fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Model FLOPs per trained token as `shared/gpu/anchor_hf.py` counts them: 2N for the forward
/// (N = matmul parameters) plus the attention products, as much again for the backward to the
/// activations, and once more for the weight gradients when every weight trains (`full`).
fn model_flops_per_token(
    c: &peft_models::LlamaConfig,
    base_params: usize,
    seq: usize,
    full: bool,
) -> f64 {
    let matmul_params = if c.tie_word_embeddings {
        base_params
    } else {
        base_params - c.vocab_size * c.hidden_size
    };
    let attention = 4 * c.num_hidden_layers * seq * c.hidden_size;
    let passes = if full { 3.0 } else { 2.0 };
    passes * (2 * matmul_params + attention) as f64
}

fn random_ids(cmd: &BenchCmd, vocab: u32, device: &candle_core::Device) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let ids: Vec<u32> = (0..cmd.batch_size * cmd.seq_len)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    Ok(Tensor::from_vec(
        ids,
        (cmd.batch_size, cmd.seq_len),
        device,
    )?)
}

fn bench_forward(cmd: &BenchCmd, model: &PeftModel) -> Result<()> {
    let base = &model.base;
    let ids = random_ids(cmd, base.config.vocab_size as u32, &base.device)?;
    // As HF's torch.inference_mode: no autograd graph.
    let _no_grad = peft_ops::NoGrad::new();
    let mut times = Vec::new();
    for step in 0..cmd.warmup + cmd.steps {
        let t = Instant::now();
        let logits = base.logits(&base.forward(&ids, None, None, false)?)?;
        logits.sum_all()?.to_scalar::<f32>()?;
        if step >= cmd.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let total: f64 = times.iter().sum();
    println!(
        "{}",
        json!({
            "mode": "forward", "r": cmd.r, "target_modules": cmd.target_modules,
            "batch_size": cmd.batch_size, "seq_len": cmd.seq_len, "steps": cmd.steps,
            "tokens_per_s": (cmd.batch_size * cmd.seq_len * cmd.steps) as f64 / total,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}

/// `--mode attention`: q, k, v of one layer of the shape (random, the bench's dtype), timed
/// through `causal_self_attention` and its backward (gradients of all three), synchronized
/// with the device after each.
fn bench_attention(cmd: &BenchCmd) -> Result<()> {
    let Some(shape) = &cmd.shape else {
        bail!("--mode attention needs --shape");
    };
    if cmd.steps == 0 || cmd.batch_size == 0 || cmd.seq_len == 0 {
        bail!("--steps, --batch-size and --seq-len must be at least 1");
    }
    let config = peft_models::shapes::shape_config(shape)?;
    let (heads, kv_heads, d) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    let (b, t) = (cmd.batch_size, cmd.seq_len);
    let device = peft_ops::open_device(&cmd.device)?;
    let dtype = cmd.dtype.on(&device);
    let var = |width: usize| -> Result<candle_core::Var> {
        let x = Tensor::randn(0f32, 1.0, (b, t, width * d), &device)?.to_dtype(dtype)?;
        Ok(candle_core::Var::from_tensor(&x)?)
    };
    let (q, k, v) = (var(heads)?, var(kv_heads)?, var(kv_heads)?);
    // The identity rotation: RoPE's values do not change the work.
    let cos = Tensor::ones((t, d / 2), candle_core::DType::F32, &device)?;
    let sin = Tensor::zeros((t, d / 2), candle_core::DType::F32, &device)?;
    let scale = 1.0 / (d as f64).sqrt();
    let attend = || {
        peft_ops::causal_self_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &cos,
            &sin,
            heads,
            kv_heads,
            scale,
            None,
            None,
            None,
        )
    };
    let (mut fwd, mut fwd_bwd) = (Vec::new(), Vec::new());
    for step in 0..cmd.warmup + cmd.steps {
        let start = Instant::now();
        let o = attend()?;
        device.synchronize()?;
        let forward = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let grads = attend()?.backward()?;
        device.synchronize()?;
        let both = start.elapsed().as_secs_f64();
        drop((o, grads));
        if step >= cmd.warmup {
            fwd.push(forward);
            fwd_bwd.push(both);
        }
    }
    let (fwd, fwd_bwd) = (median(&fwd), median(&fwd_bwd));
    // Causal: half of the two t x t x d products (forward), of the five (backward).
    let flops = 2.0 * (b * heads * t * t * d) as f64;
    println!(
        "{}",
        json!({
            "mode": "attention", "shape": shape, "device": cmd.device,
            "dtype": format!("{:?}", cmd.dtype).to_lowercase(), "batch_size": b, "seq_len": t,
            "heads": heads, "kv_heads": kv_heads, "head_dim": d, "steps": cmd.steps,
            "fwd_ms": 1e3 * fwd, "fwd_bwd_ms": 1e3 * fwd_bwd, "bwd_ms": 1e3 * (fwd_bwd - fwd),
            "fwd_tflops": flops / fwd / 1e12,
            "bwd_tflops": 2.5 * flops / (fwd_bwd - fwd).max(1e-9) / 1e12,
            "flash_wide": device.is_cuda() && peft_ops::flash_wide(),
            "flash_wide_backward": device.is_cuda() && peft_ops::flash_wide_backward(),
            "attention_cudnn": device.is_cuda() && peft_ops::attention_cudnn(),
            "cudnn_attention_runs": peft_ops::cudnn_attention_runs(),
            "cudnn_version": peft_ops::cudnn_version(),
        })
    );
    Ok(())
}

fn bench_generate(
    cmd: &BenchCmd,
    model: PeftModel,
    tok: &peft_models::tokenizer::Tokenizer,
) -> Result<()> {
    let prompt = crate::generate::prompt_ids(
        tok,
        "Explain in a few sentences why the sky is blue.",
        true,
        None,
    )?;
    // The best run of each, the two models taking turns: decoding is short, so one slow run
    // (another process waking up) would move a mean, and a slow spell would favour whichever
    // model ran outside it, by more than the effect measured.
    let once = |m: &peft_models::Llama| -> Result<f64> {
        let t = Instant::now();
        let out = crate::generate::generate(
            m,
            tok,
            &prompt,
            cmd.new_tokens,
            &mut crate::generate::Sampling::greedy(),
            |_| {},
        )?;
        Ok(out.len() as f64 / t.elapsed().as_secs_f64())
    };
    let unmerged_model = model.base.clone();
    let merged_model = model.merge_and_unload()?;
    let (mut unmerged, mut merged) = (0f64, 0f64);
    for run in 0..cmd.warmup + cmd.steps {
        let (u, m) = (once(&unmerged_model)?, once(&merged_model)?);
        if run >= cmd.warmup {
            unmerged = unmerged.max(u);
            merged = merged.max(m);
        }
    }
    println!(
        "{}",
        json!({
            "mode": "generate", "r": cmd.r, "target_modules": cmd.target_modules,
            "new_tokens": cmd.new_tokens, "runs": cmd.steps,
            "unmerged_tokens_per_s": unmerged, "merged_tokens_per_s": merged,
            "unmerged_vs_merged": unmerged / merged, "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
