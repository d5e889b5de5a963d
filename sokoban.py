"""Sokoban for MGT-Sokoban: levels as XSB text, an optimal solver, a generator, replay and rendering.

XSB: `#` wall, ` ` floor, `.` goal, `$` box, `*` box on goal, `@` player, `+` player on goal; rows
joined by "\\n". Moves are LURD letters (upper case = a push, as solvers write them) or the words
`Left, Up, Right, Down` the LMM-R1 prompt asks for. As in gym-sokoban, a move into a wall or into a
box that cannot move leaves the state unchanged.

    python sokoban.py build --n 5000 --size 7 --boxes 2 --seed 0 --out data/sokoban   # a training set
    python sokoban.py build --n 500 --size 7 --boxes 2 --seed 1 --split test \
        --out data/sokoban --exclude data/sokoban/train.jsonl                          # held out
    python sokoban.py show data/sokoban/train.jsonl --row 3 --gif solution.gif         # look at one
    python sokoban.py play --size 7 --boxes 2 --seed 5                                 # play in a terminal
"""

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

import gymnasium
import numpy as np

Cell = Tuple[int, int]  # (row, col)
MOVES: Dict[str, Cell] = {"L": (0, -1), "U": (-1, 0), "R": (0, 1), "D": (1, 0)}
WORDS = {"left": "L", "up": "U", "right": "R", "down": "D"}


@dataclass(frozen=True)
class Board:
    """A level's state. Walls and goals never change; boxes and the player do."""

    height: int
    width: int
    walls: FrozenSet[Cell]
    goals: FrozenSet[Cell]
    boxes: FrozenSet[Cell]
    player: Cell

    @property
    def solved(self) -> bool:
        return self.boxes == self.goals


def parse_level(text: str) -> Board:
    """A Board from XSB text; ValueError naming what is wrong (no player, box/goal counts, ...)."""
    rows = text.rstrip("\n").split("\n")
    walls, goals, boxes, players = set(), set(), set(), []
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            if ch not in "# .$*@+":
                raise ValueError(f"level: unknown tile {ch!r} at row {r}, column {c}")
            if ch == "#":
                walls.add((r, c))
            if ch in ".*+":
                goals.add((r, c))
            if ch in "$*":
                boxes.add((r, c))
            if ch in "@+":
                players.append((r, c))
    if len(players) != 1:
        raise ValueError(f"level: needs exactly one player (@ or +), found {len(players)}")
    if not boxes or len(boxes) != len(goals):
        raise ValueError(f"level: needs as many goals as boxes, at least one (found {len(boxes)} boxes, {len(goals)} goals)")
    return Board(len(rows), max(len(row) for row in rows), frozenset(walls), frozenset(goals), frozenset(boxes), players[0])


def format_level(board: Board) -> str:
    """XSB text of `board` (trailing spaces kept, so every row has the board's width)."""
    rows = []
    for r in range(board.height):
        row = ""
        for c in range(board.width):
            cell = (r, c)
            if cell in board.walls:
                row += "#"
            elif cell == board.player:
                row += "+" if cell in board.goals else "@"
            elif cell in board.boxes:
                row += "*" if cell in board.goals else "$"
            else:
                row += "." if cell in board.goals else " "
        rows.append(row)
    return "\n".join(rows)


def add(cell: Cell, d: Cell) -> Cell:
    return cell[0] + d[0], cell[1] + d[1]


def step(board: Board, move: str) -> Tuple[Board, bool]:
    """(new board, pushed a box). A blocked move returns the same board."""
    d = MOVES[move.upper()]
    target = add(board.player, d)
    if not floor(board, target):
        return board, False
    if target not in board.boxes:
        return Board(board.height, board.width, board.walls, board.goals, board.boxes, target), False
    beyond = add(target, d)
    if not floor(board, beyond) or beyond in board.boxes:
        return board, False
    boxes = (board.boxes - {target}) | {beyond}
    return Board(board.height, board.width, board.walls, board.goals, frozenset(boxes), target), True


def inside(board: Board, cell: Cell) -> bool:
    return 0 <= cell[0] < board.height and 0 <= cell[1] < board.width


def parse_moves(text: str) -> Optional[List[str]]:
    """LURD letters from `Left, Up, ...` words or a LURD string; None when anything else is there."""
    text = text.strip()
    if re.fullmatch(r"[LURDlurd]+", text):
        return [ch.upper() for ch in text]
    words = [w.strip().lower() for w in re.split(r"[,\s]+", text) if w.strip()]
    if not words or any(w not in WORDS for w in words):
        return None
    return [WORDS[w] for w in words]


def trajectory(level: str, moves) -> List[Board]:
    """The boards from `level` through each of `moves` (a string or a list of LURD letters): one
    board per move played, the start first. Play stops once the level is solved. ValueError for
    malformed moves."""
    letters = parse_moves(moves) if isinstance(moves, str) else list(moves)
    if letters is None:
        raise ValueError(f"moves: expected LURD letters or Left/Up/Right/Down words, got {moves[:80]!r}")
    boards = [parse_level(level)]
    for move in letters:
        if boards[-1].solved:
            break
        boards.append(step(boards[-1], move)[0])
    return boards


def replay(level: str, moves) -> Tuple[str, bool]:
    """(final level, solved) after playing `moves` from `level` (see `trajectory`)."""
    final = trajectory(level, moves)[-1]
    return format_level(final), final.solved


def moves_text(letters: str) -> str:
    """LURD letters as the answer the prompt asks for: `Left, Up, Right, Down`."""
    names = {v: k.capitalize() for k, v in WORDS.items()}
    return ", ".join(names[ch.upper()] for ch in letters)


# ---------------------------------------------------------------------------------------------
# gym-sokoban's rewards: the environment's and LMM-R1's shaped reward are built on them
# ---------------------------------------------------------------------------------------------

STEP_PENALTY, BOX_ON_GOAL, BOX_OFF_GOAL, SOLVED_BONUS = -0.1, 1.0, -1.0, 10.0


def env_reward(before: Board, after: Board) -> float:
    """gym-sokoban's reward of one move: -0.1, +1 when a box lands on a goal, -1 when one leaves
    it, +10 when the move solves the level."""
    on_before, on_after = len(before.boxes & before.goals), len(after.boxes & after.goals)
    reward = STEP_PENALTY + (BOX_ON_GOAL if on_after > on_before else BOX_OFF_GOAL if on_after < on_before else 0.0)
    return reward + (SOLVED_BONUS if after.solved else 0.0)


def best_return(level: str, moves, max_actions: int = 50) -> float:
    """LMM-R1's task reward: the best running sum of `env_reward` over the first `max_actions`
    moves (0 if it never gets above 0), play stopping when solved."""
    boards = trajectory(level, list(moves)[:max_actions])
    total = best = 0.0
    for before, after in zip(boards, boards[1:]):
        total += env_reward(before, after)
        best = max(best, total)
    return best


def box_progress(level: str, moves) -> float:
    """Fraction of the boxes that started off a goal and end on one after `moves` (1.0 = solved)."""
    boards = trajectory(level, moves)
    start, end = boards[0], boards[-1]
    needed = len(start.boxes - start.goals)
    gained = len(end.boxes & end.goals) - len(start.boxes & start.goals)
    return max(0, gained) / needed if needed else 1.0


# ---------------------------------------------------------------------------------------------
# Solver: breadth-first search over (player, boxes), so the first solution found has the fewest moves
# ---------------------------------------------------------------------------------------------


def live_cells(board: Board) -> FrozenSet[Cell]:
    """Cells from which a box can still reach some goal: those a box can be pulled to from a goal.

    A box on any other cell (a corner, most wall edges) can never be solved: the solver prunes it.
    """
    live, frontier = set(board.goals), deque(board.goals)
    while frontier:
        cell = frontier.popleft()
        for d in MOVES.values():
            prev, stand = add(cell, (-d[0], -d[1])), add(cell, (-2 * d[0], -2 * d[1]))
            if prev not in live and floor(board, prev) and floor(board, stand):
                live.add(prev)
                frontier.append(prev)
    return frozenset(live)


def floor(board: Board, cell: Cell) -> bool:
    return inside(board, cell) and cell not in board.walls


def solve(level: str, max_states: int = 2_000_000, prune: bool = True) -> Optional[str]:
    """An optimal (fewest moves) solution as LURD letters, upper case for pushes; "" if already
    solved; None if unsolvable. Raises RuntimeError past `max_states` explored states.
    `prune=False` searches without dead-square pruning (same answers, slower: bench/sokoban.py)."""
    board = parse_level(level)
    if board.solved:
        return ""
    floor_cells = {(r, c) for r in range(board.height) for c in range(board.width) if floor(board, (r, c))}
    live = live_cells(board) if prune else frozenset(floor_cells)
    if not board.boxes <= live:
        return None
    start = (board.player, board.boxes)
    parent: Dict[tuple, Optional[Tuple[tuple, str]]] = {start: None}
    frontier = deque([start])
    while frontier:
        player, boxes = state = frontier.popleft()
        for move, d in MOVES.items():
            target = add(player, d)
            if not floor(board, target):
                continue
            letter = move.lower()
            if target in boxes:
                beyond = add(target, d)
                if not floor(board, beyond) or beyond in boxes or beyond not in live:
                    continue
                boxes_after, letter = (boxes - {target}) | {beyond}, move
            else:
                boxes_after = boxes
            nxt = (target, frozenset(boxes_after))
            if nxt in parent:
                continue
            parent[nxt] = (state, letter)
            if nxt[1] == board.goals:
                return path_to(parent, nxt)
            if len(parent) > max_states:
                raise RuntimeError(f"solve: more than {max_states} states explored")
            frontier.append(nxt)
    return None


def path_to(parent, state) -> str:
    letters = []
    while parent[state] is not None:
        state, letter = parent[state]
        letters.append(letter)
    return "".join(reversed(letters))


# ---------------------------------------------------------------------------------------------
# Generator: carve a room, put the boxes on their goals, then play backwards (pulls)
# ---------------------------------------------------------------------------------------------


def carve_room(height: int, width: int, rng: random.Random, floor_fraction: float = 0.55) -> set:
    """Floor cells made by a random walk inside the border walls (connected by construction)."""
    inner = [(r, c) for r in range(1, height - 1) for c in range(1, width - 1)]
    cell = rng.choice(inner)
    cells = {cell}
    while len(cells) < floor_fraction * len(inner):
        d = rng.choice(list(MOVES.values()))
        nxt = add(cell, d)
        if 1 <= nxt[0] < height - 1 and 1 <= nxt[1] < width - 1:
            cell = nxt
            cells.add(cell)
    return cells


def reverse_play(board: Board, steps: int, rng: random.Random) -> Board:
    """`steps` random backward moves; moving away from an adjacent box may pull it along."""
    for _ in range(steps):
        d = rng.choice(list(MOVES.values()))
        target = add(board.player, d)
        if not floor(board, target) or target in board.boxes:
            continue
        behind = add(board.player, (-d[0], -d[1]))
        boxes = board.boxes
        if behind in boxes and rng.random() < 0.8:
            boxes = (boxes - {behind}) | {board.player}
        board = Board(board.height, board.width, board.walls, board.goals, frozenset(boxes), target)
    return board


def generate_level(width: int, height: int, boxes: int, seed: int, min_moves: int = 8, max_tries: int = 1000) -> str:
    """A solvable level, deterministic in its arguments: no box starts on a goal, and the optimal
    solution has at least `min_moves` moves (the difficulty knob). Raises ValueError if no such
    level turns up in `max_tries` attempts (e.g. too many boxes for the room)."""
    rng = random.Random(f"sokoban:{width}x{height}:{boxes}:{seed}")
    for _ in range(max_tries):
        cells = carve_room(height, width, rng)
        if len(cells) < boxes + 3:
            continue
        walls = frozenset((r, c) for r in range(height) for c in range(width) if (r, c) not in cells)
        goals = frozenset(rng.sample(sorted(cells), boxes))
        player = rng.choice(sorted(cells - goals))
        board = reverse_play(Board(height, width, walls, goals, goals, player), steps=rng.randint(40, 120), rng=rng)
        if board.boxes & board.goals:
            continue
        level = format_level(board)
        solution = solve(level)
        if solution is not None and len(solution) >= min_moves:
            return level
    raise ValueError(
        f"generate_level: no {width}x{height} level with {boxes} boxes and >= {min_moves} moves in {max_tries} tries"
    )


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

# The colours LMM-R1's prompt names: "the green character", "the yellow box", "the target area (an
# area with a red dot in the center)". A box on a goal is orange and keeps the red dot on top.
COLORS = {"wall": (96, 64, 48), "mortar": (150, 120, 100), "floor": (235, 235, 225), "goal": (220, 30, 30),
          "box": (240, 200, 40), "box_on_goal": (245, 140, 30), "box_edge": (140, 95, 20), "player": (40, 170, 60),
          "player_edge": (20, 90, 30)}  # fmt: skip


def render(level, tile: int = 28):
    """A PIL image of `level` (XSB text or a Board), `tile` pixels per cell. With the default 28 the
    image is a multiple of Qwen2.5-VL's 28-pixel patch grid, so its resize does not distort the
    board. (The text rendering is the XSB text itself: `format_level`.)"""
    from PIL import Image, ImageDraw

    board = level if isinstance(level, Board) else parse_level(level)
    image = Image.new("RGB", (board.width * tile, board.height * tile), COLORS["floor"])
    draw = ImageDraw.Draw(image)
    m = max(1, tile // 7)  # margin inside a tile
    for r in range(board.height):
        for c in range(board.width):
            x, y, cell = c * tile, r * tile, (r, c)
            inset = [x + m, y + m, x + tile - 1 - m, y + tile - 1 - m]
            if cell in board.walls:
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=COLORS["wall"])
                draw.line([x, y + tile // 2, x + tile - 1, y + tile // 2], fill=COLORS["mortar"])
                draw.line([x + tile // 2, y, x + tile // 2, y + tile // 2], fill=COLORS["mortar"])
                continue
            if cell in board.boxes:
                fill = COLORS["box_on_goal"] if cell in board.goals else COLORS["box"]
                draw.rectangle(inset, fill=fill, outline=COLORS["box_edge"], width=max(1, m // 2))
                draw.line(inset, fill=COLORS["box_edge"])
                draw.line([inset[0], inset[3], inset[2], inset[1]], fill=COLORS["box_edge"])
            if cell == board.player:
                draw.ellipse(inset, fill=COLORS["player"], outline=COLORS["player_edge"], width=max(1, m // 2))
            if cell in board.goals:  # the red dot stays visible under a box or the player
                dot = max(2, tile // 7)
                draw.ellipse(
                    [x + tile // 2 - dot, y + tile // 2 - dot, x + tile // 2 + dot, y + tile // 2 + dot], fill=COLORS["goal"]
                )
    return image


def save_replay_gif(level: str, moves, path: str, tile: int = 28, ms_per_move: int = 300) -> int:
    """An animated GIF of `moves` played from `level` (the last frame held longer); returns frames."""
    frames = [render(board, tile) for board in trajectory(level, moves)]
    durations = [ms_per_move] * (len(frames) - 1) + [4 * ms_per_move]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return len(frames)


# ---------------------------------------------------------------------------------------------
# A gymnasium environment over the same state and rules
# ---------------------------------------------------------------------------------------------

ACTIONS = "LURD"  # the environment's Discrete(4) actions, in this order


class SokobanEnv(gymnasium.Env):
    """Sokoban as a gymnasium environment, with gym-sokoban's rewards (`env_reward`).

    Observation: the rendered board, (height * tile, width * tile, 3) uint8. Action: an index into
    ACTIONS. An episode terminates when the level is solved and is truncated after `max_steps`
    moves. The level is `level` if given, else `reset(options={"level": xsb})`'s, else a new
    generated one (`width` x `height`, `boxes`, at least `min_moves`) seeded by reset's seed.
    Info: the level as XSB text, boxes on goals, and whether the move pushed a box.
    """

    metadata = {"render_modes": ["rgb_array", "ansi"], "render_fps": 4}

    def __init__(self, level: Optional[str] = None, width: int = 7, height: int = 7, boxes: int = 2, min_moves: int = 8,
                 max_steps: int = 120, tile: int = 28, render_mode: Optional[str] = None):  # fmt: skip
        if level is not None:
            board = parse_level(level)
            width, height, boxes = board.width, board.height, len(board.boxes)
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode={render_mode!r}: expected one of {self.metadata['render_modes']}")
        self.level, self.width, self.height, self.boxes, self.min_moves = level, width, height, boxes, min_moves
        self.max_steps, self.tile, self.render_mode = max_steps, tile, render_mode
        self.action_space = gymnasium.spaces.Discrete(len(ACTIONS))
        self.observation_space = gymnasium.spaces.Box(0, 255, (height * tile, width * tile, 3), np.uint8)
        self.board: Optional[Board] = None
        self.steps = 0

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        level = (options or {}).get("level", self.level)
        if level is None:
            seed = int(self.np_random.integers(2**31))
            level = generate_level(self.width, self.height, self.boxes, seed, min_moves=self.min_moves)
        board = parse_level(level)
        if (board.width, board.height) != (self.width, self.height):
            raise ValueError(f"reset: a {board.width}x{board.height} level in an environment made for {self.width}x{self.height}")
        self.board, self.steps = board, 0
        return self.observation(), self.info(pushed=False)

    def step(self, action):
        if self.board is None:
            raise RuntimeError("call reset() before step()")
        before = self.board
        self.board, pushed = step(before, ACTIONS[int(action)])  # the module's step: one move on a Board
        self.steps += 1
        terminated = self.board.solved
        truncated = not terminated and self.steps >= self.max_steps
        return self.observation(), env_reward(before, self.board), terminated, truncated, self.info(pushed)

    def observation(self) -> np.ndarray:
        return np.asarray(render(self.board, self.tile), dtype=np.uint8)

    def info(self, pushed: bool) -> dict:
        return {"level": format_level(self.board), "boxes_on_goals": len(self.board.boxes & self.board.goals), "pushed": pushed}

    def render(self):
        if self.render_mode == "ansi":
            return format_level(self.board)
        if self.render_mode == "rgb_array":
            return self.observation()
        return None


ENV_ID = "LMMR1Sokoban-v0"  # gymnasium.make("sokoban:LMMR1Sokoban-v0", width=7, boxes=2) imports and finds it
if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point=SokobanEnv)


# ---------------------------------------------------------------------------------------------
# Prompts and dataset rows (LMM-R1's, examples/scripts/lmm_r1/train_sokoban.sh)
# ---------------------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You're going to play a game of Sokoban, where the goal is to manipulate the green character to push the yellow "
    "box into the target area (an area with a red dot in the center). \nGenerate all actions from the initial frame "
    "to the end at once."
)
USER_PROMPT = (
    "You should first thinks about the reasoning process in the mind and then provides the user with the answer, the "
    "answer is a long sequence of Left, Right, Up, Down, separated by ','. The reasoning process and answer are "
    "enclosed within <think> </think> and <answer> </answer> tags, respectively, e.g., <think> To ... </think><answer> "
    "Left, Right, ... </answer>, which means your output should start with <think> and end with </answer>."
)


def level_messages(image) -> List[dict]:
    """The chat of one level: LMM-R1's system prompt, then the board image and the answer format."""
    user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": USER_PROMPT}]}
    return [{"role": "system", "content": SYSTEM_PROMPT}, user]


def level_fields(level: str) -> dict:
    """What a row says about its level: the XSB text, its size, the optimal solution and its length."""
    board = parse_level(level)
    solution = solve(level)
    if solution is None:
        raise ValueError("level: unsolvable")
    return {"level": level, "width": board.width, "height": board.height, "boxes": len(board.boxes),
            "solution": solution, "optimal_moves": len(solution), "pushes": sum(ch.isupper() for ch in solution)}  # fmt: skip


def read_levels(path: str) -> List[str]:
    """Levels of a dataset .jsonl (its rows' `level`) or of an XSB file (levels separated by blank lines)."""
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line)["level"] for line in f if line.strip()]
        text = f.read()
    return [block.strip("\n") for block in re.split(r"\n\s*\n", text) if block.strip()]


MAX_MISSES = 1000  # build gives up after this many generated levels in a row that were not new


def build(n: int, size: int, boxes: int, seed: int, out: str, split: str = "train", min_moves: int = 8,
          tile: int = 28, exclude: Tuple[str, ...] = ()) -> Counter:  # fmt: skip
    """Write `n` distinct levels as `out/<split>.jsonl` (our row format: message, answer = the optimal
    moves, level, its size, solution, optimal_moves) and `out/images/<split>_<k>.png`.

    Level attempt k comes from generator seed `seed * 10**9 + k`, so a build is deterministic.
    Levels already written, or listed in an `exclude` file (the training set, when building a
    held-out one), are skipped and counted. Returns counts: written, duplicate, excluded.
    """
    excluded = {level for path in exclude for level in read_levels(path)}
    written: set = set()
    counts: Counter = Counter()
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    path = os.path.join(out, f"{split}.jsonl")
    attempt, misses = 0, 0  # misses: attempts in a row that found no new level
    with open(path + ".tmp", "w") as f:  # renamed into place when complete
        while len(written) < n and misses < MAX_MISSES:
            level = generate_level(size, size, boxes, seed * 10**9 + attempt, min_moves=min_moves)
            attempt += 1
            if level in excluded or level in written:
                counts["excluded" if level in excluded else "duplicate"] += 1
                misses += 1
                continue
            misses = 0
            image = f"images/{split}_{len(written):05d}.png"
            render(level, tile).save(os.path.join(out, image))
            fields = level_fields(level)
            row = {"message": json.dumps(level_messages(image)), "answer": moves_text(fields["solution"]),
                   "question": f"sokoban-{split}-{len(written):05d}", "datasource": f"sokoban_{size}x{size}_{boxes}", **fields}  # fmt: skip
            f.write(json.dumps(row) + "\n")
            written.add(level)
    if len(written) < n:
        os.remove(path + ".tmp")
        raise ValueError(
            f"build: only {len(written)} distinct levels could be made ({dict(counts)}); lower --n or change --size/--boxes"
        )
    os.replace(path + ".tmp", path)
    counts["written"] = n
    return counts


# ---------------------------------------------------------------------------------------------
# Evaluation's buckets (eval.sokoban_metrics scores completions: success by size, boxes and length)
# ---------------------------------------------------------------------------------------------


def length_bucket(moves: int, width: int = 10) -> str:
    lo = moves // width * width
    return f"{lo:02d}-{lo + width - 1:02d}"


# ---------------------------------------------------------------------------------------------
# Command line: build, show, play
# ---------------------------------------------------------------------------------------------

KEYS = {"a": "L", "w": "U", "d": "R", "s": "D"}
LEGEND = "# wall   . goal   $ box   * box on goal   @ player   + player on goal"


def load_level(path: str, row: int = 0) -> str:
    levels = read_levels(path)
    if not 0 <= row < len(levels):
        raise ValueError(f"{path}: no level {row} (it has {len(levels)})")
    return levels[row]


def show(level: str, png: Optional[str], gif: Optional[str]) -> None:
    board = parse_level(level)
    print(f"{level}\n\n{LEGEND}\n{board.width}x{board.height}, {len(board.boxes)} boxes")
    solution = solve(level)
    if solution is None:
        print("unsolvable")
    else:
        print(
            f"optimal: {len(solution)} moves, {sum(c.isupper() for c in solution)} pushes: {solution}\n  {moves_text(solution)}"
        )
    if png:
        render(level).save(png)
        print(f"wrote {png}")
    if gif and solution is not None:
        print(f"wrote {gif} ({save_replay_gif(level, solution, gif)} frames)")


ARROWS = {"A": "w", "B": "s", "C": "d", "D": "a"}  # a terminal's ESC [ A..D: up, down, right, left


@contextmanager
def keypresses(stream):
    """A terminal's single keys as `play`'s tokens, no Enter needed: w a s d and the arrow keys, z
    (undo), r (restart), q or Ctrl-C / Ctrl-D (quit). The terminal leaves line mode on entry (so a
    key pressed while the board is drawn counts) and gets its mode back on the way out."""
    import select
    import termios
    import tty

    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd, termios.TCSANOW)

    def keys():
        while True:
            raw = os.read(fd, 1)
            key = raw.decode(errors="ignore")  # "" for a byte of a non-ASCII key: not a move, skipped
            if raw and not key:
                continue
            if key == "\x1b":  # an arrow key's bytes arrive together; a lone Esc is ignored
                seq = os.read(fd, 2).decode(errors="ignore") if select.select([fd], [], [], 0.05)[0] else ""
                if len(seq) == 2 and seq[0] in "[O" and seq[1] in ARROWS:
                    yield ARROWS[seq[1]]
            elif key in ("", "\x03", "\x04"):
                yield "q"
                return
            elif not key.isspace():
                yield "restart" if key.lower() == "r" else key.lower()

    try:
        yield keys()
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def play(level: str, lines) -> bool:
    """Terminal play. `lines` are keypresses (one key at a time, arrows too) on a terminal; from a
    pipe or a file, lines of w/a/s/d keys (`ddsa`) or words (`Right, Down`). `z` undoes a move,
    `restart` (`r` as a key) starts over, `q` quits. Returns solved."""
    history = [parse_level(level)]
    optimal = solve(level)
    print(f"{level}\n\n{LEGEND}\nmoves: w a s d or the arrow keys (or Left/Up/Right/Down words); z undo, r restart, q quit")
    for line in lines:
        for token in re.split(r"[,\s]+", line.strip().lower()):
            if token in ("q", "quit"):
                return False
            if token == "z":
                history = history[:-1] or history
            elif token == "restart":
                history = history[:1]
            elif token and all(ch in KEYS for ch in token):
                for ch in token:
                    history.append(step(history[-1], KEYS[ch])[0])
            elif token in WORDS:
                history.append(step(history[-1], WORDS[token])[0])
            elif token:
                print(f"? {token!r}: not a move")
        board = history[-1]
        print(
            f"{format_level(board)}\nmoves: {len(history) - 1}, boxes on goals: {len(board.boxes & board.goals)}/{len(board.boxes)}"
        )
        if board.solved:
            print(f"solved in {len(history) - 1} moves (optimal: {len(optimal)})")
            return True
    return False


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sokoban.py", description="Sokoban levels for MGT-Sokoban.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="generate, solve and render a dataset")
    b.add_argument("--n", type=int, required=True, help="levels to write")
    b.add_argument("--size", type=int, default=7, help="board side, walls included")
    b.add_argument("--boxes", type=int, default=2)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--split", default="train", help="name of the jsonl (and image prefix)")
    b.add_argument("--min-moves", type=int, default=8, help="the difficulty knob: least optimal solution length")
    b.add_argument("--tile", type=int, default=28, help="pixels per cell (a multiple of 28 keeps Qwen's grid)")
    b.add_argument("--exclude", nargs="*", default=[], help="level files (.jsonl or XSB) whose levels to leave out")
    s = sub.add_parser("show", help="print a level, its optimal solution, and optionally its image or solution replay")
    s.add_argument("file", help="a dataset .jsonl or an XSB file")
    s.add_argument("--row", type=int, default=0, help="which level of the file")
    s.add_argument("--png", help="write the level's image here")
    s.add_argument("--gif", help="write the optimal solution's replay here")
    p = sub.add_parser("play", help="play a level in the terminal")
    p.add_argument("file", nargs="?", help="a dataset .jsonl or an XSB file (default: a generated level)")
    p.add_argument("--row", type=int, default=0)
    p.add_argument("--size", type=int, default=7)
    p.add_argument("--boxes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except (ValueError, OSError) as e:  # bad levels, impossible builds, missing files: the message is the help
        sys.exit(f"error: {e}")


def run_command(args) -> int:
    if args.command == "build":
        t0 = time.time()
        for path in args.exclude:  # the training set a held-out split leaves out: a fresh clone has none yet
            if not os.path.exists(path):
                print(f"--exclude {path}: not found, so no level is left out for it")
        exclude = tuple(p for p in args.exclude if os.path.exists(p))
        counts = build(args.n, args.size, args.boxes, args.seed, args.out, args.split, args.min_moves, args.tile, exclude)
        lengths = Counter(
            length_bucket(json.loads(line)["optimal_moves"]) for line in open(os.path.join(args.out, f"{args.split}.jsonl"))
        )
        print(f"wrote {args.n} levels to {os.path.join(args.out, args.split)}.jsonl in {time.time() - t0:.1f}s "
              f"(skipped: {counts['duplicate']} duplicate, {counts['excluded']} excluded)")  # fmt: skip
        print("optimal moves: " + ", ".join(f"{k}: {v}" for k, v in sorted(lengths.items())))
    elif args.command == "show":
        show(load_level(args.file, args.row), args.png, args.gif)
    else:
        level = load_level(args.file, args.row) if args.file else generate_level(args.size, args.size, args.boxes, args.seed)
        if not sys.stdin.isatty():  # a pipe or a file: lines
            return 0 if play(level, sys.stdin) else 1
        with keypresses(sys.stdin) as keys:
            return 0 if play(level, keys) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
