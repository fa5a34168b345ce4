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
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--llama-cpp", required=True)
ap.add_argument("--peft", default=os.path.expanduser("~/.cache/peft-rs-target/release/peft"))
ap.add_argument("--smollm-dir", default="models/smollm2-135m-instruct")
args = ap.parse_args()
bin_dir = os.path.join(args.llama_cpp, "build", "bin")
PROMPT = "The capital of France is"
IDS = [1, 77, 200, 5, 319, 64, 140, 12, 9, 250, 33, 44, 55, 66]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def peft_logits(model, out):
    run([args.peft, "logits", "--model", model, "--input-ids", ",".join(map(str, IDS)),
         "--out", out])
    return load_file(out)["logits"]


def llama_simple(path, n):
    env = dict(os.environ, LD_LIBRARY_PATH=bin_dir)
    out = run([os.path.join(bin_dir, "llama-simple"), "-m", path, "-n", str(n), PROMPT], env=env)
    return out.removeprefix(PROMPT).removesuffix("\n")


def peft_generate(model, n):
    return run([args.peft, "generate", "--model", model, "--prompt", PROMPT,
                "--max-new-tokens", str(n)]).removesuffix("\n")


with tempfile.TemporaryDirectory() as tmp:
    d = os.path.join(tmp, "gpt-oss")
    # MXFP4 groups 32 inputs: hidden and intermediate sizes are multiples of 32.
    cfg = GptOssConfig(vocab_size=49152, hidden_size=64, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                       num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.2 * torch.randn_like(p)) if "norm" in name
                    else 0.08 * torch.randn_like(p))
    model.save_pretrained(d)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    for layer in range(cfg.num_hidden_layers):
        for param, (rows, cols) in {"gate_up_proj": (2 * cfg.intermediate_size, cfg.hidden_size),
                                    "down_proj": (cfg.hidden_size, cfg.intermediate_size)}.items():
            name = f"model.layers.{layer}.mlp.experts.{param}"
            del tensors[name]
            e = cfg.num_local_experts
            tensors[f"{name}_blocks"] = torch.randint(0, 256, (e, rows, cols // 32, 16),
                                                      generator=gen, dtype=torch.uint8)
            tensors[f"{name}_scales"] = torch.randint(118, 122, (e, rows, cols // 32),
                                                      generator=gen, dtype=torch.uint8)
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4"}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(args.smollm_dir, f), d)

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
    from_gguf = peft_logits(gguf_path, os.path.join(tmp, "a.safetensors"))
    from_dir = peft_logits(d, os.path.join(tmp, "b.safetensors"))
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
