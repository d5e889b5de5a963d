"""train.py end to end in a subprocess, as users run it: run dir contents and reloadable checkpoints."""

import glob
import json
import os

import pytest
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from conftest import run_train

TINY_STAGES = ["fre_text", "fre_multi", "mgt_geo", "mgt_percereason"]
SHORT = ["trainer.max_steps=2", "log.progress=false"]


def only_run_dir(root):
    dirs = [d for d in glob.glob(os.path.join(root, "*")) if os.path.isdir(d) and not os.path.islink(d)]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", TINY_STAGES)
def test_tiny_stage_trains_and_writes_its_run_dir(tmp_path, stage):
    out = run_train([f"stage={stage}", "debug=tiny", *SHORT, "log.wandb=disabled"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "outputs" / stage)
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2]
    required = ["reward/mean", "reward/format", "reward/math", "loss/policy", "loss/kl", "rollout/response_len", "perf/step_s"]
    for key in required:
        assert all(isinstance(m[key], (int, float)) for m in metrics), key
    if stage == "mgt_geo":
        assert "loss/value" in metrics[0]  # PPO with a value model
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert samples and {"prompt", "completion", "answer", "reward", "reward/format", "reward/math"} <= set(samples[0])
    assert ("<|image_pad|>" in samples[0]["prompt"]) == (stage != "fre_text")
    for name in ("config.yaml", "git.txt", "reward_curve.png"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0
    ckpt = os.path.join(run_dir, "checkpoints", "final")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert model.config.get_text_config().vocab_size == len(tok)
    ids = torch.tensor([tok("What is $2 + 2$?").input_ids])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert os.path.realpath(tmp_path / "outputs" / stage / "latest") == os.path.realpath(run_dir)


@pytest.mark.slow
def test_mgt_stage_starts_from_the_fre_text_checkpoint(tmp_path):
    """The two-stage chain: FRE-Text's final checkpoint is where MGT-Geo starts (here on the tiny model)."""
    assert run_train(["stage=fre_text", "debug=tiny", *SHORT, "log.wandb=disabled"], cwd=tmp_path).returncode == 0
    ckpt = "outputs/fre_text/latest/checkpoints/final"
    out = run_train(["stage=mgt_geo", "debug=tiny", f"model.path={ckpt}", *SHORT, "log.wandb=disabled"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "outputs" / "mgt_geo")
    assert f"path: {ckpt}" in open(os.path.join(run_dir, "config.yaml")).read()


@pytest.mark.slow
def test_multirun_makes_one_run_dir_per_job(tmp_path):
    out = run_train(["-m", "stage=fre_text,mgt_geo", "debug=tiny", "trainer.max_steps=1", "log.progress=false"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = glob.glob(str(tmp_path / "multirun" / "*"))
    jobs = sorted(os.path.basename(d) for d in glob.glob(os.path.join(sweep, "*_*")))
    assert jobs == ["0_fre_text", "1_mgt_geo"]
    for job in jobs:
        assert len(open(os.path.join(sweep, job, "metrics.jsonl")).readlines()) == 1
        assert glob.glob(os.path.join(sweep, job, "wandb", "offline-run-*"))  # wandb logs offline by default
