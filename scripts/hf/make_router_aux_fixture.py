"""The router's load-balancing loss of the mixture-of-experts fixtures, as transformers computes
it with `output_router_logits=True` (`load_balancing_loss_func`: each router's softmax, its
top-k counts and mean probabilities per expert over the unpadded tokens of every sparse layer),
which TRL's SFTTrainer adds to the loss with the config's `router_aux_loss_coef`.

For each MoE fixture in crates/peft/tests/fixtures/arch/<name>/ (model/ and its HF PEFT lora/),
over a right-padded batch of two rows, writes router_aux.safetensors:
- input_ids, attention_mask (`[2, T]`; the second row three pads shorter);
- aux_loss: `outputs.aux_loss`;
- aux.<key>: the gradient of aux_loss alone for every LoRA weight (file keys);
- total.<key>: the gradient of TRL's training loss with a coefficient of 0.5 (the mean token
  loss over the labelled positions plus 0.5 · aux_loss), large enough that a wrong aux
  gradient shows beside the token loss's.

    .venv/bin/python scripts/hf/make_router_aux_fixture.py [NAME ...]
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

NAMES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss", "qwen3_vl_moe", "ernie4_5_moe"]
COEF = 0.5
PADS = 3


def main(names):
    for name in names:
        root = f"crates/peft/tests/fixtures/arch/{name}"
        cls = AutoModelForImageTextToText if name == "qwen3_vl_moe" else AutoModelForCausalLM
        base = cls.from_pretrained(f"{root}/model", dtype=torch.float32)
        model = PeftModel.from_pretrained(base, f"{root}/lora", is_trainable=True)
        model.train()
        for module in model.modules():  # dropout would draw masks
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        ids = load_file(f"{root}/expected.safetensors")["input_ids"]
        t = ids.shape[1]
        short = torch.cat([ids[0, : t - PADS], torch.zeros(PADS, dtype=ids.dtype)])
        input_ids = torch.stack([ids[0], short])
        mask = torch.ones_like(input_ids)
        mask[1, t - PADS:] = 0
        labels = input_ids.masked_fill(mask == 0, -100)

        def run():
            model.zero_grad()
            return model(input_ids=input_ids, attention_mask=mask, labels=labels,
                         output_router_logits=True)

        out = run()
        aux = out.aux_loss
        aux.backward()
        tensors = {"input_ids": input_ids, "attention_mask": mask, "aux_loss": aux.detach()}
        tensors.update(grads(model, "aux"))
        out = run()
        # transformers' own loss adds its config's coefficient; TRL's is recomputed here.
        logits = out.logits[:, :-1].flatten(0, 1)
        token_loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(),
                                                       ignore_index=-100)
        (token_loss + COEF * out.aux_loss).backward()
        tensors.update(grads(model, "total"))
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  f"{root}/router_aux.safetensors")
        print(name, "aux_loss", aux.item())


def grads(model, prefix):
    return {f"{prefix}.{n.replace('.default', '')}": p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


if __name__ == "__main__":
    main(sys.argv[1:] or NAMES)
