"""The engine contract: groups, stop handling, masks, sampling knobs, multimodal prompts, log-probs.

Engine-agnostic checks run against every engine: the HF engine always, vLLM wherever vLLM and a
CUDA GPU are present (skipped with the reason otherwise, never faked). The weight-sync test is
vLLM's: after a sync its greedy samples and log-probs must follow the trainer's weights.
"""

import copy

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from config import RolloutConfig
from data import encode_prompt, synthetic_samples
from model import STOP_TOKENS, VISION_TOKENS, build_tiny_model, collate, save_checkpoint, sequence_logps, use_varlen_attention
from rollout import HFEngine, Rollout, VLLMEngine, check_vllm, weight_buckets


def per_prompt(seed: int, prompts) -> list:
    return [seed * 1000 + k for k in range(len(prompts))]


def rcfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(RolloutConfig), {"micro_batch_size": 5, "max_new_tokens": 12, **kw})


@pytest.fixture(params=["hf", pytest.param("vllm", marks=pytest.mark.gpu)])
def engine_and_model(request, tokenizer, tiny_cfg, tmp_path_factory):
    """(make_engine(**rollout overrides), the trainer-side model it samples)."""
    if request.param == "hf":
        model = build_tiny_model(tokenizer, tiny_cfg.model.tiny, seed=0).eval()
        use_varlen_attention(model, "sdpa")
        return (lambda **kw: HFEngine(model, tokenizer, rcfg(**kw))), model
    path = str(tmp_path_factory.mktemp("vllm_tiny"))
    model, mcfg = vllm_ready_tiny_model(tokenizer, tiny_cfg, path)
    return (lambda **kw: VLLMEngine(path, tokenizer, rcfg(**kw), mcfg, max_model_len=2048, seed=0)), model


def vllm_ready_tiny_model(tokenizer, tiny_cfg, path: str):
    """(the tiny model on the GPU, its model config), saved at `path` for vLLM; skips without vLLM/GPU.
    Attention heads are 64 wide, which vLLM's kernels support (the default tiny model's are 16)."""
    problem = check_vllm()
    if problem:
        pytest.skip(problem)
    sizes = OmegaConf.merge(tiny_cfg.model.tiny, {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                                                   "vision_hidden_size": 128, "vision_num_heads": 2})  # fmt: skip
    model = build_tiny_model(tokenizer, sizes, seed=0).eval().cuda()
    use_varlen_attention(model, "sdpa")
    save_checkpoint(path, model, tokenizer, None)
    return model, OmegaConf.merge(tiny_cfg.model, {"dtype": "float32"})


@pytest.fixture()
def prompts(tokenizer, image_processor):
    samples = synthetic_samples("shapes", 2, 0, 112, "S") + synthetic_samples("arithmetic", 1, 0, 112, "S")
    return [encode_prompt(s, tokenizer, image_processor) for s in samples]


def favour_token(model, token_id: int, bias: float):
    """Give lm_head a bias towards one token (to make stops likely)."""
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[token_id] = bias
    model.lm_head = head


def test_groups_are_consecutive_and_sizes_match(tiny_model, tokenizer, prompts):
    out = HFEngine(tiny_model, tokenizer, rcfg()).generate(prompts, group_size=4, seeds=per_prompt(0, prompts))
    assert out.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert len(out.completion_ids) == len(out.texts) == len(out.truncated) == 12
    assert all(1 <= len(c) <= 12 for c in out.completion_ids)


def test_vision_tokens_are_never_sampled(tiny_model, tokenizer, prompts):
    banned = set(tokenizer.convert_tokens_to_ids(VISION_TOKENS))
    favour_token(tiny_model, tokenizer.convert_tokens_to_ids("<|image_pad|>"), 8.0)  # the model now wants them
    out = HFEngine(tiny_model, tokenizer, rcfg(max_new_tokens=16)).generate(prompts, group_size=8, seeds=per_prompt(0, prompts))
    assert not any(t in banned for c in out.completion_ids for t in c)


def test_stops_at_im_end_and_reports_truncation(tiny_model, tokenizer, prompts):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    favour_token(tiny_model, im_end, 4.0)
    out = HFEngine(tiny_model, tokenizer, rcfg(max_new_tokens=12)).generate(prompts, group_size=8, seeds=per_prompt(1, prompts))
    stops = set(tokenizer.convert_tokens_to_ids(STOP_TOKENS))
    stopped = [not t for t in out.truncated]
    assert any(stopped) and not all(stopped)  # both cases occur with this bias and seed
    for ids, text, truncated in zip(out.completion_ids, out.texts, out.truncated):
        inner = ids if truncated else ids[:-1]
        assert not any(t in stops for t in inner)  # nothing after the first stop token
        assert truncated == (ids[-1] not in stops)
        if truncated:
            assert len(ids) == 12
        assert "<|im_end|>" not in text and text == tokenizer.decode(inner)


def test_sampling_is_seeded(tiny_model, tokenizer, prompts):
    engine = HFEngine(tiny_model, tokenizer, rcfg())
    a = engine.generate(prompts, 3, seeds=per_prompt(7, prompts)).completion_ids
    assert a == engine.generate(prompts, 3, seeds=per_prompt(7, prompts)).completion_ids
    assert a != engine.generate(prompts, 3, seeds=per_prompt(8, prompts)).completion_ids


def test_greedy_when_temperature_is_zero(tiny_model, tokenizer, prompts):
    out = HFEngine(tiny_model, tokenizer, rcfg(temperature=0.0)).generate(prompts, 3, seeds=per_prompt(0, prompts))
    assert out.completion_ids[0] == out.completion_ids[1] == out.completion_ids[2]


def test_checkpoint_generation_config_does_not_change_sampling(tiny_model, tokenizer, prompts):
    """Qwen ships generation_config.json with top_k=1, repetition_penalty=1.05; the policy being
    trained must sample with the rollout config alone."""
    tiny_model.generation_config.top_k = 1
    tiny_model.generation_config.repetition_penalty = 5.0
    engine = HFEngine(tiny_model, tokenizer, rcfg())
    gc = engine.generation_config()
    assert gc.top_k == 0 and gc.repetition_penalty == 1.0
    out = engine.generate(prompts[:1], 6, seeds=per_prompt(0, prompts[:1]))
    assert len({tuple(c) for c in out.completion_ids}) > 1  # top_k=1 would make every sample identical


def test_engine_restores_training_mode(tiny_model, tokenizer, prompts):
    tiny_model.train()
    HFEngine(tiny_model, tokenizer, rcfg()).generate(prompts[:1], 2, seeds=per_prompt(0, prompts[:1]))
    assert tiny_model.training


# ---- every engine ----


def test_contract_groups_sizes_and_stops(engine_and_model, tokenizer, prompts):
    make, _ = engine_and_model
    out = make(max_new_tokens=10).generate(prompts, group_size=3, seeds=per_prompt(0, prompts))
    assert isinstance(out, Rollout) and out.prompt_index == [0] * 3 + [1] * 3 + [2] * 3  # image, image, text prompts
    stops = set(tokenizer.convert_tokens_to_ids(STOP_TOKENS))
    banned = set(tokenizer.convert_tokens_to_ids(VISION_TOKENS))
    for ids, text, truncated, lp in zip(out.completion_ids, out.texts, out.truncated, out.logprobs):
        assert 1 <= len(ids) <= 10 and len(lp) == len(ids)
        assert truncated == (ids[-1] not in stops) and not any(t in stops for t in ids[:-1])
        assert not any(t in banned for t in ids)
        assert all(x <= 0 for x in lp)
        assert text == tokenizer.decode(ids if truncated else ids[:-1])


def test_contract_seeding_and_group_diversity(engine_and_model, prompts):
    make, _ = engine_and_model
    engine = make()
    a = engine.generate(prompts, 4, seeds=per_prompt(3, prompts))
    assert a.completion_ids == engine.generate(prompts, 4, seeds=per_prompt(3, prompts)).completion_ids
    assert a.completion_ids != engine.generate(prompts, 4, seeds=per_prompt(4, prompts)).completion_ids
    assert len({tuple(c) for c in a.completion_ids[:4]}) > 1  # a group's samples differ


def test_contract_sampler_logprobs_are_the_trainers(engine_and_model, tokenizer, prompts):
    """The engine's log-probs of what it sampled equal the trainer's log-probs of the same tokens
    (same temperature, vision tokens banned): the basis of rollout/logp_diff and algo.tis_clip."""
    make, model = engine_and_model
    out = make(temperature=0.8, logprobs=True).generate(prompts, 2, seeds=per_prompt(0, prompts))
    items = [(prompts[k], c) for k, c in zip(out.prompt_index, out.completion_ids)]
    device = next(model.parameters()).device
    banned = torch.tensor(tokenizer.convert_tokens_to_ids(VISION_TOKENS), device=device)
    with torch.no_grad():
        logp = sequence_logps(model, collate(items, tokenizer.pad_token_id, model.config.image_token_id, device), 0.8, 64, banned)
    for i, lp in enumerate(out.logprobs):
        torch.testing.assert_close(logp[i, : len(lp)].cpu(), torch.tensor(lp), atol=1e-3, rtol=0)


def test_logprobs_can_be_turned_off(engine_and_model, prompts):
    make, _ = engine_and_model
    assert make(logprobs=False).generate(prompts[:1], 2, seeds=per_prompt(0, prompts[:1])).logprobs is None


# ---- vLLM weight sync ----


@pytest.mark.gpu
def test_vllm_follows_the_trainers_weights_after_a_sync(tokenizer, tiny_cfg, tmp_path, prompts):
    """After a sync, vLLM's greedy samples and log-probs are the trainer's; they change when the
    weights change (the silent failure of an engine still sampling from its start weights)."""
    model, mcfg = vllm_ready_tiny_model(tokenizer, tiny_cfg, str(tmp_path))
    engine = VLLMEngine(str(tmp_path), tokenizer, rcfg(temperature=0.0), mcfg, max_model_len=2048, seed=0)
    hf = HFEngine(model, tokenizer, rcfg(temperature=0.0))
    before = engine.generate(prompts, 1, seeds=per_prompt(0, prompts))
    assert before.completion_ids == hf.generate(prompts, 1, seeds=per_prompt(0, prompts)).completion_ids
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.sync_weights(model)
    after = engine.generate(prompts, 1, seeds=per_prompt(0, prompts))
    assert after.completion_ids == hf.generate(prompts, 1, seeds=per_prompt(0, prompts)).completion_ids
    assert after.completion_ids != before.completion_ids
    for a, b in zip(after.logprobs, hf.generate(prompts, 1, seeds=per_prompt(0, prompts)).logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-3, rtol=0)


# ---- weight buckets (the sync up to the engine boundary) ----


def test_weight_buckets_cover_trainable_weights_once_in_bounded_buckets(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.model.visual.requires_grad_(False)  # frozen vision: not re-sent
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    bucket_bytes = 64 << 10
    seen = []
    for bucket in weight_buckets(model, bucket_bytes, torch.bfloat16):
        sizes = [t.numel() * 2 for _, t in bucket]
        assert sum(sizes) - sizes[-1] < bucket_bytes  # a bucket closes as soon as it is full
        for name, tensor in bucket:
            assert tensor.dtype == torch.bfloat16 and not tensor.requires_grad
            torch.testing.assert_close(tensor.float(), trainable[name].detach().to(torch.bfloat16).float())
            seen.append(name)
    assert seen == list(trainable) and not any("visual" in n for n in seen)
    assert "lm_head.weight" in seen or model.config.tie_word_embeddings


def test_stages_default_to_vllm_and_say_what_is_missing_where_it_cannot_run(tmp_path, tiny_model, tokenizer, image_processor):
    import train
    from config import ConfigError
    from conftest import compose_cfg

    cfg = compose_cfg(["stage=mgt_geo"])
    assert cfg.rollout.engine == "vllm" and compose_cfg(["stage=mgt_geo", "debug=tiny"]).rollout.engine == "hf"
    save_checkpoint(str(tmp_path / "ckpt"), tiny_model, tokenizer, image_processor)
    cfg = compose_cfg(["stage=fre_text", f"model.path={tmp_path / 'ckpt'}", "log.wandb=disabled"])
    problem = check_vllm()
    if problem is None:
        pytest.skip("vLLM and a GPU are present here: the stage would start")
    with pytest.raises(ConfigError, match="rollout.engine=vllm needs"):
        train.run(cfg, str(tmp_path / "run"))


def test_a_prompts_group_does_not_depend_on_the_other_prompts(tiny_model, tokenizer, prompts):
    """What lets data-parallel ranks sample exactly what a single process would."""
    engine = HFEngine(tiny_model, tokenizer, rcfg(micro_batch_size=2))
    together = engine.generate(prompts, 3, seeds=[11, 12, 13])
    alone = engine.generate(prompts[1:2], 3, seeds=[12])
    assert together.completion_ids[3:6] == alone.completion_ids and together.logprobs[3:6] == alone.logprobs
