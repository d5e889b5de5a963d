"""Composition of every stage, the recipe values, and start-up rejection of bad configs."""

import os

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from config import ConfigError, validate
from conftest import compose_cfg, run_train

# LMM-R1's released recipes (DESIGN.md §5): stage -> (actor lr, estimator, max_new_tokens, episodes, kl_coef)
RECIPES = {
    "fre_text": (4e-7, "reinforce_baseline", 4096, 2, 0.001),
    "fre_multi": (1e-6, "reinforce_baseline", 4096, 2, 0.001),
    "mgt_geo": (1e-6, "gae", 4096, 2, 0.001),
    "mgt_percereason": (4e-7, "reinforce_baseline", 8192, 2, 0.001),
    "mgt_sokoban": (1e-6, "gae", 8192, 4, 0.0),
}


@pytest.mark.parametrize("stage", sorted(RECIPES))
def test_every_stage_composes_with_its_recipe(stage):
    cfg = compose_cfg([f"stage={stage}"])
    lr, estimator, max_new, episodes, kl = RECIPES[stage]
    assert cfg.stage.name == stage
    assert cfg.trainer.lr == lr and cfg.algo.estimator == estimator
    assert cfg.rollout.max_new_tokens == max_new and cfg.trainer.episodes == episodes and cfg.algo.kl_coef == kl
    assert cfg.rollout.group_size == 16 and cfg.data.max_prompt_len == 4096
    assert cfg.rollout.prompts_per_step == (128 if stage == "mgt_sokoban" else 256)
    assert cfg.trainer.betas == [0.9, 0.95] and cfg.trainer.warmup_ratio == 0.03 and cfg.trainer.min_lr_ratio == 0.1
    assert cfg.algo.clip_low == cfg.algo.clip_high == 0.2
    if kl:
        assert cfg.algo.kl_estimator == "k1" and cfg.algo.kl_in_reward
    if stage in ("mgt_geo", "mgt_percereason"):
        assert cfg.model.path == "outputs/fre_text/latest/checkpoints/final"  # the FRE-Text run's final checkpoint
    else:
        assert cfg.model.path == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert cfg.model.freeze_vision == (stage == "mgt_sokoban")
    if estimator == "gae":
        assert cfg.algo.critic_lr == {"mgt_geo": 9e-6, "mgt_sokoban": 5e-6}[stage]


@pytest.mark.parametrize("stage", sorted(RECIPES))
def test_debug_tiny_switches_any_stage_to_tiny_cpu_synthetic(stage):
    cfg = compose_cfg([f"stage={stage}", "debug=tiny"])
    assert cfg.model.name == "tiny" and cfg.model.path is None and cfg.model.dtype == "float32"
    assert cfg.data.source == "synthetic" and cfg.trainer.device == "cpu"
    assert cfg.rollout.prompts_per_step * cfg.rollout.group_size <= 64
    assert cfg.algo.estimator == RECIPES[stage][1]  # the algorithm stays the stage's


def test_cli_overrides_beat_stage_and_debug():
    cfg = compose_cfg(["stage=mgt_geo", "trainer.lr=1e-6", "debug=tiny", "rollout.group_size=8"])
    assert cfg.trainer.lr == 1e-6 and cfg.rollout.group_size == 8


@pytest.mark.parametrize("override", ["trainer.lrr=1", "trainer.lr=abc", "algo.estimator=ppo", "rollout.engine=sglang", "nope=1"])
def test_typos_and_wrong_types_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["stage=mgt_geo", override])


def test_keys_added_with_a_plus_fail_naming_the_nearest_and_extension_points_take_new_keys(tmp_path):
    """Hydra's own hint for a typo (`+trainer.lrr=1`) adds the key; validate then names it and the
    key meant. reward.weights (a dict) is where new reward names go, and takes them."""
    import eval as evaluation

    cfg = compose_cfg(["debug=tiny", "+trainer.lrr=1", "+algo.kl_coeff=0.1", "+nope=1"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for line in ("trainer.lrr (did you mean trainer.lr?)", "algo.kl_coeff (did you mean algo.kl_coef?)", "unknown config keys"):
        assert line in str(e.value)
    with pytest.raises(ConfigError, match="trainer.lrr"):
        evaluation.run_eval(cfg, str(tmp_path))  # eval.py reads the same config
    validate(compose_cfg(["debug=tiny", "+reward.weights={toy_rewards\\:digit_fraction: 1.0}"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.mini_batch_size=7"], "mini_batch_size=7 must divide"),
        (["rollout.group_size=1"], "at least 2"),
        (["algo.dual_clip=0.5"], "dual_clip"),
        (["trainer.micro_batch_size=32", "trainer.mini_batch_size=16"], "micro_batch_size=32"),
        (["data.on_error=ignore"], "on_error"),
        (["trainer.shuffle=group", "rollout.group_size=6", "trainer.mini_batch_size=8"], "multiple of rollout.group_size=6"),
        (["data.source=files", "data.train_files=[]"], "train_files is empty"),
        (["rollout.tensor_parallel_size=2"], "only 1 is supported. Each rank samples its own prompts"),
        (["trainer.devices=0"], "trainer.devices=0: expected auto or a number"),
        (["trainer.devices=all"], "trainer.devices=all: expected auto or a number"),
        (["eval.max_new_tokens=0"], "eval.max_new_tokens=0 must be >= 1"),
        (["trainer.zero_stage=1", "trainer.offload=optimizer"], "offload=optimizer needs trainer.zero_stage=2 or 3"),
        (["trainer.zero_stage=2", "trainer.offload=all"], r"offload=all needs trainer.zero_stage=2 or 3 \('all': 3\)"),
    ],
)
def test_cross_key_rules_are_checked_at_start_up(overrides, message):
    cfg = compose_cfg(["debug=tiny", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_cli_rejects_typo_naming_the_key(tmp_path):
    out = run_train(["stage=mgt_geo", "trainer.lrr=1"], cwd=tmp_path)
    assert out.returncode != 0 and "lrr" in out.stderr
    out = run_train(["stage=mgt_geo", "trainer.lr=fast"], cwd=tmp_path)
    assert out.returncode != 0 and "trainer.lr" in out.stderr


def test_cfg_job_prints_resolved_config_without_loading_a_model(tmp_path):
    out = run_train(["stage=fre_text", "--cfg", "job"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.stage.name == "fre_text" and cfg.trainer.lr == 4e-7 and cfg.algo.estimator == "reinforce_baseline"
    assert not os.path.exists(tmp_path / "outputs")  # nothing ran


def test_default_model_without_weights_fails_fast_with_help(tmp_path):
    out = run_train([], cwd=tmp_path, env_extra={"HF_HUB_CACHE": str(tmp_path / "empty_cache")}, timeout=120)
    assert out.returncode == 1
    assert "huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct" in out.stderr
    assert "python train.py debug=tiny" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("debug", ["tiny", "tiny_random"])
def test_tiny_percereason_is_tiny_fre_multi(debug):
    """Their debug forms differ in the stage's name only (both VerMulti-shaped synthetic tasks,
    reinforce_baseline, the same rewards): the tests that train every stage train one of the two."""
    configs = [
        OmegaConf.to_container(compose_cfg([f"stage={stage}", f"debug={debug}"])) for stage in ("fre_multi", "mgt_percereason")
    ]
    assert [c["stage"].pop("name") for c in configs] == ["fre_multi", "mgt_percereason"]
    assert configs[0] == configs[1]


def test_a_float32_run_is_refused_where_the_gpu_varlen_kernels_would_run(monkeypatch, tmp_path):
    """The GPU kernels take fp16 / bf16 only: a model.dtype=float32 run (the tiny preset's) with
    packing stops at start-up, before any model loads, saying what to set (CPU stand-in: the
    kernels' path forced on)."""
    import train

    monkeypatch.setattr(train, "uses_varlen_kernels", lambda device: True)
    cfg = compose_cfg(["debug=tiny_random"])
    assert cfg.model.dtype == "float32" and cfg.trainer.packing
    with pytest.raises(ConfigError, match="model.dtype=bfloat16 .* or trainer.packing=false"):
        train.setup(cfg, str(tmp_path))
