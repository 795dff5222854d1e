"""The offline training plot: one PNG from a run directory's JSONL files, no WandB needed.

    python -m smollm2.plot runs/demo            # -> runs/demo/plots/training.png

Panels: loss (train and val) vs step and vs tokens, learning rate, gradient norm, gradient flow (the per-group norms:
a line per group, or a group x step heatmap when there are many), throughput and MFU. Vertical lines mark where the run
was interrupted: each `restart` in events.jsonl (a resume), a place where the step goes back in metrics.jsonl without
one (a rerun from scratch), and a long silence in the `time` field (a stall). After a crash rerun the re-run steps
appear twice: every attempt is drawn as it ran, in its own colour.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any, NamedTuple

from smollm2.errors import UserError
from smollm2.files import read_jsonl

Row = dict[str, Any]
MAX_GROUP_LINES = 12  # more gradient-flow groups than this (the 135M model has 38) are drawn as a heatmap
MAX_MARK_LABELS = 6  # interruptions named in the legend; the lines of the others are drawn unnamed
MIN_GAP_S = 60.0  # a silence in the logs this long (and 10x the usual interval between rows) is marked as a stall


class Mark(NamedTuple):
    """A vertical line on every step axis: `kind` is "resume" (a restart or a rerun) or "gap" (a stall)."""

    step: int
    label: str
    kind: str


def segments(rows: list[Row]) -> list[list[Row]]:
    """The rows split into attempts: a new one starts where the step does not increase (a rerun from a checkpoint) or a
    row says `restart`."""
    out: list[list[Row]] = []
    for row in rows:
        if not out or row["step"] <= out[-1][-1]["step"] or row.get("restart"):
            out.append([])
        out[-1].append(row)
    return out


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _timed(row: Row) -> bool:
    return isinstance(row.get("time"), (int, float))


def boundaries(run_dir: Path, rows: list[Row]) -> list[Mark]:
    """Every interruption of the run, by step.

    A `restart` event (events.jsonl) is a resume from the checkpoint it names, labelled with the time no row was logged
    around it when that was long. A new attempt in metrics.jsonl (the step goes back) that no restart event explains is a
    rerun without a checkpoint. Between two rows of one attempt, a silence of more than MIN_GAP_S and 10x the usual
    interval is a stall. Without `time` fields (older runs) the restart events are used, or else the step going back."""
    events = [e for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == "restart"]
    timed = all(map(_timed, rows)) and all(map(_timed, events))
    if not timed:
        if events:
            return sorted({Mark(int(e["step"]), f"resume from {e.get('from_checkpoint', '?')}", "resume") for e in events})
        return [Mark(seg[0]["step"] - 1, "rerun", "resume") for seg in segments(rows)[1:]]
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:]) if b["time"] >= a["time"]]
    threshold = max(MIN_GAP_S, 10 * statistics.median(gaps)) if gaps else math.inf
    marks = []
    for e in events:
        before = [r["time"] for r in rows if r["time"] <= e["time"]]
        after = [r["time"] for r in rows if r["time"] >= e["time"]]
        down = (min(after) - max(before)) if before and after else 0.0
        marks.append(Mark(int(e["step"]), f"resume from {e.get('from_checkpoint') or '?'}"
                          + (f" ({_duration(down)} without logs)" if down > threshold else ""), "resume"))
    for prev, row in zip(rows, rows[1:]):
        explained = any(prev["time"] <= e["time"] <= row["time"] for e in events)
        if row["step"] <= prev["step"] or row.get("restart"):
            if not explained:
                marks.append(Mark(row["step"] - 1, "rerun", "resume"))
        elif row["time"] - prev["time"] > threshold and not explained:
            marks.append(Mark(prev["step"], f"stall: {_duration(row['time'] - prev['time'])} without logs", "gap"))
    return sorted(set(marks))


def _series(rows: list[Row], x: str, y: str) -> tuple[list, list]:
    points = [(r[x], r[y]) for r in rows if isinstance(r.get(y), (int, float)) and math.isfinite(r[y]) and x in r]
    return [p[0] for p in points], [p[1] for p in points]


def _gradient_flow(ax, fig, rows: list[Row], groups: list[str]) -> None:
    """A line per group (log scale, one colour per group, each attempt drawn separately), or, for many groups, a heatmap
    of log10(norm) with a row per group (a re-run step shows the value of its last attempt)."""
    import matplotlib.pyplot as plt

    if len(groups) <= MAX_GROUP_LINES:
        cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
        for i, seg in enumerate(segments(rows)):
            for j, group in enumerate(groups):
                ax.plot(*_series(seg, "step", f"grad_norm/{group}"), color=cmap(j), lw=1.0, label=group if i == 0 else None)
        ax.set_yscale("log")
        ax.legend(fontsize=8, ncol=2, loc="upper right")
        return
    last = {r["step"]: r for r in rows}  # later attempts overwrite earlier ones
    steps = sorted(last)
    grid = [[math.log10(v) if isinstance(v := last[s].get(f"grad_norm/{g}"), (int, float)) and v > 0 else math.nan
             for s in steps] for g in groups]
    edges = [steps[0] - 0.5] + [(a + b) / 2 for a, b in zip(steps, steps[1:])] + [steps[-1] + 0.5]
    mesh = ax.pcolormesh(edges, range(len(groups) + 1), grid, cmap="magma", shading="flat")
    ax.set_yticks([k + 0.5 for k in range(len(groups))], groups, fontsize=max(5, 9 - len(groups) // 12))
    ax.invert_yaxis()  # embed on top, then the blocks in order, final_norm last: the order the gradient flows back
    fig.colorbar(mesh, ax=ax, pad=0.01).set_label("log10 L2 norm")


def _group_order(name: str) -> tuple[int, str]:
    return (0 if name == "embed" else 2 if name in ("final_norm", "other") else 1), name


def plot_run(run_dir: str | Path, out: str | Path | None = None, dpi: int = 90) -> tuple[Path, dict[str, Any]]:
    """Write the plot. Returns its path and what it drew: the train and val steps in the order they ran, the marks and
    the gradient-flow groups. The figure is 16 x 13 inches: 1440 x 1170 pixels at the default dpi. Raises UserError when
    the run has no metrics yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    if not train:
        raise UserError(f"no metrics yet in {run_dir} (metrics.jsonl is missing or empty): train first, or check the path")
    out = Path(out) if out else run_dir / "plots" / "training.png"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out.parent} for the plot: {err}; pass --out PATH") from None
    marks = boundaries(run_dir, train)
    tokens_at = {r["step"]: r["tokens_seen"] for r in train if "tokens_seen" in r}
    groups = sorted({k.split("/", 1)[1] for r in train for k in r if k.startswith("grad_norm/")}, key=_group_order)

    fig, axes = plt.subplots(3, 2, figsize=(16, 13), dpi=dpi)
    _plot_train(axes, train)
    _plot_val(axes, evals, tokens_at)
    _plot_flow(fig, axes[2][0], train, groups)
    _label_panels(axes, groups, marks, tokens_at)
    _title(fig, run_dir, train, evals, marks)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    drawn = {"train_steps": [r["step"] for r in train], "val_steps": [r["step"] for r in evals], "marks": marks,
             "groups": groups}
    return out, drawn


def _plot_train(axes, train: list[Row]) -> None:
    """Train loss (vs step and vs tokens), learning rate, gradient norm and throughput (MFU on a twin axis when logged):
    each attempt drawn separately, the loss of a re-run in its own colour."""
    import matplotlib.pyplot as plt

    (loss_step, loss_tok), (lr_ax, norm_ax), (_, speed_ax) = axes
    colours = plt.get_cmap("tab10")
    has_mfu = bool(_series(train, "step", "mfu")[0])
    mfu_ax = speed_ax.twinx() if has_mfu else None
    for i, seg in enumerate(segments(train)):
        label, colour = ("train" if i == 0 else f"train (attempt {i + 1})"), colours(0 if i == 0 else (i + 1) % 10)
        loss_step.plot(*_series(seg, "step", "loss"), label=label, color=colour, lw=1.3)
        loss_tok.plot(*_series(seg, "tokens_seen", "loss"), label=label, color=colour, lw=1.3)
        lr_ax.plot(*_series(seg, "step", "lr"), color="tab:green", lw=1.3)
        norm_ax.plot(*_series(seg, "step", "grad_norm"), color="tab:red", lw=1.1, label="total" if i == 0 else None)
        speed_ax.plot(*_series(seg, "step", "tok_per_s"), color="tab:blue", lw=1.1, label="tokens/s" if i == 0 else None)
        if mfu_ax is not None:
            xs, ys = _series(seg, "step", "mfu")
            mfu_ax.plot(xs, [100 * v for v in ys], color="tab:orange", lw=1.1, label="MFU" if i == 0 else None)
    if mfu_ax is not None:
        mfu_ax.set_ylabel("MFU (%)", color="tab:orange")
        mfu_ax.legend(fontsize=9, loc="lower right")
    else:
        speed_ax.text(0.99, 0.02, "MFU: n/a (no peak TFLOP/s for this device; set logging.peak_tflops)", ha="right",
                      va="bottom", fontsize=8, color="gray", transform=speed_ax.transAxes)


def _plot_val(axes, evals: list[Row], tokens_at: dict[int, int]) -> None:
    """The val loss on both loss panels (at the tokens seen by its step on the second)."""
    loss_step, loss_tok = axes[0]
    for i, seg in enumerate(segments(evals)):
        xs, ys = _series(seg, "step", "val_loss")
        label = "val" if i == 0 else None
        loss_step.plot(xs, ys, "o-", color="black", ms=4, lw=1.2, label=label)
        loss_tok.plot([tokens_at.get(x, math.nan) for x in xs], ys, "o-", color="black", ms=4, lw=1.2, label=label)


def _plot_flow(fig, ax, train: list[Row], groups: list[str]) -> None:
    if groups:
        _gradient_flow(ax, fig, train, groups)
    else:
        ax.text(0.5, 0.5, "no per-group gradient norms in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)


def _label_panels(axes, groups: list[str], marks: list[Mark], tokens_at: dict[int, int]) -> None:
    """Titles, axis labels, grids and legends, and the interruption marks on every panel (at the mark's tokens seen on
    the loss-vs-tokens panel; named in the legend of the loss-vs-step panel, the first few by step)."""
    from matplotlib.ticker import EngFormatter

    (loss_step, loss_tok), (lr_ax, norm_ax), (flow_ax, speed_ax) = axes
    titles = [(loss_step, "Loss vs step", "step", "loss"), (loss_tok, "Loss vs tokens", "tokens seen", "loss"),
              (lr_ax, "Learning rate", "step", "learning rate"),
              (norm_ax, "Gradient norm (before clipping)", "step", "L2 norm"),
              (flow_ax, "Gradient flow (per-group gradient norms)", "step", "L2 norm" if len(groups) <= MAX_GROUP_LINES
               else ""), (speed_ax, "Throughput", "step", "tokens / s")]
    style = {"resume": {"color": "dimgray", "ls": "--"}, "gap": {"color": "tab:purple", "ls": ":"}}
    for ax, title, xlabel, ylabel in titles:
        ax.set_title(title, fontsize=12)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        for n, mark in enumerate(marks):
            x = tokens_at.get(mark.step) if ax is loss_tok else mark.step
            if x is not None:
                label = f"step {mark.step}: {mark.label}" if ax is loss_step and n < MAX_MARK_LABELS else None
                ax.axvline(x, lw=1.2, label=label, **style[mark.kind])
    loss_tok.xaxis.set_major_formatter(EngFormatter())
    for ax in (loss_step, loss_tok, norm_ax, speed_ax):
        ax.legend(fontsize=9, loc="upper right")
    if len(marks) > MAX_MARK_LABELS:
        loss_step.set_title(f"Loss vs step ({len(marks)} interruptions: the first {MAX_MARK_LABELS} are named)", fontsize=12)


def _title(fig, run_dir: Path, train: list[Row], evals: list[Row], marks: list[Mark]) -> None:
    """The run's name, its last step and losses, and how many times it was resumed."""
    last = train[-1]
    resumes = sum(m.kind == "resume" for m in marks)
    fig.suptitle(f"{run_dir.resolve().name}: step {last['step']}, train loss {last.get('loss', math.nan):.4f}"
                 + (f", val loss {evals[-1].get('val_loss', math.nan):.4f}" if evals else "")
                 + (f" | {resumes} resume(s)" if resumes else "") + (" (dashed)" if resumes else ""), fontsize=14)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm2.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="the PNG to write (default RUN_DIR/plots/training.png)")
    parser.add_argument("--dpi", type=int, default=90, help="resolution: 90 (default) is 1440 px wide, 60 is 960")
    args = parser.parse_args(argv)
    if not 20 <= args.dpi <= 600:
        raise UserError(f"--dpi {args.dpi} is outside 20-600; the default 90 gives a 1440 px wide image")
    print(plot_run(args.run_dir, args.out, args.dpi)[0])
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
