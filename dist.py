"""Data-parallel plumbing for train.py: ranks, collectives, DeepSpeed engines, backward and optimizer steps.

Ranks split each step's prompts (a prompt's whole group on one rank). Every loss is a rank's share of
the global mean (normalised by global token counts), so gradients and statistics are *summed* over
ranks. A single process is rank 0 of 1 and every helper here is then the plain operation.
"""

import math
import os
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Tuple

import torch


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def main_rank() -> bool:
    """Only rank 0 writes files, logs and checkpoints."""
    return not distributed() or torch.distributed.get_rank() == 0


def launch_rank() -> int:
    """This process's rank as its launcher set it, before torch.distributed starts: torchrun's RANK,
    or a SLURM task's SLURM_PROCID (train.py exports RANK from it later)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class Tee:
    """A console stream that also writes to `file`, except progress-bar redraws (text with a carriage return)."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.stream.write(text)
        if "\r" not in text.replace("\r\n", "\n"):
            self.file.write(text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the console's
        return getattr(self.stream, name)


@contextmanager
def console_log(path: str):
    """What this process prints (stdout, stderr, and the traceback it dies of) also appended to
    `path`: train.log / eval.log in the run dir, where Hydra's logging appends its records too.
    Rank 0 only: the other ranks print what rank 0 does."""
    if launch_rank() != 0:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", buffering=1) as f:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(out, f), Tee(err, f)
        try:
            yield
        except BaseException as e:
            if not isinstance(e, SystemExit):  # Hydra prints it to the console after this returns
                f.write(traceback.format_exc())
            raise
        finally:
            sys.stdout, sys.stderr = out, err


def ranks_to_start(devices: str, device_name: str) -> int:
    """trainer.devices as the number of rank processes `python train.py` starts: 0 as one of a
    launcher's ranks (torchrun's: WORLD_SIZE; cluster=slurm's: submitit), which exist already; auto:
    one per visible GPU where training runs on GPUs, else 1. An srun step of several tasks has no
    rendezvous of its own and is refused."""
    if "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return 0
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        raise ValueError(
            f"an srun step of {os.environ['SLURM_STEP_NUM_TASKS']} tasks: each would train alone. Use cluster=slurm "
            "(README: SLURM), or torchrun (or trainer.devices) in one task per node"
        )
    gpus = torch.cuda.device_count() if pick_device(device_name).type == "cuda" else 0
    n = max(1, gpus) if devices == "auto" else int(devices)
    if gpus and n > gpus:
        raise ValueError(f"trainer.devices={n}, but {gpus} GPUs are visible (CUDA_VISIBLE_DEVICES)")
    return n


STOP_GRACE_S = 600  # (torch's elastic agent would give 30 s: too short to finish a step and save a 3B)


def start_ranks(n: int, argv: List[str]) -> None:
    """`python argv...` as `n` local ranks through torch's elastic launcher, as `torchrun --standalone
    --nproc_per_node n` starts them (`launch_config`); returns when all have ended, raises its
    ChildFailedError if one failed."""
    from torch.distributed.launcher.api import elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several processes
    elastic_launch(launch_config(n), sys.executable)(*argv)


def launch_config(n: int):
    """torch's LaunchConfig for `n` local ranks: a free rendezvous port, no restarts. A signal to
    this process goes on to the ranks, SLURM's and submitit's SIGUSR1/2 as well as SIGTERM, and they
    get STOP_GRACE_S to save at the end of their step (checkpoint.StopSignals) before they are
    killed: `shutdown_timeout` came in torch 2.12; 2.10 and 2.11 (read from their wheels) kill
    after a fixed 30 s, which is said once here rather than failing the launch."""
    import uuid

    from torch.distributed.launcher.api import LaunchConfig

    grace = {"shutdown_timeout": STOP_GRACE_S}
    if "shutdown_timeout" not in LaunchConfig.__dataclass_fields__:
        grace = {}
        print(
            f"[dist] torch {torch.__version__} gives ranks 30 s to save after a stop signal, not {STOP_GRACE_S} s (torch >= 2.12)"
        )
    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                        rdzv_endpoint="localhost:0", max_restarts=0,
                        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2", **grace)  # fmt: skip


def set_cpu_threads(wanted: int) -> None:
    """torch's intra-op CPU threads for this process (trainer.threads): `wanted`; 0 keeps torch's own
    choice (OMP_NUM_THREADS where a launcher set it, as torchrun does, else a thread per core)."""
    if wanted > 0:
        torch.set_num_threads(wanted)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed(device_name: str, always: bool = False) -> Tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK (under
    cluster=slurm, submitit's tasks derive them from SLURM's); the process group starts once, gloo on
    CPU and nccl on GPUs. A single process is (0, 1, device),
    with a one-rank group when `always` (DeepSpeed needs one)."""
    device = pick_device(device_name)
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "WORLD_SIZE" not in os.environ:
        import submitit  # a task of cluster=slurm: its SLURM rank, world and master become torch's

        # not under torchrun (no WORLD_SIZE), so any torch variable already here was inherited from the
        # submitting shell or process (vLLM's CPU platform sets LOCAL_WORLD_SIZE, say): SLURM's values win
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if always:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if (always or int(os.environ.get("WORLD_SIZE", "1")) > 1) and not distributed():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        # on GPUs nccl for tensors on the device, gloo for the small CPU ones (counts, flags, metrics)
        torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if not distributed():
        return 0, 1, device
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_cpu_groups = {}  # the default group -> the group for CPU tensors (cpu_group)


def cpu_group():
    """The process group of the small CPU collectives below (counts, flags, metrics): the default group
    where it has a CPU backend (init_distributed's gloo, or cpu:gloo,cuda:nccl), else a gloo group over
    the same ranks, made once. vLLM's in-process worker (one GPU, no torchrun) makes the default group
    itself, nccl only, where a CPU tensor has no backend. Every rank calls the collectives in the same
    order, so the first call makes the new group on all of them together."""
    world = torch.distributed.group.WORLD
    if world not in _cpu_groups:
        config = torch.distributed.get_backend_config()  # device:backend pairs: "cpu:gloo,cuda:nccl", "cuda:nccl", ...
        has_cpu = any(part.startswith("cpu:") for part in config.split(","))
        _cpu_groups[world] = world if has_cpu else torch.distributed.new_group(backend="gloo")
    return _cpu_groups[world]


def destroy_groups() -> None:
    """Destroy this process's groups, the CPU one included, and drop the last references to them, so
    that their gloo threads are joined now. A group that lives on into interpreter exit can abort it
    (a gloo thread taking the GIL during finalization: "terminate called without an active exception",
    about 1 two-rank exit in 20)."""
    if distributed():
        torch.distributed.destroy_process_group()
    _cpu_groups.clear()


def barrier() -> None:
    if distributed():
        torch.distributed.barrier(group=cpu_group())


def all_max(n: int) -> int:
    if not distributed():
        return n
    x = torch.tensor(n)
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=cpu_group())
    return int(x)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over ranks (`x` itself in a single process): statistics, summed on the CPU."""
    if distributed():
        summed = x.detach().to("cpu", copy=True)
        torch.distributed.all_reduce(summed, group=cpu_group())
        x = summed.to(x.device)
    return x


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (every rank gets the same answer, so they branch alike)."""
    return all_sum(torch.tensor(float(flag))).item() > 0


def rank0_value(obj):
    """Rank 0's `obj` (a small Python object) on every rank."""
    if not distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=cpu_group())
    return box[0]


def shared_run_dir(own: str) -> str:
    """Rank 0's run dir, on every rank. Each torchrun process resolves Hydra's `${now:...}` itself, so
    ranks started across a second boundary got dirs of their own: a checkpoint would then hold only
    rank 0's ZeRO shards, and each rank would resume from another place. A rank's own dir, where it
    is not rank 0's, holds only what Hydra wrote at start (.hydra/, train.log) and is removed."""
    shared = rank0_value(os.path.abspath(own))
    if shared != os.path.abspath(own) and only_hydras_start_files(own):
        import shutil

        shutil.rmtree(os.path.join(own, ".hydra"))
        if os.path.exists(os.path.join(own, "train.log")):
            os.remove(os.path.join(own, "train.log"))
        os.rmdir(own)
    return shared


STARTED = time.time()  # (this module is imported before Hydra makes the run dir)


def only_hydras_start_files(run_dir: str) -> bool:
    """Whether `run_dir` holds nothing but what Hydra wrote when this process started: .hydra/ made
    since, an empty train.log. Another run's dir (two jobs started in the same second) holds more."""
    names = set(os.listdir(run_dir))
    log = os.path.join(run_dir, "train.log")
    return (
        names <= {".hydra", "train.log"}
        and ".hydra" in names
        and os.path.getmtime(os.path.join(run_dir, ".hydra")) >= STARTED - 1
        and (not os.path.exists(log) or os.path.getsize(log) == 0)
    )


def gather(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (small Python objects: lists of rewards, counts)."""
    if not distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj, group=cpu_group())
    return out


def rank_and_world() -> Tuple[int, int]:
    """(this rank, the number of ranks); (0, 1) in a single process."""
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed() else (0, 1)


def gathered_in_order(mine: list, total: int) -> list:
    """Every rank's `mine`, the results of its share of `total` items (items rank, rank + world, ...),
    on every rank in the items' order."""
    out, world = [None] * total, rank_and_world()[1]
    for r, shard in enumerate(gather(mine)):
        out[r::world] = shard
    return out


def in_step(micro: List[List[int]]) -> List[Tuple[List[int], bool]]:
    """(indices, real) micro-batches, padded with zero-weight repeats of the first one so that every
    rank runs as many forward/backward passes as the busiest: ZeRO's gathers and reductions are
    collective, and a rank that stopped early would hang the others."""
    micro = [m for m in micro if m]
    n = all_max(len(micro))
    filler = micro[0] if micro else [0]
    return [(idx, True) for idx in micro] + [(filler, False)] * (n - len(micro))


def zero3_sharded(params) -> bool:
    """Whether any of `params` is partitioned by ZeRO-3: each rank holds a shard, and every forward
    through it gathers the whole weight collectively, so all ranks must make the same calls."""
    return any(hasattr(p, "ds_id") for p in params)


def full_numel(param) -> int:
    """A parameter's element count, also under ZeRO-3, where `numel()` of a partitioned one is 0."""
    return getattr(param, "ds_numel", param.numel())


def gathered_params(params):
    """A context in which `params`, where ZeRO-3 shards them, are whole (nothing to do for others)."""
    if zero3_sharded(params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return nullcontext()


def gathered_weights(*models):
    """gathered_params over every parameter of `models` (None: skipped)."""
    return gathered_params([p for m in models if m is not None for p in m.parameters()])


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
        # DeepSpeed's bf16 weights give bf16 gradients, which it would also sum over a mini-batch's
        # micro-batches in bf16 (its default: the model's dtype), where a micro-batch's gradient
        # below 1/256 of the running sum is lost; without DeepSpeed they sum in fp32, so here too.
        # (The reduce across ranks stays in bf16, DeepSpeed's communication_data_type: fp32 would
        # double the gradient traffic. ZeRO-1 then keeps whole fp32 gradients: model_state_bytes.)
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # our AdamW also with offload: the same numbers as without
        "steps_per_print": 1 << 30,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    return engine


def sync_gradients(params) -> None:
    """Each rank's loss is its share of the global mean, so the full gradient is the sum of the ranks'
    gradients: all-reduce them before the optimizer step."""
    if distributed():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)


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


def backward(engines: Dict[str, object], name: str, loss: torch.Tensor, boundary: bool) -> None:
    """Plain backward, or DeepSpeed's for model `name`: it averages gradients over ranks while our
    losses are shares of a global mean to be summed, hence the factor; the boundary (the mini-batch's
    last micro-batch) tells ZeRO when to reduce."""
    if name not in engines:
        loss.backward()
        return
    world = torch.distributed.get_world_size()
    engine = engines[name]
    # What DeepSpeedEngine.forward does first, and our forwards call the model's parts, not the
    # engine: ZeRO counts micro-batches by it (0.19.8's stage 3 adds a micro-batch's gradients to the
    # last ones only from the second count on; without it each micro-batch's replaced the last's)
    engine.optimizer.clear_backward_seen_flag()
    # and the backward prologue a hook from that forward runs: ZeRO-1 with bf16 and no offload
    # (BF16_Optimizer) clears the bf16 gradients it has already added to its fp32 sum (without it,
    # each micro-batch added all the ones before it again); else it is empty but for NVMe offload
    engine.optimizer.backward_prologue()
    engine.set_gradient_accumulation_boundary(boundary)
    engine.backward(loss * world)


def step_optimizer(engines: Dict[str, object], name: str, params, optimizer, schedule, grad_clip: float) -> float:
    """One optimizer step of model `name`; returns the gradient norm (non-finite: the step was skipped)."""
    if name not in engines:
        sync_gradients(params)
        return optimizer_step(params, optimizer, schedule, grad_clip)
    engine, skipped = engines[name], engines[name].skipped_steps
    engine.step()
    if engine.skipped_steps > skipped:  # a non-finite step, skipped
        schedule.step()  # DeepSpeed steps the schedule only for an applied step; ours goes on
        drop_offloaded_gradient_sums(engine.optimizer)
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else 0.0


def drop_offloaded_gradient_sums(optimizer) -> None:
    """After a skipped step, what DeepSpeed 0.19.8's ZeRO-1/2 overflow branch does without offload
    but not with it (stage_1_and_2.py, step): drop the mini-batch's fp32 gradient sums. With offload
    and fp32 sums they are a buffer the next mini-batch adds to, so its NaN stayed and every later
    update was skipped too."""
    if getattr(optimizer, "cpu_offload", False) and isinstance(getattr(optimizer, "averaged_gradients", None), dict):
        for group in optimizer.averaged_gradients:
            optimizer.averaged_gradients[group] = None


# ---------------------------------------------------------------------------------------------
# Per-GPU memory plan (README: Multi-GPU): what a run needs, checked before any weight loads
# ---------------------------------------------------------------------------------------------

GIB = 2**30


def unique_numel(params) -> int:
    return sum({id(p): full_numel(p) for p in params}.values())  # tied weights once


def model_state_bytes(model, trainable, zero_stage: int, gpus: int, offload: str) -> dict:
    """Per-GPU bytes of a model trained with AdamW in bf16 compute, as DeepSpeed's estimators count
    them (N parameters, n of them trainable):
    - zero 0 (plain PyTorch): fp32 weights (the master copy), fp32 gradients and Adam's two moments,
      all whole: 4N + 12n;
    - zero 1: bf16 weights whole; gradients are not sharded, bf16 and their fp32 sums
      (`deepspeed_engine`: BF16_Optimizer's flat buffer) both whole; fp32 master weights and moments
      in shards: 2N + 6n + 12n / GPUs (no estimator: read from DeepSpeed 0.19.8's BF16_Optimizer;
      config.validate refuses offload with ZeRO-1);
    - zero 2: bf16 weights whole, 16-bit gradients, fp32 gradients, master weights and moments in
      shards: 2N + 18n / GPUs (estimate_zero2_model_states_mem_needs); offload=optimizer: 2N;
    - zero 3: every parameter's bf16 shard (2N / GPUs) and the trainable ones' fp32 gradients, master
      weights and moments in shards (16n / GPUs), plus the largest layer gathered whole (4 bytes a
      parameter: weights and gradient) (estimate_zero3_model_states_mem_needs: its 18 bytes a
      parameter); offload=optimizer keeps the bf16 shards, =all nothing.
    """
    N, n = unique_numel(model.parameters()), unique_numel(trainable)
    largest = max(sum(full_numel(p) for p in m.parameters(recurse=False)) for m in model.modules())
    if zero_stage == 0:
        return {"params": 4 * N, "states": 12 * n, "gathered": 0}
    on_gpu = offload == "none"
    if zero_stage == 1:
        return {"params": 2 * N, "states": 6 * n + 12 * n // gpus, "gathered": 0}
    if zero_stage == 2:
        return {"params": 2 * N, "states": 18 * n // gpus if on_gpu else 0, "gathered": 0}
    return {
        "params": 2 * N // gpus if offload != "all" else 0,
        "states": 16 * n // gpus if on_gpu else 0,
        "gathered": 4 * largest,
    }


def activation_bytes(cfg, text_config) -> int:
    """Activations of one training micro-batch (bf16 autocast), an estimate: with gradient
    checkpointing each layer keeps its input (tokens x hidden x 2 bytes) and one layer at a time
    recomputes its inner activations (about 10 hidden + 3 intermediate values a token, 2 bytes each);
    without it every layer keeps those. Plus one log-prob chunk's fp32 logits, softmax and gradient."""
    t = cfg.trainer
    tokens = t.max_tokens_per_micro if t.packing else t.micro_batch_size * (cfg.data.max_prompt_len + cfg.rollout.max_new_tokens)
    hidden, layers = text_config.hidden_size, text_config.num_hidden_layers
    inner = tokens * (10 * hidden + 3 * text_config.intermediate_size) * 2
    body = layers * tokens * hidden * 2 + inner if cfg.model.gradient_checkpointing else layers * inner
    return body + 3 * 4 * min(t.logp_chunk_size, tokens) * text_config.vocab_size


def memory_plan(cfg, policy, gpus: int, gpu_bytes: int) -> dict:
    """Per-GPU bytes of each part of `cfg`'s run of `policy` (shapes only: a meta model will do) over
    `gpus` GPUs of `gpu_bytes`, and its peaks (`training`, `sampling`, `startup`; `peak` the largest):
    the policy's states, the reference (bf16, algo.kl_coef > 0), the critic (algo.estimator=gae; one
    model runs at a time, so one gathered layer counts), vLLM's rollout.gpu_memory_utilization (also
    while training unless rollout.enable_sleep), the activations (training)."""
    zero, offload = cfg.trainer.zero_stage, str(cfg.trainer.offload)
    vision = policy.model.visual.parameters() if cfg.model.freeze_vision and hasattr(policy.model, "visual") else ()
    frozen = {id(p) for p in vision}
    trainable = [p for p in policy.parameters() if id(p) not in frozen]
    out = model_state_bytes(policy, trainable, zero, gpus, offload)
    N = unique_numel(policy.parameters())
    critic_n = unique_numel(policy.model.parameters()) if cfg.algo.estimator == "gae" else 0  # a copy of the backbone
    out["reference"] = 0 if cfg.algo.kl_coef <= 0 or zero == 3 and offload == "all" else 2 * N // (gpus if zero == 3 else 1)
    out["critic"] = out["critic_gathered"] = 0
    if critic_n:  # all trained (its value head's hidden + 1 parameters not counted)
        critic = model_state_bytes(policy.model, list(policy.model.parameters()), zero, gpus, offload)
        out["critic"], out["critic_gathered"] = critic["params"] + critic["states"], critic["gathered"]
    out["activations"] = activation_bytes(cfg, policy.config.get_text_config())
    out["vllm"] = int(cfg.rollout.gpu_memory_utilization * gpu_bytes) if cfg.rollout.engine == "vllm" else 0
    resident = out["params"] + out["states"] + out["reference"] + out["critic"]
    out["training"] = resident + max(out["gathered"], out["critic_gathered"]) + out["activations"]
    out["training"] += 0 if cfg.rollout.enable_sleep else out["vllm"]
    # without ZeRO the fp32 gradients live from a backward to the optimizer step (zero_grad frees them)
    freed = 4 * (unique_numel(trainable) + critic_n) if zero == 0 else 0
    out["sampling"] = resident - freed + out["vllm"] + (0 if cfg.rollout.engine == "vllm" else out["gathered"])
    # the models load whole on every GPU (fp32 policy and critic, bf16 reference) before DeepSpeed
    # partitions them, and only then does vLLM start (train.setup)
    whole = 4 * N + (2 * N if cfg.algo.kl_coef > 0 else 0) + 4 * critic_n
    out["startup"] = whole if zero > 0 else 0
    out["peak"] = max(out["training"], out["sampling"], out["startup"])
    return out


def fits(cfg, policy, gpus: int, free_bytes: int, total_bytes: int) -> bool:
    plan = memory_plan(cfg, policy, gpus, total_bytes)
    return plan["peak"] <= free_bytes


def settings_that_fit(cfg, policy, gpus: int, free_bytes: int, total_bytes: int) -> List[str]:
    """Overrides, each alone (ZeRO-3 where it is not on already), with which the plan fits."""
    from omegaconf import OmegaConf

    t, zero3 = cfg.trainer, [] if cfg.trainer.zero_stage == 3 else ["trainer.zero_stage=3"]
    tries = [zero3, [*zero3, "trainer.offload=optimizer"], [*zero3, "trainer.offload=all"]]
    if not cfg.model.gradient_checkpointing:
        tries.append(["model.gradient_checkpointing=true"])
    micro = ("max_tokens_per_micro", t.max_tokens_per_micro) if t.packing else ("micro_batch_size", t.micro_batch_size)
    tries += [[f"trainer.{micro[0]}={micro[1] // 2**k}"] for k in range(1, 5) if micro[1] // 2**k >= 1]
    out = [
        " ".join(o)
        for o in tries
        if o and fits(OmegaConf.merge(cfg, OmegaConf.from_dotlist(o)), policy, gpus, free_bytes, total_bytes)
    ]
    at_zero3 = OmegaConf.merge(cfg, OmegaConf.from_dotlist(zero3))
    more = [g for g in (2, 4, 8, 16, 32, 64) if g > gpus and fits(at_zero3, policy, g, free_bytes, total_bytes)]
    return out + ([f"{more[0]} GPUs or more" + (" with trainer.zero_stage=3" if zero3 else "")] if more else [])


def memory_shortfall(cfg, policy, gpus: int, free_bytes: int, total_bytes: int) -> Optional[str]:
    """Why the run's plan (memory_plan) over `gpus` GPUs does not fit a GPU's free memory, naming the
    parts and the settings that would fit; None where it fits (on every rank: they decide alike, or
    one would wait for the others forever)."""
    plan = memory_plan(cfg, policy, gpus, total_bytes)
    need = plan["peak"]
    if not any_rank(need > free_bytes):
        return None
    peak = next(k for k in ("training", "sampling", "startup") if plan[k] == need)
    parts = ", ".join(
        f"{k} {plan[k] / GIB:.1f}" for k in ("params", "states", "gathered", "reference", "critic", "activations", "vllm")
    )
    options = settings_that_fit(cfg, policy, gpus, free_bytes, total_bytes)
    return (
        f"this run needs about {need / GIB:.1f} GiB per GPU (its peak, {peak}; GiB: {parts}) at trainer.zero_stage="
        f"{cfg.trainer.zero_stage} over {gpus} GPUs, and a GPU here has {free_bytes / GIB:.1f} of {total_bytes / GIB:.1f} GiB free. "
        + (f"Settings that would fit: {'; '.join(options)}. " if options else "No single setting here would fit. ")
        + "(trainer.memory_check=false skips this estimate.)"
    )
