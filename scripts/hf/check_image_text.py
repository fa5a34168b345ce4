"""Checks peft-rs on the image-text models whose language model it trains, Gemma 3's
(Gemma3ForConditionalGeneration, the class of gemma-3-4b and up) and Mistral 3's
(Mistral3ForConditionalGeneration: Mistral Small 3.1 and 3.2, Magistral Small; Ministral 3,
whose language model adds YaRN and Llama 4's query scaling), against transformers and HF
PEFT.

A small random model (Gemma 3: 6 layers, hidden 64, five sliding-window layers and a global
one, a SigLIP vision tower of one layer; Mistral 3: 4 layers, hidden 64, head_dim 32 with 4
heads, an untied head and a Pixtral tower of one layer), SmolLM2's tokenizer and chat
template, saved by transformers. Then:
0. (Mistral 3) with the tying left out of its config, as the released configs leave it (which
   transformers' default would tie), the checkpoint's own head unties the model in
   transformers and in `peft logits` alike;
1. `peft train` (all-linear LoRA, f32, packed rows of 96 tokens) on the shipped pirate data;
   HF PEFT loads the adapter onto the whole image-text model with no missing or unexpected
   key (its target_modules would adapt the vision tower too; the exclude_modules peft-rs
   writes keep it to the language model), and its logits on a 40-token input equal
   `peft logits --adapter` within 1e-4;
2. transformers loads the folder `peft merge` writes as the image-text model: no missing or
   unexpected key, the vision tower and projector bit for bit the original's, its text logits
   equal HF PEFT's, and so do its logits for a prompt with an image (the image's tokens run
   through the vision tower and the merged language model); `peft merge --output x.gguf`
   writes the language model (llama.cpp keeps the tower in a projector file of its own),
   whose logits in `peft logits` equal HF PEFT's;
3. an adapter HF PEFT made on the image-text model (target_modules q_proj, v_proj and the
   tower's first MLP projection, SigLIP's fc1 or Pixtral's gate_proj, which
   adapt the vision tower too; trained on text, so B is zero there) gives HF's logits in
   `peft logits`, and its merge gives them in transformers;
4. IA3, prompt tuning and trainable tokens trained by `peft train` give HF PEFT
   `peft logits`' logits on the image-text model;
5. an HF PEFT adapter with LoRA on the embedding (which Gemma scales) gives HF's logits.

    .venv/bin/python scripts/hf/check_image_text.py [--peft PATH] [--arch gemma3|mistral3|all]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (AutoModelForImageTextToText, Gemma3Config,
                          Gemma3ForConditionalGeneration, Gemma3TextConfig, Ministral3Config,
                          Mistral3Config,
                          Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                          Qwen3VLMoeForConditionalGeneration, SiglipVisionConfig)

# The names of the vision towers and projectors (Qwen's VL models: `visual`).
OUTSIDE = ("vision_tower", "multi_modal_projector", "visual")

from harness import arguments, peft_logits, random_model, run

parser = arguments("smollm-dir", "data")
ARCHES = ["gemma3", "mistral3", "ministral3", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
parser.add_argument("--arch", default="all", choices=ARCHES + ["all"])
args = parser.parse_args()


def adapter_logits(model_dir, adapter, ids, tmp):
    out = os.path.join(tmp, "ours.safetensors")
    return peft_logits(args.peft, model_dir, ids, out, "--adapter", adapter)


def lora_keys_missing(peft_model, adapter):
    """Keys of the LoRA layers HF PEFT made that the adapter file does not hold, and keys of
    the file no layer took."""
    saved = set(load_file(os.path.join(adapter, "adapter_model.safetensors")))
    made = {k.replace(".default", "") for k in peft_model.state_dict() if "lora_" in k}
    return sorted(made - saved), sorted(saved - made)


def check_merged(merged, model, reference, ids, image_reference, failed):
    """The merged folder in transformers: its keys, tower, and logits with and without an
    image."""
    m, info = AutoModelForImageTextToText.from_pretrained(
        merged, dtype=torch.float32, output_loading_info=True)
    m.eval()
    unloaded = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]]
    print(f"  transformers loads the merged folder as {type(m).__name__}; "
          f"{'problems: ' + str({k: info[k] for k in unloaded}) if unloaded else 'every key in place'}")
    tower = {k: v for k, v in model.state_dict().items() if any(p in k for p in OUTSIDE)}
    merged_state = m.state_dict()
    same = all(torch.equal(v, merged_state[k]) for k, v in tower.items())
    print(f"  vision tower and projector ({len(tower)} tensors) equal the original's: {same}")
    with torch.no_grad():
        dm = (m(input_ids=torch.tensor([ids])).logits - reference).abs().max().item()
        di = (m(**image_inputs).logits - image_reference).abs().max().item()
    print(f"  merged text logits vs HF PEFT: max abs diff {dm:.2e}; with an image: {di:.2e}")
    return failed or bool(unloaded) or not same or dm > 1e-4 or di > 1e-4


ids = [i % 49152 for i in range(3, 3 + 40 * 977, 977)]
pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def gemma3():
    text = Gemma3TextConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                            pad_token_id=2, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=16)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    # The image's 4 tokens take ids past SmolLM2's vocabulary, as Gemma 3's do past its text's.
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=49151, boi_token_index=49149, eoi_token_index=49150)
    image_ids = ids[:5] + [49149] + [49151] * 4 + [49150] + ids[5:20]
    image = dict(input_ids=torch.tensor([image_ids]), pixel_values=pixel_values,
                 token_type_ids=torch.tensor([[int(t == 49151) for t in image_ids]]))
    return Gemma3ForConditionalGeneration, config, image, False, "fc1"


def mistral3(ministral=False):
    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 max_position_embeddings=2048, sliding_window=None, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False)
    if ministral:
        # YaRN and the queries scaled past 16 positions (the 40-token input crosses it twice).
        text = Ministral3Config(**shape, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.3})
    else:
        text = MistralConfig(**shape)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=16, image_size=56, patch_size=14)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=49151,
                            tie_word_embeddings=False)
    # 4 x 4 patches, merged 2 x 2 by the projector: four image tokens.
    image_ids = ids[:5] + [49151] * 4 + ids[5:20]
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    image = dict(input_ids=torch.tensor([image_ids]), pixel_values=pixels,
                 image_sizes=torch.tensor([[56, 56]]))
    return Mistral3ForConditionalGeneration, config, image, True, "gate_proj"


def qwen_vl(generation, moe=False):
    """Qwen2.5-VL (Qwen2's layer, files that keep the language model where a causal LM keeps
    it) or Qwen3-VL (Qwen3's layer, deepstack features): 4 layers, hidden 64; an image of 2 x 2
    patches, merged into one token."""
    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64)
    tokens = dict(image_token_id=49151, vision_start_token_id=49149, vision_end_token_id=49150)
    if generation == 2:
        text = dict(**shape, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [2, 3, 3]})
        config = Qwen2_5_VLConfig(text_config=text, tie_word_embeddings=False, **tokens,
                                  vision_config=dict(**vision, fullatt_block_indexes=[0]))
        cls, patch = Qwen2_5_VLForConditionalGeneration, 14
    else:
        text = dict(**shape, head_dim=32, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
            "mrope_interleaved": True})
        vision = dict(**vision, deepstack_visual_indexes=[0], num_position_embeddings=16,
                      patch_size=16)
        if moe:
            # Qwen3-VL-MoE: 8 experts of 32, 2 per token, stacked in its files.
            text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
            config = Qwen3VLMoeConfig(text_config=text, tie_word_embeddings=False, **tokens,
                                      vision_config=vision)
            cls = Qwen3VLMoeForConditionalGeneration
        else:
            config = Qwen3VLConfig(text_config=text, tie_word_embeddings=False, **tokens,
                                   vision_config=vision)
            cls = Qwen3VLForConditionalGeneration
        patch = 16
    image_ids = ids[:5] + [49149, 49151, 49150] + ids[5:20]
    pixels = torch.randn(4, 3 * 2 * patch * patch, generator=torch.Generator().manual_seed(1))
    image = dict(input_ids=torch.tensor([image_ids]), pixel_values=pixels,
                 image_grid_thw=torch.tensor([[1, 2, 2]]))
    if generation == 3:
        # Qwen3-VL's processor marks the image's tokens.
        image["mm_token_type_ids"] = torch.tensor([[int(t == 49151) for t in image_ids]])
    return cls, config, image, False, "qkv"


failed = False
for arch in (ARCHES if args.arch == "all" else [args.arch]):
    print(f"== {arch}")
    cls, config, image_inputs, tying_left_out, tower_mlp = {
        "gemma3": gemma3, "mistral3": mistral3, "ministral3": lambda: mistral3(ministral=True),
        "qwen2_5_vl": lambda: qwen_vl(2), "qwen3_vl": lambda: qwen_vl(3),
        "qwen3_vl_moe": lambda: qwen_vl(3, moe=True),
    }[arch]()
    tower = "visual" if arch.startswith("qwen") else "vision_tower"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapter, merged = (os.path.join(tmp, n) for n in ["model", "adapter", "merged"])
        model = random_model(cls, config, model_dir, args.smollm_dir)
        if tying_left_out:
            # As the released configs: no top-level tie_word_embeddings, which transformers'
            # default would tie, while the checkpoint holds a head of its own.
            left_out = os.path.join(tmp, "tying-left-out")
            shutil.copytree(model_dir, left_out)
            with open(os.path.join(left_out, "config.json")) as f:
                saved = json.load(f)
            del saved["tie_word_embeddings"]
            with open(os.path.join(left_out, "config.json"), "w") as f:
                json.dump(saved, f)
            reloaded = cls.from_pretrained(left_out, dtype=torch.float32).eval()
            untied = reloaded.lm_head.weight.data_ptr() != \
                reloaded.model.language_model.embed_tokens.weight.data_ptr()
            with torch.no_grad():
                theirs = reloaded(input_ids=torch.tensor([ids])).logits.float()
            ours = peft_logits(args.peft, left_out, ids, os.path.join(tmp, "left.safetensors"))
            d = (ours - theirs).abs().max().item()
            print(f"0. a config that leaves the tying out: transformers unties by the checkpoint "
                  f"({untied}); peft logits vs transformers: max abs diff {d:.2e}")
            failed |= not untied or d > 1e-4
        print("1. peft train on the image-text model, then HF PEFT")
        out = run([args.peft, "train", "--model", model_dir, "--data", args.data, "--output", adapter,
                   "--target-modules", "all-linear", "--r", "8", "--lora-alpha", "16",
                   "--max-steps", "6", "--batch-size", "2", "--lr", "5e-3", "--dtype", "f32",
                   "--packing", "--max-seq-length", "96", "--quiet"])
        print(" ", (out.stdout.strip() or out.stderr.strip()).splitlines()[-1])
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            saved_config = json.load(f)
        print(f"  target_modules {saved_config['target_modules']!r}, "
              f"exclude_modules {saved_config['exclude_modules']!r}")
        ours = adapter_logits(model_dir, adapter, ids, tmp)
        base = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(base, adapter).eval()
        missing, unexpected = lora_keys_missing(peft_model, adapter)
        print(f"  HF PEFT ({type(base).__name__}): {len(missing)} missing keys, "
              f"{len(unexpected)} unexpected {missing[:3] + unexpected[:3]}")
        with torch.no_grad():
            hf = peft_model(input_ids=torch.tensor([ids])).logits.float()
            hf_image = peft_model(**image_inputs).logits.float()
            with peft_model.disable_adapter():
                plain = peft_model(input_ids=torch.tensor([ids])).logits.float()
        d = (ours - hf).abs().max().item()
        moved = (hf - plain).abs().max().item()
        print(f"  peft logits vs HF PEFT: max abs diff {d:.2e} (the adapter moves them by {moved:.2f})")
        failed |= bool(missing or unexpected) or d > 1e-4 or moved < 1e-2
        print("2. peft merge, into a folder and a GGUF file")
        run([args.peft, "merge", "--model", model_dir, "--adapter", adapter, "--output", merged])
        failed = check_merged(merged, model, hf, ids, hf_image, failed)
        gguf = os.path.join(tmp, "merged.gguf")
        merge_gguf = [args.peft, "merge", "--model", model_dir, "--adapter", adapter,
                      "--output", gguf, "--dtype", "f32"]
        if arch == "ministral3":
            # llama.cpp's llama architecture would run Ministral 3 without the query scaling
            # and with another YaRN: refused.
            r = subprocess.run(merge_gguf, capture_output=True, text=True)
            print(f"  GGUF refused: {r.stderr.strip()}")
            failed |= r.returncode == 0
        else:
            run(merge_gguf)
            gguf_logits = peft_logits(args.peft, gguf, ids, os.path.join(tmp, "gguf.safetensors"))
            dg = (gguf_logits - hf).abs().max().item()
            print(f"  the GGUF file (its language model, as llama.cpp's converter writes it) in "
                  f"peft logits vs HF PEFT: max abs diff {dg:.2e}")
            failed |= dg > 1e-4

        print("3. an HF PEFT adapter that also targets the vision tower")
        hf_adapter, hf_merged = os.path.join(tmp, "hf-adapter"), os.path.join(tmp, "hf-merged")
        torch.manual_seed(3)
        hf_model = get_peft_model(cls.from_pretrained(model_dir, dtype=torch.float32),
                                  LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                             target_modules=["q_proj", "v_proj", tower_mlp]))
        with torch.no_grad():
            for pname, p in hf_model.named_parameters():
                if tower in pname and "lora_B" in pname:
                    p.zero_()
        hf_model.eval().save_pretrained(hf_adapter)
        tower_pairs = sum(tower in k and "lora_A" in k
                          for k in load_file(os.path.join(hf_adapter, "adapter_model.safetensors")))
        with torch.no_grad():
            hf = hf_model(input_ids=torch.tensor([ids])).logits.float()
            hf_image = hf_model(**image_inputs).logits.float()
        d = (adapter_logits(model_dir, hf_adapter, ids, tmp) - hf).abs().max().item()
        print(f"  {tower_pairs} LoRA pairs on the vision tower; peft logits vs HF PEFT: max abs diff {d:.2e}")
        failed |= d > 1e-4 or tower_pairs == 0
        run([args.peft, "merge", "--model", model_dir, "--adapter", hf_adapter, "--output", hf_merged])
        failed = check_merged(hf_merged, model, hf, ids, hf_image, failed)

        print("4. the other methods: peft train, then HF PEFT on the image-text model")
        for method, extra in [("ia3", []), ("prompt", []),
                              ("trainable-tokens", ["--trainable-token-indices", "5,7,9"])]:
            out_dir = os.path.join(tmp, method)
            run([args.peft, "train", "--model", model_dir, "--data", args.data, "--output", out_dir,
                 "--method", method, "--max-steps", "3", "--batch-size", "2", "--lr", "5e-2",
                 "--dtype", "f32", "--max-seq-length", "64", "--quiet"] + extra)
            ours = adapter_logits(model_dir, out_dir, ids, tmp)
            base = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
            peft_model = PeftModel.from_pretrained(base, out_dir).eval()
            with torch.no_grad():
                hf = peft_model(input_ids=torch.tensor([ids])).logits.float()
            d = (ours - hf).abs().max().item() if hf.shape == ours.shape else float("inf")
            print(f"  {method}: peft logits vs HF PEFT: max abs diff {d:.2e}")
            failed |= d > 1e-4

        print("5. LoRA on the embedding (which Gemma scales by sqrt(hidden): HF PEFT's embed_scale)")
        emb_dir = os.path.join(tmp, "emb")
        torch.manual_seed(4)
        emb_model = get_peft_model(cls.from_pretrained(model_dir, dtype=torch.float32),
                                   LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["q_proj", "embed_tokens"],
                                              exclude_modules=rf"model\.{tower}\..*"))
        with torch.no_grad():
            for name, p in emb_model.named_parameters():
                if "lora_embedding" in name:
                    p.mul_(0.05)
        emb_model.eval().save_pretrained(emb_dir)
        with torch.no_grad():
            hf = emb_model(input_ids=torch.tensor([ids])).logits.float()
        d = (adapter_logits(model_dir, emb_dir, ids, tmp) - hf).abs().max().item()
        print(f"  HF PEFT's adapter on q_proj and embed_tokens in peft logits: max abs diff {d:.2e}")
        failed |= d > 1e-4

print("FAILED" if failed else "all ok")
sys.exit(1 if failed else 0)
