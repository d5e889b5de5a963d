"""Data-parallel training with torchrun (gloo on CPU): sharding must change nothing.

Each test runs the same short RL job once in a single process and once as 2 ranks, and compares the
rollouts, the metrics and the weights after the steps. Every rank samples its prompts from the same
per-prompt seeds a single process uses, mini-batches are drawn from the same global permutation, and
each sequence's loss weight comes from its whole mini-batch (train.sequence_weights): only fp32
summation order differs.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_DEFAULTS, run_on_two_ranks
from test_resume import assert_same_weights, final_weights, metrics_of, same_metrics

TOY = ["+reward.weights={toy_rewards\\:digit_fraction: 1.0}", "~reward.weights.format", "~reward.weights.math"]
JOB = [
    *TINY_DEFAULTS,
    *TOY,
    "trainer.lr=1e-3",
    "trainer.warmup_ratio=0",
    "trainer.max_steps=2",
    "algo.kl_coef=0.01",
    "trainer.mini_batch_size=8",
    "algo.loss_agg=chunk_token_mean",
    "algo.loss_chunk=3",
]  # fmt: skip  (2 updates per step; LMM-R1's chunked loss with chunks that span the ranks, the last one short)


def launch(run_dir, extra, nproc: int, torchrun: bool = True):
    """train.py as `nproc` ranks, started by torchrun or (torchrun=False) by train.py itself (trainer.devices)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": os.path.join(ROOT, "tests")}
    head = [sys.executable]
    if nproc > 1 and torchrun:
        head += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    elif nproc > 1:
        extra = [*extra, f"trainer.devices={nproc}"]
    cmd = [*head, os.path.join(ROOT, "train.py"), *JOB, *extra, f"hydra.run.dir={run_dir}"]
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    out = subprocess.run(cmd, cwd=os.path.dirname(run_dir), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return metrics_of(run_dir) if "${" not in run_dir else None


def one_image_prompt_of_two(tmp_path) -> list:
    """fre_multi on a file of an image prompt and a text prompt, both in every step, one per rank: each
    step one rank has an image and the other none."""
    from PIL import Image
    from test_data import lmm_r1_row, write_rows

    Image.new("RGB", (56, 56), "white").save(tmp_path / "a.png")
    text_row = {"question": "What is 2 + 3?", "answer": "$5$", "message": [{"role": "user", "content": "What is 2 + 3?"}]}
    rows = write_rows(tmp_path / "mixed.jsonl", [lmm_r1_row(str(tmp_path / "a.png")), text_row])
    return ["stage=fre_multi", "data.source=files", f"data.train_files=[{rows}]", "rollout.prompts_per_step=2"]


def assert_same_training(tmp_path, layout):
    extra = [o for o in layout if o != MIXED] + (one_image_prompt_of_two(tmp_path) if MIXED in layout else [])
    launch(str(tmp_path / "single"), extra, 1)
    launch(str(tmp_path / "ranks"), extra, 2)
    assert_trained_alike(tmp_path / "single", tmp_path / "ranks")


def assert_trained_alike(single_dir, ranks_dir):
    """The run in `ranks_dir` (2 ranks) drew the same samples, had the same losses and ended with the
    same weights (to fp32 summation order) as the one in `single_dir` (one process)."""
    single, ranks = (metrics_of(d) for d in (single_dir, ranks_dir))
    assert [m["step"] for m in ranks] == [m["step"] for m in single]  # rank 0 alone writes the logs
    for a, b in zip(single, ranks):
        assert a["reward/mean"] == b["reward/mean"] and a["rollout/response_len"] == b["rollout/response_len"]  # same samples
        # these are means of O(1) per-token terms that nearly cancel (whitened advantages): fp32
        # summation order moves them by ~1e-7 absolute, a sharding mistake by ~1e-1
        for key in ("loss/policy", "loss/kl", "loss/entropy", "loss/clip_frac"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
        assert b["loss/grad_norm"] == pytest.approx(a["loss/grad_norm"], rel=1e-4)
    assert single[0]["reward/std"] > 0 and single[0]["loss/grad_norm"] > 0  # real updates
    w1, w2 = final_weights(single_dir), final_weights(ranks_dir)
    assert w1.keys() == w2.keys()
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    # Adam's steps are ~lr * sign(grad): equal up to elements whose gradient is ~0 (below Adam's eps),
    # where fp32 summation-order noise can move an update by a fraction of lr (1e-3)
    assert diff.max() < 5e-5 and (diff > 1e-6).float().mean() < 1e-4


EVAL_AT_STEP_2 = [
    "eval.every=2",
    "eval.benchmarks=[sokoban]",
    "eval.max_items=5",
    "eval.max_new_tokens=16",
    "eval.data_dir=eval_data",
]
MIXED = "one image prompt of two"  # a layout's marker for one_image_prompt_of_two's data


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        ["trainer.zero_stage=0"],  # plain PyTorch: gradients all-reduced
        ["trainer.zero_stage=2"],  # DeepSpeed: optimizer states and gradients sharded
        # DeepSpeed: parameters sharded too (reference model as well). Every lm_head call gathers its
        # weight, and 8-token chunks of each micro-batch's completions (lengths 1-24, differing per rank)
        # give the ranks different chunk counts: each must run the busiest rank's
        # Evaluation on the way (step 2) shards its 5 items over the ranks (3 and 2) and scores them on rank 0.
        # A 300-token budget holds a ~260-token prompt and 1-3 of its completions: every group spans
        # micro-batches, and the ranks' micro-batch counts differ
        # The HF engine's batches of 2 rows give the evaluation's 3 and 2 items 2 and 1 batches, unless padded.
        [
            "trainer.zero_stage=3",
            "trainer.logp_chunk_size=8",
            "trainer.max_tokens_per_micro=300",
            "rollout.micro_batch_size=2",
            *EVAL_AT_STEP_2,
        ],  # fmt: skip
        # with a sharded value model; padded batches, one rank's prompt with an image and the other's
        # without: the vision tower's gathers must happen on both
        ["trainer.zero_stage=3", "algo.estimator=gae", "algo.critic_lr=1e-3", "trainer.packing=false", MIXED],
        ["trainer.zero_stage=3", "trainer.offload=all"],  # parameters and optimizer states on the CPU
    ],
    ids=["ddp", "zero2", "zero3", "zero3-gae", "zero3-offload"],
)
def test_two_ranks_train_exactly_like_one_process(tmp_path, layout):
    assert_same_training(tmp_path, layout)
    if EVAL_AT_STEP_2[0] in layout:  # the two ranks' evaluation at step 2 is one process's of the same weights
        assert_evaluated_as_one_process_would(tmp_path, tmp_path / "ranks")


SMALL_BUDGET = ["trainer.max_tokens_per_micro=300", "trainer.logp_chunk_size=8"]


@pytest.fixture(scope="module")
def plain_small_budget_run(tmp_path_factory):
    """One process of plain PyTorch with SMALL_BUDGET: its run dir."""
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    launch(str(run_dir), [*SMALL_BUDGET, "trainer.zero_stage=0"], 1)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        ["trainer.zero_stage=2"],
        ["trainer.zero_stage=3"],
        ["trainer.zero_stage=3", "trainer.packing=false", "trainer.micro_batch_size=2"],
    ],
    ids=["zero2", "zero3", "zero3-padded"],
)
def test_deepspeed_accumulates_micro_batches_as_plain_pytorch(tmp_path, plain_small_budget_run, layout):
    """One process, a 300-token budget: each mini-batch of 8 samples is 3-8 packed micro-batches (a
    ~260-token prompt and 1-3 of its completions each), or 4 padded ones of 2. DeepSpeed's gradients
    must be their sum, as plain PyTorch's are. Before: our forwards bypass DeepSpeedEngine.forward, so
    ZeRO-3 never counted a micro-batch and each one's gradients replaced the last's (grad norm 0.35
    instead of 0.91); the other tests' runs had one micro-batch per mini-batch, or compared ZeRO-3
    with ZeRO-3."""
    launch(str(tmp_path / "deepspeed"), [*SMALL_BUDGET, *layout], 1)
    assert_trained_alike(plain_small_budget_run, tmp_path / "deepspeed")


def assert_evaluated_as_one_process_would(tmp_path, run_dir):
    """eval.py in one process on `run_dir`'s final weights (those its step-2 evaluation saw) scores
    each item as the ranks did: the same completions, in the items' order, and the same score."""
    out = tmp_path / "eval_alone"
    args = [*TINY_DEFAULTS, *EVAL_AT_STEP_2[1:], f"model.path={run_dir / 'checkpoints' / 'final'}", f"hydra.run.dir={out}"]
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval.py"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    by_ranks = run_dir / "eval" / "step_2" / "sokoban"
    assert (by_ranks / "predictions.jsonl").read_text() == (out / "sokoban" / "predictions.jsonl").read_text()
    assert metrics_of(run_dir)[1]["eval/sokoban"] == json.loads((out / "sokoban" / "results.json").read_text())["accuracy"]


@pytest.mark.slow
def test_trainer_devices_starts_the_ranks_as_torchrun_does(tmp_path):
    """`python train.py trainer.devices=2` starts its two ranks itself (torch's elastic launcher, as
    torchrun --standalone): the same run as under torchrun, bit for bit."""
    by_torchrun = launch(str(tmp_path / "torchrun"), ["trainer.zero_stage=0"], 2)
    by_devices = launch(str(tmp_path / "devices"), ["trainer.zero_stage=0"], 2, torchrun=False)
    assert len(by_devices) == 2 and all(same_metrics(a, b) for a, b in zip(by_torchrun, by_devices))
    assert by_devices[0]["loss/grad_norm"] > 0  # (real updates)
    assert_same_weights(final_weights(tmp_path / "torchrun"), final_weights(tmp_path / "devices"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "zero", [["trainer.zero_stage=2"], ["trainer.zero_stage=1", "model.dtype=bfloat16"]], ids=["zero2", "zero1-bf16"]
)
def test_deepspeed_run_resumes_from_its_sharded_checkpoint(tmp_path, zero):
    """A 2-rank ZeRO run continued from its step-1 checkpoint (as a requeued job would) ends
    with the same weights as the run that went straight through: ZeRO-2, and ZeRO-1 on bf16 weights
    (DeepSpeed's BF16_Optimizer, with its own shards). The straight run's dir comes from
    Hydra's `${now:...}`, resolved by each rank itself, to the microsecond here so that the ranks'
    always differ: both ranks write into rank 0's, and no other dir is left."""
    import shutil

    layout = [*zero, "trainer.save_every=1"]
    launch(str(tmp_path / "straight" / "${now:%H-%M-%S-%f}"), layout, 2)
    (straight_dir,) = (tmp_path / "straight").glob("*-*-*-*")  # (outputs/ beside it: the latest link)
    straight = metrics_of(straight_dir)
    step_1 = straight_dir / "checkpoints" / "step_1"
    shards = sorted(f.name.split("_mp_rank")[0].removeprefix("bf16_") for f in (step_1 / "policy").rglob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0", "zero_pp_rank_1"]  # DeepSpeed's own shards, both ranks': optimizer partitions
    os.makedirs(tmp_path / "resumed" / "checkpoints")
    shutil.copytree(step_1, tmp_path / "resumed" / "checkpoints" / "step_1")
    resumed = launch(str(tmp_path / "resumed"), layout, 2)
    assert [m["step"] for m in resumed] == [2]  # only the step after the checkpoint ran (the file was new)
    assert resumed[0]["loss/policy"] == straight[1]["loss/policy"]
    assert_same_weights(final_weights(straight_dir), final_weights(tmp_path / "resumed"))


def run_script(code: str) -> str:
    """`code` in a fresh process (its process group must not outlive it), tests/ importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_cpu_collectives_work_under_a_default_group_without_a_cpu_backend():
    """vLLM's in-process worker makes the default process group itself, nccl only; the trainer's
    counts, flags and metrics are CPU tensors. The CPU analogue: a default group of `cuda:gloo`."""
    code = """
import torch, dist
torch.distributed.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{dist.free_port()}", rank=0, world_size=1)
dist.barrier()
print(dist.all_max(3), dist.all_sum(torch.tensor([1.0, 2.0])).tolist(), dist.any_rank(True), dist.gather({"n": 1}))
"""
    assert run_script(code).split() == ["3", "[1.0,", "2.0]", "True", "[{'n':", "1}]"]


def test_weight_sync_buckets_under_zero3_are_those_without_it():
    """A ZeRO-3 parameter's numel() is 0 (its data is a shard): buckets sized by it would send the
    whole model as one. Bucketed by their full sizes, they are the same buckets, the same tensors."""
    code = """
import torch
from omegaconf import OmegaConf
import dist
from conftest import TINY_DEFAULTS, compose_cfg
from model import build_tiny_model, build_tiny_tokenizer
from rollout import weight_buckets

cfg = compose_cfg(TINY_DEFAULTS)
policy = build_tiny_model(build_tiny_tokenizer(cfg.model.tiny.vocab_size), cfg.model.tiny, seed=0)
def buckets():
    return [[(name, tuple(t.shape), round(t.double().sum().item(), 6)) for name, t in b] for b in weight_buckets(policy, 1 << 16, torch.float32)]
plain = buckets()
dist.init_distributed("cpu", always=True)
dist.deepspeed_engine(policy, None, None, OmegaConf.merge(cfg.trainer, {"zero_stage": 3}), bf16=False)
assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in policy.parameters())  # partitioned
sharded = buckets()
assert sharded == plain, (len(sharded), len(plain))
print(len(plain))
"""
    assert int(run_script(code).split()[-1]) > 5  # (DeepSpeed prints a line of its own before)


ENGINE_SCRIPT = """
import torch
from omegaconf import OmegaConf
import dist
from conftest import TINY_DEFAULTS, compose_cfg

TRAINER = compose_cfg(TINY_DEFAULTS).trainer
ZERO_LAYOUTS = [(0, "none"), (1, "none"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "all")]  # (config refuses ZeRO-1 offload)
LAYOUTS = [(stage, offload, bf16) for stage, offload in ZERO_LAYOUTS for bf16 in (False, True)]

def trained(model, stage, offload, bf16, lr_lambda):
    # model's AdamW (lr 0.1) and LR schedule, and {"policy": its DeepSpeed engine} (stage 0: none)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    t = OmegaConf.merge(TRAINER, {"zero_stage": stage, "offload": offload})
    return optimizer, schedule, {"policy": dist.deepspeed_engine(model, optimizer, schedule, t, bf16)} if stage else {}
"""

NAN_STEP = (
    ENGINE_SCRIPT
    + """
dist.init_distributed("cpu", always=True)
x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))

def weights(model):
    with dist.gathered_weights(model):
        return [p.detach().float().clone() for p in model.parameters()]

for stage, offload, bf16 in LAYOUTS:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    optimizer, schedule, engines = trained(model, stage, offload, bf16, lambda s: 1.0 / (1 + s))
    norms, moved = [], []
    for step in range(4):
        before = weights(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().pow(2).mean() * (float("nan") if step == 1 else 1.0)
        dist.backward(engines, "policy", loss, boundary=True)
        norms.append(dist.step_optimizer(engines, "policy", list(model.parameters()), optimizer, schedule, 1.0))
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, weights(model))))
    finite = all(torch.isfinite(w).all() for w in weights(model))
    print(stage, offload, bf16, [n == n and n < float("inf") for n in norms], moved, finite, schedule.last_epoch, round(schedule.get_last_lr()[0], 6))
"""
)


def test_a_non_finite_update_is_skipped_and_the_schedule_goes_on_under_deepspeed_too():
    """A NaN loss at the second of four steps: no update (weights unchanged and finite), the norm
    reported non-finite, and the LR schedule advanced anyway, tied to the step count, with plain
    PyTorch and under every ZeRO layout (offload included), fp32 and bf16. DeepSpeed skips an
    overflowed step's schedule (0.19.8's engine steps it only for an applied step), so a run under
    DeepSpeed fell one LR step behind the same run without it per skipped update; and ZeRO-2 with
    offload and fp32 gradient sums kept the NaN in those sums, skipping every later update
    (dist.drop_offloaded_gradient_sums)."""
    rows = [line.split(" ", 3) for line in run_script(NAN_STEP).splitlines() if line[:1].isdigit()]
    assert len(rows) == 12
    for stage, offload, bf16, rest in rows:
        assert rest == "[True, False, True, True] [True, False, True, True] True 4 0.02", (stage, offload, bf16, rest)


SMALL_GRADIENTS = (
    ENGINE_SCRIPT
    + """
dist.init_distributed("cpu", always=True)
for stage, offload, bf16 in LAYOUTS:
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer, schedule, engines = trained(model, stage, offload, bf16, lambda s: 1.0)
    grads = [1.0] + [1 / 512] * 64  # one mini-batch's micro-batches: summed, 1.125
    for i, g in enumerate(grads):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(torch.ones(1, 1)).float().sum() * g
        dist.backward(engines, "policy", loss, boundary=i == len(grads) - 1)
    print("norm", stage, offload, bf16, dist.step_optimizer(engines, "policy", list(model.parameters()), optimizer, schedule, 1.0))
"""
)


def test_deepspeed_sums_a_mini_batchs_gradients_in_fp32_as_plain_pytorch_does():
    """A weight's gradient over 65 micro-batches, 1 then 64 of 1/512 (each exact in bf16): 1.125 in
    fp32. Under DeepSpeed with bf16 the weights, so each micro-batch's gradient, are bf16; summed in
    bf16 (DeepSpeed's default) every 1/512 is lost under the spacing at 1.0, 1/128 (ZeRO-1/2/3 read
    1.0). ZeRO-1 with bf16 then runs BF16_Optimizer, whose backward prologue (run by a hook that
    DeepSpeedEngine.forward sets, which our forwards bypass) must clear what it has summed, or each
    micro-batch adds all before it again (it read 65.0). Every layout, offload included, fp32 and bf16."""
    rows = [line.split()[1:] for line in run_script(SMALL_GRADIENTS).splitlines() if line.startswith("norm ")]
    assert len(rows) == 12
    for stage, offload, bf16, norm in rows:
        assert float(norm) == 1.125, (stage, offload, bf16, norm)


@pytest.mark.parametrize(
    "env, devices, expected",
    [
        ({}, "auto", 1),  # a CPU: one process
        ({}, "2", 2),
        ({"WORLD_SIZE": "2"}, "2", 0),  # torchrun's rank: the ranks exist (and a child never starts more)
        ({"SUBMITIT_EXECUTOR": "slurm"}, "auto", 0),  # cluster=slurm's task
        ({"SLURM_STEP_NUM_TASKS": "4"}, "auto", "each would train alone"),  # srun's tasks, no rendezvous: refused
    ],
)
def test_ranks_to_start_follows_the_launcher(monkeypatch, env, devices, expected):
    from dist import ranks_to_start

    for key in ("WORLD_SIZE", "SUBMITIT_EXECUTOR", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            ranks_to_start(devices, "cpu")
    else:
        assert ranks_to_start(devices, "cpu") == expected


def test_launch_config_gives_ranks_the_grace_where_torch_takes_it(monkeypatch, capsys):
    """torch 2.12's and 2.13's LaunchConfig take shutdown_timeout, so the ranks get STOP_GRACE_S to
    save after a signal; 2.10's and 2.11's have no such field (read from their wheels): the launch
    goes on with their fixed 30 s and says so, instead of a TypeError on every run that starts its
    own ranks."""
    import dataclasses

    import torch.distributed.launcher.api as launcher
    from dist import STOP_GRACE_S, launch_config

    config = launch_config(2)
    assert (config.nproc_per_node, config.max_restarts, config.shutdown_timeout) == (2, 0, STOP_GRACE_S)
    assert "SIGUSR1" in config.signals_to_handle and capsys.readouterr().out == ""
    fields = [(f.name, f.type, f) for f in dataclasses.fields(launcher.LaunchConfig) if f.name != "shutdown_timeout"]
    monkeypatch.setattr(launcher, "LaunchConfig", dataclasses.make_dataclass("LaunchConfig", fields))  # 2.11's
    config = launch_config(2)
    assert (config.nproc_per_node, config.rdzv_endpoint) == (2, "localhost:0") and "SIGUSR2" in config.signals_to_handle
    assert "30 s to save" in capsys.readouterr().out


SHARDED_EVAL = """
import torch
import dist
import eval as evaluation
from conftest import TINY_DEFAULTS, compose_cfg
from data import Sample, encode_prompt, synthetic_samples
from model import build_image_processor, build_tiny_model, build_tiny_tokenizer, use_varlen_attention
from rollout import HFEngine, release_process_groups

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
cfg = compose_cfg(TINY_DEFAULTS)
tokenizer = build_tiny_tokenizer(cfg.model.tiny.vocab_size)
image_processor = build_image_processor(cfg.model.min_pixels, cfg.model.max_pixels)
model = build_tiny_model(tokenizer, cfg.model.tiny, seed=0).eval()
use_varlen_attention(model, "sdpa")
asked, generate = [], HFEngine.generate
HFEngine.generate = lambda self, prompts, *a, **k: asked.append(len(prompts)) or generate(self, prompts, *a, **k)
samples = synthetic_samples("arithmetic", 5, seed=0, image_size=56, system_prompt="sys")
items = [evaluation.Item(str(i), s.messages, {"answer": s.answer}) for i, s in enumerate(samples)]
engine = HFEngine(model, tokenizer, cfg.rollout)
completions = evaluation.greedy_completions(engine, tokenizer, image_processor, items, 8)
assert asked == [3], asked  # items 0, 2, 4 on rank 0; 1, 3 on rank 1, and 0 again (as many batches)
assert dist.gather(completions)[1] == completions
if rank == 0:  # one engine generating them all gives the same list
    prompts = [encode_prompt(Sample(messages=i.messages, answer=i.row["answer"], where=i.id), tokenizer, image_processor) for i in items]
    greedy = engine.with_sampling(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=8, logprobs=False)
    assert greedy.generate(prompts, 1, seeds=[0] * 5).texts == completions
open(f"ok_{rank}", "w").close()  # see run_on_two_ranks
release_process_groups()  # as train.py ends (without it, about 1 exit in 20 aborted)
"""


def test_evaluation_on_two_ranks_shares_out_the_items_and_gathers_every_completion(tmp_path):
    """eval.greedy_completions under two ranks: each generates every second item (3 and 2 of 5; rank
    1 repeats one to generate as many), and each gets all five completions in the items' order,
    those one engine gives generating them all."""
    run_on_two_ranks(tmp_path, SHARDED_EVAL)


ZERO1_STATES = (
    ENGINE_SCRIPT
    + """
rank, world, _ = dist.init_distributed("cpu")
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
optimizer, schedule, engines = trained(model, 1, "none", True, lambda s: 1.0)
engine = engines["policy"]
with torch.autocast("cpu", dtype=torch.bfloat16):
    loss = model(torch.randn(4, 64)).float().pow(2).mean()
dist.backward(engines, "policy", loss, boundary=True)
size = lambda tensors: sum(x.numel() * x.element_size() for x in tensors)
params = list(model.parameters())
bf16_grads = size(p.grad for p in params if p.grad is not None)  # whole, until the step
fp32_grads = size(engine.optimizer.fp32_groups_gradients_flat)
dist.step_optimizer(engines, "policy", params, optimizer, schedule, 1.0)
master = size(engine.optimizer.fp32_groups_flat_partition)
moments = size(v for state in engine.optimizer.optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim())
n = sum(p.numel() for p in params)
plan = dist.model_state_bytes(model, params, 1, world, "none")
assert size(params) == plan["params"] == 2 * n, (size(params), plan)
measured = bf16_grads + fp32_grads + master + moments
assert (bf16_grads, fp32_grads) == (2 * n, 4 * n), (bf16_grads, fp32_grads, n)  # whole on each rank
assert abs(measured - plan["states"]) <= 64, (bf16_grads, fp32_grads, master, moments, plan)
open(f"ok_{rank}", "w").close()  # see run_on_two_ranks
"""
)


def test_zero1_plan_counts_the_bf16_optimizers_whole_gradients(tmp_path):
    """With bf16 and fp32 gradient sums, ZeRO-1 runs DeepSpeed's BF16_Optimizer, which keeps every
    gradient whole on each rank, bf16 and fp32, and shards only the fp32 master weights and Adam's
    moments: model_state_bytes' 2N + 6n + 12n / GPUs, read off the live optimizer on two ranks
    (the plan counted ZeRO-1 as ZeRO-2 before, whose gradients are sharded)."""
    run_on_two_ranks(tmp_path, ZERO1_STATES)


ZERO3_DECODE = """
import torch
from omegaconf import OmegaConf
import dist
from conftest import TINY_DEFAULTS, compose_cfg
from data import encode_prompt, synthetic_samples
from model import build_image_processor, build_tiny_model, build_tiny_tokenizer
from rollout import HFEngine, release_process_groups

rank, _, _ = dist.init_distributed("cpu")
cfg = compose_cfg(TINY_DEFAULTS + ["rollout.max_new_tokens=6"])
tokenizer = build_tiny_tokenizer(cfg.model.tiny.vocab_size)
image_processor = build_image_processor(cfg.model.min_pixels, cfg.model.max_pixels)
model = build_tiny_model(tokenizer, cfg.model.tiny, seed=0)
dist.deepspeed_engine(model, None, None, OmegaConf.merge(cfg.trainer, {"zero_stage": 3}), bf16=False)
engine = HFEngine(model, tokenizer, cfg.rollout)
if rank == 0:  # every token stops rank 0's rows at once; rank 1's random model runs to the limit
    engine.stop_ids = list(range(len(tokenizer)))
prompts = [encode_prompt(s, tokenizer, image_processor) for s in synthetic_samples("arithmetic", 2, 0, 56, "sys")]
lengths = {len(c) for c in engine.generate(prompts, 2, seeds=[rank, rank]).completion_ids}
assert lengths == ({1} if rank == 0 else {6}), lengths
open(f"ok_{rank}", "w").close()  # see run_on_two_ranks
release_process_groups()
"""


def test_zero3_decode_runs_until_every_ranks_rows_are_done(tmp_path):
    """Under ZeRO-3 every forward gathers the parameters with the other ranks: a rank whose rows have
    all stopped keeps making the decode's forwards until the other rank's rows are done too (before:
    transformers' generate stopped there, and the other rank's gathers waited on it forever)."""
    run_on_two_ranks(tmp_path, ZERO3_DECODE, timeout=180)
