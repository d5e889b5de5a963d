"""LMM-R1 rule-based RL: rollout -> reward -> advantage -> policy update -> sync, as one loop.

    python train.py stage=mgt_geo trainer.lr=1e-6            # a stage of the paper
    python train.py debug=tiny                                # the embedded tiny model on CPU
    python train.py -m stage=fre_text,mgt_geo debug=tiny      # a sweep

Read from the bottom: run() is the loop, one call per phase of a step (rollout, advantages, update,
sync, evaluate, log, save) over one RunState. The phases sit above it, and the pure algorithm
functions (advantages, losses, KL) at the top. Ranks, collectives and DeepSpeed live in dist.py,
checkpoint files and signals in checkpoint.py.
Shapes: N = samples in a rollout (prompts_per_step * group_size), B = samples in a micro-batch,
T = completion tokens (right-padded; `completion_mask` marks real tokens).
"""

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterator, List, Optional, Tuple

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import config  # noqa: F401  (registers the schema with Hydra's ConfigStore)
from checkpoint import StopSignals, TrainingError, resume_point, rewrite_logs, rng_state, save_training_state, set_rng_state
from config import ConfigError, validate
from data import BadRow, encode_prompt, load_dataset, prompt_batches, steps_per_epoch
from dist import all_sum, any_rank, backward, deepspeed_engine, gather, gathered_weights, in_step
from dist import console_log, init_distributed, launch_rank, main_rank, pick_device, ranks_to_start, set_cpu_threads
from dist import memory_shortfall, shared_run_dir, start_ranks, step_optimizer
from eval import run_eval
from model import (
    VISION_TOKENS,
    Critic,
    collate,
    frozen_copy,
    image_token_id,
    load_policy,
    meta_model,
    model_identity,
    quiet_progress_bars,
    uses_varlen_kernels,
    load_weights,
    pack,
    resolve_model_path,
    save_checkpoint,
    sequence_logps,
    sequence_values,
)
from rewards import gold_problems, resolve, reward_pool, score
from rollout import Rollout, check_vllm, cut_vision_tokens, make_engine, release_process_groups

# ---------------------------------------------------------------------------------------------
# Algorithm: advantages
# ---------------------------------------------------------------------------------------------


def compute_advantages(
    rewards: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-6, std_normalize: bool = True
) -> torch.Tensor:
    """Per-sequence advantages (N,) from rewards (N,) laid out as consecutive groups of `group_size`.

    grpo:               (r - mean_g) / (std_g + eps)   (unbiased std, as GRPO/TRL/OpenRLHF;
                        std_normalize=False: r - mean_g)
    dr_grpo:            r - mean_g                     (no std: Dr. GRPO)
    rloo:               r - mean of the other G-1 of the group = (r - mean_g) * G / (G - 1)
    reinforce_baseline: r - mean_g                     (whitened over the batch afterwards)
    A group whose rewards are all equal (max == min) gets advantage exactly 0 under every estimator:
    in float32 the mean of sixteen 0.7s is off by 6e-8, and dividing that by their std (0 or 6e-8,
    with the tensor's layout) + eps gave 0.06.
    """
    r = rewards.float().view(-1, group_size)  # (P, G)
    centered = torch.where(flat_groups(r)[:, None], 0.0, r - r.mean(dim=1, keepdim=True))
    if estimator == "grpo":
        adv = centered / (r.std(dim=1, keepdim=True) + eps) if std_normalize else centered
    elif estimator in ("dr_grpo", "reinforce_baseline"):
        adv = centered
    elif estimator == "rloo":
        adv = centered * group_size / (group_size - 1)
    else:
        raise ValueError(f"compute_advantages: no group estimator {estimator!r}")
    return adv.view(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's k1/k2/k3)."""
    log_ratio = logp.float() - ref_logp.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # exp(ref - logp) - 1 - (ref - logp) >= 0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def token_rewards(seq_rewards: torch.Tensor, mask: torch.Tensor, kl: Optional[torch.Tensor], kl_coef: float) -> torch.Tensor:
    """(B, T) rewards: the sequence reward on its last completion token, minus kl_coef * KL on every token."""
    last = mask.long().cumsum(1).argmax(1)  # index of the last real token of each row
    r = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    r[torch.arange(len(last), device=mask.device), last] = seq_rewards.float()
    if kl is not None and kl_coef > 0:
        r = r - kl_coef * kl * mask
    return r


def cumulative_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, T) discounted reward-to-go sum_{t' >= t} gamma^(t'-t) r_t' over real tokens."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def gae_advantages(rewards, values, mask, gamma: float, lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) token rewards and values; returns (advantages, returns)."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    return adv, adv + values


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real tokens of the whole batch (REINFORCE++ / PPO normalisation);
    under data parallel the batch is every rank's, so the sums are taken over all ranks."""
    n = all_sum(mask.sum().float())
    mean = all_sum((x * mask).sum()) / n
    var = all_sum((((x - mean) * mask) ** 2).sum()) / n
    return (x - mean) * torch.rsqrt(var.clamp_min(eps)) * mask


def token_advantages(algo, rewards, mask, group_size, kl=None, values=None, kl_coef: Optional[float] = None):
    """Token advantages (N, T) (and returns for the value model when estimator=gae).

    Group estimators baseline the sequence reward first; with algo.kl_in_reward the per-token KL
    penalty then enters the reward-to-go, as in LMM-R1's recipes (OpenRLHF's compute_reward).
    `kl_coef` is the current coefficient (adaptive KL changes it); default algo.kl_coef.
    """
    kl_coef = (algo.kl_coef if kl_coef is None else kl_coef) if algo.kl_in_reward else 0.0
    if algo.estimator == "gae":
        adv, returns = gae_advantages(token_rewards(rewards, mask, kl, kl_coef), values, mask, algo.gamma, algo.lam)
    else:
        seq_adv = compute_advantages(rewards, group_size, str(algo.estimator), algo.eps, algo.std_normalize)
        adv, returns = cumulative_returns(token_rewards(seq_adv, mask, kl, kl_coef), mask, 1.0), None
    whiten_on = algo.whiten_advantages
    if whiten_on is None:
        whiten_on = algo.estimator in ("reinforce_baseline", "gae")
    if whiten_on:
        adv = whiten(adv, mask)
    return adv * mask, returns


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (N,): 0 up to max_len - buffer tokens, then falling linearly
    to -penalty at max_len (a completion that ran out of tokens)."""
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1.0)


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, n_samples: int) -> float:
    """PPO's adaptive KL controller (Ziegler et al., 2019): move the coefficient by the proportional
    error, clipped to +-0.2, times n_samples / horizon."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return coef * (1.0 + error * n_samples / horizon)


def flat_groups(grouped: torch.Tensor) -> torch.Tensor:
    """(P, G) rewards -> (P,) bool: the groups whose rewards all agree (max == min, exactly)."""
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards all agree: they carry no group-relative signal."""
    return flat_groups(rewards.view(-1, group_size)).float().mean().item()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect value model, <= 0 useless."""
    n = mask.sum()
    r, v = returns[mask.bool()], values[mask.bool()]
    var_r = ((r - r.mean()) ** 2).sum() / n
    var_e = ((r - v - (r - v).mean()) ** 2).sum() / n
    return (1 - var_e / var_r).item() if var_r > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Algorithm: losses
# ---------------------------------------------------------------------------------------------


def policy_loss(logp, old_logp, advantages, clip_low: float, clip_high: float, dual_clip: Optional[float] = None):
    """Per-token clipped policy-gradient loss (B, T) and a (B, T) bool of tokens whose ratio was clipped.

    loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)); with dual_clip = c > 1,
    tokens with A < 0 are further bounded by c * |A| (dual-clip PPO).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    return loss, clipped > unclipped


def value_loss(values, old_values, returns, clip: float):
    """Per-token clipped value loss (B, T): 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def tis_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, clip: float) -> torch.Tensor:
    """Truncated importance-sampling weights (B, T) for tokens the sampler (vLLM) drew but the trainer
    scores: min(pi_trainer / pi_sampler, clip), with no gradient. The two disagree (kernels, bf16,
    top-p); without the correction the update is silently off-policy (Yao et al., 2025)."""
    return torch.exp(old_logp - sampler_logp).clamp(max=clip).detach()


def sequence_weights(lengths: List[int], mode: str, chunk: int, max_len: int) -> List[float]:
    """Each sequence's weight w_b in a mini-batch's loss sum_b w_b sum_t v_bt, for its sequences in the
    mini-batch's order with `lengths` loss tokens each (n of them):
    token_mean:              1 / the mini-batch's tokens                     (verl's default)
    seq_mean_token_mean:     1 / (n * its own tokens)
    seq_mean_token_sum_norm: 1 / (n * max_len)                    (Dr. GRPO's constant normaliser)
    chunk_token_mean:        1 / (chunks * its chunk's tokens), in chunks of `chunk` consecutive
                             sequences (the last may be shorter): LMM-R1's loss, a token mean per
                             micro-batch of micro_train_batch_size sequences (from 2025-04-12; before,
                             a token mean per sequence), micro-batches averaged by DeepSpeed's gradient
                             accumulation. chunk=1 is seq_mean_token_mean, chunk >= n token_mean.
    Weights, not a reduction, so that the loss does not depend on how the sequences are packed into
    micro-batches or spread over ranks. A sequence (or chunk) without loss tokens (algo.mask_truncated)
    still counts in n (or chunks), as a masked-out sample of a fixed-size batch does."""
    n = len(lengths)
    if mode == "seq_mean_token_sum_norm":
        return [1 / (n * max_len)] * n
    size = {"token_mean": n, "seq_mean_token_mean": 1, "chunk_token_mean": chunk}.get(mode)
    if size is None:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    groups = chunks(lengths, size)
    return [1 / (len(groups) * max(1, sum(g))) for g in groups for _ in g]


def aggregate(token_values, mask, weights) -> torch.Tensor:
    """A micro-batch's share of the mini-batch loss: (B, T) per-token values, (B, T) mask, (B,)
    sequence_weights -> scalar. The shares of a mini-batch's micro-batches sum to its loss."""
    return ((token_values * mask).sum(1) * weights).sum()


def lr_factor(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup over warmup_ratio * total optimizer steps, then cosine from 1 to min_ratio."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def derive_seed(seed: int, *keys) -> int:
    """A seed for one (step, index, purpose): runs are reproducible and independent of call order."""
    return int(hashlib.sha256(repr((seed,) + keys).encode()).hexdigest()[:8], 16)


# ---------------------------------------------------------------------------------------------
# Dynamic sampling (DAPO): refill groups whose rewards all agree
# ---------------------------------------------------------------------------------------------


@dataclass
class Scored:
    """A rank's scored rollout: groups of group_size consecutive samples, prompt k's at k*G..(k+1)*G."""

    prompts: list
    rollout: Rollout
    total: List[float]  # (N,) weighted rewards
    parts: Dict[str, List[float]]  # reward name -> (N,)
    failures: Counter
    vision_cut: int
    rollout_s: float
    reward_s: float
    rounds: List[int] = field(default_factory=lambda: [0])  # sampling rounds that went into it


def flat(total: List[float], g: int, group_size: int) -> bool:
    values = total[g * group_size : (g + 1) * group_size]
    return max(values) == min(values)


def has_flat_group(total: List[float], group_size: int) -> bool:
    return any(flat(total, g, group_size) for g in range(len(total) // group_size))


def replace_flat_groups(current: Scored, fresh: Scored, group_size: int) -> Scored:
    """`current` with each group whose rewards all agree replaced, in order, by the next group of
    `fresh` that has a spread; fresh's other groups are dropped. Counts and timings add up."""
    spare = [g for g in range(len(fresh.prompts)) if not flat(fresh.total, g, group_size)]
    chosen = [
        (fresh, spare.pop(0)) if flat(current.total, g, group_size) and spare else (current, g)
        for g in range(len(current.prompts))
    ]
    G = group_size
    out = Scored([], Rollout([], [], [], [], [] if current.rollout.logprobs is not None else None), [], {n: [] for n in current.parts},
                 current.failures + fresh.failures, current.vision_cut + fresh.vision_cut, current.rollout_s + fresh.rollout_s,
                 current.reward_s + fresh.reward_s, current.rounds + [len(current.rounds)])  # fmt: skip
    for k, (source, g) in enumerate(chosen):
        span = slice(g * G, (g + 1) * G)
        out.prompts.append(source.prompts[g])
        out.rollout.prompt_index += [k] * G
        out.rollout.completion_ids += source.rollout.completion_ids[span]
        out.rollout.texts += source.rollout.texts[span]
        out.rollout.truncated += source.rollout.truncated[span]
        if out.rollout.logprobs is not None:
            out.rollout.logprobs += source.rollout.logprobs[span]
        out.total += source.total[span]
        for name in out.parts:
            out.parts[name] += source.parts[name][span]
    return out


# ---------------------------------------------------------------------------------------------
# Batching, logging and files
# ---------------------------------------------------------------------------------------------


def shuffled(n: int, unit: int, generator) -> List[int]:
    """A random order of sample ids 0..n-1 that keeps each run of `unit` consecutive ids (a rollout
    group: trainer.shuffle=group) together and in order; unit 1: any order."""
    return [u * unit + k for u in torch.randperm(n // unit, generator=generator).tolist() for k in range(unit)]


def chunks(xs: List[int], n: int) -> List[List[int]]:
    return [xs[i : i + n] for i in range(0, len(xs), n)]


def right_pad(rows: List[List[float]], T: int, device) -> torch.Tensor:
    """(N, T) float tensor of ragged rows, zero-padded on the right."""
    out = torch.zeros(len(rows), T)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:T])
    return out.to(device)


def first_fit_decreasing(lengths: List[int], budget: int) -> List[List[int]]:
    """Positions into `lengths` grouped into bins of at most `budget` tokens: longest first, each into
    the first bin with room. Bins come out nearly full, so packed micro-batches carry almost no
    waste; a sequence longer than the budget gets a bin of its own (it is never split)."""
    bins: List[List[int]] = []
    loads: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def write_run_info(run_dir: str, cfg: DictConfig) -> None:
    """The resolved config and the code version (git SHA and uncommitted diff) beside the results."""
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    repo = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        sha, diff = "not a git checkout\n", ""
    with open(os.path.join(run_dir, "git.txt"), "w") as f:
        f.write(f"sha: {sha}\n{diff}")


# rewards.score's counts logged as reward/n_<kind> (counts over the step, not means like the other
# reward/*): why completions scored 0, and replaced reward workers
REWARD_COUNTS = ("errors", "timeouts", "malformed", "worker_restarts")


def plot_rewards(path: str, history: List[Dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    counts = {f"reward/n_{kind}" for kind in REWARD_COUNTS}
    for key in sorted(k for k in history[-1] if k.startswith("reward/") and k not in counts):
        ax.plot(steps, [m.get(key, float("nan")) for m in history], label=key, lw=2 if key == "reward/mean" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latest_link(stage: str, tiny: bool) -> str:
    """outputs/<stage>/latest, where the next stage finds a run's checkpoint (MGT after FRE-Text); the
    tiny model's runs (debug=tiny) have their own, outputs/debug/<stage>/latest, never a real stage's."""
    return os.path.join("outputs", "debug" if tiny else "", stage, "latest")


def link_latest(link: str, run_dir: str) -> None:
    """`link` -> this run, atomically."""
    os.makedirs(os.path.dirname(link), exist_ok=True)
    tmp = f"{link}.tmp{os.getpid()}"
    os.symlink(os.path.abspath(run_dir), tmp)
    os.replace(tmp, link)


def autocast_ctx(device: torch.device, dtype: str):
    """bf16 compute with fp32 weights: an lr of 1e-6 would round to nothing in bf16 weights."""
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def adamw_with_schedule(params, lr: float, t, total_updates: int):
    """AdamW with linear warmup then cosine decay to lr * min_lr_ratio, stepped once per update."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, total_updates, t.warmup_ratio, t.min_lr_ratio))
    return optimizer, schedule


def micro_batches(indices: List[int], items, t) -> List[List[int]]:
    """Samples `indices` (into `items`, (prompt, completion ids) pairs) split into micro-batches:
    packed into t.max_tokens_per_micro tokens each, or t.micro_batch_size padded ones. Packing bins
    units by first-fit decreasing: with t.share_prompts a unit is samples of one prompt, its prompt
    counted once (`pack` lays it out once), cut where it would pass the budget; else one sample."""
    if not t.packing:
        return chunks(indices, t.micro_batch_size)
    units: List[List[int]] = []
    sizes: List[int] = []
    last: Dict[int, int] = {}  # prompt -> its open unit
    for i in indices:
        prompt, completion = items[i]
        u = last.get(id(prompt)) if t.share_prompts else None
        if u is None or sizes[u] + len(completion) > t.max_tokens_per_micro:
            last[id(prompt)], u = len(units), len(units)
            units.append([])
            sizes.append(len(prompt.input_ids))
        units[u].append(i)
        sizes[u] += len(completion)
    return [[i for u in b for i in units[u]] for b in first_fit_decreasing(sizes, t.max_tokens_per_micro)]


@torch.no_grad()
def rollout_forward(models, items, T: int, micro_batches: List[List[int]], make_batch) -> Dict[str, torch.Tensor]:
    """One no-grad pass of each model in `models` (name -> fn(batch) -> (B, Tb)) over all samples,
    micro-batch by micro-batch; returns name -> (N, T), right-padded with zeros."""
    out: Dict[str, torch.Tensor] = {}
    for idx in micro_batches:
        batch = make_batch([items[i] for i in idx])
        for name, fn in models.items():
            values = fn(batch)  # (B, Tb)
            if name not in out:
                out[name] = torch.zeros(len(items), T, dtype=values.dtype, device=values.device)
            out[name][idx, : values.shape[1]] = values
    return out


def write_samples(path: str, step: int, prompts, rollout, total, parts, k: int) -> None:
    """k completions of the step spread over its prompts, with prompt, answer and reward parts, as JSON lines."""
    n = len(rollout.texts)
    with open(path, "a") as f:
        for i in range(0, n, max(1, n // k))[:k]:
            p = prompts[rollout.prompt_index[i]]
            row = {"step": step, "prompt": p.text, "completion": rollout.texts[i], "answer": p.sample.answer, "reward": total[i]}
            row.update({f"reward/{name}": v[i] for name, v in parts.items()})
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# The run's state: set-up builds it, each step hands it to the next, resume restores it, save writes it
# ---------------------------------------------------------------------------------------------


@dataclass
class RunState:
    """A run: what set-up builds once (config, ranks, models, engine, data), then the progress that
    each step updates and every checkpoint saves."""

    cfg: DictConfig
    run_dir: str
    rank: int
    world: int
    device: torch.device
    # models: the policy trains (fp32 master weights, compute in model.dtype under autocast); the
    # reference (KL) is frozen; the critic (estimator=gae) trains beside the policy
    policy: torch.nn.Module
    tokenizer: object
    image_processor: object
    reference: Optional[torch.nn.Module]
    critic: Optional[torch.nn.Module]
    engine: object  # the rollout engine (rollout.py): samples from the policy's weights after each sync
    pool: object  # the reward workers (rewards.py)
    samples: list  # the training prompts (data.py Sample)
    total_steps: int
    updates_per_step: int  # optimizer steps per RL step: ppo_epochs x mini-batches
    banned_ids: torch.Tensor  # vision tokens, never sampled or scored
    dtype: torch.dtype  # model.dtype: compute, the reference's weights, HF checkpoints
    # by model name ("policy", "critic"): (trainable params, AdamW, schedule), and the DeepSpeed
    # engines that wrap them when trainer.zero_stage > 0 (none otherwise)
    optimizers: Dict[str, tuple] = field(default_factory=dict)
    ds_engines: Dict[str, object] = field(default_factory=dict)
    # progress, in every checkpoint
    step: int = 0  # steps done
    batches_used: int = 0  # prompt batches drawn (dynamic sampling draws extra ones): the data position
    kl_coef: float = 0.0  # the KL coefficient now (algo.kl_target adapts it)
    bad_steps: int = 0  # steps in a row with a skipped, non-finite update
    history: List[Dict[str, float]] = field(default_factory=list)  # every step's metrics
    wandb_id: Optional[str] = None
    wandb_run: object = None
    batches: Optional[Iterator[List[int]]] = None  # the prompt batches from batches_used on


PROGRESS = ("step", "batches_used", "kl_coef", "bad_steps", "history", "wandb_id")  # saved as they are
OPTIMIZER_KEYS = {"policy": "", "critic": "critic_"}  # their optimizer/schedule keys in STATE_FILE


def autocast(state: RunState):
    return autocast_ctx(state.device, str(state.cfg.model.dtype))


def make_batch(state: RunState, pairs) -> dict:
    """The model inputs of (prompt, completion ids) pairs: packed into one row, or padded rows."""
    t, pad_id = state.cfg.trainer, state.tokenizer.pad_token_id
    if t.packing:
        batch = pack(pairs, state.policy, pad_id, state.device, t.share_prompts)
    else:
        batch = collate(pairs, pad_id, image_token_id(state.policy), state.device)
    # under ZeRO-3 on several ranks every rank runs the vision tower (hidden_states): its weights are gathered collectively
    return batch | {"dummy_vision": t.zero_stage == 3 and state.world > 1}


def logps(state: RunState, model, batch, **kw) -> torch.Tensor:
    """(B, Tb) log-probs of the completion tokens, at the sampling temperature, vision tokens banned."""
    return sequence_logps(model, batch, state.cfg.rollout.temperature, state.cfg.trainer.logp_chunk_size, state.banned_ids, **kw)


# ---------------------------------------------------------------------------------------------
# Set-up and resume
# ---------------------------------------------------------------------------------------------


def setup(cfg: DictConfig, run_dir: str) -> RunState:
    """Check the config (what can fail does so before any model loads), start the ranks, load the
    models, the data and the rollout engine, build the optimizers (under DeepSpeed at zero_stage > 0)."""
    validate(cfg)
    t, r, a = cfg.trainer, cfg.rollout, cfg.algo
    set_cpu_threads(t.threads)
    for name in cfg.reward.weights:
        resolve(name)  # unknown reward names fail now, not after the model has loaded
    model_path = resolve_model_path(cfg.model.path)  # a missing model fails now, with how to get it,
    model_identity(cfg.model, model_path)  # and so does a checkpoint of another model (a debug run's)
    if r.engine == "vllm" and (problem := check_vllm()):  # so does a missing vLLM
        raise ConfigError(problem)
    if t.zero_stage > 0 and pick_device(t.device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU backend (gloo), for tests and debugging
    rank, world, device = init_distributed(t.device, always=t.zero_stage > 0)
    run_dir = shared_run_dir(run_dir)
    if r.prompts_per_step % world:
        raise ConfigError(f"rollout.prompts_per_step={r.prompts_per_step} must divide among {world} ranks")
    online = "football" in cfg.eval.benchmarks and cfg.eval.football.setting == "online" and cfg.eval.every > 0
    if online and world > 1 and r.engine == "hf" and t.zero_stage == 3:  # refused now, not after hours at the first eval
        raise ConfigError(
            "eval.every with Football Online on several ranks under rollout.engine=hf and trainer.zero_stage=3: its "
            "decode gathers weights in lockstep with every rank, and each rank's episodes take different numbers of "
            "turns. Use rollout.engine=vllm (each rank samples alone), or evaluate Football after training with eval.py"
        )
    if t.packing and uses_varlen_kernels(device) and str(cfg.model.dtype) == "float32":
        raise ConfigError(
            "model.dtype=float32 with packed attention on a GPU: its FlashAttention varlen kernels take fp16 / bf16 only. "
            "Use model.dtype=bfloat16 (fp32 master weights, bf16 autocast) or trainer.packing=false"
        )
    if device.type == "cuda" and t.memory_check:  # a run that cannot fit stops before any weight loads
        if problem := memory_shortfall(cfg, meta_model(cfg.model, model_path), world, *torch.cuda.mem_get_info(device)):
            raise ConfigError(problem)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        write_run_info(run_dir, cfg)

    policy, tokenizer, image_processor = load_policy(cfg.model, t.seed, device)
    policy.float()  # fp32 master weights; compute runs in model.dtype under autocast
    pool = reward_pool(cfg.reward.workers)
    samples = load_samples(cfg, tokenizer, image_processor, pool)
    dtype = getattr(torch, str(cfg.model.dtype))
    reference = frozen_copy(policy, dtype) if a.kl_coef > 0 else None  # in the compute dtype, not an fp32 copy
    critic = None
    if a.estimator == "gae":  # a value head on a copy of the policy's backbone, or of algo.critic_path's
        source = load_policy(OmegaConf.merge(cfg.model, {"path": a.critic_path}), t.seed, device)[0] if a.critic_path else policy
        critic = Critic(source).float()
    n_samples = r.prompts_per_step * r.group_size
    total_steps = t.max_steps if t.max_steps > 0 else t.episodes * steps_per_epoch(len(samples), r.prompts_per_step)
    banned_ids = torch.tensor(tokenizer.convert_tokens_to_ids(VISION_TOKENS), device=device)
    state = RunState(cfg, run_dir, rank, world, device, policy, tokenizer, image_processor, reference, critic, None, pool,
                     samples, total_steps, a.ppo_epochs * (n_samples // t.mini_batch_size), banned_ids, dtype, kl_coef=a.kl_coef)  # fmt: skip
    build_optimizers(state)  # under ZeRO-3 DeepSpeed partitions the models here, which load whole on every GPU
    # after the partitioning: vLLM's start-up takes its share of a GPU that no longer holds whole models
    # (the tiny preset, which vLLM loads from a copy written now, is gathered for it)
    with gathered_weights(policy) if model_path is None else nullcontext():
        state.engine = make_engine(cfg, policy, tokenizer, image_processor, model_path, run_dir)
    return state


def load_samples(cfg: DictConfig, tokenizer, image_processor, pool) -> list:
    """The training prompts; rows whose gold answer no reward can check are skipped and counted."""
    names = list(cfg.reward.weights)

    def gold_check(rows):
        return gold_problems(pool, [s.reward_row() for s in rows], names, cfg.reward.timeout_s)

    samples, skipped = load_dataset(cfg.data, cfg.trainer.seed, tokenizer, image_processor, gold_check)
    if main_rank():
        print(f"[data] {len(samples)} prompts" + (f", skipped {sum(skipped.values())}: {dict(skipped)}" if skipped else ""))
    return samples


def build_optimizers(state: RunState) -> None:
    """AdamW and its schedule for the policy (and the critic), stepped once per mini-batch; under
    ZeRO each model goes into a DeepSpeed engine with them (the reference too at stage 3, sharded)."""
    t, cfg = state.cfg.trainer, state.cfg
    trained = {"policy": (state.policy, t.lr)}
    if state.critic is not None:
        trained["critic"] = (state.critic, cfg.algo.critic_lr)
    for name, (model, lr) in trained.items():
        params = [p for p in model.parameters() if p.requires_grad]  # (a frozen vision tower has none to step)
        state.optimizers[name] = (params, *adamw_with_schedule(params, lr, t, state.total_steps * state.updates_per_step))
    if t.zero_stage > 0:
        bf16 = str(cfg.model.dtype) == "bfloat16"
        for name, (model, _) in trained.items():
            state.ds_engines[name] = deepspeed_engine(model, *state.optimizers[name][1:], t, bf16)
        if state.reference is not None and t.zero_stage == 3:
            deepspeed_engine(state.reference, None, None, t, bf16)  # forward only


def resume(state: RunState) -> None:
    """Continue from this run dir's newest checkpoint (a requeued job) or trainer.resume_from: weights,
    optimizers, schedules, RNG, progress and the data position; the engine then samples from the
    restored weights. The reference stays the starting policy. Log lines written after that
    checkpoint (all of them, on a fresh start) are dropped: the run writes them again."""
    checkpoint, saved = resume_point(state.run_dir, state.cfg.trainer.resume_from)
    if checkpoint is not None:
        if state.ds_engines:  # DeepSpeed restores its modules, optimizer partitions and schedules itself
            for name, ds_engine in state.ds_engines.items():
                ds_engine.load_checkpoint(checkpoint, tag=name)
        else:
            load_weights(checkpoint, state.policy, state.critic)
            for name, (_, optimizer, schedule) in state.optimizers.items():
                optimizer.load_state_dict(saved[f"{OPTIMIZER_KEYS[name]}optimizer"])
                schedule.load_state_dict(saved[f"{OPTIMIZER_KEYS[name]}schedule"])
        set_rng_state(saved["rng"])
        for key in PROGRESS:
            setattr(state, key, saved[key])
        if main_rank():
            print(f"[resume] {checkpoint}: continuing at step {state.step + 1} of {state.total_steps}")
        state.engine.sync_weights(state.policy)
    if main_rank():
        rewrite_logs(state.run_dir, state.step)
    cfg = state.cfg
    state.batches = prompt_batches(len(state.samples), cfg.rollout.prompts_per_step, cfg.trainer.seed, cfg.data.shuffle)
    for _ in range(state.batches_used):  # the data order continues where the checkpoint left it
        next(state.batches)


def save(state: RunState) -> None:
    """checkpoints/step_<state.step>: weights, progress, RNG and (without DeepSpeed, which saves its
    own partitions) the optimizers and schedules."""
    saved = {key: getattr(state, key) for key in PROGRESS} | {"rng": rng_state()}
    if not state.ds_engines:
        for name, (_, optimizer, schedule) in state.optimizers.items():
            saved |= {
                f"{OPTIMIZER_KEYS[name]}optimizer": optimizer.state_dict(),
                f"{OPTIMIZER_KEYS[name]}schedule": schedule.state_dict(),
            }
    save_training_state(state.run_dir, state.step, saved, state.policy, state.tokenizer, state.image_processor, state.critic,
                        state.cfg.trainer.keep_last, state.ds_engines, state.dtype)  # fmt: skip


def open_wandb(state: RunState) -> None:
    cfg = state.cfg
    if cfg.log.wandb != "disabled" and main_rank():
        import wandb

        state.wandb_run = wandb.init(
            project=cfg.log.project,
            name=os.path.basename(os.path.normpath(state.run_dir)),
            dir=state.run_dir,
            mode=str(cfg.log.wandb),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
            id=state.wandb_id,
            resume="allow" if state.wandb_id else None,
        )
    state.wandb_id = state.wandb_run.id if state.wandb_run is not None else None


# ---------------------------------------------------------------------------------------------
# The RL step, phase by phase
# ---------------------------------------------------------------------------------------------


@dataclass
class Experience:
    """One step's scored samples on this rank: N = its samples (its prompts x group_size, a prompt's
    group consecutive), T = its longest completion."""

    scored: Scored
    items: list  # (N,) (prompt, completion ids), a group's samples sharing one Prompt object
    lengths: torch.Tensor  # (N,) completion tokens
    mask: torch.Tensor  # (N, T) real completion tokens
    keep: torch.Tensor  # (N,) bool: in the loss (DAPO's algo.mask_truncated leaves truncated ones out)
    sampler_logp: Optional[torch.Tensor]  # (N, T) the engine's log-probs of the sampled tokens
    every_rank: List[dict]  # each rank's rewards, counts and lengths, in rank order (for the loss norms and logs)
    loss_lengths: List[int]  # (N_global,) tokens each sample adds to the loss, in rank order


def rollout(state: RunState, step: int) -> Experience:
    """Sample this rank's share of the step's prompts, group_size completions each, and score them.
    DAPO's dynamic sampling: groups whose rewards all agree teach nothing, so they are refilled from
    fresh prompts, up to algo.max_sampling_rounds, every rank sampling while any rank has one."""
    r, a = state.cfg.rollout, state.cfg.algo
    per_rank = r.prompts_per_step // state.world
    mine = range(state.rank * per_rank, (state.rank + 1) * per_rank)  # positions in the step's prompt batch
    scored = sample_and_score(state, next(state.batches), step, 0, mine)
    state.batches_used += 1
    for round_ in range(1, a.max_sampling_rounds if a.dynamic_sampling else 1):
        if not any_rank(has_flat_group(scored.total, r.group_size)):
            break
        scored = replace_flat_groups(scored, sample_and_score(state, next(state.batches), step, round_, mine), r.group_size)
        state.batches_used += 1

    rollout = scored.rollout
    items = [(scored.prompts[p], c) for p, c in zip(rollout.prompt_index, rollout.completion_ids)]
    lengths = torch.tensor([len(c) for c in rollout.completion_ids])  # (N,)
    T = max(1, int(lengths.max()))
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(state.device)  # (N, T)
    sampler_logp = None if rollout.logprobs is None else right_pad(rollout.logprobs, T, state.device)  # (N, T)
    keep = ~torch.tensor(rollout.truncated) if a.mask_truncated else torch.ones(len(items), dtype=torch.bool)  # (N,)
    mine_logged = {"loss_lengths": (lengths * keep).tolist(), "total": scored.total, "parts": scored.parts,
                   "failures": dict(scored.failures), "truncated": rollout.truncated, "vision_cut": scored.vision_cut,
                   "lengths": lengths.tolist(), "prompt_tokens": sum(len(p.input_ids) for p in scored.prompts)}  # fmt: skip
    every_rank = gather(mine_logged)
    loss_lengths = [n for rk in every_rank for n in rk["loss_lengths"]]
    return Experience(scored, items, lengths, mask, keep, sampler_logp, every_rank, loss_lengths)


def sample_and_score(state: RunState, batch_ids: List[int], step: int, round_: int, mine: range) -> Scored:
    """This rank's share (`mine`) of a prompt batch: generated with a seed per prompt (the same
    samples at any world size), cut before sampled vision tokens, scored."""
    t_start = time.time()
    r = state.cfg.rollout
    prompts = [encode_prompt(state.samples[batch_ids[k]], state.tokenizer, state.image_processor) for k in mine]
    seeds = [derive_seed(state.cfg.trainer.seed, step, "rollout", round_, k) for k in mine]
    with autocast(state), gathered_weights(state.policy) if r.engine == "hf" else nullcontext():  # HF samples the module
        rollout = state.engine.generate(prompts, r.group_size, seeds)
    vision_cut = cut_vision_tokens(rollout, state.banned_ids.tolist())
    t_generated = time.time()
    rows = [prompts[p].sample.reward_row() for p in rollout.prompt_index]
    total, parts, failures = score(state.pool, rollout.texts, rows, dict(state.cfg.reward.weights), state.cfg.reward.timeout_s)
    return Scored(prompts, rollout, total, parts, failures, vision_cut, t_generated - t_start, time.time() - t_generated)


@dataclass
class Advantages:
    """What the update needs beside the samples, all (N, T) but `shaping` (N,)."""

    advantages: torch.Tensor
    returns: Optional[torch.Tensor]  # the value model's targets (estimator=gae)
    old_logp: Optional[torch.Tensor]  # the sampling policy's log-probs (None: one update, taken from it)
    ref_logp: Optional[torch.Tensor]  # the reference's (KL)
    old_values: Optional[torch.Tensor]  # the critic's (gae)
    kl_reward: Optional[torch.Tensor]  # the KL charged in the reward (algo.kl_in_reward)
    shaping: Optional[torch.Tensor]  # DAPO's overlong penalty added to each reward


def advantages(state: RunState, exp: Experience) -> Advantages:
    """Token advantages: the rewards with DAPO's overlong penalty, one no-grad pass of the old
    policy, the reference and the critic over the samples, the KL in the reward, the estimator."""
    a, r, t = state.cfg.algo, state.cfg.rollout, state.cfg.trainer
    rewards = torch.tensor(exp.scored.total, device=state.device)  # (N,)
    shaping = None
    if a.overlong_buffer > 0:  # completions near the token limit pay for their length
        shaping = overlong_penalty(exp.lengths, r.max_new_tokens, a.overlong_buffer, a.overlong_penalty).to(state.device)
        rewards = rewards + shaping
    # Before the first update the trainer's log-probs are the sampling policy's: with one update per
    # rollout old_logp = logp.detach() and that pass is skipped.
    models = {}
    if state.updates_per_step > 1 or (a.kl_in_reward and state.reference is not None):
        models["old_logp"] = partial(logps, state, state.policy)
    if state.reference is not None:
        models["ref_logp"] = partial(logps, state, state.reference)
    if state.critic is not None:
        models["values"] = partial(sequence_values, state.critic)
    with autocast(state):
        micro = [idx for idx, _ in in_step(micro_batches(list(range(len(exp.items))), exp.items, t))]
        pre = rollout_forward(models, exp.items, exp.mask.shape[1], micro, partial(make_batch, state))
    old_logp, ref_logp, old_values = pre.get("old_logp"), pre.get("ref_logp"), pre.get("values")
    kl_reward = None
    if a.kl_in_reward and ref_logp is not None:
        kl_reward = kl_penalty(old_logp, ref_logp, str(a.kl_estimator)) * exp.mask  # (N, T)
    adv, returns = token_advantages(a, rewards, exp.mask, r.group_size, kl_reward, old_values, state.kl_coef)
    return Advantages(adv, returns, old_logp, ref_logp, old_values, kl_reward, shaping)


def update(state: RunState, exp: Experience, adv: Advantages, step: int) -> Dict[str, torch.Tensor]:
    """algo.ppo_epochs passes over the step's samples in mini-batches of trainer.mini_batch_size, one
    optimizer step each. Mini-batches are drawn over global sample ids, so they are the same at any
    world size; each rank runs its part of one as micro-batches. Returns this rank's statistics,
    summed over the updates (float64 scalars, so the loop never waits for the device), and the
    gradient norm of each update under "grad_norms"."""
    a, t = state.cfg.algo, state.cfg.trainer
    n_local = len(exp.items)
    state.policy.train()
    stats = defaultdict(lambda: torch.zeros((), dtype=torch.float64, device=state.device))
    norms = []
    for epoch in range(a.ppo_epochs):
        unit = state.cfg.rollout.group_size if t.shuffle == "group" else 1
        order = shuffled(n_local * state.world, unit, torch.Generator().manual_seed(derive_seed(t.seed, step, epoch)))
        for mini in chunks(order, t.mini_batch_size):
            mine, norm_by = local_weights(state, exp, mini)
            micro = in_step(micro_batches(mine, exp.items, t))
            for k, (idx, real) in enumerate(micro):
                micro_batch_backward(state, exp, adv, idx, 1.0 if real else 0.0, k + 1 == len(micro), norm_by, stats)
            norm = optimizer_update(state, "policy")
            if state.critic is not None:
                norm += optimizer_update(state, "critic")
            norms.append(norm)
    return dict(stats) | {"grad_norms": norms}


def local_weights(state: RunState, exp: Experience, mini: List[int]) -> Tuple[List[int], tuple]:
    """This rank's samples of mini-batch `mini` (global ids, in its order) as local ids, and
    (the loss weight of every local sample, (n_local,) with 0 outside the mini-batch, the mini-batch's
    loss tokens): the weights are sequence_weights over the whole mini-batch."""
    a, n_local = state.cfg.algo, len(exp.items)
    offset = state.rank * n_local
    lengths = [exp.loss_lengths[g] for g in mini]
    every = sequence_weights(lengths, str(a.loss_agg), a.loss_chunk, state.cfg.rollout.max_new_tokens)
    mine = [(g - offset, w) for g, w in zip(mini, every) if offset <= g < offset + n_local]
    weights = torch.zeros(n_local, dtype=torch.float32, device=state.device)
    weights[[i for i, _ in mine]] = torch.tensor([w for _, w in mine], dtype=torch.float32, device=state.device)
    return [i for i, _ in mine], (weights, max(1, sum(lengths)))


def micro_batch_backward(state, exp, adv, idx: List[int], weight: float, boundary: bool, norm_by, stats) -> None:
    """Forward and backward of one micro-batch (samples `idx`; weight 0: a filler pass of in_step):
    the clipped policy loss (TIS-weighted), the KL term, the entropy bonus, and the critic's clipped
    value loss, each as its share of the mini-batch mean; adds those shares to `stats`."""
    a = state.cfg.algo
    batch = make_batch(state, [exp.items[i] for i in idx])
    m = batch["completion_mask"] & exp.keep[idx].to(state.device)[:, None]  # (B, Tb) tokens in the loss
    Tb = m.shape[1]
    weights, num_tokens = norm_by
    agg = partial(aggregate, mask=m, weights=weights[idx])
    with autocast(state):
        logp, entropy = logps(state, state.policy, batch, with_entropy=True, entropy_grad=a.entropy_coef > 0)  # (B, Tb)
    old = adv.old_logp[idx, :Tb] if adv.old_logp is not None else logp.detach()
    token_loss, clipped = policy_loss(logp, old, adv.advantages[idx, :Tb], a.clip_low, a.clip_high, a.dual_clip)
    if exp.sampler_logp is not None:
        sampled = exp.sampler_logp[idx, :Tb]
        if adv.old_logp is None:  # the sampler's vs the trainer's log-probs, taken here (see step_metrics)
            stats["logp_gap"] += weight * ((old - sampled).abs() * batch["completion_mask"]).sum().double()
        if a.tis_clip is not None:
            token_loss = token_loss * tis_weights(old, sampled, a.tis_clip)
    loss = agg(token_loss) * weight
    stats["loss/policy"] += loss.detach().double()
    if adv.ref_logp is not None and not a.kl_in_reward:
        kl = agg(kl_penalty(logp, adv.ref_logp[idx, :Tb], str(a.kl_estimator))) * weight
        stats["loss/kl"] += kl.detach().double()
        loss = loss + state.kl_coef * kl
    if a.entropy_coef > 0:  # exploration bonus
        loss = loss - a.entropy_coef * agg(entropy) * weight
    backward(state.ds_engines, "policy", loss, boundary)
    stats["loss/clip_frac"] += weight * (clipped & m).sum().double() / num_tokens
    stats["loss/entropy"] += weight * (entropy.detach() * m).sum().double() / num_tokens
    approx_kl = kl_penalty(logp.detach(), old, "k3")  # how far the update has moved from the sampler
    stats["loss/approx_kl"] += weight * (approx_kl * m).sum().double() / num_tokens
    if state.critic is not None:
        with autocast(state):
            values = sequence_values(state.critic, batch)
        v_loss = agg(value_loss(values, adv.old_values[idx, :Tb], adv.returns[idx, :Tb], a.value_clip)) * weight
        backward(state.ds_engines, "critic", v_loss, boundary)
        stats["loss/value"] += v_loss.detach().double()


def optimizer_update(state: RunState, name: str) -> float:
    """One optimizer step of model `name`; its gradient norm (non-finite: the step was skipped)."""
    return step_optimizer(state.ds_engines, name, *state.optimizers[name], state.cfg.trainer.grad_clip)


def evaluate(state: RunState, step: int) -> Dict[str, float]:
    """eval/<benchmark> accuracies (on rank 0), greedy with the rollout engine, every eval.every steps:
    every rank generates its share of the items (ZeRO-3: with the weights gathered), rank 0 scores."""
    cfg = state.cfg
    if cfg.eval.every <= 0 or (step + 1) % cfg.eval.every:
        return {}
    with gathered_weights(state.policy) if cfg.rollout.engine == "hf" else nullcontext():  # (vLLM has its copy)
        out = os.path.join(state.run_dir, "eval", f"step_{step + 1}")
        results = run_eval(cfg, out, (state.engine, state.tokenizer, state.image_processor))
    return {f"eval/{name}": res["accuracy"] for name, res in results.items()}


def step_metrics(state: RunState, exp: Experience, adv: Advantages, stats: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The step's metrics over every rank (README: Metrics): rewards and their counts, losses (the
    shares summed over ranks, averaged over updates), rollout statistics. Adapts the KL coefficient."""
    r, a, n = state.cfg.rollout, state.cfg.algo, state.cfg.rollout.prompts_per_step * state.cfg.rollout.group_size
    ranks = exp.every_rank
    all_rewards = torch.tensor([x for rk in ranks for x in rk["total"]])  # (N_global,)
    metrics = {
        "step": state.step + 1,
        "reward/mean": all_rewards.mean().item(),
        "reward/std": all_rewards.std().item() if n > 1 else 0.0,
    }
    for name in exp.scored.parts:
        metrics[f"reward/{name}"] = sum(sum(rk["parts"][name]) for rk in ranks) / n
    for kind in REWARD_COUNTS:
        metrics[f"reward/n_{kind}"] = sum(rk["failures"].get(kind, 0) for rk in ranks)
    norms = stats.pop("grad_norms")
    logp_gap = stats.pop("logp_gap", None)
    if stats:  # this rank's shares of the updates' losses: their sums over ranks are the losses
        summed = all_sum(torch.stack(list(stats.values())).cpu()).tolist()
        metrics.update({k: v / state.updates_per_step for k, v in zip(stats, summed)})
    finite = [x for x in norms if math.isfinite(x)]
    if finite:  # (already global)
        metrics["loss/grad_norm"] = sum(finite) / state.updates_per_step
    if adv.kl_reward is not None:  # the KL the rewards were charged
        metrics["loss/kl"] = (all_sum(adv.kl_reward.sum()) / all_sum(exp.mask.sum().float())).item()
    metrics["loss/lr"] = state.optimizers["policy"][2].get_last_lr()[0]
    response_lengths = [x for rk in ranks for x in rk["lengths"]]
    metrics["rollout/response_len"] = sum(response_lengths) / n
    metrics["rollout/response_len_max"] = max(response_lengths)
    metrics["rollout/truncated_frac"] = sum(sum(rk["truncated"]) for rk in ranks) / n
    metrics["rollout/zero_std_groups"] = zero_std_fraction(all_rewards, r.group_size)
    if adv.shaping is not None:
        metrics["reward/overlong"] = all_sum(adv.shaping.sum()).item() / n
    if state.critic is not None:
        metrics["loss/explained_var"] = explained_variance(adv.old_values, adv.returns, exp.mask)
    if a.kl_target is not None:  # adaptive KL: steer the coefficient toward the target KL per token
        state.kl_coef = adaptive_kl_coef(state.kl_coef, metrics.get("loss/kl", 0.0), a.kl_target, a.kl_horizon, n)
        metrics["loss/kl_coef"] = state.kl_coef
    metrics["rollout/vision_token_cut"] = sum(rk["vision_cut"] for rk in ranks)
    if exp.sampler_logp is not None:  # the sampler's vs the trainer's log-probs, same weights, per token
        if adv.old_logp is not None:  # (else measured by the update itself, before its optimizer step)
            logp_gap = ((adv.old_logp - exp.sampler_logp).abs() * exp.mask).sum().double()
        metrics["rollout/logp_diff"] = all_sum(logp_gap.cpu()).item() / max(1, sum(response_lengths))
    metrics["rollout/prompt_len"] = sum(rk["prompt_tokens"] for rk in ranks) / r.prompts_per_step
    metrics["rollout/sampling_rounds"] = len(exp.scored.rounds)
    metrics["loss/skipped_updates"] = len(norms) - len(finite)
    return metrics


def log(state: RunState, metrics: Dict[str, float], exp: Experience, bar) -> None:
    """metrics.jsonl, samples.jsonl (every log.samples_every steps), wandb, the progress bar and
    reward_curve.png, by rank 0."""
    cfg, step = state.cfg, metrics["step"] - 1
    state.history.append(metrics)
    if not main_rank():
        return
    with open(os.path.join(state.run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if cfg.log.samples_every > 0 and step % cfg.log.samples_every == 0:
        s = exp.scored
        write_samples(
            os.path.join(state.run_dir, "samples.jsonl"),
            step + 1,
            s.prompts,
            s.rollout,
            s.total,
            s.parts,
            cfg.log.samples_per_step,
        )
    if state.wandb_run is not None:
        state.wandb_run.log(metrics, step=step + 1)
    bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['rollout/response_len']:.0f}")
    if bar.disable and cfg.log.progress and (step == 0 or (step + 1) % cfg.log.print_every == 0 or step + 1 == state.total_steps):
        parts = ", ".join(f"{k} {metrics[f'reward/{k}']:.3f}" for k in exp.scored.parts)
        print(f"[step {step + 1}/{state.total_steps}] reward {metrics['reward/mean']:.3f} ({parts}), "
              f"length {metrics['rollout/response_len']:.0f}, {metrics['perf/step_s']:.1f} s", flush=True)  # fmt: skip
    if step + 1 == state.total_steps or step % 10 == 0:
        plot_rewards(os.path.join(state.run_dir, "reward_curve.png"), state.history)


def check_finite(state: RunState, metrics: Dict[str, float]) -> None:
    """Stop after trainer.max_bad_steps steps in a row with a skipped (non-finite) update."""
    skipped = metrics["loss/skipped_updates"]
    state.bad_steps = state.bad_steps + 1 if skipped else 0
    if state.bad_steps >= state.cfg.trainer.max_bad_steps:
        raise TrainingError(
            f"{state.bad_steps} steps in a row had non-finite loss or gradients (last: step {metrics['step']}, "
            f"{skipped} of {state.updates_per_step} updates skipped); the weights were not changed by those "
            "updates. Lower trainer.lr or check the rewards; the last checkpoint is in checkpoints/."
        )


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def run(cfg: DictConfig, run_dir: str) -> Dict[str, float]:
    """Train with the composed config `cfg`, writing everything into `run_dir`; returns the last metrics."""
    state = setup(cfg, run_dir)
    resume(state)
    open_wandb(state)
    signals = StopSignals()
    bar = tqdm(range(state.step, state.total_steps), total=state.total_steps, initial=state.step, desc=str(cfg.stage.name),
               disable=not (cfg.log.progress and main_rank() and sys.stderr.isatty()), dynamic_ncols=True)  # fmt: skip
    for step in bar:
        t0 = time.time()
        exp = rollout(state, step)  # sample groups (dynamic sampling inside), cut, score
        adv = advantages(state, exp)  # overlong shaping, old/reference/value pass, KL in the reward, estimator
        t1 = time.time()
        stats = update(state, exp, adv, step)  # PPO epochs over mini/micro-batches: loss, KL, entropy, critic
        t2 = time.time()
        state.engine.sync_weights(state.policy)  # the next rollout samples the updated policy
        t3 = time.time()
        eval_scores = evaluate(state, step)  # greedy, every eval.every steps

        metrics = step_metrics(state, exp, adv, stats)
        metrics |= {"perf/rollout_s": exp.scored.rollout_s, "perf/reward_s": exp.scored.reward_s,
                    "perf/update_s": t2 - t1, "perf/sync_s": t3 - t2, "perf/step_s": time.time() - t0}  # fmt: skip
        metrics["perf/tokens_per_s"] = sum(n for rk in exp.every_rank for n in rk["lengths"]) / metrics["perf/step_s"]
        metrics |= eval_scores
        log(state, metrics, exp, bar)
        check_finite(state, metrics)
        state.step = step + 1
        last = state.step == state.total_steps
        stopping = any_rank(signals.received is not None)  # a rank was signalled: all save and stop
        if last or stopping or (cfg.trainer.save_every > 0 and state.step % cfg.trainer.save_every == 0):
            save(state)
        if stopping and not last:
            if state.wandb_run is not None:
                state.wandb_run.finish()
            signals.stop()  # exits (or submitit requeues): a requeued job resumes from this checkpoint
    signals.restore()
    finish(state)
    return state.history[-1]


def finish(state: RunState) -> None:
    """checkpoints/final (the policy as an HF dir in model.dtype, the critic) and the stage's latest_link pointing at it."""
    with gathered_weights(state.policy, state.critic):
        if main_rank():
            final = os.path.join(state.run_dir, "checkpoints", "final")
            save_checkpoint(final, state.policy, state.tokenizer, state.image_processor, state.critic, state.dtype)
            link = latest_link(str(state.cfg.stage.name), state.policy.lmm_r1_identity["tiny"])
            link_latest(link, state.run_dir)
            print(f"[run] done: {os.path.join(os.path.abspath(state.run_dir), 'metrics.jsonl')}, final checkpoint "
                  f"{os.path.abspath(final)} (also {link}/checkpoints/final)", flush=True)  # fmt: skip
    if state.wandb_run is not None:
        state.wandb_run.finish()


def start_ranks_here(cfg: DictConfig, run_dir: str) -> bool:
    """Whether this process started the run's ranks (trainer.devices > 1, no launcher), each this same
    command in this run dir, and waited for them: then it has nothing more to do."""
    from hydra.core.hydra_config import HydraConfig
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    validate(cfg)  # a bad config fails once, here, not once per rank
    try:
        n = ranks_to_start(cfg.trainer.devices, cfg.trainer.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if n <= 1:
        return False
    quoted = "'" + run_dir.replace("'", "\\'") + "'"  # Hydra's quoting: a path may hold = , or spaces
    try:
        start_ranks(n, [os.path.abspath(__file__), *HydraConfig.get().overrides.task, f"hydra.run.dir={quoted}"])
    except ChildFailedError as e:
        failed = ", ".join(f"rank {rank} exited with {f.exitcode}" for rank, f in e.failures.items())
        raise TrainingError(f"{failed} (its output is above)") from None
    except SignalException as e:  # passed on to the ranks, which saved at the end of their step: exit as they do
        sys.exit(128 + e.sigval)
    return True


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = HydraConfig.get().runtime.output_dir
    quiet_progress_bars()
    with console_log(os.path.join(run_dir, "train.log")):
        try:
            if start_ranks_here(cfg, run_dir):
                return
            if launch_rank() == 0:  # (torchrun's or SLURM's ranks: rank 0 speaks)
                print(
                    f"[run] {os.path.abspath(run_dir)}: config.yaml, metrics.jsonl, samples.jsonl, train.log, checkpoints/",
                    flush=True,
                )
            run(cfg, run_dir)
        except (ConfigError, BadRow, FileNotFoundError, TrainingError) as e:  # the message is the help
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        finally:
            release_process_groups()


if __name__ == "__main__":
    main()
