"""Detailed error logging: every rank's log file, the traceback of a failing rank, torchrun's summary naming it, and a
user error printed once (not once per rank)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def torchrun(data: Path, run: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "smollm2.train",
           "--config", "configs/tiny.yaml", f"data.path={data}", f"train.run_dir={run}", "data.seq_len=32",
           "logging.interval=1", "eval.interval=0", "sample.interval=0", *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_a_failing_rank_leaves_its_traceback_and_is_named_by_torchrun(shakespeare_data, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(shakespeare_data, run, "train.max_steps=6", SMOLLM2_TEST_FAULT="3:1")  # rank 1 at step 3
    assert proc.returncode != 0
    failing = (run / "logs" / "rank-00001.log").read_text()
    assert re.search(r"^===== .* rank 1 local rank 1 world size 2 torchrun restart 0 ", failing, re.M)
    assert "Traceback (most recent call last)" in failing and 'smollm2/train.py", line' in failing
    assert "OSError: [Errno 5] Input/output error: simulated unreadable shard at step 3" in failing
    healthy = (run / "logs" / "rank-00000.log").read_text()
    assert "step      2/6 | loss" in healthy and "model 3,316,608 parameters" in healthy  # what rank 0 printed
    # torchrun's summary: the root cause is rank 1, with its error (the @record error file), not `error_file: <N/A>`
    summary = proc.stderr[proc.stderr.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", summary), summary
    assert "simulated unreadable shard at step 3" in summary and "<N/A>" not in summary.split("Other Failures")[0]


def test_a_user_error_prints_one_line_once(shakespeare_data, tmp_path):
    proc = torchrun(shakespeare_data, tmp_path / "run", "train.max_steps=2", "--resume", str(tmp_path / "nope"))
    assert proc.returncode != 0
    assert proc.stderr.count("error: checkpoint not found") == 1, proc.stderr[-3000:]
    for rank in (0, 1):  # each rank's file keeps the whole story
        assert "CheckpointError: checkpoint not found" in (tmp_path / f"run/logs/rank-0000{rank}.log").read_text()
