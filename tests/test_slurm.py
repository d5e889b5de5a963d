"""train.py on a real one-node SLURM cluster (scripts/local_slurm.sh), swept the way users sweep:
`python train.py -m cluster=slurm ...` through Hydra's submitit launcher. Jobs are submitted,
preempted with the signal SLURM sends before a time limit, requeued and resumed; a job runs two
data-parallel tasks; a job fails. Where the cluster cannot run (no slurm-wlm, or not root) they skip,
saying why and how to install it; under `.ci/run` (LMM_R1_REQUIRE) they fail instead.
"""

import glob
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import dist
from conftest import ROOT, TINY_DEFAULTS, need, run_train
from test_distributed import JOB, assert_trained_alike, launch
from test_resume import RUN, assert_same_weights, final_weights, metrics_of, same_metrics, train_process

SCRIPT = os.path.join(ROOT, "scripts", "local_slurm.sh")
# CPU-only jobs, a CPU per task. SLURM enforces time limits only every ~30 s, so the limit is far
# off and preemption is driven with scancel instead.
ON_SLURM = ["-m", "cluster=slurm", "cluster.gpus_per_node=0", "cluster.cpus_per_task=1", "cluster.timeout_min=30",
            "cluster.signal_delay_s=60"]  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment of a cluster started for these tests (SLURM_CONF), stopped after them."""
    need("slurm")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURMCTLD_PORT": str(dist.free_port())}  # beside any other cluster on this machine
    try:
        started = subprocess.run([SCRIPT, "start", state], env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr
        yield {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run([SCRIPT, "stop", state], env=env, timeout=180, check=True)


def sweep(cwd, args, slurm):
    """`python train.py -m cluster=slurm ... args` from `cwd`: it returns when all its jobs have ended."""
    return run_train([*ON_SLURM, *args], str(cwd), slurm, timeout=600)


def job_dirs(cwd) -> list:
    """Run dirs of the sweeps started in `cwd`, in job order."""
    return sorted(glob.glob(os.path.join(cwd, "multirun", "*", "[0-9]*")))


def job_ids(cwd) -> list:
    """SLURM ids of the jobs of the sweep started in `cwd`, in job order (N_0, N_1, ...; N alone for one job)."""
    pickles = glob.glob(os.path.join(cwd, "multirun", "*", ".submitit", "*", "*_submitted.pkl"))
    return sorted((os.path.basename(os.path.dirname(p)) for p in pickles), key=lambda job: int(job.split("_")[-1]))


def job_log(cwd, job: str, task: int = 0, stream: str = "out") -> str:
    """What task `task` of a job wrote (submitit's log, beside the run dirs in .submitit/<job>/)."""
    (path,) = glob.glob(os.path.join(cwd, "multirun", "*", ".submitit", job, f"{job}_{task}_log.{stream}"))
    with open(path) as f:
        return f.read()


def states(job: str, slurm) -> list:
    """SLURM's accounting of a job once it has ended: the state of each time it ran, oldest first.
    (It records the end a few seconds after submitit has seen the job's result.)"""
    deadline = time.time() + 60
    while True:
        out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job], env={**os.environ, **slurm},
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        if out and out[-1] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED") or time.time() > deadline:
            return out
        time.sleep(0.5)


def test_a_sweep_runs_as_slurm_jobs_in_dirs_named_by_their_overrides(tmp_path, slurm):
    out = sweep(tmp_path, [*TINY_DEFAULTS, "trainer.max_steps=1", "trainer.lr=1e-3,5e-4"], slurm)
    assert out.returncode == 0, out.stderr[-3000:]
    names = [os.path.basename(d) for d in job_dirs(tmp_path)]
    common = "debug=tiny_random,log.progress=False,log.wandb=disabled"  # (as Hydra writes the values)
    assert names == [f"0_{common},trainer.lr=0.001,trainer.max_steps=1", f"1_{common},trainer.lr=0.0005,trainer.max_steps=1"]
    for job, run_dir in zip(job_ids(tmp_path), job_dirs(tmp_path), strict=True):
        assert [m["step"] for m in metrics_of(run_dir)] == [1]
        assert "[data]" in job_log(tmp_path, job)  # the training ran in the SLURM job
        assert states(job, slurm) == ["COMPLETED"]


def test_a_preempted_job_is_requeued_and_resumes_in_its_dir_as_if_never_stopped(tmp_path, slurm):
    three = ["trainer.max_steps=3", "trainer.save_every=0"]  # the only checkpoint is the one the signal makes
    straight = train_process(str(tmp_path / "straight"), three)  # the uninterrupted run, alongside
    cwd = tmp_path / "swept"
    os.makedirs(cwd)
    with ThreadPoolExecutor(1) as pool:
        swept = pool.submit(sweep, cwd, [*RUN, *three, "hydra.sweep.subdir=preempted"], slurm)
        deadline = time.time() + 300
        while not glob.glob(os.path.join(cwd, "multirun", "*", "preempted", "metrics.jsonl")):  # a step is done
            assert not swept.done() and time.time() < deadline, swept.result().stderr[-3000:] if swept.done() else "timed out"
            time.sleep(0.1)
        (job,) = job_ids(cwd)
        # the signal SLURM sends cluster.signal_delay_s before the time limit
        subprocess.run(["scancel", "--signal=USR2", job], env={**os.environ, **slurm}, check=True)
        out = swept.result()
    assert out.returncode == 0, out.stderr[-3000:]
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-3000:]

    (run_dir,) = glob.glob(os.path.join(cwd, "multirun", "*", "preempted"))  # the requeued job found the same ${now} dir
    log = job_log(cwd, job)
    assert "[signal] SIGUSR2: saving at the end of this step" in log
    resumed_at = int(re.search(r"\[resume\] .*: continuing at step (\d+) of 3", log).group(1))
    assert resumed_at in (2, 3)  # stopped mid-run, after a step or two
    assert states(job, slurm) == ["REQUEUED", "COMPLETED"]
    assert_same_weights(final_weights(run_dir), final_weights(str(tmp_path / "straight")))
    a, b = metrics_of(str(tmp_path / "straight")), metrics_of(run_dir)
    assert [m["step"] for m in b] == [1, 2, 3] and all(same_metrics(x, y) for x, y in zip(a, b))


def test_a_job_of_two_tasks_trains_data_parallel_like_one_process(tmp_path, slurm):
    with ThreadPoolExecutor(1) as pool:
        one_step = ["trainer.max_steps=1"]  # of two updates
        swept = pool.submit(sweep, tmp_path, [*JOB, *one_step, "cluster.tasks_per_node=2", "hydra.sweep.subdir=ranks"], slurm)
        launch(str(tmp_path / "single"), one_step, 1)  # the one-process run, alongside
        out = swept.result()
    assert out.returncode == 0, out.stderr[-3000:]
    (job,) = job_ids(tmp_path)
    assert "global_rank=1(2)" in job_log(tmp_path, job, task=1)  # SLURM started two tasks; submitit read its env
    (run_dir,) = glob.glob(os.path.join(tmp_path, "multirun", "*", "ranks"))
    assert_trained_alike(tmp_path / "single", run_dir)


def test_a_failing_job_reports_its_error_in_its_log_and_the_others_complete(tmp_path, slurm):
    rewards = "+reward.weights={toy_rewards\\:digit_fraction: 1.0},{toy_rewards\\:no_such_reward: 1.0}"  # job 1: a bad key
    args = [*TINY_DEFAULTS, "~reward.weights.format", "~reward.weights.math", rewards, "trainer.max_steps=1",
            "hydra.sweep.subdir=${hydra.job.num}"]  # fmt: skip
    out = sweep(tmp_path, args, slurm)
    assert out.returncode != 0 and "FAILED" in out.stderr  # the sweep says so
    good, bad = job_ids(tmp_path)
    assert "error: reward.weights: cannot import 'toy_rewards:no_such_reward'" in job_log(tmp_path, bad, stream="err")
    assert states(bad, slurm) == ["FAILED"] and states(good, slurm) == ["COMPLETED"]
    assert [m["step"] for m in metrics_of(job_dirs(tmp_path)[0])] == [1]
