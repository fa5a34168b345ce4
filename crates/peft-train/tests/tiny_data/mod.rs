//! Token examples for the tests that train the tiny random Llama (`peft_models::testing`,
//! a vocabulary of 64).

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
