//! `peft chat`: a conversation on stdin with a base model and several adapters loaded once,
//! switched between turns (`/adapter NAME`, `/base`) as HF PEFT's `set_adapter` and
//! `disable_adapter` do. Each reply sees the whole conversation, rendered with the chat
//! template of the answering adapter's tokenizer: the one saved beside it, else the base's.

use crate::generate::{continue_generation, print_piece, Decoding, Sampling, Virtual};
use crate::{base_model, load_base_with, tokenizer_for, DTypeArg, LoadQuantized};
use anyhow::{bail, Context, Result};
use peft::Adapters;
use peft_models::tokenizer::{ChatMessage, Tokenizer};
use peft_models::KvCache;
use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ChatCmd {
    /// HF model folder, .gguf file, or Hub id (`org/name`). Default: the base the first
    /// adapter's config names (`base_model_name_or_path`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// An adapter folder or Hub id, as `NAME=DIR` or `DIR` (named after its last part); repeat to load
    /// several. The first one answers until `/adapter NAME` or `/base`.
    #[arg(long)]
    adapter: Vec<String>,
    /// The system message of the conversation.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    decoding: Decoding,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    #[command(flatten)]
    quantized: LoadQuantized,
}

const HELP: &str = "\
/adapter NAME   answer with adapter NAME from now on
/base           answer with the base model alone
/adapters       list the loaded adapters (* marks the one answering)
/load NAME DIR  load another adapter folder as NAME
/unload NAME    unload adapter NAME
/system TEXT    set the system message (none when TEXT is empty)
/reset          forget the conversation
/help           this list
/quit           leave (so does the end of the input)";

/// The name and folder of an `--adapter` value: `NAME=DIR`, or `DIR` named after its folder.
fn named_adapter(arg: &str) -> Result<(String, PathBuf)> {
    if let Some((name, dir)) = arg.split_once('=') {
        if !name.is_empty() && !name.contains(['/', '\\']) {
            return Ok((name.to_string(), PathBuf::from(dir)));
        }
    }
    let dir = PathBuf::from(arg);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("--adapter {arg:?} names no folder"))?;
    Ok((name, dir))
}

struct Chat {
    adapters: Adapters,
    base_tok: Tokenizer,
    /// The tokenizers saved beside adapters (a chat template or tokens of their own), by name.
    adapter_toks: HashMap<String, Tokenizer>,
    system: Option<String>,
    /// The user and assistant turns so far.
    turns: Vec<ChatMessage>,
    /// The keys and values of the conversation so far, for the next turn to start from.
    cached: Option<Conversation>,
}

/// What the model has seen of the conversation: the next turn feeds only the tokens after the
/// part of its prompt that these ids already cover.
struct Conversation {
    /// The adapter it was computed with (`base` for none).
    adapter: String,
    cache: KvCache,
    /// Positions of virtual tokens (prompt or prefix tuning) ahead of `ids`.
    virtual_len: usize,
    /// The token ids in the cache after the virtual tokens.
    ids: Vec<u32>,
}

enum Line {
    Reply,
    Quit,
}

impl Chat {
    fn messages(&self) -> Vec<ChatMessage> {
        let system = self
            .system
            .iter()
            .map(|s| ChatMessage::new("system", s.clone()));
        system.chain(self.turns.iter().cloned()).collect()
    }

    fn active_name(&self) -> &str {
        self.adapters.active().map_or("base", |(name, _)| name)
    }

    /// The tokenizer of the adapter answering (its own, else the base's).
    fn tok(&self) -> &Tokenizer {
        self.adapters
            .active()
            .and_then(|(name, _)| self.adapter_toks.get(name))
            .unwrap_or(&self.base_tok)
    }

    /// Loads the adapter folder `dir` as `name`, with the tokenizer saved beside it.
    fn load(&mut self, name: &str, dir: &Path) -> Result<()> {
        self.adapters.load_adapter(name, dir)?;
        let adapter = self.adapters.get(name).context("the adapter just loaded")?;
        let vocab = self.adapters.base().config.vocab_size;
        match tokenizer_for(None, vocab, adapter, dir)? {
            Some(tok) => self.adapter_toks.insert(name.to_string(), tok),
            None => self.adapter_toks.remove(name),
        };
        Ok(())
    }

    /// Answers `text` as the next user turn, printing the reply as it is generated.
    fn reply(&mut self, text: &str, max_new_tokens: usize, sampling: &mut Sampling) -> Result<()> {
        self.turns.push(ChatMessage::new("user", text));
        let earlier = self.cached.take();
        let answer = (|| -> Result<String> {
            let tok = self.tok();
            if !tok.has_chat_template() {
                bail!(
                    "the tokenizer of {} has no chat template: use peft generate for plain text",
                    self.active_name()
                );
            }
            let prompt = tok.apply_chat_template(&self.messages(), true)?;
            let ids = tok.encode(&prompt, false)?;
            let adapter = self.active_name().to_string();
            let (model, virtual_tokens) =
                Virtual::of(self.adapters.base(), self.adapters.active().map(|(_, a)| a))?;
            // The turns so far are in the cache when the same adapter computed them: only the
            // prompt's tokens past what it shares with them are fed (at least one, for logits).
            let (mut cache, embeds, virtual_len, shared) = match earlier {
                Some(c) if c.adapter == adapter => {
                    let shared = c.ids.iter().zip(&ids).take_while(|(a, b)| a == b).count();
                    let shared = shared.min(ids.len().saturating_sub(1));
                    let mut cache = c.cache;
                    cache.truncate(c.virtual_len + shared)?;
                    (cache, None, c.virtual_len, shared)
                }
                _ => {
                    let (cache, embeds) = virtual_tokens.into_cache(model);
                    let virtual_len = cache.seq_len() + embeds.as_ref().map_or(0, |e| e.dims()[1]);
                    (cache, embeds, virtual_len, 0)
                }
            };
            let out = continue_generation(
                model,
                &mut cache,
                embeds,
                tok,
                &ids[..shared],
                &ids[shared..],
                max_new_tokens,
                sampling,
                print_piece,
            )?;
            println!();
            let answer = tok.decode(&out, true)?;
            let fed = cache.seq_len() - virtual_len;
            self.cached = Some(Conversation {
                adapter,
                cache,
                virtual_len,
                ids: ids.iter().chain(&out).copied().take(fed).collect(),
            });
            Ok(answer)
        })();
        match answer {
            Ok(content) => {
                self.turns.push(ChatMessage::new("assistant", content));
                Ok(())
            }
            Err(e) => {
                // The question goes unanswered: leave the conversation as it was.
                self.turns.pop();
                Err(e)
            }
        }
    }

    /// Runs one `/command`.
    fn command(&mut self, line: &str) -> Result<Line> {
        // A command may change the adapters, the system message or the turns: the next reply
        // starts afresh.
        self.cached = None;
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        match cmd {
            "/adapter" if !rest.is_empty() => {
                self.adapters.set_adapter(rest)?;
                eprintln!("answering with adapter {rest}");
            }
            "/base" => {
                self.adapters.disable_adapter();
                eprintln!("answering with the base model");
            }
            "/adapters" => {
                let active = self.adapters.active().map(|(n, _)| n.to_string());
                for name in self.adapters.names() {
                    let mark = if Some(name) == active.as_deref() {
                        "*"
                    } else {
                        " "
                    };
                    let kind = self.adapters.get(name).map_or("", |a| a.peft_type());
                    eprintln!("{mark} {name} ({kind})");
                }
                if active.is_none() {
                    eprintln!("* base");
                }
            }
            "/load" => {
                let (name, dir) = rest.split_once(' ').context("usage: /load NAME DIR")?;
                self.load(name, Path::new(dir.trim()))?;
                eprintln!("loaded adapter {name}");
            }
            "/unload" if !rest.is_empty() => {
                self.adapters.delete_adapter(rest)?;
                self.adapter_toks.remove(rest);
                eprintln!(
                    "unloaded adapter {rest}; answering with {}",
                    self.active_name()
                );
            }
            "/system" => {
                self.system = (!rest.is_empty()).then(|| rest.to_string());
                eprintln!("system message set");
            }
            "/reset" => {
                self.turns.clear();
                eprintln!("conversation cleared");
            }
            "/help" => eprintln!("{HELP}"),
            "/quit" | "/exit" => return Ok(Line::Quit),
            _ => bail!("unknown command {line:?} (/help lists them)"),
        }
        Ok(Line::Reply)
    }
}

pub fn run(cmd: ChatCmd) -> Result<()> {
    let mut sampling = cmd.decoding.sampling()?;
    let mut named: Vec<(String, PathBuf)> = cmd
        .adapter
        .iter()
        .map(|a| named_adapter(a))
        .collect::<Result<_>>()?;
    let device = peft_ops::open_device(&cmd.device)?;
    let model = base_model(cmd.model.as_deref(), named.first_mut().map(|(_, dir)| dir))?;
    let dtype = cmd.dtype.on(&device);
    let (base, tok) = load_base_with(&model, dtype, &device, cmd.quantized.on_load(dtype))?;
    let base_tok =
        tok.context("the model has no tokenizer (tokenizer.json or GGUF tokenizer metadata)")?;
    let mut chat = Chat {
        adapters: Adapters::new(base),
        base_tok,
        adapter_toks: HashMap::new(),
        system: cmd.system.clone(),
        turns: Vec::new(),
        cached: None,
    };
    for (name, dir) in &named {
        chat.load(name, dir)
            .with_context(|| format!("adapter {name}"))?;
    }
    if let Some((first, _)) = named.first() {
        chat.adapters.set_adapter(first)?;
    }
    if !chat.tok().has_chat_template() {
        bail!("the model has no chat template: use peft generate for plain text");
    }

    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "peft chat: {} with {}. /help lists the commands.",
            model.display(),
            chat.active_name()
        );
    }
    let mut lines = std::io::stdin().lock().lines();
    for number in 1.. {
        if interactive {
            eprint!("{}> ", chat.active_name());
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read the input")?;
        let line = line.trim();
        let result = if line.is_empty() {
            Ok(())
        } else if line.starts_with('/') {
            match chat.command(line) {
                Ok(Line::Quit) => break,
                other => other.map(|_| ()),
            }
        } else {
            chat.reply(line, cmd.decoding.max_new_tokens, &mut sampling)
        };
        match result {
            // At a terminal a failed line is reported and the conversation goes on; a script
            // stops at it.
            Err(e) if interactive => eprintln!("error: {e:#}"),
            Err(e) => return Err(e.context(format!("input line {number}"))),
            Ok(()) => {}
        }
    }
    Ok(())
}
