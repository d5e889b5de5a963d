"""Packed causal attention kernels, forward + backward, side by side in one process (CPU or GPU).

    python bench/attention.py                       # CPU: what model.varlen_attention runs there
    python bench/attention.py --device cuda         # adds torch's varlen kernel (bf16)

Variants, all exactly the block-diagonal causal attention of B packed sequences (1, H, S, D):
- slices: one SDPA call per sequence on q[:, :, s:e] views (the kernel before issue 18);
- split views: one SDPA call per sequence on `split` views (model.blockwise_attention);
- padded: one SDPA call over the sequences gathered into a right-padded (B, H, max_len, D) layout;
- torch varlen (CUDA): torch.nn.attention.varlen.varlen_attn (model.torch_varlen_causal).
Shapes: the vs_trl run's micro-batch (64 sequences of ~280 tokens, the tiny model's heads), RL's
skewed lengths (10x spread), and Qwen2.5-VL-3B's heads (16 / 2 KV, 128 wide). Prints the median
time of each and its ratio to the model's own kernel.
"""

import argparse
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import blockwise_attention, torch_varlen_causal, varlen_attn  # noqa: E402


def slices(q, k, v, cu):
    b = cu.tolist()
    out = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True)
           for s, e in zip(b, b[1:])]  # fmt: skip
    return torch.cat(out, 2).transpose(1, 2)


def padded(q, k, v, cu):
    S, lengths = q.shape[2], (cu[1:] - cu[:-1]).long()
    starts, cols = cu[:-1].long(), torch.arange(int(lengths.max()), device=q.device)
    index = (starts[:, None] + cols).clamp(max=S - 1)  # (B, L): causal masking never lets a real token see padding
    out = F.scaled_dot_product_attention(*(x[0][:, index].transpose(0, 1) for x in (q, k, v)), is_causal=True, enable_gqa=True)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths, output_size=S)
    return out.transpose(1, 2)[seq, torch.arange(S, device=q.device) - starts[seq]][None]


def split_views(q, k, v, cu):
    return blockwise_attention(q, k, v, (cu[1:] - cu[:-1]).tolist(), None, None)


def torch_varlen(q, k, v, cu):
    max_len = int((cu[1:] - cu[:-1]).max())
    return torch_varlen_causal(*(x[0].transpose(0, 1) for x in (q, k, v)), cu, cu, max_len, max_len, None)[None]


def timed(fn, q, k, v, cu, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        if q.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(q, k, v, cu).float().sum().backward()
        if q.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rng = random.Random(0)
    shapes = {
        "vs_trl micro-batch, 64 x ~280, heads 2/1 x 32": ([260 + rng.choice([24, 24, 10, 5]) for _ in range(64)], 2, 1, 32),
        "skewed, 32 x 64-640, heads 8/2 x 32": ([int(64 * 10 ** rng.random()) for _ in range(32)], 8, 2, 32),
        "3B heads 16/2 x 128, 16 x 128-1024": ([int(128 * 8 ** rng.random()) for _ in range(16)], 16, 2, 128),
    }
    variants = {"slices": slices, "split views": split_views, "padded": padded}
    if device.type == "cuda" and varlen_attn is not None:
        variants["torch varlen"] = torch_varlen
    own = "torch varlen" if "torch varlen" in variants else "split views"  # what model.varlen_attention runs here
    print(f"{device}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; model's kernel: {own}")
    for name, (lengths, heads, kv_heads, dim) in shapes.items():
        S = sum(lengths)
        q, k, v = (torch.randn(1, h, S, dim, device=device, dtype=dtype, requires_grad=True) for h in (heads, kv_heads, kv_heads))
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        seconds = {v_name: timed(fn, q, k, v, cu, args.repeats) for v_name, fn in variants.items()}
        row = ", ".join(f"{n} {s * 1e3:.1f} ms ({s / seconds[own]:.2f}x)" for n, s in seconds.items())
        print(f"{name}: {row}")


if __name__ == "__main__":
    main()
