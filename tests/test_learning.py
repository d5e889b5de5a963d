"""Learning sanity: the whole RL loop (rollout, reward, advantages, clipped update) raises a toy
verifiable reward on the tiny model, and a sign error in the policy loss makes it fail."""

import json

import pytest

import train
from conftest import TINY_DEFAULTS, compose_cfg, wrong_sign

# The toy reward (tests/toy_rewards.py): the fraction of completion characters that are digits.
# The random tiny model sits near 0.2 (digit tokens are common in its arithmetic-trained BPE).
TOY = ["+reward.weights={toy_rewards\\:digit_fraction: 1.0}", "~reward.weights.format", "~reward.weights.math"]
FAST = [
    "trainer.lr=1e-2",
    "trainer.warmup_ratio=0",
    "algo.critic_lr=1e-2",
    "trainer.max_steps=25",
    "rollout.prompts_per_step=8",
    "rollout.group_size=8",
    "rollout.max_new_tokens=8",
    "trainer.mini_batch_size=64",
    "trainer.micro_batch_size=32",
    "algo.kl_coef=0",
]


def reward_curve(tmp_path, estimator):
    cfg = compose_cfg(TINY_DEFAULTS + TOY + FAST + [f"algo.estimator={estimator}"])
    train.run(cfg, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line)["reward/mean"] for line in f]


def learned(curve) -> bool:
    start, end = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    return end > 0.6 and end > 2.5 * start


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_baseline", "gae"])
def test_rl_loop_raises_a_toy_reward(tmp_path, estimator):
    curve = reward_curve(tmp_path, estimator)
    assert 0.1 < sum(curve[:3]) / 3 < 0.35, curve  # starts near the random level
    assert learned(curve), curve


@pytest.mark.slow
def test_sign_error_in_the_loss_fails_the_learning_check(tmp_path, monkeypatch):
    """The check above can fail: with the policy loss negated, the same run must not pass it."""
    monkeypatch.setattr(train, "policy_loss", wrong_sign(train.policy_loss))
    curve = reward_curve(tmp_path, "grpo")
    assert not learned(curve), curve
    assert sum(curve[-3:]) < sum(curve[:3]), curve  # it unlearns
