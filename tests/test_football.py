"""Football (MageBench's scenarios on gfootball): the scenario table, the plan reader, the shaped score
against hand-computed states, scripted plans with known outcomes on the real engine, the CLI,
MageBench's Online setting (its parser, memory, pixels; rendering only the frames the model sees;
batched turns) and eval.py's `football` benchmark in both settings. Frames a model sees render on a
display: Xvfb where there is none (`football.py build` under xvfb-run, the Online workers start
their own). The tests that need gfootball (the `engine` fixture) skip where it is missing, saying how
to install it, and fail under `.ci/run`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import eval as evaluation
import football
from conftest import ROOT, TINY_DEFAULTS, compose_cfg, need, run_on_two_ranks
from football import Scenario

# Hand-made set-ups: the other team's keeper far from its goal (field x = -1 is our goal) leaves it empty.
EMPTY_GOAL = Scenario("empty_goal", (0.77, 0.0), (("GK", -1.0, 0.0), ("CB", 0.75, 0.0)), (("GK", -1.0, 0.0),))
FREE_PASS = Scenario("free_pass", (0.01, 0.0), (("GK", -1.0, 0.0), ("CM", 0.0, 0.0), ("CF", 0.3, 0.0)), (("GK", -1.0, 0.3),))


def state(ball=(0.0, 0.0), owner=-1, team=-1, right=((0.5, 0.0),), score=(0, 0), steps_left=400):
    """An observation with what the score reads."""
    return {"ball": [*ball, 0.0], "ball_owned_player": owner, "ball_owned_team": team, "right_team": [list(p) for p in right],
            "score": list(score), "steps_left": steps_left}  # fmt: skip


@pytest.fixture(scope="module")
def engine():
    """gfootball, built (requirements-football.txt), and a display or xvfb-run to render on."""
    need("football")


# ---- the scenario table ----


def test_table_holds_magebenchs_108_scenarios_and_round_trips():
    scenarios = football.read_scenarios()
    assert sorted(scenarios) == sorted(f"R{r}_{k}_{n}" for r in range(1, 10) for k in "PRT" for n in range(1, 5))
    lines = [line.rstrip("\n") for line in open(football.SCENARIO_FILE) if line.strip() and not line.startswith("#")]
    assert [football.format_scenario(football.parse_scenario(line)) for line in lines] == lines
    # MageBench's R1_P_1.py: ball (-0.8107, -0.3507); its right keeper at (-0.984, -0.004) in that team's
    # own frame is at (0.984, 0.004) on the field
    first = scenarios["R1_P_1"]
    assert (
        first.ball == (-0.8107, -0.3507) and first.right[0] == ("GK", 0.984, 0.004) and first.left[0] == ("GK", -0.9813, -0.004)
    )
    assert (len(scenarios["R1_P_4"].left), len(scenarios["R1_P_4"].right)) == (7, 8)  # not every scenario is 11 v 11
    assert (first.region, first.kind) == ("R1", "P")
    with pytest.raises(ValueError, match="ROLE X Y"):
        football.parse_scenario("X | ball 0 0 | left GK 0 | right GK 0 0")


@pytest.mark.parametrize("name", ["R1_P_4", "R9_T_2"])
def test_scenarios_are_placed_as_written(engine, name):
    s = football.scenario(name)
    _, start, _ = football.reset(s, seed=1)
    assert np.allclose(start["ball"][:2], s.ball, atol=0.02)
    for team, players in (("left_team", s.left), ("right_team", s.right)):
        assert np.allclose(start[team], [(x, y) for _, x, y in players], atol=0.02), team


# ---- reading plans ----


def test_plan_reader_is_lenient_about_how_actions_are_written():
    text = "<think>go</think><answer>action_right, Right; 'action_top_right'\n2. short pass, shoot action_idle</answer>"
    assert football.read_plan(text) == (["action_right", "action_right", "action_top_right", "action_short_pass",
                                         "action_shot", "action_idle"], "")  # fmt: skip
    assert football.read_plan("action_up action_down_left") == (["action_top", "action_bottom_left"], "")  # no tags
    assert football.read_plan("<answer>a</answer> <answer>action_shot</answer>")[0] == ["action_shot"]  # the last span


@pytest.mark.parametrize(
    "completion, why",
    [("<answer></answer>", "no actions"), ("I would pass.", "not an action: 'I would pass.'"),
     ("<answer>action_right, action_fly, jump</answer>", "not an action: 'action_fly' (and 1 more)"), ("", "no actions and no <answer> span")],
)  # fmt: skip
def test_malformed_plans_are_a_clear_counted_zero(completion, why, tmp_path):
    assert football.read_plan(completion) == (None, why)
    row = {"setup": football.format_scenario(football.scenario("R5_P_2")), "seed": 0}
    metrics, records = football.evaluate([row, row], [completion, "<answer>\u00bfaction?</answer>"], str(tmp_path))
    assert metrics["score"] == 0.0 and metrics["malformed"] == 1.0 and records[0]["error"] == why
    assert records[0]["end"] == "malformed plan" and records[0]["steps"] == 0  # never played


# ---- the shaped score on hand-computed states ----


def test_clearances_and_distance():
    assert football.opponents_passed(state(ball=(0.1, 0), right=((-0.5, 0), (0.0, 0.2), (0.2, 0), (0.9, 0)))) == 2
    # towards the goal an opponent counts 11x closer: 0.5 / 11 beats 0.3 (to the side) and 0.2 (behind)
    assert football.pass_clearance(state(right=((0.5, 0), (0.0, 0.3), (-0.2, 0)))) == pytest.approx(0.5 / 11)
    # one opponent at (0.9, 0.2): the lane to (1, -0.044) passes it closest at 0.2168
    assert football.shot_clearance(state(ball=(0.8, 0), right=((0.9, 0.2),))) == pytest.approx(0.21681, abs=1e-4)
    assert [football.shot_distance(state(ball=(x, 0))) for x in (0.8, 0.5, -0.2)] == [1.0, 0.5, 0.0]


def test_score_terms_step_by_step():
    right = ((0.5, 0.0), (0.9, 0.3), (-0.5, 0.0))
    score = football.ShapedScore()
    assert sum(score.add(state((0.0, 0), 3, 0, right), "action_right").values()) == 0  # the baselines
    assert score.add(state((0.1, 0), 3, 0, right), "action_right") == pytest.approx(
        {"progress": 20 * 0.8 * 0.1, "opponents_passed": 0, "goal": 0, "possession": 0, "pass": 0, "shot": 0}
    )
    step = score.add(state((0.6, 0), 3, 0, right), "action_short_pass")  # past the opponent at x = 0.5
    assert step["progress"] == pytest.approx(8.0) and step["opponents_passed"] == pytest.approx(20 / 11)
    assert sum(score.add(state((0.7, 0.1), -1, -1, right), "action_builtin_ai").values()) == 0  # ball in the air
    received = state((0.8, 0.2), 5, 0, right)
    step = score.add(received, "action_builtin_ai")  # a teammate has it: one completed pass
    assert step["pass"] == pytest.approx(20 * 20 * football.pass_clearance(received)) and score.passes == 1
    assert step["progress"] == pytest.approx(20 * 0.8 * 0.2) and step["opponents_passed"] == 0
    step = score.add(state((0.8, 0.2), 3, 0, right), "action_builtin_ai")  # another player, but no pass was kicked
    assert step["pass"] == 0  # no pass was kicked
    step = score.add(state((0.82, 0.2), 3, 0, right), "action_shot")
    assert step["shot"] == pytest.approx(20 * 2 / 3)  # 100 x 0.3 x 1 capped at 2/3
    assert score.add(state((0.82, 0.2), 3, 0, right), "action_shot")["shot"] == 0  # once while he has it
    assert score.add(state((1.0, 0.0), -1, -1, right, score=(1, 0)), "action_builtin_ai")["goal"] == 40
    assert score.total == pytest.approx(sum(score.totals.values())) and not score.done


def test_losing_the_ball_ends_the_episode_with_the_share_of_time_played():
    score = football.ShapedScore()
    score.add(state((0.0, 0), 3, 0), "action_right")
    assert score.add(state((0.0, 0), 2, 1, steps_left=300), "action_right")["possession"] == pytest.approx(20 * 0.25)
    assert score.done
    passes = football.ShapedScore()  # the first state is the baselines, then two passes
    for owner, action in ((3, "action_idle"), (3, "action_short_pass"), (-1, "action_builtin_ai"), (5, "action_short_pass"),
                          (-1, "action_builtin_ai"), (3, "action_idle")):  # fmt: skip
        passes.add(state((0.0, 0), owner, 0 if owner >= 0 else -1, right=((0.0, 0.5),)), action)
    assert passes.passes == 2 and passes.totals["pass"] == pytest.approx(20 * 20 * 0.5 * 1.75)  # the second 0.75x


# ---- scripted plans on the engine ----


def test_a_shot_in_front_of_an_empty_goal_scores(engine):
    episode = football.play(EMPTY_GOAL, ["action_right", "action_shot"], seed=0)
    assert episode.end == "goal" and episode.score.totals["goal"] == 40
    assert episode.score.totals["shot"] == pytest.approx(20 * 2 / 3)  # a clear lane from close range
    assert episode.played[:2] == ["action_right", "action_shot"] and len(episode.played) > 2  # the shot played out


def test_idle_loses_nothing_and_gains_nothing(engine):
    episode = football.play(FREE_PASS, ["action_idle"] * 30, seed=0)
    assert episode.score.total == 0 and episode.end == "plan finished" and len(episode.played) == 30


def test_a_pass_to_a_free_teammate_is_counted_as_one(engine):
    episode = football.play(FREE_PASS, ["action_right", "action_short_pass"], seed=0)  # the run takes the ball
    assert episode.score.passes == 1 and episode.score.totals["pass"] > 0
    assert episode.end == "plan finished" and "action_builtin_ai" in episode.played  # played out until received


def test_a_repeated_move_keeps_moving_and_a_new_one_is_one_step(engine):
    assert len(football.play(FREE_PASS, ["action_idle", "action_bottom", "action_bottom"]).played) == 1 + 1 + 10
    assert len(football.play(FREE_PASS, ["action_idle", "action_bottom", "action_top"]).played) == 3
    # the first action is one step even when the second repeats it (MageBench's rule)
    assert len(football.play(FREE_PASS, ["action_bottom", "action_bottom"]).played) == 2


def test_the_same_seed_plays_the_same_episode(engine):
    plan = ["action_right"] * 6 + ["action_short_pass", "action_right", "action_right", "action_shot"]
    first, second = (football.play(football.scenario("R5_P_2"), plan, seed=3) for _ in range(2))
    assert first.played == second.played and first.score.totals == second.score.totals


# ---- images, CLI, eval.py ----


def cli(*args, stdin=None, render=False):
    """`python football.py args...`; one that renders runs under a virtual display (xvfb-run) unless there is a display."""
    xvfb = ["xvfb-run", "-a"] if render and not os.environ.get("DISPLAY") else []
    command = [*xvfb, sys.executable, os.path.join(ROOT, "football.py"), *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=600)


def test_cli_lists_shows_and_plays(engine, tmp_path):
    listing = cli("list")
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) == 108 and listing.stdout.startswith("R1_P_1 ")
    shown = cli("show", "R1_P_4")
    assert shown.returncode == 0 and "GK -0.987 +0.008" in shown.stdout and "7 players" in shown.stdout
    played = cli("play", "R9_P_4", "--gif", str(tmp_path / "replay.gif"), stdin="action_right, action_right, action_shot\n")
    assert played.returncode == 0 and "R9_P_4: score" in played.stdout, played.stderr
    steps = int(played.stdout.split(" steps for ")[0].rsplit(" ", 1)[1])
    assert Image.open(tmp_path / "replay.gif").n_frames == steps + 1  # the start, then every step
    bad = cli("play", "R9_P_4", stdin="fly\n")
    assert bad.returncode != 0 and "not an action: 'fly'" in bad.stderr
    assert cli("show", "R0_X_9").returncode != 0


@pytest.fixture(scope="module")
def data_dir(engine, tmp_path_factory):
    """eval.py's rows for two scenarios, start frames rendered at the tiny model's image size
    (`football.py build`, in its own process: rendering is the slow part, seconds a frame)."""
    root = tmp_path_factory.mktemp("eval")
    built = cli("build", "--out", str(root / "football"), "--names", "R1_P_1", "R9_T_2", "--max-pixels", "12544", render=True)
    assert built.returncode == 0, built.stderr
    image = np.asarray(Image.open(root / "football" / "images" / "R1_P_1.png"))
    assert image.shape == (84, 140, 3) and image.std() > 10  # Qwen's size for 1280x720 under 12544 pixels; a pitch
    return root


def test_eval_scores_a_predictions_file_like_playing_it(data_dir, tmp_path):
    """The Global setting (ours): a plan per scenario from a predictions file."""
    rows = [json.loads(line) for line in open(data_dir / "football" / "test.jsonl")]
    assert [r["question"] for r in rows] == ["R1_P_1", "R9_T_2"] and rows[0]["answer"] == football.NO_GOLD
    assert football.model_size(1280, 720, 3136, 12544) == (140, 84)
    plans = {"R1_P_1": "<think>pass</think><answer>action_right, action_short_pass</answer>", "R9_T_2": "no plan"}
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "football.jsonl").write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in plans.items()))
    cfg = compose_cfg([*TINY_DEFAULTS, f"eval.data_dir={data_dir}", f"eval.predictions={preds}", "eval.benchmarks=[football]",
                       "eval.football.setting=global"])  # fmt: skip
    results = evaluation.run_eval(cfg, str(tmp_path / "out"))["football"]
    expected = football.play(football.scenario("R1_P_1"), ["action_right", "action_short_pass"], rows[0]["seed"]).score.total
    assert results["score"] == pytest.approx(expected / 2) and results["malformed"] == 0.5 and results["n"] == 2
    assert results["scoring"].startswith("Global setting (ours, not MageBench's)")
    assert results["region=R1"] == pytest.approx(expected / 100) and results["region=R9"] == 0.0
    assert os.path.getsize(tmp_path / "out" / "football" / "football_replays" / "R1_P_1.gif") > 0
    scores = [json.loads(line) for line in open(tmp_path / "out" / "football" / "scores.jsonl")]
    assert scores[1]["error"] == "not an action: 'no plan'" and scores[0]["score"] == pytest.approx(expected)


@pytest.mark.slow
def test_eval_generates_and_scores_two_scenarios_on_the_tiny_model(data_dir, tmp_path):
    cfg = compose_cfg([*TINY_DEFAULTS, f"eval.data_dir={data_dir}", "eval.benchmarks=[football]", "eval.max_new_tokens=8",
                       "eval.football.setting=global"])  # fmt: skip
    results = evaluation.run_eval(cfg, str(tmp_path / "out"))["football"]
    assert results["n"] == 2 and "kind=T" in results
    lines = [json.loads(line) for line in open(tmp_path / "out" / "football" / "predictions.jsonl")]
    assert [line["id"] for line in lines] == ["R1_P_1", "R9_T_2"] and all(isinstance(line["prediction"], str) for line in lines)
    scores = [json.loads(line) for line in open(tmp_path / "out" / "football" / "scores.jsonl")]
    assert all((s["plan"] is None) == (s["error"] != "") for s in scores)  # a random model: read or counted, never a crash


# ---- the Online setting (MageBench's) ----


@pytest.mark.parametrize(
    "answer, action",
    [
        ("# analyze\nrun\n# action\naction_right", "action_right"),
        ("# action\n  action_short_pass \n\n", "action_short_pass"),  # whitespace around the ID
        ("action_shot", "action_shot"),  # no `# action`, but the whole answer is an ID
        ("# analyze\n# action\naction_shot\n# action\naction_left", "action_shot"),  # the first `# action` counts
        ("# action\naction_right because the lane is free", None),  # text after the ID
        ("# action\nAction_Right", None),  # exact IDs only: no case folding
        ("# action\nright", None),
        ("# action\naction_idle", None),  # gfootball has it, MageBench's 16 do not
        ("# action: action_right", None),
        ("I would run right: action_right", None),  # no `# action`
        ("", None),
    ],
)
def test_online_parser_reads_magebenchs_format_strictly(answer, action):
    assert football.parse_action(answer)[0] == action
    assert (football.parse_action(answer)[1] == "") == (action is not None)


def test_online_parser_knows_the_16_ids():
    assert len(football.ONLINE_ACTIONS) == 16 and set(football.ONLINE_ACTIONS) <= set(football.ACTIONS)
    assert not {"action_idle", "action_release_direction", "action_sliding", "action_builtin_ai"} & set(football.ONLINE_ACTIONS)


def frame(colour) -> Image.Image:
    return Image.new("RGB", (4, 3), colour)


def test_online_memory_keeps_ten_messages_and_only_the_newest_image():
    """MageBench's history after six valid turns and a parse error: the fixed system prompt and
    format instruction, then the last 10 messages, the image only in the newest scene."""
    episode = football.OnlineEpisode(EMPTY_GOAL, 0, 0)
    episode.scene(frame("red"), first=True)
    first = episode.messages(10, 1)
    assert [m["role"] for m in first] == ["system", "user"]  # the instruction and the first scene merged
    assert [c.get("text") for c in first[1]["content"]] == [football.FORMAT_PROMPT, football.SCENE, None, football.FIRST_TURN]
    assert first[0]["content"][0]["text"] == football.ONLINE_SYSTEM_PROMPT
    for k in range(6):
        episode.messages(10, 1)
        assert episode.answered(football.answer_with("action_right")) == "action_right"
        episode.outcome(
            {"played": ["action_right"], "score": 0.0, "terms": {}, "passes": 0, "done": False, "end": ""}, frame((k, 0, 0))
        )
    episode.messages(10, 1)
    assert episode.answered("no format") is None
    chat = episode.messages(10, 1)
    assert [m["role"] for m in chat] == ["system", "user"] + ["assistant", "user"] * 5
    images = [c["image"] for m in chat for c in m["content"] if c["type"] == "image"]
    assert len(images) == 1 and images[0].getpixel((0, 0)) == (5, 0, 0)  # the newest frame
    assert chat[-1]["content"] == [{"type": "text", "text": football.REGENERATE}]
    assert [c["text"] for c in chat[-3]["content"] if c["type"] == "text"] == [football.SCENE, football.NEXT_TURN]
    assert chat[2]["content"][0]["text"] == football.answer_with("action_right")  # the oldest kept: an answer
    assert chat[1]["content"] == [{"type": "text", "text": football.FORMAT_PROMPT}]  # the first scene has gone


def test_online_regenerate_rule_counts_the_turn_and_leaves_the_game():
    episode = football.OnlineEpisode(EMPTY_GOAL, 0, 0)
    episode.scene(None, first=True)
    assert episode.answered("# action\nshoot") is None
    assert episode.parse_errors == 1 and len(episode.turns) == 1 and episode.turns[0]["steps"] == 0
    assert episode.turns[0]["error"].startswith("not one of the 16 action IDs")
    assert episode.memory[-2:] == [{"role": "assistant", "content": [{"type": "text", "text": "# action\nshoot"}]},
                                   {"role": "user", "content": [{"type": "text", "text": football.REGENERATE}]}]  # fmt: skip


def test_online_augmentation_is_magebenchs_pixel_for_pixel():
    """brightness 1.5, contrast 0.6, brightness 1.2 as PIL computes them: each enhancement blends with
    a degenerate image (black; for contrast the grey of the mean luma, rounded) in float32 and
    truncates to 0..255."""
    pixels = np.array([[[0, 0, 0], [10, 200, 30], [255, 255, 255]], [[90, 91, 92], [3, 140, 250], [170, 20, 60]]], np.uint8)
    f32 = np.float32

    def blend(degenerate, image, factor):  # PIL's Image.blend: in1 + alpha * (in2 - in1), truncated
        return np.clip((f32(degenerate) + f32(factor) * (image.astype(f32) - f32(degenerate))).astype(np.int64), 0, 255)

    bright = blend(0, pixels, 1.5)
    luma = (bright[..., 0] * 19595 + bright[..., 1] * 38470 + bright[..., 2] * 7471 + 0x8000) >> 16  # PIL's RGB -> L
    contrast = blend(int(luma.mean() + 0.5), bright, 0.6)
    expected = blend(0, contrast, 1.2)
    assert np.array_equal(np.asarray(football.augment(Image.fromarray(pixels))), expected)


def in_display(code: str, tmp_path) -> None:
    """Run `code` in a fresh Python (gfootball renders one env per process) under a virtual display."""
    xvfb, display = football.virtual_display()
    try:
        env = dict(os.environ, DISPLAY=display, PYTHONPATH=ROOT)
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        xvfb.terminate()
    assert done.returncode == 0, done.stderr[-3000:]


def test_online_first_frame_is_rendered_channel_swapped_as_magebenchs(engine, tmp_path):
    """MageBench's first frame is env.render("rgb_array"), whose red and blue are swapped in
    gfootball 2.10.2; the observation's frame is not. Both then get the augmentation."""
    in_display(
        "import numpy as np, football\n"
        "game, first = football.start_game(football.scenario('R1_P_2'), 3, 'seen')\n"
        "np.save('first.npy', np.asarray(first)); np.save('raw.npy', game.env.observation()[0]['frame'])\n",
        tmp_path,
    )
    first, raw = np.load(tmp_path / "first.npy"), np.load(tmp_path / "raw.npy")
    assert first.shape == raw.shape == (720, 1280, 3)
    assert np.array_equal(first, np.asarray(football.augment(Image.fromarray(raw[..., ::-1].copy()))))
    assert not np.array_equal(first, np.asarray(football.augment(Image.fromarray(raw))))  # the swap shows


def replaying(plan, frames=None):
    """A scripted "model": answers each episode's next turn with the plan's next action (one per
    action played so far), in MageBench's format; records the image each chat shows, where `frames`
    is a list."""

    def policy(episodes, chats):
        if frames is not None:
            frames.extend(c["image"] for chat in chats for m in chat for c in m["content"] if c["type"] == "image")
        done = [sum(t["action"] is not None for t in e.turns) for e in episodes]
        return [football.answer_with(plan[k]) if k < len(plan) else "no more" for k in done]

    return policy


PLAN = ["action_right", "action_right", "action_right", "action_top_right", "action_short_pass", "action_right",
        "action_sprint", "action_right", "action_shot"]  # fmt: skip


class Stands:
    """Pitches without gfootball, for the turn loop alone: every action is one step scoring 1, and
    an episode ends on its `length`-th action."""

    def __init__(self, n: int, length: int):
        self.conns, self.length, self.games = [None] * n, length, {}

    def send(self, k, *command):
        self.games[k] = 0 if command[0] == "start" else self.games[k] + 1

    def receive(self, k):
        if self.games[k] == 0:
            return None
        done = self.games[k] == self.length
        return {
            "played": ["action_right"],
            "score": float(self.games[k]),
            "terms": {},
            "passes": 0,
            "done": done,
            "end": "goal",
            "frame": None,
        }


def test_online_turn_loop_refills_workers_as_episodes_end():
    """Five episodes of equal length on four workers: four end on the same turn with one left to
    start (it crashed so, popping an empty queue); every episode plays all its turns, once."""
    episodes = football.online_episodes(["R5_P_2"], 5, seed=0)
    settings = football.OnlineSettings(max_turns=10, render="none")
    football.play_online(football.scripted(football.BASELINES["shoot"]), episodes, Stands(4, 3), settings)
    assert [(len(e.turns), e.result["score"], e.end) for e in episodes] == [(3, 3.0, "goal")] * 5


def test_online_scripted_model_plays_what_play_plays(engine):
    """Replaying a plan turn by turn, two episodes at once, plays football.play's game, step for step
    (the first answer of one episode badly formatted: a turn lost, the game unmoved)."""
    episodes = football.online_episodes(["R5_P_2", "R9_P_4"], 1, seed=4)
    plan = replaying(PLAN)

    def policy(batch, chats):
        answers = plan(batch, chats)
        return ["oops" if e.scenario.name == "R9_P_4" and not e.turns else a for e, a in zip(batch, answers)]

    football.run_online(policy, episodes, football.OnlineSettings(max_turns=len(PLAN) + 1, render="none"), workers=2)
    for episode, lost in zip(episodes, (0, 1)):
        expected = football.play(episode.scenario, PLAN, episode.seed)
        played = [a for turn in episode.turns for a in turn["played"]]
        assert played == expected.played and episode.result["score"] == pytest.approx(expected.score.total)
        assert episode.parse_errors == lost and episode.end == expected.end
        assert [t["action"] for t in episode.turns if t["action"]] == PLAN[: len([t for t in episode.turns if t["action"]])]


def test_online_renders_only_the_frames_the_model_sees_with_every_steps_pixels(engine):
    """render=seen (the frames the model sees, the turn's last two steps replayed with the renderer
    on), render=every (MageBench: every engine step) and render=none play the same game, and the
    model is shown the same pixels with seen as with every."""
    runs = {}
    for render in ("none", "seen", "every"):
        frames = []
        episodes = football.online_episodes(["R5_P_2"], 1, seed=4)
        football.run_online(replaying(PLAN, frames), episodes, football.OnlineSettings(max_turns=len(PLAN), render=render), 1)
        runs[render] = (episodes[0].record(), frames)
    (none, _), (seen, seen_frames), (every, every_frames) = runs["none"], runs["seen"], runs["every"]
    game = lambda record: [(t["played"], t["score"]) for t in record["log"]] + [record["terms"], record["passes"]]  # noqa: E731
    assert game(none) == game(seen) == game(every)
    assert seen["steps"] > 2 * seen["frames"] and seen["frames"] == len(seen_frames) == len(every_frames) > 4
    for a, b in zip(seen_frames, every_frames):
        assert a.size == (1280, 720) and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_eval_online_on_the_tiny_model_batched_as_one_at_a_time(engine, tmp_path):
    """`eval.py` Online, two scenarios end to end on the tiny model (its answers are never in the
    format: every turn a parse error, counted): playing both episodes at once (two workers, one
    generate a turn) gives what playing them one at a time does, answer for answer."""
    common = [*TINY_DEFAULTS, "eval.benchmarks=[football]", "eval.max_items=2", "eval.football.repeats=1",
              "eval.football.max_turns=3", "eval.football.max_tokens=12"]  # fmt: skip
    batched = evaluation.run_eval(compose_cfg([*common, "eval.football.workers=2"]), str(tmp_path / "batched"))["football"]
    alone = evaluation.run_eval(compose_cfg([*common, "eval.football.workers=1"]), str(tmp_path / "alone"))["football"]
    untimed = lambda results: {k: v for k, v in results.items() if k not in ("wall_s", "frames_per_s")}  # noqa: E731
    assert untimed(batched) == untimed(alone)
    assert batched["n"] == 2 and batched["parse_errors"] == 3 and batched["score"] == 0 and "region=R1" in batched
    records = {
        run: [json.loads(line) for line in open(tmp_path / run / "football" / "episodes.jsonl")] for run in ("batched", "alone")
    }
    assert [r["scenario"] for r in records["batched"]] == list(football.MINI[:2])
    assert [[t["answer"] for t in r["log"]] for r in records["batched"]] == [
        [t["answer"] for t in r["log"]] for r in records["alone"]
    ]
    answers = [t["answer"] for r in records["batched"] for t in r["log"]]
    assert len(set(answers)) > 3 and all(r["frames"] == 1 for r in records["batched"])  # sampled; the first frame shown
    assert all(t["error"] and t["steps"] == 0 for r in records["batched"] for t in r["log"])


TWO_RANK_ONLINE = """
import sys
import dist
import eval as evaluation
from conftest import compose_cfg
from rollout import release_process_groups

rank, _, _ = dist.init_distributed("cpu")
results = evaluation.run_eval(compose_cfg(sys.argv[1:]), "two_ranks")
assert (results["football"]["n"] == 3) if rank == 0 else results == {}, results
open(f"ok_{rank}", "w").close()  # see run_on_two_ranks
release_process_groups()
"""


@pytest.mark.slow
def test_eval_online_on_two_ranks_plays_what_one_process_plays(engine, tmp_path):
    """Under two ranks (train.py's eval.every) each plays every second episode with its own workers,
    and rank 0 gathers them: the records one process writes, in the same order."""
    overrides = [*TINY_DEFAULTS, "eval.benchmarks=[football]", "eval.max_items=3", "eval.football.repeats=1",
                 "eval.football.max_turns=2", "eval.football.max_tokens=8", "eval.football.workers=1"]  # fmt: skip
    evaluation.run_eval(compose_cfg(overrides), str(tmp_path / "one"))
    run_on_two_ranks(tmp_path, TWO_RANK_ONLINE, overrides, timeout=600)
    records = [
        [json.loads(line) for line in open(tmp_path / run / "football" / "episodes.jsonl")] for run in ("one", "two_ranks")
    ]
    assert [r["scenario"] for r in records[1]] == list(football.MINI[:3]) and records[0] == records[1]
