"""Writes the Parquet fixtures of crates/peft-train/tests/fixtures with pyarrow, as Hugging
Face `datasets` stores a dataset: the first 8 conversations of data/pirate_qa.jsonl as a
`messages` column (list of {role, content} structs, snappy), and the same records as
prompt/completion strings (zstd, with an extra integer column)."""

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

root = pathlib.Path(__file__).resolve().parents[2]
out = root / "crates/peft-train/tests/fixtures"
records = [json.loads(l) for l in (root / "data/pirate_qa.jsonl").read_text().splitlines()[:8]]
pq.write_table(pa.Table.from_pylist(records), out / "pirate_messages.parquet", compression="snappy")
rows = [
    {
        "id": i,
        "prompt": r["messages"][0]["content"],
        "completion": r["messages"][1]["content"],
    }
    for i, r in enumerate(records)
]
pq.write_table(pa.Table.from_pylist(rows), out / "pirate_prompt_completion.parquet", compression="zstd")
