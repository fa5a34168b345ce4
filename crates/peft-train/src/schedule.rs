//! Learning-rate schedules as transformers' `get_scheduler` computes them: the same names, the
//! same warmup rules and the same `lr_scheduler_kwargs`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// transformers' `lr_scheduler_type` values (all but `reduce_lr_on_plateau`, which needs an
/// eval metric every step, and `greedy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Linear,
    Cosine,
    #[value(name = "cosine_with_restarts")]
    CosineWithRestarts,
    Polynomial,
    /// No warmup, as transformers' `constant` (its warmup is `constant_with_warmup`).
    Constant,
    #[value(name = "constant_with_warmup")]
    ConstantWithWarmup,
    #[value(name = "inverse_sqrt")]
    InverseSqrt,
    #[value(name = "cosine_with_min_lr")]
    CosineWithMinLr,
    /// `cosine_with_min_lr` whose warmup starts above 0 and whose decay starts a step earlier.
    #[value(name = "cosine_warmup_with_min_lr")]
    CosineWarmupWithMinLr,
    #[value(name = "warmup_stable_decay")]
    WarmupStableDecay,
}

/// How long the linear warmup lasts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    /// A fraction of the optimizer steps, rounded up (`warmup_ratio`).
    Ratio(f64),
    Steps(usize),
}

impl Warmup {
    /// transformers 5's `warmup_steps`: a count from 1 up, a fraction of the steps below 1.
    pub fn from_warmup_steps(v: f64) -> Result<Self> {
        if !(v.is_finite() && v >= 0.0) {
            bail!("warmup_steps must be a step count or a fraction below 1, got {v}");
        }
        if v < 1.0 {
            return Ok(Self::Ratio(v));
        }
        if v.fract() != 0.0 {
            bail!("warmup_steps must be a whole number of steps or a fraction below 1, got {v}");
        }
        Ok(Self::Steps(v as usize))
    }

    pub fn steps(self, total_steps: usize) -> usize {
        match self {
            Self::Ratio(r) => (r * total_steps as f64).ceil() as usize,
            Self::Steps(n) => n,
        }
    }

    pub fn validate(self) -> Result<()> {
        match self {
            Self::Ratio(r) if !(0.0..=1.0).contains(&r) => {
                bail!("the warmup ratio must be between 0 and 1, got {r}")
            }
            _ => Ok(()),
        }
    }
}

/// The shape of the curve after warmup, with its `lr_scheduler_kwargs` resolved.
#[derive(Debug, Clone, PartialEq)]
enum Decay {
    Constant,
    Linear,
    /// `min_lr_rate`: the floor as a fraction of the peak (`cosine_with_min_lr`; 0 for
    /// `cosine`).
    Cosine {
        num_cycles: f64,
        min_lr_rate: f64,
    },
    /// `cosine_warmup_with_min_lr`: its own warmup (from `warmup_lr_rate`, or one step's
    /// share) and a cosine one step ahead of `Cosine`'s.
    CosineAhead {
        num_cycles: f64,
        min_lr_rate: f64,
        warmup_lr_rate: Option<f64>,
    },
    HardRestarts {
        num_cycles: f64,
    },
    Polynomial {
        lr_end: f64,
        power: f64,
    },
    InverseSqrt {
        timescale: f64,
    },
    Wsd(Wsd),
}

#[derive(Debug, Clone, PartialEq)]
struct Wsd {
    stable_steps: usize,
    decay_steps: usize,
    warmup_type: Curve,
    decay_type: Curve,
    min_lr_ratio: f64,
    num_cycles: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Curve {
    Linear,
    Cosine,
    OneMinusSqrt,
}

impl Curve {
    fn parse(v: &str, key: &str) -> Result<Self> {
        Ok(match v {
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "1-sqrt" => Self::OneMinusSqrt,
            _ => bail!("lr_scheduler_kwargs: {key} must be linear, cosine or 1-sqrt, got {v:?}"),
        })
    }
}

#[derive(Debug, Clone)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// `constant` skips the warmup whatever it is set to, as transformers does.
    warmup_applies: bool,
    decay: Decay,
}

impl LrSchedule {
    /// The schedule of `kind` over `total_steps` optimizer steps; `kwargs` are transformers'
    /// `lr_scheduler_kwargs` for it (a JSON object: `{"min_lr_rate": 0.1}`), and a key the
    /// scheduler does not take is an error, as in transformers.
    pub fn new(
        kind: SchedulerKind,
        base_lr: f64,
        warmup: Warmup,
        total_steps: usize,
        kwargs: &Map<String, Value>,
    ) -> Result<Self> {
        let warmup_steps = warmup.steps(total_steps);
        let mut kw = Kwargs {
            kind,
            map: kwargs.clone(),
        };
        let decay = match kind {
            SchedulerKind::Constant | SchedulerKind::ConstantWithWarmup => {
                // transformers hands these two no kwargs at all: any given are ignored there.
                kw.map.clear();
                Decay::Constant
            }
            SchedulerKind::Linear => Decay::Linear,
            SchedulerKind::Cosine => Decay::Cosine {
                num_cycles: kw.number("num_cycles")?.unwrap_or(0.5),
                min_lr_rate: 0.0,
            },
            SchedulerKind::CosineWithMinLr => Decay::Cosine {
                num_cycles: kw.number("num_cycles")?.unwrap_or(0.5),
                min_lr_rate: kw.min_lr_rate(base_lr)?,
            },
            SchedulerKind::CosineWarmupWithMinLr => Decay::CosineAhead {
                num_cycles: kw.number("num_cycles")?.unwrap_or(0.5),
                min_lr_rate: kw.min_lr_rate(base_lr)?,
                warmup_lr_rate: kw.number("warmup_lr_rate")?,
            },
            SchedulerKind::CosineWithRestarts => Decay::HardRestarts {
                num_cycles: kw.number("num_cycles")?.unwrap_or(1.0),
            },
            SchedulerKind::Polynomial => {
                let lr_end = kw.number("lr_end")?.unwrap_or(1e-7);
                if lr_end >= base_lr {
                    bail!("lr_end ({lr_end}) must be smaller than the learning rate ({base_lr})");
                }
                Decay::Polynomial {
                    lr_end,
                    power: kw.number("power")?.unwrap_or(1.0),
                }
            }
            SchedulerKind::InverseSqrt => {
                let timescale = match kw.number("timescale")? {
                    Some(t) => t,
                    None if warmup_steps > 0 => warmup_steps as f64,
                    None => 10_000.0,
                };
                if timescale <= 0.0 {
                    bail!("lr_scheduler_kwargs: timescale must be above 0, got {timescale}");
                }
                Decay::InverseSqrt { timescale }
            }
            SchedulerKind::WarmupStableDecay => {
                let decay_steps = kw.count("num_decay_steps")?.with_context(|| {
                    "warmup_stable_decay needs num_decay_steps in lr_scheduler_kwargs (e.g. {\"num_decay_steps\": 100})"
                })?;
                let stable_steps = match kw.count("num_stable_steps")? {
                    Some(n) => n,
                    None => warmup_steps
                        .checked_add(decay_steps)
                        .and_then(|used| total_steps.checked_sub(used))
                        .with_context(|| {
                            format!(
                                "warmup_stable_decay: {warmup_steps} warmup and {decay_steps} decay steps exceed the {total_steps} steps of the run"
                            )
                        })?,
                };
                let curve = |kw: &mut Kwargs, key: &str, default| -> Result<Curve> {
                    kw.text(key)?.map_or(Ok(default), |v| Curve::parse(&v, key))
                };
                Decay::Wsd(Wsd {
                    stable_steps,
                    decay_steps,
                    warmup_type: curve(&mut kw, "warmup_type", Curve::Linear)?,
                    decay_type: curve(&mut kw, "decay_type", Curve::Cosine)?,
                    min_lr_ratio: kw.number("min_lr_ratio")?.unwrap_or(0.0),
                    num_cycles: kw.number("num_cycles")?.unwrap_or(0.5),
                })
            }
        };
        kw.finish()?;
        Ok(Self {
            base_lr,
            warmup_steps,
            total_steps,
            warmup_applies: kind != SchedulerKind::Constant,
            decay,
        })
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: usize) -> f64 {
        let (s, w, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if let Decay::Wsd(wsd) = &self.decay {
            return wsd.factor(s, w);
        }
        if let Decay::CosineAhead {
            num_cycles,
            min_lr_rate,
            warmup_lr_rate,
        } = &self.decay
        {
            if s < w {
                return match warmup_lr_rate {
                    None => (s + 1.0) / w.max(1.0),
                    Some(r) => r + (1.0 - r) * s / (w - 1.0).max(1.0),
                };
            }
            let progress = (s - w + 1.0) / (total - w).max(1.0);
            let f = 0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos());
            return (f * (1.0 - min_lr_rate) + min_lr_rate).max(0.0);
        }
        if self.warmup_applies && s < w {
            return s / w.max(1.0);
        }
        let progress = (s - w) / (total - w).max(1.0);
        match &self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => ((total - s) / (total - w).max(1.0)).max(0.0),
            Decay::Cosine {
                num_cycles,
                min_lr_rate,
            } => {
                let f = 0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos());
                (f * (1.0 - min_lr_rate) + min_lr_rate).max(0.0)
            }
            Decay::HardRestarts { num_cycles } => {
                if progress >= 1.0 {
                    return 0.0;
                }
                let phase = (num_cycles * progress) % 1.0;
                (0.5 * (1.0 + (std::f64::consts::PI * phase).cos())).max(0.0)
            }
            Decay::Polynomial { lr_end, power } => {
                if s > total {
                    return lr_end / self.base_lr;
                }
                let remaining = 1.0 - (s - w) / (total - w);
                ((self.base_lr - lr_end) * remaining.powf(*power) + lr_end) / self.base_lr
            }
            Decay::InverseSqrt { timescale } => 1.0 / ((s + timescale - w) / timescale).sqrt(),
            Decay::Wsd(_) | Decay::CosineAhead { .. } => unreachable!("returned above"),
        }
    }
}

impl Wsd {
    fn factor(&self, s: f64, w: f64) -> f64 {
        let (stable, decay) = (self.stable_steps as f64, self.decay_steps as f64);
        let floor = |f: f64| (f * (1.0 - self.min_lr_ratio) + self.min_lr_ratio).max(0.0);
        if s < w {
            let p = s / w.max(1.0);
            return floor(match self.warmup_type {
                Curve::Linear => p,
                Curve::Cosine => 0.5 * (1.0 - (std::f64::consts::PI * p).cos()),
                Curve::OneMinusSqrt => 1.0 - (1.0 - p).sqrt(),
            });
        }
        if s < w + stable {
            return 1.0;
        }
        if s < w + stable + decay {
            let p = (s - w - stable) / decay.max(1.0);
            return floor(match self.decay_type {
                Curve::Linear => 1.0 - p,
                Curve::Cosine => {
                    0.5 * (1.0 + (std::f64::consts::PI * self.num_cycles * 2.0 * p).cos())
                }
                Curve::OneMinusSqrt => 1.0 - p.sqrt(),
            });
        }
        self.min_lr_ratio
    }
}

/// `lr_scheduler_kwargs`, taken key by key; what is left at the end was not for this
/// scheduler.
struct Kwargs {
    kind: SchedulerKind,
    map: Map<String, Value>,
}

impl Kwargs {
    fn number(&mut self, key: &str) -> Result<Option<f64>> {
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => bail!("lr_scheduler_kwargs: {key} must be a number, got {v}"),
            },
        }
    }

    fn count(&mut self, key: &str) -> Result<Option<usize>> {
        match self.number(key)? {
            Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as usize)),
            Some(x) => bail!("lr_scheduler_kwargs: {key} must be a whole number of steps, got {x}"),
            None => Ok(None),
        }
    }

    fn text(&mut self, key: &str) -> Result<Option<String>> {
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => bail!("lr_scheduler_kwargs: {key} must be a string, got {v}"),
        }
    }

    /// The cosine floor as a fraction of `base_lr`: `min_lr_rate`, or `min_lr` over `base_lr`
    /// (one of them, as transformers requires).
    fn min_lr_rate(&mut self, base_lr: f64) -> Result<f64> {
        Ok(
            match (self.number("min_lr")?, self.number("min_lr_rate")?) {
                (Some(_), Some(_)) => {
                    bail!("lr_scheduler_kwargs: set min_lr or min_lr_rate, not both")
                }
                (Some(_), None) if base_lr <= 0.0 => {
                    bail!("min_lr needs a learning rate above 0 (min_lr_rate is its ratio)")
                }
                (Some(min_lr), None) => min_lr / base_lr,
                (None, Some(rate)) => rate,
                (None, None) => {
                    let name = serde_json::to_value(self.kind)?;
                    bail!(
                    "{} needs min_lr or min_lr_rate in lr_scheduler_kwargs (e.g. {{\"min_lr_rate\": 0.1}})",
                    name.as_str().unwrap_or_default()
                )
                }
            },
        )
    }

    fn finish(self) -> Result<()> {
        if let Some(key) = self.map.keys().next() {
            let name = serde_json::to_value(self.kind)?;
            bail!(
                "lr_scheduler_kwargs: the {} scheduler takes no {key:?}",
                name.as_str().unwrap_or_default()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: SchedulerKind, lr: f64, warmup: Warmup, total: usize) -> LrSchedule {
        LrSchedule::new(kind, lr, warmup, total, &Map::new()).unwrap()
    }

    fn with(kind: SchedulerKind, warmup: Warmup, total: usize, kwargs: Value) -> LrSchedule {
        LrSchedule::new(kind, 1.0, warmup, total, kwargs.as_object().unwrap()).unwrap()
    }

    #[test]
    fn warmup_then_decay() {
        let s = schedule(SchedulerKind::Linear, 1.0, Warmup::Ratio(0.1), 100);
        assert_eq!(s.warmup_steps, 10);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(55) - 0.5).abs() < 1e-12);
        let c = schedule(SchedulerKind::Cosine, 2.0, Warmup::Ratio(0.0), 10);
        assert!((c.lr(0) - 2.0).abs() < 1e-12);
        assert!((c.lr(5) - 1.0).abs() < 1e-12);
        let k = schedule(
            SchedulerKind::ConstantWithWarmup,
            3.0,
            Warmup::Ratio(0.03),
            100,
        );
        assert_eq!(k.lr(1), 1.0);
        assert_eq!(k.lr(50), 3.0);
    }

    #[test]
    fn constant_ignores_the_warmup_as_transformers_does() {
        let k = schedule(SchedulerKind::Constant, 3.0, Warmup::Steps(10), 100);
        assert_eq!(k.lr(0), 3.0);
        assert_eq!(k.lr(99), 3.0);
    }

    #[test]
    fn warmup_steps_count_or_fraction() {
        assert_eq!(Warmup::from_warmup_steps(5.0).unwrap().steps(100), 5);
        assert_eq!(Warmup::from_warmup_steps(0.05).unwrap().steps(30), 2);
        assert!(Warmup::from_warmup_steps(2.5).is_err());
        assert!(Warmup::from_warmup_steps(-1.0).is_err());
    }

    #[test]
    fn kwargs_are_checked() {
        let none = Map::new();
        let err = |kind, kwargs: Value| {
            LrSchedule::new(
                kind,
                1e-3,
                Warmup::Steps(0),
                10,
                kwargs.as_object().unwrap(),
            )
            .unwrap_err()
            .to_string()
        };
        assert!(err(SchedulerKind::Linear, serde_json::json!({"power": 2})).contains("\"power\""));
        assert!(err(SchedulerKind::CosineWithMinLr, serde_json::json!({})).contains("min_lr"));
        assert!(
            err(SchedulerKind::Polynomial, serde_json::json!({"lr_end": 1})).contains("lr_end")
        );
        assert!(err(SchedulerKind::WarmupStableDecay, serde_json::json!({}))
            .contains("num_decay_steps"));
        assert!(LrSchedule::new(SchedulerKind::Cosine, 1e-3, Warmup::Steps(0), 10, &none).is_ok());
        // transformers passes the constant schedules no kwargs: leftovers are ignored.
        let leftover = serde_json::json!({"num_cycles": 3});
        let leftover = leftover.as_object().unwrap();
        let c = LrSchedule::new(
            SchedulerKind::Constant,
            1e-3,
            Warmup::Steps(0),
            10,
            leftover,
        );
        assert_eq!(c.unwrap().lr(5), 1e-3);
        let huge = serde_json::json!({"num_decay_steps": 1e300});
        assert!(err(SchedulerKind::WarmupStableDecay, huge).contains("exceed"));
    }

    #[test]
    fn min_lr_floor_and_restarts() {
        let m = with(
            SchedulerKind::CosineWithMinLr,
            Warmup::Steps(0),
            10,
            serde_json::json!({"min_lr_rate": 0.1}),
        );
        assert!((m.lr(0) - 1.0).abs() < 1e-12);
        assert!((m.lr(5) - 0.55).abs() < 1e-12);
        let r = with(
            SchedulerKind::CosineWithRestarts,
            Warmup::Steps(0),
            10,
            serde_json::json!({"num_cycles": 2}),
        );
        assert!((r.lr(5) - 1.0).abs() < 1e-12, "restarts at half way");
        assert!((r.lr(10)).abs() < 1e-12);
    }
}
