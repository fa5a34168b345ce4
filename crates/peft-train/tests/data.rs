//! Data formats: CSV/TSV files, Alpaca records and column mapping, with SmolLM2's tokenizer.

use candle_core::{DType, Device};
use peft_models::load_model;
use peft_models::testing::default_model;
use peft_train::{load_records, map_columns, parse_column_mapping, tokenize_records};
use std::io::Write;

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    p
}

#[test]
fn csv_tsv_and_column_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write(
        dir.path(),
        "qa.csv",
        "question,answer\n\"Hi, who are you?\",\"A pirate,\nmatey.\"\nWhere?,Sea\n",
    );
    let mut records = load_records(&csv).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["question"], "Hi, who are you?");
    assert_eq!(records[0]["answer"], "A pirate,\nmatey.");
    map_columns(
        &mut records,
        &parse_column_mapping("prompt=question, completion=answer").unwrap(),
    )
    .unwrap();
    assert_eq!(records[1]["prompt"], "Where?");
    assert_eq!(records[1]["completion"], "Sea");
    assert!(records[1].get("question").is_none());

    let tsv = write(dir.path(), "t.tsv", "text\tid\nhello world\t1\n");
    assert_eq!(load_records(&tsv).unwrap()[0]["text"], "hello world");

    let mut records = load_records(&csv).unwrap();
    let err = map_columns(&mut records, &parse_column_mapping("prompt=query").unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("record 1: no column \"query\""), "{err}");
    assert!(parse_column_mapping("prompt").is_err());
    let empty = write(dir.path(), "empty.csv", "a,b\n");
    assert!(load_records(&empty)
        .unwrap_err()
        .to_string()
        .contains("has no records"));
}

#[test]
fn alpaca_records_train_on_the_output_only() {
    let Some(path) = default_model() else { return };
    let tok = load_model(&path, &Device::Cpu, DType::F32)
        .unwrap()
        .tokenizer
        .unwrap();
    let records = vec![
        serde_json::json!({"instruction": "Name a colour.", "input": "", "output": "Blue."}),
        serde_json::json!({"instruction": "Translate.", "input": "bonjour", "output": "hello"}),
    ];
    let (examples, dropped) = tokenize_records(&records, &tok, 256).unwrap();
    assert_eq!((examples.len(), dropped), (2, 0));
    for (ex, output) in examples.iter().zip(["Blue.", "hello"]) {
        let trained: Vec<u32> = ex
            .input_ids
            .iter()
            .zip(&ex.labels)
            .filter(|(_, &l)| l >= 0)
            .map(|(&t, _)| t)
            .collect();
        let text = tok.decode(&trained, false).unwrap();
        assert!(text.starts_with(output), "trained on {text:?}");
        // The user turn (instruction and input) carries no loss.
        assert!(
            !text.contains("Translate") && !text.contains("colour"),
            "{text:?}"
        );
    }
    let all = tok.decode(&examples[1].input_ids, false).unwrap();
    assert!(all.contains("Translate.\n\nbonjour"), "{all:?}");
}
