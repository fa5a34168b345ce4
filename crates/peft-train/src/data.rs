//! Training records (JSONL, CSV or TSV) to token ids and labels, and padded batches.
//!
//! Record shapes, as TRL's SFTTrainer takes them: `{"text"}` (loss on every token),
//! `{"prompt", "completion"}` (loss on the completion) and `{"messages": [{role, content}]}`
//! (rendered with the model's chat template, loss on assistant turns only); plus Alpaca's
//! `{"instruction", "input", "output"}`, trained as a user turn and an assistant reply.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use peft_models::tokenizer::{ChatMessage, Tokenizer};
use peft_ops::IGNORE_INDEX;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; `IGNORE_INDEX` where no loss is taken.
    pub labels: Vec<i64>,
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

/// Reads the records of a data file: JSONL (one JSON object per non-empty line), or CSV / TSV
/// (by extension; a header row names the fields, every value is a string).
pub fn load_records(path: &Path) -> Result<Vec<Value>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if ext == "csv" || ext == "tsv" {
        return load_delimited(path, if ext == "csv" { b',' } else { b'\t' });
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read data file {}", path.display()))?;
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
    if out.is_empty() {
        bail!("data file {} has no records", path.display());
    }
    Ok(out)
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
    if out.is_empty() {
        bail!("data file {} has no records", path.display());
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

/// Token ids and labels of one record, truncated to `max_len`.
fn tokenize_record(v: &Value, tok: &Tokenizer, n: usize) -> Result<Example> {
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
    if let Some(msgs) = v.get("messages") {
        let messages: Vec<ChatMessage> = serde_json::from_value(msgs.clone())
            .with_context(|| format!("record {n}: messages must be a list of {{role, content}}"))?;
        for (segment, is_assistant) in
            chat_segments(tok, &messages).with_context(|| format!("record {n}"))?
        {
            push(tok.encode(&segment, false)?, is_assistant);
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
            ChatMessage {
                role: "user".into(),
                content: user,
            },
            ChatMessage {
                role: "assistant".into(),
                content: str_field(v, "output", n)?.into(),
            },
        ];
        for (segment, is_assistant) in
            chat_segments(tok, &messages).with_context(|| format!("record {n}"))?
        {
            push(tok.encode(&segment, false)?, is_assistant);
        }
    } else if v.get("prompt").is_some() || v.get("completion").is_some() {
        let prompt = str_field(v, "prompt", n)?;
        let completion = str_field(v, "completion", n)?;
        push(tok.encode(prompt, true)?, false);
        push(tok.encode(completion, false)?, true);
        push(eos.into_iter().collect(), true);
    } else if v.get("text").is_some() {
        push(tok.encode(str_field(v, "text", n)?, true)?, true);
        push(eos.into_iter().collect(), true);
    } else {
        let keys: Vec<&String> = v
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        bail!("record {n}: no \"text\", \"messages\", \"prompt\"/\"completion\" or \"instruction\"/\"output\" field (found {keys:?}; --columns maps other names)");
    }
    Ok(Example {
        input_ids: ids,
        labels,
    })
}

/// Splits a rendered conversation into consecutive text pieces, flagging the assistant
/// replies (content and end-of-turn marker, not the role header) that carry the loss.
fn chat_segments(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    let mut done = String::new();
    for i in 0..messages.len() {
        let upto = tok.apply_chat_template(&messages[..=i], false)?;
        if messages[i].role == "assistant" {
            let header = tok.apply_chat_template(&messages[..i], true)?;
            let (Some(h), Some(body)) = (header.strip_prefix(&done), upto.strip_prefix(&header))
            else {
                bail!("the chat template does not render conversations incrementally");
            };
            out.push((h.to_string(), false));
            out.push((body.to_string(), true));
        } else {
            let Some(piece) = upto.strip_prefix(&done) else {
                bail!("the chat template does not render conversations incrementally");
            };
            out.push((piece.to_string(), false));
        }
        done = upto;
    }
    Ok(out)
}

/// Tokenizes all records; drops (and counts) records left without any trained token.
pub fn tokenize_records(
    records: &[Value],
    tok: &Tokenizer,
    max_seq_length: usize,
) -> Result<(Vec<Example>, usize)> {
    let mut examples = Vec::new();
    let mut dropped = 0;
    for (i, r) in records.iter().enumerate() {
        let mut ex = tokenize_record(r, tok, i + 1)?;
        ex.input_ids.truncate(max_seq_length);
        ex.labels.truncate(max_seq_length);
        if ex.n_trained() == 0 {
            dropped += 1;
            continue;
        }
        examples.push(ex);
    }
    if examples.is_empty() {
        bail!("no record has a token to train on after truncation to {max_seq_length} tokens");
    }
    Ok((examples, dropped))
}

/// A right-padded batch. `labels` are shifted: `labels[b, t]` is the target of position `t`.
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    /// Real (unpadded) tokens.
    pub n_tokens: usize,
    /// Tokens that carry a loss.
    pub n_trained: usize,
}

impl Batch {
    pub fn new(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Self> {
        let len = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .context("empty batch")?;
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
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, len), device)?,
            labels: Tensor::from_vec(labels, (b, len), device)?,
            n_tokens: examples.iter().map(|e| e.input_ids.len()).sum(),
            n_trained: examples.iter().map(|e| e.n_trained()).sum(),
        })
    }
}
