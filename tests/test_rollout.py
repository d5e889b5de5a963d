"""The engine contract, checked on the HF engine: groups, stop handling, masks, sampling knobs."""

import pytest
import torch.nn as nn
from omegaconf import OmegaConf

from config import RolloutConfig
from data import encode_prompt, synthetic_samples
from model import STOP_TOKENS, VISION_TOKENS
from rollout import HFEngine


def rcfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(RolloutConfig), {"micro_batch_size": 5, "max_new_tokens": 12, **kw})


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
    out = HFEngine(tiny_model, tokenizer, rcfg()).generate(prompts, group_size=4, seed=0)
    assert out.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert len(out.completion_ids) == len(out.texts) == len(out.truncated) == 12
    assert all(1 <= len(c) <= 12 for c in out.completion_ids)


def test_vision_tokens_are_never_sampled(tiny_model, tokenizer, prompts):
    banned = set(tokenizer.convert_tokens_to_ids(VISION_TOKENS))
    favour_token(tiny_model, tokenizer.convert_tokens_to_ids("<|image_pad|>"), 8.0)  # the model now wants them
    out = HFEngine(tiny_model, tokenizer, rcfg(max_new_tokens=16)).generate(prompts, group_size=8, seed=0)
    assert not any(t in banned for c in out.completion_ids for t in c)


def test_stops_at_im_end_and_reports_truncation(tiny_model, tokenizer, prompts):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    favour_token(tiny_model, im_end, 4.0)
    out = HFEngine(tiny_model, tokenizer, rcfg(max_new_tokens=12)).generate(prompts, group_size=8, seed=1)
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
    a = engine.generate(prompts, 3, seed=7).completion_ids
    assert a == engine.generate(prompts, 3, seed=7).completion_ids
    assert a != engine.generate(prompts, 3, seed=8).completion_ids


def test_greedy_when_temperature_is_zero(tiny_model, tokenizer, prompts):
    out = HFEngine(tiny_model, tokenizer, rcfg(temperature=0.0)).generate(prompts, 3, seed=0)
    assert out.completion_ids[0] == out.completion_ids[1] == out.completion_ids[2]


def test_checkpoint_generation_config_does_not_change_sampling(tiny_model, tokenizer, prompts):
    """Qwen ships generation_config.json with top_k=1, repetition_penalty=1.05; the policy being
    trained must sample with the rollout config alone."""
    tiny_model.generation_config.top_k = 1
    tiny_model.generation_config.repetition_penalty = 5.0
    engine = HFEngine(tiny_model, tokenizer, rcfg())
    gc = engine.generation_config()
    assert gc.top_k == 0 and gc.repetition_penalty == 1.0
    out = engine.generate(prompts[:1], 6, seed=0)
    assert len({tuple(c) for c in out.completion_ids}) > 1  # top_k=1 would make every sample identical


def test_engine_restores_training_mode(tiny_model, tokenizer, prompts):
    tiny_model.train()
    HFEngine(tiny_model, tokenizer, rcfg()).generate(prompts[:1], 2, seed=0)
    assert tiny_model.training
