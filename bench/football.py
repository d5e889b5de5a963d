"""Football without a model: baselines of both settings, and what the Online setting's frames cost.

    python bench/football.py online [--repeats 10 --workers 2]     # MageBench's setting: scripted answers, a turn each
    python bench/football.py render [--scenarios 4 --workers 2]    # Online frames: rendered as seen vs every step
    python bench/football.py global [--random 3 --length 20]       # our Global setting: whole plans

`online` plays football.BASELINES (random over the 16 IDs, always shoot, run right then shoot, never
in the format) on MageBench's mini subset x repeats, each repeat's engine seeded as eval.py seeds it
(football.scenario_seed(eval.seed, name, repeat)), so a model's Online `football` score from eval.py
compares with these directly; MageBench publishes 16.64 for its random baseline. No rendering: the
scripts do not look.

`render` plays the random baseline as if it looked at the frames (a model's turns without the
model): MageBench's way (every engine step rendered, 1 worker), ours (only the frames the model
sees, 1 and N workers) and none, side by side on the first K mini scenarios; checks the games are
the same and prints wall time, frames the model saw and frames/s. Needs Xvfb (started if there is
no display).

`global` plays whole plans with football.play (MageBench's rules, its shaped score) on all 108
scenarios, seeded as eval.py seeds eval.football.setting=global (football.scenario_seed(0, name)).
Prints the mean score overall, by kind and by region, the goal rate and the time per episode.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import football  # noqa: E402

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


def global_baselines(args) -> None:
    scenarios = list(football.read_scenarios().values())
    baselines = {name: (lambda s, make=make: [make(args.length, None)]) for name, make in SCRIPTS.items()}
    baselines[f"random ({args.random} plans of {args.length})"] = lambda s: [
        random.Random(f"{s.name}:{k}").choices(football.ONLINE_ACTIONS, k=args.length) for k in range(args.random)
    ]
    regions = [f"R{r}" for r in range(1, 10)]
    print("| baseline | score | goals | P | R | T | " + " | ".join(regions) + " | s/episode |")
    print("|---|---|---|---|---|---|" + "---|" * len(regions) + "---|")
    for name, plans in baselines.items():
        mean, goals, seconds, scores = run(plans, scenarios, args.seed)
        kinds, by_region = mean_by(scores, 1), mean_by(scores, 0)
        cells = [f"{kinds[k]:.2f}" for k in "PRT"] + [f"{by_region[r]:.1f}" for r in regions]
        print(f"| {name} | **{mean:.2f}** | {100 * goals:.0f}% | " + " | ".join(cells) + f" | {seconds:.2f} |", flush=True)


def online(policy: str, names, repeats: int, seed: int, render: str, workers: int):
    """(episodes played, wall s) of one scripted baseline, Online."""
    episodes = football.online_episodes(names, repeats, seed)
    wall = football.run_online(
        football.scripted(football.BASELINES[policy]), episodes, football.OnlineSettings(render=render), workers
    )
    return episodes, wall


def online_baselines(args) -> None:
    regions = [f"R{r}" for r in range(1, 10)]
    print("| baseline | score | goals | parse errors | turns | engine steps | P | R | T | " + " | ".join(regions) + " | wall s |")
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(regions) + "---|")
    for policy in football.BASELINES:
        episodes, wall = online(policy, football.MINI, args.repeats, args.seed, "none", args.workers)
        m = football.online_metrics([e.record() for e in episodes], wall)
        cells = [f"{100 * m[f'kind={k}']:.2f}" for k in "PRT"] + [f"{100 * m[f'region={r}']:.1f}" for r in regions]
        print(f"| {policy} | **{m['score']:.2f}** | {100 * m['goals']:.1f}% | {m['parse_errors']:.0f} | {m['turns']:.1f} | "
              f"{m['steps']:.1f} | " + " | ".join(cells) + f" | {wall:.0f} |", flush=True)  # fmt: skip


def render_cost(args) -> None:
    names = football.MINI[: args.scenarios]
    runs = [("every", 1), ("seen", 1), ("seen", args.workers), ("none", 1)]
    print(f"random baseline as if it looked, {len(names)} mini scenarios x 1 repeat (eval.seed {args.seed})")
    print("| frames rendered | workers | wall s | s / episode | frames seen | frames seen / s | engine steps |")
    print("|---|---|---|---|---|---|---|")
    games, walls = {}, {}
    for render, workers in runs:
        episodes, wall = online("random", names, 1, args.seed, render, workers)
        games[render, workers] = [[(t["played"], t["score"]) for t in e.turns] for e in episodes]
        walls[render, workers] = wall
        m = football.online_metrics([e.record() for e in episodes], wall)
        print(f"| {render} | {workers} | {wall:.1f} | {wall / len(names):.1f} | {m['frames']} | {m['frames_per_s']:.2f} | "
              f"{m['steps'] * len(names):.0f} |", flush=True)  # fmt: skip
    assert all(g == games["none", 1] for g in games.values()), "a rendered game differs from the unrendered one"
    print(f"the same games in every run; every / seen, 1 worker: {walls['every', 1] / walls['seen', 1]:.2f}x; "
          f"seen, 1 / {args.workers} workers: {walls['seen', 1] / walls['seen', args.workers]:.2f}x")  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    o = sub.add_parser("online", help="the Online baselines on MageBench's mini subset")
    o.add_argument("--repeats", type=int, default=10)
    o.add_argument("--workers", type=int, default=2)
    r = sub.add_parser("render", help="what the Online frames cost: rendered as seen vs every step, N workers")
    r.add_argument("--scenarios", type=int, default=4, help="the first K of the mini subset, one episode each")
    r.add_argument("--workers", type=int, default=2)
    g = sub.add_parser("global", help="whole-plan baselines on the 108 scenarios (our Global setting)")
    g.add_argument("--random", type=int, default=3, help="random plans per scenario")
    g.add_argument("--length", type=int, default=20, help="actions in the idle and random plans")
    for p in (o, r, g):
        p.add_argument("--seed", type=int, default=0, help="eval.seed: seeds every episode's engine")
    args = parser.parse_args()
    {"online": online_baselines, "render": render_cost, "global": global_baselines}[args.mode](args)


if __name__ == "__main__":
    main()
