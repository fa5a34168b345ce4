//! TensorBoard event files, as transformers writes them with `report_to="tensorboard"`: the
//! logged metrics as scalars under `train/` and `eval/` (`train/loss`, `eval/loss`, ...) in
//! `OUTPUT/runs/<date>_<host>/events.out.tfevents.*`, which `tensorboard --logdir OUTPUT/runs`
//! reads.
//!
//! The file is a sequence of records (length, masked CRC-32C of the length, a serialized
//! `tensorflow.Event` protobuf, masked CRC-32C of it); the few protobuf fields a scalar needs
//! are encoded here.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// transformers' log directory for a run started now: `TENSORBOARD_LOGGING_DIR`, else
/// `output/runs/<Mon><DD>_<HH>-<MM>-<SS>_<hostname>` (PyTorch's default).
pub fn default_log_dir(output: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("TENSORBOARD_LOGGING_DIR") {
        return PathBuf::from(dir);
    }
    let time = chrono::Local::now().format("%b%d_%H-%M-%S");
    output.join("runs").join(format!("{time}_{}", hostname()))
}

fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Seconds since the Unix epoch, as the events' wall time.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One event file, written as PyTorch's `SummaryWriter` writes it.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates the folder and `events.out.tfevents.<time>.<host>.<pid>.0` in it, opened by the
    /// file-version event.
    pub fn create(dir: &Path, wall_time: f64) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create TensorBoard folder {}", dir.display()))?;
        let name = format!(
            "events.out.tfevents.{:010}.{}.{}.0",
            wall_time as u64,
            hostname(),
            std::process::id()
        );
        let path = dir.join(name);
        let file =
            File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        let mut writer = Self {
            file: BufWriter::new(file),
            path,
        };
        writer.write_record(&version_event(wall_time))?;
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn scalar(&mut self, tag: &str, value: f64, step: u64, wall_time: f64) -> Result<()> {
        self.write_record(&scalar_event(tag, value, step, wall_time))
    }

    /// Makes what was written readable now (TensorBoard follows the file while it grows).
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    fn write_record(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(event))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// The TensorBoard tags of a metrics line's keys, as transformers' `rewrite_logs` names them
/// (`eval_` keys under `eval/`, the others under `train/`), with its names for ours.
pub fn tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(name) => format!("eval/{name}"),
        None if key == "lr" => "train/learning_rate".into(),
        None => format!("train/{key}"),
    }
}

/// A TFRecord: length, masked CRC of the length, data, masked CRC of the data.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `Event {wall_time: 1, step: 2, file_version: 3, summary: 5, source_metadata: 10}`.
fn version_event(wall_time: f64) -> Vec<u8> {
    let mut event = Vec::new();
    double_field(&mut event, 1, wall_time);
    bytes_field(&mut event, 3, b"brain.Event:2");
    let mut source = Vec::new();
    bytes_field(&mut source, 1, b"peft-rs");
    bytes_field(&mut event, 10, &source);
    event
}

/// An event holding `Summary {value: [Value {tag: 1, simple_value: 2}]}` (simple_value is a
/// float32, as PyTorch's `add_scalar` writes it).
fn scalar_event(tag: &str, value: f64, step: u64, wall_time: f64) -> Vec<u8> {
    let mut value_msg = Vec::new();
    bytes_field(&mut value_msg, 1, tag.as_bytes());
    key(&mut value_msg, 2, 5);
    value_msg.extend_from_slice(&(value as f32).to_le_bytes());
    let mut summary = Vec::new();
    bytes_field(&mut summary, 1, &value_msg);
    let mut event = Vec::new();
    double_field(&mut event, 1, wall_time);
    // proto3 leaves out fields at their default (a step of 0).
    if step != 0 {
        key(&mut event, 2, 0);
        varint(&mut event, step);
    }
    bytes_field(&mut event, 5, &summary);
    event
}

fn key(out: &mut Vec<u8>, field: u64, wire_type: u64) {
    varint(out, field << 3 | wire_type);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn double_field(out: &mut Vec<u8>, field: u64, v: f64) {
    if v != 0.0 {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}
