//! Supervised fine-tuning: data preparation, AdamW, learning-rate schedules and the loop.

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

pub use data::{
    epoch_order, load_data, load_records, map_columns, pack, parse_column_mapping, split_eval,
    tokenize_records, tokenize_records_with, Batch, Example, LossOn, Tokenized, Truncation,
};
pub use optim::{AdamW, OptimKind, ParamGroup};
pub use schedule::{LrSchedule, SchedulerKind, Warmup};
pub use trainer::{Echo, Interrupted, NonFinite, TrainArgs, TrainSummary, Trainer};
