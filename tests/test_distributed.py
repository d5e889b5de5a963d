"""Data-parallel training with torchrun (gloo on CPU): sharding must change nothing.

Each test runs the same short RL job once in a single process and once as 2 ranks, and compares the
rollouts, the metrics and the weights after the steps. Every rank samples its prompts from the same
per-prompt seeds a single process uses, mini-batches are drawn from the same global permutation, and
each sequence's loss weight comes from its whole mini-batch (train.sequence_weights): only fp32
summation order differs.
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_DEFAULTS
from test_resume import assert_same_weights, final_weights, metrics_of

TOY = ["+reward.weights={toy_rewards\\:digit_fraction: 1.0}", "~reward.weights.format", "~reward.weights.math"]
JOB = [
    *TINY_DEFAULTS,
    *TOY,
    "trainer.lr=1e-3",
    "trainer.warmup_ratio=0",
    "trainer.max_steps=2",
    "algo.kl_coef=0.01",
    "trainer.mini_batch_size=8",
    "algo.loss_agg=chunk_token_mean",
    "algo.loss_chunk=3",
]  # fmt: skip  (2 updates per step; LMM-R1's chunked loss with chunks that span the ranks, the last one short)


def launch(run_dir, extra, nproc: int):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": os.path.join(ROOT, "tests")}
    head = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    cmd = [*head, os.path.join(ROOT, "train.py"), *JOB, *extra, f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=os.path.dirname(run_dir), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return metrics_of(run_dir)


def assert_same_training(tmp_path, extra):
    launch(str(tmp_path / "single"), extra, 1)
    launch(str(tmp_path / "ranks"), extra, 2)
    assert_trained_alike(tmp_path / "single", tmp_path / "ranks")


def assert_trained_alike(single_dir, ranks_dir):
    """The run in `ranks_dir` (2 ranks) drew the same samples, had the same losses and ended with the
    same weights (to fp32 summation order) as the one in `single_dir` (one process)."""
    single, ranks = (metrics_of(d) for d in (single_dir, ranks_dir))
    assert [m["step"] for m in ranks] == [m["step"] for m in single]  # rank 0 alone writes the logs
    for a, b in zip(single, ranks):
        assert a["reward/mean"] == b["reward/mean"] and a["rollout/response_len"] == b["rollout/response_len"]  # same samples
        # these are means of O(1) per-token terms that nearly cancel (whitened advantages): fp32
        # summation order moves them by ~1e-7 absolute, a sharding mistake by ~1e-1
        for key in ("loss/policy", "loss/kl", "loss/entropy", "loss/clip_frac"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
        assert b["loss/grad_norm"] == pytest.approx(a["loss/grad_norm"], rel=1e-4)
    assert single[0]["reward/std"] > 0 and single[0]["loss/grad_norm"] > 0  # real updates
    w1, w2 = final_weights(single_dir), final_weights(ranks_dir)
    assert w1.keys() == w2.keys()
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    # Adam's steps are ~lr * sign(grad): equal up to elements whose gradient is ~0 (below Adam's eps),
    # where fp32 summation-order noise can move an update by a fraction of lr (1e-3)
    assert diff.max() < 5e-5 and (diff > 1e-6).float().mean() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        ["trainer.zero_stage=0"],  # plain PyTorch: gradients all-reduced
        ["trainer.zero_stage=2"],  # DeepSpeed: optimizer states and gradients sharded
        ["trainer.zero_stage=3"],  # DeepSpeed: parameters sharded too (reference model as well)
        ["trainer.zero_stage=3", "algo.estimator=gae", "algo.critic_lr=1e-3"],  # with a sharded value model
        ["trainer.zero_stage=3", "trainer.offload=all"],  # parameters and optimizer states on the CPU
    ],
    ids=["ddp", "zero2", "zero3", "zero3-gae", "zero3-offload"],
)
def test_two_ranks_train_exactly_like_one_process(tmp_path, layout):
    assert_same_training(tmp_path, layout)


@pytest.mark.slow
def test_deepspeed_run_resumes_from_its_sharded_checkpoint(tmp_path):
    """A 2-rank ZeRO-2 run continued from its step-1 checkpoint (as a requeued job would) ends
    with the same weights as the run that went straight through."""
    import shutil

    layout = ["trainer.zero_stage=2", "trainer.save_every=1"]
    straight = launch(str(tmp_path / "straight"), layout, 2)
    step_1 = tmp_path / "straight" / "checkpoints" / "step_1"
    assert (step_1 / "policy").is_dir()  # DeepSpeed's own shards: optimizer partitions, schedule
    os.makedirs(tmp_path / "resumed" / "checkpoints")
    shutil.copytree(step_1, tmp_path / "resumed" / "checkpoints" / "step_1")
    resumed = launch(str(tmp_path / "resumed"), layout, 2)
    assert [m["step"] for m in resumed] == [2]  # only the step after the checkpoint ran (the file was new)
    assert resumed[0]["loss/policy"] == straight[1]["loss/policy"]
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))
