"""Football for LMM-R1's zero-shot agent evaluation: MageBench's scenarios on Google Research Football.

MageBench (arXiv 2412.04531, github.com/microsoft/MageBench) puts 108 start positions on gfootball's
engine: the ball and up to 22 players with roles, our team (left, yellow) attacking the right goal
against the engine's AI at difficulty 0.0; an episode ends on a goal, when the ball goes out of
play, when the other team wins it, or after 400 steps. The positions are data here
(`football_scenarios.txt`, our format) and become gfootball scenarios at run time (`build_scenario`).
`Game` plays actions one at a time with MageBench's rules and `ShapedScore` scores the game state as
MageBench does. In MageBench's Online setting (the only one it has for Football; eval.py's default)
the model sees a frame and answers one action a turn (`play_online`, every live episode's turn in one
generate, the games in worker processes). In our Global setting, which matches what MGT-Sokoban
trains, it sees the start once and answers a whole plan of gfootball's action names (`play`).

    python football.py list                                                   # the 108 scenarios
    python football.py show R1_P_1 --png start.png                            # positions, start frame
    echo "action_right, action_right, action_shot" | python football.py play R9_P_4 --gif replay.gif
    python football.py online --policy random                                 # an Online baseline
    python football.py build --out data/eval/football                         # Global rows for eval.py

gfootball renders with OpenGL. Every game starts with a rendered frame (`reset`), off-screen where
there is no display; frames a model sees render on a display, as MageBench's did (`Pitches` starts
Xvfb where there is none; for `show --png` and `build`, use `xvfb-run -a`).
"""

import argparse
import atexit
import functools
import json
import os
import random
import re
import sys
import types
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

SCENARIO_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "football_scenarios.txt")

# gfootball's `v2` action set, in its order (the index is the action's code): MageBench's full vocabulary.
ACTIONS = ("action_idle", "action_left", "action_top_left", "action_top", "action_top_right", "action_right",
           "action_bottom_right", "action_bottom", "action_bottom_left", "action_long_pass", "action_high_pass",
           "action_short_pass", "action_shot", "action_sprint", "action_release_direction", "action_release_sprint",
           "action_sliding", "action_dribble", "action_release_dribble", "action_builtin_ai")  # fmt: skip
MOVES = ACTIONS[1:9]
PASSES = ("action_long_pass", "action_high_pass", "action_short_pass")
KICKS = PASSES + ("action_shot",)
ROLES = ("GK", "CB", "LB", "RB", "DM", "CM", "LM", "RM", "AM", "CF")
MAX_STEPS = 400  # every MageBench scenario's game_duration


# ---------------------------------------------------------------------------------------------
# Scenarios as data
# ---------------------------------------------------------------------------------------------

Player = Tuple[str, float, float]  # (role, x, y) in field coordinates


@dataclass(frozen=True)
class Scenario:
    """A start position in field coordinates (x -1..1 left goal to right goal, y -0.42..0.42 top to
    bottom, as gfootball's observations report them); the left team is ours."""

    name: str
    ball: Tuple[float, float]
    left: Tuple[Player, ...]
    right: Tuple[Player, ...]

    @property
    def region(self) -> str:  # MageBench's names: R<region>_<kind>_<k>
        return self.name.split("_")[0]

    @property
    def kind(self) -> str:
        return self.name.split("_")[1] if self.name.count("_") >= 2 else ""


def parse_players(text: str, where: str) -> Tuple[Player, ...]:
    players = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        parts = entry.split()
        if len(parts) != 3 or parts[0] not in ROLES:
            raise ValueError(f"{where}: a player is `ROLE X Y` with ROLE one of {' '.join(ROLES)}, got {entry!r}")
        players.append((parts[0], float(parts[1]), float(parts[2])))
    return tuple(players)


def parse_scenario(line: str) -> Scenario:
    """A Scenario from one table line: `NAME | ball X Y | left ROLE X Y, ... | right ROLE X Y, ...`."""
    fields = [f.strip() for f in line.split("|")]
    heads = [f.split(" ", 1)[0] for f in fields[1:]]
    if heads != ["ball", "left", "right"]:
        raise ValueError(f"scenario: expected `NAME | ball X Y | left ... | right ...`, got {line[:80]!r}")
    name = fields[0]
    ball = tuple(float(v) for v in fields[1].split()[1:])
    left, right = parse_players(fields[2][5:], name), parse_players(fields[3][6:], name)
    if len(ball) != 2 or not left or not right:
        raise ValueError(f"{name}: needs a ball (x y) and at least one player a side")
    return Scenario(name, ball, left, right)


def format_scenario(s: Scenario) -> str:
    """The table line of `s` (parse_scenario's inverse)."""
    players = lambda team: ", ".join(f"{role} {x:.4f} {y:.4f}" for role, x, y in team)  # noqa: E731
    return f"{s.name} | ball {s.ball[0]:.4f} {s.ball[1]:.4f} | left {players(s.left)} | right {players(s.right)}"


def read_scenarios(path: str = SCENARIO_FILE) -> Dict[str, Scenario]:
    """Scenarios of a table file by name, in file order (`#` lines are comments)."""
    with open(path) as f:
        scenarios = [parse_scenario(line) for line in f if line.strip() and not line.startswith("#")]
    return {s.name: s for s in scenarios}


def scenario(name: str) -> Scenario:
    scenarios = read_scenarios()
    if name not in scenarios:
        raise ValueError(f"no scenario {name!r}; `python football.py list` lists them")
    return scenarios[name]


def scenario_seed(seed: int, name: str, repeat: int = 0) -> int:
    """The engine's random seed for one scenario (its `repeat`-th episode) of a run seeded `seed`
    (gfootball's AI is stochastic)."""
    key = f"{seed}:{name}" if repeat == 0 else f"{seed}:{name}:{repeat}"
    return zlib.crc32(key.encode()) % 2_000_000_000


# ---------------------------------------------------------------------------------------------
# gfootball: the table turned into its scenario builder, one engine reused across episodes
# ---------------------------------------------------------------------------------------------


def build_scenario(s: Scenario, builder) -> None:
    """gfootball's scenario-builder callback for `s`, with MageBench's rules for every scenario."""
    import gfootball_engine as libgame

    cfg = builder.config()
    cfg.game_duration = MAX_STEPS
    cfg.deterministic = False
    cfg.offsides = False
    cfg.end_episode_on_score = cfg.end_episode_on_out_of_play = cfg.end_episode_on_possession_change = True
    cfg.right_team_difficulty, cfg.left_team_difficulty = 0.0, 1.0
    builder.SetBallPosition(*s.ball)
    builder.SetTeam(libgame.e_Team.e_Left)
    for role, x, y in s.left:
        builder.AddPlayer(x, y, getattr(libgame.e_PlayerRole, f"e_PlayerRole_{role}"))
    builder.SetTeam(libgame.e_Team.e_Right)
    for role, x, y in s.right:  # builders place the right team in its own frame, as if it attacked to the right
        builder.AddPlayer(-x, -y, getattr(libgame.e_PlayerRole, f"e_PlayerRole_{role}"))


def register(s: Scenario) -> str:
    """gfootball imports the scenario named by its `level` as module gfootball.scenarios.<level>:
    put one in sys.modules whose build_scenario builds `s`. Returns the level name."""
    level = f"lmmr1_{s.name}"
    module = types.ModuleType(f"gfootball.scenarios.{level}")
    module.build_scenario = functools.partial(build_scenario, s)
    sys.modules[module.__name__] = module
    return level


def game_values(s: Scenario, seed: int) -> dict:
    """gfootball's config values for `s` with the engine seeded `seed`: our team of one agent,
    gfootball's 20-action `v2` set (MageBench's `full` set begins with the same 20)."""
    # reverse_team_processing is gfootball's seed-derived default; set, or the first episode's would stick
    return {"action_set": "v2", "players": ["agent:left_players=1"], "real_time": False, "level": register(s),
            "game_engine_random_seed": seed, "reverse_team_processing": bool(seed % 2)}  # fmt: skip


_GAME: list = []  # the env of this process's episode (gfootball renders one env per process)


def reset(s: Scenario, seed: int):
    """A fresh env of `s` with the engine seeded `seed`, as MageBench's env makes one, the last one
    closed; returns (env, the start state, the start frame). The start frame is rendered as
    MageBench's env renders it, with env.render("rgb_array") (whose red and blue gfootball 2.10.2
    swaps), and the renderer is left on. It matters beyond the picture: render() moves the game onto
    gfootball's rendering engine (get_state, another engine, set_state), and the game played after
    that differs from an unrendered start's (2 of 4 random Online episodes measured). gfootball keeps
    its engines for the next env: after the first (seconds), an env takes ~25 ms and the render
    0.3-0.7 s (software OpenGL, off-screen where there is no display). A process that imports torch
    must do so before its first render: triton then loads its LLVM beside Mesa's, not after it
    (a segfault in `llvm::cl::Option::addArgument`)."""
    from gfootball.env import config, football_env

    close_games()
    env = football_env.FootballEnv(config.Config(game_values(s, seed)))  # the constructor resets
    _GAME.append(env)
    first = env.render("rgb_array")
    return env, env.observation()[0], first


@atexit.register  # before interpreter shutdown, when gfootball's own __del__ fails
def close_games() -> None:
    while _GAME:
        _GAME.pop().close()


# ---------------------------------------------------------------------------------------------
# The shaped score, from the game state (MageBench env/football_env.py, get_reward)
# ---------------------------------------------------------------------------------------------

SCALE = 20.0
W_PROGRESS, W_PASSED, W_GOAL, W_POSSESSION, W_PASS, W_SHOT = 0.8, 1.0, 2.0, 1.0, 20.0, 100.0
PASS_DECAY = 0.75
TERMS = ("progress", "opponents_passed", "goal", "possession", "pass", "shot")
GOAL_MOUTH = np.array([[1.0, -0.044], [1.0, -0.02], [1.0, 0.0], [1.0, 0.022], [1.0, 0.044]])


def opponents_passed(state) -> int:
    """Opponents (the keeper included) whose x is behind the ball's."""
    return int(sum(state["ball"][0] > x for x, _ in state["right_team"]))


def pass_clearance(state) -> float:
    """How free the ball is where a pass arrived: over the opponents, the smallest distance to the
    ball divided by 10·max(cos, 0) + 1, cos the angle between the opponent's and the goal's
    directions from the ball (an opponent between the ball and the right goal counts up to 11x
    closer). An opponent on the ball, or the ball on the goal line, counts as cos = 0."""
    ball = np.asarray(state["ball"][:2], dtype=float)
    to_goal = np.array([1.0, 0.0]) - ball
    scores = []
    for p in np.asarray(state["right_team"], dtype=float):
        d = np.linalg.norm(p - ball)
        cos = (p - ball) @ to_goal / (d * np.linalg.norm(to_goal)) if d > 0 and np.linalg.norm(to_goal) > 0 else 0.0
        scores.append(d / (10 * max(cos, 0.0) + 1))
    return float(min(scores))


def shot_clearance(state) -> float:
    """The widest shooting lane: for five points across the goal mouth (x = 1, y = -0.044 .. 0.044),
    the smallest distance from an opponent to the ball's straight path there (sampled at 100 points);
    the largest of the five."""
    ball = np.asarray(state["ball"][:2], dtype=float)
    opponents = np.asarray(state["right_team"], dtype=float)  # (n, 2)
    along = np.linspace(0.01, 1.0, 100)[:, None]  # (100, 1): (i + 1) / 100
    lanes = [np.linalg.norm((ball + along * (t - ball))[:, None] - opponents[None], axis=-1).min() for t in GOAL_MOUTH]
    return float(max(lanes))


def shot_distance(state) -> float:
    """1 within 0.3 of the goal line, else the ball's x (0 in our half)."""
    dist = 1.0 - state["ball"][0]
    return 1.0 if dist < 0.3 else max(1.0 - dist, 0.0)


@dataclass
class ShapedScore:
    """MageBench's shaped score of one episode, step by step from the game state (`add`).

    The first state after the first action sets the baselines and scores nothing. Then each step
    scores, times SCALE = 20 (the total reads like a percentage; a goal alone is 40):
      progress          0.8 x how far the ball's x passes the furthest it has been while we had it
                        (scored only while we have the ball)
      opponents_passed  1/11 per opponent newly behind the ball, -1/11 per one newly in front
                        (while we have the ball)
      goal              2 on the step our goal is seen
      possession        when the other team has the ball (not right after our shot): 1 x the share
                        of the 400 steps played so far, and the episode ends
      pass              a pass (long, high or short) that reaches another player: 20 x
                        `pass_clearance` there, x 0.75 for each earlier completed pass
      shot              a shot while we have the ball: min(100 x `shot_clearance` x
                        `shot_distance`, 2/3); once until the ball leaves the shooter
    """

    best_x: float = 0.0  # the ball's furthest x while we had it
    passed: int = 0  # opponents behind the ball when we last had it
    pass_weight: float = 1.0
    passing: bool = False  # a pass was kicked and has not reached anyone yet
    owner: int = -1  # the last player seen with the ball
    shot: bool = False
    started: bool = False
    done: bool = False  # the other team won the ball: the episode is over
    passes: int = 0  # passes completed
    totals: Dict[str, float] = field(default_factory=lambda: dict.fromkeys(TERMS, 0.0))

    @property
    def total(self) -> float:
        return sum(self.totals.values())

    def add(self, state, action: str) -> Dict[str, float]:
        """Score the state after `action`; returns this step's terms (already scaled)."""
        terms = dict.fromkeys(TERMS, 0.0)
        if not self.started:
            self.best_x, self.passed, self.started = state["ball"][0], opponents_passed(state), True
            return terms
        owner, team = state["ball_owned_player"], state["ball_owned_team"]
        if owner != -1 and team == 0:
            terms["progress"] = W_PROGRESS * max(0.0, state["ball"][0] - self.best_x)
            self.best_x = max(self.best_x, state["ball"][0])
            passed = opponents_passed(state)
            terms["opponents_passed"] = W_PASSED * (passed - self.passed) / 11
            self.passed = passed
        if state["score"][0] > 0:
            terms["goal"] = W_GOAL
        lost = team == 1 and not self.shot
        if lost:
            terms["possession"] = W_POSSESSION * (1 - state["steps_left"] / MAX_STEPS)
            self.done = True
        if self.passing and self.owner != -1 and owner != -1 and not lost and owner != self.owner:
            terms["pass"] = W_PASS * pass_clearance(state) * self.pass_weight
            self.pass_weight *= PASS_DECAY
            self.passing, self.passes = False, self.passes + 1
        if owner != -1:
            self.owner = owner
        self.passing = self.passing or action in PASSES
        if action == "action_shot" and owner != -1 and team == 0 and not self.shot:
            terms["shot"] = min(W_SHOT * shot_clearance(state) * shot_distance(state), W_GOAL / 3)
            self.shot = True
        if self.owner != owner and self.shot:  # the ball left the shooter: another shot may score again
            self.shot = False
        terms = {k: SCALE * v for k, v in terms.items()}
        for k, v in terms.items():
            self.totals[k] += v
        return terms


# ---------------------------------------------------------------------------------------------
# The Global setting: a whole plan played with MageBench's rules (env/football_env.py, take_action)
# ---------------------------------------------------------------------------------------------

MAX_AUTO_STEPS = 10  # a repeated move keeps moving for at most this many steps
MOVE_MIN_DISTANCE = 0.01  # ... while no opponent comes this close to the ball's path


@dataclass
class Episode:
    """One plan played from one scenario: what was played, the score and how the episode ended."""

    scenario: str
    plan: List[str]
    played: List[str] = field(default_factory=list)  # the action of every env step, repeats and play-outs included
    score: ShapedScore = field(default_factory=ShapedScore)
    end: str = "plan finished"  # goal | conceded | possession lost | out of play | time | plan finished
    states: List[dict] = field(default_factory=list)  # the game state at the start and after every step
    running: List[float] = field(default_factory=list)  # the score after each step


def free_to_move(state) -> bool:
    """MageBench's test for moving on: the ball (or its carrier) stays on the pitch three steps
    ahead and no opponent comes within MOVE_MIN_DISTANCE of it in the next five steps."""
    pos, vel = np.asarray(state["ball"][:2]), np.asarray(state["ball_direction"][:2])
    if state["ball_owned_player"] != -1:
        k = state["ball_owned_player"]
        pos, vel = np.asarray(state["left_team"][k]), np.asarray(state["left_team_direction"][k])
    ahead = pos + 3 * vel
    if not (-1.0 < ahead[0] < 1.0 and -0.42 < ahead[1] < 0.42):
        return False
    opponents, opponent_vel = np.asarray(state["right_team"]), np.asarray(state["right_team_direction"])
    gaps = [np.linalg.norm(pos + i * vel - (opponents + i * opponent_vel), axis=1).min() for i in range(6)]
    return min(gaps) >= MOVE_MIN_DISTANCE


def end_reason(state, score: ShapedScore) -> str:
    if state["score"][0] > 0:
        return "goal"
    if state["score"][1] > 0:
        return "conceded"
    if score.done or state["ball_owned_team"] == 1:
        return "possession lost"
    if state["game_mode"] != 0:
        return "out of play"
    return "time"


class Game:
    """One episode advanced one action at a time with MageBench's rules (env/football_env.py,
    take_action), from `env` just reset to scenario `s` (its start `state`):
    - the first action is played for one step;
    - a move repeating the previous action keeps moving (at most MAX_AUTO_STEPS steps) while
      `free_to_move`; a move after something else is one step;
    - a pass or shot while a player has the ball plays out: kick, then the last move direction
      (right before any), again until the ball leaves him, then the built-in AI until someone
      has it;
    - anything else is one step.
    `play` drives it with a whole plan (the Global setting), the Online setting with one answer a turn."""

    def __init__(self, env, state, s: Scenario, plan: Optional[List[str]] = None):
        self.env, self.state, self.done = env, state, False
        self.episode = Episode(s.name, list(plan or []), states=[state])
        self.previous, self.direction = None, "action_right"

    def engine_step(self, action: str):
        """One step of the engine; returns its observation."""
        return self.env.step(ACTIONS.index(action))

    def step(self, action: str):
        obs, _, env_done, _ = self.engine_step(action)
        new = obs[0]
        episode = self.episode
        episode.score.add(new, action)
        episode.played.append(action)
        episode.running.append(episode.score.total)
        episode.states.append(new)
        self.done = env_done or episode.score.done
        if self.done:
            episode.end = end_reason(new, episode.score)
        return new

    def act(self, action: str) -> int:
        """Play one action (with its repeats or play-out); returns the engine steps it took."""
        assert not self.done, "the episode is over"
        before = len(self.episode.played)
        if before == 0:
            self.state = self.step(action)
        elif action in MOVES and action == self.previous:  # (so it is already the direction)
            for _ in range(MAX_AUTO_STEPS):
                self.state = self.step(action)
                if self.done or not free_to_move(self.state):
                    break
        elif action in KICKS and self.state["ball_owned_player"] != -1:
            self.state = play_out(self.step, action, self.direction, self.state, lambda: self.done)
            self.previous = action
        else:
            self.direction = action if action in MOVES else self.direction
            self.previous = action
            self.state = self.step(action)
        return len(self.episode.played) - before


def play(s: Scenario, plan: List[str], seed: int = 0) -> Episode:
    """Play `plan` from `s` with MageBench's rules (`Game`), until the plan or the episode ends."""
    env, state, _ = reset(s, seed)
    env._env.disable_render()  # (gfootball's FootballEnvCore; play never looks)
    game = Game(env, state, s, plan=plan)
    for action in plan:
        if game.done:
            break
        game.act(action)
    return game.episode


def play_out(step, kick: str, direction: str, state, finished):
    """A pass or shot played until it is over: the kicker repeats kick + direction while he has the
    ball, then the built-in AI runs until any player has it (or the episode ends)."""
    kicker = state["ball_owned_player"]
    while not finished():
        if state["ball_owned_player"] == kicker:
            state = step(kick)
            if not finished():
                state = step(direction)
        elif state["ball_owned_player"] == -1:
            state = step("action_builtin_ai")
        else:
            break
    return state


# ---------------------------------------------------------------------------------------------
# Reading a model's plan
# ---------------------------------------------------------------------------------------------

ALIASES = {"up": "top", "down": "bottom", "up_left": "top_left", "up_right": "top_right", "down_left": "bottom_left",
           "down_right": "bottom_right", "shoot": "shot", "stop_sprint": "release_sprint",
           "stop_dribble": "release_dribble"}  # fmt: skip
MAX_PLAN = 4 * MAX_STEPS  # longer answers are not plans


def action_name(item: str) -> Optional[str]:
    """An action from one written item: any case, quotes, list markers, `action_` or not, spaces or
    hyphens for underscores, up/down for top/bottom, `shoot`. None if it names no action."""
    word = re.sub(r"^\s*(\d+[.):]|[-*•])\s*", "", item).strip().strip("'\"`*[](){}.").strip().lower()
    word = re.sub(r"[\s\-]+", "_", word)
    word = word[len("action_") :] if word.startswith("action_") else word
    name = "action_" + ALIASES.get(word, word)
    return name if name in ACTIONS else None


def read_plan(completion: str) -> Tuple[Optional[List[str]], str]:
    """(actions, "") from a completion's last <answer> span (the whole text if it has none), items
    separated by commas, semicolons, newlines, or spaces before `action_`; or (None, why) when an
    item is not an action or there is none: such a plan scores 0 and is counted, never played."""
    from rewards import last_answer_span  # rewards imports sokoban, data and torch: import at call time

    span = last_answer_span(completion)
    text = span if span is not None else completion
    items = [i for i in re.split(r"[,;\n]+|\s+(?=action[_\s])", text, flags=re.IGNORECASE) if i.strip()]
    if not items:
        return None, "no actions" if span is not None else "no actions and no <answer> span"
    if len(items) > MAX_PLAN:
        return None, f"{len(items)} items, more than {MAX_PLAN}"
    actions = [action_name(i) for i in items]
    unknown = [i.strip() for i, a in zip(items, actions) if a is None]
    if unknown:
        return None, f"not an action: {unknown[0][:40]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
    return actions, ""


# ---------------------------------------------------------------------------------------------
# Images: the start frame at the model's image size, replay GIFs
# ---------------------------------------------------------------------------------------------

QWEN_PIXELS = (3136, 1003520)  # Qwen2.5-VL-3B's min_pixels, max_pixels (conf/model/qwen2_5_vl_3b.yaml)


def model_size(width: int, height: int, min_pixels: int, max_pixels: int) -> Tuple[int, int]:
    """(width, height) Qwen2.5-VL's processor turns a width x height image into (multiples of 28)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


def start_frame(s: Scenario, seed: int = 0, pixels: Tuple[int, int] = QWEN_PIXELS) -> Image.Image:
    """The start of `s` as gfootball renders it (1280x720), resized to what the model sees, so the
    processor keeps it as it is."""
    env, _, _ = reset(s, seed)
    image = Image.fromarray(env.observation()[0]["frame"])  # RGB (render() returns it channel-swapped)
    return image.resize(model_size(*image.size, *pixels), Image.Resampling.LANCZOS)


def draw_state(state, caption: str = "", width: int = 480) -> Image.Image:
    """A top view of one game state: the pitch, our team yellow (the player we control ringed),
    theirs blue, the ball white; `caption` on top. Drawn from the state, so replays need no rendering."""
    height = round(width * 0.42) + 20  # the pitch is 2 x 0.84 field units; a caption band on top
    image = Image.new("RGB", (width, height), (46, 125, 50))
    draw = ImageDraw.Draw(image)

    def at(x, y):  # field (x -1..1, y -0.42..0.42) to pixels below the caption band
        return (x + 1) / 2 * (width - 1), 20 + (y + 0.42) / 0.84 * (height - 21)

    white = (235, 235, 235)
    draw.rectangle([at(-1, -0.42), at(1, 0.42)], outline=white)
    draw.line([at(0, -0.42), at(0, 0.42)], fill=white)
    for x0, x1 in ((-1, -0.7), (0.7, 1)):  # penalty boxes
        draw.rectangle([at(x0, -0.24), at(x1, 0.24)], outline=white)
    for side in (-1, 1):  # goal mouths
        draw.line([at(side, -0.044), at(side, 0.044)], fill=white, width=4)
    for team, colour in (("left_team", (250, 220, 40)), ("right_team", (40, 80, 220))):
        for x, y in state[team]:
            cx, cy = at(x, y)
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
    if state.get("active", -1) >= 0:
        cx, cy = at(*state["left_team"][state["active"]])
        draw.ellipse([cx - 7, cy - 7, cx + 7, cy + 7], outline=(255, 255, 255), width=2)
    bx, by = at(*state["ball"][:2])
    draw.ellipse([bx - 3, by - 3, bx + 3, by + 3], fill=(255, 255, 255), outline=(0, 0, 0))
    draw.text((6, 4), caption, fill=white)
    return image


def save_replay_gif(episode: Episode, path: str, width: int = 480, ms_per_step: int = 100) -> int:
    """An animated GIF of an episode, one frame per state, each captioned with the step, its action
    and the running score; the last frame held. Returns the number of frames."""
    captions = [f"{episode.scenario} start"] + [
        f"{episode.scenario} step {k + 1} {a[7:]}  score {r:.2f}" for k, (a, r) in enumerate(zip(episode.played, episode.running))
    ]
    frames = [draw_state(st, c, width) for st, c in zip(episode.states, captions)]
    durations = [ms_per_step] * (len(frames) - 1) + [20 * ms_per_step]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return len(frames)


# ---------------------------------------------------------------------------------------------
# Prompts, benchmark rows, evaluation
# ---------------------------------------------------------------------------------------------

# MageBench's instructions (its system prompt, env/football_env.py), in our words, with the answer
# format of LMM-R1's Sokoban prompt: the model that is evaluated zero-shot was trained on that.
SYSTEM_PROMPT = (
    "You are playing a football game. You control the player in a yellow shirt with a blue name above his head; "
    "your teammates also wear yellow, the opponents other colours. Attack the goal on the right side, as in a "
    "normal football match. The actions are:\n"
    "- action_left, action_top_left, action_top, action_top_right, action_right, action_bottom_right, "
    "action_bottom, action_bottom_left: run in that direction.\n"
    "- action_long_pass, action_high_pass, action_short_pass: pass to a teammate; the one who receives it "
    "depends on the direction you are moving in.\n"
    "- action_shot: shoot, always towards the opponents' goal.\n"
    "- action_sprint, action_release_sprint: start and stop sprinting (faster, but worse ball control).\n"
    "- action_dribble, action_release_dribble: start and stop dribbling (slower, but the ball is harder to take).\n"
    "- action_release_direction, action_sliding, action_idle, action_builtin_ai: stop moving, slide tackle, "
    "do nothing, let the game's AI act.\n"
    "Repeating a run keeps running that way, and a pass or shot plays out before the next action.\n"
    "Generate all actions from the initial frame to the end at once."
)
USER_PROMPT = (
    "This is the initial frame of the game. You should first think about the reasoning process in the mind and "
    "then provide the user with the answer, the answer is a sequence of actions separated by ','. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, e.g., "
    "<think> ... </think><answer> action_right, action_right, action_short_pass, action_shot </answer>, which "
    "means your output should start with <think> and end with </answer>."
)


def scenario_messages(image) -> List[dict]:
    from data import user_message  # (data imports torch: not in the worker processes, which import this file)

    return [{"role": "system", "content": SYSTEM_PROMPT}, user_message(USER_PROMPT, image)]


NO_GOLD = "(none: the plan is played and scored)"  # rows need an answer; a football plan has no gold


def build(out: str, names: List[str], seed: int = 0, pixels: Tuple[int, int] = QWEN_PIXELS) -> int:
    """Write `out/test.jsonl` (our row format: message, answer NO_GOLD, question = the scenario's
    name, its table line, the engine seed) and `out/images/<name>.png`, the start frames at the
    model's image size. Returns the rows written."""
    scenarios = read_scenarios()
    unknown = [n for n in names if n not in scenarios]
    if unknown:
        raise ValueError(f"no scenario {unknown[0]!r}; `python football.py list` lists them")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    with open(os.path.join(out, "test.jsonl.tmp"), "w") as f:
        for name in names or list(scenarios):
            s, engine_seed = scenarios[name], scenario_seed(seed, name)
            image = f"images/{name}.png"
            # the messages first: they import torch, whose triton crashes loading its LLVM after the renderer's
            row = {"message": json.dumps(scenario_messages(image)), "answer": NO_GOLD, "question": name,
                   "datasource": f"football_{s.region}_{s.kind}", "setup": format_scenario(s), "seed": engine_seed}  # fmt: skip
            start_frame(s, engine_seed, pixels).save(os.path.join(out, image))
            f.write(json.dumps(row) + "\n")
    os.replace(os.path.join(out, "test.jsonl.tmp"), os.path.join(out, "test.jsonl"))
    return len(names or scenarios)


def evaluate(rows: List[dict], completions: List[str], out_dir: Optional[str] = None, gifs: int = 4) -> Tuple[dict, List[dict]]:
    """Play each completion's plan from its row's scenario (rows from `build`: `setup`, `seed`).

    Returns (metrics, one record per row: scenario, plan, error, score, terms, passes, end, steps).
    Metrics: `score`, the mean shaped score (MageBench's reported number); `accuracy` = score / 100,
    and `region=R1`, `kind=P`, ... the same by scenario family, as fractions like eval.py's tables;
    `goals` and `malformed` (plans that could not be read, each scored 0) as rates. With `out_dir`,
    the first `gifs` plans played are saved as `out_dir/football_replays/<scenario>.gif` and every
    record in `out_dir/scores.jsonl`."""
    records = []
    for row, completion in zip(rows, completions):
        s = parse_scenario(row["setup"])
        plan, error = read_plan(completion)
        record = {"scenario": s.name, "region": s.region, "kind": s.kind, "plan": plan, "error": error, "score": 0.0,
                  "terms": dict.fromkeys(TERMS, 0.0), "passes": 0, "end": "malformed plan", "steps": 0}  # fmt: skip
        if plan is not None:
            gif = out_dir is not None and sum(r["plan"] is not None for r in records) < gifs
            episode = play(s, plan, int(row["seed"]))
            record.update(score=episode.score.total, terms=episode.score.totals, passes=episode.score.passes,
                          end=episode.end, steps=len(episode.played))  # fmt: skip
            if gif:
                os.makedirs(os.path.join(out_dir, "football_replays"), exist_ok=True)
                save_replay_gif(episode, os.path.join(out_dir, "football_replays", f"{s.name}.gif"))
        records.append(record)
    metrics = score_metrics(records) | {"malformed": sum(r["plan"] is None for r in records) / max(1, len(records))}
    if out_dir is not None:
        write_records(os.path.join(out_dir, "scores.jsonl"), records)
    return metrics, records


def score_metrics(records: List[dict]) -> dict:
    """`score`, the mean shaped score over records (MageBench's reported number); `accuracy` = score
    / 100, and `region=R1`, `kind=P`, ... the same by scenario family, as fractions like eval.py's
    tables; `goals`, a rate."""
    n = max(1, len(records))
    mean = sum(r["score"] for r in records) / n
    metrics = {"accuracy": mean / 100, "score": mean, "goals": sum(r["end"] == "goal" for r in records) / n}
    for key in ("region", "kind"):
        for value in sorted({r[key] for r in records}):
            scores = [r["score"] for r in records if r[key] == value]
            metrics[f"{key}={value}"] = sum(scores) / len(scores) / 100
    return metrics


def write_records(path: str, records: List[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------------------------------------
# The Online setting, as MageBench plays Football (Flow/Online_HL_FBandSB.py, main.py and its
# official scripts/experiments/Football/*.sh): one action a turn, seen from a frame of the game
# ---------------------------------------------------------------------------------------------

# The 16 action IDs its parser accepts (idle, release_direction, sliding and builtin_ai are not among them)
ONLINE_ACTIONS = MOVES + KICKS + ("action_sprint", "action_release_sprint", "action_dribble", "action_release_dribble")
# Its texts, verbatim: the env's system prompt, the format instruction, the turn messages
ONLINE_SYSTEM_PROMPT = """You're going to play a football game. The character you control wears a yellow jersey with a blue name above his head.
Your goal is to attack the goal on the **right side** according to standard soccer rules. It's your teammates who wear the yellow jersey, and the opponents in the other colors.
You'll use text commands to manipulate your character. Here are the action ID and explaination:

- 'action_left', 'action_top_left', 'action_top', 'action_top_right', 'action_right', 'action_bottom_right', 'action_bottom', 'action_bottom_left': Run in the direction corresponding to the action ID's name.
- 'action_long_pass': perform a long pass to the player on your team. Player to pass the ball to is auto-determined based on the movement direction.
- 'action_high_pass': perform a high pass, similar to action_long_pass.
- 'action_short_pass': perform a short pass, similar to action_long_pass.
- 'action_shot': perform a shot, always in the direction of the opponent's goal.
- 'action_sprint', 'action_release_sprint': start and stop sprinting, sticky action. If sprinting, player moves faster, but has worse ball handling.
- 'action_dribble', 'action_release_dribble': start and stop dribbling, sticky action. Player moves slower, but it is harder to take over the ball from him.

"""  # noqa: E501
FORMAT_PROMPT = ("You should perform 1 action for each generation, with this format: \n# analyze\nsome analyze\n# action\n"
                 "action ID\n\nFor example: \n# analyze\n...\n# action\naction_left")  # fmt: skip
SCENE, FIRST_TURN = "Current game scene:", "Please act according to the init game scene."
NEXT_TURN = "Please continue to act according to the current game scene."
REGENERATE = "Please regenerate the response that satisfy the format requirements strictly."
MINI = ("R1_P_2", "R1_R_4", "R2_T_2", "R2_R_1", "R3_P_3", "R3_R_2", "R3_T_2", "R4_P_3", "R4_R_2", "R4_T_2", "R5_P_2",
        "R5_R_3", "R6_T_1", "R6_R_2", "R7_P_3", "R7_R_4", "R8_R_4", "R8_T_3", "R9_P_4", "R9_R_2")  # Football_mini.json  # fmt: skip


def parse_action(answer: str) -> Tuple[Optional[str], str]:
    """MageBench's reading of an answer: the text after the first `# action` (up to a second one),
    stripped, must be one of the 16 ONLINE_ACTIONS exactly; without `# action` the whole answer,
    stripped, must be. Returns (action, "") or (None, why)."""
    text = answer.split("# action")[1] if "# action" in answer else answer
    if text.strip() in ONLINE_ACTIONS:
        return text.strip(), ""
    if "# action" not in answer:
        return None, "no '# action' and the answer is not an action ID"
    return None, f"not one of the 16 action IDs after '# action': {text.strip()[:40]!r}"


def augment(image: Image.Image) -> Image.Image:
    """MageBench's HARDCODE_IMAGE_AUGMENTATION, applied to every frame the model sees: brightness
    x1.5, contrast x0.6, brightness x1.2 (PIL's ImageEnhance, in that order)."""
    from PIL import ImageEnhance

    image = ImageEnhance.Brightness(image).enhance(1.5)
    image = ImageEnhance.Contrast(image).enhance(0.6)
    return ImageEnhance.Brightness(image).enhance(1.2)


def fit(image: Image.Image, longest: int) -> Image.Image:
    """MageBench's resize_image: the longest side to `longest` (int() of the scaled other side), Lanczos;
    a 1280x720 frame at its official --resolution 1280 comes back unchanged."""
    scale = longest / max(image.size)
    return image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.LANCZOS)


def trim_memory(memory: List[dict], max_messages: int, max_images: int) -> List[dict]:
    """MageBench's history for the next turn: the last `max_messages` messages, and images only in
    the newest messages that hold at most `max_images` of them (older messages keep their text)."""
    memory = memory[-max_messages:]
    images, keep_from = 0, len(memory)
    for k in range(len(memory) - 1, -1, -1):
        images += sum(c["type"] == "image" for c in memory[k]["content"])
        if images > max_images:
            break
        keep_from = k
    return [m if k >= keep_from else without_images(m) for k, m in enumerate(memory)]


def without_images(message: dict) -> dict:
    return {**message, "content": [c for c in message["content"] if c["type"] != "image"]}


def merge_roles(messages: List[dict]) -> List[dict]:
    """Consecutive messages of one role as one (MageBench's API layer, merge_role)."""
    merged: List[dict] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + m["content"]}
        else:
            merged.append({"role": m["role"], "content": list(m["content"])})
    return merged


def text(words: str) -> dict:
    return {"type": "text", "text": words}


@dataclass
class OnlineEpisode:
    """One Online episode: the conversation as the model sees it, and what each turn did.

    turns: per turn, the answer, the action read (or None and the parse error), the engine steps it
    took and the actions they played, the turn's reward and the score after it."""

    scenario: Scenario
    repeat: int
    seed: int  # the engine's
    memory: List[dict] = field(default_factory=list)  # the history after the system prompt and format instruction
    turns: List[dict] = field(default_factory=list)
    parse_errors: int = 0
    frames: int = 0  # frames the model was shown
    done: bool = False
    end: str = "turns used up"  # or, once the game ends, as Episode.end
    result: dict = field(default_factory=lambda: {"score": 0.0, "terms": dict.fromkeys(TERMS, 0.0), "passes": 0})

    def messages(self, max_messages: int, max_images: int) -> List[dict]:
        """The chat for the next turn (the history trimmed as MageBench trims it, for good)."""
        self.memory = trim_memory(self.memory, max_messages, max_images)
        fixed = [{"role": "system", "content": [text(ONLINE_SYSTEM_PROMPT)]}, {"role": "user", "content": [text(FORMAT_PROMPT)]}]
        return merge_roles(fixed + self.memory)

    def scene(self, frame: Optional[Image.Image], first: bool) -> None:
        """The user's message with a new frame (none where the policy does not look at frames)."""
        image = [{"type": "image", "image": frame}] if frame is not None else []
        self.frames += frame is not None
        self.memory.append({"role": "user", "content": [text(SCENE), *image, text(FIRST_TURN if first else NEXT_TURN)]})

    def answered(self, answer: str) -> Optional[str]:
        """Record the model's answer; returns the action to play, or None (a parse error: the turn
        counts, the game does not move, and the model is asked to regenerate)."""
        action, error = parse_action(answer)
        self.memory.append({"role": "assistant", "content": [text(answer)]})
        self.turns.append({"answer": answer, "action": action, "error": error, "steps": 0, "played": [], "reward": 0.0,
                           "score": self.result["score"]})  # fmt: skip
        if action is None:
            self.parse_errors += 1
            self.memory.append({"role": "user", "content": [text(REGENERATE)]})
        return action

    def outcome(self, outcome: dict, frame: Optional[Image.Image]) -> None:
        """The worker's outcome of this turn's action; the next scene unless the episode ended."""
        turn = self.turns[-1]
        turn.update(steps=len(outcome["played"]), played=outcome["played"], reward=outcome["score"] - self.result["score"],
                    score=outcome["score"])  # fmt: skip
        self.result = {k: outcome[k] for k in ("score", "terms", "passes")}
        self.done = outcome["done"]
        if self.done:
            self.end = outcome["end"]
        else:
            self.scene(frame, first=False)

    def record(self) -> dict:
        s = self.scenario
        return {"scenario": s.name, "region": s.region, "kind": s.kind, "repeat": self.repeat, "seed": self.seed,
                **self.result, "steps": sum(t["steps"] for t in self.turns), "end": self.end, "turns": len(self.turns),
                "parse_errors": self.parse_errors, "frames": self.frames, "log": self.turns}  # fmt: skip


# ---- the game side: one gfootball env per worker process, rendering only the frames the model sees ----


class FramedGame(Game):
    """A Game that renders the frames the model sees (render="seen"), every frame (render="every",
    as MageBench does: the same pixels, a rendered step costs 0.3-1.8 s on CPU against ~4 ms), or
    none (render="none", for policies that do not look).

    gfootball's renderer draws a step from its state and the frame it drew the step before, so a
    frame rendered after unrendered steps differs (by a fraction of a pixel at the edges). "seen"
    therefore keeps a snapshot (the engine's get_state, ~0.4 ms) before each step, and when a frame
    is wanted replays the turn's last two steps from it with the renderer on: the frame is the one
    rendering every step gives (tests: equal pixels), and the game goes on exactly as it was."""

    def __init__(self, env, state, s: Scenario, render: str):
        super().__init__(env, state, s)
        self.render, self.recent = render, []  # recent: [(engine state, action)] before each of the last two steps

    def engine_step(self, action: str):
        if self.render == "seen":
            self.recent = (self.recent + [(self.env._env.get_state({}), action)])[-2:]
        return super().engine_step(action)

    def frame(self) -> Image.Image:
        """The frame after the last step, with MageBench's augmentation. The renderer stays on (the
        start frame turned it on) until two steps have been played: a replay from the start state
        draws a few hundred pixels differently for the rest of the episode, one from any later
        state does not."""
        core = self.env._env  # gfootball's FootballEnvCore: get_state / set_state / disable_render
        if not core._env.game_config.render:
            core.set_state(self.recent[0][0])
            core._env.game_config.render = True  # what its render() sets, without drawing the restored state
            for _, action in self.recent:
                self.env.step(ACTIONS.index(action))
        frame = Image.fromarray(self.env.observation()[0]["frame"])
        if self.render == "seen" and len(self.episode.played) >= 2:
            core.disable_render()
        return augment(frame)


def start_game(s: Scenario, seed: int, render: str) -> Tuple[FramedGame, Optional[Image.Image]]:
    """A game of `s` (`reset`) and the first frame the model sees, red and blue swapped as MageBench's
    (later frames, the observations', are not), augmented; None when render="none" (the start is
    rendered all the same: `reset` says why)."""
    env, state, first = reset(s, seed)
    if render == "none":
        env._env.disable_render()
    return FramedGame(env, state, s, render), None if render == "none" else augment(Image.fromarray(first))


def worker_main(fd: int) -> None:
    """A worker process: games started and played on command (`Pitches`), one at a time, over the
    socket `fd`."""
    from multiprocessing.connection import Connection

    conn, game = Connection(fd), None
    while (command := conn.recv()) is not None:
        try:
            if command[0] == "start":
                game, frame = start_game(parse_scenario(command[1]), command[2], command[3])
                conn.send(("ok", frame))
            else:
                steps = game.act(command[1])
                score = game.episode.score
                frame = game.frame() if game.render != "none" and not game.done else None
                conn.send(("ok", {"played": game.episode.played[-steps:], "score": score.total, "terms": dict(score.totals),
                                  "passes": score.passes, "done": game.done, "end": game.episode.end, "frame": frame}))  # fmt: skip
        except Exception as e:  # noqa: BLE001  (sent back: the evaluation stops with it)
            import traceback

            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class Pitches:
    """`n` worker processes, each with its own gfootball env (gfootball renders one env per process),
    where games start and step in parallel. Each is a fresh interpreter that imports this file only
    (not the caller's main script, nor torch or CUDA). Where frames are rendered and there is no
    display, a virtual one (Xvfb) is started for them and stopped with the pool."""

    def __init__(self, n: int, render: str):
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        self.xvfb, self.conns, self.procs, env = None, [], [], dict(os.environ)
        try:
            if render != "none" and not env.get("DISPLAY"):  # frames a model sees render on a display, as MageBench's
                self.xvfb, env["DISPLAY"] = virtual_display()
            here = os.path.dirname(os.path.abspath(__file__))
            for _ in range(n):
                mine, theirs = socket.socketpair()
                code = f"import sys; sys.path.insert(0, {here!r}); import football; football.worker_main({theirs.fileno()})"
                self.procs.append(subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),), env=env))
                theirs.close()
                self.conns.append(Connection(mine.detach()))
        except BaseException:
            self.close()
            raise

    def send(self, k: int, *command) -> None:
        self.conns[k].send(command)

    def receive(self, k: int):
        try:
            if not self.conns[k].poll(600):
                raise RuntimeError(f"football worker {k} gave no answer in 600 s")
            status, value = self.conns[k].recv()
        except (EOFError, ConnectionError):
            raise RuntimeError(f"football worker {k} died (exit code {self.procs[k].poll()})") from None
        if status != "ok":
            raise RuntimeError(f"football worker {k} failed: {value}")
        return value

    def close(self) -> None:
        """Stop the workers (asked, then killed after 10 s) and the virtual display."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:  # already gone
                pass
        for proc in self.procs + ([self.xvfb] if self.xvfb is not None else []):
            if proc is self.xvfb:
                proc.terminate()
            try:
                proc.wait(10)
            except Exception:  # noqa: BLE001  (one that will not stop is killed)
                proc.kill()
                proc.wait()
        for conn in self.conns:
            conn.close()


def virtual_display():
    """(Xvfb process, its DISPLAY) on a free display number (Xvfb -displayfd picks one)."""
    import shutil
    import subprocess

    if shutil.which("Xvfb") is None:
        raise RuntimeError("rendering Football frames needs a display: install Xvfb (apt-get install xvfb) or set DISPLAY")
    read, write = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                            pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()  # written once the server is up
    if not number:
        proc.kill()
        raise RuntimeError("Xvfb did not start (no display number on -displayfd)")
    return proc, f":{number}"


# ---- the turn loop, every live episode's turn in one generate ----


@dataclass
class OnlineSettings:
    """MageBench's official Football run: --max_loop 400 --max_memory 5 --max_image 1 --resolution 1280
    (its sampling, --temperature 0.1 --max_tokens 1000 and top_p 0.95, is the policy's)."""

    max_turns: int = 400
    max_messages: int = 10  # max_memory 5: five exchanges
    max_images: int = 1
    resolution: int = 1280
    render: str = "seen"  # seen | every | none (`FramedGame`); none where the policy does not look


def play_online(policy, episodes: List[OnlineEpisode], pitches: Pitches, settings: OnlineSettings) -> None:
    """Play `episodes` to their end, as many at once as there are workers: each turn, every live
    episode's chat goes to `policy` in one call (policy(episodes, chats) -> answers), then every
    valid action is played in the workers in parallel. Episodes finish independently; a finished
    one's worker takes the next episode."""
    queue, live = list(episodes), {}  # live: worker -> episode
    while queue or live:
        started = [k for k in range(len(pitches.conns)) if k not in live][: len(queue)]
        for k in started:
            live[k] = queue.pop(0)
            pitches.send(k, "start", format_scenario(live[k].scenario), live[k].seed, settings.render)
        for k in started:
            live[k].scene(seen(pitches.receive(k), settings), first=True)
        workers = sorted(live)
        chats = [live[k].messages(settings.max_messages, settings.max_images) for k in workers]
        answers = policy([live[k] for k in workers], chats)
        moving = []
        for k, answer in zip(workers, answers):
            if (action := live[k].answered(answer)) is not None:
                pitches.send(k, "act", action)
                moving.append(k)
        for k in moving:
            outcome = pitches.receive(k)
            live[k].outcome(outcome, seen(outcome["frame"], settings))
        for k in workers:
            if live[k].done or len(live[k].turns) >= settings.max_turns:
                del live[k]


def seen(frame: Optional[Image.Image], settings: OnlineSettings) -> Optional[Image.Image]:
    return None if frame is None else fit(frame, settings.resolution)


def subset_names(subset: str) -> List[str]:
    """The scenarios of a subset: "mini" (MageBench's Football_mini.json) or "all" (the 108)."""
    return list(MINI if subset == "mini" else read_scenarios())


def online_episodes(names: List[str], repeats: int, seed: int) -> List[OnlineEpisode]:
    """`repeats` episodes of each named scenario, repeat r's engine seeded scenario_seed(seed, name, r):
    reproducible from `seed`, and as varied as MageBench's unseeded repeats."""
    scenarios = read_scenarios()
    unknown = [n for n in names if n not in scenarios]
    if unknown:
        raise ValueError(f"no scenario {unknown[0]!r}; `python football.py list` lists them")
    return [OnlineEpisode(scenarios[n], r, scenario_seed(seed, n, r)) for n in names for r in range(repeats)]


def turn_seed(seed: int, episode: OnlineEpisode) -> int:
    """The sampling seed of an episode's next turn: the same whatever episodes share its batch."""
    return zlib.crc32(f"{seed}:{episode.scenario.name}:{episode.repeat}:{len(episode.turns)}".encode())


def run_online(policy, episodes: List[OnlineEpisode], settings: OnlineSettings, workers: int) -> float:
    """Play `episodes` (play_online) with `workers` worker processes; returns the wall time in s."""
    import time

    start = time.perf_counter()
    if episodes:
        pitches = Pitches(min(workers, len(episodes)), settings.render)
        try:
            play_online(policy, episodes, pitches, settings)
        finally:
            pitches.close()
    return time.perf_counter() - start


def online_metrics(records: List[dict], wall_s: float) -> dict:
    """score_metrics; per episode `parse_errors`, `turns` and engine `steps`; the `wall_s` the episodes
    took, the `frames` the model was shown and `frames_per_s`."""
    n = max(1, len(records))
    per_episode = {key: sum(r[key] for r in records) / n for key in ("parse_errors", "turns", "steps")}
    frames = sum(r["frames"] for r in records)
    timing = {"wall_s": wall_s, "frames": frames, "frames_per_s": frames / wall_s if wall_s > 0 else 0.0}
    return score_metrics(records) | per_episode | {"episodes": len(records)} | timing


def answer_with(action: str) -> str:
    return f"# analyze\nA scripted baseline.\n# action\n{action}"


# Scripted policies that do not look at the game (Online baselines): the answer for an episode's next turn
BASELINES = {
    "random": lambda e: answer_with(random.Random(f"{e.seed}:{len(e.turns)}").choice(ONLINE_ACTIONS)),
    "shoot": lambda e: answer_with("action_shot"),
    "right_then_shoot": lambda e: answer_with("action_right" if len(e.turns) < 4 else "action_shot"),  # a run, then shots
    "bad_format": lambda e: "I will shoot: action_shot",  # never MageBench's format: every turn is a parse error
}


def scripted(answer):
    """A policy (play_online's) answering each episode with answer(episode)."""
    return lambda episodes, chats: [answer(e) for e in episodes]


# ---------------------------------------------------------------------------------------------
# Command line: list, show, play, build
# ---------------------------------------------------------------------------------------------


def describe(s: Scenario) -> str:
    team = lambda players: "\n".join(f"    {role} {x:+.3f} {y:+.3f}" for role, x, y in players)  # noqa: E731
    return (f"{s.name} (region {s.region}, kind {s.kind}): ball {s.ball[0]:+.3f} {s.ball[1]:+.3f}\n"
            f"  left (ours, attacking right), {len(s.left)} players:\n{team(s.left)}\n"
            f"  right, {len(s.right)} players:\n{team(s.right)}")  # fmt: skip


def report(episode: Episode) -> str:
    terms = ", ".join(f"{k} {v:.2f}" for k, v in episode.score.totals.items())
    return (f"{episode.scenario}: score {episode.score.total:.2f} ({terms}); {episode.score.passes} passes completed; "
            f"{len(episode.played)} steps for {len(episode.plan)} actions; ended: {episode.end}")  # fmt: skip


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="football.py", description="MageBench's Football scenarios on gfootball.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the scenarios: name, ball, players a side")
    s = sub.add_parser("show", help="a scenario's positions, and optionally its start frame")
    s.add_argument("name")
    s.add_argument("--png", help="write the start frame here, at the model's image size")
    s.add_argument("--max-pixels", type=int, default=QWEN_PIXELS[1], help="the model's max_pixels (Qwen2.5-VL-3B's by default)")
    s.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("play", help="play a plan read from stdin (actions separated by commas or lines)")
    p.add_argument("name")
    p.add_argument("--seed", type=int, default=0, help="the engine's random seed")
    p.add_argument("--gif", help="write the replay here")
    o = sub.add_parser("online", help="play scripted Online baselines (MageBench's setting) and score them")
    o.add_argument("--policy", choices=sorted(BASELINES), default="random")
    o.add_argument("--subset", choices=("mini", "all"), default="mini", help="MageBench's 20 (Football_mini.json) or all 108")
    o.add_argument("--names", nargs="*", default=[], help="these scenarios instead of a subset")
    o.add_argument("--repeats", type=int, default=10)
    o.add_argument("--seed", type=int, default=0, help="seeds each episode's engine (scenario_seed)")
    o.add_argument("--workers", type=int, default=2, help="gfootball processes: episodes played at once")
    o.add_argument(
        "--render",
        choices=("none", "seen", "every"),
        default="none",
        help="frames: none (the baselines do not look), seen (those a model would see), every (each engine step, as MageBench)",
    )
    o.add_argument("--max-turns", type=int, default=400)
    o.add_argument("--out", help="write every episode's record (turn logs included) here, as jsonl")
    b = sub.add_parser("build", help="eval.py's rows: start frames and prompts for the scenarios")
    b.add_argument("--out", required=True, help="output directory (eval.py reads <eval.data_dir>/football/test.jsonl)")
    b.add_argument("--names", nargs="*", default=[], help="scenarios to include (default: all)")
    b.add_argument("--seed", type=int, default=0, help="seeds each scenario's engine (scenario_seed)")
    b.add_argument("--min-pixels", type=int, default=QWEN_PIXELS[0])
    b.add_argument("--max-pixels", type=int, default=QWEN_PIXELS[1])
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except (ValueError, OSError) as e:  # unknown scenarios, unreadable plans, missing files: the message is the help
        sys.exit(f"error: {e}")


def run_command(args) -> int:
    if args.command == "list":
        for s in read_scenarios().values():
            print(f"{s.name}  ball {s.ball[0]:+.3f} {s.ball[1]:+.3f}  {len(s.left)} v {len(s.right)}")
    elif args.command == "show":
        s = scenario(args.name)
        print(describe(s))
        if args.png:
            image = start_frame(s, scenario_seed(args.seed, s.name), (QWEN_PIXELS[0], args.max_pixels))
            image.save(args.png)
            print(f"wrote {args.png} ({image.width}x{image.height})")
    elif args.command == "play":
        s = scenario(args.name)
        plan, error = read_plan(sys.stdin.read())
        if plan is None:
            raise ValueError(f"plan: {error}; actions are {', '.join(ACTIONS)}")
        episode = play(s, plan, args.seed)
        print(report(episode))
        if args.gif:
            print(f"wrote {args.gif} ({save_replay_gif(episode, args.gif)} frames)")
    elif args.command == "online":
        episodes = online_episodes(args.names or subset_names(args.subset), args.repeats, args.seed)
        settings = OnlineSettings(max_turns=args.max_turns, render=args.render)
        wall = run_online(scripted(BASELINES[args.policy]), episodes, settings, args.workers)
        records = [e.record() for e in episodes]
        print(json.dumps(online_metrics(records, wall)))
        if args.out:
            write_records(args.out, records)
    else:
        n = build(args.out, args.names, args.seed, (args.min_pixels, args.max_pixels))
        print(f"wrote {n} scenarios to {os.path.join(args.out, 'test.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
