//! Tokenizes a data file as `peft train` does, for scripts/hf/check_sft_data.py to compare
//! with TRL's SFTTrainer: prints one JSON line `{"input_ids", "labels"}` per record.
//!
//!     cargo run --release -p peft-train --example tokenize_data -- MODEL_DIR DATA \
//!         [assistant_only_loss] [completion_only_loss] [CHAT_TEMPLATE]   (flags true|false,
//!         default true; the template replaces the model's, as `--chat-template` does)

use anyhow::{Context, Result};
use peft_models::tokenizer::Tokenizer;
use peft_train::{load_data, tokenize_records_with, LossOn};
use std::path::Path;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, data) = match &args[..] {
        [model, data, ..] => (Path::new(model), Path::new(data)),
        _ => anyhow::bail!(
            "usage: tokenize_data MODEL_DIR DATA [assistant_only] [completion_only] [TEMPLATE]"
        ),
    };
    let flag = |i: usize| args.get(i).is_none_or(|v| v == "true");
    let mut tok = Tokenizer::from_hf_dir(model).context("tokenizer")?;
    if let Some(path) = args.get(4) {
        tok.set_chat_template(std::fs::read_to_string(path)?);
    }
    let records = load_data(data)?;
    let loss = LossOn {
        assistant_only: flag(2),
        completion_only: flag(3),
    };
    let tokenized = tokenize_records_with(&records, &tok, usize::MAX, loss, Default::default())?;
    for e in tokenized.examples {
        println!(
            "{}",
            serde_json::json!({"input_ids": e.input_ids, "labels": e.labels})
        );
    }
    Ok(())
}
