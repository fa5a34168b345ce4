"""A TensorBoard event file written by PyTorch's SummaryWriter (what transformers'
TensorBoardCallback uses), for crates/peft-train/tests/tensorboard.rs: scalars at fixed wall
times, so that the file is the same at every run.

Writes crates/peft-train/tests/fixtures/scalars.tfevents.

    .venv/bin/python scripts/hf/make_tensorboard_fixture.py
"""

import glob
import pathlib
import shutil
import tempfile
import time

WALL_TIME = 1764547200.25
# (tag, value, step): a step of 0 (left out by protobuf), one past a one-byte varint, a
# negative value and one float32 rounds.
SCALARS = [("train/loss", 2.5, 1), ("train/learning_rate", 0.0002, 1), ("eval/loss", 0.0, 0),
           ("train/grad_norm", -1.75, 300), ("eval/perplexity", 123456.789, 70000)]

time.time = lambda: WALL_TIME  # the file-version event's wall time
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    writer = SummaryWriter(log_dir=tmp)
    for tag, value, step in SCALARS:
        writer.add_scalar(tag, value, step, walltime=WALL_TIME + step)
    writer.close()
    out = pathlib.Path("crates/peft-train/tests/fixtures/scalars.tfevents")
    shutil.copy(glob.glob(f"{tmp}/events.out.tfevents.*")[0], out)
    print("written", out, out.stat().st_size, "bytes")
