"""cluster=slurm: the composed launcher config and the sbatch script submitit renders from it.

Nothing is submitted here (tests/test_slurm.py submits to a real cluster, which has no GPUs): the
tests build submitit's own executor the way Hydra's submitit launcher does, render the submission
file for GPU nodes and CPU-only ones, and check its #SBATCH lines.
"""

import os

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict

from conftest import ROOT

OVERRIDES = [
    "cluster=slurm",
    "cluster.partition=gpu",
    "cluster.nodes=2",
    "cluster.mem_gb=480",
    "stage=mgt_geo",
    "trainer.lr=5e-7",
]


def slurm_cfg(overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def rendered_sbatch(cfg, folder, monkeypatch) -> str:
    """The sbatch file submitit writes for this config (the launcher's own parameter mapping)."""
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # pretend srun exists
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(folder), slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -u -m submitit.core._submit %j", "uid"), executor


def test_slurm_launcher_renders_the_requested_resources(tmp_path, monkeypatch):
    cfg = slurm_cfg(OVERRIDES)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    text, executor = rendered_sbatch(cfg, tmp_path, monkeypatch)
    sbatch = {
        line.split("=")[0]: line.split("=", 1)[1] for line in text.splitlines() if line.startswith("#SBATCH") and "=" in line
    }
    assert sbatch["#SBATCH --partition"] == "gpu"
    assert sbatch["#SBATCH --nodes"] == "2"
    assert sbatch["#SBATCH --gpus-per-node"] == "8"
    assert sbatch["#SBATCH --ntasks-per-node"] == "8"  # one training rank per GPU
    assert sbatch["#SBATCH --cpus-per-task"] == "10"
    assert sbatch["#SBATCH --mem"] == "480GB"
    assert sbatch["#SBATCH --time"] == "2880"
    assert sbatch["#SBATCH --signal"] == "USR2@600"  # time to finish a step and checkpoint before the limit
    assert executor._executor.max_num_timeout == 20  # requeues on timeout; each resumes from the run dir
    assert f"export PYTHONPATH={ROOT}:" in text  # the job unpickles train.py's task wherever it was submitted from


@pytest.mark.parametrize(
    "overrides, gpus, tasks",
    [
        (["cluster.gpus_per_node=0"], "0", "1"),  # a CPU partition: one task, not zero
        (["cluster.gpus_per_node=0", "cluster.tasks_per_node=2"], "0", "2"),  # two CPU ranks
        (["cluster.gpus_per_node=4", "cluster.tasks_per_node=1"], "4", "1"),  # one process driving 4 GPUs
    ],
)
def test_tasks_per_node_is_its_own_key(tmp_path, monkeypatch, overrides, gpus, tasks):
    lines = rendered_sbatch(slurm_cfg(["cluster=slurm", *overrides]), tmp_path, monkeypatch)[0].splitlines()
    assert f"#SBATCH --gpus-per-node={gpus}" in lines and f"#SBATCH --ntasks-per-node={tasks}" in lines


def test_sweep_jobs_get_dirs_named_by_their_overrides():
    cfg = slurm_cfg(OVERRIDES)
    with open_dict(cfg):
        OmegaConf.set_readonly(cfg.hydra, False)
        cfg.hydra.job.num = 1  # set by the launcher for each job of a sweep
    assert cfg.hydra.sweep.subdir == "1_stage=mgt_geo,trainer.lr=5e-7"
    assert slurm_cfg([*OVERRIDES, "cluster.tasks_per_node=2"]).hydra.job.override_dirname == "stage=mgt_geo,trainer.lr=5e-7"
    assert "partition" not in cfg.hydra.job.override_dirname  # cluster keys do not name the run
    local = slurm_cfg(["stage=mgt_geo"])
    assert local.hydra.launcher._target_.endswith("BasicLauncher") and local.cluster.name == "local"


def test_cluster_keys_are_typed():
    with pytest.raises(Exception, match="nodes"):
        slurm_cfg(["cluster=slurm", "cluster.nodes=two"])
