//! Supervised fine-tuning: data preparation, AdamW, learning-rate schedules and the loop.

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use data::{load_records, map_columns, parse_column_mapping, tokenize_records, Batch, Example};
pub use optim::{AdamW, OptimKind};
pub use schedule::{LrSchedule, SchedulerKind};
pub use trainer::{Interrupted, TrainArgs, TrainSummary, Trainer};
