//! `peft compare`: every method trained on the same model, data, steps and seed, measured side
//! by side (trainable parameters, peak memory, speed, train and held-out loss, file size),
//! written as a markdown table, JSON and a loss-curve plot (SVG and PNG).

use crate::plot::{write_loss_chart, Series};
use crate::train::{build_model, TrainCmd};
use crate::{bench::peak_rss_mib, load_base, model_name, DTypeArg};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::ValueEnum;
use peft_train::{load_data, split_eval, tokenize_records, TrainArgs, Trainer};
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CompareCmd {
    /// HF model folder, .gguf file, or Hub id (`org/name`).
    #[arg(long)]
    model: PathBuf,
    /// A data file, or a Hub data set id (its training split).
    #[arg(long)]
    data: PathBuf,
    /// Folder for each method's adapter and metrics, compare.md, compare.json, compare.svg.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value = "lora,dora,ia3,prompt,prefix,adapter")]
    methods: String,
    #[arg(long, default_value_t = 30)]
    max_steps: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    max_seq_length: usize,
    /// Fraction of the records held out for the eval loss.
    #[arg(long, default_value_t = 0.1)]
    eval_split: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    threads: Option<usize>,
    /// Compute dtype: bf16 (default, as `peft train`; f32 on CPUs without AVX512-BF16) or f32.
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Internal: train the single method in `--methods` and write its row here (each method
    /// runs in its own process so that its peak memory is its own).
    #[arg(long, hide = true)]
    row_out: Option<PathBuf>,
}

/// A learning rate that suits each method in a short run (prompt-like methods move few
/// parameters and need larger steps).
fn default_lr(method: &str) -> f64 {
    match method {
        "ia3" | "prefix" | "ptuning-v2" => 1e-2,
        "prompt" => 3e-2,
        _ => 1e-3,
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Row {
    method: String,
    lr: f64,
    trainable: usize,
    all: usize,
    peak_rss_mib: f64,
    tokens_per_s: f64,
    train_loss: f64,
    eval_loss: f64,
    adapter_bytes: u64,
    losses: Vec<f64>,
}

pub fn run(cmd: CompareCmd) -> Result<()> {
    if let Some(n) = cmd.threads {
        crate::set_threads(n)?;
    }
    let methods: Vec<String> = cmd
        .methods
        .split(',')
        .map(|m| m.trim().to_string())
        .collect();
    for (i, method) in methods.iter().enumerate() {
        crate::train::check_method(method)?;
        if methods[..i].contains(method) {
            bail!("--methods names {method} twice");
        }
    }
    // The table reports eval loss and perplexity.
    if !(cmd.eval_split > 0.0 && cmd.eval_split < 1.0) {
        bail!(
            "--eval-split must be above 0 and below 1, got {}",
            cmd.eval_split
        );
    }
    if let Some(out) = &cmd.row_out {
        let row = train_one(&cmd, &methods[0])?;
        return peft_models::io::write_atomic(out, serde_json::to_string(&row)?.as_bytes());
    }
    load_data(&cmd.data)?;
    std::fs::create_dir_all(&cmd.output)
        .with_context(|| format!("cannot create {}", cmd.output.display()))?;
    let exe = std::env::current_exe().context("cannot find the peft executable")?;
    let mut rows = Vec::new();
    for method in &methods {
        let row_path = cmd.output.join(format!("{method}.row.json"));
        let mut child = std::process::Command::new(&exe);
        child
            .arg("compare")
            .args(["--model".as_ref(), cmd.model.as_os_str()])
            .args(["--data".as_ref(), cmd.data.as_os_str()])
            .args(["--output".as_ref(), cmd.output.as_os_str()])
            .args(["--methods", method])
            .args(["--max-steps", &cmd.max_steps.to_string()])
            .args(["--batch-size", &cmd.batch_size.to_string()])
            .args(["--max-seq-length", &cmd.max_seq_length.to_string()])
            .arg(format!("--eval-split={}", cmd.eval_split))
            .args(["--seed", &cmd.seed.to_string()])
            .args(["--row-out".as_ref(), row_path.as_os_str()]);
        if let Some(n) = cmd.threads {
            child.args(["--threads", &n.to_string()]);
        }
        if let Some(d) = cmd.dtype.and_then(|d| d.to_possible_value()) {
            child.args(["--dtype", d.get_name()]);
        }
        let status = child.status().context("cannot start peft compare")?;
        if !status.success() {
            bail!("method {method} failed ({status})");
        }
        let text = std::fs::read_to_string(&row_path)
            .with_context(|| format!("cannot read {}", row_path.display()))?;
        rows.push(serde_json::from_str::<Row>(&text)?);
        let _ = std::fs::remove_file(&row_path);
    }
    let table = markdown(&rows, &cmd);
    println!("{table}");
    let json = json!({
        "model": cmd.model, "data": cmd.data, "max_steps": cmd.max_steps,
        "batch_size": cmd.batch_size, "seed": cmd.seed, "eval_split": cmd.eval_split,
        "precision": precision(&cmd),
        "methods": rows.iter().map(|r| json!({
            "method": r.method, "lr": r.lr, "trainable_params": r.trainable, "all_params": r.all,
            "trainable_percent": 100.0 * r.trainable as f64 / r.all as f64,
            "peak_rss_mib": r.peak_rss_mib, "tokens_per_s": r.tokens_per_s,
            "train_loss": r.train_loss, "eval_loss": r.eval_loss,
            "eval_perplexity": r.eval_loss.exp(), "adapter_bytes": r.adapter_bytes,
            "losses": r.losses,
        })).collect::<Vec<_>>(),
    });
    peft_models::io::write_atomic(&cmd.output.join("compare.md"), table.as_bytes())?;
    peft_models::io::write_atomic(
        &cmd.output.join("compare.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    let series: Vec<Series> = rows
        .iter()
        .map(|r| Series {
            name: r.method.clone(),
            points: (1..)
                .map(|s| s as f64)
                .zip(r.losses.iter().copied())
                .collect(),
        })
        .collect();
    write_loss_chart(
        &cmd.output.join("compare"),
        "training loss per step",
        &series,
    )?;
    eprintln!(
        "wrote {}/compare.md, compare.json, compare.svg and compare.png",
        cmd.output.display()
    );
    Ok(())
}

/// Trains `method` and measures it (in this process: its peak RSS is this process's).
fn train_one(cmd: &CompareCmd, method: &str) -> Result<Row> {
    let records = load_data(&cmd.data)?;
    let dtype = DTypeArg::for_training(cmd.dtype, &Device::Cpu);
    let (base, tok) = load_base(&cmd.model, dtype, &Device::Cpu)?;
    let tok = tok.context("the model has no tokenizer")?;
    let examples = tokenize_records(&records, &tok, cmd.max_seq_length)?.examples;
    let (examples, eval) = split_eval(examples, cmd.eval_split, cmd.seed)?;
    if eval.is_empty() {
        bail!("peft compare needs an eval split above 0");
    }
    let mut model = build_model(method, base, &TrainCmd::default(), &tok, cmd.seed)
        .with_context(|| format!("method {method}"))?;
    let (trainable, all) = model.parameter_counts();
    let dir = cmd.output.join(method);
    let lr = default_lr(method);
    let args = TrainArgs {
        max_steps: Some(cmd.max_steps),
        batch_size: cmd.batch_size,
        lr,
        seed: cmd.seed,
        output_dir: dir.clone(),
        base_model_name: model_name(&cmd.model),
        show_progress: false,
        ..Default::default()
    };
    let pad_id = tok.pad_token_id().unwrap_or(0);
    let mut trainer = Trainer {
        model: model.as_mut(),
        args,
        pad_id,
    };
    eprintln!("== {method}: {trainable} trainable parameters, lr {lr:e}");
    let summary = trainer.train(&examples)?;
    let eval_loss = trainer.eval_loss(&eval)?;
    let tail = &summary.losses[summary.losses.len().saturating_sub(5)..];
    let row = Row {
        method: method.to_string(),
        lr,
        trainable,
        all,
        peak_rss_mib: peak_rss_mib(),
        tokens_per_s: summary.tokens_per_s(),
        train_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        eval_loss,
        adapter_bytes: std::fs::metadata(dir.join(peft::model::WEIGHTS_FILE))
            .map(|m| m.len())
            .unwrap_or(0),
        losses: summary.losses,
    };
    eprintln!(
        "   train loss {:.4}, eval loss {:.4}, {:.0} tokens/s, peak RSS {:.0} MiB",
        row.train_loss, row.eval_loss, row.tokens_per_s, row.peak_rss_mib
    );
    Ok(row)
}

/// What the children compute in (they run on the CPU).
fn precision(cmd: &CompareCmd) -> &'static str {
    match cmd.dtype.unwrap_or(DTypeArg::Bf16) {
        DTypeArg::Bf16 if peft_ops::bf16_supported() => "bf16 matmuls",
        DTypeArg::F16 => "f16",
        _ => "f32",
    }
}

fn markdown(rows: &[Row], cmd: &CompareCmd) -> String {
    let mut s = format!(
        "{} steps, batch {}, seed {}, {:.0}% of the records held out, {}\n\n\
         | method | lr | trainable params | trainable % | peak RSS MiB | tokens/s | train loss (last 5) | eval loss | eval perplexity | adapter file |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        cmd.max_steps,
        cmd.batch_size,
        cmd.seed,
        100.0 * cmd.eval_split,
        precision(cmd)
    );
    for r in rows {
        s += &format!(
            "| {} | {:e} | {} | {:.4} | {:.0} | {:.1} | {:.4} | {:.4} | {:.2} | {:.1} KB |\n",
            r.method,
            r.lr,
            r.trainable,
            100.0 * r.trainable as f64 / r.all as f64,
            r.peak_rss_mib,
            r.tokens_per_s,
            r.train_loss,
            r.eval_loss,
            r.eval_loss.exp(),
            r.adapter_bytes as f64 / 1024.0
        );
    }
    s
}
