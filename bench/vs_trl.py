"""This project's train.py loop vs TRL's GRPOTrainer on the same tiny run, side by side in one process.

    pip install -r requirements-bench.txt      # TRL, a bench-only dependency
    python bench/vs_trl.py [--steps 12] [--model warm|random]

Both train the project's tiny Qwen2.5-VL from the same saved weights (TRL loads them with
AutoModelForImageTextToText) on the same synthetic arithmetic prompts with LMM-R1's system prompt:
8 prompts x 8 samples a step, 24 new tokens, temperature 1, one update per rollout (the mini-batch is
the whole rollout), lr 1e-3 constant, AdamW betas (0.9, 0.95), no KL, GRPO advantages, token-mean
loss, no gradient checkpointing. Two setups (--model):
- warm (default; issue 31's): the warm-started debug=tiny model, its 16 problems, FRE-Text's rewards
  (0.5 format + 1.0 math, our verifiers on both sides);
- random: the random tiny model, 64 problems, a reward with variance on a model that is never right
  (the fraction of digits in the completion).
Ours runs through train.run twice, with each prompt once per group (trainer.share_prompts, the
default) and once per sample; TRL through trainer.train. The first steps are warm-up and left out of
the medians. Prints the medians, the ratios, and every reward curve.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the repository, and tests/toy_rewards.py for the reward

import torch  # noqa: E402
from conftest import compose_cfg  # noqa: E402

import train  # noqa: E402
from data import LMM_R1_SYSTEM_PROMPT, chat_text, synthetic_samples  # noqa: E402
from model import load_policy, save_checkpoint  # noqa: E402
from rewards import resolve  # noqa: E402

PROMPTS, GROUP, NEW_TOKENS, LR = 8, 8, 24, 1e-3
WARMUP_STEPS = 2
SETUPS = {  # --model: (debug preset of the weights, problems, reward weights)
    "warm": ("debug=tiny", 16, {"format": 0.5, "math": 1.0}),
    "random": ("debug=tiny_random", 64, {"toy_rewards:digit_fraction": 1.0}),
}


def ours(model_dir: str, steps: int, run_dir: str, setup: str, share_prompts: bool, threads: Optional[int], seed: int):
    """(step times, reward means) of `train.run` on the run above."""
    _, n_data, weights = SETUPS[setup]
    reward = ["+reward.weights={toy_rewards\\:digit_fraction: 1.0}", "~reward.weights.format", "~reward.weights.math"]
    overrides = [
        "debug=tiny", "log.wandb=disabled", "log.progress=false", f"model.path={model_dir}", f"trainer.share_prompts={share_prompts}",
        *([f"trainer.threads={threads}"] if threads is not None else []),
        f"trainer.seed={seed}", f"trainer.max_steps={steps}", f"data.num_synthetic={n_data}",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}", f"rollout.max_new_tokens={NEW_TOKENS}",
        "rollout.temperature=1.0", f"rollout.micro_batch_size={PROMPTS * GROUP}",
        f"trainer.mini_batch_size={PROMPTS * GROUP}", "trainer.micro_batch_size=8", f"trainer.lr={LR}", "trainer.warmup_ratio=0", "trainer.min_lr_ratio=1.0",
        "algo.estimator=grpo", "algo.kl_coef=0", "algo.loss_agg=token_mean", "trainer.save_every=0",
        *(reward if setup == "random" else [f"reward.weights={{format: {weights['format']}, math: {weights['math']}}}"]),
    ]  # fmt: skip
    train.run(compose_cfg(overrides), run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    parts = {k: statistics.median(r[k] for r in rows[WARMUP_STEPS:]) for k in ("perf/rollout_s", "perf/update_s")}
    print("ours, medians of the parts: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    return [r["perf/step_s"] for r in rows], [r["reward/mean"] for r in rows]


def trl_reward(setup: str):
    """TRL's reward function: ours, from the same verifiers (rewards.resolve) and weights."""
    weights = SETUPS[setup][2]

    def reward(completions, answer, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [sum(w * resolve(name)(t, {"answer": a}) for name, w in weights.items()) for t, a in zip(texts, answer)]

    return reward


def trl(model_dir: str, steps: int, out_dir: str, tokenizer, setup: str, seed: int):
    """(step times, reward means) of TRL's GRPOTrainer on the run above."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = []
    for s in synthetic_samples("arithmetic", SETUPS[setup][1], seed, 112, LMM_R1_SYSTEM_PROMPT):
        # Arrow wants one type per field: each message's text parts as one string (the same template text)
        messages = [{"role": m["role"], "content": text_of(m["content"])} for m in s.messages]
        assert chat_text(messages, tokenizer) == chat_text(s.messages, tokenizer)  # TRL's prompts are ours
        rows.append({"prompt": messages, "answer": s.answer})

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=out_dir, use_cpu=True, max_steps=steps, seed=seed, report_to="none", save_strategy="no",
        logging_steps=1, per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, beta=0.0, loss_type="dapo",
        scale_rewards="group", gradient_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    timer = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward(setup), args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    trainer.train()
    return timer.times, [h["reward"] for h in trainer.state.log_history if "reward" in h]


def text_of(content) -> str:
    return content if isinstance(content, str) else "".join(c["text"] for c in content if c["type"] == "text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", choices=list(SETUPS), default="warm")
    parser.add_argument("--seed", type=int, default=42, help="both sides' seed: the problems drawn, sampling, data order")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="TRL's torch threads (default: torch's)")
    parser.add_argument("--our-threads", type=int, default=None, help="trainer.threads (default: debug=tiny's, 1; 0: torch's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg([SETUPS[args.model][0], f"trainer.seed={args.seed}"])
        policy, tokenizer, image_processor = load_policy(cfg.model, args.seed, torch.device("cpu"))
        model_dir = os.path.join(tmp, "tiny")
        save_checkpoint(model_dir, policy, tokenizer, image_processor)  # every run starts from these weights
        for share in (True, False):  # (ours sets its own threads: trainer.threads, 1 at debug=tiny)
            name = "ours, shared prompts" if share else "ours, per sample"
            runs[name] = ours(
                model_dir, args.steps, os.path.join(tmp, name.replace(" ", "_")), args.model, share, args.our_threads, args.seed
            )
        torch.set_num_threads(args.threads)  # TRL's: --threads, default torch's own
        runs["TRL"] = trl(model_dir, args.steps, os.path.join(tmp, "trl"), tokenizer, args.model, args.seed)
    medians = {name: statistics.median(times[WARMUP_STEPS:]) for name, (times, _) in runs.items()}
    print(
        f"--model {args.model}, threads: ours {args.our_threads if args.our_threads is not None else 'debug=tiny (1)'}, TRL {args.threads}; "
        f"seed {args.seed}, {args.steps} steps each, medians over steps {WARMUP_STEPS + 1}+"
    )
    for name, median in medians.items():
        rewards = runs[name][1]
        print(f"{name:>22}: median step {median:.3f} s, / TRL {median / medians['TRL']:.2f}, reward over the last 3 steps "
              f"{statistics.mean(rewards[-3:]):.3f}")  # fmt: skip
    print("reward/mean by step (" + " | ".join(runs) + "):")
    for k, rewards in enumerate(zip(*(r for _, r in runs.values())), start=1):
        print(f"  {k:3d}  " + " | ".join(f"{x:.3f}" for x in rewards))


if __name__ == "__main__":
    main()
