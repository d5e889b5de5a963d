"""The Sokoban reward: format gate, replay, the three shapings, malformed counting, the level check."""

import pytest

from rewards import (
    REWARDS,
    Malformed,
    level_problem,
    reward_pool,
    repeats_back_to_back,
    score,
    sokoban_moves,
    sokoban_reward,
)
from sokoban import best_return, box_progress, env_reward, parse_level, solve, step

#   #######
#   #@ $ .#     Right x3 pushes box A onto its goal; Left, Left, Down puts the player behind box B;
#   #  $ .#     Right x2 pushes B onto its goal. 8 moves (as short as any solution).
#   #######
LEVEL = "#######\n#@ $ .#\n#  $ .#\n#######"
SOLVE = "Right, Right, Right, Left, Left, Down, Right, Right"
ROW = {"answer": SOLVE, "level": LEVEL}


def answer(moves: str, think: str = "plan") -> str:
    return f"<think>{think}</think><answer>{moves}</answer>"


def test_the_hand_solution_is_optimal_and_scores_one():
    assert len(solve(LEVEL)) == 8
    assert sokoban_reward(answer(SOLVE), ROW) == 1.0


@pytest.mark.parametrize(
    "moves",
    [
        SOLVE,
        "right,right,right,left,left,down,right,right",  # case and spaces do not matter
        "RRRLLDRR",  # LURD letters
        SOLVE + ", Up, Up",  # moves after the solve are not played
        "Left, Up, " + SOLVE,  # bumps into walls change nothing
    ],
)
def test_solutions_score_one_under_every_shaping_but_lmm_r1(moves):
    for shaping in ("none", "progress"):
        assert sokoban_reward(answer(moves), ROW, shaping) == 1.0


@pytest.mark.parametrize(
    "moves, progress",
    [
        ("Right, Right, Right", 0.5),  # box A on its goal, B not
        ("Right, Right", 0.0),  # box A moved but on no goal
        ("Down, Right, Right", 0.0),  # B pushed one step, not onto its goal
        ("Right, Right, Right, Left", 0.5),  # walking away keeps A on its goal
    ],
)
def test_partial_answers_score_zero_or_their_progress(moves, progress):
    assert sokoban_reward(answer(moves), ROW) == 0.0
    assert sokoban_reward(answer(moves), ROW, "progress") == pytest.approx(0.5 * progress)


def test_progress_counts_only_boxes_placed_by_the_answer():
    level = "########\n#@$ * .#\n########"  # one box already on a goal at the start
    assert box_progress(level, []) == 0.0
    assert box_progress(level, "RR") == 0.0  # the pushed box is not on a goal yet
    # pushing the first box into the second pushes nothing: the goal box never leaves
    assert box_progress(level, "RRR") == 0.0


@pytest.mark.parametrize(
    "completion",
    [
        "Right, Right, Right",  # no tags
        "<think>x</think> <answer>Right</answer>",  # a space between the tags: strict format
        answer(""),  # empty answer
        answer("Right, Jump"),  # not a move
        answer("I would go Right"),  # prose
        answer("Right.") + answer("Right"),  # two answers
        answer("R, U, 2"),
        "<think>a</think><answer>Right</answer> trailing",
    ],
)
def test_malformed_answers_raise_malformed_and_score_zero_when_scored(completion):
    with pytest.raises(Malformed):
        sokoban_moves(completion)
    for name in ("sokoban", "sokoban_progress", "sokoban_lmm_r1"):
        with pytest.raises(Malformed):
            REWARDS[name](completion, ROW)


def test_score_counts_malformed_answers_apart_from_errors():
    pool = reward_pool(1)
    completions = [answer(SOLVE), answer("Jump"), "no tags", answer("Right, Right, Right")]
    rows = [ROW] * 4
    total, parts, counts = score(pool, completions, rows, {"format": 0.5, "sokoban_progress": 1.0}, timeout_s=5.0)
    assert parts["sokoban_progress"] == [1.0, 0.0, 0.0, 0.25]
    assert total == [1.5, 0.5, 0.0, 0.75]  # the format part still pays for good tags around a bad list
    assert counts["malformed"] == 2 and counts["sokoban_progress_malformed"] == 2
    assert counts["errors"] == 0 and counts["timeouts"] == 0


def test_gym_sokoban_step_rewards():
    a = parse_level("######\n#@$ .#\n######")
    b = parse_level("######\n# @$.#\n######")
    c = parse_level("######\n#  @*#\n######")
    assert env_reward(a, a) == pytest.approx(-0.1)  # a move (even a blocked one) costs 0.1
    assert env_reward(a, b) == pytest.approx(-0.1)
    assert env_reward(b, c) == pytest.approx(-0.1 + 1 + 10)  # a box onto its goal, and solved
    on = parse_level("#######\n# @*  #\n# $ . #\n#######")
    off, pushed = step(on, "R")
    assert pushed and env_reward(on, off) == pytest.approx(-0.1 - 1)  # a box pushed off its goal


def test_lmm_r1_shaping_by_hand():
    # solved in 8 moves: best running return -0.8 + 1 + 1 + 10 = 11.2, length bonus 8 * 0.05,
    # thinking bonus 0.001 per word longer than one character ("I" does not count)
    completion = answer(SOLVE, think="I push the top box first")
    expected = 11.2 + 0.4 + 0.001 * 5
    assert sokoban_reward(completion, ROW, "lmm_r1") == pytest.approx(expected)
    # 3 moves: A lands on its goal after move 3: -0.3 + 1 = 0.7; length bonus 0.15; no thinking words
    assert sokoban_reward(answer("Right, Right, Right", think=""), ROW, "lmm_r1") == pytest.approx(0.7 + 0.15)
    # the best running return, not the final one: walking off after placing A does not lower it
    walk_off = "Right, Right, Right, Left, Left, Left, Left"
    assert best_return(LEVEL, [m[0] for m in walk_off.split(", ")]) == pytest.approx(0.7)
    # only the first 50 moves play; 50 moves of bumping into the left wall: return 0 (never above 0),
    # length bonus 1 - 0.2 * (30 / 30)^2 = 0.8, minus 0.2 for a repeated pattern, then min(0, .) = 0
    assert sokoban_reward(answer(", ".join(["Left"] * 50), think=""), ROW, "lmm_r1") == pytest.approx(0.0)
    # 20 moves with no pattern repeated 8 times: bonus 20 * 0.05 capped at 1.0 from there
    assert sokoban_reward(answer(", ".join(["Left", "Up", "Left", "Left"] * 5), think=""), ROW, "lmm_r1") == pytest.approx(1.0)


@pytest.mark.parametrize(
    "words, repeated",
    [
        (list("L" * 8), True),  # one move 8 times in a row
        (list("L" * 7), False),  # 7 times is allowed
        (list("LR" * 8), True),
        (list("LR" * 7 + "L"), False),
        (list("LURDD" * 8), True),  # a 5-move pattern
        (list("LURDDU" * 8), False),  # 6-move patterns are not checked (LMM-R1's max_k = 5)
        (list("LLLLRLLLL"), False),
    ],
)
def test_repeat_check(words, repeated):
    assert repeats_back_to_back(words, times=7, max_k=5) == repeated


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"answer": "x"}, "no 'level'"),
        ({"answer": "x", "level": "#####\n#@x.#\n#####"}, "unknown tile"),
        ({"answer": "x", "level": "#####\n#@* #\n#####"}, "already solved"),
        ({"answer": "x", "level": "####\n#@$#\n#. #\n####"}, "unsolvable"),
        ({"answer": "x", "level": LEVEL}, None),
    ],
)
def test_level_check_at_load(row, problem):
    result = level_problem(row)
    assert (result is None) if problem is None else problem in result
