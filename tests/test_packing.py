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
from model import VISION_TOKENS, blockwise_attention, collate, pack, sequence_logps, sequence_values, Critic
from rollout import Rollout, cut_vision_tokens
from train import aggregate, chunks, first_fit_decreasing, micro_batches, policy_loss, sequence_weights, shuffled


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
    t = type(
        "T",
        (),
        {"packing": budget is not None, "max_tokens_per_micro": budget, "micro_batch_size": padded_size, "share_prompts": True},
    )
    weights = torch.tensor(sequence_weights([len(c) for _, c in items], "token_mean", 1, 64))
    model.zero_grad()
    total = 0.0
    for idx in micro_batches(list(range(len(items))), items, t):
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


@pytest.mark.parametrize("kind", ["items", "groups"])  # groups: prompts shared, a group split where the budget is small
def test_loss_and_gradients_do_not_depend_on_the_micro_batching(tiny_model, request, kind):
    items = request.getfixturevalue(kind)
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


@pytest.fixture()
def groups(items):
    """Rollout groups as the trainer holds them: samples of one prompt share its Prompt object. The
    text, one-image and two-image prompts, 3 samples each of 1 to 31 tokens, groups interleaved."""
    g = torch.Generator().manual_seed(2)
    order = [(0, 6), (1, 1), (2, 9), (0, 31), (1, 12), (2, 4), (1, 3), (0, 1), (2, 17)]
    prompts = [items[0][0], items[1][0], items[2][0]]
    return [(prompts[k], torch.randint(20, 400, (n,), generator=g).tolist()) for k, n in order]


@pytest.fixture(params=["one call per group", "a call per completion"])
def cpu_plan(request, monkeypatch):
    """Both CPU plans of a shared group (model.cpu_group_plan): its (L, L) mask, or per completion."""
    import model

    monkeypatch.setattr(model, "DENSE_GROUP_COST", 1e9 if request.param == "one call per group" else 0.0)
    return request.param


def shared_and_per_sample(model, pairs, fn, policy=None):
    """fn(batch) (grad-enabled) on `pairs` packed (for `policy`, default `model`) with shared prompts
    and with one prompt per sample: [(output, `model`'s gradients)] for the two layouts."""
    out = []
    for share in (True, False):
        model.zero_grad()
        value = fn(pack(pairs, policy or model, 0, "cpu", share_prompts=share))
        (value * torch.arange(1, value.shape[1] + 1)).sum().backward()  # every token's gradient, weighted apart
        out.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return out


def test_shared_prompts_hold_each_prompt_once_and_change_no_logp_or_gradient(tiny_model, tokenizer, groups, cpu_plan):
    banned = torch.tensor(tokenizer.convert_tokens_to_ids(VISION_TOKENS))
    shared = pack(groups, tiny_model, 0, "cpu")
    prompts = {id(p): p for p, _ in groups}.values()
    assert shared["input_ids"].shape[1] == sum(len(p.input_ids) for p in prompts) + sum(len(c) for _, c in groups)
    assert shared["image_grid_thw"].shape[0] == 3  # the vision tower sees each prompt's images once, not 3 times
    (logp, grads), (per_sample, per_sample_grads) = shared_and_per_sample(
        tiny_model, groups, lambda b: sequence_logps(tiny_model, b, 0.7, 8, banned_ids=banned)
    )
    for i, (p, c) in enumerate(groups):
        torch.testing.assert_close(logp[i, : len(c)], reference_logps(tiny_model, p, c, 0.7, banned).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(logp, per_sample, atol=1e-5, rtol=0)
    assert grads.keys() == per_sample_grads.keys() and any("visual" in n for n in grads)
    for name, g in per_sample_grads.items():  # a prompt's K/V take the gradient of every completion that read them
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model_kind", ["critic", "checkpointed", "frozen vision", "text-only qwen2"])
def test_shared_prompts_are_exact_for_the_critic_checkpointing_a_frozen_tower_and_text_models(
    tiny_model, tokenizer, groups, model_kind, cpu_plan
):
    model, pairs, policy = copy.deepcopy(tiny_model), groups, None
    fn = lambda b: sequence_logps(model, b, 1.0, 5)  # noqa: E731
    if model_kind == "critic":
        critic = Critic(model)
        torch.nn.init.normal_(critic.value_head.weight, std=0.1)
        model, policy, fn = critic, model, lambda b: sequence_values(critic, b)  # noqa: E731
    elif model_kind == "checkpointed":
        model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model_kind == "frozen vision":
        model.model.visual.requires_grad_(False)
    else:
        model, text = tiny_text_model(tokenizer), copy.copy(groups[0][0])
        text.positions = None  # the Qwen2 model's own (1-D) positions
        pairs = [(text, c) for p, c in groups if p is groups[0][0]]
        fn = lambda b: sequence_logps(model, b, 1.0, 5)  # noqa: E731
    (out, grads), (want, want_grads) = shared_and_per_sample(model, pairs, fn, policy)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    assert grads.keys() == want_grads.keys() and grads
    assert (model_kind in ("frozen vision", "text-only qwen2")) == (not any("visual" in n for n in grads))
    for name, g in want_grads.items():  # fp32 rounding, relative to the largest gradient (values weigh up to 31x)
        scale = float(g.abs().max().clamp(min=1.0))
        torch.testing.assert_close(
            grads[name], g, atol=1e-5 * scale, rtol=1e-4, msg=lambda m, n=name, s=scale: f"{n} (max {s:.3g}): {m}"
        )


def test_shared_positions_continue_each_completion_after_its_prompt(tiny_model, groups):
    shared, per_sample = (pack(groups, tiny_model, 0, "cpu", share_prompts=s) for s in (True, False))
    for i, (_, c) in enumerate(groups):
        cols = {}
        for name, b in (("shared", shared), ("per sample", per_sample)):
            start = int(b["completion_start"][i])
            assert int(b["prompt_last"][i]) < start and b["input_ids"][0, start : start + len(c)].tolist() == c
            cols[name] = b["position_ids"][:, 0, start : start + len(c)]
        assert torch.equal(cols["shared"], cols["per sample"])


def flash_attn_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout, scale, causal):
    """flash-attn's `flash_attn_varlen_func` contract, the obvious way: q (S, H, D), k / v (S_k,
    H_kv, D); each query segment (cu_q) attends to its keys (cu_k), with `causal` aligned to the
    bottom right (a query sees every key up to its own position counted from the end) -> (S, H, D)."""
    assert dropout == 0.0 and max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)):  # flash-attn's own checks
        raise RuntimeError(f"FlashAttention only supports fp16 and bf16, q, k and v alike: {q.dtype}, {k.dtype}, {v.dtype}")
    out = []
    for (qs, qe), (ks, ke) in zip(zip(cu_q.tolist(), cu_q[1:].tolist()), zip(cu_k.tolist(), cu_k[1:].tolist())):
        mask = torch.ones(qe - qs, ke - ks, dtype=torch.bool).tril(diagonal=(ke - ks) - (qe - qs) if causal else ke - ks)
        qq, kk, vv = (x.transpose(0, 1)[None] for x in (q[qs:qe], k[ks:ke], v[ks:ke]))
        out.append(F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_gpu_kernels_inputs_give_the_cpu_paths_attention(monkeypatch, dtype, cpu_plan):
    """The GPU path (varlen_kernel_attention) with flash-attn's kernel stood in for by its contract
    on CPU: separate query and key cu_seqlens, keys gathered per completion (its prompt's, then its
    own) attend exactly as the CPU path's masked blocks, gradients included: a shared group of 3 (one
    completion of 1 token), a plain sequence, a group of 2; GQA; bf16 stays bf16, fp16 fp16."""
    import model
    from model import attention_segments, varlen_kernel_attention

    monkeypatch.setattr(model, "flash_attn_varlen_func", flash_attn_varlen_reference)
    segments = attention_segments([(0, 6, [3, 1, 5]), (15, 7, [4]), (26, 3, [2, 6])])
    p = segments["prefix"]
    assert segments["cu_seqlens"].tolist() == [0, 6, 9, 10, 15, 26, 29, 31, 37] and segments["max_seqlen"] == 11
    assert p["cu_seqlens_k"].tolist() == [0, 6, 15, 22, 33, 44, 47, 52, 61] and p["max_seqlen_k"] == 11
    q, k, v, _ = qkv([37], heads=4, kv_heads=2, device="cpu", dtype=dtype)
    out = varlen_kernel_attention(q, k, v, segments["cu_seqlens"], segments["max_seqlen"], p, None, 0.0)
    ref = blockwise_attention(q, k, v, p["spans"], p["plans"], None)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=5 * tol, rtol=0)


def torch_varlen_contract(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, gqa):
    """torch's varlen_attn as its docs state it: keys of the queries' head count unless `gqa`."""
    if k.shape[1] != q.shape[1] and not gqa:
        raise RuntimeError(f"varlen_attn without enable_gqa takes keys of {q.shape[1]} heads, not {k.shape[1]}")
    return flash_attn_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal)


def torch_2_10_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return torch_varlen_contract(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, False)


def torch_2_11_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                           window_size=(-1, -1)):  # fmt: skip
    causal = window_size == (-1, 0)  # as 2.11 and later set their kernel's is_causal (a list: False)
    return torch_varlen_contract(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale, False)


def torch_2_13_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                           window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
    causal = window_size == (-1, 0)
    return torch_varlen_contract(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale, enable_gqa)


@pytest.mark.parametrize("release", [torch_2_10_varlen_attn, torch_2_11_varlen_attn, torch_2_13_varlen_attn])
def test_torch_varlen_kernel_is_called_as_each_release_takes_it(monkeypatch, release, cpu_plan):
    """Without flash-attn the GPU path calls torch's varlen_attn, whose signature moved in every
    release (the stand-ins' signatures are those of the 2.10, 2.11 and 2.13 wheels): causal is
    `is_causal` or the window (-1, 0), 2.10 takes no scale, only 2.12+ take GQA keys. Shared
    prompts, GQA, bf16: each gives the CPU path's attention and gradients; a scale 2.10 cannot
    apply is refused, one the others take is applied."""
    import inspect

    import model
    from model import attention_segments, varlen_kernel_attention

    monkeypatch.setattr(model, "flash_attn_varlen_func", None)
    monkeypatch.setattr(model, "varlen_attn", release)
    monkeypatch.setattr(model, "VARLEN_PARAMS", inspect.signature(release).parameters)
    segments = attention_segments([(0, 6, [3, 1, 5]), (15, 7, [4]), (26, 3, [2, 6])])
    p = segments["prefix"]
    q, k, v, _ = qkv([37], heads=4, kv_heads=2, device="cpu", dtype=torch.bfloat16)
    for scale in (None, 0.3):
        if scale and release is torch_2_10_varlen_attn:
            with pytest.raises(ValueError, match="takes no scale"):
                varlen_kernel_attention(q, k, v, segments["cu_seqlens"], segments["max_seqlen"], p, scale, 0.0)
            continue
        out = varlen_kernel_attention(q, k, v, segments["cu_seqlens"], segments["max_seqlen"], p, scale, 0.0)
        ref = blockwise_attention(q, k, v, p["spans"], p["plans"], scale)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=0)
        grad = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a.float(), b.float(), atol=1e-1, rtol=0)
    head_dim_scale = q.shape[-1] ** -0.5  # what transformers passes for Qwen: 2.10's own scale, so accepted
    varlen_kernel_attention(q, k, v, segments["cu_seqlens"], segments["max_seqlen"], p, head_dim_scale, 0.0)


def test_fp32_weights_under_bf16_autocast_reach_the_gpu_kernel_in_one_half_dtype(monkeypatch, tokenizer, tiny_cfg, groups):
    """model.dtype=bfloat16 keeps fp32 weights under bf16 autocast; the rotary embedding's fp32 cos / sin
    then promote q and k to fp32 while v is bf16, which flash-attn and torch's varlen op reject. The GPU
    path, with its kernel stood in for by a CPU function that checks the kernel's dtype contract at its
    entry, gives the CPU path's log-probs and gradients under the same autocast; fp32 without autocast is
    refused with the way out."""
    import model as model_module
    from model import build_tiny_model, use_varlen_attention

    policy = build_tiny_model(tokenizer, tiny_cfg.model.tiny, seed=0)
    use_varlen_attention(policy, "sdpa")
    out = {}
    for kernel in (False, True):
        monkeypatch.setattr(model_module, "uses_varlen_kernels", lambda device, kernel=kernel: kernel)
        monkeypatch.setattr(model_module, "flash_attn_varlen_func", flash_attn_varlen_reference)
        policy.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = sequence_logps(policy, pack(groups, policy, 0, "cpu"), 1.0, 16)
        logp.sum().backward()
        out[kernel] = logp.detach(), policy.lm_head.weight.grad.clone()
    assert next(policy.parameters()).dtype == torch.float32
    torch.testing.assert_close(out[True][0], out[False][0], atol=5e-2, rtol=0)
    torch.testing.assert_close(out[True][1], out[False][1], atol=5e-2, rtol=5e-2)
    with torch.no_grad(), pytest.raises(ValueError, match="model.dtype=bfloat16"):
        sequence_logps(policy, pack(groups, policy, 0, "cpu"), 1.0, 16)  # fp32, no autocast


def test_micro_batches_count_a_shared_prompt_once_and_split_a_group_at_the_budget(groups):
    P = {id(p): len(p.input_ids) for p, _ in groups}
    t = type("T", (), {"packing": True, "max_tokens_per_micro": 10**6, "share_prompts": True})
    assert [sorted(b) for b in micro_batches(list(range(9)), groups, t)] == [list(range(9))]
    budget = max(P.values()) + 20
    t.max_tokens_per_micro = budget
    bins = micro_batches(list(range(9)), groups, t)
    assert sorted(i for b in bins for i in b) == list(range(9))
    for b in bins:  # each bin within the budget, its prompts counted once, unless one sample alone passes it
        tokens = sum(P[k] for k in {id(groups[i][0]) for i in b}) + sum(len(groups[i][1]) for i in b)
        assert tokens <= budget or len(b) == 1
    assert any(len({id(groups[i][0]) for i in b}) < len(b) for b in bins)  # some share
    split = [k for k in P if sum(k in {id(groups[i][0]) for i in b} for b in bins) > 1]
    assert split  # a group whose samples span two micro-batches
    t.share_prompts = False
    assert micro_batches(list(range(9)), groups, t) == first_fit_decreasing([P[id(p)] + len(c) for p, c in groups], budget)


def test_group_shuffled_mini_batches_hold_whole_groups_and_pack_each_prompt_once(groups):
    """trainer.shuffle=group deals whole groups into mini-batches; =sample is torch.randperm's order
    as before (the pinned runs keep their mini-batches)."""
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert shuffled(12, 1, g()) == torch.randperm(12, generator=g()).tolist()
    order = shuffled(12, 4, g())
    assert sorted(order) == list(range(12)) and order != list(range(12))
    assert all(order[k : k + 4] == list(range(order[k], order[k] + 4)) and order[k] % 4 == 0 for k in range(0, 12, 4))
    by_prompt = sorted(range(9), key=lambda i: [p for p, _ in groups].index(groups[i][0]))  # 3 groups of 3, consecutive
    pairs = [groups[i] for i in by_prompt]
    t = type("T", (), {"packing": True, "max_tokens_per_micro": 10**6, "share_prompts": True})
    for mini in chunks(shuffled(9, 3, g()), 6):  # a mini-batch of 2 whole groups: 2 prompts in its one micro-batch
        (bin_,) = micro_batches(mini, pairs, t)
        assert len({id(pairs[i][0]) for i in bin_}) == len(mini) // 3


def test_first_fit_decreasing_fills_bins_and_keeps_every_sequence_once():
    lengths = [900, 100, 450, 450, 80, 20, 1200, 300, 700, 300]
    bins = first_fit_decreasing(lengths, 1000)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert [6] in bins  # longer than the budget: alone, never split
    assert all(sum(lengths[i] for i in b) <= 1000 for b in bins if len(b) > 1)
    assert len(bins) == 5  # 4500 tokens: 1200 alone, then 3300 in the fewest 1000-token bins (4)
    assert first_fit_decreasing([], 10) == []


@pytest.mark.parametrize("packing", [True, False])
def test_text_only_micro_batch_runs_a_zero_weighted_vision_forward_when_asked(tiny_model, tokenizer, items, packing):
    """Under ZeRO-3 every module call gathers its weights collectively, so a rank whose micro-batch has
    no image runs the vision tower too, packed or padded, at the point where an image would run it."""

    def make(pairs):
        if packing:
            return pack(pairs, tiny_model, tokenizer.pad_token_id, "cpu")
        return collate(pairs, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|image_pad|>"), "cpu")

    def module_order(batch):
        calls, backbone = [], tiny_model.model
        modules = {"embed": backbone.get_input_embeddings(), "vision": backbone.visual, "text": backbone.language_model}
        hooks = [m.register_forward_pre_hook(lambda *_, n=n: calls.append(n)) for n, m in modules.items()]
        try:
            logp = sequence_logps(tiny_model, batch, 1.0, 64)
        finally:
            for h in hooks:
                h.remove()
        return logp, calls

    text_items = [items[0], items[3]]
    plain, plain_calls = module_order(make(text_items))
    tiny_model.zero_grad()
    dummy, dummy_calls = module_order(make(text_items) | {"dummy_vision": True})
    _, image_calls = module_order(make([items[1], items[0]]) | {"dummy_vision": True})
    assert plain_calls == ["embed", "text"] and dummy_calls == image_calls == ["embed", "vision", "text"]
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
    out = blockwise_attention(q, k, v, lengths, None, None)
    ref = per_sequence_attention(q, k, v, cu)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_torch_varlen_kernel_is_per_sequence_attention_on_cuda(tokenizer, items, groups, tiny_cfg):
    """CUDA without flash-attn: packed attention runs torch.nn.attention.varlen.varlen_attn; in bf16
    its outputs and gradients match one SDPA call per sequence, and packed log-probs, prompts shared
    or not, match one sequence at a time through transformers' own forward."""
    from model import build_tiny_model, flash_attn_varlen_func, torch_varlen_causal, use_varlen_attention, varlen_attn

    if not torch.cuda.is_available() or varlen_attn is None:
        pytest.skip("needs a CUDA GPU and torch.nn.attention.varlen (torch >= 2.10)")
    lengths = [64, 1, 200, 37]
    q, k, v, cu = qkv(lengths, heads=4, kv_heads=2, device="cuda", dtype=torch.bfloat16)
    out = torch_varlen_causal(*(x[0].transpose(0, 1) for x in (q, k, v)), cu, cu, max(lengths), max(lengths), None)[None]
    ref = per_sequence_attention(q, k, v, cu)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=0)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref)  # the same whatever ran before
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=1.6e-2)  # bf16: about two of its steps
    if flash_attn_varlen_func is not None:
        return  # the model would run flash-attn's kernel instead
    model = build_tiny_model(tokenizer, tiny_cfg.model.tiny, seed=0).eval().cuda()
    use_varlen_attention(model, "sdpa")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for pairs in (items, groups):  # groups: prompts shared, keys gathered per completion (bottom-right causal)
            logp = sequence_logps(model, pack(pairs, model, tokenizer.pad_token_id, "cuda"), 1.0, 64)
            for i, (p, c) in enumerate(pairs):
                torch.testing.assert_close(
                    logp[i, : len(c)].float().cpu(), reference_logps(model, p, c, 1.0).float().cpu(), atol=5e-2, rtol=0
                )


@pytest.mark.gpu
def test_shared_prompt_kernel_path_is_per_sample_attention_with_its_gradients_on_cuda():
    """CUDA: a shared prompt's layout through the varlen kernel (completion queries over keys
    gathered as the prompt's then their own, separate key cu_seqlens, causal aligned to the bottom
    right) gives each token the output of causal attention over its own prompt + completion, and the
    prompt's queries, keys and values the gradients of every completion that read them: against SDPA
    in fp32 over per-sample copies. Two groups (one with a 1-token completion), a plain sequence, GQA."""
    from model import attention_segments, uses_varlen_kernels, varlen_kernel_attention

    if not torch.cuda.is_available() or not uses_varlen_kernels("cuda"):
        pytest.skip("needs a CUDA GPU and a varlen kernel (flash-attn, or torch >= 2.10)")
    blocks, S = [], 0  # (row start, prompt_len, completion_lens)
    for P, completion_lens in ((50, [30, 1, 70]), (20, [15]), (33, [64, 9])):
        blocks.append((S, P, completion_lens))
        S += P + sum(completion_lens)
    q, k, v, _ = qkv([S], heads=4, kv_heads=2, device="cuda", dtype=torch.bfloat16)
    seg = attention_segments(blocks, None)
    prefix = seg["prefix"] | {x: seg["prefix"][x].cuda() for x in ("kv_index", "cu_seqlens_k")}
    out = varlen_kernel_attention(q, k, v, seg["cu_seqlens"].cuda(), seg["max_seqlen"], prefix, 32**-0.5, 0.0)
    copies, lens, take = [], [], []  # each sample's prompt + completion columns; which copy gives each output
    for start, P, completion_lens in blocks:
        offset = start + P
        for j, T in enumerate(completion_lens):
            base = len(copies)
            take += list(range(base, base + P)) if j == 0 else []  # the prompt's outputs: its first copy's
            take += list(range(base + P, base + P + T))
            copies += list(range(start, start + P)) + list(range(offset, offset + T))
            lens.append(P + T)
            offset += T
    idx, take = torch.tensor(copies, device="cuda"), torch.tensor(take, device="cuda")
    cu = torch.tensor([0] + lens).cumsum(0, dtype=torch.int32)
    ref = per_sequence_attention(*(x.float()[:, :, idx] for x in (q, k, v)), cu)[:, take]  # (1, S, H, D) fp32
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref)  # the same whatever ran before
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad.bfloat16()), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=1.6e-2)  # bf16: about two of its steps
