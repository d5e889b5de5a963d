"""Each prompt once per group (trainer.share_prompts) vs once per sample, side by side in one process.

    python bench/prefix.py --device cuda --dtype bfloat16 --groups 4,8,16 --prompts 2 --repeats 3   # GPU (bench/gpu.sh)
    python bench/prefix.py --model small                     # CPU: both shapes, G = 8, fp32

The model is Qwen2.5-VL-3B's published config cut to 2 text and 2 vision layers (one of them full
attention), random weights, as in tests/test_real_size.py; the vision tower trains (LMM-R1's
recipes do). On a 2-core CPU one pass of it at these shapes takes 0.5-4 minutes (lm_head over
151,936 words on every completion token, the same in both layouts), a shape at G=8 16-22 minutes
with --repeats 1, 22 GiB resident at its peak (mgt_geo): `--model small` is bench/packing.py's
small Qwen2.5-VL (256 wide, 4 layers, a 4,096-word vocabulary) on the same shapes. Shapes, each with G samples per prompt:
- mgt_geo: an 896x896 image (1,024 image tokens) plus 60 text tokens, completions of median 400
  tokens (log-normal, capped at 2,048);
- fre_text: a 150-token text prompt, completions of median 1,000 tokens (the same spread).
For each: the tokens the language model processes, the time of a no-grad log-prob pass (old
log-probs, reference) and of the update's forward and backward, both layouts in
trainer.max_tokens_per_micro micro-batches, the two layouts timed alternately (A B A B: the median
of each and of the pairs' ratios, their spread with --repeats > 1), and the ratio of their forward
FLOPs; each layout's update in tokens/s and, on a GPU (or given --peak-tflops), its MFU.
"""

import argparse
import math
import os
import random
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from packing import QWEN_3B, SMALL, SMALL_VISION, build_model, measured_peak_tflops  # noqa: E402

from data import Prompt, Sample  # noqa: E402
from model import QWEN2_5_VL_3B_VISION, pack, sequence_logps  # noqa: E402
from train import micro_batches  # noqa: E402

SHAPES = {  # name -> (image side in pixels or 0, text tokens of the prompt, median completion tokens)
    "mgt_geo": (896, 60, 400),
    "fre_text": (0, 150, 1000),
}


def image_prompt(config, side: int, text_tokens: int, rng: random.Random) -> Prompt:
    """A prompt of `text_tokens` random text tokens and one side x side image: its (side/14)^2
    patches merged 2x2 into image tokens, as Qwen's processor lays them out."""
    vocab = config.get_text_config().vocab_size
    ids = [rng.randrange(10, vocab - 10) for _ in range(text_tokens)]
    if not side:
        return Prompt(ids, None, None, "", Sample(messages=[], answer=""))
    grid = side // 14
    v = config.vision_config
    patches = torch.randn(grid * grid, 3 * v.temporal_patch_size * v.patch_size**2, generator=torch.Generator().manual_seed(0))
    image = [config.vision_start_token_id] + [config.image_token_id] * (grid * grid // 4) + [config.vision_end_token_id]
    return Prompt(image + ids, patches, torch.tensor([[1, grid, grid]]), "", Sample(messages=[], answer=""))


def rollout_groups(config, shape: str, prompts: int, G: int, seed: int = 0) -> list:
    """`prompts` groups of G (prompt, completion) pairs, each group sharing one Prompt object."""
    side, text, median = SHAPES[shape]
    rng = random.Random(seed)
    vocab = config.get_text_config().vocab_size
    items = []
    for _ in range(prompts):
        prompt = image_prompt(config, side, text, rng)
        for _ in range(G):
            n = min(2048, max(1, round(median * math.exp(rng.gauss(0.0, 0.5)))))
            items.append((prompt, [rng.randrange(10, vocab - 10) for _ in range(n)]))
    return items


def forward_flops(model, items, share: bool) -> float:
    """Forward FLOPs of the language model and the vision tower: 2 x params x tokens (lm_head on
    completion tokens only), attention 4 x layers x hidden x the keys each query attends to, and
    2 x vision params x patches for each image the layout holds."""
    cfg = model.config.get_text_config()
    body = sum(p.numel() for n, p in model.model.language_model.named_parameters() if "embed_tokens" not in n)
    vision = sum(p.numel() for p in model.model.visual.parameters())
    prompts = {id(p): p for p, _ in items}.values() if share else [p for p, _ in items]
    tokens = sum(len(p.input_ids) for p in prompts) + sum(len(c) for _, c in items)
    keys = sum(len(p.input_ids) ** 2 / 2 for p in prompts) + sum(len(c) * (len(p.input_ids) + len(c) / 2) for p, c in items)
    patches = sum(p.pixel_values.shape[0] for p in prompts if p.pixel_values is not None)
    completion = sum(len(c) for _, c in items)
    return (
        2 * body * tokens
        + 2 * model.lm_head.weight.numel() * completion
        + 4 * cfg.num_hidden_layers * cfg.hidden_size * keys
        + 2 * vision * patches
    )


def one_pass(model, items, t, device, grad: bool) -> int:
    """A log-prob pass over `items` in micro-batches (no grad, or forward and backward); returns
    the tokens the language model processed."""
    tokens = 0
    for idx in micro_batches(list(range(len(items))), items, t):
        batch = pack([items[i] for i in idx], model, 0, device, t.share_prompts)
        tokens += batch["input_ids"].shape[1]
        with torch.set_grad_enabled(grad), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logp = sequence_logps(model, batch, 1.0, 1024)  # (B, Tb)
        if grad:
            (logp * batch["completion_mask"]).sum().backward()
    if grad:
        model.zero_grad(set_to_none=True)
    return tokens


def timed(repeats: int, model, items, layouts, device, grad: bool) -> tuple:
    """Per layout, the tokens one_pass processes and each of `repeats` one_pass times, the layouts
    alternated (A B A B) after one warm-up each (which counts the tokens), so that a drift of the
    machine falls on both."""
    tokens = [one_pass(model, items, t, device, grad) for t in layouts]
    times = [[] for _ in layouts]
    for _ in range(repeats):
        for t, spent in zip(layouts, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            one_pass(model, items, t, device, grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            spent.append(time.perf_counter() - t0)
    return tokens, times


def speedup(times) -> str:
    """Per sample -> shared: median seconds and the median of the pairs' ratios (each repeat's two
    passes ran back to back)."""
    before, after = times
    ratios = sorted(b / a for b, a in zip(before, after))
    spread = f", pairs {ratios[0]:.2f}-{ratios[-1]:.2f}x" if len(ratios) > 1 else ""
    return f"{statistics.median(before):.2f} -> {statistics.median(after):.2f} s ({statistics.median(ratios):.2f}x{spread})"


def rates(tokens: int, seconds: float, flops: float, peak_tflops: float) -> str:
    """An update's throughput: language-model tokens/s and, given the device's peak, the model FLOPs
    utilisation (forward and backward: 3x the layout's forward FLOPs)."""
    line = f"{tokens / seconds:,.0f} processed tokens/s"
    return line + (f", MFU {3 * flops / seconds / (peak_tflops * 1e12):.1%}" if peak_tflops else "")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["3b", "small"], default="3b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--shapes", default="mgt_geo,fre_text")
    parser.add_argument("--groups", default="8", help="samples per prompt (G), comma-separated")
    parser.add_argument("--prompts", type=int, default=1, help="prompts (groups) per pass")
    parser.add_argument("--micro", type=int, default=16384, help="trainer.max_tokens_per_micro")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the dense peak for MFU; 0 on a GPU = measured here (an 8192^3 bf16 matmul)")  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not args.peak_tflops:
        args.peak_tflops = measured_peak_tflops(device)
        print(f"measured bf16 peak: {args.peak_tflops:.0f} TFLOP/s")
    if args.model == "3b":
        text, vision = QWEN_3B | {"num_hidden_layers": 2}, QWEN2_5_VL_3B_VISION | {"depth": 2, "fullatt_block_indexes": [1]}
    else:
        text, vision = SMALL, SMALL_VISION
    model = build_model(text, device, getattr(torch, args.dtype), vision)
    model.model.visual.requires_grad_(True)
    model.train()
    name = "Qwen2.5-VL-3B cut to 2 text + 2 vision layers" if args.model == "3b" else "a small Qwen2.5-VL (256 wide, 4 layers)"
    print(f"{name} on {device}, {args.dtype}; micro-batches of {args.micro} tokens", flush=True)
    for shape in args.shapes.split(","):
        for G in map(int, args.groups.split(",")):
            items = rollout_groups(model.config, shape, args.prompts, G)
            layouts = [SimpleNamespace(packing=True, max_tokens_per_micro=args.micro, share_prompts=s) for s in (False, True)]
            f0, f1 = (forward_flops(model, items, share) for share in (False, True))
            (t0, t1), logp = timed(args.repeats, model, items, layouts, device, grad=False)
            _, update = timed(args.repeats, model, items, layouts, device, grad=True)
            print(
                f"{shape:>8} G={G:<2}: tokens {t0} -> {t1} ({t0 / t1:.2f}x fewer), FLOPs {f0 / f1:.2f}x fewer; "
                f"log-prob pass {speedup(logp)}; update fwd+bwd {speedup(update)}",
                flush=True,
            )
            u0, u1 = (statistics.median(x) for x in update)
            print(
                f"{'':>14}update: per sample {rates(t0, u0, f0, args.peak_tflops)}; shared {rates(t1, u1, f1, args.peak_tflops)}"
            )


if __name__ == "__main__":
    main()
