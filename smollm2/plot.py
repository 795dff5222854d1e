"""The offline training plot: one PNG from a run directory's JSONL files, no WandB needed.

    python -m smollm2.plot runs/demo            # -> runs/demo/plots/training.png

Panels: loss (train and val) vs step and vs tokens, learning rate, gradient norm, gradient flow (the per-group norms),
throughput and MFU. Resumes are drawn as vertical lines: each `restart` in events.jsonl, and any place where the step
goes back or stalls in metrics.jsonl (a crash rerun re-runs steps; both attempts are drawn, in the order they ran).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from smollm2.errors import UserError


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; a torn last line (a killed run) is skipped, a missing file is no rows."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def segments(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The rows split into attempts: a new one starts where the step does not increase (a rerun from a checkpoint)."""
    out: list[list[dict[str, Any]]] = []
    for row in rows:
        if not out or row["step"] <= out[-1][-1]["step"]:
            out.append([])
        out[-1].append(row)
    return out


def boundaries(run_dir: Path, rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(step, label) of every resume: the restart events of events.jsonl; for runs without one (older runs), the places
    where the step goes back in metrics.jsonl."""
    marks = [(int(e["step"]), f"resume from {e.get('from_checkpoint', '?')}")
             for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == "restart"]
    if not marks:
        marks = [(seg[0]["step"] - 1, "rerun") for seg in segments(rows)[1:]]
    return sorted(set(marks))


def _series(rows, x: str, y: str):
    points = [(r[x], r[y]) for r in rows if isinstance(r.get(y), (int, float)) and math.isfinite(r[y]) and x in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, dict[str, list]]:
    """Write the plot. Returns its path and what it drew: the train and val steps and the resume marks. Raises
    UserError when the run has no metrics yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    if not train:
        raise UserError(f"no metrics yet in {run_dir} (metrics.jsonl is missing or empty): train first, or check the path")
    out = Path(out) if out else run_dir / "plots" / "training.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    marks = boundaries(run_dir, train)
    tokens_at = {r["step"]: r["tokens_seen"] for r in train if "tokens_seen" in r}

    fig, axes = plt.subplots(3, 2, figsize=(16, 13), dpi=90)
    (loss_step, loss_tok), (lr_ax, norm_ax), (flow_ax, speed_ax) = axes
    for i, seg in enumerate(segments(train)):
        label = "train" if i == 0 else f"train (attempt {i + 1})"
        loss_step.plot(*_series(seg, "step", "loss"), label=label, lw=1.2)
        loss_tok.plot(*_series(seg, "tokens_seen", "loss"), label=label, lw=1.2)
        lr_ax.plot(*_series(seg, "step", "lr"), color="tab:green", lw=1.2)
        norm_ax.plot(*_series(seg, "step", "grad_norm"), color="tab:red", lw=1.0, label="total" if i == 0 else None)
        speed_ax.plot(*_series(seg, "step", "tok_per_s"), color="tab:blue", lw=1.0, label="tok/s" if i == 0 else None)
    if evals:
        xs, ys = _series(evals, "step", "val_loss")
        loss_step.plot(xs, ys, "o-", color="black", ms=4, lw=1.2, label="val")
        loss_tok.plot([tokens_at.get(x, float("nan")) for x in xs], ys, "o-", color="black", ms=4, lw=1.2, label="val")

    groups = sorted({k.split("/", 1)[1] for r in train for k in r if k.startswith("grad_norm/")})
    if groups:
        cmap = plt.get_cmap("viridis", max(len(groups), 2))
        for j, group in enumerate(groups):
            flow_ax.plot(*_series(train, "step", f"grad_norm/{group}"), color=cmap(j), lw=0.9,
                         label=group if len(groups) <= 14 or j % max(1, len(groups) // 12) == 0 else None)
        flow_ax.set_yscale("log")
        flow_ax.legend(fontsize=7, ncol=2, loc="upper right")
    else:
        flow_ax.text(0.5, 0.5, "no per-group gradient norms in metrics.jsonl", ha="center", va="center",
                     transform=flow_ax.transAxes)
    mfu_x, mfu_y = _series(train, "step", "mfu")
    if mfu_x:
        twin = speed_ax.twinx()
        twin.plot(mfu_x, [100 * v for v in mfu_y], color="tab:orange", lw=1.0, label="MFU")
        twin.set_ylabel("MFU (%)", color="tab:orange")

    titles = [(loss_step, "Loss vs step", "step", "loss"), (loss_tok, "Loss vs tokens", "tokens seen", "loss"),
              (lr_ax, "Learning rate", "step", "lr"), (norm_ax, "Gradient norm (before clipping)", "step", "L2 norm"),
              (flow_ax, "Gradient flow (per-group norms)", "step", "L2 norm (log)"),
              (speed_ax, "Throughput", "step", "tokens / s")]
    for ax, title, xlabel, ylabel in titles:
        ax.set_title(title, fontsize=12)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        for step, _label in marks:
            x = tokens_at.get(step, None) if ax is loss_tok else step
            if x is not None:
                ax.axvline(x, color="gray", ls="--", lw=1)
    for step, label in marks:
        loss_step.annotate(label, (step, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                           fontsize=8, color="gray")
    for ax in (loss_step, loss_tok, norm_ax):
        ax.legend(fontsize=9)
    last = train[-1]
    fig.suptitle(f"{run_dir.name}: step {last['step']}, loss {last['loss']:.4f}"
                 + (f", val loss {evals[-1]['val_loss']:.4f}" if evals else "")
                 + (f", {len(marks)} resume(s)" if marks else ""), fontsize=14)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    drawn = {"train_steps": [r["step"] for r in train], "val_steps": [r["step"] for r in evals], "marks": marks,
             "groups": groups}
    return out, drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm2.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="the PNG to write (default RUN_DIR/plots/training.png)")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out)[0])
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
