"""What the spike guard (optim.spike_guard) costs: the training step with the guard deciding every update, against the
same step without it, in one process, taking turns step by step (`time_alternating`). Both use the fused AdamW (the
guard needs it), so the difference is the guard's own work: a handful of small ops on the device and, on several ranks,
one all-reduce of a scalar; no host sync. From the repository root:

    python -m bench.spike_guard                 # CPU: the host proxy (the seed model's 12 blocks, tiny math), B=1 T=64
    python -m bench.spike_guard --no-proxy train.device=cuda data.micro_batch=8 data.seq_len=2048   # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace

import torch

from bench.cases import PROXIES
from bench.timing import synchronize, time_alternating
from smollm2.config import load_config
from smollm2.distributed import init_distributed, shutdown
from smollm2.optim import SpikeGuard, build_optimizer
from smollm2.parallelize import build_model
from smollm2.step import train_step


class Runner:
    def __init__(self, cfg, env, guarded: bool):
        self.name = "guard on" if guarded else "guard off"
        cfg = replace(cfg, optim=replace(cfg.optim, spike_guard=guarded, fused=True))
        torch.manual_seed(0)
        self.model = build_model(cfg, env)
        self.optimizer = build_optimizer(self.model, cfg.optim, env.device)
        self.guard = SpikeGuard(cfg.optim, env.device) if guarded else None
        g = torch.Generator().manual_seed(0)
        shape = (cfg.data.micro_batch, cfg.data.seq_len + 1)
        self.batches = [torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(env.device) for _ in range(4)]
        self.cfg, self.k = cfg, 0

    def step(self) -> None:
        w = self.batches[self.k % len(self.batches)]
        guard = None if self.guard is None else (lambda loss, norm: self.guard.decide(self.optimizer, loss, norm, self.k))
        train_step(self.model, self.optimizer, [(w[:, :-1], w[:, 1:])], 1, self.cfg.optim.grad_clip, before_update=guard)
        self.k += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spike_guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-proxy", action="store_true", help="configs/smollm2_135.yaml as it is, not the host proxy")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per runner and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    proxy = [] if args.no_proxy else [*PROXIES["host"].overrides, "data.micro_batch=1", "data.seq_len=64"]
    # The guard runs the same ops whether its window is full or not, so the default window measures its whole cost; a
    # skipped update would make the guarded step cheaper, so none should be (the line at the end counts them).
    cfg = load_config("configs/smollm2_135.yaml", [*proxy, "train.grad_accum=1", *args.overrides])
    env = init_distributed(cfg.train.device)
    runners = [Runner(cfg, env, False), Runner(cfg, env, True)]
    ratios = []
    for r in range(args.rounds):
        off, on = time_alternating([x.step for x in runners], env.device, args.warmup if r == 0 else 1, args.steps)
        ratios.append(statistics.median(on) / statistics.median(off))
        print(f"round {r}: guard off {statistics.median(off):.1f} ms, guard on {statistics.median(on):.1f} ms, "
              f"on / off {ratios[-1]:.3f}", flush=True)
    synchronize(env.device)
    print(f"spike guard on / off, median of {args.rounds} rounds: {statistics.median(ratios):.3f} "
          f"(rounds: {' '.join(f'{x:.3f}' for x in ratios)}; skipped {runners[1].guard.take()[1]} of "
          f"{runners[1].k} updates)")
    shutdown()
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main, sys.argv[1:])
