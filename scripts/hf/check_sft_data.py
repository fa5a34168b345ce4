"""Compares how `peft train` tokenizes each record shape with TRL's SFTTrainer (its prepared
train dataset: input_ids and labels), on SmolLM2's tokenizer and ChatML template.

Shapes: plain text; prompt/completion texts (also where a token spans the boundary); the
conversational prompt/completion (lists of messages); messages; ShareGPT's conversations of
{from, value}; with TRL's default loss settings, with completion_only_loss=False, and with
assistant_only_loss=True under a ChatML template with {% generation %} blocks.

    .venv/bin/python scripts/hf/check_sft_data.py [--model-dir models/smollm2-135m-instruct]
"""

import argparse
import json
import os
import subprocess
import tempfile

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

ap = argparse.ArgumentParser()
ap.add_argument("--model-dir", default="models/smollm2-135m-instruct")
args = ap.parse_args()

user = lambda text: {"role": "user", "content": text}
assistant = lambda text: {"role": "assistant", "content": text}
RECORDS = {
    "text": [{"text": "Arr, the sea be calm today."}, {"text": "Ends with its EOS<|im_end|>"}],
    "prompt/completion": [
        {"prompt": "The capital of France is", "completion": " Paris."},
        # " world" is one token: it spans the boundary, and the completion starts there.
        {"prompt": "Hello wor", "completion": "ld, said the parrot."},
    ],
    "conversational prompt/completion": [
        {"prompt": [user("What is 2 + 2?")], "completion": [assistant("Four, matey.")]},
        {"prompt": [{"role": "system", "content": "Talk like a pirate."}, user("Hi!"),
                    assistant("Ahoy!"), user("Where is the treasure?")],
         "completion": [assistant("Buried on the isle.")]},
    ],
    "messages": [
        {"messages": [user("Name a ship."), assistant("The Black Pearl."), user("Another?"),
                      assistant("The Flying Dutchman.")]},
    ],
    "conversations": [
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "user", "value": "Hello?"},
                           {"from": "assistant", "value": "Ahoy."}]},
    ],
}
# SmolLM2's ChatML template with {% generation %} around each assistant reply (as TRL's
# training templates mark them), for assistant_only_loss=True.
GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SETTINGS = [  # (assistant_only_loss, completion_only_loss, template)
    (False, True, None), (False, False, None), (True, True, GENERATION_TEMPLATE)]

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
subprocess.run(["cargo", "build", "--release", "-q", "-p", "peft-train", "--example",
                "tokenize_data"], cwd=root, check=True)
target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
ours_bin = os.path.join(target, "release", "examples", "tokenize_data")
model = AutoModelForCausalLM.from_pretrained(args.model_dir)
failed = False
with tempfile.TemporaryDirectory() as tmp:
    for assistant_only, completion_only, template in SETTINGS:
        template_path = os.path.join(tmp, "template.jinja")
        if template:
            with open(template_path, "w") as f:
                f.write(template)
        for shape, records in RECORDS.items():
            if assistant_only and shape not in ("messages", "conversational prompt/completion"):
                continue  # TRL takes assistant_only_loss for its conversational shapes alone
            tok = AutoTokenizer.from_pretrained(args.model_dir)
            if template:
                tok.chat_template = template
            config = SFTConfig(output_dir=tmp, assistant_only_loss=assistant_only,
                               completion_only_loss=completion_only, max_length=None,
                               report_to="none", dataset_num_proc=None, bf16=False, use_cpu=True)
            trainer = SFTTrainer(model=model, args=config, processing_class=tok,
                                 train_dataset=Dataset.from_list(records))
            theirs = [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]
            data = os.path.join(tmp, "data.jsonl")
            with open(data, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            cmd = [ours_bin, args.model_dir, data, str(assistant_only).lower(),
                   str(completion_only).lower()] + ([template_path] if template else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            ours = [(r["input_ids"], r["labels"]) for r in map(json.loads, out.splitlines())]
            same = ours == theirs
            failed |= not same
            trained = sum(sum(l != -100 for l in labels) for _, labels in theirs)
            print(f"assistant_only_loss={assistant_only} completion_only_loss={completion_only} "
                  f"{shape}: {len(records)} records, {trained} trained tokens: "
                  + ("identical" if same else f"DIFFER\n  ours   {ours}\n  theirs {theirs}"))
raise SystemExit(1 if failed else 0)
