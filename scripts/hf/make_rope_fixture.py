"""RoPE inverse frequencies and attention factors of transformers' YaRN, for
crates/peft-models/tests/rope.rs.

Writes crates/peft-models/tests/fixtures/yarn.json: for each case, a Qwen3 config.json and
the inverse frequencies and cos/sin scale transformers computes from it (Qwen 3's 128k
setting, and cases for each optional setting: betas, truncate, DeepSeek's mscale pair, an
explicit attention factor, a factor left to the context's growth).

    .venv/bin/python scripts/hf/make_rope_fixture.py
"""

import json
import pathlib

from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2)
CASES = {
    "qwen3_128k": dict(head_dim=128, max_position_embeddings=131072, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
        "original_max_position_embeddings": 32768}),
    "betas_untruncated": dict(head_dim=64, max_position_embeddings=8192, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.5,
        "original_max_position_embeddings": 2048, "beta_fast": 16, "beta_slow": 2,
        "truncate": False}),
    "mscale": dict(head_dim=32, max_position_embeddings=4096, rope_parameters={
        "rope_type": "yarn", "rope_theta": 500.0, "factor": 8.0,
        "original_max_position_embeddings": 512, "mscale": 0.707, "mscale_all_dim": 1.0}),
    # The older `rope_scaling` spelling, with the factor left to max / original.
    "factor_from_context": dict(head_dim=16, max_position_embeddings=256, rope_theta=100.0,
                                rope_scaling={"type": "yarn", "factor": None,
                                              "original_max_position_embeddings": 64,
                                              "attention_factor": 1.25}),
}

out = {}
for name, settings in CASES.items():
    config = {"model_type": "qwen3", **COMMON, **settings}
    hf = Qwen3Config(**COMMON, **settings)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    out[name] = {"config": config, "inv_freq": inv_freq.tolist(),
                 "attention_factor": attention_factor}
path = pathlib.Path("crates/peft-models/tests/fixtures/yarn.json")
path.write_text(json.dumps(out, indent=1) + "\n")
print("written", path, list(out))
