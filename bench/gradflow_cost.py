"""What the gradient-flow numbers cost per log step at the seed shape (configs/smollm2_135.yaml's model), one process:
per-group norms (every log step) and histograms (every histogram_interval log steps), against the clipping pass that
every step already makes over the same gradients, timed in the same process.

    python -m bench.gradflow_cost [--device cpu|cuda] [--seq 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from smollm2.config import load_config
from smollm2.model import SmolLM
from smollm2.observe.gradflow import group_grad_norms, group_histograms


def _time(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config("configs/smollm2_135.yaml", [])
    torch.manual_seed(0)
    model = SmolLM(cfg.model).to(device)
    idx = torch.randint(0, cfg.model.vocab_size, (1, args.seq + 1), device=device)
    model(idx[:, :-1], idx[:, 1:]).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    clip = _time(lambda: torch.nn.utils.clip_grad_norm_(params, float("inf")).item(), device, args.repeats)
    norms = _time(lambda: group_grad_norms(model), device, args.repeats)
    hist = _time(lambda: group_histograms(model, "grad"), device, args.repeats)
    print(f"seed shape, {sum(p.numel() for p in params):,} gradient values on {device} (median of {args.repeats})")
    print(f"  clip_grad_norm_ (every step, baseline)   {clip:8.1f} ms")
    print(f"  per-group norms (every log step)         {norms:8.1f} ms  ({norms / clip:.2f}x the clipping pass)")
    print(f"  gradient histograms (watch=gradients)    {hist:8.1f} ms  ({hist / clip:.2f}x the clipping pass)")


if __name__ == "__main__":
    main()
