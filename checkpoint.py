"""Checkpoint plumbing for train.py: the whole training state, written atomically, so that a resumed
run is the same run; finding the checkpoint to resume from; stopping cleanly on a signal.

checkpoints/step_N holds the policy as a loadable HF dir (safetensors), the critic, STATE_FILE
(optimizers, schedules, RNG, history, data position) and, under DeepSpeed, each engine's own sharded
checkpoint. A crash while writing leaves the previous checkpoint intact.
"""

import json
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import safetensors  # (not its safe_open: a SLURM job unpickles train.py's globals, and that class does not pickle)
import torch

from dist import barrier, gathered_weights, main_rank
from model import save_checkpoint, save_master_weights

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
                        engines: Dict[str, object], dtype: torch.dtype) -> str:  # fmt: skip
    """checkpoints/step_<step>: the policy as a loadable HF dir (safetensors, in `dtype`) with its fp32
    master weights where that copy is narrower, the critic, `state` (optimizers, schedules, RNG,
    history) and, under DeepSpeed, each engine's own sharded checkpoint (every rank writes its part);
    then only the newest `keep_last` are kept. Rank 0 writes the rest."""
    root = os.path.join(run_dir, "checkpoints")
    tmp, final = os.path.join(root, f".tmp_step_{step}"), os.path.join(root, f"step_{step}")
    writer = main_rank()
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    for name, ds_engine in engines.items():
        ds_engine.save_checkpoint(tmp, tag=name)  # optimizer partitions, schedule, module: collective
    with gathered_weights(policy, critic):  # ZeRO-3 shards gathered for the HF copy
        if writer:
            save_checkpoint(tmp, policy, tokenizer, image_processor, critic, dtype)  # the HF copy, in model.dtype
            save_master_weights(tmp, policy, dtype)  # the fp32 masters resume needs, where the HF copy is narrower
            torch.save(state, os.path.join(tmp, STATE_FILE))
    barrier()
    if writer:
        publish(tmp, final)
        for _, old in step_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


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
    writer = main_rank()
    for path in candidates:
        try:
            return path, load_training_state(path)
        except pickle.UnpicklingError:
            raise  # a state that carries code is refused, not skipped
        except Exception as e:  # truncated, corrupt, unreadable: whatever keeps it from loading
            problem = f"{type(e).__name__}: {e}"
        kept = path
        if not resume_from and writer:
            kept = f"{path}.unloadable-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(path, kept)
        if writer:
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
