#!/usr/bin/env bash
# The test suite: fetches the default model if needed, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
# Tests that need the model fail (instead of skipping) when it is missing.
export PEFT_REQUIRE_MODEL=1
# No test reaches the real Hugging Face Hub (the Hub tests run a stand-in on a local port).
export HF_HUB_OFFLINE=1
cargo test --workspace "$@"
