"""One training step under each ZeRO stage beside the plain path, side by side (bench/gpu.sh).

    python bench/zero_stages.py OUT_DIR train.py-overrides...

Runs train.py once per trainer.zero_stage in 0 1 2 3, all at once, each in OUT_DIR/zeroN (emptied
first), with an entropy bonus so that the step has a gradient whatever the rewards (a random model's
are all 0) and no KL: the plain path's fp32 policy and bf16 reference differ, so its KL rewards
would give it a gradient that DeepSpeed's bf16 policy, equal to its reference, does not have.
Micro-batches of 320 tokens: the tiny preset's ~260-token prompt with two of its completions each,
so the step sums several micro-batches' gradients, which is where ZeRO's accumulation can go wrong.
Stage 0 is the plain path (fp32 master weights under bf16 autocast); 1, 2 and 3 are DeepSpeed's
optimizers on bf16 weights (BF16_Optimizer, ZeRO-2, ZeRO-3), with our fp32 gradient sums and
backward prologue. The first step's entropy (the forward) and gradient norm (the backward, before
clipping) must agree with stage 0's within `TOLERANCE`: double-counted or dropped micro-batches, or
a zero gradient, are off by far more than bf16's rounding (without dist.backward's backward prologue
ZeRO-1 reads 5.4x). The small losses of bf16 gradient sums are tests/test_distributed.py's to catch.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TOLERANCE = 0.02  # relative; measured 0.03% (CPU) and 0.05% (H200) apart; one of 8 micro-batches dropped: 19%
STAGES = (0, 1, 2, 3)


def main(out: Path, overrides: list) -> int:
    runs = {z: out / f"zero{z}" for z in STAGES}
    procs = {}
    launcher = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher}  # each its own one-rank group
    for z, run in runs.items():
        shutil.rmtree(run, ignore_errors=True)  # a run dir with a checkpoint would resume it: nothing trained
        run.mkdir(parents=True)
        cmd = [sys.executable, "train.py", *overrides, f"trainer.zero_stage={z}", "trainer.max_steps=1",
               "algo.entropy_coef=0.01", "algo.kl_coef=0", "trainer.max_tokens_per_micro=320", f"hydra.run.dir={run}"]  # fmt: skip
        with open(run / "stdout.log", "w") as log:  # each picks its own free port (dist.init_distributed)
            procs[z] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    rcs = {z: p.wait() for z, p in procs.items()}
    rows = {}
    for z, run in runs.items():
        if rcs[z]:
            print(f"ZeRO {z}: train.py exited {rcs[z]}; the end of {run}/stdout.log:")
            print("".join((run / "stdout.log").read_text().splitlines(keepends=True)[-15:]))
            continue
        m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        m.setdefault("loss/grad_norm", float("nan"))  # absent when the update was not finite (skipped)
        rows[z] = m
        print(
            f"ZeRO {z}: grad_norm {m['loss/grad_norm']:.6g}  entropy {m['loss/entropy']:.6g}  update {m['perf/update_s']:.2f} s"
        )
    if len(rows) < len(STAGES):
        return 1
    bad = [
        f"ZeRO {z} {key} {rows[z][key]:.6g} vs {rows[0][key]:.6g}"
        for z in STAGES[1:]
        for key in ("loss/grad_norm", "loss/entropy")
        if not abs(rows[z][key] - rows[0][key]) <= TOLERANCE * abs(rows[0][key])
    ]
    if not rows[0]["loss/grad_norm"] > 0:
        bad.append("the plain path's gradient norm is not positive: the check compares nothing")
    print("\n".join(bad) or f"every stage within {TOLERANCE:.0%} of the plain path")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
