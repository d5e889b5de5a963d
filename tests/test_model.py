"""The tiny preset (real classes, local tokenizer, PIL processor), log-probs and checkpoints."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

from data import encode_prompt, synthetic_samples
from conftest import compose_cfg, reference_logps, tiny_text_model
from model import (
    MASTER_FILE,
    QWEN_SPECIAL_TOKENS,
    VISION_TOKENS,
    Critic,
    build_tiny_model,
    build_tiny_tokenizer,
    collate,
    frozen_copy,
    load_policy,
    load_weights,
    pack,
    resolve_model_path,
    save_checkpoint,
    save_master_weights,
    sequence_logps,
    sequence_values,
    warm_start_path,
    warm_start_samples,
)
from rollout import generation_inputs


def mixed_prompts(tokenizer, image_processor):
    """Two image prompts (different sizes) and two text-only prompts."""
    img = synthetic_samples("shapes", 2, seed=1, image_size=112, system_prompt="sys")
    img[1].messages[1]["content"][0]["image"] = Image.new("RGB", (84, 56), "red")
    txt = synthetic_samples("arithmetic", 2, seed=1, image_size=112, system_prompt="sys")
    return [encode_prompt(s, tokenizer, image_processor) for s in (img[0], txt[0], img[1], txt[1])]


# ---- tokenizer, model, processor ----


def test_tokenizer_is_deterministic_and_has_qwen_special_tokens(tokenizer):
    again = build_tiny_tokenizer(len(tokenizer) if len(tokenizer) <= 512 else 512)
    assert again.get_vocab() == tokenizer.get_vocab()
    for tok in QWEN_SPECIAL_TOKENS:
        ids = tokenizer(tok, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == tok
    text = "Ünïcode ∑ 12+7=19 <think> x </think>"
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # byte-level: any text round-trips
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_chat_template_is_qwens(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_system = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert no_system.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_tiny_model_is_real_qwen2_5_vl_and_deterministic(tokenizer, tiny_cfg):
    a = build_tiny_model(tokenizer, tiny_cfg.model.tiny, seed=3)
    b = build_tiny_model(tokenizer, tiny_cfg.model.tiny, seed=3)
    c = build_tiny_model(tokenizer, tiny_cfg.model.tiny, seed=4)
    assert isinstance(a, Qwen2_5_VLForConditionalGeneration)
    assert a.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert sum(p.numel() for p in a.parameters()) < 1_000_000


def test_warm_start_is_deterministic_cached_and_keyed_by_its_recipe(tiny_cfg, tmp_path, monkeypatch):
    """Two machines (two caches) build the same warm start; a second load, from a run of another
    seed too, reads the cache and builds nothing; another tiny config, warm-start seed or training
    set is another cache entry; and it changed the weights."""
    mcfg = compose_cfg(["debug=tiny", "model.tiny.warm_start_steps=3"]).model
    built = []
    for cache, new_files, run_seed in (("a", 1, 0), ("b", 1, 0), ("a", 0, 7)):
        monkeypatch.setenv("LMM_R1_CACHE", str(tmp_path / cache))
        before = set(tmp_path.rglob("*.safetensors"))
        built.append(load_policy(mcfg, run_seed, torch.device("cpu"))[0].state_dict())
        assert len(set(tmp_path.rglob("*.safetensors")) - before) == new_files
    assert all(torch.equal(built[0][k], built[i][k]) for i in (1, 2) for k in built[0])
    random = load_policy(OmegaConf.merge(mcfg, {"tiny": {"warm_start_steps": 0}}), 0, torch.device("cpu"))[0].state_dict()
    assert any(not torch.equal(built[0][k], random[k]) for k in random)
    _, tokenizer, processor = load_policy(mcfg, 0, torch.device("cpu"))
    pairs = warm_start_samples(0)
    paths = {warm_start_path(mcfg.tiny, tokenizer, processor, pairs),
             warm_start_path(OmegaConf.merge(mcfg.tiny, {"warm_start_seed": 1}), tokenizer, processor, pairs),
             warm_start_path(OmegaConf.merge(mcfg.tiny, {"warm_start_lr": 1e-3}), tokenizer, processor, pairs),
             warm_start_path(mcfg.tiny, tokenizer, processor, pairs[:-1])}  # the data (prompts, solutions, pixels) is in the key  # fmt: skip
    assert len(paths) == 4 and all(p.startswith(str(tmp_path / "a")) for p in paths)


@pytest.mark.slow
def test_a_run_from_a_built_warm_start_equals_one_from_the_cache(tmp_path, monkeypatch):
    """The first run on a machine builds the warm start, later ones load it: both must train alike,
    step for step (a built model once kept its last supervised gradients, summed into RL's first
    update, so the two parted ways within a few steps)."""
    import train
    from test_resume import metrics_of, same_metrics

    monkeypatch.setenv("LMM_R1_CACHE", str(tmp_path / "cache"))
    cfg = compose_cfg(["debug=tiny", "model.tiny.warm_start_steps=5", "trainer.max_steps=3", "rollout.prompts_per_step=4",
                       "rollout.group_size=4", "rollout.max_new_tokens=16", "trainer.mini_batch_size=8",
                       "trainer.micro_batch_size=8", "log.wandb=disabled", "log.progress=false"])  # fmt: skip
    runs = []
    for name in ("built", "cached"):
        before = set((tmp_path / "cache").rglob("*.safetensors"))
        train.run(cfg, str(tmp_path / name))
        assert len(set((tmp_path / "cache").rglob("*.safetensors")) - before) == (name == "built")
        runs.append(metrics_of(tmp_path / name))
    built, cached = runs
    assert len(built) == len(cached) == 3
    assert all(same_metrics(a, b) for a, b in zip(built, cached)), (built, cached)


def test_image_processor_resizes_within_pixel_budget(image_processor):
    out = image_processor(images=[Image.new("RGB", (112, 112)), Image.new("RGB", (640, 480))], return_tensors="pt")
    grid = out["image_grid_thw"]
    assert grid[0].tolist() == [1, 8, 8]  # 112 / 14 patches per side
    h, w = grid[1, 1].item() * 14, grid[1, 2].item() * 14
    assert h * w <= image_processor.size["longest_edge"] and h % 28 == 0 and w % 28 == 0
    assert out["pixel_values"].shape[0] == int(grid.prod(-1).sum())


# ---- log-probs ----


def test_batched_chunked_logps_equal_one_sequence_at_a_time(tiny_model, tokenizer, image_processor):
    prompts = mixed_prompts(tokenizer, image_processor)
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(20, len(tokenizer), (n,), generator=g).tolist() for n in (5, 9, 1, 7)]
    items = list(zip(prompts, completions))
    batch = collate(items, tokenizer.pad_token_id, tiny_model.config.image_token_id, "cpu")
    banned = torch.tensor(tokenizer.convert_tokens_to_ids(VISION_TOKENS))
    with torch.no_grad():
        logp = sequence_logps(tiny_model, batch, temperature=0.7, chunk_size=3, banned_ids=banned)
        for i, (p, c) in enumerate(items):
            ref = reference_logps(tiny_model, p, c, 0.7, banned)
            torch.testing.assert_close(logp[i, : len(c)], ref, atol=1e-5, rtol=0)
            assert (logp[i, len(c) :] == 0).all()


def test_chunked_logps_gradient_equals_unchunked(tiny_model, tokenizer, image_processor):
    prompts = mixed_prompts(tokenizer, image_processor)[:2]
    items = [(prompts[0], [30, 31, 32, 33]), (prompts[1], [40, 41])]
    batch = collate(items, tokenizer.pad_token_id, tiny_model.config.image_token_id, "cpu")
    grads = []
    for chunk in (2, 1024):
        tiny_model.zero_grad()
        logp, entropy = sequence_logps(tiny_model, batch, 1.0, chunk, with_entropy=True)
        logp.sum().backward()
        grads.append(tiny_model.lm_head.weight.grad.clone())
        assert not entropy.requires_grad and (entropy[batch["completion_mask"]] > 0).all()
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_trainer_logps_match_sampling_distribution(tiny_model, tokenizer, image_processor):
    """Generation (left-padded, KV cache, suppressed vision tokens, temperature) and the trainer's
    right-padded forward must define the same distribution, or the importance ratio is off."""
    prompts = mixed_prompts(tokenizer, image_processor)
    banned = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    inputs = generation_inputs(tiny_model, prompts, tokenizer.pad_token_id, "cpu")
    torch.manual_seed(0)
    out = tiny_model.generate(
        **inputs,
        do_sample=True,
        temperature=0.8,
        top_k=0,
        top_p=1.0,
        max_new_tokens=6,
        suppress_tokens=banned,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    L = inputs["input_ids"].shape[1]
    completions = out.sequences[:, L:]  # (4, 6)
    assert completions.shape == (4, 6) and not (completions == tokenizer.eos_token_id).any()  # no early stop with this seed
    scores = torch.stack(out.scores, 1).float()  # (4, 6, V), already / temperature with banned = -inf
    gen_logp = F.log_softmax(scores, -1).gather(2, completions[..., None]).squeeze(-1)
    batch = collate(list(zip(prompts, completions.tolist())), tokenizer.pad_token_id, tiny_model.config.image_token_id, "cpu")
    with torch.no_grad():
        logp = sequence_logps(tiny_model, batch, 0.8, 5, torch.tensor(banned))
    torch.testing.assert_close(logp, gen_logp, atol=1e-4, rtol=0)


def test_critic_values_start_at_zero_and_train(tiny_model, tokenizer, image_processor):
    critic = Critic(tiny_model)
    prompts = mixed_prompts(tokenizer, image_processor)[:2]
    batch = collate([(prompts[0], [30, 31]), (prompts[1], [40])], tokenizer.pad_token_id, tiny_model.config.image_token_id, "cpu")
    values = sequence_values(critic, batch)
    assert values.shape == (2, 2) and values.abs().max().item() == 0.0
    values.sum().backward()
    assert critic.value_head.weight.grad.abs().sum() > 0
    assert not hasattr(critic.backbone, "lm_head")


def test_bf16_reference_matches_the_fp32_one_at_half_the_bytes(tiny_model, tokenizer, image_processor):
    prompts = mixed_prompts(tokenizer, image_processor)
    batch = pack([(p, list(range(30 + i, 40 + i))) for i, p in enumerate(prompts)], tiny_model, tokenizer.pad_token_id, "cpu")
    mask = batch["completion_mask"]
    fp32, bf16 = frozen_copy(tiny_model), frozen_copy(tiny_model, torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in bf16.parameters())
    assert all(b.dtype == torch.float32 for b in bf16.buffers())  # rotary frequencies stay exact
    nbytes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in (fp32, bf16)]
    assert nbytes[1] * 2 == nbytes[0]
    with torch.no_grad():
        exact = sequence_logps(fp32, batch, 1.0, 16)[mask]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # how the run computes ref_logp
            today = sequence_logps(fp32, batch, 1.0, 16)[mask]
            ours = sequence_logps(bf16, batch, 1.0, 16)[mask]
    # bf16 rounding (~3 digits of log-probs near -6), no worse than the fp32 copy under autocast
    assert (ours - exact).abs().max() < 0.01 and (ours - exact).abs().max() < 2 * (today - exact).abs().max()
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())  # the policy is untouched


# ---- loading and checkpoints ----


def test_checkpoint_reloads_with_from_pretrained(tmp_path, tiny_model, tokenizer, image_processor):
    save_checkpoint(str(tmp_path / "ckpt"), tiny_model, tokenizer, image_processor)
    assert os.path.exists(tmp_path / "ckpt" / "model.safetensors")
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert tok.get_vocab() == tokenizer.get_vocab() and tok.chat_template == tokenizer.chat_template
    ids = torch.tensor([tokenizer("What is $1 + 2$?").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


def tied_tiny_model(tiny_model):
    """The tiny model with lm_head tied to the embeddings, as the 3B has them; random fp32 weights."""
    config = copy.deepcopy(tiny_model.config)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return model


def test_checkpoint_in_the_compute_dtype_with_exact_master_weights(tmp_path, tiny_model, tokenizer, image_processor):
    from safetensors import safe_open

    model = tied_tiny_model(tiny_model)
    critic = Critic(model)
    save_checkpoint(str(tmp_path / "fp32"), model, tokenizer, image_processor)
    save_checkpoint(str(tmp_path / "bf16"), model, tokenizer, image_processor, critic, dtype=torch.bfloat16)
    save_master_weights(str(tmp_path / "bf16"), model, torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert "lm_head.weight" not in names  # the tied weight is written once
    size = {d: os.path.getsize(tmp_path / d / "model.safetensors") for d in ("fp32", "bf16")}
    assert 0.49 < size["bf16"] / size["fp32"] < 0.51
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "bf16")  # config.json says bf16
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    ids = torch.tensor([tokenizer("What is $1 + 2$?").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits.float(), model(input_ids=ids).logits, atol=0.05, rtol=0.05)

    # resume: the master file restores the fp32 weights exactly; the bf16 HF copy alone would not
    fresh, fresh_critic = tied_tiny_model(tiny_model), Critic(model)
    with torch.no_grad():
        for p in [*fresh.parameters(), *fresh_critic.parameters()]:
            p.zero_()
    load_weights(str(tmp_path / "bf16"), fresh, fresh_critic)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert q.dtype == torch.float32 and torch.equal(p, q), name
    assert fresh.lm_head.weight is fresh.model.language_model.embed_tokens.weight
    assert all(torch.equal(p, q) for p, q in zip(critic.parameters(), fresh_critic.parameters()))
    os.remove(tmp_path / "bf16" / MASTER_FILE)
    load_weights(str(tmp_path / "bf16"), fresh)
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    save_master_weights(str(tmp_path / "fp32"), model, torch.float32)  # the HF copy is already exact
    assert not os.path.exists(tmp_path / "fp32" / MASTER_FILE)


def test_load_policy_from_checkpoint_and_text_only_qwen2(tmp_path, tiny_model, tokenizer, image_processor, tiny_cfg):
    save_checkpoint(str(tmp_path / "vl"), tiny_model, tokenizer, image_processor)
    mcfg = tiny_cfg.model.copy()
    mcfg.path = str(tmp_path / "vl")
    model, tok, proc = load_policy(mcfg, seed=0, device=torch.device("cpu"))
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration) and proc is not None
    text_model = tiny_text_model(tokenizer, layers=1)
    save_checkpoint(str(tmp_path / "text"), text_model, tokenizer, None)
    mcfg.path = str(tmp_path / "text")
    model, tok, proc = load_policy(mcfg, seed=0, device=torch.device("cpu"))
    assert isinstance(model, Qwen2ForCausalLM) and proc is None


def test_missing_weights_fail_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(None) is None
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_path("no-such-org/no-such-model-xyz")
    assert "huggingface-cli download no-such-org/no-such-model-xyz" in str(e.value) and "debug=tiny" in str(e.value)
    with pytest.raises(FileNotFoundError, match="stage=fre_text"):
        resolve_model_path("outputs/fre_text/latest/checkpoints/final")


def test_freeze_vision(tiny_cfg):
    mcfg = tiny_cfg.model.copy()
    mcfg.freeze_vision = True
    model, _, _ = load_policy(mcfg, seed=0, device=torch.device("cpu"))
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_entropy_bonus_has_a_gradient_only_when_asked(tiny_model, tokenizer, image_processor):
    prompts = mixed_prompts(tokenizer, image_processor)[:2]
    batch = collate(
        [(prompts[0], [30, 31, 32]), (prompts[1], [40])], tokenizer.pad_token_id, tiny_model.config.image_token_id, "cpu"
    )
    _, plain = sequence_logps(tiny_model, batch, 1.0, 2, with_entropy=True)
    _, bonus = sequence_logps(tiny_model, batch, 1.0, 2, with_entropy=True, entropy_grad=True)
    assert not plain.requires_grad and bonus.requires_grad
    torch.testing.assert_close(plain, bonus.detach())
    tiny_model.zero_grad()
    bonus.sum().backward()
    assert tiny_model.lm_head.weight.grad.abs().sum() > 0
