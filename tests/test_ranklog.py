"""Detailed error logging: every rank's log file, the traceback of a failing rank, torchrun's summary naming it, and a
user error printed once (not once per rank)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import ROOT, train

from smollm2.errors import UserError, run_cli


def torchrun(data: Path, run: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return train(2, run, data, "data.seq_len=32", "logging.interval=1", "eval.interval=0", "sample.interval=0", *args,
                 check=False, env={**os.environ, **env}, timeout=300)


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_a_user_error_prints_one_line_once(shakespeare_data, tmp_path):
    proc = torchrun(shakespeare_data, tmp_path / "run", "train.max_steps=2", "--resume", str(tmp_path / "nope"))
    assert proc.returncode != 0
    assert proc.stderr.count("error: checkpoint not found") == 1, proc.stderr[-3000:]
    for rank in (0, 1):  # each rank's file keeps the whole story
        assert "CheckpointError: checkpoint not found" in (tmp_path / f"run/logs/rank-0000{rank}.log").read_text()


SCRIPT = """
import os, sys, warnings
from pathlib import Path
from smollm2.observe.ranklog import RankLog
log = RankLog.from_env(Path(sys.argv[1]))
print("to stdout")
print("to stderr", file=sys.stderr)
warnings.warn("a python warning")
try:
    raise ValueError("the fatal one")
except ValueError as err:
    log.exception(err)
log.close()
print("after close")
"""


@pytest.mark.e2e
def test_the_log_tees_output_and_warnings_and_appends_per_attempt(tmp_path):
    """Fast, one process: what the console shows stays the same, the file gets it too, plus warnings and the traceback;
    a second attempt appends below its own header (rank, world size, torchrun's restart count from the environment)."""
    for attempt in range(2):
        env = {**os.environ, "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "TORCHELASTIC_RESTART_COUNT": str(attempt)}
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "to stdout\nafter close\n" and "to stderr" in proc.stderr and "a python warning" in proc.stderr
        assert "the fatal one" not in proc.stderr  # the traceback goes to the file only
    text = (tmp_path / "logs" / "rank-00003.log").read_text()
    headers = re.findall(r"^===== .* pid \d+ rank 3 local rank 1 world size 4 torchrun restart (\d) ", text, re.M)
    assert headers == ["0", "1"]
    attempt = text.split("=====")[-1]
    for line in ("to stdout", "to stderr", "UserWarning: a python warning", "Traceback (most recent call last)",
                 "ValueError: the fatal one"):
        assert line in attempt, text
    assert "after close" not in text


@pytest.mark.parametrize(("rank", "rank_specific", "printed"), [
    ("0", False, "error: the same on every rank\n"),
    ("1", False, ""),  # rank 0 says it; rank 1 still exits 2
    ("1", True, "error: rank 1: the same on every rank\n"),  # only this rank may know: it says so, naming itself
])
def test_run_cli_prints_a_user_error_once(monkeypatch, capsys, rank, rank_specific, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("SMOLLM2_TRACEBACK", raising=False)

    def main(argv):
        raise UserError("the same on every rank", rank_specific=rank_specific)

    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [])
    assert exit_.value.code == 2 and capsys.readouterr().err == printed
