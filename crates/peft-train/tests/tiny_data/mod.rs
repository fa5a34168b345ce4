//! Token examples for the tests that train the tiny random Llama (`peft_models::testing`,
//! a vocabulary of 64), and what such a run logs.

use peft_train::Example;

/// `n` examples, every token labelled: example `i` has `min_len + i % spread` tokens, its
/// token `j` being `(i·mul + 3j + salt) % 64`.
pub fn examples(n: u32, min_len: u32, spread: u32, mul: u32, salt: u32) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let ids: Vec<u32> = (0..min_len + i % spread)
                .map(|j| (i * mul + j * 3 + salt) % 64)
                .collect();
            Example {
                labels: ids.iter().map(|&t| t as i64).collect(),
                input_ids: ids,
                packed: Vec::new(),
            }
        })
        .collect()
}

/// The lines of `dir/metrics.jsonl`, parsed.
#[allow(dead_code)] // not every test file reads them
pub fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The steps of `dir/metrics.jsonl`'s lines.
#[allow(dead_code)]
pub fn logged_steps(dir: &std::path::Path) -> Vec<u64> {
    metrics(dir)
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect()
}
