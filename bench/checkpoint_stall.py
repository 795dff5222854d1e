"""How long training stalls per checkpoint: a synchronous DCP save against `checkpoint.async_save` (the state copied to
host memory, the files written in the background), at the seed shape (124M parameters + AdamW's moments: ~1.5 GB), on one
rank, in one process, the two modes interleaved. From the repository root:

    python -m bench.checkpoint_stall                 # CPU: a short step between saves (B=1, T=64)
    python -m bench.checkpoint_stall --saves 5 --dir /scratch/ckpt-bench

Per save: `stall` = how long `Checkpointer.save` blocked the training loop; `overlap` = how much longer the steps after
it run while a background write competes with them (baseline: the same steps after a synchronous save, when nothing runs
in the background); `committed` = when the checkpoint was complete on disk, counted from the save's start. Medians over
the saves; the ratio async/sync of the training time lost (stall + overlap).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from smollm2.checkpoint import Checkpointer, ModelAndOptimizer
from smollm2.config import load_config
from smollm2.distributed import init_distributed, shutdown
from smollm2.optim import build_optimizer
from smollm2.parallelize import build_model
from smollm2.step import train_step
from smollm2.train import TrainState

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_stall", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/smollm2_135.yaml"))
    parser.add_argument("--saves", type=int, default=3, help="saves per mode")
    parser.add_argument("--steps-between", type=int, default=3, help="training steps after each save")
    parser.add_argument("--batch", default="1x64", help="micro-batch BxT of the training steps")
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def time_saves(args: argparse.Namespace, cfg, env, model, optimizer, step, base: Path) -> tuple[dict, float]:
    """`args.saves` saves per mode, the modes interleaved, each followed by `args.steps_between` timed steps: the
    stall, overlap and committed seconds of each save per mode, and the last synchronous round's step time."""
    results: dict[str, dict[str, list[float]]] = {m: {"stall": [], "overlap": [], "committed": []} for m in ("sync", "async")}
    baseline = 0.0
    for i in range(args.saves):
        for mode in ("sync", "async"):  # interleaved: drift on a shared machine hits both alike
            root = base / mode
            shutil.rmtree(root, ignore_errors=True)
            ckpt = Checkpointer(root, keep_last=1, rank=env.rank, world_size=env.world_size, async_save=mode == "async")
            start = time.perf_counter()
            ckpt.save(i + 1, {"model": ModelAndOptimizer(model, optimizer), "train": TrainState(step=i + 1)}, cfg)
            stall = time.perf_counter() - start
            steps = [step() for _ in range(args.steps_between)]
            ckpt.wait()
            committed = stall if mode == "sync" else time.perf_counter() - start
            if mode == "sync":  # nothing in the background: these steps are the baseline of this round
                baseline = statistics.median(steps)
            results[mode]["stall"].append(stall)
            results[mode]["overlap"].append(max(0.0, sum(steps) - args.steps_between * baseline))
            results[mode]["committed"].append(committed)
            print(f"save {i + 1} {mode:5}: stall {stall:6.2f}s  steps slower by {results[mode]['overlap'][-1]:5.2f}s "
                  f" committed after {committed:6.2f}s", flush=True)
    return results, baseline


def report(results: dict, baseline: float, model, saves: int) -> None:
    size = sum(p.numel() for p in model.parameters()) * 4 * 3 / 1e9
    print(f"\nseed shape, {size:.1f} GB of model + AdamW state, 1 rank, CPU; a step {baseline:.2f}s; medians of "
          f"{saves} saves per mode:")
    cost = {}
    for mode, r in results.items():
        stall, overlap = statistics.median(r["stall"]), statistics.median(r["overlap"])
        cost[mode] = stall + overlap
        print(f"  {mode:5}  stall {stall:6.2f}s  + slower steps {overlap:5.2f}s  = {cost[mode]:6.2f}s lost   "
              f"(committed after {statistics.median(r['committed']):.2f}s)")
    print(f"  async / sync training time lost per checkpoint: {cost['async'] / cost['sync']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    micro, seq = (int(x) for x in args.batch.split("x"))
    cfg = load_config(args.config, ["train.device=cpu", "train.dtype=fp32", "train.compile=false", *args.overrides])
    env = init_distributed(cfg.train.device)
    model = build_model(cfg, env)
    optimizer = build_optimizer(model, cfg.optim, env.device)
    vocab = cfg.model.vocab_size
    batch = [(torch.randint(0, vocab, (micro, seq)), torch.randint(0, vocab, (micro, seq)))]

    def step() -> float:
        start = time.perf_counter()
        loss, _ = train_step(model, optimizer, batch, 1, 1.0)
        float(loss)
        return time.perf_counter() - start

    step()  # optimizer state exists: the checkpoint has its full size
    base = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-stall-"))
    for _ in range(2):
        step()  # warm-up
    try:
        results, baseline = time_saves(args, cfg, env, model, optimizer, step, base)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
        shutdown()
    report(results, baseline, model, args.saves)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
