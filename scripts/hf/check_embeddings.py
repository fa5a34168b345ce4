"""Checks LoRA on the embedding (`target_modules` with `embed_tokens`: HF PEFT's
`lora_embedding_A` and `lora_embedding_B`) against HF PEFT on SmolLM2, whose head is tied to
the embedding:
1. an adapter HF PEFT made (q_proj and embed_tokens, random A and B; HF PEFT also saves the
   embedding's own weight beside them) gives HF's logits in `peft logits`, unmerged (the tied
   head reads the embedding as it was) and merged (the head reads the merged embedding, as in
   HF's merged model);
2. `peft train --target-modules q_proj,v_proj,embed_tokens` trains both kinds of pair, and HF
   PEFT loads the adapter with no missing or unexpected key and gives `peft logits`' logits;
3. a grown vocabulary, as TRL leaves it after adding tokens for a chat template: two special
   tokens added, the embedding resized to a multiple of 64 (transformers' mean resizing),
   a LoRA on q_proj and v_proj; HF PEFT saves the new embedding and head beside the pairs,
   TRL the tokenizer. `peft logits` on ids with the new tokens gives HF PEFT's logits (on its
   resized base; also for IA3 and prompt-tuning adapters, and for TRL's recipe, LoRA with the
   new tokens' rows trained by `trainable_token_indices`), `peft generate` reads the adapter's tokenizer, and transformers loads the
   folder `peft merge` writes at the new size, with HF's logits and the added tokens;
4. `peft train --add-special-tokens` adds tokens, grows the embedding and trains their rows
   (and `peft train --adapter` continues that adapter):
   HF PEFT loads the adapter on a base resized to its saved tokenizer (as TRL's users resize
   it) and gives `peft logits`' logits.

    .venv/bin/python scripts/hf/check_embeddings.py [--peft PATH] [--model-dir DIR]
"""
import copy
import os
import sys
import tempfile

import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness import arguments, peft_logits, run

args = arguments("model-dir", "data").parse_args()
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28]
failed = False


def report(ok, what):
    global failed
    failed |= not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}")


def base():
    return AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()


with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, "hf")
    torch.manual_seed(0)
    model = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["q_proj", "embed_tokens"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.05)
    model.eval().save_pretrained(hf_dir)
    keys = sorted(k for k in load_file(os.path.join(hf_dir, "adapter_model.safetensors"))
                  if "embed_tokens" in k)
    with torch.no_grad():
        hf = model(torch.tensor([IDS])).logits
        with model.disable_adapter():
            plain = model(torch.tensor([IDS])).logits
        merged = model.merge_and_unload()(torch.tensor([IDS])).logits
    ours = peft_logits(args.peft, args.model_dir, IDS, os.path.join(tmp, "a.safetensors"),
                       "--adapter", hf_dir)
    ours_merged = peft_logits(args.peft, args.model_dir, IDS, os.path.join(tmp, "b.safetensors"),
                              "--adapter", hf_dir, "--merged")
    d, dm = (ours - hf).abs().max().item(), (ours_merged - merged).abs().max().item()
    moved = (hf - plain).abs().max().item()
    report(d < 2e-4 and moved > 0.1,
           f"HF PEFT's adapter ({', '.join(k.rsplit('.', 1)[-1] for k in keys)} on embed_tokens) "
           f"in peft logits: max |diff| {d:.2e} (the adapter moves them by {moved:.2f})")
    report(dm < 2e-4, f"merged: max |diff| {dm:.2e} (HF's merged vs unmerged: "
                      f"{(merged - hf).abs().max().item():.2e}, the tied head)")

    ours_dir = os.path.join(tmp, "ours")
    run([args.peft, "train", "--model", args.model_dir, "--data", args.data, "--output", ours_dir,
         "--target-modules", "q_proj,v_proj,embed_tokens", "--r", "8", "--lora-alpha", "16",
         "--lora-dropout", "0", "--max-steps", "4", "--batch-size", "2", "--lr", "5e-3",
         "--warmup-steps", "0", "--dtype", "f32", "--quiet"])
    saved = load_file(os.path.join(ours_dir, "adapter_model.safetensors"))
    a = saved["base_model.model.model.embed_tokens.lora_embedding_A"]
    report(a.abs().max().item() > 0, f"peft train moved lora_embedding_A {tuple(a.shape)} "
                                     f"from zero by up to {a.abs().max().item():.2e}")
    peft_model = PeftModel.from_pretrained(base(), ours_dir).eval()
    made = {k.replace(".default", "") for k in peft_model.state_dict() if "lora_" in k}
    missing, unexpected = sorted(made - set(saved)), sorted(set(saved) - made)
    report(not missing and not unexpected,
           f"HF PEFT loads peft's adapter: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        theirs = peft_model(torch.tensor([IDS])).logits
    ours = peft_logits(args.peft, args.model_dir, IDS, os.path.join(tmp, "c.safetensors"),
                       "--adapter", ours_dir)
    d = (ours - theirs).abs().max().item()
    report(d < 2e-4, f"peft's adapter in HF PEFT vs peft logits: max |diff| {d:.2e}")

    merged_dir = os.path.join(tmp, "grown-merged")
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]})
    torch.manual_seed(1)
    resized = base()
    resized.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    resized_copy, prompt_base, tokens_base = (copy.deepcopy(resized) for _ in range(3))
    new_ids = tok.convert_tokens_to_ids(["<tool>", "</tool>"])
    ids = IDS[:5] + new_ids + IDS[5:]

    def saved_and_compared(model, name):
        """Saves `model` (an HF PEFT model on the resized base) with the tokenizer; the max
        |diff| of its logits on `ids` and `peft logits`'."""
        out_dir = os.path.join(tmp, name)
        model.eval().save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits
        ours = peft_logits(args.peft, args.model_dir, ids,
                           os.path.join(tmp, f"{name}.safetensors"), "--adapter", out_dir)
        d = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("inf")
        return out_dir, theirs, d

    grown = get_peft_model(resized, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                               target_modules=["q_proj", "v_proj"]))
    grown_dir, theirs, d = saved_and_compared(grown, "grown")
    report(d < 2e-4, f"grown vocabulary ({len(tok)} tokens, embedding of "
                     f"{resized.get_input_embeddings().weight.shape[0]}): HF PEFT's adapter in "
                     f"peft logits, ids {new_ids} among them: max |diff| {d:.2e}")
    torch.manual_seed(2)
    ia3 = get_peft_model(resized_copy, IA3Config(init_ia3_weights=False))
    with torch.no_grad():
        for name, p in ia3.named_parameters():
            if "ia3_l" in name:
                p.mul_(0.1).add_(0.9)  # near 1, as trained vectors are
    d = saved_and_compared(ia3, "grown-ia3")[2]
    report(d < 2e-4, f"an IA3 adapter of the grown vocabulary: max |diff| {d:.2e}")
    torch.manual_seed(3)
    prompt = get_peft_model(prompt_base,
                            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    d = saved_and_compared(prompt, "grown-prompt")[2]
    report(d < 2e-4, f"a prompt-tuning adapter of the grown vocabulary: max |diff| {d:.2e}")
    # TRL's recipe for added tokens: the resized base, LoRA, and the new tokens' rows trained.
    torch.manual_seed(5)
    recipe = get_peft_model(tokens_base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                    target_modules=["q_proj"],
                                                    trainable_token_indices=new_ids))
    with torch.no_grad():
        for name, p in recipe.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(0.3 * torch.randn_like(p))
    recipe_dir, recipe_logits, d = saved_and_compared(recipe, "grown-tokens")
    report(d < 2e-4, f"LoRA with trainable_token_indices {new_ids} (TRL's recipe; HF PEFT saves "
                     f"the resized embedding as the token adapter's base layer): max |diff| {d:.2e}")
    recipe_merged = os.path.join(tmp, "grown-tokens-merged")
    run([args.peft, "merge", "--model", args.model_dir, "--adapter", recipe_dir,
         "--output", recipe_merged])
    m = AutoModelForCausalLM.from_pretrained(recipe_merged, dtype=torch.float32).eval()
    with torch.no_grad():
        dm = (m(torch.tensor([ids])).logits - recipe_logits).abs().max().item()
    report(dm < 2e-4, f"its merged folder in transformers: max |diff| {dm:.2e}")
    out = run([args.peft, "generate", "--model", args.model_dir, "--adapter", grown_dir,
               "--prompt", "<tool> call </tool>", "--max-new-tokens", "2"])
    report(out.returncode == 0, "peft generate runs on a prompt with the added tokens")
    run([args.peft, "merge", "--model", args.model_dir, "--adapter", grown_dir,
         "--output", merged_dir])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        dm = (merged(torch.tensor([ids])).logits - theirs).abs().max().item()
    merged_tok = AutoTokenizer.from_pretrained(merged_dir)
    same_ids = merged_tok.convert_tokens_to_ids(["<tool>", "</tool>"]) == new_ids
    report(dm < 2e-4 and same_ids,
           f"the merged folder in transformers (vocab {merged.config.vocab_size}): max |diff| "
           f"{dm:.2e}; its tokenizer has the added tokens: {same_ids}")

    # Tokens added here: peft train --add-special-tokens, then HF PEFT on a base resized to the
    # saved tokenizer, as a user of the adapter resizes it.
    added_dir = os.path.join(tmp, "added")
    run([args.peft, "train", "--model", args.model_dir, "--data", args.data, "--output", added_dir,
         "--add-special-tokens", "<tool>,</tool>", "--max-steps", "3", "--batch-size", "2",
         "--lr", "5e-2", "--warmup-steps", "0", "--dtype", "f32", "--lora-dropout", "0",
         "--quiet"])
    added_tok = AutoTokenizer.from_pretrained(added_dir)
    added_ids = added_tok.convert_tokens_to_ids(["<tool>", "</tool>"])
    resized_here = base()
    resized_here.resize_token_embeddings(len(added_tok), pad_to_multiple_of=64)
    peft_model = PeftModel.from_pretrained(resized_here, added_dir).eval()
    ids_here = IDS[:5] + added_ids + IDS[5:]
    with torch.no_grad():
        theirs = peft_model(torch.tensor([ids_here])).logits
    ours = peft_logits(args.peft, args.model_dir, ids_here, os.path.join(tmp, "g.safetensors"),
                       "--adapter", added_dir)
    d = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("inf")
    report(d < 2e-4, f"peft train --add-special-tokens (ids {added_ids}): HF PEFT on the "
                     f"resized base vs peft logits: max |diff| {d:.2e}")

    # Continued (peft train --adapter): the tokenizer and grown embedding go with it, and the
    # token rows train on.
    continued_dir = os.path.join(tmp, "continued")
    run([args.peft, "train", "--adapter", added_dir, "--model", args.model_dir, "--data",
         args.data, "--output", continued_dir, "--max-steps", "2", "--batch-size", "2",
         "--lr", "5e-2", "--warmup-steps", "0", "--dtype", "f32", "--quiet"])
    resized_again = base()
    resized_again.resize_token_embeddings(len(added_tok), pad_to_multiple_of=64)
    continued = PeftModel.from_pretrained(resized_again, continued_dir).eval()
    with torch.no_grad():
        theirs_c = continued(torch.tensor([ids_here])).logits
    ours_c = peft_logits(args.peft, args.model_dir, ids_here, os.path.join(tmp, "c.safetensors"),
                         "--adapter", continued_dir)
    dc = (ours_c - theirs_c).abs().max().item() if ours_c.shape == theirs_c.shape else float("inf")
    moved = (theirs_c - theirs).abs().max().item()
    same_tok = AutoTokenizer.from_pretrained(continued_dir).convert_tokens_to_ids(
        ["<tool>", "</tool>"]) == added_ids
    report(dc < 2e-4 and moved > 1e-3 and same_tok,
           f"peft train --adapter on it: HF PEFT vs peft logits max |diff| {dc:.2e}, logits "
           f"moved {moved:.2e} from the first run, its tokenizer kept the ids: {same_tok}")

sys.exit(1 if failed else 0)
