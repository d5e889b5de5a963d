"""Runs that survive: checkpoints, exact resume, kills at bad moments, signals, non-finite updates."""

import glob
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import model
import train
from conftest import ROOT, TINY_DEFAULTS, compose_cfg

# A toy reward that varies, so every step really changes the weights (the random tiny model scores
# 0 on the real verifiers), and a learning rate that makes the change visible.
TOY = ["+reward.weights={toy_rewards\\:digit_fraction: 1.0}", "~reward.weights.format", "~reward.weights.math"]
RUN = [*TINY_DEFAULTS, *TOY, "trainer.lr=1e-3", "trainer.warmup_ratio=0", "algo.kl_coef=0.01"]


def metrics_of(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def same_metrics(a: dict, b: dict) -> bool:
    """Equal except wall-clock timings."""
    keys = {k for k in a if not k.startswith("perf/")}
    return keys == {k for k in b if not k.startswith("perf/")} and all(a[k] == b[k] for k in keys)


def final_weights(run_dir):
    return load_file(os.path.join(run_dir, "checkpoints", "final", "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def train_process(run_dir, extra):
    """`python train.py` as users run it, writing into `run_dir` (the same dir again = a requeued job)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": os.path.join(ROOT, "tests")}
    args = [sys.executable, os.path.join(ROOT, "train.py"), *RUN, *extra, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        args, cwd=os.path.dirname(run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_hard_kill_after_a_checkpoint_then_resume_is_the_same_run(tmp_path):
    six = ["trainer.max_steps=6", "trainer.save_every=3"]
    straight = train_process(str(tmp_path / "straight"), six)
    out, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]

    killed_dir = str(tmp_path / "killed")
    proc = train_process(killed_dir, six)
    wait_for(lambda: os.path.exists(os.path.join(killed_dir, "checkpoints", "step_3", checkpoint.STATE_FILE)), proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    assert not os.path.exists(os.path.join(killed_dir, "checkpoints", "final"))

    resumed = train_process(killed_dir, six)  # the same command and dir, as a requeued SLURM job
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "[resume]" in out and "continuing at step 4 of 6" in out
    assert_same_weights(final_weights(killed_dir), final_weights(str(tmp_path / "straight")))
    a, b = metrics_of(str(tmp_path / "straight")), metrics_of(killed_dir)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]  # nothing logged twice
    assert all(same_metrics(x, y) for x, y in zip(a, b))
    assert a[3]["loss/grad_norm"] > 0 and a[0]["reward/std"] > 0  # real updates happened


@pytest.mark.slow
def test_sigterm_saves_at_the_end_of_the_step_and_exits_for_requeue(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = train_process(run_dir, ["trainer.max_steps=8", "trainer.save_every=0"])
    wait_for(lambda: os.path.exists(os.path.join(run_dir, "metrics.jsonl")), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    (saved,) = checkpoint.step_checkpoints(run_dir)  # save_every=0: this one is the signal's
    assert 1 <= saved[0] < 8 and "saving at the end of this step" in out
    assert [m["step"] for m in metrics_of(run_dir)] == list(range(1, saved[0] + 1))
    resumed = train_process(run_dir, ["trainer.max_steps=8", "trainer.save_every=0"])
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert [m["step"] for m in metrics_of(run_dir)] == list(range(1, 9))


@pytest.mark.slow
def test_the_ranks_train_py_starts_save_and_stop_on_the_signal_it_gets(tmp_path):
    """`python train.py trainer.devices=2` passes SIGUSR1 (SLURM's warning before the time limit) on
    to the two ranks it started: they save at the end of their step, and it exits as one process does."""
    run_dir = str(tmp_path / "run")
    proc = train_process(run_dir, ["trainer.max_steps=8", "trainer.save_every=0", "trainer.devices=2"])
    wait_for(lambda: os.path.exists(os.path.join(run_dir, "metrics.jsonl")), proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    (saved,) = checkpoint.step_checkpoints(run_dir)  # save_every=0: this one is the signal's
    assert 1 <= saved[0] < 8 and [m["step"] for m in metrics_of(run_dir)] == list(range(1, saved[0] + 1))


def test_a_crash_between_writing_and_publishing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    four = [*RUN, "trainer.max_steps=4", "trainer.save_every=2"]
    straight = tmp_path / "straight"
    train.run(compose_cfg(four), str(straight))

    published = []
    real_publish = checkpoint.publish

    def crash_on_the_second(tmp, final):
        if published:
            raise OSError("disk full (injected)")
        published.append(final)
        real_publish(tmp, final)

    monkeypatch.setattr(checkpoint, "publish", crash_on_the_second)
    run_dir = tmp_path / "crashed"
    with pytest.raises(OSError, match="injected"):
        train.run(compose_cfg(four), str(run_dir))
    assert [s for s, _ in checkpoint.step_checkpoints(str(run_dir))] == [2]  # step 4 was written but never published
    assert os.path.isdir(run_dir / "checkpoints" / ".tmp_step_4")
    monkeypatch.setattr(checkpoint, "publish", real_publish)

    train.run(compose_cfg(four), str(run_dir))  # resumes from step 2
    assert_same_weights(final_weights(str(run_dir)), final_weights(str(straight)))
    assert all(same_metrics(x, y) for x, y in zip(metrics_of(str(straight)), metrics_of(str(run_dir))))
    assert not os.path.exists(run_dir / "checkpoints" / ".tmp_step_4")


def test_resume_from_another_run_and_keep_last(tmp_path):
    first = tmp_path / "first"
    train.run(compose_cfg([*RUN, "trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_last=2"]), str(first))
    assert [s for s, _ in checkpoint.step_checkpoints(str(first))] == [3, 4]  # older ones deleted
    state = torch.load(first / "checkpoints" / "step_3" / checkpoint.STATE_FILE, weights_only=True)
    assert state["step"] == 3 and len(state["history"]) == 3 and set(state["rng"]) == {"python", "numpy", "torch"}
    second = tmp_path / "second"
    last = train.run(
        compose_cfg([*RUN, "trainer.max_steps=4", f"trainer.resume_from={first / 'checkpoints' / 'step_3'}"]), str(second)
    )
    assert last["step"] == 4 and same_metrics(last, metrics_of(str(first))[-1])
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        train.run(compose_cfg([*RUN, f"trainer.resume_from={tmp_path / 'nothing'}"]), str(tmp_path / "third"))


def test_a_bf16_run_resumes_from_its_checkpoint_exactly(tmp_path):
    """model.dtype=bfloat16 (the stages' setting) on one process: the fp32 master weights, not the
    bf16 HF copy, are what the resumed run continues from, so it ends where the straight run does."""
    bf16 = [*RUN, "model.dtype=bfloat16", "trainer.max_steps=4"]
    first = tmp_path / "first"
    train.run(compose_cfg([*bf16, "trainer.save_every=2"]), str(first))
    step_2 = first / "checkpoints" / "step_2"
    assert {t.dtype for t in load_file(step_2 / "model.safetensors").values()} == {torch.bfloat16}  # the HF copy
    assert {t.dtype for t in load_file(step_2 / model.MASTER_FILE).values()} == {torch.float32}  # what resume loads
    assert {t.dtype for t in final_weights(str(first)).values()} == {torch.bfloat16}
    second = tmp_path / "second"
    train.run(compose_cfg([*bf16, f"trainer.resume_from={first / 'checkpoints' / 'step_2'}"]), str(second))
    assert_same_weights(final_weights(str(second)), final_weights(str(first)))
    resumed = metrics_of(str(second))
    assert [m["step"] for m in resumed] == [3, 4] and all(map(same_metrics, metrics_of(str(first))[2:], resumed))
    assert resumed[0]["loss/grad_norm"] > 0


def truncate(path) -> int:
    """Cut a file to half its size, as a full disk or a killed copy leaves it; returns the new size."""
    size = os.path.getsize(path) // 2
    os.truncate(path, size)
    return size


def test_a_checkpoint_that_does_not_load_is_set_aside_and_the_one_before_resumed(tmp_path, capsys):
    four = [*RUN, "trainer.max_steps=4", "trainer.save_every=2"]
    run_dir = tmp_path / "run"
    train.run(compose_cfg(four), str(run_dir))
    straight_weights, straight_metrics = final_weights(str(run_dir)), metrics_of(str(run_dir))
    size = truncate(run_dir / "checkpoints" / "step_4" / checkpoint.STATE_FILE)
    shutil.rmtree(run_dir / "checkpoints" / "final")
    capsys.readouterr()

    train.run(compose_cfg(four), str(run_dir))  # restarted in its dir, as a requeued job is
    out = capsys.readouterr().out
    (kept,) = glob.glob(str(run_dir / "checkpoints" / "step_4.unloadable-*"))
    assert f"warning: {run_dir / 'checkpoints' / 'step_4'} cannot be loaded" in out and f"kept as {kept}" in out
    assert "continuing at step 3 of 4" in out
    assert os.path.getsize(os.path.join(kept, checkpoint.STATE_FILE)) == size  # left as it was found
    assert [s for s, _ in checkpoint.step_checkpoints(str(run_dir))] == [2, 4]  # step 4 written anew
    assert_same_weights(final_weights(str(run_dir)), straight_weights)
    resumed_metrics = metrics_of(str(run_dir))
    assert len(resumed_metrics) == 4 and all(same_metrics(x, y) for x, y in zip(straight_metrics, resumed_metrics))


def test_resume_checks_every_file_and_refuses_a_named_checkpoint_that_does_not_load(tmp_path, capsys):
    from safetensors.torch import save_file

    for step in (1, 2, 3):
        os.makedirs(tmp_path / "checkpoints" / f"step_{step}")
        torch.save({"step": step}, tmp_path / "checkpoints" / f"step_{step}" / checkpoint.STATE_FILE)
        save_file({"w": torch.zeros(64)}, tmp_path / "checkpoints" / f"step_{step}" / "model.safetensors")
    truncate(tmp_path / "checkpoints" / "step_3" / "model.safetensors")  # the weights, not the state
    truncate(tmp_path / "checkpoints" / "step_2" / checkpoint.STATE_FILE)
    path, state = checkpoint.resume_point(str(tmp_path), None)
    assert path.endswith("step_1") and state == {"step": 1}
    assert capsys.readouterr().out.count("cannot be loaded") == 2
    assert len(glob.glob(str(tmp_path / "checkpoints" / "step_*.unloadable-*"))) == 2

    truncate(tmp_path / "checkpoints" / "step_1" / checkpoint.STATE_FILE)
    with pytest.raises(checkpoint.TrainingError, match="no checkpoint there can be loaded"):
        checkpoint.resume_point(str(tmp_path / "other"), str(tmp_path / "checkpoints" / "step_1"))
    assert os.path.isdir(tmp_path / "checkpoints" / "step_1")  # another run's checkpoint is not renamed
    assert checkpoint.resume_point(str(tmp_path), None) == (None, None)  # none of its own loads: a fresh start


def test_checkpoint_state_is_loaded_safely(tmp_path):
    """Training state loads with weights_only=True: a checkpoint carrying arbitrary pickled objects
    is refused instead of running their code."""
    run_dir = tmp_path / "run"
    train.run(compose_cfg([*RUN, "trainer.max_steps=1", "trainer.save_every=1"]), str(run_dir))
    path = run_dir / "checkpoints" / "step_1" / checkpoint.STATE_FILE
    state = torch.load(path, weights_only=True)
    state["payload"] = Exploit()
    torch.save(state, path)
    with pytest.raises(pickle.UnpicklingError):
        train.run(compose_cfg([*RUN, "trainer.max_steps=2"]), str(run_dir))
    assert not os.path.exists(tmp_path / "pwned")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.path.join(os.getcwd(), 'pwned')}",))


def nan_on(calls_to_poison):
    """A policy loss that is NaN on the given calls (one call per step with the tiny defaults)."""
    calls = {"n": 0}
    clipped_loss = train.policy_loss

    def loss(*args, **kwargs):
        calls["n"] += 1
        value, clipped = clipped_loss(*args, **kwargs)
        return (value * float("nan"), clipped) if calls["n"] in calls_to_poison else (value, clipped)

    return loss


def test_a_nan_loss_skips_that_update_and_is_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "policy_loss", nan_on({2}))
    last = train.run(compose_cfg([*RUN, "trainer.max_steps=4"]), str(tmp_path))
    skipped = [m["loss/skipped_updates"] for m in metrics_of(str(tmp_path))]
    assert skipped == [0, 1, 0, 0] and last["step"] == 4
    assert all(torch.isfinite(w).all() for w in final_weights(str(tmp_path)).values())


def test_repeated_nans_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "policy_loss", nan_on(set(range(1, 100))))
    with pytest.raises(checkpoint.TrainingError, match="2 steps in a row had non-finite loss or gradients"):
        train.run(compose_cfg([*RUN, "trainer.max_steps=6", "trainer.max_bad_steps=2"]), str(tmp_path))
    assert len(metrics_of(str(tmp_path))) == 2
