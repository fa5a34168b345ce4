"""Rebuild the HF base-model folder used by the golden fixtures (/work/shared/golden/README.md,
section "Base model"): dequantize SmolLM2-135M-Instruct.Q4_1.gguf with transformers' GGUF
loader and save it as a plain float32 LlamaForCausalLM folder.

    python scripts/hf/build_base_model.py [--gguf models/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--out models/smollm2-135m-instruct]
"""
import argparse, hashlib, os
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, GenerationConfig

EXPECTED = {
    "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
}
EXPECTED_GGUF = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default="models/smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    g = sha256(a.gguf)
    print(f"gguf sha256 {g} {'OK' if g == EXPECTED_GGUF else 'DIFFERENT from golden README'}")

    # Snippet from the golden README, verbatim apart from variable names.
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    q = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = q.config.to_dict(); cfg.pop("quantization_config"); cfg.pop("_model_name_or_path", None)
    for k in ("transformers_version", "architectures", "model_type"):
        cfg.pop(k, None)
    m = LlamaForCausalLM(LlamaConfig(**cfg)); m.load_state_dict(q.state_dict()); m.tie_weights()
    m.config.architectures = ["LlamaForCausalLM"]
    m.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    m.save_pretrained(a.out); tok.save_pretrained(a.out)

    ok = True
    for name, want in EXPECTED.items():
        got = sha256(os.path.join(a.out, name))
        print(f"{name} sha256 {got} {'OK' if got == want else 'MISMATCH (want ' + want + ')'}")
        ok &= got == want
    print("all checksums match" if ok else "CHECKSUM MISMATCH")


if __name__ == "__main__":
    main()
