"""Renders chat templates with transformers and with peft-rs and prints where they differ.

Templates: every `*.jinja` under a folder (default: the chat templates shipped in TRL's wheel,
the original templates of Llama 3.x, Qwen 2.5/3, Gemma, Phi, DeepSeek, ... and their
`{% generation %}` training variants), or `--template FILE`. Conversations: plain, with a
system message, multi-turn, and tool use (tools, assistant tool calls without content, tool
results, reasoning). Each is rendered with and without the generation prompt.

    .venv/bin/pip download --no-deps trl -d /tmp/trl && unzip -o /tmp/trl/trl-*.whl 'trl/chat_templates/*' -d /tmp/trl
    cargo build --release -p peft-models --example render_chat
    .venv/bin/python scripts/hf/check_chat_templates.py --templates /tmp/trl/trl/chat_templates \\
        --renderer $CARGO_TARGET_DIR/release/examples/render_chat

Where a template has `{% generation %}` blocks, the character ranges of their text (what
TRL's `assistant_only_loss` trains) must agree too. Exit code 1 when a template renders
differently (or fails in one renderer only).
"""
import argparse
import glob
import json
import os
import subprocess
import sys

from transformers.utils.chat_template_utils import render_jinja_template

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris <FR> & co"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
]
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "Paris."}],
    "system": [{"role": "system", "content": "You are a pirate."},
               {"role": "user", "content": "Hi there"},
               {"role": "assistant", "content": "Arr, ahoy! Café?"}],
    "multi": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": " And 3+3? "}, {"role": "assistant", "content": "6\n"}],
    "tools": [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather",
                                                    "arguments": {"city": "Paris", "unit": "celsius"}}}]},
              {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21}"},
              {"role": "assistant", "content": "It is 21 °C in Paris."}],
    "reasoning": [{"role": "user", "content": "Is 7 prime?"},
                  {"role": "assistant", "reasoning_content": "7 has no divisors but 1 and 7.",
                   "content": "Yes."}],
}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def cases():
    for name, messages in CONVERSATIONS.items():
        for gen in (False, True):
            msgs = messages[:-1] if gen else messages
            yield f"{name}{' +gen' if gen else ''}", {
                "messages": msgs, "tools": TOOLS if name == "tools" else None,
                "add_generation_prompt": gen, "special": SPECIAL}
    # A template variable, as a `chat_template_kwargs` column passes it (Qwen 3's switch).
    yield "kwargs +gen", {"messages": CONVERSATIONS["reasoning"][:-1], "tools": None,
                          "add_generation_prompt": True, "special": SPECIAL,
                          "kwargs": {"enable_thinking": False}}


def hf(template, case):
    messages = [{k: v for k, v in m.items() if v is not None} for m in case["messages"]]
    try:
        tracked = "generation" in template
        out, spans = render_jinja_template([messages], tools=case["tools"], chat_template=template,
                                           add_generation_prompt=case["add_generation_prompt"],
                                           return_assistant_tokens_mask=tracked,
                                           **case["special"], **case.get("kwargs", {}))
        return {"text": out[0], "spans": [list(s) for s in spans[0]] if tracked else []}
    except Exception as e:  # noqa: BLE001 - any template error is a result to compare
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--templates", help="folder of *.jinja files")
    ap.add_argument("--template", action="append", default=[])
    ap.add_argument("--renderer", required=True, help="the render_chat example binary")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.templates, "*.jinja"))) if args.templates else []
    files += args.template
    bad = 0
    for path in files:
        template = open(path).read()
        named = list(cases())
        ours = json.loads(subprocess.run(
            [args.renderer], input=json.dumps({"template": template, "cases": [c for _, c in named]}),
            capture_output=True, text=True, check=True).stdout)
        diffs = []
        for (label, case), mine in zip(named, ours):
            theirs = hf(template, case)
            if "text" in theirs and "text" in mine and theirs["text"] == mine["text"] \
                    and theirs["spans"] == mine["spans"]:
                continue
            if "error" in theirs and "error" in mine:
                continue
            diffs.append((label, theirs, mine))
        status = "ok" if not diffs else f"{len(diffs)} of {len(named)} differ"
        print(f"{os.path.basename(path)}: {status}")
        for label, theirs, mine in diffs[:2]:
            bad += 1
            print(f"  {label}\n    transformers: {json.dumps(theirs)[:600]}\n    peft-rs:      {json.dumps(mine)[:600]}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
