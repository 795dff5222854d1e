"""What document masking costs: the training step (`smollm2.step.train_step` on `smollm2.parallelize.build_model`) with
`doc_ids` and reset positions, against the same step without them, in one process, taking turns step by step
(`time_alternating`: a burst of load from another process lands on every runner alike). The windows are cut from a stream
of documents of log-normal lengths (mean --mean-doc tokens, sigma --sigma, seed fixed) ending in EOS, so that most
windows of T=2048 hold several documents; every runner steps through the same windows. From the repository root:

    python -m bench.doc_masking                    # CPU: the host proxy's model (12 x 96, vocab 1024, fp32), B=1, T=2048
    python -m bench.doc_masking --config configs/smollm2_135.yaml --batch 8 --kernels auto sdpa flex \\
        --no-proxy train.device=cuda               # GPU: the seed model, bf16, per-block compile

`--kernels`: the model.attention value of each masked runner (`auto`, `sdpa`, `naive`, `flex`, `flash_attn`; each printed
with the kernel `attention_kernel` names); a kernel that cannot run here is an error row, the others still run. The plain
runner keeps the config's model.attention. Rows: median ms per step, tokens/s, and masked / plain time per round.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.cases import PROXIES
from bench.timing import synchronize, time_alternating
from smollm2.config import AttentionBackend, Config, load_config
from smollm2.data.loader import documents_of
from smollm2.distributed import init_distributed, shutdown
from smollm2.errors import ConfigError
from smollm2.model import attention_kernel
from smollm2.optim import build_optimizer
from smollm2.parallelize import build_model
from smollm2.step import train_step

ROOT = Path(__file__).resolve().parents[1]


def document_windows(n: int, T: int, vocab: int, mean: float, sigma: float, seed: int) -> torch.Tensor:
    """[n, T + 1] windows cut back to back from a stream of documents of log-normal lengths (EOS = vocab - 1 ends each)."""
    rng = np.random.default_rng(seed)
    mu = math.log(mean) - sigma**2 / 2  # E[length] = exp(mu + sigma^2 / 2) = mean
    need, parts, total = n * (T + 1), [], 0
    while total < need:
        length = max(1, round(rng.lognormal(mu, sigma)))
        parts.append(np.append(rng.integers(0, vocab - 1, length - 1), vocab - 1))
        total += length
    return torch.from_numpy(np.concatenate(parts)[:need].reshape(n, T + 1).astype(np.int64))


class Runner:
    """One model + optimizer stepping through the windows: plain (`attention` None) or masked with that backend."""

    def __init__(self, cfg: Config, env, windows: torch.Tensor, attention: str | None):
        B, device = cfg.data.micro_batch, env.device
        if attention is not None:
            cfg = replace(cfg, model=replace(cfg.model, attention=AttentionBackend(attention), document_masking=True))
        self.name = "plain" if attention is None else f"masked {attention}"
        self.kernel = attention_kernel(cfg.model, device, torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32)
        torch.manual_seed(0)
        self.model = build_model(cfg, env)
        self.optimizer = build_optimizer(self.model, cfg.optim, device)
        self.grad_clip = cfg.optim.grad_clip
        eos = cfg.model.vocab_size - 1
        self.batches = []
        for rows in windows.to(device).split(B):
            x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
            if attention is None:
                self.batches.append([(x, y)])
            else:
                docs = documents_of(x.cpu().numpy(), eos, position_reset=True)
                self.batches.append([(x, y, {name: t.to(device) for name, t in docs.items()})])
        self.k = 0

    def step(self) -> None:
        train_step(self.model, self.optimizer, self.batches[self.k % len(self.batches)], 1, self.grad_clip)
        self.k += 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.doc_masking", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smollm2_135.yaml")
    parser.add_argument("--no-proxy", action="store_true", help="the config as it is, not the host proxy's tiny math")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch B (default 1)")
    parser.add_argument("--seq-len", type=int, default=2048, help="window T (default 2048)")
    parser.add_argument("--kernels", nargs="+", default=["auto"], help="model.attention of each masked runner")
    parser.add_argument("--mean-doc", type=float, default=600.0, help="mean document length in tokens (default 600)")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the lengths (default 1.0)")
    parser.add_argument("--windows", type=int, default=16, help="distinct windows, cycled through (default 16)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed turns before the first round (default 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per runner and round (default 3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the results here (default: $OUT/doc_masking.json when $OUT is set)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def window_stats(windows: torch.Tensor, eos: int) -> dict:
    docs = [int((w[:-1] == eos).sum()) + 1 for w in windows]  # documents seen by each input window (the cut ones too)
    return {"windows": len(docs), "docs_per_window_mean": statistics.mean(docs),
            "windows_with_several_docs": sum(d > 1 for d in docs) / len(docs)}


def run(args: argparse.Namespace) -> dict:
    config = args.config if Path(args.config).is_file() else str(ROOT / args.config)
    proxy = [] if args.no_proxy else list(PROXIES["host"].overrides)
    shape = [f"data.seq_len={args.seq_len}", f"data.micro_batch={args.batch}", "train.grad_accum=1",
             f"model.max_seq_len={max(args.seq_len, 64)}"]
    cfg = load_config(config, [*proxy, *shape, *args.overrides])
    env = init_distributed(cfg.train.device)
    windows = document_windows(args.windows * args.batch, args.seq_len, cfg.model.vocab_size, args.mean_doc,
                               args.sigma, seed=0)
    stats = window_stats(windows, cfg.model.vocab_size - 1)
    print(f"doc_masking | {config} {' '.join([*proxy, *shape, *args.overrides])} | device {env.device} | "
          f"torch {torch.__version__} | {stats}", flush=True)
    runners, errors = [Runner(cfg, env, windows, None)], {}
    for kernel in args.kernels:
        try:
            runners.append(Runner(cfg, env, windows, kernel))
        except ConfigError as err:
            errors[kernel] = str(err)
            print(f"masked {kernel}: {err}", flush=True)
    rounds: list[list[float]] = [[] for _ in runners]  # per runner, the median ms of each round
    started = time.perf_counter()
    for r in range(args.rounds):
        times = time_alternating([x.step for x in runners], env.device, args.warmup if r == 0 else 1, args.steps)
        for per_runner, t in zip(rounds, times):
            per_runner.append(statistics.median(t))
        print(f"round {r}: " + ", ".join(f"{x.name} {m[-1]:.1f} ms" for x, m in zip(runners, rounds)), flush=True)
    synchronize(env.device)
    tokens = args.batch * args.seq_len
    rows = [{"runner": x.name, "kernel": x.kernel, "round_ms": m, "step_ms": statistics.median(m),
             "tok_per_s": tokens / (statistics.median(m) / 1000),
             "x_plain_time": statistics.median(a / b for a, b in zip(m, rounds[0]))} for x, m in zip(runners, rounds)]
    shutdown()
    return {"config": config, "overrides": [*proxy, *shape, *args.overrides], "device": str(env.device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "windows": stats, "rows": rows,
            "errors": errors, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
            "elapsed_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(f"\n{'runner':<18} {'kernel':<18} {'step ms':>9} {'tok/s':>10} {'x plain time':>12}  per round (ms)")
    for row in result["rows"]:
        print(f"{row['runner']:<18} {row['kernel']:<18} {row['step_ms']:>9.1f} {row['tok_per_s']:>10,.0f} "
              f"{row['x_plain_time']:>12.3f}  {' '.join(f'{m:.1f}' for m in row['round_ms'])}")
    for kernel, error in result["errors"].items():
        print(f"masked {kernel:<11} ERROR {error}")
    out = args.json or (os.path.join(os.environ["OUT"], "doc_masking.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main, sys.argv[1:])
