//! Training records (JSONL, Parquet, CSV or TSV) to token ids and labels; the held-out eval
//! split, sequence packing, length-grouped batch order, and padded batches.
//!
//! Record shapes, as TRL's SFTTrainer takes them: `{"text"}` (loss on every token),
//! `{"prompt", "completion"}` (loss on the completion; each a text, or a list of messages
//! rendered with the chat template) and `{"messages": [{role, content}]}` (rendered with the
//! model's chat template, loss on assistant turns only), ShareGPT's `{"conversations":
//! [{from, value}]}` read as messages; plus Alpaca's `{"instruction", "input", "output"}`,
//! trained as a user turn and an assistant reply.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use peft_models::chat_template::TemplateInputs;
use peft_models::tokenizer::{ChatMessage, Tokenizer};
use peft_ops::IGNORE_INDEX;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; `IGNORE_INDEX` where no loss is taken.
    pub labels: Vec<i64>,
    /// Lengths of the sequences packed into this example, in order (empty: one sequence).
    pub packed: Vec<usize>,
}

impl Example {
    /// Tokens with a loss (position 0 never has one: nothing predicts it).
    pub fn n_trained(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// The records of `path`: a data file (see [`load_records`]), or where none exists, the
/// training split of the Hub data set it names (`org/name`: see [`peft_models::hub`]), its
/// files read in order.
pub fn load_data(path: &Path) -> Result<Vec<Value>> {
    let mut records = Vec::new();
    for file in peft_models::hub::locate_data(path)? {
        records.extend(load_records(&file)?);
    }
    Ok(records)
}

/// Reads the records of a data file: JSONL (one JSON object per non-empty line; a `.json` file
/// may instead hold one array of objects, as Alpaca's does and `datasets` reads it), Parquet
/// (one record per row, as Hugging Face datasets store them), or CSV / TSV (a header row names
/// the fields, every value is a string); chosen by extension.
pub fn load_records(path: &Path) -> Result<Vec<Value>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let records = match ext.as_str() {
        "csv" => load_delimited(path, b',')?,
        "tsv" => load_delimited(path, b'\t')?,
        "parquet" => load_parquet(path)?,
        _ => load_json(path, &ext)?,
    };
    if records.is_empty() {
        bail!("data file {} has no records", path.display());
    }
    Ok(records)
}

/// The records of a JSON Lines file, or of a `.json` file holding one array.
fn load_json(path: &Path, ext: &str) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read data file {}", path.display()))?;
    // Editors on Windows start UTF-8 files with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    if ext == "json" && text.trim_start().starts_with('[') {
        return json_array(text, path);
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: invalid JSON: {e}", path.display(), i + 1))?;
        if !v.is_object() {
            bail!("{}:{}: expected a JSON object", path.display(), i + 1);
        }
        out.push(v);
    }
    Ok(out)
}

/// The records of a JSON file holding one array of objects.
fn json_array(text: &str, path: &Path) -> Result<Vec<Value>> {
    let v: Vec<Value> = serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("{}: invalid JSON array: {e}", path.display()))?;
    if let Some(i) = v.iter().position(|r| !r.is_object()) {
        bail!(
            "{}: element {} of the array is not a JSON object",
            path.display(),
            i + 1
        );
    }
    Ok(v)
}

fn load_delimited(path: &Path, delimiter: u8) -> Result<Vec<Value>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_path(path)
        .with_context(|| format!("cannot read data file {}", path.display()))?;
    let headers = reader
        .headers()
        .map_err(|e| anyhow::anyhow!("{}: bad header row: {e}", path.display()))?
        .clone();
    // A repeated name would silently keep only its last column.
    if let Some((i, name)) = headers
        .iter()
        .enumerate()
        .find(|(i, h)| headers.iter().take(*i).any(|earlier| earlier == *h))
    {
        bail!(
            "{}: the header names column {name:?} twice (column {})",
            path.display(),
            i + 1
        );
    }
    let mut out = Vec::new();
    for (i, row) in reader.records().enumerate() {
        // Line numbers count the header.
        let row = row.map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 2))?;
        let record: serde_json::Map<String, Value> = headers
            .iter()
            .zip(row.iter())
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        out.push(Value::Object(record));
    }
    Ok(out)
}

fn load_parquet(path: &Path) -> Result<Vec<Value>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read data file {}", path.display()))?;
    let bad = |e: parquet::errors::ParquetError| {
        anyhow::anyhow!("{} is not a valid Parquet file: {e}", path.display())
    };
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let rows = reader.get_row_iter(None).map_err(bad)?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| {
            anyhow::anyhow!("{}: row {}: cannot decode: {e}", path.display(), i + 1)
        })?;
        out.push(row.to_json_value());
    }
    Ok(out)
}

/// Renames fields before tokenizing: each `(field, column)` pair makes `column` of every
/// record available as `field` (e.g. `prompt=question`), as a column-mapping flag asks.
pub fn map_columns(records: &mut [Value], mapping: &[(String, String)]) -> Result<()> {
    for (i, record) in records.iter_mut().enumerate() {
        let Some(obj) = record.as_object_mut() else {
            continue;
        };
        for (field, column) in mapping {
            let value = obj.remove(column).with_context(|| {
                format!(
                    "record {}: no column {column:?} (mapped to {field:?})",
                    i + 1
                )
            })?;
            obj.insert(field.clone(), value);
        }
    }
    Ok(())
}

/// Parses `field=column,field=column`.
pub fn parse_column_mapping(spec: &str) -> Result<Vec<(String, String)>> {
    spec.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (field, column) = pair
                .split_once('=')
                .with_context(|| format!("column mapping {pair:?} is not field=column"))?;
            Ok((field.trim().to_string(), column.trim().to_string()))
        })
        .collect()
}

fn str_field<'a>(v: &'a Value, key: &str, line: usize) -> Result<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .with_context(|| format!("record {line}: field {key:?} must be a string"))
}

/// Roles a chat template renders (OpenAI's and transformers' names).
const CHAT_ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// Which tokens carry the loss: TRL's `SFTConfig` options of the same names (TRL trains on
/// every token of a conversation by default; we, as axolotl, on the assistant's turns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LossOn {
    /// Conversations (and Alpaca records): the assistant's replies only.
    pub assistant_only: bool,
    /// Prompt/completion records: the completion only.
    pub completion_only: bool,
}

impl Default for LossOn {
    fn default() -> Self {
        Self {
            assistant_only: true,
            completion_only: true,
        }
    }
}

/// Token ids and labels of one record.
fn tokenize_record(v: &Value, tok: &Tokenizer, n: usize, loss: LossOn) -> Result<Example> {
    let mut ids: Vec<u32> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    let mut push = |ids_part: Vec<u32>, train: bool| {
        labels.extend(
            ids_part
                .iter()
                .map(|&t| if train { t as i64 } else { IGNORE_INDEX }),
        );
        ids.extend(ids_part);
    };
    let eos = tok.eos_token_id();
    // Trained text ends with the end-of-sequence token, once (TRL adds it unless present).
    let push_ended = |push: &mut dyn FnMut(Vec<u32>, bool), mut ids: Vec<u32>| {
        if let Some(e) = eos {
            if ids.last() != Some(&e) {
                ids.push(e);
            }
        }
        push(ids, true);
    };
    // A conversation through the chat template, the loss where `loss` says.
    let tools = record_tools(v, n)?;
    let inputs = TemplateInputs {
        tools: tools.as_ref(),
        kwargs: match v.get("chat_template_kwargs") {
            None | Some(Value::Null) => None,
            Some(Value::Object(kwargs)) => Some(kwargs),
            Some(_) => bail!("record {n}: chat_template_kwargs must be an object"),
        },
    };
    let push_chat = |push: &mut dyn FnMut(Vec<u32>, bool), messages: &[ChatMessage]| {
        let pieces = chat_tokens(tok, messages, inputs, loss.assistant_only)
            .with_context(|| format!("record {n}"))?;
        for (ids, trained) in pieces {
            push(ids, trained);
        }
        Ok::<(), anyhow::Error>(())
    };
    let conversation = ["messages", "conversations"]
        .into_iter()
        .find(|key| v.get(key).is_some());
    let conversational_prompt = ["prompt", "completion"]
        .iter()
        .any(|key| v.get(key).is_some_and(Value::is_array));
    if let Some(key) = conversation {
        push_chat(&mut push, &messages(v, key, n)?)?;
    } else if conversational_prompt {
        // As TRL: the completion starts where the prompt with the generation prompt and the
        // whole conversation part (where the template renders the prompt alike: at its end).
        let prompt = messages(v, "prompt", n)?;
        let whole = [prompt.clone(), messages(v, "completion", n)?].concat();
        let prompt_text = tok
            .apply_chat_template_with(&prompt, inputs, true)
            .with_context(|| format!("record {n}"))?;
        let prompt_ids = tok.encode(&prompt_text, false)?;
        // Where the template cannot mark the assistant's replies (Qwen 3's, without
        // {% generation %} blocks), the completion alone decides, as in TRL by default.
        let pieces = match chat_tokens(tok, &whole, inputs, loss.assistant_only) {
            Err(_) if loss.completion_only => chat_tokens(tok, &whole, inputs, false),
            pieces => pieces,
        }
        .with_context(|| format!("record {n}"))?;
        let whole_ids: Vec<u32> = pieces.iter().flat_map(|(ids, _)| ids.clone()).collect();
        let start = common_prefix(&prompt_ids, &whole_ids);
        let mut at = 0;
        for (ids, trained) in pieces {
            // The piece's tokens before the completion train only without completion_only.
            let before = start.saturating_sub(at).min(ids.len());
            at += ids.len();
            let (head, tail) = ids.split_at(before);
            push(head.to_vec(), trained && !loss.completion_only);
            push(tail.to_vec(), trained);
        }
    } else if v.get("instruction").is_some() {
        // Alpaca: the instruction (and input, when non-empty) as a user turn, the output as
        // the assistant's reply, through the chat template.
        let instruction = str_field(v, "instruction", n)?;
        let input = v.get("input").and_then(Value::as_str).unwrap_or("");
        let user = if input.trim().is_empty() {
            instruction.to_string()
        } else {
            format!("{instruction}\n\n{input}")
        };
        let messages = [
            ChatMessage::new("user", user),
            ChatMessage::new("assistant", str_field(v, "output", n)?),
        ];
        push_chat(&mut push, &messages)?;
    } else if v.get("prompt").is_some() || v.get("completion").is_some() {
        // As TRL: prompt and completion tokenized as one text, the completion from where its
        // tokens part from the prompt's alone (a token may span the boundary).
        let prompt = str_field(v, "prompt", n)?;
        let completion = str_field(v, "completion", n)?;
        let prompt_ids = tok.encode(prompt, true)?;
        let mut whole = tok.encode(&format!("{prompt}{completion}"), true)?;
        let start = common_prefix(&prompt_ids, &whole);
        let completion_ids = whole.split_off(start);
        push(whole, !loss.completion_only);
        push_ended(&mut push, completion_ids);
    } else if v.get("text").is_some() {
        push_ended(&mut push, tok.encode(str_field(v, "text", n)?, true)?);
    } else {
        let keys: Vec<&String> = v
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        bail!("record {n}: no \"text\", \"messages\", \"conversations\", \"prompt\"/\"completion\" or \"instruction\"/\"output\" field (found {keys:?}; --columns maps other names)");
    }
    Ok(Example {
        input_ids: ids,
        labels,
        packed: Vec::new(),
    })
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The messages of a record's `key`: `{role, content}` objects, or ShareGPT's `{from, value}`
/// with its roles `human` and `gpt` read as `user` and `assistant` (as Unsloth's
/// `standardize_sharegpt` and axolotl read them; TRL renames the keys alone).
fn messages(v: &Value, key: &str, n: usize) -> Result<Vec<ChatMessage>> {
    let mut list = v.get(key).cloned().unwrap_or(Value::Null);
    for message in list.as_array_mut().into_iter().flatten() {
        let Some(m) = message.as_object_mut() else {
            continue;
        };
        if let Some(from) = m.remove("from") {
            let role = match from.as_str() {
                Some("human") => "user".into(),
                Some("gpt") => "assistant".into(),
                _ => from,
            };
            m.insert("role".into(), role);
        }
        if let Some(value) = m.remove("value") {
            m.insert("content".into(), value);
        }
    }
    let messages: Vec<ChatMessage> = serde_json::from_value(list)
        .with_context(|| format!("record {n}: {key} must be a list of {{role, content (text)}}"))?;
    if messages.is_empty() {
        bail!("record {n}: {key} is empty");
    }
    if let Some(m) = messages.iter().find(|m| !CHAT_ROLES.contains(&m.role())) {
        bail!(
            "record {n}: unknown chat role {:?} (expected one of {})",
            m.role(),
            CHAT_ROLES.join(", ")
        );
    }
    Ok(messages)
}

const NOT_INCREMENTAL: &str = "the chat template renders an earlier turn differently once later turns follow (as Qwen 3, Phi-3 and DeepSeek's do), so the assistant replies cannot be found: train on every token (--assistant-only-loss false), or give a template that marks them with {% generation %} blocks (--chat-template FILE, as TRL's training templates do)";

/// A record's `tools`: a list of JSON schemas, or that list as a JSON string (how datasets
/// with tools of different shapes store them).
fn record_tools(v: &Value, n: usize) -> Result<Option<Value>> {
    match v.get("tools") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => {
            let tools: Value = serde_json::from_str(text)
                .with_context(|| format!("record {n}: tools is not valid JSON"))?;
            if !tools.is_array() {
                bail!("record {n}: tools must be a list of JSON schemas");
            }
            Ok(Some(tools))
        }
        Some(tools @ Value::Array(_)) => Ok(Some(tools.clone())),
        Some(_) => bail!("record {n}: tools must be a list of JSON schemas"),
    }
}

/// A conversation's tokens in consecutive pieces, each flagged when it carries the loss:
/// every token unless `assistant_only`; else the text of the template's `{% generation %}`
/// blocks where it has them (TRL's `assistant_only_loss`), or the assistant replies found by
/// rendering the conversation one message at a time.
fn chat_tokens(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    inputs: TemplateInputs,
    assistant_only: bool,
) -> Result<Vec<(Vec<u32>, bool)>> {
    if !assistant_only {
        // TRL's default: the conversation rendered once, every token trained.
        let text = tok.apply_chat_template_with(messages, inputs, false)?;
        return Ok(vec![(tok.encode(&text, false)?, true)]);
    }
    if tok.chat_template_has_generation_blocks() {
        // As transformers' assistant mask: a token trains when it overlaps a block's text.
        let (text, spans) = tok.apply_chat_template_tracked(messages, inputs, false)?;
        let mut pieces: Vec<(Vec<u32>, bool)> = Vec::new();
        for (id, (start, end)) in tok.encode_with_offsets(&text)? {
            let trained = spans
                .iter()
                .any(|s| start < s.end && s.start < end.max(start + 1));
            match pieces.last_mut() {
                Some((ids, t)) if *t == trained => ids.push(id),
                _ => pieces.push((vec![id], trained)),
            }
        }
        return Ok(pieces);
    }
    chat_segments(tok, messages, inputs)?
        .into_iter()
        .map(|(text, trained)| Ok((tok.encode(&text, false)?, trained)))
        .collect()
}

/// Splits a rendered conversation into consecutive text pieces, flagging the assistant
/// replies (content and end-of-turn marker, not the role header) that carry the loss.
fn chat_segments(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    inputs: TemplateInputs,
) -> Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    let mut done = String::new();
    for i in 0..messages.len() {
        let upto = tok.apply_chat_template_with(&messages[..=i], inputs, false)?;
        if messages[i].role() == "assistant" {
            let header = tok.apply_chat_template_with(&messages[..i], inputs, true)?;
            let (Some(h), Some(body)) = (header.strip_prefix(&done), upto.strip_prefix(&header))
            else {
                bail!("{NOT_INCREMENTAL}");
            };
            out.push((h.to_string(), false));
            out.push((body.to_string(), true));
        } else {
            let Some(piece) = upto.strip_prefix(&done) else {
                bail!("{NOT_INCREMENTAL}");
            };
            out.push((piece.to_string(), false));
        }
        done = upto;
    }
    Ok(out)
}

/// Tokenizes all records, cutting them to `max_seq_length` tokens; drops (and counts) records
/// left without any trained token.
pub fn tokenize_records(
    records: &[Value],
    tok: &Tokenizer,
    max_seq_length: usize,
) -> Result<Tokenized> {
    tokenize_records_with(
        records,
        tok,
        max_seq_length,
        LossOn::default(),
        Truncation::default(),
    )
}

/// Which end of a record longer than the maximum length is kept (TRL's `truncation_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Truncation {
    #[default]
    KeepStart,
    KeepEnd,
}

impl Truncation {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "keep_start" => Ok(Self::KeepStart),
            "keep_end" => Ok(Self::KeepEnd),
            other => bail!("truncation_mode must be keep_start or keep_end, got {other:?}"),
        }
    }
}

/// [`tokenize_records`] with the loss on the tokens `loss` says, long records cut at the end
/// `truncation` says.
pub fn tokenize_records_with(
    records: &[Value],
    tok: &Tokenizer,
    max_seq_length: usize,
    loss: LossOn,
    truncation: Truncation,
) -> Result<Tokenized> {
    let mut out = Tokenized::default();
    for (i, r) in records.iter().enumerate() {
        let mut ex = tokenize_record(r, tok, i + 1, loss)?;
        if ex.input_ids.len() > max_seq_length {
            match truncation {
                Truncation::KeepStart => {
                    ex.input_ids.truncate(max_seq_length);
                    ex.labels.truncate(max_seq_length);
                }
                Truncation::KeepEnd => {
                    let cut = ex.input_ids.len() - max_seq_length;
                    ex.input_ids.drain(..cut);
                    ex.labels.drain(..cut);
                }
            }
            out.truncated += 1;
        }
        if ex.n_trained() == 0 {
            out.dropped += 1;
            continue;
        }
        out.examples.push(ex);
    }
    if out.examples.is_empty() {
        bail!("no record has a token to train on after truncation to {max_seq_length} tokens");
    }
    Ok(out)
}

/// What [`tokenize_records`] made of the records.
#[derive(Debug, Default)]
pub struct Tokenized {
    pub examples: Vec<Example>,
    /// Records left with no trained token (skipped).
    pub dropped: usize,
    /// Records longer than the maximum length, cut to it (the skipped ones included).
    pub truncated: usize,
}

/// Holds out `fraction` of the examples (at least one, when `fraction > 0`) for evaluation,
/// chosen by a seeded shuffle. Returns `(train, eval)`.
pub fn split_eval(
    mut examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(0.0..1.0).contains(&fraction) {
        bail!("the eval split must be at least 0 and below 1, got {fraction}");
    }
    if fraction == 0.0 {
        return Ok((examples, Vec::new()));
    }
    let n_eval = (examples.len() as f64 * fraction).ceil() as usize;
    if n_eval >= examples.len() {
        bail!(
            "{} examples are too few to hold out {fraction} of them for evaluation",
            examples.len()
        );
    }
    // A generator of its own, so that the split does not shift the training order.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED_E7A1);
    examples.shuffle(&mut rng);
    let eval = examples.split_off(examples.len() - n_eval);
    Ok((examples, eval))
}

/// Packs examples into rows of at most `max_len` tokens, best-fit decreasing (as TRL's `bfd`
/// packing): fewer, fuller rows, and no example is cut. Packed sequences keep their own
/// positions and do not attend to each other (see [`Batch::attention_mask`]).
pub fn pack(examples: &[Example], max_len: usize) -> Vec<Example> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    // Stable: equal lengths keep data order, so packing is deterministic.
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].input_ids.len()));
    let mut rows: Vec<Example> = Vec::new();
    for i in order {
        let e = &examples[i];
        let n = e.input_ids.len();
        let best = rows
            .iter_mut()
            .filter(|r| r.input_ids.len() + n <= max_len)
            .max_by_key(|r| r.input_ids.len());
        let row = match best {
            Some(row) => row,
            None => {
                rows.push(Example::default());
                rows.last_mut().expect("just pushed")
            }
        };
        row.input_ids.extend_from_slice(&e.input_ids);
        let mut labels = e.labels.clone();
        // Nothing predicts a sequence's first token, also when it follows another sequence.
        if !row.labels.is_empty() {
            labels[0] = IGNORE_INDEX;
        }
        row.labels.extend(labels);
        row.packed.push(n);
    }
    rows
}

/// The order of one epoch: a shuffle, or with `group_by_length` transformers'
/// `LengthGroupedSampler` order: shuffled mega-batches of 50 batches, each sorted by length
/// (longest first), so that a batch holds similar lengths and pads little; the longest batch
/// goes first, so that an out-of-memory error shows at once.
pub fn epoch_order(
    lengths: &[usize],
    batch_size: usize,
    group_by_length: bool,
    rng: &mut impl Rng,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(rng);
    if !group_by_length {
        return order;
    }
    let mega = (batch_size * 50).max(1);
    for chunk in order.chunks_mut(mega) {
        chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    }
    let longest = order
        .chunks(mega)
        .enumerate()
        .max_by_key(|(_, c)| lengths[c[0]])
        .map(|(m, _)| m * mega);
    if let Some(first) = longest {
        let batch_size = batch_size.max(1);
        for j in 0..batch_size.min(order.len() - first) {
            order.swap(j, first + j);
        }
    }
    order
}

/// A right-padded batch. `labels` are shifted: `labels[b, t]` is the target of position `t`.
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    /// Real (unpadded) tokens.
    pub n_tokens: usize,
    /// Tokens that carry a loss.
    pub n_trained: usize,
    /// Segment ids `[batch, seq]` (`1, 1, 2, 2, 2, 0`: two packed sequences, then padding)
    /// when a row holds packed sequences; `None` otherwise (plain causal attention).
    pub attention_mask: Option<Tensor>,
    /// The real tokens of each row, in front of its padding.
    pub lengths: Vec<usize>,
}

impl Batch {
    /// The examples right-padded to the longest.
    pub fn new(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Self> {
        Self::padded(examples, pad_id, 1, device)
    }

    /// The examples right-padded to the longest rounded up to a multiple of `multiple`
    /// (TRL's `pad_to_multiple_of`): fewer distinct lengths for kernels planned per shape.
    /// The padding carries no loss and, attention being causal, changes no real position.
    pub fn padded(
        examples: &[&Example],
        pad_id: u32,
        multiple: usize,
        device: &Device,
    ) -> Result<Self> {
        let len = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .context("empty batch")?
            .next_multiple_of(multiple.max(1));
        let mut ids = Vec::with_capacity(examples.len() * len);
        let mut labels = Vec::with_capacity(examples.len() * len);
        for e in examples {
            let n = e.input_ids.len();
            ids.extend(
                e.input_ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_id, len - n)),
            );
            labels.extend(
                e.labels[1..]
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(IGNORE_INDEX, len - n + 1)),
            );
        }
        let b = examples.len();
        let attention_mask = if examples.iter().any(|e| e.packed.len() > 1) {
            let mut segments = Vec::with_capacity(b * len);
            for e in examples {
                let lengths: &[usize] = if e.packed.is_empty() {
                    &[e.input_ids.len()]
                } else {
                    &e.packed
                };
                for (id, &n) in lengths.iter().enumerate() {
                    segments.extend(std::iter::repeat_n(id as u32 + 1, n));
                }
                segments.extend(std::iter::repeat_n(0u32, len - e.input_ids.len()));
            }
            Some(Tensor::from_vec(segments, (b, len), device)?)
        } else {
            None
        };
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, len), device)?,
            labels: Tensor::from_vec(labels, (b, len), device)?,
            n_tokens: examples.iter().map(|e| e.input_ids.len()).sum(),
            n_trained: examples.iter().map(|e| e.n_trained()).sum(),
            attention_mask,
            lengths: examples.iter().map(|e| e.input_ids.len()).collect(),
        })
    }

    /// Per row and position, whether it holds a real token (not padding).
    pub fn token_mask(&self) -> Result<Vec<Vec<bool>>> {
        let seq = self.input_ids.dim(1)?;
        Ok(self
            .lengths
            .iter()
            .map(|&n| (0..seq).map(|t| t < n).collect())
            .collect())
    }
}
