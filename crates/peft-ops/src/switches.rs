//! Turning our GPU kernels off, group by group, with `PEFT_CUDA_OFF` (comma-separated group
//! names, or `all`): candle's composed ops then run in their place. This tells on a GPU which
//! kernel is at fault when a result is wrong, and what each kernel gains in a benchmark. The
//! CPU kernels are not affected.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// A group of our CUDA kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Flash attention, forward and backward (`kernels/attention.cu`).
    Attention,
    /// The causal softmax and its backward (attention outside the flash kernels).
    Softmax,
    /// The RMSNorm backward.
    RmsNorm,
    /// SwiGLU, forward and backward.
    Swiglu,
    /// LoRA's thin products and low-rank add (with dropout drawn inside them).
    LowRank,
    /// Dropout mask tensors drawn on the GPU (for the composed LoRA path).
    Dropout,
    /// The cross-entropy rows of the loss.
    Loss,
    /// 4-bit weights kept and dequantized on the GPU (QLoRA).
    Dequantize,
    /// The fused AdamW step.
    Optimizer,
    /// Adds of two tensors of one shape (residual connections, a layer tape's gradient sums),
    /// eight elements a thread.
    Add,
    /// Layer outputs computed inside the autograd op that carries their backward (off: computed
    /// beforehand and copied in, see `grad::Value`).
    InOp,
}

impl Kernel {
    pub const ALL: [Kernel; 11] = [
        Kernel::Attention,
        Kernel::Softmax,
        Kernel::RmsNorm,
        Kernel::Swiglu,
        Kernel::LowRank,
        Kernel::Dropout,
        Kernel::Loss,
        Kernel::Dequantize,
        Kernel::Optimizer,
        Kernel::Add,
        Kernel::InOp,
    ];

    /// The group's name in `PEFT_CUDA_OFF`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Attention => "attention",
            Kernel::Softmax => "softmax",
            Kernel::RmsNorm => "rms_norm",
            Kernel::Swiglu => "swiglu",
            Kernel::LowRank => "low_rank",
            Kernel::Dropout => "dropout",
            Kernel::Loss => "loss",
            Kernel::Dequantize => "dequantize",
            Kernel::Optimizer => "optimizer",
            Kernel::Add => "add",
            Kernel::InOp => "in_op",
        }
    }
}

/// The environment variable that names the groups to turn off.
pub const CUDA_OFF_VAR: &str = "PEFT_CUDA_OFF";

/// The groups named by `value` (comma-separated names or `all`; blanks ignored).
pub fn parse_kernels_off(value: &str) -> Result<Vec<Kernel>, String> {
    let mut off = Vec::new();
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if name == "all" {
            return Ok(Kernel::ALL.to_vec());
        }
        match Kernel::ALL.iter().find(|k| k.name() == name) {
            Some(k) if !off.contains(k) => off.push(*k),
            Some(_) => {}
            None => {
                let names: Vec<_> = Kernel::ALL.iter().map(|k| k.name()).collect();
                return Err(format!(
                    "{CUDA_OFF_VAR}: unknown kernel group {name:?} (all, {})",
                    names.join(", ")
                ));
            }
        }
    }
    Ok(off)
}

/// The groups `PEFT_CUDA_OFF` turns off in this process; an error for an unknown name.
pub fn cuda_kernels_off() -> Result<&'static [Kernel], String> {
    static OFF: OnceLock<Result<Vec<Kernel>, String>> = OnceLock::new();
    OFF.get_or_init(|| match std::env::var(CUDA_OFF_VAR) {
        Ok(v) => parse_kernels_off(&v),
        Err(_) => Ok(Vec::new()),
    })
    .as_deref()
    .map_err(Clone::clone)
}

/// Whether our CUDA kernel group `k` runs (`PEFT_CUDA_OFF` does not name it). An unknown name
/// there stops [`crate::open_device`] before any kernel is asked for.
pub fn cuda_kernel_on(k: Kernel) -> bool {
    cuda_kernels_off().map_or(true, |off| !off.contains(&k))
}

/// A process-wide on/off setting whose default an environment variable gives (read on first
/// use) and tests or benchmarks may set.
pub(crate) struct Switch {
    var: &'static str,
    /// The value of `var` that turns the setting the other way from `default`.
    flips: &'static [&'static str],
    default: bool,
    state: AtomicU8,
}

impl Switch {
    pub(crate) const fn new(
        var: &'static str,
        flips: &'static [&'static str],
        default: bool,
    ) -> Self {
        Self {
            var,
            flips,
            default,
            state: AtomicU8::new(0),
        }
    }

    pub(crate) fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let flipped =
                    std::env::var(self.var).is_ok_and(|v| self.flips.contains(&v.as_str()));
                let on = self.default != flipped;
                self.set(on);
                on
            }
        }
    }

    /// Sets the switch; returns the previous setting.
    pub(crate) fn set(&self, on: bool) -> bool {
        let before = match self.state.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s == 1),
        };
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
        before.unwrap_or(self.default)
    }
}

/// A switch's setting on one thread, over the process's (see [`with_thread_setting`]).
pub(crate) type ThreadSetting = std::thread::LocalKey<std::cell::Cell<Option<bool>>>;

/// `f()` with `setting` at `on` on this thread alone, whatever the process's: for tests that
/// compare both settings while others run beside them (a forward and its backward run on the
/// calling thread). The thread's previous setting comes back also when `f` panics.
pub(crate) fn with_thread_setting<R>(
    setting: &'static ThreadSetting,
    on: bool,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore(&'static ThreadSetting, Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.set(self.1);
        }
    }
    let _restore = Restore(setting, setting.replace(Some(on)));
    f()
}

/// LoRA's thin products (`x·Aᵀ`, `g·B`, the gradients of A and B, and the low-rank terms added
/// to the frozen products) by cuBLAS on tensor cores, with bf16 operands (A, B and the rank-r
/// activations rounded to bf16, as under PyTorch's autocast) and f32 accumulation, for bf16
/// activations (with dropout, the dropped input drawn into a bf16 copy by our kernel for each
/// pass that reads it); `PEFT_CUDA_LORA=kernels`: by our kernels instead (which keep
/// those in f32). cuBLAS by default: HF PEFT's own f32 thin products ran in about a third of
/// our kernels' time on an H200 (not yet measured against them in one run).
pub const CUDA_LORA_VAR: &str = "PEFT_CUDA_LORA";

static LORA_CUBLAS: Switch = Switch::new(CUDA_LORA_VAR, &["kernels"], true);

/// Whether LoRA's thin products run through cuBLAS ([`CUDA_LORA_VAR`]).
pub fn lora_cublas() -> bool {
    LORA_CUBLAS.get()
}

/// Turns the cuBLAS variant of LoRA's thin products on or off; returns the previous setting.
pub fn set_lora_cublas(on: bool) -> bool {
    LORA_CUBLAS.set(on)
}

/// `PEFT_CUDA_FLASH=wide`: the flash attention forward for head size 64 in blocks of 128 query
/// rows (each warp two 16-row tiles, so that each key and value fragment read from shared
/// memory serves both: FlashAttention-2's shape; two blocks an SM) in place of 64-row blocks
/// (four an SM). The same bits either way. Not yet measured on a GPU: off by default.
pub const CUDA_FLASH_VAR: &str = "PEFT_CUDA_FLASH";

static FLASH_WIDE: Switch = Switch::new(CUDA_FLASH_VAR, &["wide"], false);

/// Whether the flash forward runs in 128-row blocks for head size 64 ([`CUDA_FLASH_VAR`]).
pub fn flash_wide() -> bool {
    FLASH_WIDE.get()
}

/// Turns the 128-row flash forward on or off; returns the previous setting.
pub fn set_flash_wide(on: bool) -> bool {
    FLASH_WIDE.set(on)
}

/// `PEFT_CUDA_FLASH_BWD=wide`: the flash attention backward in blocks of 128 keys (eight warps,
/// one block an SM: each query tile read and its dQ share added once per 128 keys, as
/// FlashAttention-2's backward) in place of 64 (four warps, two blocks an SM). Not yet measured
/// on a GPU: off by default.
pub const CUDA_FLASH_BWD_VAR: &str = "PEFT_CUDA_FLASH_BWD";

static FLASH_WIDE_BACKWARD: Switch = Switch::new(CUDA_FLASH_BWD_VAR, &["wide"], false);

/// Whether the flash backward runs in 128-key blocks ([`CUDA_FLASH_BWD_VAR`]).
pub fn flash_wide_backward() -> bool {
    FLASH_WIDE_BACKWARD.get()
}

/// Turns the 128-key flash backward on or off; returns the previous setting.
pub fn set_flash_wide_backward(on: bool) -> bool {
    FLASH_WIDE_BACKWARD.set(on)
}

/// Causal attention (forward and backward, head size 64 or 128, unpacked rows) by cuDNN's
/// fused attention engines, on the same rotated q and k as our flash kernels;
/// `PEFT_CUDA_ATTENTION=flash`: by our flash kernels. Needs cuDNN 9 (`libcudnn.so.9`) at run
/// time; where it is missing or has no engine for a shape, the flash kernels take over (said
/// once). cuDNN by default: HF's sdpa ran cuDNN's kernels in about a third of our flash
/// kernels' time on an H200 (ours through cuDNN not yet measured there).
pub const CUDA_ATTENTION_VAR: &str = "PEFT_CUDA_ATTENTION";

static ATTENTION_CUDNN: Switch = Switch::new(CUDA_ATTENTION_VAR, &["flash"], true);

/// Whether cuDNN computes the flash attention's passes ([`CUDA_ATTENTION_VAR`]).
pub fn attention_cudnn() -> bool {
    ATTENTION_CUDNN.get()
}

/// Turns cuDNN's attention on or off; returns the previous setting.
pub fn set_attention_cudnn(on: bool) -> bool {
    ATTENTION_CUDNN.set(on)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_group_names() {
        assert_eq!(parse_kernels_off(""), Ok(vec![]));
        assert_eq!(
            parse_kernels_off(" attention, optimizer,attention "),
            Ok(vec![Kernel::Attention, Kernel::Optimizer])
        );
        assert_eq!(parse_kernels_off("loss,all"), Ok(Kernel::ALL.to_vec()));
        let err = parse_kernels_off("attention,flash").unwrap_err();
        assert!(
            err.contains("\"flash\"") && err.contains("rms_norm"),
            "{err}"
        );
    }
}
