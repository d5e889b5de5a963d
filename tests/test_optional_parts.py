"""The rule for optional parts (gfootball, the local SLURM cluster, vLLM's CPU build), on real test
files in a pytest of their own: where a part is missing its tests skip, saying why and how to install
it; with LMM_R1_REQUIRE naming the part (as `.ci/run` sets it) the same tests fail. Each part is
made missing for the inner run only: a module that fails to import shadows gfootball and vllm, and
a PATH without the sbin directories hides the SLURM daemons."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

ONE_TEST_EACH = {  # part -> a test that needs it
    "football": "tests/test_football.py::test_the_same_seed_plays_the_same_episode",
    "slurm": "tests/test_slurm.py::test_a_sweep_runs_as_slurm_jobs_in_dirs_named_by_their_overrides",
    "vllm": "tests/test_rollout.py::test_sleep_mode_is_used_only_where_the_platform_has_it",
}


def pytest_with_parts_missing(tmp_path, require: str) -> subprocess.CompletedProcess:
    for package in ("gfootball", "vllm"):
        (tmp_path / "shadow" / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / "shadow" / package / "__init__.py").write_text('raise ImportError("hidden by test_optional_parts")\n')
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not p.rstrip("/").endswith("sbin")]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow"), "PATH": os.pathsep.join(path), "LMM_R1_REQUIRE": require}
    command = [sys.executable, "-m", "pytest", "-q", "-rsfE", "-n", "0", "-p", "no:cacheprovider", *ONE_TEST_EACH.values()]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_missing_part_skips_saying_how_to_install_it_and_fails_where_required(tmp_path):
    quick = pytest_with_parts_missing(tmp_path, "")
    assert quick.returncode == 0 and "3 skipped" in quick.stdout, quick.stdout[-3000:]
    for part, hint in (
        ("football", "requirements-football.txt"),
        ("slurm", "apt-get install slurm-wlm"),
        ("vllm", "vllm_cpu_setup.sh"),
    ):
        assert f"{part} is not installed here" in quick.stdout and hint in quick.stdout, (part, quick.stdout[-3000:])
    ci = pytest_with_parts_missing(tmp_path, "football,slurm,vllm")
    assert ci.returncode == 1 and "skipped" not in ci.stdout, ci.stdout[-3000:]
    for part, test in ONE_TEST_EACH.items():  # vllm's fails in its test, the others in their fixtures
        assert f"{part} is required (LMM_R1_REQUIRE=football,slurm,vllm) but missing" in ci.stdout, (part, ci.stdout[-3000:])
        assert re.search(rf"^(FAILED|ERROR) {re.escape(test)}\b", ci.stdout, re.M), (test, ci.stdout[-3000:])


def test_an_unknown_required_part_stops_the_run_before_any_test():
    env = {**os.environ, "LMM_R1_REQUIRE": "footbal"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "tests/test_layout.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 4 and "LMM_R1_REQUIRE names unknown parts ['footbal']" in out.stderr + out.stdout, out.stderr[-2000:]
