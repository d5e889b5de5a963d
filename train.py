"""LMM-R1 rule-based RL: rollout -> reward -> advantage -> policy update -> sync, as one loop.

    python train.py stage=mgt_geo trainer.lr=1e-6            # a stage of the paper
    python train.py debug=tiny                                # the embedded tiny model on CPU
    python train.py -m stage=fre_text,mgt_geo debug=tiny      # a sweep

The pure algorithm functions (advantages, losses, KL) come first; main(cfg) below reads top-down.
Shapes: N = samples in a rollout (prompts_per_step * group_size), B = samples in a micro-batch,
T = completion tokens (right-padded; `completion_mask` marks real tokens).
"""

import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Tuple

import hydra
import numpy as np
import safetensors  # (not its safe_open: a SLURM job unpickles train.py's globals, and that class does not pickle)
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import config  # noqa: F401  (registers the schema with Hydra's ConfigStore)
from config import ConfigError, validate
from data import BadRow, encode_prompt, load_dataset, prompt_batches, steps_per_epoch
from eval import run_eval
from model import (
    VISION_TOKENS,
    Critic,
    collate,
    frozen_copy,
    image_token_id,
    load_policy,
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
    A group whose rewards are all equal gets advantage 0 under every estimator.
    """
    r = rewards.float().view(-1, group_size)  # (P, G)
    centered = r - r.mean(dim=1, keepdim=True)
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


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards all agree: they carry no group-relative signal."""
    r = rewards.view(-1, group_size)
    return (r.max(dim=1).values == r.min(dim=1).values).float().mean().item()


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


def aggregate(token_values, mask, mode: str, num_tokens: int, num_seqs: int, max_len: int) -> torch.Tensor:
    """Reduce (B, T) per-token values of one micro-batch to its share of the mini-batch loss.

    The normalisers are global (the whole mini-batch, every micro-batch), so summing the shares of
    all micro-batches gives the same loss however the mini-batch is split.
    token_mean:              sum over tokens / num_tokens
    seq_mean_token_mean:     sum over sequences of (token mean) / num_seqs
    seq_mean_token_sum_norm: sum over tokens / (num_seqs * max_len)   (Dr. GRPO's constant normaliser)
    """
    masked = token_values * mask
    if mode == "token_mean":
        return masked.sum() / num_tokens
    if mode == "seq_mean_token_mean":
        return (masked.sum(1) / mask.sum(1).clamp_min(1)).sum() / num_seqs
    if mode == "seq_mean_token_sum_norm":
        return masked.sum() / (num_seqs * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}")


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
# Data parallel: ranks split each step's prompts (a prompt's whole group on one rank)
# ---------------------------------------------------------------------------------------------


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed(device_name: str, always: bool = False) -> Tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK (under
    cluster=slurm, submitit's tasks derive them from SLURM's); the process group starts once, gloo on
    CPU and nccl on GPUs. A single process is (0, 1, device),
    with a one-rank group when `always` (DeepSpeed needs one)."""
    device = pick_device(device_name)
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "WORLD_SIZE" not in os.environ:
        import submitit  # a task of cluster=slurm: its SLURM rank, world and master become torch's

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if always:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if (always or int(os.environ.get("WORLD_SIZE", "1")) > 1) and not distributed():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not distributed():
        return 0, 1, device
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_max(n: int) -> int:
    if not distributed():
        return n
    x = torch.tensor(n)
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return int(x)


def in_step(micro: List[List[int]]) -> List[Tuple[List[int], bool]]:
    """(indices, real) micro-batches, padded with zero-weight repeats of the first one so that every
    rank runs as many forward/backward passes as the busiest: ZeRO's gathers and reductions are
    collective, and a rank that stopped early would hang the others."""
    micro = [m for m in micro if m]
    n = all_max(len(micro))
    filler = micro[0] if micro else [0]
    return [(idx, True) for idx in micro] + [(filler, False)] * (n - len(micro))


def deepspeed_engine(model, optimizer, schedule, t, bf16: bool):
    """`model` under DeepSpeed ZeRO `t.zero_stage` (with our optimizer and schedule, or none for a
    frozen model), gradients averaged across ranks, clipping done by DeepSpeed."""
    import deepspeed

    zero = {"stage": t.zero_stage}
    if t.offload in ("optimizer", "all") and optimizer is not None:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.offload == "all":
        zero["offload_param"] = {"device": "cpu"}
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # the loop marks the boundaries itself (micro-batch counts vary)
        "gradient_clipping": t.grad_clip if optimizer is not None else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # our AdamW also with offload: the same numbers as without
        "steps_per_print": 1 << 30,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    return engine


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over ranks (`x` itself in a single process)."""
    if distributed():
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def gather(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (small Python objects: lists of rewards, counts)."""
    if not distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def sync_gradients(params) -> None:
    """Each rank's loss is its share of the global mean (normalised by global token counts), so the
    full gradient is the sum of the ranks' gradients: all-reduce them before the optimizer step."""
    if distributed():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)


# ---------------------------------------------------------------------------------------------
# Checkpoints: the whole training state, written atomically, so a resumed run is the same run
# ---------------------------------------------------------------------------------------------

STATE_FILE = "trainer_state.pt"  # beside the weights of checkpoints/step_N: optimizers, schedules, RNG, history


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite updates); the message says why and what is kept."""


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain containers (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached], "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def publish(tmp: str, final: str) -> None:
    """Move a fully written checkpoint into place: a crash before this leaves the previous one intact."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


def step_checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """(step, path) of the complete step checkpoints of a run dir, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if name.startswith("step_") and name[5:].isdigit() and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(name[5:]), path))
    return sorted(found)


def save_training_state(run_dir: str, step: int, state: dict, policy, tokenizer, image_processor, critic, keep_last: int,
                        engines: Dict[str, object]) -> str:  # fmt: skip
    """checkpoints/step_<step>: the policy as a loadable HF dir (safetensors), the critic, `state`
    (optimizers, schedules, RNG, history) and, under DeepSpeed, each engine's own sharded checkpoint
    (every rank writes its part); then only the newest `keep_last` are kept. Rank 0 writes the rest."""
    root = os.path.join(run_dir, "checkpoints")
    tmp, final = os.path.join(root, f".tmp_step_{step}"), os.path.join(root, f"step_{step}")
    main_rank = not distributed() or torch.distributed.get_rank() == 0
    if main_rank:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    for name, ds_engine in engines.items():
        ds_engine.save_checkpoint(tmp, tag=name)  # optimizer partitions, schedule, module: collective
    with gathered_weights(policy, critic):  # ZeRO-3 shards gathered for the HF copy
        if main_rank:
            save_checkpoint(tmp, policy, tokenizer, image_processor, critic)
            torch.save(state, os.path.join(tmp, STATE_FILE))
    barrier()
    if main_rank:
        publish(tmp, final)
        for _, old in step_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def barrier() -> None:
    if distributed():
        torch.distributed.barrier()


def gathered_weights(*models):
    """A context in which ZeRO-3-sharded parameters are whole (nothing to do for other models)."""
    params = [p for m in models if m is not None for p in m.parameters()]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return nullcontext()


def load_training_state(checkpoint: str) -> dict:
    """`checkpoint`'s training state, once every file of it has been read back: a truncated or
    corrupt file raises here, before anything is loaded into the models. Safetensors headers are
    checked against their file's size, torch archives (DeepSpeed's shards) for their index, JSON
    files parsed, and the state itself loaded in full (tensors and plain data only)."""
    for root, _, names in os.walk(checkpoint):
        for name in names:
            path = os.path.join(root, name)
            if name.endswith(".safetensors"):
                with safetensors.safe_open(path, "pt"):
                    pass
            elif name.endswith((".pt", ".bin")):
                zipfile.ZipFile(path).close()
            elif name.endswith(".json"):
                with open(path) as f:
                    json.load(f)
    return torch.load(os.path.join(checkpoint, STATE_FILE), weights_only=True)


def resume_point(run_dir: str, resume_from: Optional[str]) -> Tuple[Optional[str], Optional[dict]]:
    """The checkpoint to continue from and its training state: trainer.resume_from (a step dir, or a
    run dir's newest that loads), else this run dir's newest that loads (a requeued SLURM job reuses
    its dir), else (None, None) for a fresh start. One that does not load is skipped with a warning;
    this run's own is also renamed step_N.unloadable-<time>, kept for inspection, so that a requeued
    job does not trip on it again."""
    if resume_from and os.path.isfile(os.path.join(resume_from, STATE_FILE)):
        candidates = [resume_from]
    else:
        candidates = [path for _, path in reversed(step_checkpoints(resume_from or run_dir))]
        if resume_from and not candidates:
            raise FileNotFoundError(f"trainer.resume_from={resume_from}: no checkpoints/step_N with {STATE_FILE} there")
    main_rank = not distributed() or torch.distributed.get_rank() == 0
    for path in candidates:
        try:
            return path, load_training_state(path)
        except pickle.UnpicklingError:
            raise  # a state that carries code is refused, not skipped
        except Exception as e:  # truncated, corrupt, unreadable: whatever keeps it from loading
            problem = f"{type(e).__name__}: {e}"
        kept = path
        if not resume_from and main_rank:
            kept = f"{path}.unloadable-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(path, kept)
        if main_rank:
            print(f"[resume] warning: {path} cannot be loaded ({problem}); kept as {kept}, trying the one before", flush=True)
    if resume_from:
        raise TrainingError(f"trainer.resume_from={resume_from}: no checkpoint there can be loaded (see the warnings above)")
    return None, None


def rewrite_logs(run_dir: str, step: int) -> None:
    """Drop log lines of steps after `step` (written after the checkpoint, before the run stopped):
    the resumed run writes them again, identically."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(path, "w") as f:
                f.writelines(lines)


class StopSignals:
    """SIGTERM (preemption), SIGUSR1/SIGUSR2 (SLURM's and submitit's warning before the time limit):
    remember the signal, let the loop save at the end of the step, then hand over to whoever
    handled it before (submitit requeues the job) or exit with 128 + signal number."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: Optional[int] = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        self.received = signum
        print(f"[signal] {signal.Signals(signum).name}: saving at the end of this step, then stopping", flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def stop(self) -> None:
        """After the checkpoint is written: the previous handler (submitit's requeue), else exit.
        (A rank that got no signal itself stops with its peers, as if it had had SIGTERM.)"""
        sig = self.received or signal.SIGTERM
        previous = self.previous.get(sig)
        self.restore()
        if callable(previous):
            previous(sig, None)
        sys.exit(128 + sig)


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
# Run
# ---------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


# rewards.score's counts logged as reward/<kind>: why completions scored 0, and replaced reward workers
REWARD_COUNTS = ("errors", "timeouts", "malformed", "worker_restarts")


def plot_rewards(path: str, history: List[Dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    counts = {f"reward/{kind}" for kind in REWARD_COUNTS}
    for key in sorted(k for k in history[-1] if k.startswith("reward/") and k not in counts):
        ax.plot(steps, [m.get(key, float("nan")) for m in history], label=key, lw=2 if key == "reward/mean" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def link_latest(stage: str, run_dir: str) -> None:
    """outputs/<stage>/latest -> this run, so the next stage finds the checkpoint (MGT after FRE-Text)."""
    link = os.path.join("outputs", stage, "latest")
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


def optimizer_step(params, optimizer, schedule, grad_clip: float) -> float:
    """Clip, step, advance the schedule, clear grads; returns the grad norm before clipping. A
    non-finite gradient (a NaN loss, an overflow) skips the step: one bad batch must not poison the
    weights or Adam's moments. The schedule still advances, so it stays tied to the step count."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")).item()
    if math.isfinite(norm):
        optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def micro_batches(indices: List[int], seq_lens: List[int], t) -> List[List[int]]:
    """Samples `indices` split into micro-batches: packed into t.max_tokens_per_micro tokens each
    (first-fit decreasing over their prompt + completion lengths), or t.micro_batch_size padded ones."""
    if not t.packing:
        return chunks(indices, t.micro_batch_size)
    bins = first_fit_decreasing([seq_lens[i] for i in indices], t.max_tokens_per_micro)
    return [[indices[k] for k in b] for b in bins]


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


def run(cfg: DictConfig, run_dir: str) -> Dict[str, float]:
    """Train with the composed config `cfg`, writing everything into `run_dir`; returns the last metrics."""
    validate(cfg)
    t, r, a = cfg.trainer, cfg.rollout, cfg.algo
    for name in cfg.reward.weights:
        resolve(name)  # unknown reward names fail now, not after the model has loaded
    model_path = resolve_model_path(cfg.model.path)  # a missing model fails now, with how to get it
    if r.engine == "vllm" and (problem := check_vllm()):  # so does a missing vLLM
        raise ConfigError(problem)
    if t.zero_stage > 0 and pick_device(t.device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU backend (gloo), for tests and debugging
    rank, world, device = init_distributed(t.device, always=t.zero_stage > 0)
    main_rank = rank == 0  # only rank 0 writes files, logs and checkpoints
    if r.prompts_per_step % world:
        raise ConfigError(f"rollout.prompts_per_step={r.prompts_per_step} must divide among {world} ranks")
    if main_rank:
        os.makedirs(run_dir, exist_ok=True)
        write_run_info(run_dir, cfg)

    # ---- set-up: models, data, engine, optimizers ----
    policy, tokenizer, image_processor = load_policy(cfg.model, t.seed, device)
    policy.float()  # fp32 master weights; compute runs in model.dtype under autocast
    pool = reward_pool(cfg.reward.workers)
    weights = dict(cfg.reward.weights)

    def gold_check(rows):
        return gold_problems(pool, [s.reward_row() for s in rows], list(weights), cfg.reward.timeout_s)

    samples, skipped = load_dataset(cfg.data, t.seed, tokenizer, image_processor, gold_check)
    if main_rank:
        print(f"[data] {len(samples)} prompts" + (f", skipped {sum(skipped.values())}: {dict(skipped)}" if skipped else ""))
    reference = frozen_copy(policy) if a.kl_coef > 0 else None
    critic = None
    if a.estimator == "gae":  # a value head on a copy of the policy's backbone, or of algo.critic_path's
        source = load_policy(OmegaConf.merge(cfg.model, {"path": a.critic_path}), t.seed, device)[0] if a.critic_path else policy
        critic = Critic(source).float()
    engine = make_engine(cfg, policy, tokenizer, image_processor, model_path, run_dir)
    autocast = autocast_ctx(device, str(cfg.model.dtype))
    banned_ids = torch.tensor(tokenizer.convert_tokens_to_ids(VISION_TOKENS), device=device)
    image_token = image_token_id(policy)

    def make_batch(pairs):
        if not t.packing:
            return collate(pairs, tokenizer.pad_token_id, image_token, device)
        # under torch.distributed (ZeRO-3) a micro-batch without images still runs the vision tower
        return pack(pairs, policy, tokenizer.pad_token_id, device) | {"dummy_vision": torch.distributed.is_initialized()}

    def logps(model, batch, **kw):
        return sequence_logps(model, batch, r.temperature, t.logp_chunk_size, banned_ids, **kw)

    n_samples = r.prompts_per_step * r.group_size  # over all ranks; this rank holds n_local from `offset` on
    n_local = n_samples // world
    offset = rank * n_local
    total_steps = t.max_steps if t.max_steps > 0 else t.episodes * steps_per_epoch(len(samples), r.prompts_per_step)
    updates_per_step = a.ppo_epochs * (n_samples // t.mini_batch_size)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer, schedule = adamw_with_schedule(params, t.lr, t, total_steps * updates_per_step)
    if critic is not None:
        critic_params = list(critic.parameters())
        critic_opt, critic_schedule = adamw_with_schedule(critic_params, a.critic_lr, t, total_steps * updates_per_step)
    engines: Dict[str, object] = {}  # DeepSpeed engines by name; empty when zero_stage=0
    if t.zero_stage > 0:
        bf16 = str(cfg.model.dtype) == "bfloat16"
        engines["policy"] = deepspeed_engine(policy, optimizer, schedule, t, bf16)
        if critic is not None:
            engines["critic"] = deepspeed_engine(critic, critic_opt, critic_schedule, t, bf16)
        if reference is not None and t.zero_stage == 3:
            deepspeed_engine(reference, None, None, t, bf16)  # sharded as well, forward only

    def backward(name: str, loss, boundary: bool) -> None:
        """Plain backward, or DeepSpeed's: it averages gradients over ranks, our losses are shares of
        a global mean to be summed, hence the factor; the boundary tells ZeRO when to reduce."""
        if name not in engines:
            loss.backward()
            return
        engines[name].set_gradient_accumulation_boundary(boundary)
        engines[name].backward(loss * world)

    def update(name: str, model_params, opt, sched) -> float:
        """One optimizer step; returns the gradient norm (non-finite: the step was skipped)."""
        if name not in engines:
            sync_gradients(model_params)
            return optimizer_step(model_params, opt, sched, t.grad_clip)
        engines[name].step()
        norm = engines[name].get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    # Before the first update the trainer's log-probs are the sampling policy's: with one update per
    # rollout old_logp = logp.detach() and that forward pass is skipped.
    pre_models = {}
    if updates_per_step > 1 or (a.kl_in_reward and reference is not None):
        pre_models["old_logp"] = lambda b: logps(policy, b)
    if reference is not None:
        pre_models["ref_logp"] = lambda b: logps(reference, b)
    if critic is not None:
        pre_models["values"] = lambda b: sequence_values(critic, b)

    # ---- resume: this run dir's newest checkpoint (a requeued job), or trainer.resume_from ----
    history: List[Dict[str, float]] = []
    start_step, bad_steps, wandb_id, kl_coef, batches_used = 0, 0, None, a.kl_coef, 0
    checkpoint, state = resume_point(run_dir, t.resume_from)
    if checkpoint is not None:
        if engines:  # DeepSpeed restores its modules, optimizer partitions and schedules itself
            for name, ds_engine in engines.items():
                ds_engine.load_checkpoint(checkpoint, tag=name)
        else:
            load_weights(checkpoint, policy, critic)  # the reference stays the starting policy
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            if critic is not None:
                critic_opt.load_state_dict(state["critic_optimizer"])
                critic_schedule.load_state_dict(state["critic_schedule"])
        set_rng_state(state["rng"])
        start_step, bad_steps, history, wandb_id = state["step"], state["bad_steps"], state["history"], state["wandb_id"]
        kl_coef, batches_used = state["kl_coef"], state["batches_used"]
        if main_rank:
            print(f"[resume] {checkpoint}: continuing at step {start_step + 1} of {total_steps}")
        engine.sync_weights(policy)
    if main_rank:  # lines logged after that checkpoint (all, on a fresh start) are written again
        rewrite_logs(run_dir, start_step)

    wandb_run = None
    if cfg.log.wandb != "disabled" and main_rank:
        import wandb

        wandb_run = wandb.init(
            project=cfg.log.project,
            name=os.path.basename(os.path.normpath(run_dir)),
            dir=run_dir,
            mode=str(cfg.log.wandb),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
            id=wandb_id,
            resume="allow" if wandb_id else None,
        )

    batches = prompt_batches(len(samples), r.prompts_per_step, t.seed, cfg.data.shuffle)
    for _ in range(batches_used):  # the data order continues where the checkpoint left it
        next(batches)

    def sample_and_score(batch_ids: List[int], step: int, round_: int, mine: range) -> Scored:
        """This rank's share (`mine`) of a prompt batch: generated with a seed per prompt (the same
        samples at any world size), cut before sampled vision tokens, scored."""
        t_start = time.time()
        prompts = [encode_prompt(samples[batch_ids[k]], tokenizer, image_processor) for k in mine]
        seeds = [derive_seed(t.seed, step, "rollout", round_, k) for k in mine]
        with autocast, gathered_weights(policy) if r.engine == "hf" else nullcontext():  # HF samples the module
            rollout = engine.generate(prompts, r.group_size, seeds)
        vision_cut = cut_vision_tokens(rollout, banned_ids.tolist())
        t_generated = time.time()
        rows = [prompts[p].sample.reward_row() for p in rollout.prompt_index]
        total, parts, failures = score(pool, rollout.texts, rows, weights, cfg.reward.timeout_s)
        return Scored(prompts, rollout, total, parts, failures, vision_cut, t_generated - t_start, time.time() - t_generated)

    signals = StopSignals()
    bar = tqdm(range(start_step, total_steps), total=total_steps, initial=start_step, desc=str(cfg.stage.name),
               disable=not (cfg.log.progress and main_rank), dynamic_ncols=True)  # fmt: skip
    for step in bar:
        t0 = time.time()
        # ---- rollout ----
        per_rank = r.prompts_per_step // world
        mine = range(rank * per_rank, (rank + 1) * per_rank)  # positions in the step's prompt batch

        scored = sample_and_score(next(batches), step, 0, mine)
        batches_used += 1
        for round_ in range(1, a.max_sampling_rounds if a.dynamic_sampling else 1):
            # DAPO's dynamic sampling: groups whose rewards all agree teach nothing; refill them from
            # fresh prompts (every rank samples while any rank still has such a group)
            if all_sum(torch.tensor(float(has_flat_group(scored.total, r.group_size)))).item() == 0:
                break
            scored = replace_flat_groups(scored, sample_and_score(next(batches), step, round_, mine), r.group_size)
            batches_used += 1
        prompts, rollout, total, parts, failures = scored.prompts, scored.rollout, scored.total, scored.parts, scored.failures
        vision_cut, t_rollout, t_reward = scored.vision_cut, scored.rollout_s, scored.reward_s
        items = [(prompts[p], c) for p, c in zip(rollout.prompt_index, rollout.completion_ids)]
        lengths = torch.tensor([len(c) for c in rollout.completion_ids])  # (N,)
        seq_lens = [len(p.input_ids) + len(c) for p, c in items]  # (N,) prompt + completion tokens

        T = max(1, int(lengths.max()))
        mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)  # (N, T)
        sampler_logp = None if rollout.logprobs is None else right_pad(rollout.logprobs, T, device)  # (N, T)

        # ---- reward & advantage ----
        rewards = torch.tensor(total, device=device)  # (N,) this rank's
        if a.overlong_buffer > 0:  # DAPO: completions near the token limit pay for their length
            shaping = overlong_penalty(lengths, r.max_new_tokens, a.overlong_buffer, a.overlong_penalty).to(device)
            rewards = rewards + shaping
        # DAPO: truncated completions take no part in the loss (their tokens are not counted either)
        keep = ~torch.tensor(rollout.truncated) if a.mask_truncated else torch.ones(len(items), dtype=torch.bool)  # (N,)
        ranks = gather([(lengths * keep).tolist(), total, parts, dict(failures), rollout.truncated, vision_cut, lengths.tolist()])
        loss_lengths = [n for rk in ranks for n in rk[0]]  # (N_global,) tokens each sample adds to the loss, in rank order
        with autocast:
            micro = [idx for idx, _ in in_step(micro_batches(list(range(n_local)), seq_lens, t))]
            pre = rollout_forward(pre_models, items, T, micro, make_batch)
        old_logp, ref_logp, old_values = pre.get("old_logp"), pre.get("ref_logp"), pre.get("values")
        kl_reward = None
        if a.kl_in_reward and ref_logp is not None:
            kl_reward = kl_penalty(old_logp, ref_logp, str(a.kl_estimator)) * mask  # (N, T)
        advantages, returns = token_advantages(a, rewards, mask, r.group_size, kl_reward, old_values, kl_coef)
        # the sampler's vs the trainer's log-probs of the same tokens under the same weights: from the
        # old_logp pass if there is one, else from the update itself (one update: all before its step)
        logp_gap = 0.0
        if sampler_logp is not None and old_logp is not None:
            logp_gap = ((old_logp - sampler_logp).abs() * mask).sum().item()

        # ---- policy update ----
        t1 = time.time()
        policy.train()
        stats = defaultdict(float)
        skipped = 0  # updates skipped for a non-finite loss or gradient
        for epoch in range(a.ppo_epochs):
            order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(derive_seed(t.seed, step, epoch))).tolist()
            for mini in chunks(order, t.mini_batch_size):  # global sample ids: the same mini-batches at any world size
                num_tokens, num_seqs = max(1, sum(loss_lengths[g] for g in mini)), len(mini)
                local = [g - offset for g in mini if offset <= g < offset + n_local]
                micro = in_step(micro_batches(local, seq_lens, t))
                for k, (idx, real) in enumerate(micro):
                    boundary = k + 1 == len(micro)
                    batch = make_batch([items[i] for i in idx])
                    m = batch["completion_mask"] & keep[idx].to(device)[:, None]  # (B, Tb)
                    Tb = m.shape[1]
                    # this micro-batch's share of the mini-batch mean of any (B, Tb) per-token value
                    agg = partial(
                        aggregate,
                        mask=m,
                        mode=str(a.loss_agg),
                        num_tokens=num_tokens,
                        num_seqs=num_seqs,
                        max_len=r.max_new_tokens,
                    )
                    with autocast:
                        logp, entropy = logps(policy, batch, with_entropy=True, entropy_grad=a.entropy_coef > 0)  # (B, Tb)
                    old = old_logp[idx, :Tb] if old_logp is not None else logp.detach()
                    token_loss, clipped = policy_loss(logp, old, advantages[idx, :Tb], a.clip_low, a.clip_high, a.dual_clip)
                    if sampler_logp is not None:
                        sampled = sampler_logp[idx, :Tb]
                        if old_logp is None:
                            logp_gap += ((old - sampled).abs() * m).sum().item()
                        if a.tis_clip is not None:
                            token_loss = token_loss * tis_weights(old, sampled, a.tis_clip)
                    weight = 1.0 if real else 0.0  # a filler pass (in_step) counts for nothing
                    loss = agg(token_loss) * weight
                    stats["loss/policy"] += loss.item()
                    if ref_logp is not None and not a.kl_in_reward:
                        kl = agg(kl_penalty(logp, ref_logp[idx, :Tb], str(a.kl_estimator))) * weight
                        stats["loss/kl"] += kl.item()
                        loss = loss + kl_coef * kl
                    if a.entropy_coef > 0:  # exploration bonus
                        loss = loss - a.entropy_coef * agg(entropy) * weight
                    backward("policy", loss, boundary)
                    stats["loss/clip_frac"] += weight * (clipped & m).sum().item() / num_tokens
                    stats["loss/entropy"] += weight * (entropy.detach() * m).sum().item() / num_tokens
                    approx_kl = kl_penalty(logp.detach(), old, "k3")  # how far the update has moved from the sampler
                    stats["loss/approx_kl"] += weight * (approx_kl * m).sum().item() / num_tokens
                    if critic is not None:
                        with autocast:
                            values = sequence_values(critic, batch)
                        v_loss = agg(value_loss(values, old_values[idx, :Tb], returns[idx, :Tb], a.value_clip)) * weight
                        backward("critic", v_loss, boundary)
                        stats["loss/value"] += v_loss.item()
                norm = update("policy", params, optimizer, schedule)
                if critic is not None:
                    norm += update("critic", critic_params, critic_opt, critic_schedule)
                if math.isfinite(norm):
                    stats["loss/grad_norm"] += norm
                else:
                    skipped += 1

        # ---- sync weights ----
        t2 = time.time()
        engine.sync_weights(policy)
        t_sync = time.time() - t2

        # ---- evaluate: greedy, with the rollout engine, every eval.every steps ----
        eval_scores = {}
        if cfg.eval.every > 0 and (step + 1) % cfg.eval.every == 0:
            with gathered_weights(policy):  # (ZeRO-3: every rank gathers, rank 0 evaluates)
                if main_rank:
                    out = os.path.join(run_dir, "eval", f"step_{step + 1}")
                    results = run_eval(cfg, out, (engine, tokenizer, image_processor))
                    eval_scores = {f"eval/{name}": res["accuracy"] for name, res in results.items()}
            barrier()

        # ---- log / save ----
        # every rank's rewards and counts (gathered above); loss shares summed over ranks
        all_rewards = torch.tensor([x for rk in ranks for x in rk[1]])  # (N_global,)
        metrics = {
            "step": step + 1,
            "reward/mean": all_rewards.mean().item(),
            "reward/std": all_rewards.std().item() if n_samples > 1 else 0.0,
        }
        for name in parts:
            metrics[f"reward/{name}"] = sum(sum(rk[2][name]) for rk in ranks) / n_samples
        for kind in REWARD_COUNTS:
            metrics[f"reward/{kind}"] = sum(rk[3].get(kind, 0) for rk in ranks)
        shares = {k: v for k, v in stats.items() if k != "loss/grad_norm"}  # the norm is already global
        summed = all_sum(torch.tensor(list(shares.values()), dtype=torch.float64)).tolist() if shares else []
        metrics.update({k: v / updates_per_step for k, v in zip(shares, summed)})
        if "loss/grad_norm" in stats:
            metrics["loss/grad_norm"] = stats["loss/grad_norm"] / updates_per_step
        if kl_reward is not None:
            metrics["loss/kl"] = (
                all_sum(kl_reward.sum()) / all_sum(mask.sum().float())
            ).item()  # the KL the rewards were charged
        metrics["loss/lr"] = schedule.get_last_lr()[0]
        response_lengths = [n for rk in ranks for n in rk[6]]
        metrics["rollout/response_len"] = sum(response_lengths) / n_samples
        metrics["rollout/response_len_max"] = max(response_lengths)
        metrics["rollout/truncated_frac"] = sum(sum(rk[4]) for rk in ranks) / n_samples
        metrics["rollout/zero_std_groups"] = zero_std_fraction(all_rewards, r.group_size)
        if a.overlong_buffer > 0:
            metrics["reward/overlong"] = all_sum(shaping.sum()).item() / n_samples
        if critic is not None:
            metrics["loss/explained_var"] = explained_variance(old_values, returns, mask)
        if a.kl_target is not None:  # adaptive KL: steer the coefficient toward the target KL per token
            kl_coef = adaptive_kl_coef(kl_coef, metrics.get("loss/kl", 0.0), a.kl_target, a.kl_horizon, n_samples)
            metrics["loss/kl_coef"] = kl_coef
        metrics["rollout/vision_token_cut"] = sum(rk[5] for rk in ranks)
        if sampler_logp is not None:
            metrics["rollout/logp_diff"] = all_sum(torch.tensor(logp_gap, dtype=torch.float64)).item() / max(
                1, sum(response_lengths)
            )
        prompt_tokens = all_sum(torch.tensor(float(sum(len(p.input_ids) for p in prompts))))
        metrics["rollout/prompt_len"] = prompt_tokens.item() / r.prompts_per_step
        metrics["perf/rollout_s"] = t_rollout
        metrics["rollout/sampling_rounds"] = len(scored.rounds)
        metrics["perf/reward_s"] = t_reward
        metrics["perf/update_s"] = t2 - t1
        metrics["perf/sync_s"] = t_sync
        metrics["perf/step_s"] = time.time() - t0
        metrics["perf/tokens_per_s"] = sum(response_lengths) / metrics["perf/step_s"]
        metrics["loss/skipped_updates"] = skipped
        metrics.update(eval_scores)
        history.append(metrics)
        last = step + 1 == total_steps
        if main_rank:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if cfg.log.samples_every > 0 and step % cfg.log.samples_every == 0:
                samples_path = os.path.join(run_dir, "samples.jsonl")
                write_samples(samples_path, step + 1, prompts, rollout, total, parts, cfg.log.samples_per_step)
            if wandb_run is not None:
                wandb_run.log(metrics, step=step + 1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['rollout/response_len']:.0f}")
            if last or step % 10 == 0:
                plot_rewards(os.path.join(run_dir, "reward_curve.png"), history)
        bad_steps = bad_steps + 1 if skipped else 0
        if bad_steps >= t.max_bad_steps:
            raise TrainingError(
                f"{bad_steps} steps in a row had non-finite loss or gradients (last: step {step + 1}, "
                f"{skipped} of {updates_per_step} updates skipped); the weights were not changed by those "
                "updates. Lower trainer.lr or check the rewards; the last checkpoint is in checkpoints/."
            )
        stopping = all_sum(torch.tensor(float(signals.received is not None))).item() > 0  # any rank signalled
        if last or stopping or (t.save_every > 0 and (step + 1) % t.save_every == 0):
            state = {"step": step + 1, "bad_steps": bad_steps, "history": history, "rng": rng_state(), "kl_coef": kl_coef, "batches_used": batches_used,
                     "wandb_id": wandb_run.id if wandb_run is not None else None}  # fmt: skip
            if not engines:  # (DeepSpeed saves its optimizer partitions and schedules itself)
                state |= {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
                if critic is not None:
                    state |= {"critic_optimizer": critic_opt.state_dict(), "critic_schedule": critic_schedule.state_dict()}
            save_training_state(run_dir, step + 1, state, policy, tokenizer, image_processor, critic, t.keep_last, engines)
        if stopping and not last:
            if wandb_run is not None:
                wandb_run.finish()
            signals.stop()  # exits (or submitit requeues): a requeued job resumes from this checkpoint
    signals.restore()

    with gathered_weights(policy, critic):
        if main_rank:
            save_checkpoint(os.path.join(run_dir, "checkpoints", "final"), policy, tokenizer, image_processor, critic)
            link_latest(str(cfg.stage.name), run_dir)
    if wandb_run is not None:
        wandb_run.finish()
    return history[-1]


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, BadRow, FileNotFoundError, TrainingError) as e:  # the message is the help
        sys.exit(f"error: {e}")
    finally:
        release_process_groups()


if __name__ == "__main__":
    main()
