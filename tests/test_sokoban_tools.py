"""Around the Sokoban core: the gymnasium env, the dataset builder CLI, show/play, evaluation, the stage."""

import glob
import json
import os
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from omegaconf import OmegaConf
from PIL import Image

import sokoban
from conftest import ROOT, TINY_DEFAULTS, compose_cfg, run_train
from data import load_dataset
from eval import sokoban_metrics
from rewards import gold_problems, reward_pool, sokoban_reward

LEVEL = "#######\n#@ $ .#\n#  $ .#\n#######"


def cli(*args, stdin=None, cwd=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "sokoban.py"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


# ---- gymnasium env ----


def test_env_passes_gymnasiums_checker():
    for mode in ("rgb_array", "ansi"):
        env = gymnasium.make("sokoban:LMMR1Sokoban-v0", width=6, height=6, boxes=1, min_moves=3, render_mode=mode)
        check_env(env.unwrapped, skip_render_check=False)


def test_env_plays_a_given_level_with_gym_sokoban_rewards():
    env = sokoban.SokobanEnv(level=LEVEL, render_mode="ansi")
    obs, info = env.reset()
    assert obs.shape == (4 * 28, 7 * 28, 3) and obs.dtype == np.uint8 and info["level"] == LEVEL
    R = sokoban.ACTIONS.index("R")
    _, reward, terminated, _, info = env.step(R)
    assert reward == pytest.approx(-0.1) and not terminated and not info["pushed"]
    env.step(R)
    _, reward, terminated, _, info = env.step(R)  # box A onto its goal
    assert reward == pytest.approx(0.9) and info["pushed"] and info["boxes_on_goals"] == 1 and not terminated
    for action in "LLDR":
        env.step(sokoban.ACTIONS.index(action))
    _, reward, terminated, truncated, info = env.step(R)  # box B onto its goal: solved
    assert reward == pytest.approx(10.9) and terminated and not truncated
    assert env.render() == info["level"] == sokoban.replay(LEVEL, "RRRLLDRR")[0]


def test_env_truncates_after_max_steps_and_generates_levels_from_the_seed():
    env = sokoban.SokobanEnv(width=7, height=7, boxes=2, max_steps=3)
    obs_a, info_a = env.reset(seed=11)
    obs_b, info_b = env.reset(seed=11)
    assert info_a["level"] == info_b["level"] and np.array_equal(obs_a, obs_b)
    assert env.reset(seed=12)[1]["level"] != info_a["level"]
    env.reset(seed=11)
    results = [env.step(0) for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True]  # truncated at the third step
    assert sokoban.solve(info_a["level"]) is not None
    with pytest.raises(ValueError, match="5x3 level"):
        env.reset(options={"level": "#####\n#@$.#\n#####"})


def test_env_is_registered_with_gymnasium():
    env = gymnasium.make("sokoban:LMMR1Sokoban-v0", level=LEVEL)
    obs, _ = env.reset()
    assert obs.shape == (4 * 28, 7 * 28, 3)


# ---- build CLI ----


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("sokoban")
    result = cli("build", "--n", "40", "--size", "6", "--boxes", "1", "--seed", "0", "--min-moves", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote 40 levels" in result.stdout
    return out


def rows_of(path):
    return [json.loads(line) for line in open(path)]


def test_build_writes_rows_in_our_format_with_optimal_solutions(built):
    rows = rows_of(built / "train.jsonl")
    assert len(rows) == 40 and len({r["level"] for r in rows}) == 40  # distinct levels
    for row in rows:
        messages = json.loads(row["message"])  # a JSON string, as LMM-R1 stores it
        assert messages[0] == {"role": "system", "content": sokoban.SYSTEM_PROMPT}
        image, text = messages[1]["content"]
        assert text == {"type": "text", "text": sokoban.USER_PROMPT}
        with Image.open(built / image["image"]) as img:
            assert img.size == (6 * 28, 6 * 28)
        solution = sokoban.solve(row["level"])
        assert row["solution"] == solution and row["optimal_moves"] == len(solution) >= 5
        assert row["answer"] == sokoban.moves_text(solution)
        assert sokoban_reward(f"<think></think><answer>{row['answer']}</answer>", row) == 1.0
        board = sokoban.parse_level(row["level"])
        assert (row["width"], row["height"], row["boxes"]) == (6, 6, 1) and not board.boxes & board.goals


def test_build_is_deterministic_and_held_out_sets_exclude_training_levels(built, tmp_path):
    again = cli("build", "--n", "40", "--size", "6", "--boxes", "1", "--seed", "0", "--min-moves", "5", "--out", str(tmp_path))
    assert again.returncode == 0
    assert (tmp_path / "train.jsonl").read_text() == (built / "train.jsonl").read_text()
    assert (tmp_path / "images" / "train_00007.png").read_bytes() == (built / "images" / "train_00007.png").read_bytes()
    # a held-out set built from the SAME seed must skip every training level
    held = cli("build", "--n", "10", "--size", "6", "--boxes", "1", "--seed", "0", "--min-moves", "5",
               "--split", "test", "--out", str(tmp_path), "--exclude", str(built / "train.jsonl"))  # fmt: skip
    assert held.returncode == 0, held.stderr
    assert "40 excluded" in held.stdout
    test_levels = {r["level"] for r in rows_of(tmp_path / "test.jsonl")}
    assert len(test_levels) == 10 and not test_levels & {r["level"] for r in rows_of(built / "train.jsonl")}


def test_build_that_cannot_make_enough_distinct_levels_says_so(tmp_path):
    out = cli("build", "--n", "500", "--size", "5", "--boxes", "1", "--min-moves", "1", "--out", str(tmp_path))
    assert out.returncode != 0 and "distinct levels could be made" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "train.jsonl").exists()  # no half-written dataset under the real name


def test_built_rows_load_and_pass_the_level_check(built, tokenizer, image_processor, tiny_cfg):
    dcfg = OmegaConf.merge(tiny_cfg.data, {"source": "files", "train_files": [str(built / "train.jsonl")]})
    pool = reward_pool(1)

    def check(rows):
        return gold_problems(pool, [s.reward_row() for s in rows], ["format", "sokoban"], 10.0)

    samples, skipped = load_dataset(dcfg, 0, tokenizer, image_processor, check)
    assert len(samples) == 40 and not skipped
    assert samples[0].reward_row()["level"] == rows_of(built / "train.jsonl")[0]["level"]


def test_a_broken_level_is_a_bad_row_at_load(built, tmp_path, tokenizer, image_processor, tiny_cfg):
    rows = rows_of(built / "train.jsonl")[:3]
    rows[1]["level"] = "####\n#@$#\n#. #\n####"  # unsolvable
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.symlink(built / "images", tmp_path / "images")
    pool = reward_pool(1)

    def check(rows):
        return gold_problems(pool, [s.reward_row() for s in rows], ["sokoban"], 10.0)

    dcfg = OmegaConf.merge(tiny_cfg.data, {"source": "files", "train_files": [str(data)], "on_error": "skip"})
    samples, skipped = load_dataset(dcfg, 0, tokenizer, image_processor, check)
    assert len(samples) == 2 and skipped == {"unusable gold answer": 1}


# ---- show and play ----


def test_show_prints_the_level_and_its_optimal_solution(built, tmp_path):
    out = cli(
        "show", str(built / "train.jsonl"), "--row", "2", "--png", str(tmp_path / "l.png"), "--gif", str(tmp_path / "l.gif")
    )
    assert out.returncode == 0, out.stderr
    row = rows_of(built / "train.jsonl")[2]
    assert row["level"] in out.stdout and f"optimal: {row['optimal_moves']} moves" in out.stdout
    assert Image.open(tmp_path / "l.png").size == (168, 168)
    with Image.open(tmp_path / "l.gif") as gif:
        assert gif.n_frames == row["optimal_moves"] + 1


def test_show_reads_xsb_files_with_several_levels(tmp_path):
    (tmp_path / "levels.xsb").write_text("#####\n#@$.#\n#####\n\n" + LEVEL + "\n")
    out = cli("show", str(tmp_path / "levels.xsb"), "--row", "1")
    assert out.returncode == 0 and "optimal: 8 moves, 4 pushes" in out.stdout
    assert cli("show", str(tmp_path / "levels.xsb"), "--row", "5").returncode != 0


def test_play_in_the_terminal(tmp_path):
    (tmp_path / "level.xsb").write_text(LEVEL)
    # ddd: box A on its goal; "z" undoes a wasted move; then words finish the level
    out = cli("play", str(tmp_path / "level.xsb"), stdin="ddd\nw\nz\nLeft, Left, Down\nd d\n")
    assert out.returncode == 0, out.stdout
    assert "solved in 8 moves (optimal: 8)" in out.stdout
    quit_early = cli("play", str(tmp_path / "level.xsb"), stdin="d\nq\n")
    assert quit_early.returncode == 1 and "solved" not in quit_early.stdout
    assert "not a move" in cli("play", str(tmp_path / "level.xsb"), stdin="jump\nq\n").stdout


def test_play_takes_single_keys_and_arrows_on_a_terminal(tmp_path):
    """On a terminal (a pty here) each key moves at once, no Enter: d d d, undo of a wasted w, then
    the arrow keys Left Left Down, then d d."""
    import pty
    import select

    (tmp_path / "level.xsb").write_text(LEVEL)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sokoban.py"), "play", str(tmp_path / "level.xsb")],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT)  # fmt: skip
    os.close(slave)
    shown, pos = b"", 0

    def read_until(text: bytes, timeout: float = 60.0) -> None:
        """Read the output up to `text`, which must come after the last text read up to."""
        nonlocal shown, pos
        while shown.find(text, pos) < 0:
            assert select.select([master], [], [], timeout)[0], shown.decode(errors="replace")[-2000:]
            shown += os.read(master, 4096)
        pos = shown.find(text, pos) + len(text)

    try:
        read_until(b"arrow keys")
        keys = ["d", "d", "d", "w", "z", "\x1b[D", "\x1b[D", "\x1b[B", "d", "d"]
        for key, moves in zip(keys, [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]):
            os.write(master, key.encode())
            read_until(f"moves: {moves}, boxes".encode())
        read_until(b"solved in 8 moves (optimal: 8)")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)


# ---- evaluation ----


def test_evaluate_reports_success_by_size_boxes_and_length_with_replays(tmp_path):
    small = "#####\n#@$.#\n#####"
    rows = [{"level": LEVEL, "optimal_moves": 8}, {"level": LEVEL}, {"level": small}, {"level": small}]
    completions = [
        "<think>a</think><answer>Right, Right, Right, Left, Left, Down, Right, Right</answer>",  # optimal
        "Sure. <answer>Left, Right, Right, Right, Left, Left, Down, Right, Right</answer>",  # loose format, 9 moves
        "<think>a</think><answer>Left</answer>",  # fails
        "<think>a</think><answer>go right</answer>",  # not a move list
    ]
    m = sokoban_metrics(rows, completions, out_dir=str(tmp_path), gifs=3)
    assert m["success"] == 0.5
    assert m["success/size=7x4"] == 1.0 and m["success/size=5x3"] == 0.0
    assert m["success/boxes=2"] == 1.0 and m["success/boxes=1"] == 0.0
    assert m["success/optimal=00-09"] == 0.5
    assert m["answered"] == 0.75 and m["format"] == 0.75
    assert m["efficiency"] == pytest.approx((1 + 8 / 9) / 2)
    gifs = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "sokoban_replays" / "*.gif")))
    assert gifs == ["00_solved.gif", "01_solved.gif", "02_failed.gif"]
    with Image.open(tmp_path / "sokoban_replays" / "00_solved.gif") as gif:
        assert gif.n_frames == 9


# ---- the stage ----


def test_stage_composes_with_lmm_r1s_reward_and_frozen_vision():
    cfg = compose_cfg(["stage=mgt_sokoban"])
    assert dict(cfg.reward.weights) == {"format": 0.5, "sokoban_lmm_r1": 1.0}
    assert cfg.model.freeze_vision and cfg.algo.kl_coef == 0 and cfg.algo.estimator == "gae"
    tiny = compose_cfg(["stage=mgt_sokoban", *TINY_DEFAULTS])
    assert tiny.data.source == "synthetic" and tiny.data.synthetic == "sokoban"


@pytest.mark.slow
def test_sokoban_stage_trains_on_the_fly_levels_and_on_a_built_set(built, tmp_path):
    args = ["stage=mgt_sokoban", *TINY_DEFAULTS, "trainer.max_steps=2"]
    out = run_train(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "outputs" / "debug" / "mgt_sokoban" / "2*"))
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2]
    # the random tiny model writes no move list: every completion is malformed, and counted
    assert all(m["reward/n_malformed"] == 16 and m["reward/sokoban_lmm_r1"] == 0 for m in metrics)
    assert "loss/value" in metrics[0] and "loss/kl" not in metrics[0]  # PPO with a critic, no KL
    sample = json.loads(open(os.path.join(run_dir, "samples.jsonl")).readline())
    assert "<|image_pad|>" in sample["prompt"] and "Sokoban" in sample["prompt"]
    files = ["data.source=files", f"data.train_files=[{built / 'train.jsonl'}]", "hydra.run.dir=outputs/built"]
    out = run_train(args + files, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[data] 40 prompts" in out.stdout
