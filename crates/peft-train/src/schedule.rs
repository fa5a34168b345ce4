//! Learning-rate schedules with linear warmup, as transformers' `get_scheduler` computes them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    Linear,
    Cosine,
    Constant,
}

#[derive(Debug, Clone)]
pub struct LrSchedule {
    pub kind: SchedulerKind,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    /// `warmup_ratio` of the total optimizer steps, rounded up (transformers' rule).
    pub fn new(kind: SchedulerKind, base_lr: f64, warmup_ratio: f64, total_steps: usize) -> Self {
        let warmup_steps = (warmup_ratio * total_steps as f64).ceil() as usize;
        Self {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
        }
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / decay_steps;
        let factor = match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::Linear => (1.0 - progress).max(0.0),
            SchedulerKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0),
        };
        self.base_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = LrSchedule::new(SchedulerKind::Linear, 1.0, 0.1, 100);
        assert_eq!(s.warmup_steps, 10);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(55) - 0.5).abs() < 1e-12);
        let c = LrSchedule::new(SchedulerKind::Cosine, 2.0, 0.0, 10);
        assert!((c.lr(0) - 2.0).abs() < 1e-12);
        assert!((c.lr(5) - 1.0).abs() < 1e-12);
        let k = LrSchedule::new(SchedulerKind::Constant, 3.0, 0.03, 100);
        assert_eq!(k.lr(50), 3.0);
    }
}
