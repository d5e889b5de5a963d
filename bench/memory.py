"""Per-GPU memory of each stage, from Qwen2.5-VL-3B's shapes (built on the meta device: no weights,
no memory, no GPU): the plan a GPU run checks at start-up (dist.memory_plan, trainer.memory_check),
which tests/test_memory.py checks against DeepSpeed's own estimators.

    python bench/memory.py                                          # the five stages, 8 GPUs of 80 GiB
    python bench/memory.py stage=mgt_geo rollout.gpu_memory_utilization=0.4 trainer.offload=optimizer
    python bench/memory.py --gpus 16 --gpu-gib 141                  # two nodes of H200s
    python bench/memory.py --gpus 1 --gpu-gib 141 trainer.zero_stage=0

GiB per GPU: params (the weights or their shards), states (gradients, fp32 master weights, Adam's
moments), gathered (ZeRO-3: the largest layer whole, the 3B's tied embeddings / lm_head), reference,
critic, activations (an estimate at the micro-batch's tokens), vLLM's share, and the peaks: training,
sampling, and start-up (ZeRO: the models whole before DeepSpeed partitions them). dist.model_state_bytes says how each ZeRO stage counts.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hydra import compose, initialize_config_dir  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

import config as _config  # noqa: E402,F401  (registers the schema)
from dist import GIB, memory_plan  # noqa: E402
from model import QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION, build_tiny_tokenizer, qwen2_5_vl_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["fre_text", "fre_multi", "mgt_geo", "mgt_percereason", "mgt_sokoban"]


def meta_3b() -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL-3B-Instruct at its published shapes, on the meta device (the tokenizer only
    supplies the special-token ids)."""
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(
            qwen2_5_vl_config(build_tiny_tokenizer(512), QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION)
        )


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
    cols = ["params", "states", "gathered", "reference", "critic", "activations", "vllm", "training", "sampling", "startup"]
    print(f"Qwen2.5-VL-3B over {args.gpus} GPUs of {args.gpu_gib:g} GiB: GiB per GPU\n")
    print(f"| stage | ZeRO | {' | '.join(cols)} |\n|---|---|{'---|' * len(cols)}")
    for stage in stages:
        cfg = stage_config(stage, overrides)
        row = memory_plan(cfg, policy, args.gpus, int(args.gpu_gib * GIB))
        print(f"| {stage} | {cfg.trainer.zero_stage} | " + " | ".join(f"{row[c] / GIB:.2f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
