//! Crash-safe file writing: every file goes to a temporary name in the same folder, is
//! flushed to disk, then renamed over the target, so a failure never leaves a partial file.

use anyhow::{Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| Ok(w.write_all(bytes)?))
}

/// [`write_atomic`] for a file written piece by piece: `write` fills a buffered writer on the
/// temporary file, which is renamed over `path` only when `write` succeeds.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(std::fs::rename(&tmp, path)?)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Pretty JSON (two-space indent) with every object's keys sorted, as Python's
/// `json.dumps(..., indent=2, sort_keys=True)` writes HF config files.
pub fn sorted_pretty_json(value: &impl serde::Serialize) -> Result<String> {
    fn sort(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.sort_keys();
                map.values_mut().for_each(sort);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(sort),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(value)?;
    sort(&mut value);
    Ok(serde_json::to_string_pretty(&value)?)
}

/// Writes `tensors` as a safetensors file (keys sorted by the format) with `metadata`.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(contiguous.iter().map(|(k, t)| (k.as_str(), t)), metadata)
        .with_context(|| format!("cannot serialize {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file, with a one-line error for a missing or malformed file.
pub fn load_safetensors(
    path: &Path,
    device: &candle_core::Device,
) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_safetensors(&bytes, path, device)
}

/// Every tensor of a PyTorch checkpoint (`torch.save` of a state dict, as in
/// `adapter_model.bin` or `pytorch_model.bin`), read by candle's pickle reader, which runs no
/// code from the file (unlike `torch.load` without `weights_only`).
pub fn load_pytorch(path: &Path, device: &candle_core::Device) -> Result<HashMap<String, Tensor>> {
    std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let tensors = candle_core::pickle::read_all(path).map_err(|e| {
        let e = e.to_string();
        anyhow::anyhow!(
            "{} is not a PyTorch checkpoint that can be read: {}",
            path.display(),
            e.lines().next().unwrap_or_default()
        )
    })?;
    if tensors.is_empty() {
        anyhow::bail!("{} holds no tensors", path.display());
    }
    tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_device(device)?)))
        .collect()
}

/// Every tensor of a weights file: a PyTorch checkpoint for `.bin`, `.pt` and `.pth`, else
/// safetensors.
pub fn load_weights(path: &Path, device: &candle_core::Device) -> Result<HashMap<String, Tensor>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("bin" | "pt" | "pth") => load_pytorch(path, device),
        _ => load_safetensors(path, device),
    }
}

/// Every tensor of the safetensors file in `bytes` (memory-mapped or read); `source` names the
/// file in errors. Malformed input of any kind is an error, never a panic.
pub fn parse_safetensors(
    bytes: &[u8],
    source: &Path,
    device: &candle_core::Device,
) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for_each_safetensor(
        bytes,
        source,
        device,
        |_, _| true,
        |name, t| {
            tensors.insert(name, t);
            Ok(())
        },
    )?;
    Ok(tensors)
}

/// Hands each tensor of the safetensors file in `bytes` that `wanted` takes (by name and
/// shape; the others are not read) to `f` as soon as it is loaded, so a caller converting
/// dtypes holds one unconverted tensor at a time.
pub fn for_each_safetensor(
    bytes: &[u8],
    source: &Path,
    device: &candle_core::Device,
    mut wanted: impl FnMut(&str, &[usize]) -> bool,
    mut f: impl FnMut(String, Tensor) -> Result<()>,
) -> Result<()> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        anyhow::anyhow!("{} is not a valid safetensors file: {e}", source.display())
    })?;
    for (name, view) in st.tensors() {
        if !wanted(&name, view.shape()) {
            continue;
        }
        let t = candle_core::safetensors::Load::load(&view, device)
            .with_context(|| format!("tensor {name} in {}", source.display()))?;
        f(name, t)?;
    }
    Ok(())
}
