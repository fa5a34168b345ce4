//! `peft`: fine-tune, inspect, run and merge parameter-efficient adapters.

mod bench;
mod chat;
mod compare;
mod generate;
mod plot;
mod train;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use peft::{Adapter, AdapterConfig, LoraConfig, PeftModel, TargetModules, Tuned};
use peft_models::loader::{load_model_with, QuantizeOnLoad};
use peft_models::tokenizer::Tokenizer;
use peft_models::Llama;
use std::path::{Path, PathBuf};

// Training allocates and frees the same large activation buffers every step. glibc returns
// them to the OS and pays for fresh zeroed pages each time (2.1M page faults in a 3-step
// bench); mimalloc with purging off reuses them (3k faults, ~10% less CPU time).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's option enum (v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[derive(Parser)]
#[command(
    name = "peft",
    version,
    about = "Parameter-efficient fine-tuning of LLMs, compatible with Hugging Face PEFT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune an adapter on a data set.
    Train(Box<train::TrainCmd>),
    /// Generate text with a base model, optionally with an adapter.
    Generate(generate::GenerateCmd),
    /// Chat with a base model and switch between adapters loaded once (stdin, /help).
    Chat(chat::ChatCmd),
    /// Merge an adapter into its base model and write an HF model folder or a GGUF file.
    Merge(MergeCmd),
    /// Write a LoRA adapter as a GGUF LoRA file for llama.cpp (`--lora`) and Ollama (`ADAPTER`).
    ExportLora(ExportLoraCmd),
    /// Combine LoRA adapters into one (HF PEFT's `add_weighted_adapter`, cat or linear).
    Combine(CombineCmd),
    /// Write the float32 logits of a token sequence to a safetensors file.
    Logits(LogitsCmd),
    /// Measure training throughput and peak memory on random tokens (prints JSON).
    Bench(bench::BenchCmd),
    /// Train several methods on the same data and compare them (markdown, JSON, SVG plot).
    Compare(compare::CompareCmd),
    /// Show a model's modules and the trainable-parameter count of an adapter setup.
    Inspect(InspectCmd),
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl DTypeArg {
    fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        }
    }

    /// The dtype tensors are stored in on `dev`. bf16 on a CPU means mixed precision, as
    /// PyTorch's CPU autocast (TRL's `bf16=True`) does: f32 weights and activations, matmuls
    /// against the frozen weights in bf16 with f32 accumulation (AVX512-BF16), which is twice
    /// as fast as f32 there; a CPU without AVX512-BF16 computes in f32.
    fn on(self, dev: &Device) -> DType {
        if self == DTypeArg::Bf16 && dev.is_cpu() && !peft_ops::bf16_supported() {
            eprintln!("note: this CPU has no AVX512-BF16; computing in f32");
        }
        self.where_supported(dev)
    }

    /// The training dtype on `dev` for the `--dtype` given: bf16 when none is, TRL's default,
    /// where the hardware has it and without the note elsewhere.
    fn for_training(choice: Option<Self>, dev: &Device) -> DType {
        match choice {
            Some(d) => d.on(dev),
            None => DTypeArg::Bf16.where_supported(dev),
        }
    }

    /// [`Self::on`] without the note (a default, not the user's choice).
    fn where_supported(self, dev: &Device) -> DType {
        if self == DTypeArg::Bf16 && dev.is_cpu() {
            peft_ops::set_bf16_matmul(true);
            return DType::F32;
        }
        self.dtype()
    }
}

/// 4-bit quantization of the base model's linear layers (QLoRA).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum QuantArg {
    Nf4,
    Fp4,
}

impl QuantArg {
    pub fn kind(self) -> peft_quant::FourBit {
        match self {
            QuantArg::Nf4 => peft_quant::FourBit::Nf4,
            QuantArg::Fp4 => peft_quant::FourBit::Fp4,
        }
    }
}

/// `--quantize` for commands that run a model: its base loaded in 4 bits, as
/// `BitsAndBytesConfig(load_in_4bit=True)` loads it (the base a QLoRA adapter trained on).
#[derive(clap::Args, Clone, Copy)]
pub struct LoadQuantized {
    /// Load the base's linear layers in 4 bits (not lm_head), as QLoRA trained on them.
    #[arg(long, value_enum)]
    quantize: Option<QuantArg>,
    /// With --quantize: also quantize the 4-bit scales, as the adapter was trained.
    #[arg(long)]
    double_quant: bool,
}

impl LoadQuantized {
    /// The quantization to load with, computing in `compute_dtype`.
    pub fn on_load(self, compute_dtype: DType) -> Option<QuantizeOnLoad> {
        if self.double_quant && self.quantize.is_none() {
            eprintln!("note: --double-quant has no effect without --quantize");
        }
        self.quantize.map(|q| QuantizeOnLoad {
            kind: q.kind(),
            double_quant: self.double_quant,
            compute_dtype,
        })
    }
}

#[derive(clap::Args)]
struct MergeCmd {
    /// Default: the base the adapter's config names (`base_model_name_or_path`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The adapter to merge; without one, the model is written as it is (a format conversion).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// An HF model folder, or a `.gguf` file for llama.cpp, Ollama and LM Studio.
    #[arg(long)]
    output: PathBuf,
    /// f32, bf16 or f16; a GGUF file also takes q8_0 and the k-quant mixes q4_k_m, q5_k_m and
    /// q6_k (default: f32 for a folder, f16 for GGUF).
    #[arg(long)]
    dtype: Option<String>,
    /// The adapter was trained on a 4-bit quantization of the base (QLoRA): merge into the
    /// dequantized 4-bit weights it was trained against.
    #[command(flatten)]
    quantized: LoadQuantized,
}

#[derive(clap::Args)]
struct ExportLoraCmd {
    /// The base model the adapter was trained on (its architecture names the tensors).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    /// The `.gguf` file to write.
    #[arg(long)]
    output: PathBuf,
    /// f32 (default), f16, bf16 or q8_0.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(clap::Args)]
struct CombineCmd {
    /// The LoRA adapters: folders or Hub ids (`--adapter A --adapter B`).
    #[arg(long = "adapter", required = true)]
    adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated (default 1 each; a negative one subtracts).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    weights: Option<Vec<f64>>,
    /// cat: the weighted sum of the adapters' changes, exactly (rank: the sum of theirs);
    /// linear: one rank, PEFT's weighted sums of A and of B.
    #[arg(long, default_value = "cat")]
    combination: String,
    /// The adapter folder to write.
    #[arg(long)]
    output: PathBuf,
}

#[derive(clap::Args)]
struct LogitsCmd {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    input_ids: Vec<u32>,
    #[arg(long)]
    out: PathBuf,
    /// Merge the adapter before running (checks merge_and_unload).
    #[arg(long)]
    merged: bool,
    #[command(flatten)]
    quantized: LoadQuantized,
}

#[derive(clap::Args)]
struct InspectCmd {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Count parameters for a fresh LoRA on these modules (list, `all-linear`, or `re:<regex>`).
    #[arg(long)]
    target_modules: Option<String>,
    #[arg(long, default_value_t = 8)]
    r: usize,
}

/// Sizes the thread pool used by the CPU kernels; call before any tensor work.
pub fn set_threads(n: usize) -> Result<()> {
    if n == 0 {
        bail!("--threads must be at least 1");
    }
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("cannot size the thread pool: {e}"))
}

/// Loads a base model and builds the Llama module tree.
pub fn load_base(
    path: &Path,
    dtype: DType,
    dev: &Device,
) -> Result<(Llama, Option<peft_models::tokenizer::Tokenizer>)> {
    load_base_with(path, dtype, dev, None)
}

/// [`load_base`] with QLoRA's 4-bit base quantized while it loads.
pub fn load_base_with(
    path: &Path,
    dtype: DType,
    dev: &Device,
    quantize: Option<QuantizeOnLoad>,
) -> Result<(Llama, Option<peft_models::tokenizer::Tokenizer>)> {
    load_model_with(path, dev, dtype, quantize)?
        .into_model(dev, dtype)
        .with_context(|| format!("cannot build the model from {}", path.display()))
}

/// The base model to load: `--model` where given, else the one the adapter's config names
/// (as `AutoPeftModelForCausalLM.from_pretrained(adapter)` finds it). An adapter read for it
/// is replaced by its local copy, so that loading it does not ask the Hub again.
pub fn base_model(model: Option<&Path>, adapter: Option<&mut PathBuf>) -> Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m.to_path_buf());
    }
    let Some(adapter) = adapter else {
        bail!("--model is required (or an --adapter whose adapter_config.json names its base)");
    };
    *adapter = peft_models::hub::locate(adapter, peft_models::hub::Wanted::Adapter)?;
    let dir = &*adapter;
    match peft::base_model_of(dir)? {
        Some(name) => {
            eprintln!("note: the base model is {name}, as the adapter's config names it");
            Ok(PathBuf::from(name))
        }
        None => bail!(
            "--model is required: the adapter's config ({}) names no base_model_name_or_path",
            dir.join("adapter_config.json").display()
        ),
    }
}

/// The tokenizer to run `adapter` (loaded from `dir`) with, where `AutoTokenizer.from_pretrained`
/// on the adapter folder finds it: the one saved beside the adapter (a run that changed the
/// chat template or added tokens saves it there, as TRL saves every run's), else the base's
/// `base_tok`. An adapter that grew the vocabulary from `base_vocab` needs its own.
pub fn tokenizer_for(
    base_tok: Option<Tokenizer>,
    base_vocab: usize,
    adapter: &Adapter,
    dir: &Path,
) -> Result<Option<Tokenizer>> {
    if let Some(tok) = saved_tokenizer(dir)? {
        return Ok(Some(tok));
    }
    base_tokenizer_fits(dir, base_vocab, adapter.model().config.vocab_size)?;
    Ok(base_tok)
}

/// Fails where the adapter in `dir`, whose folder holds no tokenizer, grew the vocabulary from
/// `base_vocab` to `vocab`: the base's tokenizer lacks the added tokens.
pub fn base_tokenizer_fits(dir: &Path, base_vocab: usize, vocab: usize) -> Result<()> {
    if vocab != base_vocab {
        bail!(
            "the adapter in {} grows the vocabulary from {base_vocab} to {vocab} tokens, but its folder has no tokenizer.json with them",
            dir.display()
        );
    }
    Ok(())
}

/// The tokenizer saved in the adapter folder `dir` (or the Hub repository it names), if any.
pub fn saved_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    let dir = peft_models::hub::locate(dir, peft_models::hub::Wanted::Adapter)?;
    match dir.join("tokenizer.json").is_file() {
        true => Ok(Some(Tokenizer::from_hf_dir(&dir)?)),
        false => Ok(None),
    }
}

/// The adapter config's `base_model_name_or_path`: the model path as the user gave it, as HF
/// PEFT writes it, so that `AutoPeftModelForCausalLM` finds the base from the adapter alone.
pub fn model_name(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn run_merge(cmd: MergeCmd) -> Result<()> {
    let output = Output::of(&cmd.output, cmd.dtype.as_deref())?;
    let mut adapter = cmd.adapter.clone();
    let model = base_model(cmd.model.as_deref(), adapter.as_mut())?;
    let quantize = cmd.quantized.on_load(DType::F32);
    let (base, tok) = load_base_with(&model, DType::F32, &Device::Cpu, quantize)?;
    if model.extension().is_some_and(|e| e == "gguf") && matches!(output, Output::Folder(_)) {
        eprintln!("note: the GGUF base is dequantized; the merged model is written unquantized");
    }
    if let Some(q) = quantize {
        eprintln!(
            "warning: merging into the dequantized {:?} base; the merged model is written unquantized, and quantizing it again rounds the merged weights (outputs shift slightly)",
            q.kind
        );
    }
    let base_vocab = base.config.vocab_size;
    let (mut merged, tok) = match &adapter {
        Some(dir) => {
            let adapter = Adapter::load(base, dir)?;
            let tok = tokenizer_for(tok, base_vocab, &adapter, dir)?;
            (adapter.merge_and_unload()?, tok)
        }
        None => (base, tok),
    };
    let what = match cmd.adapter {
        Some(_) => "merged model",
        None => "model",
    };
    match output {
        Output::Folder(dtype) => {
            peft_models::save::save_hf_model(&mut merged, tok.as_ref(), &cmd.output, dtype)?
        }
        Output::Gguf(ty) => {
            let tok = tok.context("the model has no tokenizer, which a GGUF file must carry")?;
            let name = cmd
                .output
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
            peft_models::gguf::save_gguf(&mut merged, &tok, &cmd.output, ty, &name)?
        }
    }
    println!("{what} written to {}", cmd.output.display());
    Ok(())
}

/// What `peft merge` writes: an HF folder in a dtype, or a GGUF file of a tensor type.
enum Output {
    Folder(DType),
    Gguf(peft_models::gguf::GgufType),
}

impl Output {
    fn of(path: &Path, dtype: Option<&str>) -> Result<Self> {
        if path.extension().is_some_and(|e| e == "gguf") {
            return Ok(Self::Gguf(peft_models::gguf::GgufType::parse(
                dtype.unwrap_or("f16"),
            )?));
        }
        Ok(Self::Folder(match dtype.unwrap_or("f32") {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => bail!(
                "--dtype {other:?} is not a dtype for a model folder (f32, bf16, f16; quantized types need a .gguf output)"
            ),
        }))
    }
}

fn run_export_lora(cmd: ExportLoraCmd) -> Result<()> {
    let ty = peft_models::gguf::GgufType::parse(&cmd.dtype)?;
    let (base, _) = load_base(&cmd.model, DType::F32, &Device::Cpu)?;
    let Adapter::Lora(lora) = Adapter::load(base, &cmd.adapter)? else {
        bail!("only LoRA adapters can be written as a GGUF LoRA; merge this one instead (peft merge --output FILE.gguf)");
    };
    let name = cmd
        .output
        .file_stem()
        .map_or_else(|| "adapter".into(), |s| s.to_string_lossy().into_owned());
    lora.save_gguf_lora(&cmd.output, ty, &name)?;
    println!("GGUF LoRA written to {}", cmd.output.display());
    Ok(())
}

fn run_combine(cmd: CombineCmd) -> Result<()> {
    use peft::lora::combine::{combine, Combination, LoraFiles};
    let how = Combination::parse(&cmd.combination)?;
    let weights = cmd
        .weights
        .clone()
        .unwrap_or_else(|| vec![1.0; cmd.adapters.len()]);
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        bail!("--weights must be finite numbers, got {w}");
    }
    let mut adapters = Vec::new();
    for given in &cmd.adapters {
        let dir = peft_models::hub::locate(given, peft_models::hub::Wanted::Adapter)?;
        let config_path = dir.join(peft::model::CONFIG_FILE);
        let text = peft::files::read_text(&config_path)?;
        if peft::peft_type_of(&text, &config_path)? != "LORA" {
            bail!("{}: only LoRA adapters can be combined", dir.display());
        }
        let config = LoraConfig::from_json(&text, &config_path)?;
        let (_, tensors) = peft::files::read_adapter_weights(&dir, &Device::Cpu)?;
        adapters.push(LoraFiles { config, tensors });
    }
    let (config, tensors) = combine(&adapters, &weights, how)?;
    peft::files::write_adapter(&cmd.output, &tensors, &config.to_json_string()?)?;
    println!(
        "{} adapters combined ({:?}, rank {}) into {}",
        adapters.len(),
        how,
        config.r,
        cmd.output.display()
    );
    Ok(())
}

fn run_logits(cmd: LogitsCmd) -> Result<()> {
    if cmd.merged && cmd.adapter.is_none() {
        eprintln!("note: --merged has no effect without --adapter");
    }
    let quantize = cmd.quantized.on_load(DType::F32);
    let (base, _) = load_base_with(&cmd.model, DType::F32, &Device::Cpu, quantize)?;
    let device = base.device.clone();
    let adapter = cmd
        .adapter
        .as_ref()
        .map(|dir| Adapter::load(base.clone(), dir))
        .transpose()?;
    // An adapter may grow the vocabulary.
    let model = adapter.as_ref().map_or(&base, Adapter::model);
    let vocab = model.config.vocab_size as u32;
    if let Some(bad) = cmd.input_ids.iter().find(|&&t| t >= vocab) {
        anyhow::bail!("input id {bad} is outside the vocabulary (size {vocab})");
    }
    let ids = Tensor::new(cmd.input_ids.as_slice(), &device)?.unsqueeze(0)?;
    let logits = match adapter {
        None => base.logits(&base.forward(&ids, None, None, false)?)?,
        Some(adapter) if cmd.merged => {
            let model = adapter.merge_and_unload()?;
            model.logits(&model.forward(&ids, None, None, false)?)?
        }
        // Prompt tuning's rows for its virtual tokens come first, as PEFT returns them.
        Some(adapter) => adapter.logits(&ids)?,
    };
    let logits = logits.to_dtype(DType::F32)?;
    let shape = logits.dims().to_vec();
    peft_models::io::save_safetensors(&cmd.out, &[("logits".to_string(), logits)], None)?;
    println!("logits {shape:?} written to {}", cmd.out.display());
    Ok(())
}

fn run_inspect(cmd: InspectCmd) -> Result<()> {
    if cmd.adapter.is_some() && cmd.target_modules.is_some() {
        eprintln!("note: --target-modules has no effect with --adapter (its config decides)");
    }
    let (mut base, _) = load_base(&cmd.model, DType::F32, &Device::Cpu)?;
    let c = &base.config;
    println!(
        "{}: {} layers, hidden {}, heads {} (kv {}), head_dim {}, intermediate {}, vocab {}, tied embeddings {}",
        c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
        c.head_dim, c.intermediate_size, c.vocab_size, c.tie_word_embeddings
    );
    let mut kinds: Vec<String> = base
        .linears_mut()
        .into_iter()
        .map(|(p, _)| p.rsplit('.').next().unwrap_or("").to_string())
        .collect();
    kinds.sort();
    kinds.dedup();
    println!("linear modules: {}", kinds.join(", "));
    if let Some(moe) = &base.config.moe {
        let sparse = moe.sparse_layers.iter().filter(|s| **s).count();
        let shared = match (moe.shared_expert_size, moe.shared_expert_paths().1) {
            (Some(size), Some(_)) => format!(", a gated shared expert of {size}"),
            (Some(size), None) => format!(", a shared expert of {size}"),
            (None, _) => String::new(),
        };
        let scoring = match moe.scoring {
            peft_ops::Scoring::Softmax if moe.has_choice_bias() => {
                "softmax, corrected choice".to_string()
            }
            peft_ops::Scoring::Softmax => "softmax".to_string(),
            peft_ops::Scoring::Sigmoid {
                n_group,
                topk_group,
                scale,
            } => format!(
                "sigmoid, corrected choice within the best {topk_group} of {n_group} groups, scaled by {scale}"
            ),
            peft_ops::Scoring::LimitedSoftmax {
                n_group,
                topk_group,
                scale,
            } => format!(
                "softmax, choice within the best {topk_group} of {n_group} groups, scaled by {scale}"
            ),
        };
        println!(
            "mixture of experts on {sparse} of {} layers: {} experts of {}, {} per token ({scoring}; {}){shared}; LoRA reaches the router and experts as parameters (target_parameters: {}.weight, gate_up_proj, down_proj)",
            base.config.num_hidden_layers,
            moe.num_experts,
            moe.expert_size,
            moe.top_k,
            match moe.norm_topk_prob {
                true => "weights renormalized",
                false => "weights as the router gives them",
            },
            moe.router
        );
        if let Some(m) = &base.config.latent_attention {
            let q = match m.q_lora_rank {
                Some(r) => format!("queries through rank {r}"),
                None => "queries by q_proj".to_string(),
            };
            println!(
                "latent attention: {q}, keys and values from a latent of {}, heads of {} + {} rotated dims, values of {}",
                m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
            );
        }
        if base.config.attention_sinks {
            println!("attention sinks: a learned logit per head in each softmax (gpt-oss)");
        }
    }
    if let Some(whole) = &base.config.image_text {
        let kind = whole
            .get("model_type")
            .and_then(|t| t.as_str())
            .unwrap_or("?");
        let frozen = base.other_parameter_count();
        println!(
            "the language model ({}) of a {kind} image-text model; its {} ({frozen} params) stay frozen on disk",
            base.config.decoder_path(),
            base.other_parts().join(" and ")
        );
    }
    let line = match &cmd.adapter {
        Some(dir) => Adapter::load(base, dir)?
            .tuned_mut()
            .trainable_parameters_line(),
        None => {
            let config = LoraConfig {
                r: cmd.r,
                lora_alpha: 2.0 * cmd.r as f64,
                target_modules: cmd.target_modules.as_deref().map(TargetModules::parse_flag),
                ..Default::default()
            };
            PeftModel::new(base, config, 0)?.trainable_parameters_line()
        }
    };
    println!("{line}");
    Ok(())
}

fn main() {
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // One thread pool: our kernels and candle's matmuls run on rayon's. candle's own pool for
    // elementwise ops would spin on the same cores while rayon works (measured: 5-10% slower
    // training on 2 cores), so its small ops stay on the calling thread.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // candle sizes every matmul's threads from RAYON_NUM_THREADS and, without it, counts the
    // physical cores by reading /proc/cpuinfo again on each matmul (measured: about 270 reads
    // per decoded token, 8% of generation time). Naming rayon's own default (what our kernels
    // use) makes both agree and reads nothing.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(c) => train::run(*c),
        Command::Generate(c) => generate::run(c),
        Command::Chat(c) => chat::run(c),
        Command::Merge(c) => run_merge(c),
        Command::ExportLora(c) => run_export_lora(c),
        Command::Combine(c) => run_combine(c),
        Command::Logits(c) => run_logits(c),
        Command::Inspect(c) => run_inspect(c),
        Command::Bench(c) => bench::run(c),
        Command::Compare(c) => compare::run(c),
    };
    if let Err(e) = result {
        // One line: the outermost context first, then its causes (candle appends a
        // backtrace on later lines when RUST_BACKTRACE is set: keep the first line only).
        let msg: Vec<String> = e
            .chain()
            .map(|c| c.to_string().lines().next().unwrap_or_default().to_string())
            .collect();
        eprintln!("error: {}", msg.join(": "));
        // 130 = stopped by SIGINT, as shells report it.
        let interrupted = e.downcast_ref::<peft_train::Interrupted>().is_some();
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}
