//! LoRA (with rsLoRA scaling): `y = W x + s · B A dropout(x)`.

pub mod combine;
pub mod config;
pub mod experts;
pub mod gguf;
pub mod init;
pub mod layer;
