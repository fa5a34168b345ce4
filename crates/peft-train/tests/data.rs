//! Data: CSV/TSV and Parquet files, Alpaca records and column mapping (with SmolLM2's
//! tokenizer), the eval split, packing and length-grouped order.

use candle_core::{DType, Device};
use peft_models::load_model;
use peft_models::testing::default_model;
use peft_ops::IGNORE_INDEX;
use peft_train::{
    epoch_order, load_records, map_columns, pack, parse_column_mapping, split_eval,
    tokenize_records, tokenize_records_with, Batch, Example, LossOn, Truncation,
};
use std::io::Write;

/// SmolLM2's tokenizer (`None` where the default model is not fetched).
fn smollm_tokenizer() -> Option<peft_models::tokenizer::Tokenizer> {
    let m = load_model(&default_model()?, &Device::Cpu, DType::F32).unwrap();
    Some(m.tokenizer.unwrap())
}

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
    // A .json file of one array, as Alpaca ships, or of JSON lines.
    let array = write(
        dir.path(),
        "alpaca.json",
        "[\n {\"instruction\": \"Say hi\", \"input\": \"\", \"output\": \"Hi\"},\n {\"instruction\": \"Bye\", \"input\": \"\", \"output\": \"Bye\"}\n]\n",
    );
    let records = load_records(&array).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1]["output"], "Bye");
    let lines = write(
        dir.path(),
        "lines.json",
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\n",
    );
    assert_eq!(load_records(&lines).unwrap()[1]["text"], "b");
    let bad = write(dir.path(), "bad.json", "[{\"text\": \"a\"}, 3]");
    let err = load_records(&bad).unwrap_err().to_string();
    assert!(
        err.contains("element 2 of the array is not a JSON object"),
        "{err}"
    );
    let empty = write(dir.path(), "empty.csv", "a,b\n");
    assert!(load_records(&empty)
        .unwrap_err()
        .to_string()
        .contains("has no records"));
}

/// TRL's `assistant_only_loss` / `completion_only_loss` switched off: every token trains.
#[test]
fn loss_on_every_token_when_asked() {
    let Some(tok) = smollm_tokenizer() else {
        return;
    };
    let records = vec![
        serde_json::json!({"messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}]}),
        serde_json::json!({"prompt": "Name a colour.", "completion": " Blue."}),
    ];
    let trained = |ex: &Example| ex.labels.iter().filter(|&&l| l >= 0).count();
    let default = tokenize_records(&records, &tok, 256).unwrap().examples;
    let all = LossOn {
        assistant_only: false,
        completion_only: false,
    };
    let every = tokenize_records_with(&records, &tok, 256, all, Truncation::KeepStart)
        .unwrap()
        .examples;
    for (d, e) in default.iter().zip(&every) {
        assert_eq!(d.input_ids, e.input_ids);
        assert!(trained(d) < d.input_ids.len());
        assert_eq!(trained(e), e.input_ids.len());
    }
}

/// Text that already ends with the end-of-sequence token gets no second one (as TRL).
#[test]
fn one_eos_at_the_end() {
    let Some(tok) = smollm_tokenizer() else {
        return;
    };
    let eos = tok.eos_token_id().unwrap();
    let records = vec![
        serde_json::json!({"text": "Hello there."}),
        serde_json::json!({"text": "Hello there.<|im_end|>"}),
        serde_json::json!({"prompt": "Hi.", "completion": " Hello.<|im_end|>"}),
    ];
    for ex in tokenize_records(&records, &tok, 256).unwrap().examples {
        let n = ex.input_ids.len();
        assert_eq!(ex.input_ids[n - 1], eos);
        assert_ne!(ex.input_ids[n - 2], eos, "{:?}", ex.input_ids);
    }
}

/// Record shapes TRL reads besides `messages` (scripts/hf/check_sft_data.py compares each
/// with TRL 1.16's tokenization): a completion whose first token spans the boundary with the
/// prompt trains from that token; a prompt and completion given as messages train on the
/// completion's reply; ShareGPT's `conversations` of `{from, value}` with its `human` and
/// `gpt` roles read as the same `messages`.
#[test]
fn prompt_completion_and_sharegpt_shapes() {
    let Some(tok) = smollm_tokenizer() else {
        return;
    };
    let one = |record: serde_json::Value| {
        let mut t = tokenize_records(&[record], &tok, 256).unwrap();
        assert_eq!(t.examples.len(), 1);
        t.examples.remove(0)
    };
    // " world" is one token: the prompt's " wor" is not in the sequence.
    let boundary = one(serde_json::json!({"prompt": "Hello wor", "completion": "ld!"}));
    assert_eq!(
        boundary.input_ids,
        tok.encode("Hello world!<|im_end|>", true).unwrap()
    );
    assert_eq!(trained_text(&tok, &boundary), " world!<|im_end|>");

    let conversational = one(serde_json::json!({
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "completion": [{"role": "assistant", "content": "Blue."}],
    }));
    let messages = serde_json::json!({"messages": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}]});
    let as_messages = one(messages);
    assert_eq!(conversational, as_messages);
    assert_eq!(trained_text(&tok, &conversational), "Blue.<|im_end|>\n");

    let sharegpt = one(serde_json::json!({"conversations": [
        {"from": "human", "value": "Name a colour."},
        {"from": "gpt", "value": "Blue."}]}));
    assert_eq!(sharegpt, as_messages);

    let err = tokenize_records(
        &[serde_json::json!({"conversations": [{"from": "narrator", "value": "Once"}]})],
        &tok,
        256,
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("unknown chat role \"narrator\""),
        "{err:#}"
    );
}

#[test]
fn long_records_are_cut_and_counted() {
    let Some(tok) = smollm_tokenizer() else {
        return;
    };
    let records = vec![
        serde_json::json!({"text": "one two three four five six seven eight nine ten eleven"}),
        serde_json::json!({"text": "hi there"}),
    ];
    let t = tokenize_records(&records, &tok, 8).unwrap();
    assert_eq!((t.examples.len(), t.truncated, t.dropped), (2, 1, 0));
    assert_eq!(t.examples[0].input_ids.len(), 8);
    assert!(t.examples[1].input_ids.len() < 8);
    // TRL's truncation_mode keep_end: the last 8 tokens, the end-of-sequence token among them.
    let kept =
        tokenize_records_with(&records, &tok, 8, LossOn::default(), Truncation::KeepEnd).unwrap();
    let whole = tokenize_records(&records, &tok, 64).unwrap().examples[0].clone();
    let n = whole.input_ids.len();
    assert_eq!(kept.examples[0].input_ids, whole.input_ids[n - 8..]);
    assert_eq!(kept.examples[0].labels, whole.labels[n - 8..]);
    // A prompt kept whole while its completion is cut off leaves nothing to train: dropped.
    let prompt_only = serde_json::json!({"prompt": "one two three four five six seven eight nine", "completion": " ten"});
    let t = tokenize_records(&[prompt_only.clone(), records[1].clone()], &tok, 4).unwrap();
    assert_eq!((t.examples.len(), t.dropped), (1, 1));
    let t = tokenize_records_with(
        &[prompt_only],
        &tok,
        4,
        LossOn::default(),
        Truncation::KeepEnd,
    )
    .unwrap();
    assert_eq!((t.examples.len(), t.dropped), (1, 0));
}

#[test]
fn alpaca_records_train_on_the_output_only() {
    let Some(tok) = smollm_tokenizer() else {
        return;
    };
    let records = vec![
        serde_json::json!({"instruction": "Name a colour.", "input": "", "output": "Blue."}),
        serde_json::json!({"instruction": "Translate.", "input": "bonjour", "output": "hello"}),
    ];
    let t = tokenize_records(&records, &tok, 256).unwrap();
    assert_eq!((t.examples.len(), t.dropped, t.truncated), (2, 0, 0));
    let examples = t.examples;
    for (ex, output) in examples.iter().zip(["Blue.", "hello"]) {
        let text = trained_text(&tok, ex);
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

/// A conversation with tools, a tool call and a tool result renders through the template as
/// TRL passes it (`tools` column, every message field), and trains on the assistant turns:
/// the call and the answer.
#[test]
fn tool_calls_and_tools_reach_the_template() {
    let Some(tok) = smollm_tokenizer() else {
        return;
    };
    // SmolLM2's own template knows no tools: write the tokenizer with one that does.
    let dir = tempfile::tempdir().unwrap();
    tok.save_hf(dir.path()).unwrap();
    write(
        dir.path(),
        "chat_template.jinja",
        "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}\
         {%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}\
         {% for c in m.tool_calls %}<call>{{ c.function | tojson }}</call>{% endfor %}\
         {% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}\
         {%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    );
    let tok = peft_models::tokenizer::Tokenizer::from_hf_dir(dir.path()).unwrap();
    let record = serde_json::json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "name": "get_weather", "content": "21 C"},
            {"role": "assistant", "content": "It is 21 C."}
        ],
        // As a JSON string, the way datasets store tools of different shapes.
        "tools": "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {}}}]"
    });
    let t = tokenize_records(&[record], &tok, 512).unwrap();
    let ex = &t.examples[0];
    assert_eq!(
        tok.decode(&ex.input_ids, false).unwrap(),
        "<|im_start|>system\nTools: [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {}}}]<|im_end|>\n\
         <|im_start|>user\nWeather in Paris?<|im_end|>\n\
         <|im_start|>assistant\n<call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</call><|im_end|>\n\
         <|im_start|>tool\n21 C<|im_end|>\n\
         <|im_start|>assistant\nIt is 21 C.<|im_end|>\n"
    );
    assert_eq!(
        trained_text(&tok, ex),
        "<call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</call><|im_end|>\nIt is 21 C.<|im_end|>\n"
    );
    let bad =
        serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "tools": "[oops"});
    let err = tokenize_records(&[bad], &tok, 512).unwrap_err().to_string();
    assert_eq!(err, "record 1: tools is not valid JSON");
}

/// SmolLM2's tokenizer with another chat template.
fn with_template(
    tok: &peft_models::tokenizer::Tokenizer,
    template: &str,
) -> peft_models::tokenizer::Tokenizer {
    let mut tok = tok.clone();
    tok.set_chat_template(template.to_string());
    tok
}

fn trained_text(tok: &peft_models::tokenizer::Tokenizer, ex: &Example) -> String {
    let trained: Vec<u32> = ex
        .input_ids
        .iter()
        .zip(&ex.labels)
        .filter(|(_, &l)| l >= 0)
        .map(|(&t, _)| t)
        .collect();
    tok.decode(&trained, false).unwrap()
}

/// A template that drops earlier turns' reasoning once a later turn follows (as Qwen 3's):
/// the replies cannot be found by rendering message by message, so assistant-only training
/// needs `{% generation %}` blocks (TRL's training templates), which then choose the trained
/// text; training on every token needs neither.
#[test]
fn generation_blocks_choose_the_trained_text() {
    let Some(tok) = smollm_tokenizer() else {
        return;
    };
    let template = |generation: bool| {
        let (open, close) = if generation {
            ("{% generation %}", "{% endgeneration %}")
        } else {
            ("", "")
        };
        format!(
            "{{%- for m in messages %}}<|im_start|>{{{{ m.role }}}}\n\
             {{%- if m.role == 'assistant' %}}{open}\
             {{%- if m.reasoning_content and loop.last %}}<think>{{{{ m.reasoning_content }}}}</think>{{%- endif %}}\
             {{{{ m.content }}}}<|im_end|>{close}\n\
             {{%- else %}}{{{{ m.content }}}}<|im_end|>\n{{%- endif %}}{{%- endfor %}}\
             {{%- if add_generation_prompt %}}<|im_start|>assistant\n{{%- endif %}}"
        )
    };
    let record = serde_json::json!({"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "add", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "reasoning_content": "add again", "content": "6"}
    ]});
    let plain = with_template(&tok, &template(false));
    let err = format!(
        "{:#}",
        tokenize_records(std::slice::from_ref(&record), &plain, 512).unwrap_err()
    );
    assert!(err.contains("--assistant-only-loss false"), "{err}");
    let every = LossOn {
        assistant_only: false,
        completion_only: true,
    };
    let all = tokenize_records_with(
        std::slice::from_ref(&record),
        &plain,
        512,
        every,
        Truncation::KeepStart,
    )
    .unwrap();
    let ex = &all.examples[0];
    assert_eq!(
        ex.labels.iter().filter(|&&l| l >= 0).count(),
        ex.input_ids.len()
    );

    let marked = with_template(&tok, &template(true));
    let t = tokenize_records(&[record], &marked, 512).unwrap();
    let ex = &t.examples[0];
    // The same text as the plain template renders, trained on the blocks only.
    assert_eq!(ex.input_ids, all.examples[0].input_ids);
    assert_eq!(
        trained_text(&marked, ex),
        "4<|im_end|><think>add again</think>6<|im_end|>"
    );
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Parquet files written by pyarrow (as `datasets` writes them) read as the same records as
/// the JSONL they were made from: nested `messages` lists of structs, snappy and zstd.
#[test]
fn parquet_records_match_their_jsonl_source() {
    let shipped = load_records(&peft_models::testing::shipped_data()).unwrap();
    let messages = load_records(&fixture("pirate_messages.parquet")).unwrap();
    assert_eq!(messages, shipped[..8].to_vec());
    let pc = load_records(&fixture("pirate_prompt_completion.parquet")).unwrap();
    assert_eq!(pc.len(), 8);
    assert_eq!(pc[3]["id"], 3);
    assert_eq!(pc[3]["prompt"], shipped[3]["messages"][0]["content"]);
    assert_eq!(pc[3]["completion"], shipped[3]["messages"][1]["content"]);

    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("pirate_messages.parquet")).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_records(&cut).unwrap_err().to_string();
    assert!(err.contains("is not a valid Parquet file"), "{err}");
}

fn example(len: usize, first: u32) -> Example {
    let ids: Vec<u32> = (0..len as u32).map(|i| first + i).collect();
    Example {
        labels: ids.iter().map(|&t| t as i64).collect(),
        input_ids: ids,
        packed: Vec::new(),
    }
}

/// Best-fit decreasing: no row over the limit, every token kept once, nothing trained across
/// a boundary, and the batch carries segment ids.
#[test]
fn packing_fills_rows_without_crossing_sequences() {
    let lengths = [7, 3, 5, 2, 6, 1, 4, 8];
    let examples: Vec<Example> = lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| example(n, 100 * i as u32))
        .collect();
    let rows = pack(&examples, 10);
    // 36 tokens need at least 4 rows of 10; best fit finds 4.
    assert_eq!(rows.len(), 4);
    let mut seen: Vec<u32> = rows.iter().flat_map(|r| r.input_ids.clone()).collect();
    seen.sort();
    let mut all: Vec<u32> = examples.iter().flat_map(|e| e.input_ids.clone()).collect();
    all.sort();
    assert_eq!(seen, all);
    for r in &rows {
        assert!(r.input_ids.len() <= 10);
        assert_eq!(r.packed.iter().sum::<usize>(), r.input_ids.len());
        let mut start = 0;
        for &n in &r.packed {
            assert_eq!(r.labels[start] == IGNORE_INDEX, start > 0);
            start += n;
        }
    }
    let trained: usize = rows.iter().map(|r| r.n_trained()).sum();
    assert_eq!(
        trained,
        examples.iter().map(|e| e.n_trained()).sum::<usize>()
    );
    let refs: Vec<&Example> = rows.iter().collect();
    let batch = Batch::new(&refs, 0, &Device::Cpu).unwrap();
    let mask = batch.attention_mask.unwrap().to_vec2::<u32>().unwrap();
    for (r, m) in rows.iter().zip(&mask) {
        let mut expect = Vec::new();
        for (i, &n) in r.packed.iter().enumerate() {
            expect.extend(std::iter::repeat_n(i as u32 + 1, n));
        }
        expect.resize(10, 0);
        assert_eq!(m, &expect);
    }
}

/// group_by_length: every example once per epoch, batches of similar lengths (less padding
/// than a plain shuffle), the longest batch first; the order is a function of the seed.
#[test]
fn length_grouped_order() {
    use rand::SeedableRng;
    let lengths: Vec<usize> = (0..400).map(|i| (i * 37) % 301 + 1).collect();
    let padded = |order: &[usize]| -> usize {
        order
            .chunks(4)
            .map(|b| b.iter().map(|&i| lengths[i]).max().unwrap() * b.len())
            .sum()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let grouped = epoch_order(&lengths, 4, true, &mut rng);
    let mut sorted = grouped.clone();
    sorted.sort();
    assert_eq!(sorted, (0..400).collect::<Vec<_>>());
    assert_eq!(lengths[grouped[0]], 301, "the longest example leads");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let shuffled = epoch_order(&lengths, 4, false, &mut rng);
    assert!(
        padded(&grouped) * 10 < padded(&shuffled) * 8,
        "{} vs {}",
        padded(&grouped),
        padded(&shuffled)
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    assert_eq!(epoch_order(&lengths, 4, true, &mut rng), grouped);
}

#[test]
fn eval_split_is_seeded_and_disjoint() {
    let examples: Vec<Example> = (0..20).map(|i| example(3, 10 * i)).collect();
    let (train, eval) = split_eval(examples.clone(), 0.1, 7).unwrap();
    assert_eq!((train.len(), eval.len()), (18, 2));
    assert!(eval.iter().all(|e| !train.contains(e)));
    assert_eq!(split_eval(examples.clone(), 0.1, 7).unwrap().1, eval);
    assert_ne!(split_eval(examples.clone(), 0.1, 8).unwrap().1, eval);
    assert_eq!(split_eval(examples.clone(), 0.0, 7).unwrap().1.len(), 0);
    let err = split_eval(examples[..1].to_vec(), 0.5, 7)
        .unwrap_err()
        .to_string();
    assert!(err.contains("too few"), "{err}");
    assert!(split_eval(examples, 1.5, 7).is_err());
}
