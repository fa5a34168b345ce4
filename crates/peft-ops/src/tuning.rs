//! Choosing among interchangeable paths by timing them on the run's own model and batch, as
//! PyTorch's `cudnn.benchmark` does for convolutions: which of cuDNN's attention and our flash
//! kernels, cuBLAS's LoRA products and our kernels, is faster depends on the GPU and on the
//! shapes, and every pair computes the same thing (tested against each other). The trainer
//! times a forward and backward pass on its first batch under each setting before it trains.
//!
//! A setting the user fixed through its environment variable is left as it is.

/// `PEFT_KERNEL_TUNING`: `on` (time the paths also on a CPU), `off` (the defaults and the
/// environment's settings as they are), unset or `auto`: on GPUs only.
pub const KERNEL_TUNING_VAR: &str = "PEFT_KERNEL_TUNING";

/// Whether a run times its paths before it trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KernelTuning {
    /// [`KERNEL_TUNING_VAR`] decides; where it is unset, on GPUs only.
    #[default]
    Auto,
    On,
    Off,
}

impl KernelTuning {
    /// Parses `auto`, `on` or `off`.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!("unknown kernel tuning {other:?} (auto, on or off)")),
        }
    }

    /// Whether to tune on a GPU (`cuda`) or a CPU; an error for a value of
    /// [`KERNEL_TUNING_VAR`] that is not auto, on or off.
    pub fn wanted(self, cuda: bool) -> Result<bool, String> {
        let this = match self {
            Self::Auto => match std::env::var(KERNEL_TUNING_VAR) {
                Ok(v) => Self::parse(&v).map_err(|e| format!("{KERNEL_TUNING_VAR}: {e}"))?,
                Err(_) => Self::Auto,
            },
            fixed => fixed,
        };
        Ok(match this {
            Self::Auto => cuda,
            Self::On => true,
            Self::Off => false,
        })
    }
}

/// An on/off setting the tuner may flip.
pub struct Knob {
    /// The environment variable that fixes it.
    pub var: &'static str,
    /// That variable's values for on and off.
    pub values: [&'static str; 2],
    pub get: fn() -> bool,
    /// Sets it; returns the previous setting.
    pub set: fn(bool) -> bool,
    /// Whether it can change what runs (`cuda`: on a GPU), given the settings chosen so far.
    pub applies: fn(cuda: bool) -> bool,
}

impl Knob {
    /// `VAR=value` for the setting now.
    pub fn setting(&self) -> String {
        let value = self.values[usize::from(!(self.get)())];
        format!("{}={value}", self.var)
    }
}

/// The settings with interchangeable paths, in the order they are tried (the largest share
/// of a step first, so that later ones are timed on top of its winner).
pub fn knobs() -> Vec<Knob> {
    use crate::switches as s;
    let gpu = |cuda: bool| cuda;
    // cuDNN's attention is a choice where cuDNN can be loaded; the flash kernels' block sizes
    // matter where they run: cuDNN lost, or cannot be loaded.
    let cudnn = |cuda: bool| cuda && crate::cudnn_version().is_some();
    let flash = |cuda: bool| cuda && (!s::attention_cudnn() || crate::cudnn_version().is_none());
    let knob = |var, values, get, set, applies| Knob {
        var,
        values,
        get,
        set,
        applies,
    };
    vec![
        knob(
            crate::CUDA_ATTENTION_VAR,
            ["cudnn", "flash"],
            s::attention_cudnn,
            s::set_attention_cudnn,
            cudnn,
        ),
        knob(
            crate::CUDA_FLASH_VAR,
            ["wide", "narrow"],
            s::flash_wide,
            s::set_flash_wide,
            flash,
        ),
        knob(
            crate::CUDA_FLASH_BWD_VAR,
            ["wide", "narrow"],
            s::flash_wide_backward,
            s::set_flash_wide_backward,
            flash,
        ),
        knob(
            crate::CUDA_LORA_VAR,
            ["cublas", "kernels"],
            s::lora_cublas,
            s::set_lora_cublas,
            gpu,
        ),
        knob(
            crate::LORA_SHARED_VAR,
            ["on", "off"],
            crate::lora_shared,
            crate::set_lora_shared,
            |_| true,
        ),
        knob(
            crate::LAYER_TAPE_VAR,
            ["on", "off"],
            crate::layer_tape_enabled,
            crate::set_layer_tape,
            |_| true,
        ),
        knob(
            crate::TAPE_GATHER_VAR,
            ["on", "off"],
            crate::tape_gather_enabled,
            crate::set_tape_gather,
            |_| crate::layer_tape_enabled(),
        ),
    ]
}

/// Sets the knobs named by `settings` (`VAR=value`, as [`Tuning::settings`] lists them: a
/// resumed run takes its checkpoint's), leaving those whose environment variable is set as
/// set; an error for a variable or value no knob has.
pub fn apply_settings(settings: &[String]) -> Result<(), String> {
    let knobs = knobs();
    for setting in settings {
        let (var, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("kernel setting {setting:?} is not VAR=value"))?;
        let knob = knobs
            .iter()
            .find(|k| k.var == var)
            .ok_or_else(|| format!("unknown kernel setting {var}"))?;
        let on = match knob.values.iter().position(|v| *v == value) {
            Some(i) => i == 0,
            None => return Err(format!("{var}: unknown value {value:?}")),
        };
        if std::env::var_os(var).is_none() {
            (knob.set)(on);
        }
    }
    Ok(())
}

/// One setting timed.
#[derive(Clone, Debug)]
pub struct Trial {
    /// `VAR=value` flipped from the best settings so far (`None`: the settings the run
    /// started with).
    pub flipped: Option<String>,
    /// The fastest of its passes, or why the flip was rejected (a pass failed, computed
    /// other results or needed more memory).
    pub seconds: Result<f64, String>,
    /// Whether it became the best so far.
    pub kept: bool,
}

/// What [`tune`] tried and chose.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// `VAR=value` of every knob that applied, as chosen.
    pub settings: Vec<String>,
    pub trials: Vec<Trial>,
    /// Passes run in all.
    pub passes: usize,
}

impl Tuning {
    /// Seconds of a pass with the settings the run started with, and with the chosen ones.
    pub fn start_and_best(&self) -> Option<(f64, f64)> {
        let seconds = |t: &Trial| t.seconds.as_ref().ok().copied();
        let start = seconds(self.trials.first()?)?;
        let best = seconds(self.trials.iter().rev().find(|t| t.kept)?)?;
        Some((start, best))
    }

    /// The lines for the log: each rejected flip and why, then [`Self::summary`].
    pub fn report(&self) -> Vec<String> {
        let rejected = self.trials.iter().filter_map(|t| {
            let why = t.seconds.as_ref().err()?;
            Some(format!(
                "kernel tuning rejected {}: {why}",
                t.flipped.as_deref()?
            ))
        });
        rejected.chain([self.summary()]).collect()
    }

    /// One line for the log: the chosen settings and what they gained.
    pub fn summary(&self) -> String {
        let timing = match self.start_and_best() {
            Some((start, best)) => format!(
                ": {:.1} ms a forward and backward pass, {:.1} with the settings at the start",
                best * 1e3,
                start * 1e3
            ),
            None => String::new(),
        };
        let rejected = self.trials.iter().filter(|t| t.seconds.is_err()).count();
        let rejected = if rejected > 0 {
            format!(" ({rejected} rejected: see above)")
        } else {
            String::new()
        };
        format!(
            "kernel tuning over {} passes chose {}{timing}{rejected}",
            self.passes,
            self.settings.join(" "),
        )
    }
}

/// One timed pass.
#[derive(Clone, Debug)]
pub struct Pass {
    /// Its time, the device's queue drained.
    pub seconds: f64,
    /// What every path must reproduce (the loss, a norm of the gradients): compared with what
    /// the starting paths computed, within [`RESULT_TOLERANCE`], so that a fast path that
    /// computes something else is not kept.
    pub results: Vec<f64>,
    /// The most device memory in use during the pass, where it is known (GPUs): a flip that
    /// needs more than the starting paths is not kept, so that tuning never makes a run need
    /// more memory (a later, longer batch could not fit).
    pub peak_bytes: Option<u64>,
}

/// Passes timed under each setting; the fastest counts (the first pass of a path also
/// compiles its kernels and plans).
const PASSES: usize = 2;

/// A flip must save this share of a pass to be kept: closer than that is noise.
const MARGIN: f64 = 0.01;

/// How far (relative) a flip's results may lie from the starting paths': the paths differ in
/// rounding (bf16 operands or f32), not in what they compute, so only a wrong path lands
/// farther.
pub const RESULT_TOLERANCE: f64 = 0.05;

/// How much more memory than the starting paths' a flip may need: allocation granularity,
/// not a path that keeps more.
const MEMORY_MARGIN: f64 = 0.02;

/// What a setting's passes gave: the fastest time, the last pass's results and the most
/// memory any of them needed.
struct Timed {
    seconds: f64,
    results: Vec<f64>,
    peak_bytes: Option<u64>,
}

impl Timed {
    /// Why this flip cannot replace the starting paths (`start`), if it cannot.
    fn unlike(&self, start: &Timed) -> Option<String> {
        if let Some(why) = differs(&self.results, &start.results) {
            return Some(why);
        }
        match (self.peak_bytes, start.peak_bytes) {
            (Some(got), Some(want)) if got as f64 > want as f64 * (1.0 + MEMORY_MARGIN) => {
                let mib = |b: u64| b as f64 / (1 << 20) as f64;
                Some(format!(
                    "needs {:.0} MiB where the starting paths need {:.0}",
                    mib(got),
                    mib(want)
                ))
            }
            _ => None,
        }
    }
}

/// Why `got` is not what the starting paths computed (`want`), if it is not.
fn differs(got: &[f64], want: &[f64]) -> Option<String> {
    let close = |g: f64, w: f64| (g - w).abs() <= RESULT_TOLERANCE * w.abs().max(1e-6);
    let same = got.len() == want.len() && got.iter().zip(want).all(|(&g, &w)| close(g, w));
    (!same).then(|| format!("computed {got:?} where the starting paths computed {want:?}"))
}

/// Times `pass` under the settings of `knobs` that apply and that no environment variable
/// fixes, flipping one at a time from the best so far, and leaves the fastest set. A flip
/// whose pass fails, computes other results than the starting paths or needs more memory
/// loses (the reason is reported in the [`Tuning`]); a pass that fails under the starting
/// settings is an error.
pub fn tune<E: std::fmt::Display>(
    knobs: &[Knob],
    cuda: bool,
    mut pass: impl FnMut() -> Result<Pass, E>,
) -> Result<Tuning, E> {
    let mut passes = 0;
    let mut timed = |passes: &mut usize| -> Result<Timed, E> {
        let mut t = Timed {
            seconds: f64::INFINITY,
            results: Vec::new(),
            peak_bytes: None,
        };
        for _ in 0..PASSES {
            *passes += 1;
            let p = pass()?;
            t.seconds = t.seconds.min(p.seconds);
            t.results = p.results;
            t.peak_bytes = t.peak_bytes.max(p.peak_bytes);
        }
        Ok(t)
    };
    let start = timed(&mut passes)?;
    let mut best = start.seconds;
    let mut trials = vec![Trial {
        flipped: None,
        seconds: Ok(best),
        kept: true,
    }];
    for knob in knobs {
        if std::env::var_os(knob.var).is_some() || !(knob.applies)(cuda) {
            continue;
        }
        let before = (knob.set)(!(knob.get)());
        let flipped = Some(knob.setting());
        let seconds = match timed(&mut passes) {
            Ok(t) => match t.unlike(&start) {
                None => Ok(t.seconds),
                Some(why) => Err(why),
            },
            Err(e) => Err(e.to_string()),
        };
        let kept = seconds.as_ref().is_ok_and(|&s| s < best * (1.0 - MARGIN));
        if kept {
            best = *seconds.as_ref().unwrap_or(&best);
        } else {
            (knob.set)(before);
        }
        trials.push(Trial {
            flipped,
            seconds,
            kept,
        });
    }
    let settings = knobs
        .iter()
        .filter(|k| (k.applies)(cuda))
        .map(Knob::setting)
        .collect();
    Ok(Tuning {
        settings,
        trials,
        passes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    static FAST_PATH: AtomicBool = AtomicBool::new(false);
    static NEUTRAL: AtomicBool = AtomicBool::new(false);
    static BROKEN: AtomicBool = AtomicBool::new(false);
    static WRONG: AtomicBool = AtomicBool::new(false);
    static HUNGRY: AtomicBool = AtomicBool::new(false);
    static AFTER: AtomicBool = AtomicBool::new(false);

    fn knob(var: &'static str, get: fn() -> bool, set: fn(bool) -> bool) -> Knob {
        Knob {
            var,
            values: ["on", "off"],
            get,
            set,
            applies: |_| true,
        }
    }

    fn on(flag: &AtomicBool) -> bool {
        flag.load(SeqCst)
    }

    #[test]
    fn keeps_the_flips_that_save_time_and_reverts_the_others() {
        let mut knobs = vec![
            knob(
                "FAST_PATH",
                || on(&FAST_PATH),
                |v| FAST_PATH.swap(v, SeqCst),
            ),
            knob("NEUTRAL", || on(&NEUTRAL), |v| NEUTRAL.swap(v, SeqCst)),
            knob("BROKEN", || on(&BROKEN), |v| BROKEN.swap(v, SeqCst)),
            knob("WRONG", || on(&WRONG), |v| WRONG.swap(v, SeqCst)),
            knob("HUNGRY", || on(&HUNGRY), |v| HUNGRY.swap(v, SeqCst)),
            knob("AFTER", || on(&AFTER), |v| AFTER.swap(v, SeqCst)),
        ];
        // Tried only where the fast path was not chosen before it (as the flash kernels'
        // block sizes where cuDNN won).
        knobs[5].applies = |_| !on(&FAST_PATH);
        let mut calls = 0;
        // The first pass of each setting is slow (compilation); the fast path saves 20%, the
        // neutral one 0.5% (noise); the broken one fails; the wrong one is fastest of all but
        // computes another loss; the hungry one is as fast but needs twice the memory.
        let mut first_of = std::collections::HashSet::new();
        let tuning = tune(&knobs, true, || {
            calls += 1;
            if on(&BROKEN) {
                return Err("cuDNN has no plan");
            }
            let key = (on(&FAST_PATH), on(&NEUTRAL), on(&WRONG));
            let cold = if first_of.insert(key) { 5.0 } else { 0.0 };
            let fast = if on(&FAST_PATH) { 0.8 } else { 1.0 };
            let neutral = if on(&NEUTRAL) { 0.995 } else { 1.0 };
            let wrong = if on(&WRONG) { 0.5 } else { 1.0 };
            let hungry = if on(&HUNGRY) { 0.5 } else { 1.0 };
            // The loss and a gradient norm, rounded differently by each path.
            let rounding = if on(&NEUTRAL) { 1.001 } else { 1.0 };
            let loss = if on(&WRONG) { 2.5 } else { 2.0 * rounding };
            Ok(Pass {
                seconds: cold + fast * neutral * wrong * hungry,
                results: vec![loss, 0.3 * rounding],
                peak_bytes: Some(if on(&HUNGRY) { 1 << 31 } else { 1 << 30 }),
            })
        })
        .unwrap();
        assert!(on(&FAST_PATH), "the faster path stays set");
        assert!(!on(&NEUTRAL), "a flip within the noise is reverted");
        assert!(!on(&BROKEN), "a failing path is reverted");
        assert!(!on(&WRONG), "a path that computes another loss is reverted");
        assert!(!on(&HUNGRY), "a path that needs more memory is reverted");
        assert_eq!(calls, tuning.passes);
        // Start, fast, neutral, broken (its first pass fails), wrong, hungry; the last knob no
        // longer applies.
        assert_eq!(tuning.passes, 2 + 2 + 2 + 1 + 2 + 2);
        assert_eq!(tuning.trials.len(), 6);
        assert_eq!(
            tuning.trials[3].seconds,
            Err("cuDNN has no plan".to_string())
        );
        let why = tuning.trials[4].seconds.clone().unwrap_err();
        assert!(why.contains("2.5") && why.contains("[2.0, 0.3]"), "{why}");
        let why = tuning.trials[5].seconds.clone().unwrap_err();
        assert!(
            why.contains("needs 2048 MiB") && why.contains("need 1024"),
            "{why}"
        );
        assert_eq!(
            tuning.settings,
            [
                "FAST_PATH=on",
                "NEUTRAL=off",
                "BROKEN=off",
                "WRONG=off",
                "HUNGRY=off"
            ]
        );
        let (start, best) = tuning.start_and_best().unwrap();
        assert!((start - 1.0).abs() < 1e-12 && (best - 0.8).abs() < 1e-12);
        let summary = tuning.summary();
        assert!(
            summary.contains("800.0 ms") && summary.contains("3 rejected"),
            "{summary}"
        );
        let report = tuning.report();
        assert_eq!(report.len(), 4, "{report:?}");
        assert_eq!(
            report[0],
            "kernel tuning rejected BROKEN=on: cuDNN has no plan"
        );
        assert_eq!(report[3], summary);
    }

    #[test]
    fn a_failure_under_the_starting_settings_is_an_error() {
        let knobs: Vec<Knob> = Vec::new();
        let got = tune(&knobs, false, || Err::<Pass, _>("out of memory"));
        assert_eq!(got.unwrap_err(), "out of memory");
    }

    #[test]
    fn parses_the_tuning_modes() {
        assert_eq!(KernelTuning::parse("off"), Ok(KernelTuning::Off));
        assert!(KernelTuning::parse("fast")
            .unwrap_err()
            .contains("auto, on or off"));
        assert_eq!(KernelTuning::On.wanted(false), Ok(true));
        assert_eq!(KernelTuning::Off.wanted(true), Ok(false));
    }

    #[test]
    fn the_real_knobs_name_their_variables() {
        let vars: Vec<_> = knobs().iter().map(|k| k.var).collect();
        assert_eq!(
            vars,
            [
                crate::CUDA_ATTENTION_VAR,
                crate::CUDA_FLASH_VAR,
                crate::CUDA_FLASH_BWD_VAR,
                crate::CUDA_LORA_VAR,
                crate::LORA_SHARED_VAR,
                crate::LAYER_TAPE_VAR,
                crate::TAPE_GATHER_VAR,
            ]
        );
        // On a CPU only the paths that run there are tried.
        let on_cpu: Vec<_> = knobs()
            .into_iter()
            .filter(|k| (k.applies)(false))
            .map(|k| k.var)
            .collect();
        assert!(!on_cpu.contains(&crate::CUDA_ATTENTION_VAR));
        assert!(on_cpu.contains(&crate::LORA_SHARED_VAR));
    }
}
