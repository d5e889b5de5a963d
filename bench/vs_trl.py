"""This project's train.py loop vs TRL's GRPOTrainer on the same tiny run, side by side in one process.

    pip install -r requirements-bench.txt      # TRL, a bench-only dependency
    python bench/vs_trl.py [--steps 16]

Both train the project's tiny Qwen2.5-VL from the same saved weights (TRL loads them with
AutoModelForImageTextToText) on the same 64 synthetic arithmetic prompts: 8 prompts x 8 samples a
step, 24 new tokens, temperature 1, one update per rollout (the mini-batch is the whole rollout),
lr 1e-3 constant, AdamW betas (0.9, 0.95), no KL, GRPO advantages, token-mean loss, no gradient
checkpointing, and a reward with variance (the fraction of digits in the completion: the random
model scores 0 on the real verifiers). Ours runs through train.run, TRL through trainer.train;
the first steps are warm-up and left out of the medians. Prints both medians, their ratio and
both reward curves.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the repository, and tests/toy_rewards.py for the reward

import torch  # noqa: E402
from conftest import compose_cfg  # noqa: E402
from toy_rewards import digit_fraction  # noqa: E402

import train  # noqa: E402
from data import LMM_R1_SYSTEM_PROMPT, chat_text, synthetic_samples  # noqa: E402
from model import load_policy, save_checkpoint  # noqa: E402

PROMPTS, GROUP, NEW_TOKENS, LR, N_DATA, SEED = 8, 8, 24, 1e-3, 64, 42
WARMUP_STEPS = 2


def ours(model_dir: str, steps: int, run_dir: str):
    """(step times, reward means) of `train.run` on the run above."""
    overrides = [
        "debug=tiny", "log.wandb=disabled", "log.progress=false", f"model.path={model_dir}",
        f"trainer.seed={SEED}", f"trainer.max_steps={steps}", f"data.num_synthetic={N_DATA}",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.group_size={GROUP}", f"rollout.max_new_tokens={NEW_TOKENS}",
        "rollout.temperature=1.0", f"rollout.micro_batch_size={PROMPTS * GROUP}",
        f"trainer.mini_batch_size={PROMPTS * GROUP}", "trainer.micro_batch_size=8", f"trainer.lr={LR}", "trainer.warmup_ratio=0", "trainer.min_lr_ratio=1.0",
        "algo.estimator=grpo", "algo.kl_coef=0", "algo.loss_agg=token_mean", "trainer.save_every=0",
        "+reward.weights={toy_rewards\\:digit_fraction: 1.0}", "~reward.weights.format", "~reward.weights.math",
    ]  # fmt: skip
    train.run(compose_cfg(overrides), run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    parts = {k: statistics.median(r[k] for r in rows[WARMUP_STEPS:]) for k in ("perf/rollout_s", "perf/update_s")}
    print("ours, medians of the parts: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    return [r["perf/step_s"] for r in rows], [r["reward/mean"] for r in rows]


def trl_reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [digit_fraction(t, {}) for t in texts]


def trl(model_dir: str, steps: int, out_dir: str, tokenizer):
    """(step times, reward means) of TRL's GRPOTrainer on the run above."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = []
    for s in synthetic_samples("arithmetic", N_DATA, SEED, 112, LMM_R1_SYSTEM_PROMPT):
        # Arrow wants one type per field: each message's text parts as one string (the same template text)
        messages = [{"role": m["role"], "content": text_of(m["content"])} for m in s.messages]
        assert chat_text(messages, tokenizer) == chat_text(s.messages, tokenizer)  # TRL's prompts are ours
        rows.append({"prompt": messages})

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=out_dir, use_cpu=True, max_steps=steps, seed=SEED, report_to="none", save_strategy="no",
        logging_steps=1, per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, beta=0.0, loss_type="dapo",
        scale_rewards="group", gradient_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    timer = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    trainer.train()
    return timer.times, [h["reward"] for h in trainer.state.log_history if "reward" in h]


def text_of(content) -> str:
    return content if isinstance(content, str) else "".join(c["text"] for c in content if c["type"] == "text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads for both (on a machine shared with other jobs, 1 measures steadily)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_cfg(["debug=tiny_random", f"trainer.seed={SEED}"])  # random weights, as recorded
        policy, tokenizer, image_processor = load_policy(cfg.model, SEED, torch.device("cpu"))
        model_dir = os.path.join(tmp, "tiny")
        save_checkpoint(model_dir, policy, tokenizer, image_processor)  # both start from these weights
        our_times, our_rewards = ours(model_dir, args.steps, os.path.join(tmp, "ours"))
        trl_times, trl_rewards = trl(model_dir, args.steps, os.path.join(tmp, "trl"), tokenizer)
    med_ours = statistics.median(our_times[WARMUP_STEPS:])
    med_trl = statistics.median(trl_times[WARMUP_STEPS:])
    print(f"torch threads {torch.get_num_threads()}, {args.steps} steps each, medians over steps {WARMUP_STEPS + 1}+")
    print(f"{'':>12} {'median step (s)':>16}")
    print(f"{'ours':>12} {med_ours:16.3f}")
    print(f"{'TRL':>12} {med_trl:16.3f}")
    print(f"ratio ours / TRL = {med_ours / med_trl:.2f}")
    print("reward/mean by step (ours | TRL):")
    for k, (a, b) in enumerate(zip(our_rewards, trl_rewards), start=1):
        print(f"  {k:3d}  {a:.3f} | {b:.3f}")


if __name__ == "__main__":
    main()
