"""Learning evidence per stage: `python train.py stage=<stage> debug=tiny` — the warm-started tiny
model, the stage's synthetic task, its own verifiers (reward.weights) and advantage estimator —
raises the reward on a held-out split (problems that neither the RL run nor the warm start trained
on), and the same run with the policy loss's sign flipped does not: it falls.

The held-out reward is sampled as the rollout samples (temperature 1), the same seeds before and
after, so that the two measurements differ by the weights, not by the draw. The measured rises
(`python tests/test_stage_learning.py SEED...` prints them) are in MARGIN's comment.
"""

import json
import sys
from statistics import fmean

import pytest
import torch
from conftest import compose_cfg, wrong_sign  # first: it puts the repository on sys.path
from omegaconf import OmegaConf

import train
from data import encode_prompt, prompt_key, synthetic_samples, system_prompt_of
from model import load_policy, warm_start_samples
from rewards import reward_pool, score
from rollout import HFEngine

STAGES = ["fre_text", "fre_multi", "mgt_geo", "mgt_percereason", "mgt_sokoban"]
HELD_OUT = 32  # prompts, 4 samples each
# Measured (python tests/test_stage_learning.py 0 1, 2 cores): held-out reward of the warm start ->
# after RL / after RL with the sign flipped; the RL run's training_rise of format, and of the task's verifier
#   seed 0: fre_text 0.246 -> 0.520 / 0.000 (+0.255, math +0.081), fre_multi 0.363 -> 0.660 / 0.000 (+0.302, +0.059),
#           mgt_geo 0.180 -> 0.625 / 0.000 (+0.344, +0.187), mgt_percereason as fre_multi,
#           mgt_sokoban 0.211 -> 1.017 / 0.000 (+0.334, sokoban_lmm_r1 +0.376)
#   seed 1: fre_text 0.277 -> 0.539 / 0.000 (+0.273, +0.131), fre_multi 0.387 -> 0.758 / 0.000 (+0.276, +0.098),
#           mgt_geo 0.285 -> 0.598 / 0.000 (+0.345, +0.071), mgt_percereason as fre_multi,
#           mgt_sokoban 0.417 -> 1.367 / 0.000 (+0.312, +1.051)
# The smallest held-out rise is 0.26 and the smallest training rise 0.059: margins of about half.
# (fre_multi and mgt_percereason differ only in what debug=tiny overrides: their tiny runs are the same run.)
MARGIN = 0.1
TRAINING_MARGIN = 0.03


def stage_cfg(stage: str, seed: int = 0):
    return compose_cfg([f"stage={stage}", "debug=tiny", "log.wandb=disabled", "log.progress=false", f"trainer.seed={seed}"])


def held_out_samples(cfg) -> list:
    """HELD_OUT samples of the stage's synthetic task from their own seed, none of them a prompt of
    the warm start's or of the RL run's (arithmetic has only 1323 questions: many repeat)."""
    d, kind, seed = cfg.data, str(cfg.data.synthetic), cfg.trainer.seed
    system = system_prompt_of(d)
    seen = {prompt_key(s) for s, _ in warm_start_samples(cfg.model.tiny.warm_start_seed)}
    seen |= {prompt_key(s) for s in synthetic_samples(kind, d.num_synthetic, seed, d.image_size, system)}
    fresh = [s for s in synthetic_samples(kind, 8 * HELD_OUT, "held-out", d.image_size, system) if prompt_key(s) not in seen]
    assert len(fresh) >= HELD_OUT, f"only {len(fresh)} unseen {kind} problems"
    return fresh[:HELD_OUT]


def held_out_reward(cfg, samples, model, tokenizer, image_processor) -> float:
    """The mean weighted reward (the stage's reward.weights) of 4 samples on each held-out prompt."""
    prompts = [encode_prompt(s, tokenizer, image_processor) for s in samples]
    rollout = HFEngine(model, tokenizer, cfg.rollout).generate(prompts, 4, seeds=list(range(len(prompts))))
    rows = [samples[k].reward_row() for k in rollout.prompt_index]
    total, _, _ = score(reward_pool(cfg.reward.workers), rollout.texts, rows, dict(cfg.reward.weights), cfg.reward.timeout_s)
    return sum(total) / len(total)


def policy(cfg, path=None):
    return load_policy(OmegaConf.merge(cfg.model, {"path": path}), cfg.trainer.seed, torch.device("cpu"))


def after_rl(cfg, samples, run_dir) -> float:
    """The held-out reward after the stage's debug=tiny run."""
    train.run(cfg, str(run_dir))
    return held_out_reward(cfg, samples, *policy(cfg, str(run_dir / "checkpoints" / "final")))


def training_rise(cfg, run_dir) -> dict:
    """Each weighted reward part of the run's own rollouts (metrics.jsonl's reward/<part>): its mean
    over the last 20 steps minus its mean over the first 10, what the run's reward curve shows."""
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]  # one per step
    return {
        k: fmean(r[f"reward/{k}"] for r in rows[-20:]) - fmean(r[f"reward/{k}"] for r in rows[:10]) for k in cfg.reward.weights
    }


def measure(cfg, tmp_path) -> tuple:
    """Held-out reward of the warm start, after RL, after RL with the policy loss's sign flipped; and
    the RL run's training_rise."""
    samples = held_out_samples(cfg)
    before = held_out_reward(cfg, samples, *policy(cfg))
    after = after_rl(cfg, samples, tmp_path / "rl")
    original, train.policy_loss = train.policy_loss, wrong_sign(train.policy_loss)
    try:
        flipped = after_rl(cfg, samples, tmp_path / "flipped")
    finally:
        train.policy_loss = original
    return before, after, flipped, training_rise(cfg, tmp_path / "rl")


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_rl_raises_the_held_out_reward_and_a_sign_error_does_not(stage, tmp_path):
    before, after, flipped, rise = measure(stage_cfg(stage), tmp_path)
    assert before > 0.1, before  # the warm start scores: there is a reward to raise, and to lose
    assert after > before + MARGIN, (before, after, flipped)
    assert flipped < before, (before, after, flipped)
    assert min(rise.values()) > TRAINING_MARGIN, rise  # the run's own curve: format and the task's verifier both rise


if __name__ == "__main__":  # the measured rises: python tests/test_stage_learning.py SEED...
    import pathlib
    import tempfile

    for seed in map(int, sys.argv[1:]):
        for stage in STAGES:
            with tempfile.TemporaryDirectory() as d:
                before, after, flipped, rise = measure(stage_cfg(stage, seed), pathlib.Path(d))
            rises = "  ".join(f"{k} {v:+.3f}" for k, v in rise.items())
            print(
                f"seed {seed} {stage:16s} warm start {before:.3f}  RL {after:.3f}  sign-flipped RL {flipped:.3f}  "
                f"training rise: {rises}",
                flush=True,
            )
