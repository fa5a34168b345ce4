//! Base models: the Llama family, loaded from HF folders or GGUF files.

pub mod chat_template;
pub mod config;
pub mod gguf;
pub mod hub;
pub mod io;
pub mod llama;
pub mod loader;
pub mod save;
pub mod shapes;
pub mod testing;
pub mod tokenizer;

pub use config::LlamaConfig;
pub use llama::{
    BlockAdapter, EmbeddingLora, FeedForward, KvCache, Linear, LinearAdapter, Llama, LowRank,
    MoeDeltas, Neftune, SparseMoe, TokenRows, WeightDelta,
};
pub use loader::{load_model, LoadedModel};
