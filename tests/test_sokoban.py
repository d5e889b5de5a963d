"""Sokoban levels: the solver's optimal lengths, generated levels, replay rules and rendering."""

import pytest

from sokoban import COLORS, format_level, generate_level, parse_level, parse_moves, render, replay, solve

# (level, optimal number of moves or None when unsolvable), optima counted by hand
HAND_MADE = [
    ("#####\n#@$.#\n#####", 1),  # one push
    ("######\n#@ $.#\n######", 2),  # walk, then push
    ("######\n#    #\n# $$ #\n# ..@#\n######", 7),  # uu l D u l D
    ("#######\n#.$@$.#\n#######", 3),  # L (push), r, R (push)
    ("#####\n#@$ #\n#  .#\n#####", None),  # the box can only go into a corner
    ("####\n#@$#\n#. #\n####", None),  # box already in a corner
    ("#####\n#@*.#\n#  $#\n#####", None),  # one box on a goal, the other can never be pushed up
    ("#####\n#+$ #\n#####", None),  # the only goal is behind the player
    ("#####\n#@* #\n#####", 0),  # already solved
]


@pytest.mark.parametrize("level, optimum", HAND_MADE)
def test_solver_is_optimal_on_hand_made_levels(level, optimum):
    for prune in (True, False):  # dead-square pruning changes the speed, never the answer
        solution = solve(level, prune=prune)
        if optimum is None:
            assert solution is None
        else:
            assert len(solution) == optimum
            assert replay(level, list(solution))[1]


def test_solver_marks_pushes_in_upper_case():
    assert solve("######\n#@ $.#\n######") == "rR"


@pytest.mark.parametrize("size, boxes", [(6, 1), (7, 2), (7, 3), (8, 2)])
def test_generated_levels_are_solvable_nontrivial_and_deterministic(size, boxes):
    for seed in range(60):
        level = generate_level(size, size, boxes, seed, min_moves=8)
        board = parse_level(level)
        assert len(board.boxes) == boxes and not board.boxes & board.goals  # no box starts on a goal
        assert (board.height, board.width) == (size, size)
        solution = solve(level)
        assert solution is not None and len(solution) >= 8
        assert replay(level, solution)[1]
        assert generate_level(size, size, boxes, seed, min_moves=8) == level
    assert len({generate_level(size, size, boxes, s) for s in range(20)}) > 15  # seeds give different levels


def test_impossible_generation_says_so():
    with pytest.raises(ValueError, match="no 4x4 level with 5 boxes"):
        generate_level(4, 4, 5, seed=0, max_tries=20)


def test_replay_follows_gym_sokoban_rules():
    level = "#######\n#@ $ .#\n#  $ .#\n#######"
    assert replay(level, "Right, Right")[0].split("\n")[1] == "#  @$.#"  # walk, then push one box
    assert replay(level, "Left, Up")[0] == level  # into walls: nothing changes
    blocked = "#######\n#@$$..#\n#######"
    assert replay(blocked, "R")[0] == blocked  # two boxes in a row cannot be pushed
    final, solved = replay("######\n#@ $.#\n######", "right, right, left, left")
    assert solved and final == "######\n#  @*#\n######"  # play stops once solved
    with pytest.raises(ValueError, match="moves"):
        replay(level, "Right, Jump")


@pytest.mark.parametrize(
    "text, moves",
    [("Left, Up, Right, Down", list("LURD")), ("left,up", list("LU")), ("LURD", list("LURD")), ("lurdLURD", list("LURDLURD"))],
)
def test_moves_as_words_or_letters(text, moves):
    assert parse_moves(text) == moves


@pytest.mark.parametrize("text", ["", "Left, Jump", "go left", "L, 2"])
def test_malformed_moves(text):
    assert parse_moves(text) is None


@pytest.mark.parametrize(
    "text, error",
    [("#####\n#$.#\n#####", "one player"), ("#####\n#@$ #\n#####", "as many goals"), ("#@x.#", "unknown tile")],
)
def test_bad_levels_are_named(text, error):
    with pytest.raises(ValueError, match=error):
        parse_level(text)


def test_level_text_round_trips():
    for seed in range(10):
        level = generate_level(7, 7, 2, seed)
        assert format_level(parse_level(level)) == level


def test_render_fits_the_28_pixel_grid_and_is_deterministic():
    level = generate_level(7, 7, 2, seed=3)
    a, b = render(level), render(level)
    assert a.size == (7 * 28, 7 * 28) and a.size[0] % 28 == 0
    assert a.tobytes() == b.tobytes()
    assert render(level, tile=56).size == (392, 392)
    moved = replay(level, solve(level)[:1])[0]
    assert render(moved).tobytes() != a.tobytes()  # the picture shows the state
    board = parse_level("#####\n#@$.#\n#####")
    image = render(board)
    assert image.getpixel((1 * 28 + 14, 1 * 28 + 14)) == COLORS["player"]  # the green character where it stands
    assert image.getpixel((2 * 28 + 9, 1 * 28 + 14)) == COLORS["box"]  # the yellow box
    assert image.getpixel((3 * 28 + 14, 1 * 28 + 14)) == COLORS["goal"]  # the red dot
    assert render("#####\n# @*#\n#####").getpixel((3 * 28 + 14, 1 * 28 + 14)) == COLORS["goal"]  # still seen under a box
