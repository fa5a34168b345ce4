#!/usr/bin/env python3
"""Writes the fuzzers' seed inputs into fuzz/seeds/<target>/: tiny valid files, no dependencies.

Run from anywhere: python3 fuzz/make_seeds.py
"""

import json
import struct
from pathlib import Path

SEEDS = Path(__file__).resolve().parent / "seeds"


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


# --- safetensors: 8-byte header length, JSON header, tensor data -----------------------------

def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, raw bytes)]"""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(*xs):
    return struct.pack(f"<{len(xs)}f", *xs)


def f16(*xs):
    return struct.pack(f"<{len(xs)}e", *xs)


write("safetensors", "lora_pair.safetensors", safetensors(
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "F32", [2, 4], f32(*[0.1 * i for i in range(8)])),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "F32", [4, 2], f32(*[0.0] * 8)),
    ],
    {"format": "pt"},
))
write("safetensors", "dtypes.safetensors", safetensors([
    ("a.f16", "F16", [3], f16(1.0, -2.0, 0.5)),
    ("b.bf16", "BF16", [2, 1], bytes([0x80, 0x3F, 0x00, 0xC0])),
    ("c.i64", "I64", [2], struct.pack("<2q", 7, -1)),
    ("d.u8", "U8", [4], bytes([1, 2, 3, 4])),
    ("e.f64", "F64", [1], struct.pack("<d", 3.5)),
    ("f.empty", "F32", [0, 3], b""),
    ("g.scalar", "F32", [], f32(2.0)),
]))

# --- GGUF (v3): header, metadata key/values, tensor infos, aligned tensor data ----------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gval(ty, v):
    if ty == STRING:
        return gstr(v)
    if ty == ARRAY:
        elem, items = v
        return struct.pack("<IQ", elem, len(items)) + b"".join(gval(elem, x) for x in items)
    return struct.pack("<" + {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f",
                              BOOL: "?", U64: "Q", I64: "q", F64: "d"}[ty], v)


GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0 = 0, 1, 2, 8


def q8_0(rows, cols):
    # Blocks of 32: f16 scale, 32 int8.
    return b"".join(f16(0.01) + bytes((i * 7 + j) % 256 for j in range(32))
                    for i in range(rows * cols // 32))


def q4_0(rows, cols):
    # Blocks of 32: f16 scale, 16 bytes of nibbles.
    return b"".join(f16(0.02) + bytes((i + j * 17) % 256 for j in range(16)) for i in range(rows * cols // 32))


def gguf(metadata, tensors, alignment=32):
    """metadata: [(key, type, value)]; tensors: [(name, ggml type, HF-order shape, raw bytes)]"""
    out = struct.pack("<IIQQ", 0x46554747, 3, len(tensors), len(metadata))
    for key, ty, v in metadata:
        out += gstr(key) + struct.pack("<I", ty) + gval(ty, v)
    offset, blobs = 0, []
    for name, ty, shape, raw in tensors:
        out += gstr(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", ty, offset)
        pad = -len(raw) % alignment
        blobs.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    out += b"\0" * (-len(out) % alignment)
    return out + b"".join(blobs)


def tokenizer_md(tokens, merges, pre, types=None, extra=()):
    md = [
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.pre", STRING, pre),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
        ("tokenizer.ggml.merges", ARRAY, (STRING, merges)),
        ("tokenizer.ggml.bos_token_id", U32, len(tokens) - 2),
        ("tokenizer.ggml.eos_token_id", U32, len(tokens) - 1),
    ]
    if types is not None:
        md.append(("tokenizer.ggml.token_type", ARRAY, (I32, types)))
    return md + list(extra)


# Llama layout: hidden 32, 4 heads (2 kv heads), 1 layer, quantized q/k/up, f32 norms.
tokens = ["H", "e", "l", "o", "Ġ", "w", "r", "d", "1", "He", "ll", "Hell", "<|begin_of_text|>", "<|im_end|>"]
vocab, hidden, inter = len(tokens), 32, 4
write("gguf", "llama_q8_q4.gguf", gguf(
    [
        ("general.architecture", STRING, "llama"),
        ("general.alignment", U32, 32),
        ("llama.embedding_length", U32, hidden),
        ("llama.attention.head_count", U32, 4),
        ("llama.attention.head_count_kv", U32, 2),
        ("llama.block_count", U32, 1),
        ("llama.context_length", U32, 64),
        ("llama.rope.dimension_count", U32, 8),
        ("llama.rope.freq_base", F32, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
    ] + tokenizer_md(tokens, ["H e", "l l", "He ll"], "llama-bpe", [1] * (vocab - 2) + [3, 3], [
        ("tokenizer.ggml.add_bos_token", BOOL, True),
        ("tokenizer.chat_template", STRING, "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"),
    ]),
    [
        ("token_embd.weight", GGML_F16, [vocab, hidden], f16(*[((i % 11) - 5) / 10 for i in range(vocab * hidden)])),
        ("blk.0.attn_q.weight", GGML_Q8_0, [hidden, hidden], q8_0(hidden, hidden)),
        ("blk.0.attn_k.weight", GGML_Q4_0, [16, hidden], q4_0(16, hidden)),
        ("blk.0.ffn_up.weight", GGML_Q8_0, [inter, hidden], q8_0(inter, hidden)),
        ("blk.0.attn_norm.weight", GGML_F32, [hidden], f32(*[1.0] * hidden)),
        ("output_norm.weight", GGML_F32, [hidden], f32(*[1.0] * hidden)),
    ],
))

# Qwen2 layout: hidden 4, f32 throughout, tied embeddings, NFC normalizer, eos/pad/unk ids.
tokens = ["a", "b", "ab", "Ġ", "<unk>", "<|im_start|>", "<|im_end|>"]
write("gguf", "qwen2_f32.gguf", gguf(
    [
        ("general.architecture", STRING, "qwen2"),
        ("qwen2.embedding_length", U32, 4),
        ("qwen2.attention.head_count", U32, 2),
        ("qwen2.block_count", U32, 1),
        ("qwen2.context_length", U32, 32),
    ] + tokenizer_md(tokens, ["a b"], "qwen2", [1, 1, 1, 1, 2, 3, 3], [
        ("tokenizer.ggml.padding_token_id", U32, 6),
        ("tokenizer.ggml.unknown_token_id", U32, 4),
        ("tokenizer.ggml.add_eos_token", BOOL, False),
    ]),
    [
        ("token_embd.weight", GGML_F32, [len(tokens), 4], f32(*[i / 28 for i in range(len(tokens) * 4)])),
        ("blk.0.ffn_up.weight", GGML_F32, [2, 4], f32(*[0.5] * 8)),
        ("blk.0.attn_q.weight", GGML_F32, [4, 4], f32(*range(16))),
    ],
    alignment=32,
))

# --- adapter_config.json: one per method, as PEFT writes them ---------------------------------

write("adapter_config", "lora.json", json.dumps({
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": None, "bias": "none",
    "use_rslora": True, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
    "rank_pattern": {"q_proj": 2, "model.layers.1.mlp.down_proj": 8}, "alpha_pattern": {"v_proj": 16},
    "layers_to_transform": None, "layer_replication": None, "megatron_core": "megatron.core",
    "inference_mode": True, "fan_in_fan_out": False, "base_model_name_or_path": "tiny",
}, indent=2, sort_keys=True))
write("adapter_config", "lora_regex.json", json.dumps({
    "peft_type": "LORA", "r": 8, "lora_alpha": 16.5, "target_modules": r".*\.(q|k|v|o)_proj",
    "exclude_modules": ["model.layers.0.self_attn.o_proj"], "use_dora": True, "bias": "lora_only",
    "init_lora_weights": "gaussian",
}, indent=2, sort_keys=True))
write("adapter_config", "lora_all_linear.json", json.dumps({
    "target_modules": "all-linear", "r": 2, "lora_alpha": 4, "exclude_modules": "model\\.layers\\.1\\..*",
}))
write("adapter_config", "ia3.json", json.dumps({
    "peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["down_proj", "k_proj", "v_proj"],
    "feedforward_modules": ["down_proj"], "exclude_modules": None, "fan_in_fan_out": False,
    "init_ia3_weights": True, "modules_to_save": None, "inference_mode": True,
}, indent=2, sort_keys=True))
write("adapter_config", "bottleneck.json", json.dumps({
    "peft_type": "BOTTLENECK", "config": "houlsby", "reduction_factor": 16, "non_linearity": "swish",
    "mh_adapter": True, "output_adapter": True, "init_scale": 0.01,
}, indent=2, sort_keys=True))
write("adapter_config", "prompt_tuning.json", json.dumps({
    "peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8, "token_dim": 576, "num_layers": 30,
    "num_attention_heads": 9, "num_transformer_submodules": 1, "prompt_tuning_init": "TEXT",
    "prompt_tuning_init_text": "Classify the review:",
}, indent=2, sort_keys=True))
write("adapter_config", "prefix_tuning.json", json.dumps({
    "peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "token_dim": 192, "num_layers": 30,
    "prefix_projection": True, "encoder_hidden_size": 64,
}, indent=2, sort_keys=True))
