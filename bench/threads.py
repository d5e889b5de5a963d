"""torch's intra-op CPU threads when a run is not alone on its cores: `python train.py debug=tiny`,
timed alone and beside a second identical run, for each thread setting, side by side in one call.

    python bench/threads.py [--steps 20] [--threads 2 1] [--repeats 2]

Each run is its own process (`python train.py debug=tiny trainer.max_steps=STEPS`, warm start cached
first), started with `trainer.threads=N`; the figure is the median step time (perf/step_s, the first
step left out) of each run. "pair" starts two runs at once and reports both. Ratios are against one
run alone with torch's own default (as many threads as cores).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(run_dir: str, threads: int, steps: int) -> subprocess.Popen:
    args = [sys.executable, os.path.join(ROOT, "train.py"), "debug=tiny", f"trainer.max_steps={steps}", f"trainer.threads={threads}",
            "log.wandb=disabled", "log.progress=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen(args, cwd=run_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def step_time(run_dir: str) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return statistics.median(json.loads(line)["perf/step_s"] for line in list(f)[1:])


def timed(threads: int, steps: int, together: int, root: str) -> list:
    """Median step seconds of each of `together` runs started at once."""
    dirs = [tempfile.mkdtemp(dir=root) for _ in range(together)]
    procs = [start(d, threads, steps) for d in dirs]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"a run failed:\n{err[-3000:]}")
    return [step_time(d) for d in dirs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[os.cpu_count(), 1],
        help="trainer.threads values (default: a thread per core, as torch's own choice, then 1)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = tempfile.mkdtemp()
    timed(1, 2, 1, root)  # builds the warm start (cached) before anything is timed
    rows = {}
    for _ in range(args.repeats):  # settings interleaved, so that drift in the machine's speed hits each alike
        for threads in args.threads:
            rows.setdefault((threads, "alone"), []).extend(timed(threads, args.steps, 1, root))
            rows.setdefault((threads, "pair"), []).extend(timed(threads, args.steps, 2, root))
    base = statistics.median(rows[(os.cpu_count(), "alone")]) if (os.cpu_count(), "alone") in rows else None
    print(f"{os.cpu_count()} cores, {args.steps} steps of debug=tiny, median step seconds over {args.repeats} repeats")
    print(f"{'trainer.threads':>16} {'runs':>6} {'step s':>8} {'vs default alone':>17}")
    for (threads, how), times in rows.items():
        med = statistics.median(times)
        ratio = f"{med / base:17.2f}" if base else ""
        print(f"{threads:>16} {how:>6} {med:8.3f} {ratio}")


if __name__ == "__main__":
    main()
