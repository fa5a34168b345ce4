//! TensorBoard event files against one PyTorch's `SummaryWriter` wrote
//! (`scripts/hf/make_tensorboard_fixture.py`).

use peft::{LoraConfig, PeftModel, TargetModules};
use peft_train::tensorboard::{tag, EventWriter};
use peft_train::{TrainArgs, Trainer};

mod tiny_data;

const WALL_TIME: f64 = 1764547200.25;

/// The records of an event file: each `(length, masked CRC, data, masked CRC)`.
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        out.push(&bytes[at..at + 16 + len]);
        at += 16 + len;
    }
    out
}

/// Scalar records are PyTorch's byte for byte (tags, float32 values, varint steps, a step of
/// 0 left out, the CRCs); the file opens with the same file-version event, naming its writer.
#[test]
fn scalars_are_written_as_pytorch_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path(), WALL_TIME).unwrap();
    let scalars = [
        ("train/loss", 2.5, 1),
        ("train/learning_rate", 0.0002, 1),
        ("eval/loss", 0.0, 0),
        ("train/grad_norm", -1.75, 300),
        ("eval/perplexity", 123456.789, 70000),
    ];
    for (tag, value, step) in scalars {
        w.scalar(tag, value, step, WALL_TIME + step as f64).unwrap();
    }
    w.flush().unwrap();
    let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("events.out.tfevents.1764547200."),
        "{name}"
    );
    let ours = std::fs::read(w.path()).unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/scalars.tfevents"
    );
    let theirs = std::fs::read(path).unwrap();
    let (ours, theirs) = (records(&ours), records(&theirs));
    assert_eq!(ours.len(), 6);
    assert_eq!(ours[1..], theirs[1..]);
    // After the length and its CRC: the wall time and "brain.Event:2" (then the writer's name).
    let version = 12 + 9 + 15;
    assert_eq!(ours[0][12..version], theirs[0][12..version]);
}

#[test]
fn metrics_keys_are_named_as_transformers_names_them() {
    assert_eq!(tag("loss"), "train/loss");
    assert_eq!(tag("lr"), "train/learning_rate");
    assert_eq!(tag("grad_norm"), "train/grad_norm");
    assert_eq!(tag("eval_loss"), "eval/loss");
    assert_eq!(tag("eval_perplexity"), "eval/perplexity");
}

/// `(tag, value, step)` of a scalar event (`Event {wall_time: 1, step: 2, summary: 5}`,
/// `Summary {value: 1}`, `Value {tag: 1, simple_value: 2}`).
fn decode_scalar(record: &[u8]) -> (String, f32, u64) {
    fn varint(b: &[u8], at: &mut usize) -> u64 {
        let mut v = 0;
        let mut shift = 0;
        loop {
            let byte = b[*at];
            *at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            shift += 7;
            if byte < 0x80 {
                return v;
            }
        }
    }
    let data = &record[12..record.len() - 4];
    let (mut at, mut step, mut value) = (0, 0, None);
    while at < data.len() {
        let key = varint(data, &mut at);
        match key {
            0x09 => at += 8,
            0x10 => step = varint(data, &mut at),
            0x2a => {
                let _summary_len = varint(data, &mut at);
                assert_eq!(data[at], 0x0a);
                at += 1;
                let _value_len = varint(data, &mut at);
                assert_eq!(data[at], 0x0a);
                at += 1;
                let n = varint(data, &mut at) as usize;
                let tag = String::from_utf8(data[at..at + n].to_vec()).unwrap();
                at += n;
                assert_eq!(data[at], 0x15);
                let v = f32::from_le_bytes(data[at + 1..at + 5].try_into().unwrap());
                at += 5;
                value = Some((tag, v));
            }
            other => panic!("unexpected field key {other:#x}"),
        }
    }
    let (tag, v) = value.unwrap();
    (tag, v, step)
}

/// A run with TensorBoard logging writes every value of every metrics line as a scalar at its
/// step, under transformers' names.
#[test]
fn training_logs_every_metrics_value() {
    let out = tempfile::tempdir().unwrap();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::parse_flag("all-linear")),
        init_lora_weights: serde_json::json!("gaussian"),
        ..Default::default()
    };
    let tiny = peft_models::testing::tiny_llama(31, true).unwrap();
    let mut model = PeftModel::new(tiny, config, 5).unwrap();
    let logs = out.path().join("runs/test");
    let args = TrainArgs {
        max_steps: Some(4),
        batch_size: 2,
        eval_steps: Some(2),
        logging_steps: 2,
        output_dir: out.path().to_path_buf(),
        tensorboard_dir: Some(logs.clone()),
        show_progress: false,
        ..Default::default()
    };
    let train = tiny_data::examples(8, 4, 5, 7, 0);
    let eval = tiny_data::examples(2, 4, 5, 7, 40);
    Trainer {
        model: &mut model,
        args,
        pad_id: 0,
    }
    .train_with_eval(&train, &eval)
    .unwrap();
    let mut want = Vec::new();
    for line in tiny_data::metrics(out.path()) {
        let step = line["step"].as_u64().unwrap();
        for (key, value) in line.as_object().unwrap() {
            if key != "step" {
                want.push((tag(key), value.as_f64().unwrap() as f32, step));
            }
        }
    }
    // Two lines (steps 2 and 4) of loss, lr, grad_norm, tokens/s, num_tokens, epoch, entropy,
    // mean token accuracy, and their eval forms with the eval loss and perplexity.
    assert_eq!(want.len(), 24);
    let files: Vec<_> = std::fs::read_dir(&logs).unwrap().flatten().collect();
    assert_eq!(files.len(), 1);
    let bytes = std::fs::read(files[0].path()).unwrap();
    let got: Vec<(String, f32, u64)> = records(&bytes)[1..]
        .iter()
        .map(|r| decode_scalar(r))
        .collect();
    assert_eq!(got, want);
}
