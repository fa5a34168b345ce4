"""Learning rates of transformers' schedulers, for crates/peft-train/tests/schedules.rs.

Writes crates/peft-train/tests/fixtures/schedules.json: for each case (scheduler name,
warmup_steps as TrainingArguments takes it, lr_scheduler_kwargs, total steps), the learning
rate transformers' Trainer uses at every optimizer step.

    .venv/bin/python scripts/hf/make_schedule_fixture.py
"""

import json
import pathlib

import torch
import transformers
from transformers import TrainingArguments, get_scheduler

CASES = [
    ("linear", 3, {}, 20),
    ("linear", 0.1, {}, 25),
    ("cosine", 0.15, {}, 20),
    ("cosine", 2, {"num_cycles": 1.5}, 17),
    ("cosine_with_restarts", 2, {"num_cycles": 3}, 20),
    ("polynomial", 4, {"power": 2.0, "lr_end": 1e-5}, 20),
    ("polynomial", 0, {}, 12),
    ("constant", 5, {}, 10),
    ("constant_with_warmup", 0.3, {}, 10),
    ("inverse_sqrt", 4, {}, 20),
    ("inverse_sqrt", 0, {"timescale": 3}, 10),
    ("cosine_with_min_lr", 3, {"min_lr_rate": 0.1}, 20),
    ("cosine_with_min_lr", 0.2, {"min_lr": 2e-5}, 15),
    ("cosine_warmup_with_min_lr", 4, {"min_lr_rate": 0.1}, 20),
    ("cosine_warmup_with_min_lr", 3, {"min_lr": 2e-5, "warmup_lr_rate": 0.2, "num_cycles": 0.7}, 18),
    ("cosine_warmup_with_min_lr", 0, {"min_lr_rate": 0.05}, 10),
    ("warmup_stable_decay", 3, {"num_decay_steps": 6}, 20),
    (
        "warmup_stable_decay",
        4,
        {
            "num_decay_steps": 5,
            "num_stable_steps": 6,
            "warmup_type": "cosine",
            "decay_type": "1-sqrt",
            "min_lr_ratio": 0.05,
        },
        20,
    ),
    ("warmup_stable_decay", 2, {"num_decay_steps": 8, "decay_type": "linear"}, 16),
]
LR = 2e-4


def rates(name, warmup, kwargs, total):
    args = TrainingArguments(output_dir="/tmp/unused", warmup_steps=warmup, report_to=[])
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=LR)
    sched = get_scheduler(
        name,
        opt,
        num_warmup_steps=args.get_warmup_steps(total),
        num_training_steps=total,
        scheduler_specific_kwargs=dict(kwargs),
    )
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


cases = [
    {"scheduler": n, "warmup_steps": w, "kwargs": k, "total_steps": t, "lr": LR,
     "rates": rates(n, w, k, t)}
    for n, w, k, t in CASES
]
out = pathlib.Path(__file__).resolve().parents[2] / "crates/peft-train/tests/fixtures/schedules.json"
out.write_text(json.dumps({"transformers": transformers.__version__, "cases": cases}, indent=1) + "\n")
print(f"wrote {len(cases)} cases to {out}")
