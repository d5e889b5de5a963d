"""The algorithm's pure functions against hand-computed values."""

import math
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from config import AlgoConfig
from rollout import Rollout
from train import (
    Scored,
    adaptive_kl_coef,
    aggregate,
    compute_advantages,
    explained_variance,
    has_flat_group,
    overlong_penalty,
    replace_flat_groups,
    sequence_weights,
    zero_std_fraction,
    cumulative_returns,
    gae_advantages,
    kl_penalty,
    lr_factor,
    policy_loss,
    tis_weights,
    token_advantages,
    token_rewards,
    value_loss,
    whiten,
)


def close(t, expected):
    torch.testing.assert_close(t.float(), torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def algo(**kw):
    return OmegaConf.merge(OmegaConf.structured(AlgoConfig), kw)


# ---- advantages ----


def test_grpo_is_group_mean_over_unbiased_std():
    adv = compute_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.0]), group_size=3, estimator="grpo", eps=0.0)
    # group [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3); group [1, 2, 0]: mean 1, unbiased std 1
    s1 = math.sqrt(1 / 3)
    expected = [2 / 3 / s1, -1 / 3 / s1, -1 / 3 / s1, 0.0, 1.0, -1.0]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_dr_grpo_and_reinforce_baseline_only_center():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    for est in ("dr_grpo", "reinforce_baseline"):
        assert compute_advantages(r, 4, est).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_rloo_uses_leave_one_out_mean():
    # 1 - mean(0, 0, 1) = 2/3 ; 0 - mean(0, 1, 1) = -2/3
    assert compute_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, "rloo").tolist() == pytest.approx(
        [2 / 3, -2 / 3, -2 / 3, 2 / 3]
    )


@pytest.mark.parametrize("est", ["grpo", "dr_grpo", "rloo", "reinforce_baseline"])
def test_zero_variance_group_gets_zero_advantage(est):
    adv = compute_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3, est)
    assert adv.abs().max().item() == 0.0


@pytest.mark.parametrize("est", ["grpo", "dr_grpo", "rloo", "reinforce_baseline"])
@pytest.mark.parametrize("group_size", [8, 16])
def test_a_flat_group_of_rewards_inexact_in_binary_gets_exactly_zero_advantage(est, group_size):
    # sokoban_progress gives thirds and tenths: for groups of 8 and 16 (LMM-R1's) their float32 mean
    # is off by ~6e-8, which divided by GRPO's std (0 here) + eps gave 0.06; the group beside it keeps its spread
    for value in (0.7, 2 / 3, 0.1, 1 / 3):
        rewards = torch.tensor([value] * group_size + [0.0] * (group_size - 1) + [1.0])
        adv = compute_advantages(rewards, group_size, est)
        assert adv[:group_size].tolist() == [0.0] * group_size, value
        assert adv[-1] > 0 > adv[group_size]


def test_unknown_group_estimator_is_an_error():
    with pytest.raises(ValueError, match="gae"):
        compute_advantages(torch.zeros(4), 2, "gae")


# ---- KL ----


def test_kl_estimators_match_hand_values():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    lr = math.log(2.0)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(lr)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * lr**2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + lr)
    # k3 is >= 0 and 0 only where the two agree
    assert kl_penalty(ref, logp, "k3").item() == pytest.approx(2 - 1 - lr)
    assert kl_penalty(logp, logp, "k3").item() == 0.0


# ---- policy loss ----


def test_ratio_one_gives_minus_mean_advantage():
    A = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    logp = torch.randn(2, 3)
    loss, clipped = policy_loss(logp, logp.clone(), A, 0.2, 0.2)
    assert agg(loss, mask, "token_mean").item() == pytest.approx(-(1 - 2 + 3 + 0.5) / 4)
    assert not clipped.any()


def test_clipping_at_both_edges():
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5])
    A = torch.tensor([1.0, 1.0, -1.0, -1.0])
    logp = torch.log(ratio).requires_grad_(True)
    loss, clipped = policy_loss(logp, torch.zeros(4), A, clip_low=0.2, clip_high=0.2)
    # A>0 ratio above 1+eps: clipped to 1.2; A>0 ratio below: unclipped; A<0 ratio below 1-eps: clipped to 0.8;
    # A<0 ratio above: unclipped (pessimistic bound)
    assert loss.tolist() == pytest.approx([-1.2, -0.5, 0.8, 1.5])
    assert clipped.tolist() == [True, False, True, False]
    loss.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[2] == 0  # clipped tokens get no gradient
    assert logp.grad[1] != 0 and logp.grad[3] != 0


def test_clip_higher_and_dual_clip():
    A = torch.tensor([1.0, -1.0])
    loss, _ = policy_loss(torch.log(torch.tensor([1.5, 5.0])), torch.zeros(2), A, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    assert loss.tolist() == pytest.approx([-1.28, 3.0])  # ratio 5 with A<0 bounded by dual_clip * |A|


def agg(values, mask, mode: str, chunk: int = 2, max_len: int = 10) -> torch.Tensor:
    """The loss of one mini-batch held in one micro-batch."""
    return aggregate(values, mask, torch.tensor(sequence_weights(mask.sum(1).tolist(), mode, chunk, max_len)))


MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "chunk_token_mean"]


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_does_not_depend_on_how_the_mini_batch_is_split_into_micro_batches(mode):
    torch.manual_seed(0)
    values = torch.randn(6, 5)
    mask = torch.rand(6, 5) > 0.3
    mask[:, 0] = True
    weights = torch.tensor(sequence_weights(mask.sum(1).tolist(), mode, 2, 8))  # the mini-batch's order: chunks 01 23 45
    whole = aggregate(values, mask, weights)
    for micro in ([[0, 1], [2, 3], [4, 5]], [[0, 3], [5, 1], [2, 4]], [[4], [0, 1, 2, 3, 5]]):  # packing reorders freely
        split = sum(aggregate(values[i], mask[i], weights[i]) for i in micro)
        assert split.item() == pytest.approx(whole.item(), rel=1e-6)


def test_aggregation_hand_values():
    v = torch.tensor([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0], [2.0, 2.0, 5.0], [6.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)  # 2, 1, 3, 1 tokens
    assert agg(v, m, "token_mean").item() == pytest.approx(23 / 7)
    assert agg(v, m, "seq_mean_token_mean").item() == pytest.approx((2 + 4 + 3 + 6) / 4)
    assert agg(v, m, "seq_mean_token_sum_norm").item() == pytest.approx(23 / (4 * 10))
    # LMM-R1 with micro_train_batch_size 2: the token mean of sequences 0-1 and of 2-3, averaged
    assert agg(v, m, "chunk_token_mean", chunk=2).item() == pytest.approx(((1 + 3 + 4) / 3 + (2 + 2 + 5 + 6) / 4) / 2)
    # a last chunk shorter than the rest (a last, smaller micro-batch) weighs as much as the others
    assert agg(v[:3], m[:3], "chunk_token_mean", chunk=2).item() == pytest.approx(((1 + 3 + 4) / 3 + (2 + 2 + 5) / 3) / 2)


def test_chunks_of_one_are_the_sequence_mean_and_of_the_whole_mini_batch_the_token_mean():
    torch.manual_seed(1)
    values, mask = torch.randn(8, 6), torch.rand(8, 6) > 0.4
    mask[:, 0] = True
    per_sequence = ((values * mask).sum(1) / mask.sum(1)).mean()
    assert agg(values, mask, "chunk_token_mean", chunk=1).item() == pytest.approx(per_sequence.item(), rel=1e-6)
    for whole in (8, 100):
        assert agg(values, mask, "chunk_token_mean", chunk=whole).item() == pytest.approx(
            (values[mask].sum() / mask.sum()).item(), rel=1e-6
        )
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        sequence_weights([1, 2], "token_sum", 2, 8)


def test_value_loss_clips_around_old_values():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    # token 0: unclipped error 0, clipped value 0.2 -> error 0.8 -> max = 0.5 * 0.64
    assert value_loss(v, old, ret, clip=0.2).tolist() == pytest.approx([0.32, 0.5])


# ---- returns, GAE, whitening ----


def test_token_rewards_put_reward_on_last_token_and_kl_everywhere():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])
    r = token_rewards(torch.tensor([1.0, 2.0]), mask, kl, kl_coef=0.5)
    close(r, [[-0.05, -0.1, 1 - 0.15], [2 - 0.2, 0.0, 0.0]])


def test_cumulative_returns():
    r = torch.tensor([[1.0, 2.0, 4.0]])
    m = torch.ones(1, 3, dtype=torch.bool)
    assert cumulative_returns(r, m, 1.0).tolist() == [[7.0, 6.0, 4.0]]
    assert cumulative_returns(r, m, 0.5).tolist() == [[1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4.0]]


def test_gae_hand_values():
    r, v = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.8]])
    m = torch.ones(1, 2, dtype=torch.bool)
    adv, ret = gae_advantages(r, v, m, gamma=1.0, lam=1.0)
    # delta_1 = 1 - 0.8 = 0.2, delta_0 = 0 + 0.8 - 0.5 = 0.3
    close(adv, [[0.5, 0.2]])
    close(ret, [[1.0, 1.0]])
    adv, _ = gae_advantages(r, v, m, gamma=1.0, lam=0.5)
    close(adv, [[0.3 + 0.5 * 0.2, 0.2]])


def test_gae_ignores_padding():
    r, v = torch.tensor([[1.0, 5.0]]), torch.tensor([[0.25, 7.0]])
    m = torch.tensor([[1, 0]], dtype=torch.bool)
    adv, ret = gae_advantages(r, v, m, 1.0, 1.0)
    assert adv[0, 0].item() == pytest.approx(0.75) and ret[0, 0].item() == pytest.approx(1.0)


def test_whiten_over_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    w = whiten(x, m)
    real = w[m]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.pow(2).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert w[~m].abs().max().item() == 0.0


def test_token_advantages_broadcast_for_group_estimators():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv, ret = token_advantages(algo(estimator="dr_grpo"), torch.tensor([1.0, 0.0]), mask, group_size=2)
    close(adv, [[0.5, 0.5, 0.0], [-0.5, -0.5, -0.5]])
    assert ret is None


def test_kl_in_reward_enters_reward_to_go():
    mask = torch.ones(2, 2, dtype=torch.bool)
    kl = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    a = algo(estimator="dr_grpo", kl_in_reward=True, kl_coef=0.1)
    adv, _ = token_advantages(a, torch.tensor([1.0, 0.0]), mask, 2, kl=kl)
    # sample 0: seq advantage 0.5 at the last token, KL penalties -0.1 and -0.2 summed from each token on
    close(adv, [[0.5 - 0.3, 0.5 - 0.2], [-0.5, -0.5]])
    a.kl_in_reward = False  # KL in the loss: the advantages do not see it
    adv, _ = token_advantages(a, torch.tensor([1.0, 0.0]), mask, 2, kl=kl)
    close(adv, [[0.5, 0.5], [-0.5, -0.5]])


def test_reinforce_baseline_and_gae_whiten_by_default():
    mask = torch.ones(4, 3, dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0, 3.0, 0.0])
    adv, _ = token_advantages(algo(estimator="reinforce_baseline"), rewards, mask, 2)
    assert adv[mask].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert adv[mask].std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    adv_off, _ = token_advantages(algo(estimator="reinforce_baseline", whiten_advantages=False), rewards, mask, 2)
    assert adv_off[:, 0].tolist() == pytest.approx([0.5, -0.5, 1.5, -1.5])
    values = torch.zeros(4, 3)
    adv, ret = token_advantages(algo(estimator="gae"), rewards, mask, 2, values=values)
    assert ret[:, 0].tolist() == pytest.approx(rewards.tolist())  # gamma = lam = 1: return = final reward
    assert adv[mask].mean().item() == pytest.approx(0.0, abs=1e-6)


def test_lr_schedule_warms_up_then_decays_to_min_ratio():
    total = 100
    f = [lr_factor(k, total, 0.1, 0.1) for k in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_truncated_importance_weights_hand_values():
    old = torch.tensor([[-1.0, -2.0, -0.5]])  # trainer's log-probs of the sampled tokens
    sampled = torch.tensor([[-1.5, -1.0, -0.5]], requires_grad=True)  # the sampler's
    w = tis_weights(old, sampled, clip=1.5)
    close(w, [[1.5, math.exp(-1.0), 1.0]])  # exp(0.5) = 1.65 truncated to 1.5; below 1 kept; equal -> 1
    assert not w.requires_grad


def test_grpo_without_std_scaling_only_centres():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 5.0])
    close(compute_advantages(r, 4, "grpo", std_normalize=False), [0.75, -0.25, -0.25, -0.25, -0.75, -0.75, -0.75, 2.25])


def test_overlong_penalty_hand_values():
    # limit 10, buffer 4: free up to 6 tokens, then linear down to -penalty at 10 (and beyond)
    close(overlong_penalty(torch.tensor([5, 6, 8, 10, 12]), 10, 4, 0.5), [0.0, 0.0, -0.25, -0.5, -0.5])


def test_adaptive_kl_moves_toward_the_target_and_is_clipped():
    assert adaptive_kl_coef(0.1, kl=0.02, target=0.01, horizon=1000, n_samples=100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, kl=0.011, target=0.01, horizon=1000, n_samples=100) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert adaptive_kl_coef(0.1, kl=0.0, target=0.01, horizon=1000, n_samples=100) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


def test_zero_std_groups_and_explained_variance():
    assert zero_std_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2) == pytest.approx(2 / 3)
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns), returns, mask) == pytest.approx(0.0)
    assert explained_variance(returns + 1.0, returns, mask) == pytest.approx(1.0)  # a constant offset is not variance


def scored(rewards, prompts):
    """A Scored of groups of 2 with the given rewards; completions name their prompt and sample."""
    n = len(rewards)
    ids = [[k // 2, k % 2] for k in range(n)]
    rollout = Rollout(
        [k // 2 for k in range(n)], ids, [f"{prompts[k // 2]}/{k % 2}" for k in range(n)], [False] * n, [[0.0, 0.0]] * n
    )
    return Scored(list(prompts), rollout, list(rewards), {"toy": list(rewards)}, Counter(errors=1), 0, 1.0, 1.0)


def test_dynamic_sampling_replaces_flat_groups_in_order_and_keeps_the_rest():
    current = scored([1, 1, 0, 1, 0, 0], "abc")  # groups a and c are flat
    fresh = scored([0, 0, 1, 0, 0, 1], "xyz")  # x is flat: y and z have a spread
    merged = replace_flat_groups(current, fresh, 2)
    assert merged.prompts == ["y", "b", "z"] and merged.total == [1, 0, 0, 1, 0, 1]
    assert merged.rollout.texts == ["y/0", "y/1", "b/0", "b/1", "z/0", "z/1"] and merged.rollout.prompt_index == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    assert merged.parts["toy"] == merged.total and merged.failures["errors"] == 2 and not has_flat_group(merged.total, 2)
    short = replace_flat_groups(current, scored([0, 0, 1, 0], "uv"), 2)  # one spread group for two flat slots
    assert short.prompts == ["v", "b", "c"] and has_flat_group(short.total, 2)  # the rest waits for the next round


def gae_by_definition(rewards, values, gamma, lam):
    """A_t = sum_l (gamma * lam)^l * delta_{t+l}, delta_t = r_t + gamma * V_{t+1} - V_t, V past the end 0:
    the textbook sum, one sequence and one t at a time (no recursion shared with the implementation)."""
    T = len(rewards)
    v = list(values) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(T)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(T - t)) for t in range(T)]


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)])
def test_gae_matches_the_textbook_sum_on_random_padded_batches(gamma, lam):
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    lengths = [7, 4, 1]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    for i, n in enumerate(lengths):
        expected = gae_by_definition(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        torch.testing.assert_close(adv[i, :n], torch.tensor(expected), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ret[i, :n], adv[i, :n] + values[i, :n])
