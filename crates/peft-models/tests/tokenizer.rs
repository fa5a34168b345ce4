//! Tokenizer tests. Those marked "SmolLM2" need models/SmolLM2-135M-Instruct.Q4_1.gguf and skip
//! without it; expected values come from Hugging Face's tokenizer for that model.

use std::collections::HashMap;
use std::fs::{self, File};

use candle_core::quantized::gguf_file::{Content, Value};
use peft_models::tokenizer::{ChatMessage, Tokenizer};

const SMOLLM_SYSTEM: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

fn smollm() -> Option<Tokenizer> {
    let path = peft_models::testing::default_model()?;
    let content = Content::read(&mut File::open(&path).unwrap()).unwrap();
    Some(Tokenizer::from_gguf_metadata(&content.metadata).unwrap())
}

fn conversation(system: Option<&str>) -> Vec<ChatMessage> {
    system
        .map(|s| ChatMessage::new("system", s))
        .into_iter()
        .chain([
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
        ])
        .collect()
}

const ROUND_TRIP_TEXTS: [&str; 6] = [
    "héllo wörld ✓",
    "line one\nline two\n\nand  double  spaces ",
    "\ttabs\tand\r\nCRLF",
    "Numbers 12345 and 3.14159",
    "emoji 😀👍🏽 and 日本語",
    "",
];

#[test]
fn smollm_encodes_like_hf() {
    let Some(tok) = smollm() else { return };
    let cases: [(&str, &[u32]); 5] = [
        (
            "The capital of France is Paris. The capital of Germany is",
            &[
                504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314,
            ],
        ),
        (
            "Rust is a systems programming language that",
            &[66, 467, 314, 253, 1734, 6256, 1789, 338],
        ),
        ("Hello, my name is", &[19556, 28, 957, 1462, 314]),
        ("Hello world! 123", &[19556, 905, 17, 216, 33, 34, 35]),
        ("  multiple   spaces", &[216, 2701, 256, 5600]),
    ];
    for (text, expected) in cases {
        assert_eq!(tok.encode(text, false).unwrap(), expected, "{text:?}");
        // SmolLM2 adds no BOS.
        assert_eq!(
            tok.encode(text, true).unwrap(),
            expected,
            "{text:?} with special tokens"
        );
    }
}

#[test]
fn smollm_special_tokens() {
    let Some(tok) = smollm() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.pad_token_id(), Some(2));
    assert_eq!(tok.stop_token_ids(), vec![2, 0]);

    let text = "<|im_start|>user\nHi<|im_end|>\n";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ids, [1, 4093, 198, 26843, 2, 198]);
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi\n");
}

#[test]
fn smollm_decode_round_trips() {
    let Some(tok) = smollm() else { return };
    assert_eq!(
        tok.encode("héllo wörld ✓", false).unwrap(),
        [88, 2756, 31394, 267, 29989, 400, 4636, 246, 237]
    );
    for text in ROUND_TRIP_TEXTS {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }
}

#[test]
fn smollm_chat_template() {
    let Some(tok) = smollm() else { return };
    assert!(tok.has_chat_template());

    let rendered = tok.apply_chat_template(&conversation(None), false).unwrap();
    let turns = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n";
    assert_eq!(rendered, format!("{SMOLLM_SYSTEM}{turns}"));

    let rendered = tok
        .apply_chat_template(&conversation(Some("Be brief.")), false)
        .unwrap();
    assert_eq!(
        rendered,
        format!("<|im_start|>system\nBe brief.<|im_end|>\n{turns}")
    );

    let prompt = tok
        .apply_chat_template(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(
        prompt,
        format!("{SMOLLM_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    );
}

#[test]
fn smollm_save_hf_round_trips() {
    let Some(tok) = smollm() else { return };
    let dir = tempfile::tempdir().unwrap();
    tok.save_hf(dir.path()).unwrap();
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "only the final files remain: {names:?}");

    let loaded = Tokenizer::from_hf_dir(dir.path()).unwrap();
    for text in ROUND_TRIP_TEXTS
        .into_iter()
        .chain(["<|im_start|>user\nHi<|im_end|>", "Hello, my name is"])
    {
        assert_eq!(
            loaded.encode(text, true).unwrap(),
            tok.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    assert_eq!(loaded.bos_token_id(), tok.bos_token_id());
    assert_eq!(loaded.eos_token_id(), tok.eos_token_id());
    assert_eq!(loaded.pad_token_id(), tok.pad_token_id());
    assert_eq!(loaded.stop_token_ids(), tok.stop_token_ids());
    let messages = conversation(None);
    assert_eq!(
        loaded.apply_chat_template(&messages, true).unwrap(),
        tok.apply_chat_template(&messages, true).unwrap()
    );
}

#[test]
fn hf_dir_chat_template_sources() {
    let Some(tok) = smollm() else { return };
    let dir = tempfile::tempdir().unwrap();
    tok.save_hf(dir.path()).unwrap();
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&config_path).unwrap()).unwrap();
    let messages = [ChatMessage::new("user", "  Hi  ")];

    // chat_template.jinja wins over the config; Python string methods, raise_exception and
    // Jinja2's trim_blocks/lstrip_blocks behave as in transformers (output checked with jinja2).
    fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}\n\
         {% if m['role'] != 'user' %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}\n\
         {{ bos_token }}[{{ m['content'].strip() }}]{{ eos_token }}\n\
         {% endfor %}",
    )
    .unwrap();
    let loaded = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(
        loaded.apply_chat_template(&messages, false).unwrap(),
        "<|im_start|>[Hi]<|im_end|>\n"
    );
    let err = loaded
        .apply_chat_template(&[ChatMessage::new("tool", "x")], false)
        .unwrap_err();
    assert!(err.to_string().contains("unknown role tool"), "{err}");

    // A list of named templates in the config: "default" is used.
    fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    config["chat_template"] = serde_json::json!([
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "default {{ messages | length }}"},
    ]);
    fs::write(&config_path, config.to_string()).unwrap();
    let loaded = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(
        loaded.apply_chat_template(&messages, false).unwrap(),
        "default 1"
    );

    // No template at all: an error, not a panic; saving does not resurrect one.
    config.as_object_mut().unwrap().remove("chat_template");
    fs::write(&config_path, config.to_string()).unwrap();
    let loaded = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(!loaded.has_chat_template());
    let err = loaded.apply_chat_template(&messages, false).unwrap_err();
    assert!(err.to_string().contains("no chat template"), "{err}");
    fs::write(dir.path().join("chat_template.jinja"), "stale").unwrap();
    loaded.save_hf(dir.path()).unwrap();
    assert!(!Tokenizer::from_hf_dir(dir.path())
        .unwrap()
        .has_chat_template());
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(&dir.path().join("tokenizer.json").display().to_string()),
        "{err}"
    );
}

/// A toy byte-level vocabulary: digits, "a", "Ġ" (space) and merged digit groups.
fn toy_metadata(pre: &str) -> HashMap<String, Value> {
    let strings =
        |items: &[&str]| Value::Array(items.iter().map(|s| Value::String((*s).into())).collect());
    let tokens = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
        "12",
        "123",
        "45",
        "456",
        "a",
        "Ġ",
    ];
    let types = tokens
        .iter()
        .map(|t| Value::I32(if t.starts_with("<|") { 3 } else { 1 }))
        .collect();
    HashMap::from([
        (
            "tokenizer.ggml.model".to_owned(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_owned(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_owned(), strings(&tokens)),
        (
            "tokenizer.ggml.merges".to_owned(),
            strings(&["1 2", "12 3", "4 5", "45 6"]),
        ),
        ("tokenizer.ggml.token_type".to_owned(), Value::Array(types)),
        ("tokenizer.ggml.bos_token_id".to_owned(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(1)),
    ])
}

#[test]
fn gguf_pre_tokenizers_split_digits_like_hf() {
    // Llama 3 groups digits by three, Qwen2 and SmolLM split every digit, GPT-2 keeps runs.
    let cases: [(&str, &[u32]); 4] = [
        ("llama-bpe", &[9, 11]),
        ("qwen2", &[2, 3, 4, 5, 6, 7]),
        ("smollm", &[2, 3, 4, 5, 6, 7]),
        ("default", &[9, 11]),
    ];
    for (pre, expected) in cases {
        let tok = Tokenizer::from_gguf_metadata(&toy_metadata(pre)).unwrap();
        assert_eq!(tok.encode("123456", false).unwrap(), expected, "{pre}");
        assert_eq!(
            tok.encode("<|end_of_text|>a", false).unwrap(),
            [1, 12],
            "{pre}"
        );
        assert_eq!(
            tok.decode(&tok.encode("a 123", false).unwrap(), false)
                .unwrap(),
            "a 123",
            "{pre}"
        );
        assert!(!tok.has_chat_template());
        assert_eq!(tok.pad_token_id(), Some(1), "pad falls back to eos");
    }
}

#[test]
fn gguf_add_bos_token() {
    let mut md = toy_metadata("llama-bpe");
    // llama.cpp's default for Llama 3 is to add BOS.
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    assert_eq!(tok.encode("12", true).unwrap(), [0, 8]);
    assert_eq!(tok.encode("12", false).unwrap(), [8]);

    let dir = tempfile::tempdir().unwrap();
    tok.save_hf(dir.path()).unwrap();
    assert_eq!(
        Tokenizer::from_hf_dir(dir.path())
            .unwrap()
            .encode("12", true)
            .unwrap(),
        [0, 8]
    );

    md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(false));
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    assert_eq!(tok.encode("12", true).unwrap(), [8]);
}

#[test]
fn gguf_unsupported_tokenizers_are_errors() {
    let mut md = toy_metadata("default");
    md.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
    assert!(
        err.contains("unsupported GGUF tokenizer model \"bert\""),
        "{err}"
    );

    let err = Tokenizer::from_gguf_metadata(&toy_metadata("mystery"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"mystery\""), "{err}");

    let mut md = toy_metadata("default");
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(99));
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
    assert!(err.contains("bos_token_id"), "{err}");
}

#[test]
fn chat_message_json() {
    let m: ChatMessage = serde_json::from_str(r#"{"role": "user", "content": "Hi"}"#).unwrap();
    assert_eq!(m, ChatMessage::new("user", "Hi"));
    assert_eq!(
        serde_json::to_string(&m).unwrap(),
        r#"{"role":"user","content":"Hi"}"#
    );
    assert_eq!(m.content().as_deref(), Some("Hi"));

    // Text parts reach the template as they are; their text joined is the content.
    let parts: ChatMessage = serde_json::from_str(
        r#"{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}"#,
    )
    .unwrap();
    assert_eq!(parts.content().as_deref(), Some("Hi there"));
    let rendered = peft_models::chat_template::render(
        "{% for m in messages %}{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endfor %}",
        &[parts],
        Default::default(),
        false,
        &[],
    )
    .unwrap();
    assert_eq!(rendered, "[Hi ][there]");

    for (json, error) in [
        (
            r#"{"role": "user", "content": [{"type": "image", "url": "x.png"}]}"#,
            r#"content parts of type "image" need a multimodal model; only "text" parts are supported"#,
        ),
        (
            r#"{"role": "user", "content": [{"type": "text"}]}"#,
            r#"a text content part needs a "text" string"#,
        ),
        (
            r#"{"role": "user", "content": 5}"#,
            r#"a message's "content" must be text or a list of text parts"#,
        ),
    ] {
        let err = serde_json::from_str::<ChatMessage>(json).unwrap_err();
        assert!(err.to_string().starts_with(error), "{err}");
    }
}

/// llama.cpp's Llama 2 (SentencePiece BPE) vocabulary and test texts with the ids the Hugging
/// Face tokenizer gives them (see fixtures/llama_cpp_vocab/README.md).
fn llama_spm_cases() -> (Tokenizer, Vec<(String, Vec<u32>)>) {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_cpp_vocab");
    let path = dir.join("ggml-vocab-llama-spm.gguf");
    let mut file = std::fs::File::open(&path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let tokenizer = Tokenizer::from_gguf_metadata(&content.metadata).unwrap();
    let inputs = std::fs::read_to_string(dir.join("ggml-vocab-llama-spm.gguf.inp")).unwrap();
    let outputs = std::fs::read_to_string(dir.join("ggml-vocab-llama-spm.gguf.out")).unwrap();
    let cases: Vec<(String, Vec<u32>)> = inputs
        .split("\n__ggml_vocab_test__\n")
        .zip(outputs.lines())
        .map(|(text, ids)| {
            let ids = ids.split_whitespace().map(|t| t.parse().unwrap()).collect();
            (text.to_string(), ids)
        })
        .collect();
    assert_eq!(cases.len(), 46);
    (tokenizer, cases)
}

fn mismatches(tokenizer: &Tokenizer, cases: &[(String, Vec<u32>)]) -> Vec<String> {
    cases
        .iter()
        .filter(|(text, want)| &tokenizer.encode(text, false).unwrap() != want)
        .map(|(text, _)| text.clone())
        .collect()
}

#[test]
fn gguf_sentencepiece_tokenizes_like_hf() {
    let (tokenizer, cases) = llama_spm_cases();
    assert_eq!(mismatches(&tokenizer, &cases), Vec::<String>::new());
    // BOS by default, no EOS; the decoder undoes the prepended space.
    let ids = tokenizer.encode("Hello world", true).unwrap();
    assert_eq!(ids, [1, 15043, 3186]);
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "Hello world");
    assert_eq!(
        tokenizer
            .decode(&tokenizer.encode(" \tnaïve 🦙\n", false).unwrap(), false)
            .unwrap(),
        " \tnaïve 🦙\n"
    );
}

#[test]
fn gguf_tokenizers_write_back_alike() {
    let (tokenizer, cases) = llama_spm_cases();
    // As read (the file's piece scores), and after a trip through tokenizer.json, which keeps
    // only the merges: the scores written then come from the merge ranks.
    let dir = tempfile::tempdir().unwrap();
    tokenizer.save_hf(dir.path()).unwrap();
    let via_json = Tokenizer::from_hf_dir(dir.path()).unwrap();
    for source in [&tokenizer, &via_json] {
        let md = source.gguf_metadata(32000).unwrap();
        let get = |key: &str| md.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        assert_eq!(
            get("tokenizer.ggml.model").unwrap().to_string().unwrap(),
            "llama"
        );
        assert!(get("tokenizer.ggml.add_space_prefix")
            .unwrap()
            .to_bool()
            .unwrap());
        assert!(get("tokenizer.ggml.merges").is_none());
        let types = get("tokenizer.ggml.token_type").unwrap();
        let types: Vec<i32> = types
            .to_vec()
            .unwrap()
            .iter()
            .map(|t| t.to_i32().unwrap())
            .collect();
        // <unk>, <s>, </s>, then the 256 byte tokens.
        assert_eq!(&types[..4], [2, 3, 3, 6]);
        assert_eq!(types[258], 6);
        assert_eq!(types[259], 1);
        let back = Tokenizer::from_gguf_metadata(&md.into_iter().collect()).unwrap();
        assert_eq!(mismatches(&back, &cases), Vec::<String>::new());
    }
}
