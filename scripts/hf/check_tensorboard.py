"""Reads the TensorBoard logs of a `peft train --report-to tensorboard` run with TensorBoard's
own reader and checks them against the run's metrics.jsonl: every value of every line as the
scalar transformers would name it (train/loss, train/learning_rate, eval/loss, ...) at its
step.

    .venv/bin/python scripts/hf/check_tensorboard.py OUTPUT
"""

import glob
import json
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

output = sys.argv[1]
runs = glob.glob(f"{output}/runs/*")
assert len(runs) == 1, runs
acc = EventAccumulator(runs[0])
acc.Reload()
scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}

checked = 0
for line in open(f"{output}/metrics.jsonl"):
    line = json.loads(line)
    step = line.pop("step")
    for key, value in line.items():
        tag = ("eval/" + key[5:] if key.startswith("eval_")
               else "train/learning_rate" if key == "lr" else "train/" + key)
        got = scalars[tag][step]
        assert got == np.float32(value), (tag, step, got, value)
        checked += 1
print(f"{runs[0]}: {len(scalars)} tags ({', '.join(sorted(scalars))}); {checked} values "
      "equal metrics.jsonl's (as float32)")
