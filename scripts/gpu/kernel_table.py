"""Sums the per-launch GPU times of an Nsight Compute CSV (scripts/gpu/profile.sh) by kernel:
where a step's GPU time goes. With --steps N, the totals are divided by N (profile.sh runs
one warm-up step and one timed step: pass --steps 2 to get one step's time, kernels of model
set-up included).
    python3 scripts/gpu/kernel_table.py ncu_1b.csv[.gz] [--steps 2] [--top 40]"""
import argparse, collections, csv, gzip, io

ap = argparse.ArgumentParser()
ap.add_argument("csv")
ap.add_argument("--steps", type=float, default=1)
ap.add_argument("--top", type=int, default=40)
a = ap.parse_args()
raw = (gzip.open if a.csv.endswith(".gz") else open)(a.csv, "rt").read()
lines = [l for l in raw.splitlines() if l.startswith('"')]
rows = list(csv.reader(io.StringIO("\n".join(lines))))
head, units, body = rows[0], rows[1], rows[2:]
name, dur = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
scale = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0}[units[dur]]
time, count = collections.Counter(), collections.Counter()
for r in body:
    k = r[name].split("(")[0][:90]
    time[k] += float(r[dur].replace(",", "")) * scale / a.steps
    count[k] += 1 / a.steps
total = sum(time.values())
print(f"{total:.2f} ms of kernel time per step in {sum(count.values()):.0f} launches")
for k, t in time.most_common(a.top):
    print(f"{t:8.3f} ms {100 * t / total:5.1f}% {count[k]:7.0f}x  {k}")
