"""The offline plot: from a real run with a resume, a readable PNG whose data covers both phases; torn and empty files."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from smollm2.errors import UserError
from smollm2.plot import plot_run, read_jsonl, segments

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plot_of_a_resumed_run_covers_both_phases(shakespeare_data, tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "smollm2.train", "--config", "configs/tiny.yaml", f"data.path={shakespeare_data}",
            f"train.run_dir={run}", "data.seq_len=32", "logging.interval=1", "eval.interval=2", "sample.interval=0",
            "checkpoint.interval=4"]
    for extra in (["train.max_steps=4"], ["train.max_steps=8", "--resume", "latest"]):
        proc = subprocess.run([*base, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    cli = subprocess.run([sys.executable, "-m", "smollm2.plot", str(run)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0, cli.stderr
    png = run / "plots" / "training.png"
    assert cli.stdout.strip() == str(png)
    image = matplotlib.image.imread(png)
    assert image.shape[1] >= 1000 and image.shape[0] >= 700
    assert image[..., :3].std() > 0.05  # not a blank canvas
    _, drawn = plot_run(run, tmp_path / "again.png")
    assert drawn["train_steps"] == list(range(1, 9)) and drawn["val_steps"] == [2, 4, 6, 8]
    assert drawn["marks"] == [(4, "resume from step-000004")]  # the phase boundary
    assert "embed" in drawn["groups"] and "block_01/mlp" in drawn["groups"]  # the gradient-flow panel has data


def test_torn_last_line_and_crash_rerun(tmp_path):
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0, "tok_per_s": 100.0, "tokens_seen": 64 * s}
            for s in (1, 2, 3, 4, 5, 6, 5, 6, 7)]  # killed after 6, rerun from a checkpoint at 4
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "loss": 4.'  # a kill -9 mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 5, 6, 7]
    assert [[r["step"] for r in seg] for seg in segments(read_jsonl(tmp_path / "metrics.jsonl"))] == \
        [[1, 2, 3, 4, 5, 6], [5, 6, 7]]
    out, drawn = plot_run(tmp_path)
    assert out.is_file() and drawn["marks"] == [(4, "rerun")] and drawn["groups"] == []


def test_no_metrics_is_one_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="no metrics yet"):
        plot_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "smollm2.plot", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no metrics yet") and "Traceback" not in proc.stderr
