//! Tokenizer for Llama-family chat models (SmolLM2, Llama 2/3, Qwen2/3, Mistral, Phi-3).
//!
//! Loads a Hugging Face model folder or the tokenizer embedded in GGUF metadata (byte-level or
//! SentencePiece BPE), renders chat templates the way `transformers` does, and writes folders
//! that `AutoTokenizer` can load and GGUF metadata that llama.cpp reads.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value as GgufValue;
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use crate::chat_template::TemplateInputs;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

/// One turn of a conversation as chat templates see it: a JSON object with a `role`, a
/// `content` (text, a list of text parts, or absent or `null` in a turn that only calls tools)
/// and any other fields (`tool_calls`, `name`, `tool_call_id`, `reasoning_content`, ...), kept
/// in their given order and handed to the template as they are, as transformers does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "JsonMap", into = "JsonMap")]
pub struct ChatMessage {
    fields: JsonMap,
}

type JsonMap = serde_json::Map<String, JsonValue>;

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        let mut fields = JsonMap::new();
        fields.insert("role".into(), JsonValue::String(role.into()));
        fields.insert("content".into(), JsonValue::String(content.into()));
        Self { fields }
    }

    pub fn role(&self) -> &str {
        self.fields["role"].as_str().unwrap_or_default()
    }

    /// The text: the content, or its text parts joined; `None` when the turn has none.
    pub fn content(&self) -> Option<String> {
        match self.fields.get("content")? {
            JsonValue::String(s) => Some(s.clone()),
            JsonValue::Array(parts) => Some(
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(JsonValue::as_str))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Every field, in the order given.
    pub fn fields(&self) -> &JsonMap {
        &self.fields
    }
}

impl TryFrom<JsonMap> for ChatMessage {
    type Error = String;

    fn try_from(fields: JsonMap) -> std::result::Result<Self, String> {
        if !fields.get("role").is_some_and(JsonValue::is_string) {
            return Err("a message needs a text \"role\"".into());
        }
        match fields.get("content") {
            None | Some(JsonValue::Null | JsonValue::String(_)) => {}
            // Content parts, as multimodal chat formats write text: `[{"type": "text", "text":
            // "..."}]`; templates that know them (Gemma 3, Llama 3.2, Qwen-VL, ...) iterate them.
            Some(JsonValue::Array(parts)) => {
                for part in parts {
                    let kind = part.get("type").and_then(JsonValue::as_str);
                    match kind {
                        Some("text") if part.get("text").is_some_and(JsonValue::is_string) => {}
                        Some("text") => return Err("a text content part needs a \"text\" string".into()),
                        Some(other) => return Err(format!("content parts of type {other:?} need a multimodal model; only \"text\" parts are supported")),
                        None => return Err("each content part needs a \"type\"".into()),
                    }
                }
            }
            Some(_) => {
                return Err("a message's \"content\" must be text or a list of text parts".into())
            }
        }
        Ok(Self { fields })
    }
}

impl From<ChatMessage> for JsonMap {
    fn from(m: ChatMessage) -> Self {
        m.fields
    }
}

/// Special tokens by content, as `tokenizer_config.json` names them.
#[derive(Clone, Debug, Default)]
struct SpecialTokens {
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    unk: Option<String>,
}

impl SpecialTokens {
    fn named(&self) -> [(&'static str, Option<&str>); 4] {
        [
            ("bos_token", self.bos.as_deref()),
            ("eos_token", self.eos.as_deref()),
            ("pad_token", self.pad.as_deref()),
            ("unk_token", self.unk.as_deref()),
        ]
    }
}

/// A Hugging Face fast tokenizer plus the chat template and special tokens of its model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    special: SpecialTokens,
    /// The `tokenizer.ggml.pre` name of a tokenizer read from GGUF, written back as it was.
    gguf_pre: Option<String>,
    /// The piece scores of a SentencePiece tokenizer read from GGUF, written back as they were.
    gguf_scores: Option<Vec<f32>>,
}

impl std::fmt::Debug for Tokenizer {
    // The wrapped tokenizer would print its whole vocabulary.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("has_chat_template", &self.has_chat_template())
            .finish_non_exhaustive()
    }
}

/// Tokens that end a turn in the chat formats we support, besides the model's EOS.
const TURN_END_TOKENS: [&str; 6] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
];

const TOKENIZER_FILE: &str = "tokenizer.json";
const CONFIG_FILE: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
const PROCESSOR_TEMPLATE_FILE: &str = "chat_template.json";

impl Tokenizer {
    /// Loads `tokenizer.json` from a Hugging Face model folder, with special tokens and the chat
    /// template from `tokenizer_config.json`, `special_tokens_map.json` and `chat_template.jinja`
    /// (or an image-text model's `chat_template.json`).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            bail!("tokenizer file not found: {}", path.display());
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;

        let config = read_json_object(&dir.join(CONFIG_FILE))?;
        let special_map = read_json_object(&dir.join(SPECIAL_TOKENS_MAP_FILE))?;
        let token = |key: &str| {
            [&config, &special_map]
                .into_iter()
                .find_map(|m| m.get(key).and_then(token_content))
        };
        let special = SpecialTokens {
            bos: token("bos_token"),
            eos: token("eos_token"),
            pad: token("pad_token"),
            unk: token("unk_token"),
        };

        // transformers 5 keeps the template in its own file, which overrides the config's.
        let template_path = dir.join(CHAT_TEMPLATE_FILE);
        let chat_template = if template_path.is_file() {
            Some(
                fs::read_to_string(&template_path)
                    .with_context(|| format!("cannot read {}", template_path.display()))?,
            )
        } else {
            // An image-text model's processor may keep it in `chat_template.json` instead.
            let processor = read_json_object(&dir.join(PROCESSOR_TEMPLATE_FILE))?;
            let template = [&config, &processor]
                .into_iter()
                .find_map(|m| m.get("chat_template"))
                .map(template_from_config)
                .transpose()?;
            template.flatten()
        };

        Ok(Self {
            inner,
            chat_template,
            special,
            gguf_pre: None,
            gguf_scores: None,
        })
    }

    /// Builds the tokenizer embedded in GGUF metadata (`tokenizer.ggml.*` keys): byte-level BPE
    /// (`tokenizer.ggml.model == "gpt2"`: GPT-2, Llama 3, Qwen, SmolLM, ...) or SentencePiece
    /// BPE (`"llama"`: Llama 2, Mistral 7B, Phi-3, ...), as the model's tokenizer.json on the
    /// Hugging Face hub tokenizes.
    pub fn from_gguf_metadata(md: &HashMap<String, GgufValue>) -> Result<Self> {
        let md = Metadata(md);
        let model = md
            .string("tokenizer.ggml.model")?
            .context("GGUF metadata has no tokenizer.ggml.model")?;
        let tokens = md
            .strings("tokenizer.ggml.tokens")?
            .context("GGUF metadata has no tokenizer.ggml.tokens")?;
        let types = md
            .array_of("tokenizer.ggml.token_type", "an i32 array", |t| {
                t.to_i32().ok()
            })?
            .unwrap_or_default();
        let token_at = |key: &str| -> Result<Option<String>> {
            md.u32(key)?
                .map(|id| {
                    tokens
                        .get(id as usize)
                        .map(|t| (*t).to_owned())
                        .ok_or_else(|| anyhow!("GGUF {key} {id} is outside the vocabulary"))
                })
                .transpose()
        };
        let special = SpecialTokens {
            bos: token_at("tokenizer.ggml.bos_token_id")?,
            eos: token_at("tokenizer.ggml.eos_token_id")?,
            pad: token_at("tokenizer.ggml.padding_token_id")?,
            unk: token_at("tokenizer.ggml.unknown_token_id")?,
        };

        let mut gguf_scores = None;
        let (mut inner, byte_level, adds_bos_by_default, gguf_pre) = match model {
            "gpt2" => {
                let pre_name = md.string("tokenizer.ggml.pre")?.unwrap_or("default");
                let pre = PreTokenization::from_gguf_name(pre_name)?;
                let merges = md
                    .strings("tokenizer.ggml.merges")?
                    .unwrap_or_default()
                    .into_iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_owned(), b.to_owned()))
                            .ok_or_else(|| anyhow!("malformed GGUF merge {m:?}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let inner = byte_level_bpe(&tokens, merges, pre, special.unk.as_deref())?;
                (inner, true, pre.adds_bos_by_default(), Some(pre_name.to_owned()))
            }
            "llama" => {
                let scores = md
                    .array_of("tokenizer.ggml.scores", "an f32 array", |s| s.to_f32().ok())?
                    .unwrap_or_default();
                let space_prefix = md.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let unk = special.unk.as_deref();
                let inner = sentencepiece_bpe(&tokens, &scores, unk, space_prefix)?;
                gguf_scores = (!scores.is_empty()).then_some(scores);
                (inner, false, true, None)
            }
            other => bail!("unsupported GGUF tokenizer model {other:?}: byte-level BPE (\"gpt2\") and SentencePiece BPE (\"llama\") are supported"),
        };

        let add_bos = md
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(adds_bos_by_default);
        let add_eos = md.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let bos = special.bos.as_deref().filter(|_| add_bos);
        let eos = special.eos.as_deref().filter(|_| add_eos);
        let template = match bos.is_some() || eos.is_some() {
            true => Some(template_processor(&inner, bos, eos)?),
            false => None,
        };
        // Byte-level BPE's processor as in GPT-2's tokenizer.json (offsets trimmed).
        let processor: Option<PostProcessorWrapper> = match (byte_level, template) {
            (true, Some(t)) => Some(
                ProcessorSequence::new(vec![ByteLevel::new(true, false, true).into(), t.into()])
                    .into(),
            ),
            (true, None) => Some(ByteLevel::new(true, false, true).into()),
            (false, t) => t.map(Into::into),
        };
        inner.with_post_processor(processor);

        // Control tokens (type 3) are special; user-defined ones (type 4) are plain added tokens.
        // Both must be matched whole in text rather than split by the pre-tokenizer.
        let mut special_tokens = Vec::new();
        let mut added_tokens = Vec::new();
        for (token, ty) in tokens.iter().zip(&types) {
            match ty {
                3 => special_tokens.push(AddedToken::from(*token, true)),
                4 => added_tokens.push(AddedToken::from(*token, false)),
                _ => {}
            }
        }
        inner
            .add_special_tokens(special_tokens)
            .map_err(|e| anyhow!("cannot add the GGUF special tokens: {e}"))?;
        inner
            .add_tokens(added_tokens)
            .map_err(|e| anyhow!("cannot add the GGUF added tokens: {e}"))?;

        let chat_template = md.string("tokenizer.chat_template")?.map(str::to_owned);
        Ok(Self {
            inner,
            chat_template,
            special,
            gguf_pre,
            gguf_scores,
        })
    }

    /// Token ids of `text`; `add_special_tokens` adds BOS/EOS only where the model's config does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| anyhow!("cannot encode text: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` (no special tokens added) with the byte range each covers.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Vec<(u32, (usize, usize))>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("cannot encode text: {e}"))?;
        Ok(encoding
            .get_ids()
            .iter()
            .copied()
            .zip(encoding.get_offsets().iter().copied())
            .collect())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("cannot decode ids: {e}"))
    }

    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    /// Vocabulary size including added tokens, like `len(tokenizer)` in transformers.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.special
            .eos
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.special
            .bos
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    /// The padding token, or EOS when the model defines none.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special
            .pad
            .as_deref()
            .and_then(|t| self.token_to_id(t))
            .or_else(|| self.eos_token_id())
    }

    /// Ids that end generation: EOS first, then any turn-end tokens the vocabulary has.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos_token_id().into_iter().collect();
        for id in TURN_END_TOKENS.iter().filter_map(|t| self.token_to_id(t)) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the model's chat template, as transformers' `apply_chat_template`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, TemplateInputs::default(), add_generation_prompt)
    }

    /// [`Tokenizer::apply_chat_template`] with tools and template variables.
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        inputs: TemplateInputs,
        add_generation_prompt: bool,
    ) -> Result<String> {
        Ok(self
            .apply_chat_template_tracked(messages, inputs, add_generation_prompt)?
            .0)
    }

    /// Whether the chat template marks assistant text with `{% generation %}` blocks.
    pub fn chat_template_has_generation_blocks(&self) -> bool {
        self.chat_template
            .as_deref()
            .is_some_and(crate::chat_template::has_generation_blocks)
    }

    /// [`Tokenizer::apply_chat_template_with`] and the byte ranges of the template's
    /// `{% generation %}` blocks in the text.
    pub fn apply_chat_template_tracked(
        &self,
        messages: &[ChatMessage],
        inputs: TemplateInputs,
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<std::ops::Range<usize>>)> {
        let source = self
            .chat_template
            .as_deref()
            .context("tokenizer has no chat template")?;
        crate::chat_template::render_tracked(
            source,
            messages,
            inputs,
            add_generation_prompt,
            &self.special.named(),
        )
    }

    /// Adds `tokens` as special tokens where the vocabulary lacks them (as transformers'
    /// `add_special_tokens`); returns the ids of those added, in order.
    pub fn add_special_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>> {
        let special = tokens
            .iter()
            .map(|t| tokenizers::AddedToken::from(t.as_str(), true));
        self.add_missing(special.collect())
    }

    /// Adds the `tokens` the vocabulary lacks, each as given (special or not, its stripping);
    /// returns their ids, in order.
    fn add_missing(&mut self, tokens: Vec<tokenizers::AddedToken>) -> Result<Vec<u32>> {
        let new: Vec<tokenizers::AddedToken> = tokens
            .into_iter()
            .filter(|t| self.token_to_id(&t.content).is_none())
            .collect();
        self.inner.add_tokens(new.clone()).map_err(|e| {
            let names: Vec<&str> = new.iter().map(|t| t.content.as_str()).collect();
            anyhow!("cannot add tokens {names:?}: {e}")
        })?;
        Ok(new
            .iter()
            .filter_map(|t| self.token_to_id(&t.content))
            .collect())
    }

    /// TRL's `clone_chat_template`, on the tokenizer side: takes `source`'s chat template and
    /// EOS token, and adds the tokens `source` added to its vocabulary that this one lacks
    /// (each as it is there: special or not, its stripping), in `source`'s order. Returns the
    /// ids of the tokens added.
    pub fn clone_chat_template(&mut self, source: &Tokenizer) -> Result<Vec<u32>> {
        let template = source
            .chat_template
            .clone()
            .context("the tokenizer to take the chat template from has none")?;
        let mut theirs: Vec<_> = source
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .collect();
        theirs.sort_by_key(|(id, _)| *id);
        let added = self.add_missing(theirs.into_iter().map(|(_, token)| token).collect())?;
        self.chat_template = Some(template);
        if let Some(eos) = &source.special.eos {
            if self.token_to_id(eos).is_none() {
                bail!("the EOS token {eos:?} of the chat template's tokenizer is not in its vocabulary");
            }
            self.special.eos = Some(eos.clone());
        }
        Ok(added)
    }

    /// Adds TRL's placeholder tokens (`<extra_id_0>`, ...) until the vocabulary has `size`
    /// entries, as `clone_chat_template` fills an embedding grown to a multiple of 64; returns
    /// their ids.
    pub fn fill_vocab(&mut self, size: usize) -> Result<Vec<u32>> {
        let mut added = Vec::new();
        for i in 0.. {
            if self.vocab_size() >= size {
                break;
            }
            let placeholder = format!("<extra_id_{i}>");
            added.extend(self.add_missing(vec![tokenizers::AddedToken::from(placeholder, false)])?);
        }
        Ok(added)
    }

    /// Replaces the chat template (a `--chat-template` file, such as TRL's training templates).
    pub fn set_chat_template(&mut self, template: String) {
        self.chat_template = Some(template);
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` into `dir`,
    /// each through a temporary file and a rename so readers never see a partial file.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

        let tokenizer_json = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))?;
        write_atomic(dir, TOKENIZER_FILE, tokenizer_json.as_bytes())?;

        let mut config = serde_json::Map::new();
        config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        for (name, token) in self.special.named() {
            if let Some(token) = token {
                config.insert(name.into(), token.into());
            }
        }
        // Our decode never cleans up spaces; keep transformers consistent with it.
        config.insert("clean_up_tokenization_spaces".into(), false.into());
        // transformers before 4.47 reads the template only from the config; later versions prefer
        // chat_template.jinja, so both are written.
        if let Some(template) = &self.chat_template {
            config.insert("chat_template".into(), template.as_str().into());
        }
        let config_json = crate::io::sorted_pretty_json(&JsonValue::Object(config))?;
        write_atomic(dir, CONFIG_FILE, config_json.as_bytes())?;

        let template_path = dir.join(CHAT_TEMPLATE_FILE);
        match &self.chat_template {
            Some(template) => write_atomic(dir, CHAT_TEMPLATE_FILE, template.as_bytes())?,
            // A stale template file would override the config on the next load.
            None if template_path.exists() => fs::remove_file(&template_path)
                .with_context(|| format!("cannot remove {}", template_path.display()))?,
            None => {}
        }
        Ok(())
    }
}

/// The text llama.cpp's `convert_hf_to_gguf.py` tells pre-tokenizers apart by (its `chktxt`):
/// whitespace runs, digit groups, contractions, punctuation runs, emoji and several scripts.
const PRE_TOKENIZER_PROBE: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

impl Tokenizer {
    /// The `tokenizer.ggml.*` metadata of this tokenizer (and its chat template), as llama.cpp's
    /// converter writes it, the vocabulary padded to `vocab_size` (the embedding's rows) with
    /// unused `[PADn]` tokens. Byte-level BPE (`gpt2`) gets its merges and the pre-tokenizer
    /// name whose llama.cpp rules tokenize a probe text exactly as this tokenizer does;
    /// SentencePiece BPE (`llama`, byte fallback) gets piece scores: those of the GGUF file it
    /// came from, else scores that rank the pieces in the order of the merges that make them.
    pub fn gguf_metadata(&self, vocab_size: usize) -> Result<Vec<(String, GgufValue)>> {
        let tokenizers::ModelWrapper::BPE(bpe) = self.inner.get_model() else {
            bail!("only BPE tokenizers (byte-level or SentencePiece) can be written to GGUF");
        };
        let sentencepiece = bpe.byte_fallback;
        let vocab = self.inner.get_vocab(true);
        let size = vocab.values().max().map_or(0, |&id| id as usize + 1);
        if size > vocab_size {
            bail!(
                "the tokenizer has {size} tokens, more than the model's vocabulary of {vocab_size}"
            );
        }
        let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
        for (token, &id) in &vocab {
            tokens[id as usize] = Some(token.clone());
        }
        let serialized: JsonValue = serde_json::from_str(
            &self
                .inner
                .to_string(false)
                .map_err(|e| anyhow!("cannot serialize the tokenizer: {e}"))?,
        )?;
        let merges = serialized["model"]["merges"]
            .as_array()
            .context("the BPE model has no merges list")?
            .iter()
            .map(|m| match m {
                JsonValue::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .with_context(|| format!("malformed merge {m}")),
                JsonValue::Array(pair) => match (pair.first(), pair.get(1)) {
                    (Some(JsonValue::String(a)), Some(JsonValue::String(b))) => {
                        Ok((a.clone(), b.clone()))
                    }
                    _ => bail!("malformed merge {m}"),
                },
                _ => bail!("malformed merge {m}"),
            })
            .collect::<Result<Vec<_>>>()?;

        let added = self.inner.get_added_tokens_decoder();
        let (mut names, mut types) = (Vec::new(), Vec::new());
        for (id, token) in tokens.iter().enumerate() {
            // llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined,
            // 5 unused, 6 byte.
            let is_byte = |t: &str| {
                t.len() == 6
                    && t.starts_with("<0x")
                    && t.ends_with('>')
                    && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
            };
            let ty = match (token, added.get(&(id as u32))) {
                (None, _) => 5,
                (Some(t), _) if sentencepiece && self.special.unk.as_deref() == Some(t) => 2,
                (Some(t), Some(a)) if a.special || t.starts_with("<|") && t.ends_with("|>") => 3,
                (Some(_), Some(_)) => 4,
                (Some(t), None) if sentencepiece && is_byte(t) => 6,
                (Some(_), None) => 1,
            };
            names.push(GgufValue::String(
                token.clone().unwrap_or_else(|| format!("[PAD{id}]")),
            ));
            types.push(GgufValue::I32(ty));
        }

        let model = if sentencepiece { "llama" } else { "gpt2" };
        let mut md: Vec<(String, GgufValue)> = vec![
            (
                "tokenizer.ggml.model".into(),
                GgufValue::String(model.into()),
            ),
            ("tokenizer.ggml.tokens".into(), GgufValue::Array(names)),
            ("tokenizer.ggml.token_type".into(), GgufValue::Array(types)),
        ];
        if sentencepiece {
            let scores = match &self.gguf_scores {
                Some(scores) => scores.clone(),
                None => merge_rank_scores(&tokens, &merges),
            };
            let mut scores: Vec<GgufValue> = scores.into_iter().map(GgufValue::F32).collect();
            scores.resize(vocab_size, GgufValue::F32(-1000.0));
            md.push(("tokenizer.ggml.scores".into(), GgufValue::Array(scores)));
            // A prepended `▁` shows in the first token of a word at the start of the text.
            let first = self.encode("a", false)?.first().copied();
            let space_prefix = first
                .and_then(|id| self.inner.id_to_token(id))
                .is_some_and(|t| t.starts_with('▁'));
            md.push((
                "tokenizer.ggml.add_space_prefix".into(),
                GgufValue::Bool(space_prefix),
            ));
        } else {
            let merges = merges
                .into_iter()
                .map(|(a, b)| GgufValue::String(format!("{a} {b}")));
            md.push((
                "tokenizer.ggml.merges".into(),
                GgufValue::Array(merges.collect()),
            ));
        }
        let ids = [
            ("bos", &self.special.bos),
            ("eos", &self.special.eos),
            ("unknown", &self.special.unk),
            ("padding", &self.special.pad),
        ];
        for (key, token) in ids {
            if let Some(id) = token.as_deref().and_then(|t| self.token_to_id(t)) {
                md.push((format!("tokenizer.ggml.{key}_token_id"), GgufValue::U32(id)));
            }
        }
        let with_special = self.encode("a", true)?;
        let adds_bos =
            self.bos_token_id().is_some() && with_special.first() == self.bos_token_id().as_ref();
        let adds_eos =
            self.eos_token_id().is_some() && with_special.last() == self.eos_token_id().as_ref();
        md.push((
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(adds_bos),
        ));
        md.push((
            "tokenizer.ggml.add_eos_token".into(),
            GgufValue::Bool(adds_eos),
        ));
        if let Some(template) = &self.chat_template {
            md.push((
                "tokenizer.chat_template".into(),
                GgufValue::String(template.clone()),
            ));
        }
        if sentencepiece {
            return Ok(md);
        }

        // The first llama.cpp pre-tokenizer that reproduces this tokenizer on the probe. Where
        // the vocabulary makes two alike (no multi-digit tokens: Qwen2's single digits and Llama
        // 3's groups of three give the same tokens), the first of this order is llama.cpp's.
        // A tokenizer read from GGUF tries its own name first (llama.cpp has several names for
        // some rules, e.g. starcoder and smollm).
        let want = self.encode(PRE_TOKENIZER_PROBE, false)?;
        let known = ["smollm", "qwen2", "llama-bpe", "tekken", "gpt-2"];
        md.insert(
            1,
            (
                "tokenizer.ggml.pre".into(),
                GgufValue::String(String::new()),
            ),
        );
        for name in self.gguf_pre.as_deref().into_iter().chain(known) {
            md[1].1 = GgufValue::String(name.into());
            let map: HashMap<String, GgufValue> = md.iter().cloned().collect();
            let Ok(candidate) = Self::from_gguf_metadata(&map) else {
                continue;
            };
            let got = candidate.encode(PRE_TOKENIZER_PROBE, false)?;
            if got == want {
                return Ok(md);
            }
        }
        bail!("no llama.cpp pre-tokenizer that peft-rs knows (smollm, qwen2, llama-bpe, tekken, gpt-2) splits text as this tokenizer does")
    }
}

/// SentencePiece piece scores for a vocabulary known only by its BPE merges (a tokenizer.json):
/// llama.cpp merges the adjacent pair whose joined piece scores highest, so a piece made by an
/// earlier merge scores higher (`-rank` of the first merge that makes it); pieces no merge
/// makes (characters, bytes, special tokens) score 0.
fn merge_rank_scores(tokens: &[Option<String>], merges: &[(String, String)]) -> Vec<f32> {
    let mut first_rank: HashMap<String, usize> = HashMap::new();
    for (rank, (a, b)) in merges.iter().enumerate() {
        first_rank.entry(format!("{a}{b}")).or_insert(rank);
    }
    tokens
        .iter()
        .map(|t| match t.as_ref().and_then(|t| first_rank.get(t)) {
            Some(&rank) => -(rank as f32) - 1.0,
            None => 0.0,
        })
        .collect()
}

/// How a GGUF `tokenizer.ggml.pre` name splits text before BPE, mirroring the model's
/// tokenizer.json on the Hugging Face hub.
#[derive(Clone, Copy, Debug)]
enum PreTokenization {
    /// GPT-2's regex inside ByteLevel.
    Gpt2,
    /// Every digit on its own, then GPT-2's regex (SmolLM, StarCoder).
    DigitsGpt2,
    Llama3,
    Qwen2,
    /// Mistral Nemo and later Mistral models.
    Tekken,
}

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreTokenization {
    /// Names as llama.cpp's converter writes them.
    fn from_gguf_name(name: &str) -> Result<Self> {
        Ok(match name {
            "default" | "gpt-2" => Self::Gpt2,
            "smollm" | "starcoder" | "refact" => Self::DigitsGpt2,
            // GLM-4's splits as Llama 3's (its contractions spelled case by case).
            "llama-bpe" | "llama3" | "llama-v3" | "glm4" => Self::Llama3,
            "qwen2" | "deepseek-r1-qwen" => Self::Qwen2,
            "tekken" => Self::Tekken,
            other => bail!("unsupported GGUF pre-tokenizer {other:?}"),
        })
    }

    fn pre_tokenizer(self) -> Result<PreTokenizerWrapper> {
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("cannot compile pre-tokenizer regex: {e}"))?;
            Ok(split.into())
        };
        // After an explicit Split, ByteLevel only maps bytes to characters.
        let split_then_bytes = |pattern: &str| -> Result<PreTokenizerWrapper> {
            Ok(Sequence::new(vec![
                split(pattern)?,
                ByteLevel::new(false, true, false).into(),
            ])
            .into())
        };
        let gpt2 = ByteLevel::new(false, true, true);
        match self {
            Self::Gpt2 => Ok(gpt2.into()),
            Self::DigitsGpt2 => {
                Ok(Sequence::new(vec![Digits::new(true).into(), gpt2.into()]).into())
            }
            Self::Llama3 => split_then_bytes(LLAMA3_PATTERN),
            Self::Qwen2 => split_then_bytes(QWEN2_PATTERN),
            Self::Tekken => split_then_bytes(TEKKEN_PATTERN),
        }
    }

    fn ignores_merges(self) -> bool {
        matches!(self, Self::Llama3 | Self::Tekken)
    }

    fn normalizes_nfc(self) -> bool {
        matches!(self, Self::Qwen2)
    }

    /// llama.cpp's default when the GGUF has no `tokenizer.ggml.add_bos_token`.
    fn adds_bos_by_default(self) -> bool {
        matches!(self, Self::Llama3 | Self::Tekken)
    }
}

/// A byte-level BPE tokenizer (GPT-2's scheme) of a vocabulary, its merges and a llama.cpp
/// pre-tokenizer, as the model's tokenizer.json has it.
fn byte_level_bpe(
    tokens: &[&str],
    merges: Vec<(String, String)>,
    pre: PreTokenization,
    unk: Option<&str>,
) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| ((*t).to_owned(), id as u32))
        .collect();
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignores_merges());
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk.to_owned());
    }
    let bpe = bpe
        .build()
        .map_err(|e| anyhow!("cannot build BPE model from GGUF: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    if pre.normalizes_nfc() {
        inner
            .with_normalizer(Some(NFC))
            .map_err(|e| anyhow!("cannot set the NFC normalizer: {e}"))?;
    }
    inner.with_pre_tokenizer(Some(pre.pre_tokenizer()?));
    inner.with_decoder(Some(ByteLevel::default()));
    Ok(inner)
}

/// A SentencePiece BPE tokenizer as transformers builds it for Llama 2 (LlamaTokenizerFast,
/// legacy): spaces become `▁` (one prepended when `space_prefix`), pieces merge in the order of
/// their scores (transformers' `generate_merges`), bytes without a piece become `<0xXX>` tokens.
fn sentencepiece_bpe(
    tokens: &[&str],
    scores: &[f32],
    unk: Option<&str>,
    space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    let vocab: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (*t, id as u32))
        .collect();
    // Every split of a piece into two pieces, highest piece score first (a vocabulary without
    // scores: by piece id), then the longer left part, then the longer right part.
    let score = |id: usize| scores.get(id).copied().unwrap_or(-(id as f32));
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let mut local: Vec<(&str, &str, f32)> = piece
            .char_indices()
            .skip(1)
            .map(|(i, _)| piece.split_at(i))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, score(id)))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (a, b) = (key(a), key(b));
        b.partial_cmp(&a).unwrap_or(std::cmp::Ordering::Equal)
    });
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(l, r, _)| (l.to_owned(), r.to_owned()))
        .collect();
    let vocab: Vocab = vocab
        .into_iter()
        .map(|(t, id)| (t.to_owned(), id))
        .collect();
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk.to_owned());
    }
    let bpe = bpe
        .build()
        .map_err(|e| anyhow!("cannot build the SentencePiece BPE model from GGUF: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| anyhow!("cannot build a replacement: {e}"))
    };
    let mut normalizers = vec![replace(" ", "▁")?.into()];
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        normalizers.insert(0, Prepend::new("▁".into()).into());
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| anyhow!("cannot set the SentencePiece normalizer: {e}"))?;
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// Adds BOS before and/or EOS after each sequence, as Llama 3's tokenizer.json does.
fn template_processor(
    tokenizer: &tokenizers::Tokenizer,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<TemplateProcessing> {
    let template = |sequence: &str, type_id: u32| -> Vec<String> {
        bos.map(|t| format!("{t}:{type_id}"))
            .into_iter()
            .chain(std::iter::once(format!("${sequence}:{type_id}")))
            .chain(eos.map(|t| format!("{t}:{type_id}")))
            .collect()
    };
    let mut pair = template("A", 0);
    pair.extend(template("B", 1));
    let special_tokens = bos
        .into_iter()
        .chain(eos)
        .map(|t| {
            let id = tokenizer
                .token_to_id(t)
                .with_context(|| format!("special token {t:?} is not in the vocabulary"))?;
            Ok((t.to_owned(), id))
        })
        .collect::<Result<Vec<_>>>()?;
    TemplateProcessing::builder()
        .try_single(template("A", 0))
        .map_err(|e| anyhow!("invalid BOS/EOS template: {e}"))?
        .try_pair(pair)
        .map_err(|e| anyhow!("invalid BOS/EOS template: {e}"))?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| anyhow!("invalid BOS/EOS template: {e}"))
}

/// Typed reads of optional GGUF metadata keys; a key with the wrong type is an error.
struct Metadata<'a>(&'a HashMap<String, GgufValue>);

impl<'a> Metadata<'a> {
    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        self.0
            .get(key)
            .map(|v| {
                v.to_string()
                    .map(String::as_str)
                    .map_err(|_| type_error(key, "a string"))
            })
            .transpose()
    }

    fn u32(&self, key: &str) -> Result<Option<u32>> {
        self.0
            .get(key)
            .map(|v| {
                v.to_u64()
                    .ok()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| type_error(key, "a u32"))
            })
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.0
            .get(key)
            .map(|v| v.to_bool().map_err(|_| type_error(key, "a bool")))
            .transpose()
    }

    fn array(&self, key: &str) -> Result<Option<&'a [GgufValue]>> {
        self.0
            .get(key)
            .map(|v| {
                v.to_vec()
                    .map(Vec::as_slice)
                    .map_err(|_| type_error(key, "an array"))
            })
            .transpose()
    }

    /// The items of an array, each converted by `item`; `what` names the array's type in the
    /// error when one does not convert.
    fn array_of<T>(
        &self,
        key: &str,
        what: &str,
        item: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        self.array(key)?
            .map(|values| {
                values
                    .iter()
                    .map(|v| item(v).ok_or_else(|| type_error(key, what)))
                    .collect()
            })
            .transpose()
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        self.array_of(key, "a string array", |v| {
            v.to_string().ok().map(String::as_str)
        })
    }
}

// candle's own errors print the whole value, which for vocabularies is megabytes.
fn type_error(key: &str, expected: &str) -> anyhow::Error {
    anyhow!("GGUF metadata key {key} is not {expected}")
}

/// The object in a JSON file, or an empty one when the file does not exist.
fn read_json_object(path: &Path) -> Result<serde_json::Map<String, JsonValue>> {
    if !path.is_file() {
        return Ok(serde_json::Map::new());
    }
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    match serde_json::from_str(&text)
        .with_context(|| format!("invalid JSON in {}", path.display()))?
    {
        JsonValue::Object(map) => Ok(map),
        _ => bail!("{} is not a JSON object", path.display()),
    }
}

/// A special token's text: transformers writes either the string or a serialized AddedToken.
fn token_content(value: &JsonValue) -> Option<String> {
    match value {
        JsonValue::String(s) => Some(s.clone()),
        JsonValue::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` from tokenizer_config.json: a string, or a list of `{name, template}` from
/// which the "default" one is used (the first when none is named so).
fn template_from_config(value: &JsonValue) -> Result<Option<String>> {
    match value {
        JsonValue::Null => Ok(None),
        JsonValue::String(s) => Ok(Some(s.clone())),
        JsonValue::Array(list) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(JsonValue::as_str) == Some(name))
            };
            let Some(entry) = named("default").or_else(|| list.first()) else {
                return Ok(None);
            };
            let template = entry.get("template").and_then(JsonValue::as_str);
            Ok(Some(
                template
                    .context("chat_template entry has no template string")?
                    .to_owned(),
            ))
        }
        _ => bail!("chat_template in {CONFIG_FILE} is neither a string nor a list"),
    }
}

fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}
