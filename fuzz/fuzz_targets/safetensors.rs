//! Safetensors bytes through the reader adapters (`peft_models::io::load_safetensors`) and base
//! model folders (`load_model`, then the model's dtype) use.

#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let source = Path::new("fuzz.safetensors");
    if let Ok(tensors) = peft_models::io::parse_safetensors(data, source, &Device::Cpu) {
        for t in tensors.values() {
            let _ = t.to_dtype(DType::F32);
        }
    }
});
