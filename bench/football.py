"""Football baselines: what plans without a model score on MageBench's 108 scenarios (Global setting).

    python bench/football.py --random 3 --length 20

Every baseline is played with football.play (MageBench's rules, its shaped score), each scenario's
engine seeded as eval.py seeds it (football.scenario_seed(0, name)), so a model's `football` score
from eval.py compares with these directly. Prints the mean score overall, by kind and by region,
the goal rate and the time per episode. No rendering: runs headless, without a display.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import football  # noqa: E402

# What MageBench's own agents may answer (Flow/Online_HL_FBandSB.py accepts these 16 names).
AGENT_ACTIONS = football.MOVES + football.KICKS + ("action_sprint", "action_release_sprint", "action_dribble",
                                                   "action_release_dribble")  # fmt: skip
SCRIPTS = {
    "idle": lambda n, rng: ["action_idle"] * n,
    "idle, a whole episode (400)": lambda n, rng: ["action_idle"] * football.MAX_STEPS,  # LMM-R1's idle baseline
    "run right, shoot": lambda n, rng: ["action_right"] * 4 + ["action_shot"],
    "pass, run right, shoot": lambda n, rng: ["action_right", "action_short_pass"] + ["action_right"] * 3 + ["action_shot"],
}


def mean_by(scores, part: int) -> dict:
    """Mean score by one part of the scenario names (0: region R1..R9, 1: kind P/R/T)."""
    groups = {}
    for name, values in scores.items():
        groups.setdefault(name.split("_")[part], []).extend(values)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def run(plans, scenarios, seed):
    """(mean score, goal rate, seconds per episode, scores by scenario) over every plan of every scenario."""
    t0, scores, goals = time.perf_counter(), {}, 0
    for s in scenarios:
        for plan in plans(s):
            episode = football.play(s, plan, football.scenario_seed(seed, s.name))
            scores.setdefault(s.name, []).append(episode.score.total)
            goals += episode.end == "goal"
    n = sum(len(v) for v in scores.values())
    return sum(sum(v) for v in scores.values()) / n, goals / n, (time.perf_counter() - t0) / n, scores


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--random", type=int, default=3, help="random plans per scenario")
    parser.add_argument("--length", type=int, default=20, help="actions in the idle and random plans")
    parser.add_argument("--seed", type=int, default=0, help="eval.seed: seeds every scenario's engine")
    args = parser.parse_args()
    scenarios = list(football.read_scenarios().values())
    baselines = {name: (lambda s, make=make: [make(args.length, None)]) for name, make in SCRIPTS.items()}
    baselines[f"random ({args.random} plans of {args.length})"] = lambda s: [
        random.Random(f"{s.name}:{k}").choices(AGENT_ACTIONS, k=args.length) for k in range(args.random)
    ]
    regions = [f"R{r}" for r in range(1, 10)]
    print("| baseline | score | goals | P | R | T | " + " | ".join(regions) + " | s/episode |")
    print("|---|---|---|---|---|---|" + "---|" * len(regions) + "---|")
    for name, plans in baselines.items():
        mean, goals, seconds, scores = run(plans, scenarios, args.seed)
        kinds, by_region = mean_by(scores, 1), mean_by(scores, 0)
        cells = [f"{kinds[k]:.2f}" for k in "PRT"] + [f"{by_region[r]:.1f}" for r in regions]
        print(f"| {name} | **{mean:.2f}** | {100 * goals:.0f}% | " + " | ".join(cells) + f" | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
