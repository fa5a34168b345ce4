"""Checks that peft reads llama.cpp's gpt-oss GGUF files with MXFP4 experts (GGUF type 39),
as llama.cpp's converter writes OpenAI's releases.

A small random gpt-oss whose experts are MXFP4 as OpenAI ships them (`*_blocks`, `*_scales`,
`quantization_config: mxfp4`), with SmolLM2's tokenizer, is converted by llama.cpp's
`convert_hf_to_gguf.py --outtype f32` (the experts stay MXFP4, repacked into ggml's blocks).
Then:
1. `peft logits` on that GGUF equals `peft logits` on the HF folder, and transformers' logits
   of the folder (which dequantizes the experts to bf16 on a CPU);
2. llama.cpp's `llama-simple` on the GGUF generates the same text as `peft generate` on it;
3. `peft merge` of the GGUF writes a dense GGUF that llama.cpp runs to the same text.

    /work/venv-hf/bin/python scripts/hf/check_gguf_mxfp4.py --llama-cpp PATH/TO/llama.cpp \
        [--peft ~/.cache/peft-rs-target/release/peft]
"""
import os
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM

from harness import arguments, mxfp4_experts, peft_logits, random_model, run

ap = arguments("smollm-dir")
ap.add_argument("--llama-cpp", required=True)
args = ap.parse_args()
bin_dir = os.path.join(args.llama_cpp, "build", "bin")
PROMPT = "The capital of France is"
IDS = [1, 77, 200, 5, 319, 64, 140, 12, 9, 250, 33, 44, 55, 66]


def llama_simple(path, n):
    env = dict(os.environ, LD_LIBRARY_PATH=bin_dir)
    out = run([os.path.join(bin_dir, "llama-simple"), "-m", path, "-n", str(n), PROMPT],
              env=env).stdout
    return out.removeprefix(PROMPT).removesuffix("\n")


def peft_generate(model, n):
    return run([args.peft, "generate", "--model", model, "--prompt", PROMPT,
                "--max-new-tokens", str(n)]).stdout.removesuffix("\n")


with tempfile.TemporaryDirectory() as tmp:
    d = os.path.join(tmp, "gpt-oss")
    # MXFP4 groups 32 inputs: hidden and intermediate sizes are multiples of 32.
    cfg = GptOssConfig(vocab_size=49152, hidden_size=64, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                       num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
    random_model(GptOssForCausalLM, cfg, d, args.smollm_dir)
    mxfp4_experts(d, cfg, (118, 122))

    gguf_path = os.path.join(tmp, "gpt-oss-mxfp4.gguf")
    run([sys.executable, os.path.join(args.llama_cpp, "convert_hf_to_gguf.py"), d,
         "--outtype", "f32", "--outfile", gguf_path])
    sys.path.insert(0, os.path.join(args.llama_cpp, "gguf-py"))
    import gguf  # noqa: E402
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_path).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "MXFP4", types

    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([IDS])).logits
    from_gguf = peft_logits(args.peft, gguf_path, IDS, os.path.join(tmp, "a.safetensors"))
    from_dir = peft_logits(args.peft, d, IDS, os.path.join(tmp, "b.safetensors"))
    d_dir = (from_gguf - from_dir).abs().max().item()
    d_hf = (from_gguf - want).abs().max().item()
    print(f"peft logits of the MXFP4 GGUF vs of the HF folder: max abs diff {d_dir:.2e}; "
          f"vs transformers: {d_hf:.2e} (logits up to {want.abs().max().item():.2f})")
    text_cpp, text_peft = llama_simple(gguf_path, 16), peft_generate(gguf_path, 16)
    print(f"llama.cpp generates {text_cpp!r}, peft {text_peft!r}")
    merged = os.path.join(tmp, "dense.gguf")
    run([args.peft, "merge", "--model", gguf_path, "--output", merged, "--dtype", "f32"])
    text_dense = llama_simple(merged, 16)
    print(f"llama.cpp on peft's dense GGUF of it generates {text_dense!r}")
    failed = d_dir > 1e-5 or d_hf > 1e-4 or text_cpp != text_peft or text_dense != text_cpp
    print("FAILED" if failed else "ok")
    sys.exit(1 if failed else 0)
