"""bench/memory.py's per-GPU report at the 3B's shapes, against DeepSpeed's own ZeRO-3 estimator."""

import re

import pytest
import torch
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_live,
    model_to_params,
)

from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.initialization import no_init_weights

from omegaconf import OmegaConf

from bench.memory import meta_3b
from conftest import compose_cfg
from dist import GIB, memory_plan, memory_shortfall, model_state_bytes
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
    """DeepSpeed's per-GPU model-state estimate under ZeRO-3 and trainer.offload=`offload`."""
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=GPUS, cpu_offload=offload != "none", cpu_offload_params=offload == "all"
    )
    return gpu


def states(parts: dict) -> int:
    return parts["params"] + parts["states"] + parts["gathered"]


@pytest.mark.parametrize("offload", ["none", "optimizer", "all"])
def test_model_states_agree_with_deepspeeds_estimators(real_width_cut, offload):
    for model in (real_width_cut, Critic(real_width_cut)):
        ours = states(model_state_bytes(model, list(model.parameters()), 3, GPUS, offload))
        assert abs(ours - deepspeed_gpu_bytes(*model_to_params(model), offload)) <= 3  # their int() of one sum vs ours of three
        if offload != "all":  # (ZeRO-2 has no parameter offload)
            _, zero2 = estimate_zero2_model_states_mem_needs(model_to_params(model)[0], GPUS, cpu_offload=offload != "none")
            assert abs(states(model_state_bytes(model, list(model.parameters()), 2, GPUS, offload)) - zero2) <= 3


def test_the_printed_estimate_is_the_plans(real_width_cut, policy, capsys):
    estimate_zero3_model_states_mem_needs_all_live(real_width_cut, num_gpus_per_node=GPUS)
    printed = capsys.readouterr().out
    gib = float(re.search(r"\|\s+([\d.]+)GB \| offload_param=none, offload_optimizer=none, zero_init=1", printed).group(1))
    assert "311M largest layer params" in printed  # the tied embeddings / lm_head, counted once
    ours = model_state_bytes(real_width_cut, list(real_width_cut.parameters()), 3, GPUS, "none")
    assert abs(states(ours) / GIB - gib) < 0.005
    # the whole 3B (meta): the published parameter count, and DeepSpeed's estimate from it
    ours = model_state_bytes(policy, list(policy.parameters()), 3, GPUS, "none")
    _, largest = model_to_params(policy)  # (its total is wrong on meta: every data_ptr is 0)
    assert ours["params"] == 2 * PUBLISHED_PARAMETERS // GPUS and ours["gathered"] == 4 * largest == 4 * 151936 * 2048
    assert abs(states(ours) - deepspeed_gpu_bytes(PUBLISHED_PARAMETERS, largest, "none")) <= 3
    assert model_state_bytes(policy, list(policy.parameters()), 0, 1, "none")["states"] == 12 * PUBLISHED_PARAMETERS  # Adam, fp32


def test_each_stage_counts_its_reference_critic_frozen_tower_and_vllm(policy):
    fre_text = memory_plan(compose_cfg(["stage=fre_text"]), policy, GPUS, 80 * GIB)
    assert states(fre_text) == states(model_state_bytes(policy, list(policy.parameters()), 3, GPUS, "none"))
    assert fre_text["reference"] == 2 * PUBLISHED_PARAMETERS // GPUS and fre_text["critic"] == 0  # bf16 shards, KL 0.001
    assert fre_text["vllm"] == 40 * GIB  # rollout.gpu_memory_utilization=0.5, asleep while training
    assert fre_text["training"] == states(fre_text) + fre_text["reference"] + fre_text["activations"]
    assert fre_text["sampling"] == fre_text["training"] - fre_text["gathered"] - fre_text["activations"] + fre_text["vllm"]

    sokoban = memory_plan(compose_cfg(["stage=mgt_sokoban"]), policy, GPUS, 80 * GIB)
    vision = sum(p.numel() for p in policy.model.visual.parameters())
    assert sokoban["reference"] == 0  # no KL: no reference model
    assert sokoban["params"] == fre_text["params"]  # the frozen tower is still sharded, in bf16
    assert sokoban["states"] == fre_text["states"] - 16 * vision // GPUS
    assert abs(sokoban["critic"] - 18 * PUBLISHED_PARAMETERS // GPUS) <= 3  # the backbone, all trained
    zero0 = memory_plan(compose_cfg(["stage=fre_text", "trainer.zero_stage=0"]), policy, 1, 80 * GIB)
    assert zero0["states"] == 12 * PUBLISHED_PARAMETERS and zero0["startup"] == 0  # fp32 grads and Adam, whole
    assert zero0["sampling"] == zero0["params"] + 8 * PUBLISHED_PARAMETERS + zero0["reference"] + zero0["vllm"]  # grads freed
    offloaded = memory_plan(compose_cfg(["stage=mgt_geo", "trainer.offload=all"]), policy, GPUS, 80 * GIB)
    assert offloaded["training"] == max(offloaded["gathered"], offloaded["critic_gathered"]) + offloaded["activations"]


@pytest.mark.parametrize("gpu_gib", [80, 141])
def test_every_stage_fits_8_gpus_as_configured_and_one_gpu_without_zero_is_refused(policy, gpu_gib):
    """The stages default to ZeRO-3 as LMM-R1 ran them on 8 GPUs, and fit 80 and 141 GiB. Without ZeRO,
    on one GPU, fp32 weights and Adam states (16 bytes a parameter: 56 GiB), a bf16 reference and
    vLLM's half of the GPU exceed 80 GiB in every stage; on an H200 (141) the stages with a critic
    (another 56 GiB) do. The start-up check refuses those (train.setup raises its message), and every setting it names fits."""
    too_big = (
        {"fre_text", "fre_multi", "mgt_geo", "mgt_percereason", "mgt_sokoban"} if gpu_gib == 80 else {"mgt_geo", "mgt_sokoban"}
    )
    free = int(0.95 * gpu_gib * GIB)  # (a CUDA context and allocator slack use the rest)
    for stage in ("fre_text", "fre_multi", "mgt_geo", "mgt_percereason", "mgt_sokoban"):
        cfg = compose_cfg([f"stage={stage}"])
        assert cfg.trainer.zero_stage == 3
        assert memory_shortfall(cfg, policy, GPUS, free, gpu_gib * GIB) is None  # fits
        one_gpu = compose_cfg([f"stage={stage}", "trainer.zero_stage=0"])
        problem = memory_shortfall(one_gpu, policy, 1, free, gpu_gib * GIB)
        if stage not in too_big:
            assert problem is None
            continue
        assert re.search(r"needs about .* GiB per GPU .* Settings that would fit: .*GPUs or more", problem)
        options = problem.split("Settings that would fit: ")[1].split(". ")[0].split("; ")
        assert "trainer.zero_stage=3 trainer.offload=all" in options
        for option in options:
            if "GPUs" not in option:  # each named setting, applied, fits
                fixed = OmegaConf.merge(one_gpu, OmegaConf.from_dotlist(option.split()))
                assert memory_shortfall(fixed, policy, 1, free, gpu_gib * GIB) is None
