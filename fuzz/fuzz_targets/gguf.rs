//! GGUF bytes through `load_model`'s GGUF reader: header, metadata config, tensors (dequantized,
//! q/k rows unpermuted) and the tokenizer built from the metadata, which then encodes a line.

#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let source = Path::new("fuzz.gguf");
    let Ok(model) =
        peft_models::loader::load_gguf_from(Cursor::new(data), source, &Device::Cpu, DType::F32)
    else {
        return;
    };
    if let Some(tokenizer) = &model.tokenizer {
        if let Ok(ids) = tokenizer.encode("Hello wörld 123!<|im_end|>\n", true) {
            let _ = tokenizer.decode(&ids, false);
        }
        let _ = tokenizer.stop_token_ids();
        let _ = tokenizer.pad_token_id();
    }
});
