//! Tokenizes llama.cpp's tokenizer test texts with the tokenizer of a GGUF file's metadata and
//! compares with the expected token ids (what the Hugging Face tokenizer gives, as llama.cpp's
//! `convert_hf_to_gguf_update.py` wrote them), for the vocab files in llama.cpp's `models/`:
//!
//!     cargo run --release -p peft-models --example gguf_tokenize -- VOCAB.gguf
//!
//! reads VOCAB.gguf.inp (texts separated by `\n__ggml_vocab_test__\n`) and VOCAB.gguf.out (one
//! line of ids per text), prints each text that differs, and a summary line. Then the tokenizer
//! is written back as GGUF metadata (as `save_gguf` writes it), both as read and after a trip
//! through tokenizer.json (which loses a SentencePiece vocabulary's scores), and each written
//! tokenizer must give the same tokens again.

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use peft_models::tokenizer::Tokenizer;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: gguf_tokenize VOCAB.gguf")?;
    let mut file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
    let content = gguf_file::Content::read(&mut file)?;
    let tokenizer = Tokenizer::from_gguf_metadata(&content.metadata)?;
    let inputs = std::fs::read_to_string(format!("{path}.inp"))?;
    let outputs = std::fs::read_to_string(format!("{path}.out"))?;
    let texts: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
    let expected: Vec<&str> = outputs.lines().collect();
    let texts: Vec<(&str, Vec<u32>)> = texts
        .into_iter()
        .zip(&expected)
        .map(|(text, ids)| {
            let ids: Result<Vec<u32>, _> = ids.split_whitespace().map(str::parse).collect();
            Ok((text, ids?))
        })
        .collect::<Result<_>>()?;
    let differ = |tokenizer: &Tokenizer, show: bool| -> Result<usize> {
        let mut n = 0;
        for (text, want) in &texts {
            let got = tokenizer.encode(text, false)?;
            if &got != want {
                n += 1;
                if show {
                    println!("{text:?}\n  expected {want:?}\n  got      {got:?}");
                }
            }
        }
        Ok(n)
    };
    println!(
        "{path}: {} of {} texts tokenize as the HF tokenizer does",
        texts.len() - differ(&tokenizer, true)?,
        texts.len()
    );

    let dir = std::env::temp_dir().join(format!("gguf_tokenize-{}", std::process::id()));
    tokenizer.save_hf(&dir)?;
    let via_json = Tokenizer::from_hf_dir(&dir)?;
    std::fs::remove_dir_all(&dir)?;
    for (what, source) in [("as read", &tokenizer), ("via tokenizer.json", &via_json)] {
        let written = source.gguf_metadata(source.vocab_size())?;

        let pre = written
            .iter()
            .find(|(k, _)| k == "tokenizer.ggml.pre")
            .and_then(|(_, v)| v.to_string().ok().cloned())
            .unwrap_or_default();
        let back = Tokenizer::from_gguf_metadata(&written.into_iter().collect())?;
        println!(
            "  written back {what} (pre-tokenizer {pre:?}): {} texts differ",
            differ(&back, false)?
        );
    }
    Ok(())
}
