"""Qwen2.5-VL-3B-Instruct at its published shapes: what only breaks at real size.

The tiny model differs from the 3B exactly where bugs hide: the 3B ties lm_head to the embeddings
(one parameter for the sync, the reference and critic copies, checkpoints), has 128-wide heads, 2 KV
heads and a windowed 32-layer vision tower. The whole model is built on the meta device (shapes, no
memory); a cut of it (real widths, 2 text and 2 vision layers) runs forward and backward on the CPU.
"""

import pytest
import torch

from model import (
    QWEN2_5_VL_3B_TEXT,
    QWEN2_5_VL_3B_VISION,
    Critic,
    collate,
    frozen_copy,
    pack,
    qwen2_5_vl_config,
    sequence_logps,
    use_varlen_attention,
)
from rollout import weight_buckets
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.initialization import no_init_weights

PUBLISHED_PARAMETERS = 3_754_622_976  # the 3B's safetensors, lm_head tied


@pytest.fixture(scope="module")
def meta_3b(tokenizer):
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tokenizer, QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION))


def test_the_memory_plans_meta_model_is_the_checkpoints(meta_3b, tokenizer, tiny_cfg, tmp_path):
    """model.meta_model, which a GPU run's memory plan counts, builds a checkpoint dir's architecture
    (its config.json alone) and the tiny preset's, on the meta device."""
    from model import build_tiny_model, meta_model

    meta_3b.config.save_pretrained(tmp_path)
    from_dir = meta_model(tiny_cfg.model, str(tmp_path))
    assert sum({id(p): p.numel() for p in from_dir.parameters()}.values()) == PUBLISHED_PARAMETERS
    assert from_dir.lm_head.weight.is_meta and from_dir.lm_head.weight is from_dir.model.language_model.embed_tokens.weight
    tiny = build_tiny_model(tokenizer, tiny_cfg.model.tiny, seed=0)
    shapes = [(n, p.shape) for n, p in meta_model(tiny_cfg.model, None).named_parameters()]
    assert shapes == [(n, p.shape) for n, p in tiny.named_parameters()]


def test_the_meta_model_has_the_published_shapes(meta_3b):
    assert sum(p.numel() for p in meta_3b.parameters()) == PUBLISHED_PARAMETERS
    embed = meta_3b.model.language_model.embed_tokens.weight
    assert meta_3b.lm_head.weight is embed and embed.shape == (151936, 2048)  # one parameter
    attention = meta_3b.model.language_model.layers[0].self_attn
    assert attention.head_dim == 128 and attention.k_proj.weight.shape == (2 * 128, 2048)  # 2 KV heads
    assert meta_3b.model.visual.fullatt_block_indexes == [7, 15, 23, 31]


@pytest.mark.parametrize("freeze_vision", [False, True])
def test_the_weight_sync_sends_each_weight_once_in_bounded_buckets(meta_3b, freeze_vision):
    meta_3b.model.visual.requires_grad_(not freeze_vision)
    bucket_bytes = 1 << 30
    buckets = [[(name, tuple(t.shape), t.dtype) for name, t in b] for b in weight_buckets(meta_3b, bucket_bytes, torch.bfloat16)]
    meta_3b.model.visual.requires_grad_(True)
    names = [name for b in buckets for name, _, _ in b]
    expected = {n: tuple(p.shape) for n, p in meta_3b.named_parameters() if not (freeze_vision and ".visual." in f".{n}")}
    assert len(names) == len(set(names)) and set(names) == set(expected)  # each trainable weight once
    assert "lm_head.weight" not in names and "model.language_model.embed_tokens.weight" in names  # tied: sent as the embedding
    assert all(shape == expected[name] and dtype == torch.bfloat16 for b in buckets for name, shape, dtype in b)
    for b in buckets:  # a bucket closes once it passes the bound: at most one tensor over it
        sizes = [2 * torch.Size(shape).numel() for _, shape, _ in b]
        assert sum(sizes[:-1]) < bucket_bytes
    assert len(buckets) > 1 and freeze_vision == (not any(n.startswith("model.visual") for n in names))


def test_reference_and_critic_copies_keep_the_tie_and_share_nothing(meta_3b):
    reference = frozen_copy(meta_3b)
    assert reference.lm_head.weight is reference.model.language_model.embed_tokens.weight  # still one parameter
    assert reference.lm_head.weight is not meta_3b.lm_head.weight
    assert not any(p.requires_grad for p in reference.parameters())
    bf16 = frozen_copy(meta_3b, torch.bfloat16)  # as the run keeps it: in the compute dtype
    assert bf16.lm_head.weight is bf16.model.language_model.embed_tokens.weight
    assert sum(p.numel() * p.element_size() for p in bf16.parameters()) == 2 * PUBLISHED_PARAMETERS  # 7.5 GB, not 15
    critic = Critic(meta_3b)
    policy_ids = {id(p) for p in meta_3b.parameters()}
    assert not policy_ids & {id(p) for p in critic.parameters()}
    # the backbone (its embeddings are its input) and a 2048 -> 1 value head: no untied copy of lm_head
    assert sum(p.numel() for p in critic.parameters()) == PUBLISHED_PARAMETERS + 2048 + 1


@pytest.mark.slow
def test_real_widths_cut_to_two_layers_packed_equal_padded(tokenizer, image_processor):
    """Forward and backward at the 3B's widths (2 text layers, 2 vision layers, one of them full
    attention): packed log-probs and gradients equal the padded batch's."""
    from data import encode_prompt, synthetic_samples

    text = QWEN2_5_VL_3B_TEXT | {"num_hidden_layers": 2}
    vision = QWEN2_5_VL_3B_VISION | {"depth": 2, "fullatt_block_indexes": [1]}
    with no_init_weights():  # transformers' own init of 0.5B weights takes minutes on a busy CPU
        model = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tokenizer, text, vision))
    model.tie_weights()  # no_init_weights skips the tie that from_pretrained (and the meta model) make
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    g = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.data.normal_(0.0, 0.02, generator=g)  # the config's initializer_range, in seconds
    use_varlen_attention(model, "sdpa")
    model.model.language_model.embed_tokens.requires_grad_(False)  # (and the tied head): 2.5 GB of gradients spared
    samples = synthetic_samples("shapes", 1, seed=1, image_size=56, system_prompt="sys")
    samples += synthetic_samples("arithmetic", 1, seed=1, image_size=56, system_prompt="sys")
    items = [(encode_prompt(s, tokenizer, image_processor), torch.randint(20, 400, (n,), generator=g).tolist())
             for s, n in zip(samples, (7, 12))]  # fmt: skip
    results = []
    for batch in (
        pack(items, model, tokenizer.pad_token_id, "cpu"),
        collate(items, tokenizer.pad_token_id, model.config.image_token_id, "cpu"),
    ):
        model.zero_grad()
        logp = sequence_logps(model, batch, temperature=1.0, chunk_size=8)  # (B, Tc)
        (logp * batch["completion_mask"]).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (packed, packed_grads), (padded, padded_grads) = results
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=0)
    assert packed_grads.keys() == padded_grads.keys() and any("visual" in n for n in packed_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
