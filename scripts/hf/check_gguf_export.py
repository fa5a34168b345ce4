"""Checks `peft merge --output X.gguf` against llama.cpp itself.

For a small random model of each architecture peft-rs writes (Llama with Llama 3 rope scaling
and attention biases, Mistral, Qwen2, Qwen3, Gemma 3 with five sliding-window layers and one
global, Gemma 2 with its soft caps, SmolLM3 with a layer without RoPE, the mixture-of-experts
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss, GLM-4.5 and ERNIE 4.5 MoE; DeepSeek-V3,
GLM-4.7-Flash and DeepSeek-V2's latent attention), saved by transformers with SmolLM2's
tokenizer:
1. `peft merge --model DIR --output ours.gguf --dtype f32`, and llama.cpp's own
   `convert_hf_to_gguf.py DIR --outtype f32`: every tensor (name, type, shape, values) and every
   non-`general.*` metadata value must be equal;
2. llama.cpp's `llama-simple` on ours.gguf must generate (greedy) the same text as
   `peft generate --model DIR`.
Then the same for the SmolLM2 GGUF converted to f16 and q8_0 (llama-simple against
`peft generate` on the written file); for a LoRA adapter written by `peft export-lora` (against
convert_lora_to_gguf.py, llama.cpp applying it, and llama-export-lora merging it); for the
k-quant mixes (against llama-quantize); and for
SentencePiece tokenizers: a tiny model carrying
the Llama 2 / Phi-3 vocabulary of llama.cpp's test files is read and written by peft, and
llama.cpp's `llama-tokenize` must give the written file's test texts the ids the Hugging Face
tokenizer gives them.

llama.cpp comes from the llama-cpp-python sdist on PyPI (it vendors llama.cpp), built on the CPU:

    curl -sLO <llama_cpp_python-X.tar.gz from https://pypi.org/simple/llama-cpp-python/>
    tar xzf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp
    pip install cmake ninja   # into any venv
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
    ninja -C build llama-simple llama-tokenize llama-completion llama-export-lora llama-quantize

    .venv/bin/pip install sentencepiece   # convert_hf_to_gguf imports it
    .venv/bin/python scripts/hf/check_gguf_export.py --llama-cpp PATH/TO/llama.cpp \
        [--peft target/release/peft]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import (AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig, GraniteConfig, GraniteForCausalLM, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Olmo2Config,
                          Olmo2ForCausalLM, Olmo3Config, Olmo3ForCausalLM, Phi3Config,
                          Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM, MixtralConfig,
                          MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, GptOssConfig,
                          GptOssForCausalLM, Ernie4_5Config, Ernie4_5ForCausalLM,
                          Glm4MoeConfig, Glm4MoeForCausalLM, Ernie4_5_MoeConfig,
                          Ernie4_5_MoeForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                          DeepseekV2Config, DeepseekV2ForCausalLM, Glm4MoeLiteConfig,
                          Glm4MoeLiteForCausalLM)

ap = argparse.ArgumentParser()
ap.add_argument("--llama-cpp", required=True)
ap.add_argument("--peft", default=os.path.expanduser("~/.cache/peft-rs-target/release/peft"))
ap.add_argument("--smollm-dir", default="models/smollm2-135m-instruct")
ap.add_argument("--smollm-gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--only", help="check only these architectures (comma-separated), none of the "
                "SmolLM2, LoRA and tokenizer checks")
args = ap.parse_args()
sys.path.insert(0, os.path.join(args.llama_cpp, "gguf-py"))
import gguf  # noqa: E402

bin_dir = os.path.join(args.llama_cpp, "build", "bin")
PROMPT = "The capital of France is"

common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
models = {
    "llama": (LlamaForCausalLM, LlamaConfig(
        **common, attention_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})),
    "mistral": (MistralForCausalLM, MistralConfig(**common, tie_word_embeddings=False)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=True)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)),
    # Qwen 3 with YaRN, as Qwen's long-context recipe sets it (with the weights below, the 16
    # generated tokens depend on it).
    "qwen3_yarn": (Qwen3ForCausalLM, Qwen3Config(
        **common, head_dim=32, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 512})),
    # SmolLM3: every fourth layer without RoPE (with the weights below, the 16 generated tokens
    # depend on it).
    "smollm3": (SmolLM3ForCausalLM, SmolLM3Config(
        **{**common, "num_hidden_layers": 4}, pad_token_id=0, tie_word_embeddings=True)),
    # Granite: its multipliers of the scores, embeddings, residual branches and logits.
    "granite": (GraniteForCausalLM, GraniteConfig(
        **common, tie_word_embeddings=True, pad_token_id=0, attention_multiplier=0.2,
        embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0)),
    # OLMo 2: output norms instead of input norms, q/k norms over the whole projections.
    "olmo2": (Olmo2ForCausalLM, Olmo2Config(**common, tie_word_embeddings=False, pad_token_id=0)),
    # OLMo 3: OLMo 2's layers, three of four sliding (a window of 4 over the 16 generated
    # tokens), YaRN on the global one.
    "olmo3": (Olmo3ForCausalLM, Olmo3Config(
        **{**common, "num_hidden_layers": 4}, tie_word_embeddings=False, pad_token_id=0,
        sliding_window=4,
        rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 10000.0,
                                            "factor": 4.0, "original_max_position_embeddings": 512},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    # Gemma 2: every other layer sliding (a window of 4 over the 16 generated tokens), scores
    # scaled by head_dim^-1/2 as llama.cpp takes them, soft caps small enough to change the text.
    "gemma2": (Gemma2ForCausalLM, Gemma2Config(
        **common, head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
        attn_logit_softcapping=1.0, final_logit_softcapping=3.0)),
    # A window of 4 over the 16 generated tokens; llama.cpp's layout (every sixth layer global,
    # scores scaled by head_dim^-1/2).
    "gemma3_text": (Gemma3ForCausalLM, Gemma3TextConfig(
        **{**common, "num_hidden_layers": 6}, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=4)),
    # Phi-3: fused projections, LongRoPE (short factors: the text stays within the original
    # 64 positions, where llama.cpp takes them too) and Phi-3 mini's window (llama.cpp turns
    # Phi-3's sliding window off: only one past the text generates alike).
    "phi3": (Phi3ForCausalLM, Phi3Config(
        **common, sliding_window=2047, tie_word_embeddings=False, pad_token_id=0,
        original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0 + 0.05 * i for i in range(8)],
                         "long_factor": [1.0 + 0.9 * i for i in range(8)],
                         "original_max_position_embeddings": 64})),
    # Phi-4-mini's partial rotary (12 of 16 head dims rotated), tied embeddings, no rope
    # scaling.
    "phi3_partial": (Phi3ForCausalLM, Phi3Config(
        **common, tie_word_embeddings=True, pad_token_id=0, original_max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.75})),
    # Phi-3 mini 4k's and Phi-4's shape: no rope scaling.
    "phi3_4k": (Phi3ForCausalLM, Phi3Config(
        **common, sliding_window=2047, tie_word_embeddings=False, pad_token_id=0,
        original_max_position_embeddings=2048)),
    # The mixture-of-experts families, as llama.cpp runs them: Mixtral (its llama with
    # experts, renormalized), Qwen2-MoE (a gated shared expert, not renormalized), Qwen3-MoE
    # (renormalized, as its released models say) and OLMoE (not renormalized).
    "mixtral": (MixtralForCausalLM, MixtralConfig(
        **common, tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig(
        **common, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64)),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **common, head_dim=32, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=32, norm_topk_prob=True)),
    # OLMoE without grouped keys, as released (llama.cpp's olmoe norms keys of the model's width).
    "olmoe": (OlmoeForCausalLM, OlmoeConfig(
        **{**common, "num_key_value_heads": 4}, tie_word_embeddings=False, pad_token_id=0,
        num_experts=4, num_experts_per_tok=2)),
    # gpt-oss: attention sinks, biases, every other layer sliding (a window of 4 over the 16
    # generated tokens), YaRN, 4 experts with biases, 2 per token, the clamped SwiGLU.
    "gpt_oss": (GptOssForCausalLM, GptOssConfig(
        **common, head_dim=16, tie_word_embeddings=False, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4)),
    # ERNIE 4.5: RoPE over adjacent dims (llama.cpp's normal RoPE), tied embeddings.
    "ernie4_5": (Ernie4_5ForCausalLM, Ernie4_5Config(**common, head_dim=32)),
    # GLM-4.5: sigmoid routing scaled by 2.5 with a correction bias (random here), a shared
    # expert, the first layer dense, q/k norms and biases, half of the head dims rotated.
    # Three layers: two with experts. Without its multi-token-prediction layer (which peft
    # drops as transformers does): the converter's --no-mtp.
    "glm4_moe": (Glm4MoeForCausalLM, Glm4MoeConfig(
        **{**common, "num_hidden_layers": 3}, head_dim=32, tie_word_embeddings=False,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        routed_scaling_factor=2.5, first_k_dense_replace=1, use_qk_norm=True,
        attention_bias=True)),
    # ERNIE 4.5 MoE: a softmax router whose choice a bias corrects (random here), 8 experts, 2
    # per token, two shared experts of 32 (llama.cpp's converter writes their size as
    # intermediate_size / num_key_value_heads, as the released models have it), the first
    # layer dense, RoPE over adjacent dims.
    "ernie4_5_moe": (Ernie4_5_MoeForCausalLM, Ernie4_5_MoeConfig(
        **{**common, "num_hidden_layers": 3}, head_dim=32, moe_num_experts=8, moe_k=2,
        moe_intermediate_size=32, moe_num_shared_experts=2, moe_layer_start_index=1)),
    # Latent attention as llama.cpp's deepseek2: DeepSeek-V3 (low-rank queries, values
    # narrower than the heads, sigmoid routing in two groups), GLM-4.7-Flash (values wider
    # than the unrotated dims) and DeepSeek-V2 (plain queries, a softmax router, greedy).
    # scoring_func (and GLM-4.7-Flash's first_k_dense_replace, which its release names beside
    # mlp_layer_types), which transformers 5 does not save, are named so that the converter
    # writes the gating function and the dense layers (peft writes them from what it reads).
    "deepseek_v3": (DeepseekV3ForCausalLM, DeepseekV3Config(
        **{**common, "num_hidden_layers": 3, "num_key_value_heads": 4},
        tie_word_embeddings=False, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, n_shared_experts=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, first_k_dense_replace=1, scoring_func="sigmoid")),
    "glm4_moe_lite": (Glm4MoeLiteForCausalLM, Glm4MoeLiteConfig(
        **{**common, "num_hidden_layers": 3, "num_key_value_heads": 4},
        tie_word_embeddings=False, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=48, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, n_shared_experts=1, routed_scaling_factor=1.8,
        mlp_layer_types=["dense", "sparse", "sparse"], scoring_func="sigmoid",
        first_k_dense_replace=1)),
    # DeepSeek-V2-Lite's 27 layers: llama.cpp reads plain queries only at that count.
    "deepseek_v2": (DeepseekV2ForCausalLM, DeepseekV2Config(
        **{**common, "num_hidden_layers": 27, "num_key_value_heads": 4},
        tie_word_embeddings=False, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, n_shared_experts=2, routed_scaling_factor=2.0,
        first_k_dense_replace=1, scoring_func="softmax")),
}
if args.only:
    models = {name: models[name] for name in args.only.split(",")}


MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "glm4_moe", "ernie4_5_moe",
       "deepseek_v3", "glm4_moe_lite", "deepseek_v2"}
# llama.cpp's deepseek2 (latent attention).
LATENT = {"deepseek_v3", "glm4_moe_lite", "deepseek_v2"}
# Converter flags by model: GLM-4.5's file without the multi-token-prediction layer.
CONVERT_FLAGS = {"glm4_moe": ["--no-mtp"]}

# Models whose text llama.cpp computes otherwise than transformers (and peft) from the file its
# own converter writes: Phi-3's LongRoPE (measured with llama.cpp from llama-cpp-python 0.3.36;
# without LongRoPE, phi3_4k, the texts are alike). Their generation is reported, not failed.
APART_IN_LLAMA_CPP = {"phi3"}

# llama.cpp names a pre-tokenizer by a hash of its tokens, so SmolLM2's vocabulary under Qwen2's
# pre-tokenizer has no name there: its converter then gets the name llama.cpp gives Qwen models.
PRE_NAMES = {"llama": None, "mistral": None, "qwen2": "qwen2", "qwen3": "qwen2", "qwen3_yarn": "qwen2",
             "smollm3": None, "granite": None, "olmo2": None, "olmo3": None,
             "gemma2": None, "gemma3_text": None, "phi3": None, "phi3_4k": None,
             "phi3_partial": None, "mixtral": None, "qwen2_moe": "qwen2", "qwen3_moe": "qwen2",
             "olmoe": None, "gpt_oss": None, "ernie4_5": None, "glm4_moe": None,
             "ernie4_5_moe": None, "deepseek_v3": None, "glm4_moe_lite": None,
             "deepseek_v2": None}
CONVERT = """
import runpy, sys
llama_cpp, fallback = sys.argv[1], sys.argv[2]
sys.path[:0] = [llama_cpp, llama_cpp + "/gguf-py"]
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        if fallback == "None":
            raise
        return fallback
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
# Gemma 2's converter reads tokenizer.model (SentencePiece) only; these models carry SmolLM2's
# byte-level BPE tokenizer.json, read as Gemma 3's converter reads one.
from conversion import gemma
gemma.Gemma2Model.set_vocab = lambda self: self._set_vocab_gpt2()
# ERNIE 4.5's reads tokenizer.model only too.
from conversion import ernie
ernie.Ernie4_5Model.set_vocab = lambda self: self._set_vocab_gpt2()
ernie.Ernie4_5MoeModel.set_vocab = lambda self: self._set_vocab_gpt2()
# GLM's names GLM's own special tokens, which SmolLM2's vocabulary lacks.
from conversion import glm
glm.Glm4MoeModel.set_vocab = lambda self: self._set_vocab_gpt2()
glm.Glm4MoeLiteModel.set_vocab = lambda self: self._set_vocab_gpt2()
sys.argv = [llama_cpp + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def llama_simple(path, n):
    env = dict(os.environ, LD_LIBRARY_PATH=bin_dir)
    out = run([os.path.join(bin_dir, "llama-simple"), "-m", path, "-n", str(n), PROMPT], env=env)
    # llama-simple ends its output with a newline of its own.
    return out.removeprefix(PROMPT).removesuffix("\n")


def peft_generate(model, n):
    return run([args.peft, "generate", "--model", model, "--prompt", PROMPT,
                "--max-new-tokens", str(n)]).removesuffix("\n")


def compare(ours, ref):
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    problems = []
    if set(ta) != set(tb):
        problems.append(f"tensors only ours {sorted(set(ta) - set(tb))}, "
                        f"only llama.cpp's {sorted(set(tb) - set(ta))}")
    for n in sorted(set(ta) & set(tb)):
        x, y = ta[n], tb[n]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            problems.append(f"{n}: {x.tensor_type.name}{list(x.shape)} vs "
                            f"{y.tensor_type.name}{list(y.shape)}")
        elif not np.array_equal(x.data, y.data):
            d = np.abs(x.data.astype(np.float64) - y.data.astype(np.float64)).max()
            problems.append(f"{n}: values differ by {d}")
    keys = lambda r: {k for k in r.fields if not k.startswith(("GGUF.", "general."))}
    ka, kb = keys(a), keys(b)
    # We always write whether the tokenizer adds BOS / EOS; the converter only where the
    # tokenizer's config says so (llama-simple's generation checks the value).
    extra = ka - kb - {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"}
    if extra or kb - ka:
        problems.append(f"metadata only ours {sorted(extra)}, only llama.cpp's {sorted(kb - ka)}")
    for k in sorted(ka & kb):
        x, y = a.fields[k], b.fields[k]
        if x.types[0] == gguf.GGUFValueType.ARRAY:
            same = len(x.data) == len(y.data) and all(
                x.contents(i) == y.contents(i) for i in range(len(x.data)))
        else:
            same = x.contents() == y.contents() and x.types == y.types
        if not same:
            show = lambda f: f.contents() if f.types[0] != gguf.GGUFValueType.ARRAY else "[...]"
            problems.append(f"metadata {k} differs: {show(x)!r} vs {show(y)!r}")
    return problems, len(ta)


def write_tiny_llama(vocab_file, out):
    """A 1-layer random Llama GGUF with the tokenizer metadata of llama.cpp's vocab-only file."""
    src = gguf.GGUFReader(vocab_file)
    w = gguf.GGUFWriter(out, "llama")
    for k, f in src.fields.items():
        if k.startswith("tokenizer.") and not k.startswith("GGUF."):
            vt = f.types[0]
            if vt == gguf.GGUFValueType.ARRAY:
                w.add_array(k, [f.contents(i) for i in range(len(f.data))])
            elif vt == gguf.GGUFValueType.STRING:
                w.add_string(k, f.contents())
            else:
                w.add_key_value(k, f.contents(), vt)
    n_vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    hidden, ff, heads = 64, 128, 4
    for key, value in [("block_count", 1), ("context_length", 512), ("embedding_length", hidden),
                       ("feed_forward_length", ff), ("attention.head_count", heads),
                       ("attention.head_count_kv", heads), ("rope.dimension_count", hidden // heads)]:
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    rng = np.random.default_rng(0)
    mat = lambda *shape: (0.05 * rng.standard_normal(shape)).astype(np.float32)
    w.add_tensor("token_embd.weight", mat(n_vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", mat(n_vocab, hidden))
    for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)),
                        ("attn_v", (hidden, hidden)), ("attn_output", (hidden, hidden)),
                        ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)),
                        ("ffn_down", (hidden, ff))]:
        w.add_tensor(f"blk.0.{name}.weight", mat(*shape))
    for name in ["attn_norm", "ffn_norm"]:
        w.add_tensor(f"blk.0.{name}.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


failed = False
with tempfile.TemporaryDirectory() as tmp:
    for name, (cls, cfg) in models.items():
        # llama.cpp gives a model whose name says phi3 the attributes of Phi-3's special tokens
        # (</s>, <s>), which SmolLM2's vocabulary lacks: the files, whose names become the
        # model's, are named otherwise.
        stem = name.replace("phi3", "tiny-p3")
        d = os.path.join(tmp, stem)
        torch.manual_seed(0)
        model = cls(cfg).eval()
        with torch.no_grad():
            # Gemma's norms scale by 1 + w; its weights a little larger, so that the text
            # depends on the window (without it transformers generates another).
            gemma = name.startswith("gemma")
            one, std = (0.0, 0.12) if gemma else (1.0, 0.08)
            embed_std = std
            if name in ("smollm3", "qwen3_yarn", "olmo3"):
                # With larger layer weights the text depends on the layer without RoPE (at 0.25
                # llama.cpp's text parts from ours at a near tie: logits 0.003 apart).
                std = 0.3
            if name == "granite":
                # With these, the text depends on the score, embedding and residual multipliers.
                std, embed_std = 0.3, 0.02
            if name == "phi3_partial":
                # Tied embeddings small, so that the text depends on the rotated dims.
                std, embed_std = 0.2, 0.02
            if name == "glm4_moe":
                # At 0.08 the greedy text meets a near tie (logits 2e-4 apart) at its 15th token.
                std = 0.15
            if name == "glm4_moe_lite":
                # At 0.08 llama.cpp's text parts from ours (and transformers') at a near tie
                # (logits 0.02 apart at the 4th token).
                std = 0.15
            if name == "ernie4_5_moe":
                # At 0.08 the text repeats two tokens, which tells little.
                std = 0.2
            if name == "gemma2":
                # Its tied embeddings small and the layers' weights large: otherwise the
                # embedding dominates and the model repeats a token whatever the window or
                # the score cap (with these, the text depends on both).
                std, embed_std = 0.3, 0.01
            for pname, p in model.named_parameters():
                p.copy_((one + 0.2 * torch.randn_like(p)) if "norm" in pname
                        else (embed_std if "embed" in pname else std) * torch.randn_like(p))
            for bname, b in [*model.named_buffers(), *model.named_parameters()]:
                if bname.endswith("e_score_correction_bias"):
                    b.copy_((0.5 if name == "glm4_moe" else 0.1) * torch.randn_like(b))
        model.save_pretrained(d)
        for f in ["tokenizer.json", "chat_template.jinja"]:
            shutil.copy(os.path.join(args.smollm_dir, f), d)
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            tok_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                          "unk_token": "<|endoftext|>"}
            if name.startswith("gemma") or name == "olmoe":
                # Gemma's own tokenizer class would rebuild SmolLM2's vocabulary as SentencePiece;
                # OLMoE's (GPT-NeoX's) would add a padding token past the model's vocabulary.
                tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
            json.dump(tok_config, f)
        # The tokenizer as transformers builds it for this model type (for Qwen models, Qwen2's
        # pre-tokenizer over SmolLM2's vocabulary), saved as the model's tokenizer.json.
        AutoTokenizer.from_pretrained(d).save_pretrained(d)
        if name.startswith("phi3"):
            # transformers saves Phi-3's own class; the converter reads this one (Phi-4's) as
            # byte-level BPE.
            path = os.path.join(d, "tokenizer_config.json")
            with open(path) as f:
                saved = json.load(f)
            saved["tokenizer_class"] = "GPT2Tokenizer"
            with open(path, "w") as f:
                json.dump(saved, f)
        ours, ref = os.path.join(tmp, f"{stem}.gguf"), os.path.join(tmp, f"{stem}-ref.gguf")
        run([args.peft, "merge", "--model", d, "--output", ours, "--dtype", "f32"])
        run([sys.executable, "-c", CONVERT, args.llama_cpp, str(PRE_NAMES[name]), d, "--outtype",
             "f32", "--outfile", ref, *CONVERT_FLAGS.get(name, [])])
        problems, n = compare(ours, ref)
        ours_text, peft_text = llama_simple(ours, 16), peft_generate(d, 16)
        if ours_text != peft_text and name in APART_IN_LLAMA_CPP:
            print(f"{name}: llama.cpp generates {ours_text!r} from our file and "
                  f"{llama_simple(ref, 16)!r} from its converter's; peft {peft_text!r}, "
                  f"as transformers does")
        elif ours_text != peft_text:
            problems.append(f"llama.cpp generates {ours_text!r}, peft {peft_text!r}")
        # The mixture-of-experts files in f16 and q8_0 too (their routers and gpt-oss's
        # experts' biases stay f32, as the converter keeps them and llama.cpp reads them):
        # equal to the converter's, and llama.cpp runs the f16 one (its q8_0 experts' kernel
        # stops with an illegal instruction on this machine's CPU, the converter's file too).
        for ty in (["f16", "q8_0"] if name in MOE else []):
            ours_ty, ref_ty = (os.path.join(tmp, f"{stem}-{ty}{s}.gguf") for s in ["", "-ref"])
            run([args.peft, "merge", "--model", d, "--output", ours_ty, "--dtype", ty])
            run([sys.executable, "-c", CONVERT, args.llama_cpp, str(PRE_NAMES[name]), d,
                 "--outtype", ty, "--outfile", ref_ty, *CONVERT_FLAGS.get(name, [])])
            problems += [f"{ty}: {p}" for p in compare(ours_ty, ref_ty)[0]]
            if ty == "f16" and name in LATENT:
                # llama.cpp's CPU backend schedules no f16 latent attention (GGML_ASSERT
                # cur_backend_id != -1, the converter's file too): reported, not failed.
                env = dict(os.environ, LD_LIBRARY_PATH=bin_dir)
                runs = [subprocess.run([os.path.join(bin_dir, "llama-simple"), "-m", f, "-n",
                                        "4", PROMPT], capture_output=True, env=env).returncode
                        for f in (ours_ty, ref_ty)]
                print(f"{name}: llama-simple on the f16 files exits {runs[0]} (ours) and "
                      f"{runs[1]} (the converter's)")
            elif ty == "f16":
                llama_simple(ours_ty, 4)
        same_text = (f"llama.cpp and peft generate {ours_text!r}" if ours_text == peft_text
                     else "the texts as above")
        also = " (f32, f16 and q8_0)" if name in MOE else ""
        print(f"{name}: {n} tensors; " + ("; ".join(problems) if problems else
              f"as convert_hf_to_gguf writes them{also}; {same_text}"))
        failed |= bool(problems)

    if args.only:
        sys.exit(1 if failed else 0)
    # llama.cpp multiplies q8_0 weights with activations quantized to 8 bits, so its greedy
    # text may part from ours after some tokens, more or less early by CPU (AVX2 or AVX-512
    # kernels): the q8_0 file is checked byte for byte against llama-quantize's below, and its
    # generation only reported here.
    for ty in ["f16", "q8_0"]:
        out = os.path.join(tmp, f"smollm-{ty}.gguf")
        run([args.peft, "merge", "--model", args.smollm_gguf, "--output", out, "--dtype", ty])
        a, b = llama_simple(out, 32), peft_generate(out, 32)
        same = a == b
        print(f"SmolLM2 {ty}: llama.cpp {'==' if same else '!='} peft generate: {a!r}"
              + ("" if same else f" vs {b!r}"))
        failed |= not same and ty == "f16"
    # q8_0 and the k-quant mixes: the SmolLM2 GGUF written as q8_0, q4_k_m and q6_k by peft
    # must equal what llama-quantize makes of the f32 file, tensor types and bytes.
    f32_file = os.path.join(tmp, "smollm-f32-for-quantize.gguf")
    run([args.peft, "merge", "--model", args.smollm_gguf, "--output", f32_file, "--dtype", "f32"])
    for ty in ["q8_0", "q4_k_m", "q6_k"]:
        ours, ref = os.path.join(tmp, f"smollm-{ty}.gguf"), os.path.join(tmp, f"ref-{ty}.gguf")
        run([args.peft, "merge", "--model", args.smollm_gguf, "--output", ours, "--dtype", ty])
        run([os.path.join(bin_dir, "llama-quantize"), f32_file, ref, ty.upper()],
            env=dict(os.environ, LD_LIBRARY_PATH=bin_dir))
        problems, n = compare(ours, ref)
        problems = [p for p in problems if "general.file_type" not in p]
        print(f"SmolLM2 {ty}: {n} tensors; " + ("; ".join(problems) if problems else
              "the tensors llama-quantize writes, bit for bit"))
        failed |= bool(problems)

    # LoRA adapters as GGUF LoRA files (`peft export-lora`): an HF PEFT adapter on SmolLM2
    # (every linear layer, random B). The file must equal convert_lora_to_gguf.py's; llama.cpp
    # applying it at run time must generate what `peft generate --adapter` does; and
    # llama-export-lora merging it must give the tensors `peft merge` writes.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    adapter = os.path.join(tmp, "lora")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(args.smollm_dir, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                           init_lora_weights=False))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.mul_(0.02)
    lora.save_pretrained(adapter)
    ours, ref = os.path.join(tmp, "lora.gguf"), os.path.join(tmp, "lora-ref.gguf")
    run([args.peft, "export-lora", "--model", args.smollm_dir, "--adapter", adapter,
         "--output", ours])
    run([sys.executable, os.path.join(args.llama_cpp, "convert_lora_to_gguf.py"), adapter,
         "--base", args.smollm_dir, "--outtype", "f32", "--outfile", ref],
        env=dict(os.environ, PYTHONPATH=os.path.join(args.llama_cpp, "gguf-py")))
    problems, n = compare(ours, ref)
    base_gguf = os.path.join(tmp, "smollm-f32.gguf")
    run([args.peft, "merge", "--model", args.smollm_dir, "--output", base_gguf, "--dtype", "f32"])
    env = dict(os.environ, LD_LIBRARY_PATH=bin_dir)
    text = run([os.path.join(bin_dir, "llama-completion"), "-m", base_gguf, "--lora", ours,
                "-no-cnv", "--temp", "0", "-n", "24", "-p", PROMPT], env=env)
    # llama-completion ends its output with newlines (and a note where it met EOS).
    text = text.removeprefix(PROMPT).rstrip("\n").removesuffix(" [end of text]")
    want = run([args.peft, "generate", "--model", args.smollm_dir, "--adapter", adapter,
                "--prompt", PROMPT, "--max-new-tokens", "24"]).rstrip("\n")
    if text != want:
        problems.append(f"llama.cpp with the LoRA generates {text!r}, peft {want!r}")
    merged_cpp, merged_ours = os.path.join(tmp, "m-cpp.gguf"), os.path.join(tmp, "m-ours.gguf")
    run([os.path.join(bin_dir, "llama-export-lora"), "-m", base_gguf, "--lora", ours, "-o",
         merged_cpp], env=env)
    run([args.peft, "merge", "--model", args.smollm_dir, "--adapter", adapter, "--output",
         merged_ours, "--dtype", "f32"])
    a, b = gguf.GGUFReader(merged_cpp), gguf.GGUFReader(merged_ours)
    tb = {t.name: t for t in b.tensors}
    worst = max(float(np.abs(t.data - tb[t.name].data).max()) for t in a.tensors)
    if worst > 1e-5:
        problems.append(f"llama-export-lora's merge differs from peft merge by {worst}")
    print(f"LoRA: {n} tensors; " + ("; ".join(problems) if problems else
          f"as convert_lora_to_gguf writes them; llama.cpp with it generates {text!r} as peft "
          f"does; llama-export-lora's merge is peft merge's within {worst:.1e}"))
    failed |= bool(problems)

    # SentencePiece tokenizers (Llama 2, Phi-3): a tiny random Llama carrying the vocabulary of
    # llama.cpp's own test files (models/ggml-vocab-*.gguf, with the texts and the token ids
    # the Hugging Face tokenizer gives them); peft reads it and writes it again, and llama.cpp's
    # llama-tokenize must give the expected ids on the written file.
    for vocab in ["llama-spm", "phi-3"]:
        src = os.path.join(args.llama_cpp, "models", f"ggml-vocab-{vocab}.gguf")
        tiny, ours = os.path.join(tmp, f"{vocab}-tiny.gguf"), os.path.join(tmp, f"{vocab}.gguf")
        write_tiny_llama(src, tiny)
        run([args.peft, "merge", "--model", tiny, "--output", ours, "--dtype", "f32"])
        texts = open(src + ".inp", encoding="utf-8", newline="").read().split(
            "\n__ggml_vocab_test__\n")
        expected = open(src + ".out", encoding="utf-8").read().splitlines()
        differ = 0
        for text, want in zip(texts, expected):
            if not text:
                continue  # llama-tokenize cannot take an empty prompt
            with open(os.path.join(tmp, "text.txt"), "w", encoding="utf-8", newline="") as f:
                f.write(text)
            out = run([os.path.join(bin_dir, "llama-tokenize"), "-m", ours, "-f",
                       os.path.join(tmp, "text.txt"), "--ids", "--no-bos", "--log-disable"],
                      env=dict(os.environ, LD_LIBRARY_PATH=bin_dir))
            got = [int(t) for t in out.strip().splitlines()[-1].strip("[]").split(",") if t.strip()]
            differ += got != [int(t) for t in want.split()]
        n = sum(1 for t in texts[:len(expected)] if t)
        print(f"{vocab}: llama.cpp tokenizes {n - differ} of {n} texts of the written file as HF does")
        failed |= differ > 0
sys.exit(1 if failed else 0)
