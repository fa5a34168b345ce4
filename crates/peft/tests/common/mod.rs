//! Locating the default model and the golden fixtures for integration tests.

use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The default GGUF model (fetched by scripts/fetch-model.sh). `None` means skip, unless
/// PEFT_REQUIRE_MODEL is set (CI sets it, so a missing model fails there).
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("PEFT_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("PEFT_REQUIRE_MODEL").is_none(),
        "{} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    eprintln!(
        "skipping: {} not found (run scripts/fetch-model.sh)",
        path.display()
    );
    None
}

pub fn golden_dir() -> PathBuf {
    repo_root().join("../shared/golden")
}
