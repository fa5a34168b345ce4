"""Build crates/peft-quant/tests/fixtures/mxfp4.safetensors: MXFP4 blocks/scales and what
transformers' `convert_moe_packed_tensors` (the dequantization of gpt-oss's `*_blocks` /
`*_scales`) makes of them, for crates/peft-quant/tests/mxfp4.rs.

    /work/venv-hf/bin/python scripts/hf/make_mxfp4_fixture.py

Two sets, each with blocks `[E, R, G, 16]` uint8, scales `[E, R, G]` uint8 and the output as
transformers returns it, `[E, G*32, R]` (it transposes dims 1 and 2 itself):
- `random_*`: every byte value among the blocks, scales 100..=140; output in bf16 (the
  default dtype, and gpt-oss's).
- `edge_*`: extreme scale bytes (0 = 2^-127 gives subnormals, 255 = 2^128 overflows), every
  code in both nibbles of each block; output in bf16 and in float32.
"""
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

OUT = "crates/peft-quant/tests/fixtures/mxfp4.safetensors"


def main():
    g = torch.Generator().manual_seed(20250711)

    e, r, gr = 2, 4, 8
    flat = torch.randint(0, 256, (e * r * gr * 16,), generator=g, dtype=torch.int64)
    flat[:256] = torch.randperm(256, generator=g)
    random_blocks = flat.to(torch.uint8).reshape(e, r, gr, 16)
    sc = torch.randint(100, 141, (e * r * gr,), generator=g, dtype=torch.int64)
    sc[0], sc[1] = 100, 140
    random_scales = sc.to(torch.uint8).reshape(e, r, gr)

    edge_scale_list = [0, 1, 2, 63, 64, 125, 126, 127, 128, 129, 191, 200, 252, 253, 254, 255]
    rows = []
    for i in range(len(edge_scale_list)):
        lo = torch.arange(16)
        hi = (lo * 7 + i) % 16  # a permutation: every code in the high nibble too
        rows.append(lo | (hi << 4))
    edge_blocks = torch.stack(rows).to(torch.uint8).reshape(1, 2, 8, 16)
    edge_scales = torch.tensor(edge_scale_list, dtype=torch.uint8).reshape(1, 2, 8)

    tensors = {
        "random_blocks": random_blocks,
        "random_scales": random_scales,
        "random_bf16": convert_moe_packed_tensors(random_blocks, random_scales),
        "edge_blocks": edge_blocks,
        "edge_scales": edge_scales,
        "edge_bf16": convert_moe_packed_tensors(edge_blocks, edge_scales, dtype=torch.bfloat16),
        "edge_f32": convert_moe_packed_tensors(edge_blocks, edge_scales, dtype=torch.float32),
    }
    assert tensors["random_bf16"].dtype == torch.bfloat16
    assert tensors["random_bf16"].shape == (e, gr * 32, r)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(
        tensors,
        OUT,
        metadata={"transformers": transformers.__version__, "torch": torch.__version__},
    )
    print(OUT, os.path.getsize(OUT), "bytes")
    for k, v in tensors.items():
        print(f"  {k}: {tuple(v.shape)} {v.dtype}")


if __name__ == "__main__":
    main()
