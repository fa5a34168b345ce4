use crate::{base_model, load_base_with, tokenizer_for, DTypeArg, LoadQuantized};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use peft::Adapter;
use peft_models::tokenizer::{ChatMessage, Tokenizer};
use peft_models::{KvCache, Llama};
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GenerateCmd {
    /// HF model folder, .gguf file, or Hub id (`org/name`, downloaded into the Hub cache).
    /// Default: the base the adapter's config names (`base_model_name_or_path`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Adapter folder, or Hub id.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    decoding: Decoding,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    #[command(flatten)]
    quantized: LoadQuantized,
}

/// How tokens are picked, shared by `generate` and `chat`.
#[derive(clap::Args)]
pub struct Decoding {
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// 0 means no top-k cut.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep only tokens at least this share as likely as the likeliest (min-p sampling; 0:
    /// off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f64,
    /// Penalise every token already in the sequence (prompt included): positive logits
    /// divided by it, negative ones multiplied (transformers' `repetition_penalty`; 1: off).
    /// Applies to greedy decoding too.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl Decoding {
    pub fn sampling(&self) -> Result<Sampling> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "--temperature must be at least 0 (0: greedy), got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be above 0 and at most 1, got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            bail!(
                "--min-p must be at least 0 and at most 1, got {}",
                self.min_p
            );
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            bail!(
                "--repetition-penalty must be above 0 (1: none), got {}",
                self.repetition_penalty
            );
        }
        Ok(Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            rng: rand::rngs::StdRng::seed_from_u64(self.seed),
        })
    }
}

/// How the next token is picked from the logits, in transformers' order: the repetition
/// penalty, then (sampling) temperature, top-k, top-p and min-p.
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub min_p: f64,
    pub repetition_penalty: f64,
    rng: rand::rngs::StdRng,
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            rng: rand::rngs::StdRng::seed_from_u64(0),
        }
    }

    /// The next token after `context` (the ids so far, which the repetition penalty reads).
    fn pick(&mut self, logits: &Tensor, context: &[u32]) -> Result<u32> {
        let mut logits: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        if logits.iter().any(|v| v.is_nan()) {
            bail!("the model's logits are NaN: the base or adapter weights are not finite");
        }
        if self.repetition_penalty != 1.0 {
            let penalty = self.repetition_penalty as f32;
            let seen: std::collections::BTreeSet<usize> =
                context.iter().map(|&t| t as usize).collect();
            let vocab = logits.len();
            for t in seen.into_iter().filter(|&t| t < vocab) {
                let l = &mut logits[t];
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap_or(0)
        };
        if self.temperature <= 0.0 {
            return Ok(argmax());
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.top_k > 0 {
            idx.truncate(self.top_k);
        }
        let max = logits[idx[0]] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / self.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        // Nucleus: the smallest prefix whose mass reaches top_p.
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= self.top_p {
                keep = i + 1;
                break;
            }
        }
        // Min-p: the tokens at least min_p times as likely as the first (ratios that the
        // cuts before leave as they are).
        let floor = self.min_p * probs[0];
        keep = probs[..keep]
            .iter()
            .take_while(|&&p| p >= floor)
            .count()
            .max(1);
        let kept: f64 = probs[..keep].iter().sum();
        let mut u = self.rng.random::<f64>() * kept;
        for (i, p) in probs[..keep].iter().enumerate() {
            u -= p;
            if u <= 0.0 {
                return Ok(idx[i] as u32);
            }
        }
        Ok(idx[keep - 1] as u32)
    }
}

/// What a prompt-learning adapter puts ahead of the prompt.
pub enum Virtual {
    None,
    /// Prefix tuning: per-layer keys and values already in the cache.
    Cache(KvCache),
    /// Prompt tuning: `[1, virtual tokens, hidden]` embeddings before the prompt's.
    Embeds(Tensor),
}

impl Virtual {
    /// The model to run and the virtual tokens to put ahead of the prompt for `adapter`
    /// (`None`: `base` alone).
    pub fn of<'a>(base: &'a Llama, adapter: Option<&'a Adapter>) -> Result<(&'a Llama, Self)> {
        let Some(adapter) = adapter else {
            return Ok((base, Virtual::None));
        };
        let v = match adapter {
            Adapter::Prompt(m) if m.config.is_prefix() => Virtual::Cache(m.prefix_cache(1)?),
            Adapter::Prompt(m) => {
                Virtual::Embeds(m.values()?.detach().to_dtype(m.base.dtype)?.unsqueeze(0)?)
            }
            _ => Virtual::None,
        };
        Ok((adapter.model(), v))
    }

    /// A cache holding the virtual keys and values (prefix tuning) or an empty one, and the
    /// embeddings to feed ahead of the prompt (prompt tuning).
    pub fn into_cache(self, model: &Llama) -> (KvCache, Option<Tensor>) {
        let empty = || KvCache::new(model.config.num_hidden_layers);
        match self {
            Virtual::None => (empty(), None),
            Virtual::Cache(c) => (c, None),
            Virtual::Embeds(e) => (empty(), Some(e)),
        }
    }
}

/// Generates up to `max_new_tokens` after `prompt_ids`, calling `on_token` with each new
/// piece of text. The prompt is run once; each new token then costs one cached step.
pub fn generate(
    model: &Llama,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    max_new_tokens: usize,
    sampling: &mut Sampling,
    on_token: impl FnMut(&str),
) -> Result<Vec<u32>> {
    generate_with(
        model,
        Virtual::None,
        tok,
        prompt_ids,
        max_new_tokens,
        sampling,
        on_token,
    )
}

/// [`generate`] behind a prompt-learning adapter's virtual tokens.
pub fn generate_with(
    model: &Llama,
    virtual_tokens: Virtual,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    max_new_tokens: usize,
    sampling: &mut Sampling,
    on_token: impl FnMut(&str),
) -> Result<Vec<u32>> {
    let (mut cache, embeds) = virtual_tokens.into_cache(model);
    continue_generation(
        model,
        &mut cache,
        embeds,
        tok,
        &[],
        prompt_ids,
        max_new_tokens,
        sampling,
        on_token,
    )
}

/// [`generate`] after the keys and values already in `cache` (a conversation so far, whose ids
/// after the virtual tokens are `history`, or virtual tokens), feeding `embeds` (prompt
/// tuning's virtual tokens) and then `new_ids` first. `cache` is left holding every position
/// fed: the new ids and the generated tokens but the last.
#[allow(clippy::too_many_arguments)]
pub fn continue_generation(
    model: &Llama,
    cache: &mut KvCache,
    mut embeds: Option<Tensor>,
    tok: &Tokenizer,
    history: &[u32],
    new_ids: &[u32],
    max_new_tokens: usize,
    sampling: &mut Sampling,
    mut on_token: impl FnMut(&str),
) -> Result<Vec<u32>> {
    if new_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let stops = tok.stop_token_ids();
    // LongRoPE's switch to its long factors recomputes the ids cached after the virtual
    // positions, as transformers' Phi-3 drops its cache there (not after prompt tuning's
    // virtual embeddings, which are not ids).
    let virtual_len = cache.seq_len().saturating_sub(history.len());
    let recompute = embeds.is_none() && model.config.longrope.is_some();
    let mut fed: Vec<u32> = if recompute {
        history.to_vec()
    } else {
        Vec::new()
    };
    let mut input_ids: Vec<u32> = new_ids.to_vec();
    let mut out: Vec<u32> = Vec::new();
    let mut printed = 0;
    // Inference: adapter weights enter as constants, so no step builds an autograd graph
    // (the cached keys and values would otherwise chain every step to the ones before).
    let _no_grad = peft_ops::NoGrad::new();
    for _ in 0..max_new_tokens {
        let past = cache.seq_len();
        if recompute && past > virtual_len && model.rope_switches(past, input_ids.len()) {
            cache.truncate(virtual_len)?;
            input_ids = fed.drain(..).chain(input_ids).collect();
        }
        let input = Tensor::new(input_ids.as_slice(), &model.device)?.unsqueeze(0)?;
        if recompute {
            fed.extend(&input_ids);
        }
        let hidden = match embeds.take() {
            Some(e) => {
                let x = Tensor::cat(&[&e, &model.embed(&input)?], 1)?;
                model.forward_embeds(&x, None, Some(&mut *cache), false)?
            }
            None => model.forward(&input, None, Some(&mut *cache), false)?,
        };
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        // The ids so far, for the repetition penalty alone.
        let context = match sampling.repetition_penalty != 1.0 {
            true => [history, new_ids, &out].concat(),
            false => Vec::new(),
        };
        let next = sampling.pick(&model.logits(&last)?, &context)?;
        if stops.contains(&next) {
            break;
        }
        out.push(next);
        // Decode the whole continuation so multi-byte characters split over tokens print whole.
        let text = tok.decode(&out, true)?;
        if text.len() > printed && !text.ends_with('\u{FFFD}') {
            on_token(&text[printed..]);
            printed = text.len();
        }
        input_ids = vec![next];
    }
    Ok(out)
}

/// Token ids of a prompt, wrapped in the chat template when asked.
pub fn prompt_ids(
    tok: &Tokenizer,
    prompt: &str,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<u32>> {
    if !chat {
        return tok.encode(prompt, true);
    }
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(ChatMessage::new("system", s));
    }
    messages.push(ChatMessage::new("user", prompt));
    let text = tok.apply_chat_template(&messages, true)?;
    tok.encode(&text, false)
}

pub fn run(cmd: GenerateCmd) -> Result<()> {
    let mut sampling = cmd.decoding.sampling()?;
    if cmd.system.is_some() && !cmd.chat {
        eprintln!("note: --system has no effect without --chat");
    }
    let device = peft_ops::open_device(&cmd.device)?;
    let mut adapter = cmd.adapter.clone();
    let model = base_model(cmd.model.as_deref(), adapter.as_mut())?;
    let dtype = cmd.dtype.on(&device);
    let (base, tok) = load_base_with(&model, dtype, &device, cmd.quantized.on_load(dtype))?;
    let (adapter, tok) = match &adapter {
        Some(dir) => {
            let loaded = Adapter::load(base.clone(), dir)?;
            if let Adapter::Lora(m) = &loaded {
                if !m.changes_elsewhere.is_empty() {
                    eprintln!(
                        "note: the adapter also changes {} modules outside the language model (its vision tower), which text does not reach",
                        m.changes_elsewhere.len()
                    );
                }
            }
            let tok = tokenizer_for(tok, base.config.vocab_size, &loaded, dir)?;
            (Some(loaded), tok)
        }
        None => (None, tok),
    };
    let tok =
        tok.context("the model has no tokenizer (tokenizer.json or GGUF tokenizer metadata)")?;
    let (model, virtual_tokens) = Virtual::of(&base, adapter.as_ref())?;
    let ids = prompt_ids(&tok, &cmd.prompt, cmd.chat, cmd.system.as_deref())?;
    generate_with(
        model,
        virtual_tokens,
        &tok,
        &ids,
        cmd.decoding.max_new_tokens,
        &mut sampling,
        print_piece,
    )?;
    println!();
    Ok(())
}

/// Prints a piece of generated text as soon as it is decoded.
pub fn print_piece(piece: &str) {
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(piece.as_bytes());
    let _ = stdout.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(v: &[f32]) -> Tensor {
        Tensor::new(v, &candle_core::Device::Cpu).unwrap()
    }

    /// transformers' repetition penalty: a seen token's positive logit divided by it, a
    /// negative one multiplied, in greedy decoding too.
    #[test]
    fn repetition_penalty_turns_greedy_away_from_seen_tokens() {
        let mut s = Sampling::greedy();
        let l = logits(&[2.0, 1.5, -0.5, -0.6]);
        assert_eq!(s.pick(&l, &[0]).unwrap(), 0);
        s.repetition_penalty = 1.5;
        // 2.0 / 1.5 < 1.5: token 1 wins once token 0 was seen (twice counts once).
        assert_eq!(s.pick(&l, &[0, 0]).unwrap(), 1);
        let l = logits(&[-1.0, -0.7, -0.9]);
        // -0.7 · 1.5 = -1.05: token 2 wins.
        assert_eq!(s.pick(&l, &[1]).unwrap(), 2);
    }

    /// Min-p keeps the tokens at least min_p times as likely as the likeliest: here the two
    /// likeliest (0.5 and 0.3 of the mass; 0.15 and 0.05 fall below 0.5 · 0.5).
    #[test]
    fn min_p_keeps_the_tokens_near_the_likeliest() {
        let probs = [0.5f32, 0.3, 0.15, 0.05];
        let l = logits(&probs.map(f32::ln));
        let mut s = Sampling::greedy();
        s.temperature = 1.0;
        s.min_p = 0.5;
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[s.pick(&l, &[]).unwrap() as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[0] > seen[1] && seen[1] > 100, "{seen:?}");
    }
}
