"""Padding-free micro-batches: packed sequences, varlen attention, per-sequence mrope, chunked log-probs.

Everything is compared with the obvious computation: one sequence at a time, through transformers'
own forward (its own mrope positions, a plain causal mask, full-vocab logits).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import completion_logprobs, reference_logps, tiny_text_model
from data import Sample, encode_prompt, synthetic_samples
from model import VISION_TOKENS, collate, pack, per_sequence_causal_attention, sequence_logps, sequence_values, Critic
from rollout import Rollout, cut_vision_tokens
from train import aggregate, first_fit_decreasing, micro_batches, policy_loss, sequence_weights


def two_image_sample() -> Sample:
    """One prompt with two images of different sizes."""
    content = [
        {"type": "image", "image": Image.new("RGB", (56, 84), "blue")},
        {"type": "text", "text": "Compare"},
        {"type": "image", "image": Image.new("RGB", (112, 56), "green")},
        {"type": "text", "text": "these two."},
    ]
    return Sample(messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": content}], answer="1")


@pytest.fixture()
def items(tokenizer, image_processor):
    """Text-only prompts, one-image prompts, a two-image prompt; completions of 1 to 40 tokens."""
    img = synthetic_samples("shapes", 2, seed=3, image_size=112, system_prompt="sys")
    img[1].messages[1]["content"][0]["image"] = Image.new("RGB", (84, 56), "red")
    txt = synthetic_samples("arithmetic", 2, seed=3, image_size=112, system_prompt="sys")
    samples = [txt[0], img[0], two_image_sample(), txt[1], img[1]]
    prompts = [encode_prompt(s, tokenizer, image_processor) for s in samples]
    g = torch.Generator().manual_seed(0)
    lengths = [40, 3, 17, 1, 25]
    return [(p, torch.randint(20, 400, (n,), generator=g).tolist()) for p, n in zip(prompts, lengths)]


def test_the_batch_mixes_what_the_issue_asks(items):
    n_images = [0 if p.image_grid_thw is None else len(p.image_grid_thw) for p, _ in items]
    assert n_images == [0, 1, 2, 0, 1]
    grids = items[2][0].image_grid_thw
    assert grids[0].tolist() != grids[1].tolist()  # two images of different sizes in one prompt
    lengths = [len(p.input_ids) + len(c) for p, c in items]
    assert max(lengths) > 2 * min(lengths)


def test_packed_logps_and_gradients_equal_one_sequence_at_a_time(tiny_model, tokenizer, items):
    banned = torch.tensor(tokenizer.convert_tokens_to_ids(VISION_TOKENS))
    batch = pack(items, tiny_model, tokenizer.pad_token_id, "cpu")
    assert batch["input_ids"].shape == (1, sum(len(p.input_ids) + len(c) for p, c in items))  # no padding at all
    tiny_model.zero_grad()
    logp = sequence_logps(tiny_model, batch, temperature=0.7, chunk_size=8, banned_ids=banned)  # (B, Tc)
    (logp * batch["completion_mask"]).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad()
    for i, (p, c) in enumerate(items):
        ref = reference_logps(tiny_model, p, c, 0.7, banned)
        torch.testing.assert_close(logp[i, : len(c)].detach(), ref.detach(), atol=1e-5, rtol=0)
        assert (logp[i, len(c) :] == 0).all()
        ref.sum().backward()
    ref_grads = {n: p.grad for n, p in tiny_model.named_parameters() if p.grad is not None}
    assert packed_grads.keys() == ref_grads.keys()
    assert any("visual" in n for n in ref_grads)  # the vision tower's gradients are compared too
    for name, g in ref_grads.items():
        torch.testing.assert_close(packed_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_positions_are_transformers_mrope_per_sequence(tiny_model, tokenizer, items):
    batch = pack(items, tiny_model, tokenizer.pad_token_id, "cpu")
    cu = batch["cu_seqlens"].tolist()
    for k, (p, c) in enumerate(items):
        ids = torch.tensor([p.input_ids + c])
        types = torch.zeros_like(ids)
        types[0, : len(p.input_ids)] = (ids[0, : len(p.input_ids)] == tiny_model.config.image_token_id).int()
        grid = p.image_grid_thw
        expected = tiny_model.model.get_rope_index(ids, types, image_grid_thw=grid)[0] if grid is not None else None
        got = batch["position_ids"][:, :, cu[k] : cu[k + 1]]  # (3, 1, L_k)
        if expected is None:
            assert (got == torch.arange(ids.shape[1])).all()  # a text-only sequence starts again from 0
        else:
            assert torch.equal(got, expected)
            assert got.max() < ids.shape[1] - 1  # images advance positions by their grid, not by token count


def test_chunked_logps_equal_full_logits_and_entropy(tiny_model, tokenizer, items):
    batch = pack(items, tiny_model, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        results = [sequence_logps(tiny_model, batch, 1.3, chunk, with_entropy=True) for chunk in (1, 5, 10**6)]
        for logp, entropy in results[:-1]:  # any chunk size gives the same numbers
            torch.testing.assert_close(logp, results[-1][0], atol=1e-6, rtol=0)
            torch.testing.assert_close(entropy, results[-1][1], atol=1e-5, rtol=0)
        logp, entropy = results[0]
        for i, (p, c) in enumerate(items):  # the naive way: full fp32 logits of the whole sequence
            torch.testing.assert_close(logp[i, : len(c)], reference_logps(tiny_model, p, c, 1.3), atol=1e-5, rtol=0)
            logprobs = completion_logprobs(tiny_model, p, c, 1.3)
            torch.testing.assert_close(entropy[i, : len(c)], -(logprobs.exp() * logprobs).sum(-1), atol=1e-5, rtol=0)


def mini_batch_update(model, items, advantages, old_logp, budget=None, padded_size=None):
    """The trainer's policy update of one mini-batch (loss shares summed over micro-batches, one backward
    each), returning the loss and the gradients."""
    seq_lens = [len(p.input_ids) + len(c) for p, c in items]
    t = type("T", (), {"packing": budget is not None, "max_tokens_per_micro": budget, "micro_batch_size": padded_size})
    weights = torch.tensor(sequence_weights([len(c) for _, c in items], "token_mean", 1, 64))
    model.zero_grad()
    total = 0.0
    for idx in micro_batches(list(range(len(items))), seq_lens, t):
        pairs = [items[i] for i in idx]
        batch = pack(pairs, model, 0, "cpu") if t.packing else collate(pairs, 0, model.config.image_token_id, "cpu")
        m = batch["completion_mask"]
        Tb = m.shape[1]
        logp = sequence_logps(model, batch, 1.0, 16)
        token_loss, _ = policy_loss(logp, old_logp[idx, :Tb], advantages[idx, :Tb], 0.2, 0.28)
        loss = aggregate(token_loss, m, weights[idx])
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_do_not_depend_on_the_micro_batching(tiny_model, items):
    g = torch.Generator().manual_seed(1)
    T = max(len(c) for _, c in items)
    advantages = torch.randn(len(items), T, generator=g)
    old_logp = -torch.rand(len(items), T, generator=g) * 5
    runs = {
        "one packed micro-batch": mini_batch_update(tiny_model, items, advantages, old_logp, budget=10**6),
        "budget 120": mini_batch_update(tiny_model, items, advantages, old_logp, budget=120),
        "one sequence each": mini_batch_update(tiny_model, items, advantages, old_logp, budget=1),
        "padded, 2 per micro-batch": mini_batch_update(tiny_model, items, advantages, old_logp, padded_size=2),
    }
    loss0, grads0 = runs.pop("one packed micro-batch")
    for name, (loss, grads) in runs.items():
        assert loss == pytest.approx(loss0, abs=1e-6), name
        for p, g0 in grads0.items():
            torch.testing.assert_close(grads[p], g0, atol=1e-6, rtol=1e-4, msg=f"{name}: {p}")


def test_first_fit_decreasing_fills_bins_and_keeps_every_sequence_once():
    lengths = [900, 100, 450, 450, 80, 20, 1200, 300, 700, 300]
    bins = first_fit_decreasing(lengths, 1000)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert [6] in bins  # longer than the budget: alone, never split
    assert all(sum(lengths[i] for i in b) <= 1000 for b in bins if len(b) > 1)
    assert len(bins) == 5  # 4500 tokens: 1200 alone, then 3300 in the fewest 1000-token bins (4)
    assert first_fit_decreasing([], 10) == []


def test_text_only_micro_batch_runs_a_zero_weighted_vision_forward_when_asked(tiny_model, tokenizer, items):
    text_items = [items[0], items[3]]
    batch = pack(text_items, tiny_model, tokenizer.pad_token_id, "cpu")
    plain = sequence_logps(tiny_model, batch, 1.0, 64)
    tiny_model.zero_grad()
    dummy = sequence_logps(tiny_model, batch | {"dummy_vision": True}, 1.0, 64)
    assert torch.equal(plain, dummy)
    dummy.sum().backward()
    vision_grads = [p.grad for p in tiny_model.model.visual.parameters()]
    assert all(g is not None and (g == 0).all() for g in vision_grads)  # took part, changed nothing


def test_a_sampled_image_token_never_asks_for_image_features(tiny_model, tokenizer, items):
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    prompt, completion = items[1]
    bad = [(prompt, completion + [image_pad, 30])]
    with torch.no_grad():
        logp = sequence_logps(tiny_model, pack(bad, tiny_model, tokenizer.pad_token_id, "cpu"), 1.0, 64)
        clean = sequence_logps(tiny_model, pack([items[1]], tiny_model, tokenizer.pad_token_id, "cpu"), 1.0, 64)
        torch.testing.assert_close(logp[:, : len(completion)], clean, atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="do not match"):  # transformers' own forward counts it as an image
            sequence_logps(tiny_model, collate(bad, tokenizer.pad_token_id, image_pad, "cpu"), 1.0, 64)
    # so the trainer cuts completions before their first vision token, whatever the engine
    rollout = Rollout([0, 0], [[5, image_pad, 6], [7, 8]], ["a", "b"], [False, False])
    assert cut_vision_tokens(rollout, tokenizer.convert_tokens_to_ids(VISION_TOKENS)) == 1
    assert rollout.completion_ids == [[5], [7, 8]] and rollout.truncated == [True, False]


def test_text_only_qwen2_packs_too(tokenizer, items):
    model = tiny_text_model(tokenizer)
    text = [(copy.copy(items[0][0]), items[0][1]), (copy.copy(items[3][0]), items[3][1])]
    for p, _ in text:
        p.positions = None
    batch = pack(text, model, tokenizer.pad_token_id, "cpu")
    assert batch["position_ids"].shape == (1, batch["input_ids"].shape[1])
    with torch.no_grad():
        logp = sequence_logps(model, batch, 1.0, 7)
        for i, (p, c) in enumerate(text):
            ids = torch.tensor([p.input_ids + c])
            logits = model(input_ids=ids).logits[0]
            P = len(p.input_ids)
            ref = F.log_softmax(logits[P - 1 : P - 1 + len(c)], -1).gather(1, torch.tensor(c)[:, None]).squeeze(1)
            torch.testing.assert_close(logp[i, : len(c)], ref, atol=1e-5, rtol=0)


def test_gradient_checkpointing_and_the_critic_pack_exactly(tiny_model, tokenizer, items):
    batch = pack(items, tiny_model, tokenizer.pad_token_id, "cpu")
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny_model).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        sequence_logps(model, batch, 1.0, 16).sum().backward()
        grads.append(model.lm_head.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    critic = Critic(tiny_model)
    torch.nn.init.normal_(critic.value_head.weight, std=0.1)
    values = sequence_values(critic, batch)
    padded = sequence_values(critic, collate(items, tokenizer.pad_token_id, tiny_model.config.image_token_id, "cpu"))
    torch.testing.assert_close(values, padded, atol=1e-5, rtol=0)


def qkv(lengths, heads: int, kv_heads: int, device, dtype, seed: int = 0):
    """Random packed query (1, heads, S, 32), key / value (1, kv_heads, S, 32) and cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    S = sum(lengths)
    q, k, v = (torch.randn(1, h, S, 32, generator=g).to(device, dtype).requires_grad_() for h in (heads, kv_heads, kv_heads))
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return q, k, v, cu_seqlens


def per_sequence_attention(q, k, v, cu_seqlens):
    """The obvious block-diagonal causal attention: one SDPA call per sequence -> (1, S, H, D)."""
    b = cu_seqlens.tolist()
    out = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True)
           for s, e in zip(b, b[1:])]  # fmt: skip
    return torch.cat(out, dim=2).transpose(1, 2)


def test_split_views_attend_as_slices_with_their_gradients():
    """The CPU path (SDPA per `split` view) is the obvious per-slice attention, sequences of 1 to 13
    tokens, GQA, gradients included."""
    lengths = [5, 1, 13, 7]
    q, k, v, cu = qkv(lengths, heads=4, kv_heads=2, device="cpu", dtype=torch.float32)
    out = per_sequence_causal_attention(q, k, v, cu, None)
    ref = per_sequence_attention(q, k, v, cu)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_torch_varlen_kernel_is_per_sequence_attention_on_cuda(tokenizer, items, tiny_cfg):
    """CUDA without flash-attn: packed attention runs torch.nn.attention.varlen.varlen_attn; in bf16
    its outputs and gradients match one SDPA call per sequence, and packed log-probs match one
    sequence at a time through transformers' own forward."""
    from model import build_tiny_model, flash_attn_varlen_func, torch_varlen_causal, use_varlen_attention, varlen_attn

    if not torch.cuda.is_available() or varlen_attn is None:
        pytest.skip("needs a CUDA GPU and torch.nn.attention.varlen (torch >= 2.10)")
    lengths = [64, 1, 200, 37]
    q, k, v, cu = qkv(lengths, heads=4, kv_heads=2, device="cuda", dtype=torch.bfloat16)
    out = torch_varlen_causal(*(x[0].transpose(0, 1) for x in (q, k, v)), cu, max(lengths), None)[None]
    ref = per_sequence_attention(q, k, v, cu)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=0)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=0)
    if flash_attn_varlen_func is not None:
        return  # the model would run flash-attn's kernel instead
    model = build_tiny_model(tokenizer, tiny_cfg.model.tiny, seed=0).eval().cuda()
    use_varlen_attention(model, "sdpa")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logp = sequence_logps(model, pack(items, model, tokenizer.pad_token_id, "cuda"), 1.0, 64)
        for i, (p, c) in enumerate(items):
            torch.testing.assert_close(
                logp[i, : len(c)].float().cpu(), reference_logps(model, p, c, 1.0).float().cpu(), atol=5e-2, rtol=0
            )
