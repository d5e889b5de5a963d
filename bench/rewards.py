"""Our math verifier vs a plain math-verify loop, side by side on one realistic rollout batch; then
our pool vs the pool of an earlier commit on a batch where many completions hang.

    python bench/rewards.py [--prompts 64] [--group 16] [--workers 2] [--timeout 2.0]
                            [--hang-frac 0.1] [--hang-timeout 1.0] [--baseline-rev 3259b19]

The batch: `prompts` golds in the styles of DeepScaleR/MATH, VerMulti and MathVista/MMStar, each with
`group` completions (reasoning in <think>, answer in <answer>): right as written, right in another
form, wrong, malformed (no tags, cut off), hedged, and two pathological answers in the whole batch.
The plain loop is what TRL's accuracy reward does: parse(gold), parse(completion), verify(gold, pred)
per completion, math-verify's own (SIGALRM) timeouts. Ours: rewards.score on a warm RewardPool.
Prints throughput ratio, per-call latency (p50/p99/max) and verdict agreement, listing every
disagreement with its category, so each can be checked against the policy in rewards.py.

Many hangs: the same batch with `hang-frac` of its completions answering a power tower that no
verifier finishes, scored by rewards.score with `hang-timeout` on a warm pool: ours (replacements
forked from a warm zygote, a spare worker) and `baseline-rev`'s rewards.py as it was (replacements
started as fresh interpreters on the caller's path). The ideal is ceil(hangs / workers) x timeout.
"""

import argparse
import importlib.util
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from math_verify import parse, verify  # noqa: E402

import rewards  # noqa: E402
from rewards import RewardPool, groups, last_boxed  # noqa: E402

# k -> (gold, other right forms, wrong answers); every prompt of the batch gets its own k, so golds
# differ across prompts as in a real step. Categories name the policy that applies.
PROBLEMS = {
    "integer": lambda k: (f"{60 + k}", [f"{60 + k}.0", f"\\frac{{{2 * (60 + k)}}}{{2}}"], [f"{61 + k}"]),
    "integer (VerMulti)": lambda k: (f"$\\boxed{{{70 + k}}}$", [f"{70 + k}"], [f"{71 + k}"]),
    "fraction": lambda k: (f"\\frac{{1}}{{{k + 2}}}", [f"\\dfrac{{1}}{{{k + 2}}}", f"1/{k + 2}"], [f"\\frac{{1}}{{{k + 3}}}"]),
    "radical": lambda k: (f"{k + 2}\\sqrt{{2}}", [f"\\sqrt{{{2 * (k + 2) ** 2}}}"], [f"{k + 2}\\sqrt{{3}}"]),
    "expression": lambda k: (f"(x+{k + 1})^2", [f"x^2+{2 * (k + 1)}x+{(k + 1) ** 2}"], [f"x^2+{(k + 1) ** 2}"]),
    "pair": lambda k: (f"({k},{k + 1})", [f"({k}, {k + 1})"], [f"[{k},{k + 1}]", f"({k + 1},{k})"]),
    "set vs pair": lambda k: (f"\\{{{k},{k + 1}\\}}", [f"\\{{{k + 1},{k}\\}}"], [f"({k},{k + 1})"]),
    "interval": lambda k: (f"(-\\infty, {k})", [f"(-\\infty,{k})"], [f"(-\\infty,{k}]"]),
    "percent": lambda k: (f"{k + 10}\\%", [f"{k + 10}", f"{(k + 10) / 100}"], [f"{k + 11}\\%", f"{(k + 11) / 100}"]),
    "degrees": lambda k: (f"{k + 30}^\\circ", [f"{k + 30}"], [f"{k + 31}^\\circ"]),
    "units": lambda k: (f"{k + 5}\\text{{ cm}}", [f"{k + 5}", f"{k + 5} cm"], [f"{k + 6}\\text{{ cm}}"]),
    "thousands": lambda k: (f"{1000 * (k + 1)}", [f"{k + 1},000"], [f"{k + 1}00"]),
    "integer vs decimal": lambda k: (f"{k + 3}", [f"{k + 3}.0"], [f"{k + 2}.9999999"]),
    "decimal precision": lambda k: (f"\\frac{{1}}{{{3 * (k + 1)}}}", [f"{1 / (3 * (k + 1)):.6g}"], [f"{1 / (3 * (k + 1)):.2g}"]),
    "tiny quantities": lambda k: (f"\\frac{{1}}{{2^{{{k + 90}}}}}", [f"2^{{-{k + 90}}}"], [f"\\frac{{1}}{{2^{{{k + 89}}}}}"]),
    "vector vs tuple": lambda k: (f"\\begin{{pmatrix}}{k}\\\\{k + 1}\\end{{pmatrix}}", [f"({k},{k + 1})"], [f"({k + 1},{k})"]),
    "choice letter": lambda k: ("ABCD"[k % 4], [f"({'ABCD'[k % 4]})"], ["abcd"[k % 4], "ABCD"[(k + 1) % 4]]),
    "text answer": lambda k: (
        ["\\text{odd}", "\\text{even}"][k % 2],
        [["\\text{Odd}", "\\text{Even}"][k % 2]],
        [["\\text{even}", "\\text{odd}"][k % 2]],
    ),
    "MathVista decimal": lambda k: (f"{k + 1}.45", [f"{k + 1}.450"], [f"{k + 1}.4"]),
    "assignment": lambda k: (f"x={k + 2}", [f"{k + 2}"], [f"x={k + 3}"]),
}

REASONING = (
    "Let me work through this step by step. First we set up the equation $a + b = c$ and note that "
    "$\\frac{a}{b} = k$. Substituting gives $k b + b = c$, so $b = \\frac{c}{k+1}$. Checking the case "
    "$k = 1$ we get $b = \\frac{c}{2}$, which matches the figure. "
)


def completion_for(kind: str, answer: str, rng: random.Random) -> str:
    """One completion whose final answer is `answer`, in the way `kind` says."""
    think = REASONING * rng.randint(1, 4)
    if kind == "no tags":
        return think + f"So the answer is {answer}."
    if kind == "cut off":
        return "<think>" + think[: rng.randint(50, len(think))]
    if kind == "hedge":
        return f"<think>{think}</think><answer>$\\boxed{{{answer}}}$ or $\\boxed{{{answer}+1}}$</answer>"
    return f"<think>{think}</think><answer>The answer is $\\boxed{{{answer}}}$</answer>"


PATHOLOGICAL = ["9^{9^{9}}", "{" * 2000 + "1" + "}" * 2000]


def build_batch(prompts: int, group: int, seed: int):
    """(completions, samples, labels): labels say how each completion was made."""
    rng = random.Random(seed)
    completions, samples, labels = [], [], []
    categories = list(PROBLEMS)
    for p in range(prompts):
        category = categories[p % len(categories)]
        gold, right, wrong = PROBLEMS[category](p)
        for _ in range(group):
            r = rng.random()
            if r < 0.30:
                kind, answer = "right as written", last_boxed(gold) or gold
            elif r < 0.50:
                kind, answer = "right, other form", rng.choice(right)
            elif r < 0.78:
                kind, answer = "wrong", rng.choice(wrong)
            elif r < 0.86:
                kind, answer = "no tags", rng.choice(right + [gold])
            elif r < 0.94:
                kind, answer = "cut off", gold
            else:
                kind, answer = "hedge", gold
            completions.append(completion_for(kind, answer, rng))
            samples.append({"answer": gold})
            labels.append((category, kind, answer))
    for i, bad in zip(rng.sample(range(len(completions)), len(PATHOLOGICAL)), PATHOLOGICAL):
        completions[i] = completion_for("right as written", bad, rng)
        labels[i] = ("pathological", "pathological", bad[:30])
    return completions, samples, labels


def plain_loop(completions, samples):
    """TRL-style: parse the gold and the whole completion with math-verify, verify, per completion."""
    verdicts, seconds = [], []
    for completion, sample in zip(completions, samples):
        start = time.perf_counter()
        gold = parse(sample["answer"] if sample["answer"].startswith("$") else f"${sample['answer']}$")
        pred = parse(completion)
        verdicts.append(float(verify(gold, pred)) if gold and pred else 0.0)
        seconds.append(time.perf_counter() - start)
    return verdicts, seconds


def ours(completions, samples, timeout_s, workers):
    """rewards.score's path (a task per prompt group on a warm pool), keeping each call's latency."""
    pool = RewardPool(workers)  # a fresh pool: no verdicts cached from an earlier run
    pool.run([[("score", ("math", "<answer>1</answer>", {"answer": "1"}))]] * workers, 60.0)
    index = groups(samples)
    start = time.perf_counter()
    outcomes = pool.run([[("score", ("math", completions[i], samples[i])) for i in group] for group in index], timeout_s)
    elapsed = time.perf_counter() - start
    pool.close()
    verdicts, seconds, counts = [0.0] * len(completions), [], Counter()
    for group, group_outcomes in zip(index, outcomes):
        for i, outcome in zip(group, group_outcomes):
            counts["timeouts"] += outcome.timeout
            counts["errors"] += outcome.error is not None
            verdicts[i] = float(outcome.value) if not (outcome.timeout or outcome.error) else 0.0
            seconds.append(outcome.seconds)
    return verdicts, seconds, counts, elapsed


def latency(seconds):
    s = sorted(seconds)
    return f"p50 {1e3 * statistics.median(s):7.1f} ms  p99 {1e3 * s[int(0.99 * (len(s) - 1))]:7.1f} ms  max {1e3 * s[-1]:7.1f} ms"


def compare(name, completions, samples, labels, timeout_s, workers):
    start = time.perf_counter()
    plain, plain_s = plain_loop(completions, samples)
    t_plain = time.perf_counter() - start
    mine, mine_s, counts, t_mine = ours(completions, samples, timeout_s, workers)
    n = len(completions)
    print(f"\n== {name}: {n} completions")
    print(f"plain loop : {n / t_plain:8.1f} completions/s  {latency(plain_s)}")
    print(
        f"ours       : {n / t_mine:8.1f} completions/s  {latency(mine_s)}  (timeouts {counts['timeouts']}, errors {counts['errors']})"
    )
    print(f"throughput ratio: {t_plain / t_mine:.1f}x   max latency {max(mine_s):.2f} s vs bound {timeout_s + 0.5:.1f} s")
    disagree = Counter((labels[i][0], labels[i][1], labels[i][2], plain[i], mine[i]) for i in range(n) if plain[i] != mine[i])
    print(
        f"verdict agreement: {n - sum(disagree.values())}/{n}; disagreements (category, how made, answer: plain -> ours, count):"
    )
    for (category, kind, answer, p, m), k in sorted(disagree.items()):
        print(f"  {category:20} {kind:18} {answer[:32]!r:36} {p:.0f} -> {m:.0f}  x{k}")


def rewards_at(rev: str):
    """rewards.py as it was at git `rev`, imported as its own module. Its workers import it as
    `rewards` from the same temporary directory, which comes first on their PYTHONPATH."""
    source = subprocess.run(["git", "show", f"{rev}:rewards.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    path = os.path.join(tempfile.mkdtemp(), "rewards.py")
    with open(path, "w") as f:
        f.write(source.stdout)
    spec = importlib.util.spec_from_file_location("rewards_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HANG = "\\sum_{n=1}^{10^{9}} n^{n}"  # sympy sums it term by term: no verifier finishes


def many_hangs(completions, samples, frac, timeout_s, workers, rev):
    """Both pools on the batch with `frac` of its completions hanging: wall time against the ideal."""
    rng = random.Random(1)
    symbolic = [i for i, s in enumerate(samples) if rewards.gold_kind(s["answer"]) == "math"]  # golds sympy compares
    hung = set(rng.sample(symbolic, round(frac * len(completions))))
    batch = [completion_for("right as written", HANG, rng) if i in hung else c for i, c in enumerate(completions)]
    print(f"\n== many hangs: {len(batch)} completions, {len(hung)} answering {HANG}, {workers} workers, timeout_s {timeout_s}")
    verdicts = {}
    for name, module in (("ours", rewards), (f"at {rev}", rewards_at(rev))):
        os.chdir(os.path.dirname(module.__file__))  # `python -c "import rewards"` looks in the cwd first
        pool = module.RewardPool(workers)
        module.score(pool, ["<answer>1</answer>"] * workers, [{"answer": str(k)} for k in range(workers)], {"math": 1.0}, 60.0)
        start = time.perf_counter()
        total, _, counts = module.score(pool, batch, samples, {"math": 1.0}, timeout_s)
        elapsed = time.perf_counter() - start
        pool.close()
        verdicts[name] = total
        ideal = math.ceil(counts["timeouts"] / workers) * timeout_s  # the hangs' own cost, ceil(hangs / workers) x timeout
        print(f"{name:14}: {elapsed:6.1f} s  ({elapsed / max(ideal, 1e-9):.2f}x ceil(timeouts / workers) x timeout = {ideal:.1f} s)"
              f"  timeouts {counts['timeouts']}, errors {counts['errors']}")  # fmt: skip
    (a, b) = verdicts.values()
    print(
        f"verdicts equal on {sum(x == y for x, y in zip(a, b))}/{len(batch)} (any difference: the policy's changes since {rev})"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hang-frac", type=float, default=0.1)
    ap.add_argument("--hang-timeout", type=float, default=1.0)
    ap.add_argument("--baseline-rev", default="3259b19", help="the commit whose rewards.py is 'today's pool'")
    args = ap.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its per-timeout warnings
    completions, samples, labels = build_batch(args.prompts, args.group, args.seed)
    print(f"{os.cpu_count()} CPU cores, {args.workers} reward workers (started before timing), timeout_s {args.timeout}")
    keep = [i for i, label in enumerate(labels) if label[0] != "pathological"]
    subset = [[x[i] for i in keep] for x in (completions, samples, labels)]
    compare("without the pathological answers", *subset, args.timeout, args.workers)
    compare("full batch", completions, samples, labels, args.timeout, args.workers)
    many_hangs(*subset[:2], args.hang_frac, args.hang_timeout, args.workers, args.baseline_rev)


if __name__ == "__main__":
    main()
