"""Sokoban for MGT-Sokoban: levels as XSB text, an optimal solver, a generator, replay and rendering.

XSB: `#` wall, ` ` floor, `.` goal, `$` box, `*` box on goal, `@` player, `+` player on goal; rows
joined by "\\n". Moves are LURD letters (upper case = a push, as solvers write them) or the words
`Left, Up, Right, Down` the LMM-R1 prompt asks for. As in gym-sokoban, a move into a wall or into a
box that cannot move leaves the state unchanged.
"""

import random
import re
from collections import deque
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

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


def replay(level: str, moves) -> Tuple[str, bool]:
    """(final level, solved) after playing `moves` (a string or a list of LURD letters) from `level`.

    Play stops once the level is solved. Raises ValueError for malformed moves.
    """
    letters = parse_moves(moves) if isinstance(moves, str) else list(moves)
    if letters is None:
        raise ValueError(f"moves: expected LURD letters or Left/Up/Right/Down words, got {moves[:80]!r}")
    board = parse_level(level)
    for move in letters:
        if board.solved:
            break
        board, _ = step(board, move)
    return format_level(board), board.solved


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


def solve(level: str, max_states: int = 2_000_000) -> Optional[str]:
    """An optimal (fewest moves) solution as LURD letters, upper case for pushes; "" if already
    solved; None if unsolvable. Raises RuntimeError past `max_states` explored states."""
    board = parse_level(level)
    if board.solved:
        return ""
    live = live_cells(board)
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

COLORS = {"wall": (96, 64, 48), "mortar": (150, 120, 100), "floor": (235, 235, 225), "goal": (220, 40, 40),
          "box": (200, 140, 40), "box_edge": (120, 80, 20), "box_on_goal": (60, 170, 70), "player": (40, 90, 220)}  # fmt: skip


def render(level: str, tile: int = 28):
    """A PIL image of `level`, `tile` pixels per cell. With the default 28 the image is a multiple of
    Qwen2.5-VL's 28-pixel patch grid, so its resize does not distort the board."""
    from PIL import Image, ImageDraw

    board = parse_level(level)
    image = Image.new("RGB", (board.width * tile, board.height * tile), COLORS["floor"])
    draw = ImageDraw.Draw(image)
    m = max(1, tile // 7)  # margin inside a tile
    for r in range(board.height):
        for c in range(board.width):
            x, y, cell = c * tile, r * tile, (r, c)
            if cell in board.walls:
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=COLORS["wall"])
                draw.line([x, y + tile // 2, x + tile - 1, y + tile // 2], fill=COLORS["mortar"])
                draw.line([x + tile // 2, y, x + tile // 2, y + tile // 2], fill=COLORS["mortar"])
                continue
            if cell in board.goals and cell not in board.boxes:
                draw.ellipse(
                    [x + 2 * m, y + 2 * m, x + tile - 1 - 2 * m, y + tile - 1 - 2 * m],
                    outline=COLORS["goal"],
                    width=max(1, m // 2 + 1),
                )
            if cell in board.boxes:
                fill = COLORS["box_on_goal"] if cell in board.goals else COLORS["box"]
                draw.rectangle(
                    [x + m, y + m, x + tile - 1 - m, y + tile - 1 - m],
                    fill=fill,
                    outline=COLORS["box_edge"],
                    width=max(1, m // 2),
                )
                draw.line([x + m, y + m, x + tile - 1 - m, y + tile - 1 - m], fill=COLORS["box_edge"])
                draw.line([x + m, y + tile - 1 - m, x + tile - 1 - m, y + m], fill=COLORS["box_edge"])
            if cell == board.player:
                draw.ellipse([x + m, y + m, x + tile - 1 - m, y + tile - 1 - m], fill=COLORS["player"])
    return image
