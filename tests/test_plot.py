"""The offline plot: from a real run with a resume, a readable PNG whose data covers both phases; torn and empty files."""

import json
import shutil

import matplotlib.image
import pytest
from tiny import cli

from smollm2.errors import UserError
from smollm2.files import read_jsonl
from smollm2.observe.plot import Mark, plot_run, segments


@pytest.mark.e2e
def test_plot_of_a_resumed_run_covers_both_phases(resumed_run, tmp_path):
    """The session's resumed run (10 steps, then a resume to 20; evals at 10 and 20); the plot needs only its JSONL."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("metrics.jsonl", "eval.jsonl", "events.jsonl"):
        shutil.copyfile(resumed_run / name, run / name)
    plotted = cli("smollm2.plot", run)
    assert plotted.returncode == 0, plotted.stderr
    png = run / "plots" / "training.png"
    assert plotted.stdout.strip() == str(png)
    image = matplotlib.image.imread(png)
    assert image.shape[1] >= 1000 and image.shape[0] >= 700
    assert image[..., :3].std() > 0.05  # not a blank canvas
    _, drawn = plot_run(run, tmp_path / "again.png")
    assert drawn["train_steps"] == list(range(1, 21)) and drawn["val_steps"] == [10, 20]
    assert [(m.step, m.kind) for m in drawn["marks"]] == [(10, "resume")]  # the phase boundary, from events.jsonl
    assert drawn["marks"][0].label.startswith("resume from step-000010")
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
    assert out.is_file() and drawn["marks"] == [Mark(4, "rerun", "resume")] and drawn["groups"] == []


def test_marks_from_events_step_regressions_and_time_gaps(tmp_path):
    """A crash rerun with its restart event is one mark (with the downtime), a rerun from scratch without one is another,
    a long silence between two steps is a stall; many gradient groups become a heatmap."""
    groups = ["embed", *(f"block_{i:02d}/{k}" for i in range(12) for k in ("attn", "mlp", "norm")), "final_norm"]
    steps = [*range(1, 11), *range(7, 21), *range(1, 6)]  # crash at 10, resume from 6; later a rerun from scratch
    times = [10.0 * i for i in range(len(steps))]
    times[10:] = [t + 600 for t in times[10:]]  # 10 min down before the resume
    times[18:] = [t + 3600 for t in times[18:]]  # a 1 h stall between steps 14 and 15
    rows = [{"step": s, "loss": 3.0, "tokens_seen": 64 * s, "time": t, **{f"grad_norm/{g}": 0.1 for g in groups}}
            for s, t in zip(steps, times)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    restart = {"event": "restart", "step": 6, "from_checkpoint": "step-000006", "time": times[10] - 5}
    (tmp_path / "events.jsonl").write_text(json.dumps(restart) + "\n")
    out, drawn = plot_run(tmp_path)
    assert drawn["marks"] == [Mark(0, "rerun", "resume"), Mark(6, "resume from step-000006 (10 min without logs)", "resume"),
                              Mark(14, "stall: 60 min without logs", "gap")]
    assert drawn["groups"][0] == "embed" and drawn["groups"][-1] == "final_norm" and len(drawn["groups"]) == 38
    assert matplotlib.image.imread(out).shape[1] >= 1000


def test_no_metrics_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from smollm2.errors import run_cli
    from smollm2.observe.plot import main

    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="no metrics yet"):
        plot_run(tmp_path)
    monkeypatch.delenv("SMOLLM2_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: no metrics yet") and "Traceback" not in err
