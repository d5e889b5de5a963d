"""bench/memory.py's per-GPU report at the 3B's shapes, against DeepSpeed's own ZeRO-3 estimator."""

import re

import pytest
import torch
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_live,
    model_to_params,
)

from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.initialization import no_init_weights

from bench.memory import GIB, meta_3b, stage_memory, trained_model_bytes
from conftest import compose_cfg
from model import QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION, Critic, qwen2_5_vl_config

GPUS = 8
PUBLISHED_PARAMETERS = 3_754_622_976  # the 3B's safetensors, lm_head tied


@pytest.fixture(scope="module")
def policy():
    return meta_3b()


@pytest.fixture(scope="module")
def real_width_cut(tokenizer):
    """The 3B's widths cut to 2 text and 2 vision layers, allocated (bf16, uninitialised: 1.1 GB):
    DeepSpeed's model_to_params tells tied weights apart by data_ptr, which is 0 on the meta device."""
    text = QWEN2_5_VL_3B_TEXT | {"num_hidden_layers": 2}
    vision = QWEN2_5_VL_3B_VISION | {"depth": 2, "fullatt_block_indexes": [1]}
    with no_init_weights():
        config = qwen2_5_vl_config(tokenizer, text, vision)
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)


def deepspeed_gpu_bytes(total: int, largest: int, offload: str) -> int:
    """DeepSpeed's per-GPU model-state estimate under trainer.offload=`offload`."""
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=GPUS, cpu_offload=offload != "none", cpu_offload_params=offload == "all"
    )
    return gpu


def states(parts: dict) -> int:
    return parts["params"] + parts["grads"] + parts["optimizer"] + parts["gathered"]


@pytest.mark.parametrize("offload", ["none", "optimizer", "all"])
def test_model_states_agree_with_deepspeeds_estimator(real_width_cut, offload):
    for model in (real_width_cut, Critic(real_width_cut)):
        ours = states(trained_model_bytes(model, list(model.parameters()), GPUS, offload))
        assert abs(ours - deepspeed_gpu_bytes(*model_to_params(model), offload)) <= 3  # their int() of one sum vs ours of three


def test_the_printed_estimate_is_the_reports(real_width_cut, policy, capsys):
    estimate_zero3_model_states_mem_needs_all_live(real_width_cut, num_gpus_per_node=GPUS)
    printed = capsys.readouterr().out
    gib = float(re.search(r"\|\s+([\d.]+)GB \| offload_param=none, offload_optimizer=none, zero_init=1", printed).group(1))
    assert "311M largest layer params" in printed  # the tied embeddings / lm_head, counted once
    ours = trained_model_bytes(real_width_cut, list(real_width_cut.parameters()), GPUS, "none")
    assert abs(states(ours) / GIB - gib) < 0.005
    # the whole 3B (meta): the published parameter count, and DeepSpeed's estimate from it
    ours = trained_model_bytes(policy, list(policy.parameters()), GPUS, "none")
    _, largest = model_to_params(policy)  # (its total is wrong on meta: every data_ptr is 0)
    assert ours["params"] == 2 * PUBLISHED_PARAMETERS // GPUS and ours["gathered"] == 4 * largest == 4 * 151936 * 2048
    assert abs(states(ours) - deepspeed_gpu_bytes(PUBLISHED_PARAMETERS, largest, "none")) <= 3


def test_each_stage_counts_its_reference_critic_frozen_tower_and_vllm(policy):
    fre_text = stage_memory(compose_cfg(["stage=fre_text"]), policy, GPUS, 80 * GIB)
    assert states(fre_text) == states(trained_model_bytes(policy, list(policy.parameters()), GPUS, "none"))
    assert fre_text["reference"] == 2 * PUBLISHED_PARAMETERS // GPUS and fre_text["critic"] == 0  # bf16 shards, KL 0.001
    assert fre_text["vllm"] == 40 * GIB  # rollout.gpu_memory_utilization=0.5, asleep while training
    assert fre_text["training"] == states(fre_text) + fre_text["reference"]
    assert fre_text["sampling"] == fre_text["training"] - fre_text["gathered"] + fre_text["vllm"]

    sokoban = stage_memory(compose_cfg(["stage=mgt_sokoban"]), policy, GPUS, 80 * GIB)
    vision = sum(p.numel() for p in policy.model.visual.parameters())
    assert sokoban["reference"] == 0  # no KL: no reference model
    assert sokoban["params"] == fre_text["params"]  # the frozen tower is still sharded, in bf16
    assert sokoban["grads"] + sokoban["optimizer"] == fre_text["grads"] + fre_text["optimizer"] - 16 * vision // GPUS
    critic = trained_model_bytes(Critic(policy), list(Critic(policy).parameters()), GPUS, "none")
    assert sokoban["critic"] + sokoban["critic_gathered"] == states(critic)
    assert abs(sokoban["critic"] - 18 * (PUBLISHED_PARAMETERS + 2048 + 1) // GPUS) <= 3  # backbone and value head
    offloaded = stage_memory(compose_cfg(["stage=mgt_geo", "trainer.offload=all"]), policy, GPUS, 80 * GIB)
    assert offloaded["training"] == max(offloaded["gathered"], offloaded["critic_gathered"])  # all else on the CPU
