"""Sokoban labelling speed: the solver with and without dead-square pruning, side by side.

    python bench/sokoban.py --levels 300

Generates the levels a build would (7x7 with 2 and 3 boxes, and 9x9 with 3), then solves each one
both ways in the same process and prints time per level and the ratio. Both searches are
breadth-first over (player, boxes), so their solution lengths must agree: the script checks it.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sokoban import generate_level, solve  # noqa: E402


def per_level_ms(levels, **kw):
    t0 = time.perf_counter()
    solutions = [solve(level, **kw) for level in levels]
    return (time.perf_counter() - t0) / len(levels) * 1e3, solutions


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", type=int, default=300, help="levels per size")
    args = parser.parse_args()
    print("| size | boxes | generate ms/level | solve ms/level (pruned) | unpruned | speed-up |")
    print("|---|---|---|---|---|---|")
    for size, boxes in [(7, 2), (7, 3), (9, 3)]:
        t0 = time.perf_counter()
        levels = [generate_level(size, size, boxes, seed) for seed in range(args.levels)]
        gen_ms = (time.perf_counter() - t0) / args.levels * 1e3
        pruned_ms, pruned = per_level_ms(levels)
        plain_ms, plain = per_level_ms(levels, prune=False)
        assert [len(s) for s in pruned] == [len(s) for s in plain], "pruning changed an optimal length"
        print(f"| {size}x{size} | {boxes} | {gen_ms:.2f} | {pruned_ms:.3f} | {plain_ms:.3f} | {plain_ms / pruned_ms:.1f}x |")


if __name__ == "__main__":
    main()
