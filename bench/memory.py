"""Per-GPU memory of each stage at DeepSpeed ZeRO-3, from Qwen2.5-VL-3B's shapes (built on the meta
device: no weights, no memory, no GPU), checked against DeepSpeed's own estimator.

    python bench/memory.py                                          # the five stages, 8 GPUs of 80 GiB
    python bench/memory.py stage=mgt_geo rollout.gpu_memory_utilization=0.4 trainer.offload=optimizer
    python bench/memory.py --gpus 16 --gpu-gib 141                  # two nodes of H200s

Per GPU, with bf16 compute and fp32 Adam, as DeepSpeed's estimator counts a trained model (its 18
bytes per parameter, sharded over the GPUs, plus its largest layer gathered whole):
- params: every parameter's bf16 shard (2 bytes / GPUs);
- grads: an fp32 gradient shard of each trainable parameter (4 bytes / GPUs);
- optimizer: fp32 master weights and Adam's two moments of each trainable parameter (12 bytes / GPUs);
- gathered: the largest layer whole while it runs (4 bytes a parameter: its bf16 weights and gradients;
  for the 3B the tied embeddings / lm_head, 311M parameters);
- reference (algo.kl_coef > 0): bf16 shards only; critic (algo.estimator=gae): a trained model of its own;
- vLLM: rollout.gpu_memory_utilization of the GPU (weights and KV cache) while sampling; with
  rollout.enable_sleep it frees that while the policy trains.
trainer.offload=optimizer moves grads and optimizer states to the CPU, =all the parameter shards too.
Activations, the logits chunks and allocator slack are not counted: they depend on micro-batch tokens.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hydra import compose, initialize_config_dir  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

import config as _config  # noqa: E402,F401  (registers the schema)
from model import QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION, Critic, build_tiny_tokenizer, qwen2_5_vl_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["fre_text", "fre_multi", "mgt_geo", "mgt_percereason", "mgt_sokoban"]
GIB = 2**30


def meta_3b() -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL-3B-Instruct at its published shapes, on the meta device (the tokenizer only
    supplies the special-token ids)."""
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(
            qwen2_5_vl_config(build_tiny_tokenizer(512), QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION)
        )


def trained_model_bytes(model, trainable, gpus: int, offload: str) -> dict:
    """Per-GPU bytes of a model trained under ZeRO-3: every parameter's bf16 shard, the fp32 grad and
    Adam shards of the `trainable` ones, the largest layer gathered whole. Tied weights count once."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    n_trainable = sum({id(p): p.numel() for p in trainable}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    on_gpu = offload == "none"
    return {
        "params": 2 * total // gpus if offload != "all" else 0,
        "grads": 4 * n_trainable // gpus if on_gpu else 0,
        "optimizer": 12 * n_trainable // gpus if on_gpu else 0,
        "gathered": 4 * largest,
    }


def stage_memory(cfg, policy, gpus: int, gpu_bytes: int) -> dict:
    """Per-GPU bytes of each part of `cfg`'s run, and the two peaks (training, sampling)."""
    offload = str(cfg.trainer.offload)
    vision = policy.model.visual.parameters() if cfg.model.freeze_vision else ()
    frozen = {id(p) for p in vision}
    out = trained_model_bytes(policy, [p for p in policy.parameters() if id(p) not in frozen], gpus, offload)
    with_reference = cfg.algo.kl_coef > 0 and offload != "all"
    out["reference"] = 2 * sum(p.numel() for p in policy.parameters()) // gpus if with_reference else 0
    out["critic"] = out["critic_gathered"] = 0
    if cfg.algo.estimator == "gae":
        critic = Critic(policy)
        states = trained_model_bytes(critic, list(critic.parameters()), gpus, offload)
        out["critic"] = states["params"] + states["grads"] + states["optimizer"]
        out["critic_gathered"] = states["gathered"]
    resident = out["params"] + out["grads"] + out["optimizer"] + out["reference"] + out["critic"]
    out["vllm"] = int(cfg.rollout.gpu_memory_utilization * gpu_bytes) if cfg.rollout.engine == "vllm" else 0
    out["training"] = resident + max(out["gathered"], out["critic_gathered"])  # one model runs at a time
    out["sampling"] = resident + out["vllm"] + (0 if cfg.rollout.engine == "vllm" else out["gathered"])
    if not cfg.rollout.enable_sleep:  # vLLM keeps its share while the policy trains
        out["training"] += out["vllm"]
    return out


def stage_config(stage: str, overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("config", overrides=[f"stage={stage}", *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the ZeRO-3 shards are spread over")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU (LMM-R1 trained on 80 GiB)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as train.py takes them (stage=... picks one)")
    args = parser.parse_args()
    stages = [o.split("=", 1)[1] for o in args.overrides if o.startswith("stage=")] or STAGES
    overrides = [o for o in args.overrides if not o.startswith("stage=")]
    policy = meta_3b()
    cols = ["params", "grads", "optimizer", "gathered", "reference", "critic", "vllm", "training", "sampling"]
    print(f"Qwen2.5-VL-3B, ZeRO-3 over {args.gpus} GPUs of {args.gpu_gib:g} GiB: GiB per GPU (activations not counted)")
    print(f"| stage | {' | '.join(cols)} |\n|---|{'---|' * len(cols)}")
    for stage in stages:
        row = stage_memory(stage_config(stage, overrides), policy, args.gpus, int(args.gpu_gib * GIB))
        print(f"| {stage} | " + " | ".join(f"{row[c] / GIB:.2f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
