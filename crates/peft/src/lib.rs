//! Parameter-efficient fine-tuning: tuners (one module per method), adapter files in
//! Hugging Face PEFT's format, merging.

pub mod keys;
pub mod lora;
pub mod model;
pub mod prompt;
pub mod targets;
pub mod tuned;

pub use lora::config::LoraConfig;
pub use model::PeftModel;
pub use prompt::{PromptConfig, PromptInit, PromptModel};
pub use targets::TargetModules;
pub use tuned::Tuned;
