"""Compares the token metrics `peft train` logs (entropy, mean_token_accuracy and their eval_
forms, with the losses) with TRL's SFTTrainer on the same records: SmolLM2, LoRA all-linear without dropout, one
step at a negligible learning rate, so that both runs measure the base model (the adapter's B
starts at zero). The train metrics are one batch of all the records; the eval metrics the mean
over eval batches of 2, which TRL and peft both average.

    .venv/bin/python scripts/hf/check_token_metrics.py [--peft PATH] [--model-dir DIR]
"""

import json
import tempfile

from harness import arguments, one_step_logs

args = arguments("model-dir", "data").parse_args()

records = [json.loads(line) for line in open(args.data)][:10]
train, evaluation = records[:6], records[6:]
trl, ours = one_step_logs(args.peft, args.model_dir, train, evaluation, tempfile.mkdtemp(),
                          "all-linear")

failed = 0
for key in ["loss", "entropy", "mean_token_accuracy", "eval_loss", "eval_entropy",
            "eval_mean_token_accuracy"]:
    # f32 logits computed in another order can swap a near tie: allow one token of the batch.
    tolerance = 1 / 100 if "accuracy" in key else 1e-4 * abs(trl[key])
    ok = abs(ours[key] - trl[key]) <= tolerance
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {key:26s} peft {ours[key]:.6f}  TRL {trl[key]:.6f}")
raise SystemExit(failed)
