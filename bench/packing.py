"""The same RL policy update, padded vs packed micro-batches, side by side in one process.

    python bench/packing.py                                   # CPU: a small random Qwen2.5-VL
    python bench/packing.py --model 3b --device cuda --dtype bfloat16 --min-len 512 --max-len 4096 \
        --samples 64 --micro 4                                 # GPU: random-init Qwen2.5-VL-3B (bench/gpu.sh)

A batch of (prompt + completion) sequences with right-skewed lengths spanning max/min = 10x, as RL
rollouts have (log-uniform, plus 10% cut at the generation limit), gets one full update (log-probs
with grad, clipped loss, backward, AdamW step) three ways:
- padded (TRL): micro-batches of `--micro` samples in rollout order, every sequence padded to the
  batch's longest (TRL pads the whole generation batch once; verl without remove_padding pads to the limit);
- padded per micro: the same micro-batches, each padded only to its own longest;
- packed, SDPA per sequence: first-fit-decreasing micro-batches of at most `--micro` x max-len
  tokens, no padding, attention one SDPA call per packed sequence (the kernel before torch's varlen);
- packed: the same micro-batches with model.varlen_attention's kernel: on CUDA flash-attn's or
  torch's own varlen kernel, on CPU one SDPA call over the sequences laid out padded.
Prints token efficiency (real / computed tokens), time per update, their ratio, tokens/s, and on a
GPU the model FLOPs utilisation and peak memory of each.
"""

import argparse
import os
import random
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402
from transformers import AttentionInterface, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from data import Prompt, Sample  # noqa: E402
from model import QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION, collate, pack, sequence_logps, use_varlen_attention  # noqa: E402
from train import aggregate, micro_batches, policy_loss, sequence_weights  # noqa: E402

# Qwen2.5-VL-3B-Instruct's published config (model.py), its vision tower frozen and unused here: the
# update's cost is the language model's.
QWEN_3B = {k: QWEN2_5_VL_3B_TEXT[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "vocab_size")}  # fmt: skip
SMALL = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=4096
)
SMALL_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=SMALL["hidden_size"])


def per_sequence_attention(module, query, key, value, attention_mask, scaling=None, cu_seqlens=None, **kwargs):
    """The kernel to beat: one SDPA call per packed sequence, query (1, H, S, D) -> (1, S, H, D)."""
    bounds = cu_seqlens.tolist()
    out = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling, enable_gqa=True)
        for s, e in zip(bounds, bounds[1:])
    ]  # fmt: skip
    return torch.cat(out, dim=2).transpose(1, 2), None


AttentionInterface.register("per_sequence", per_sequence_attention)
AttentionMaskInterface.register("per_sequence", sdpa_mask)


def build_model(sizes: dict, device, dtype, vision: dict):
    half = sizes["hidden_size"] // sizes["num_attention_heads"] // 2
    spatial = 3 * half // 8
    config = Qwen2_5_VLConfig(
        text_config=dict(**sizes, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [half - 2 * spatial, spatial, spatial]}),
        vision_config=vision,
        image_token_id=sizes["vocab_size"] - 1, video_token_id=sizes["vocab_size"] - 2,
        vision_start_token_id=sizes["vocab_size"] - 3, vision_end_token_id=sizes["vocab_size"] - 4,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 3B random init on the CPU takes minutes
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype=dtype)
    use_varlen_attention(model, "sdpa")
    model.model.visual.requires_grad_(False)
    return model


def skewed_batch(n: int, min_len: int, max_len: int, truncated: float, vocab: int, seed: int = 0):
    """(prompt, completion) pairs shaped like an RL rollout: total lengths log-uniform in
    [min_len, max_len] (most short, a few long), except a `truncated` fraction that ran into the
    generation limit (max_len); prompts of min_len / 2 tokens. Shuffled, as rollouts arrive."""
    rng = random.Random(seed)
    n_cut = round(truncated * n)
    totals = (
        [min_len]
        + [max_len] * max(1, n_cut)
        + [int(min_len * (max_len / min_len) ** rng.random()) for _ in range(n - 1 - max(1, n_cut))]
    )
    rng.shuffle(totals)
    items = []
    for total in totals:
        prompt_len = min_len // 2
        ids = [rng.randrange(10, vocab - 10) for _ in range(total)]
        prompt = Prompt(ids[:prompt_len], None, None, "", Sample(messages=[], answer=""))
        items.append((prompt, ids[prompt_len:]))
    return items


def update(model, optimizer, items, layout: str, micro: int, max_len: int, device):
    """One policy update over all `items`; returns (real tokens, computed tokens)."""
    seq_lens = [len(p.input_ids) + len(c) for p, c in items]
    t = SimpleNamespace(
        packing=layout.startswith("packed"), max_tokens_per_micro=micro * max_len, micro_batch_size=micro, share_prompts=True
    )  # fmt: skip  (every item has its own prompt here)
    weights = torch.tensor(sequence_weights([len(c) for _, c in items], "token_mean", 1, max_len), device=device)
    computed = 0
    for idx in micro_batches(list(range(len(items))), items, t):
        pairs = [items[i] for i in idx]
        if t.packing:
            batch = pack(pairs, model, 0, device)
        else:  # TRL pads every sequence of the batch to the batch's longest; per-micro pads to the micro-batch's
            batch = collate(pairs, 0, None, device, pad_to=max(seq_lens) if layout == "padded (TRL)" else 0)
        computed += batch["input_ids"].numel()
        m = batch["completion_mask"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logp = sequence_logps(model, batch, 1.0, 1024)  # (B, Tb)
        old = logp.detach() + 0.01 * torch.randn_like(logp)  # a few-% importance ratio, as after one update
        advantages = torch.randn_like(logp)
        token_loss, _ = policy_loss(logp, old, advantages, 0.2, 0.28)
        aggregate(token_loss, m, weights[idx]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(seq_lens), computed


def update_flops(model, items) -> float:
    """Forward + backward FLOPs of the language model on the real tokens: 6 x params x tokens for the
    matmuls (lm_head on completion tokens only) plus causal attention, 6 x 2 x layers x hidden x L^2 / 2."""
    cfg = model.config.get_text_config()
    body = sum(p.numel() for n, p in model.model.language_model.named_parameters() if "embed_tokens" not in n)
    tokens = sum(len(p.input_ids) + len(c) for p, c in items)
    completion = sum(len(c) for _, c in items)
    attention = sum(6 * cfg.num_hidden_layers * cfg.hidden_size * (len(p.input_ids) + len(c)) ** 2 for p, c in items)
    return 6 * body * tokens + 6 * model.lm_head.weight.numel() * completion + attention


def measured_peak_tflops(device) -> float:
    """The device's bf16 matmul rate: the mean of ten 8192^3 products after three warm-ups."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


LAYOUTS = ("padded (TRL)", "padded per micro", "packed, SDPA per sequence", "packed")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["small", "3b"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=640)
    parser.add_argument(
        "--micro", type=int, default=4, help="padded: samples per micro-batch; packed: budget = micro x max-len tokens"
    )
    parser.add_argument("--truncated", type=float, default=0.1, help="fraction of completions cut at the generation limit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the dense peak for MFU; 0 on a GPU = measured here (an 8192^3 bf16 matmul)")  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not args.peak_tflops:
        args.peak_tflops = measured_peak_tflops(device)
        print(f"measured bf16 peak: {args.peak_tflops:.0f} TFLOP/s")
    sizes, vision = (QWEN_3B, QWEN2_5_VL_3B_VISION) if args.model == "3b" else (SMALL, SMALL_VISION)
    model = build_model(sizes, device, getattr(torch, args.dtype), vision)
    if args.model == "3b":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-7, foreach=False)
    items = skewed_batch(args.samples, args.min_len, args.max_len, args.truncated, model.config.get_text_config().vocab_size)
    flops = update_flops(model, items)
    print(f"{args.model} model on {device}, {args.dtype}; {len(items)} sequences of {args.min_len}-{args.max_len} tokens")
    results = {}
    for layout in LAYOUTS:
        kernel = "per_sequence" if layout == "packed, SDPA per sequence" else "varlen"
        model.set_attn_implementation({"text_config": kernel, "vision_config": "sdpa"})
        update(model, optimizer, items, layout, args.micro, args.max_len, device)  # warm-up
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            real, computed = update(model, optimizer, items, layout, args.micro, args.max_len, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        results[layout] = seconds
        line = f"{layout:>26}: efficiency {real / computed:.3f} ({real} real / {computed} computed tokens), {seconds:.3f} s/update, {real / seconds:,.0f} tokens/s"
        if args.peak_tflops:
            line += f", MFU {flops / seconds / (args.peak_tflops * 1e12):.1%}"
        if device.type == "cuda":
            line += f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        print(line)
    for baseline in LAYOUTS[:-1]:
        print(f"packed is {results[baseline] / results['packed']:.2f}x faster than {baseline}")


if __name__ == "__main__":
    main()
