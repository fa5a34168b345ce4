#!/usr/bin/env python3
"""Instruction mix of a kernel's loops from `cuobjdump -sass` output (stdin): for each loop
(a backward branch) that holds tensor-core instructions, its size and its most frequent
opcodes; then the mix of every straight-line run between branches and barriers, so that the
path a loop iteration takes can be added up. Used by scripts/gpu/ptxas.sh --sass."""
import collections
import re
import sys

ops = []
for line in sys.stdin:
    m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
    if m:
        ins = m.group(2).strip()
        if ins.startswith("@"):
            ins = ins.split(None, 1)[1]
        ops.append((int(m.group(1), 16), ins))


def mix(seg):
    c = collections.Counter(o.split()[0].split(".")[0] for o in seg)
    return " ".join(f"{k}:{v}" for k, v in c.most_common(12))


print(f"{len(ops)} instructions")
for a, ins in ops:
    m = re.match(r"BRA(?:\.\S+)?\s+(?:\S+,\s*)?0x([0-9a-f]+)", ins)
    if m and int(m.group(1), 16) < a:
        start = int(m.group(1), 16)
        seg = [o for b, o in ops if start <= b <= a]
        if any(o.startswith("HMMA") for o in seg):
            print(f"loop {start:#x}-{a:#x}: {len(seg)} instructions: {mix(seg)}")
print("runs between branches and barriers:")
run, first = [], None
for a, ins in ops:
    if first is None:
        first = a
    run.append(ins)
    if ins.startswith(("BRA", "BAR", "EXIT")):
        print(f"  {first:#06x}: {len(run):4d}  {mix(run)}")
        run, first = [], None
