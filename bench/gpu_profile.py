"""Where does our training step spend its time? A diagnosis for one GPU call (also runs on CPU with the tiny config).

    python bench/gpu_profile.py [--out DIR] [--cases B=8,T=2048,ac=none,compile=false ...] [--loss]

Per case: each phase of the step (forward+loss, backward, clip, optimizer step, zero_grad) timed on the device (CUDA
events) and on the host (time to enqueue, no sync): a phase whose host time exceeds its device time is launch-bound.
Then a torch.profiler trace of two steps: the top ops by device time and by host time (full tables in DIR).
`--loss`: the LM head + loss alone (h [B*T, C] bf16, tied weight [50304, C]), forward + backward, for the fused chunked
loss at several chunk sizes (eager and compiled) against `F.cross_entropy` over the full logits (eager and compiled).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smollm2 import model as model_module  # noqa: E402
from smollm2.bench import Ours, parse_case, synchronize  # noqa: E402
from smollm2.config import load_config  # noqa: E402
from smollm2.distributed import init_distributed  # noqa: E402


class Clock:
    """Device events and host timestamps at named points of a step."""

    def __init__(self, device):
        self.device, self.marks = device, []

    def mark(self, name):
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((name, time.perf_counter(), event))

    def phases(self):
        synchronize(self.device)
        out = []
        for (_, t0, e0), (name, t1, e1) in zip(self.marks, self.marks[1:]):
            device_ms = e0.elapsed_time(e1) if e0 is not None else None
            out.append((name, 1000 * (t1 - t0), device_ms))
        return out


def step_phases(ours: Ours, clock: Clock):
    model, optimizer = ours.model, ours.optimizer
    (inputs, targets), = ours.batches
    clock.mark("start")
    model.set_requires_gradient_sync(True)
    loss = model(inputs, targets)
    clock.mark("forward+loss")
    loss.backward()
    clock.mark("backward")
    torch.nn.utils.clip_grad_norm_(model.parameters(), ours.cfg.optim.grad_clip)
    clock.mark("clip")
    optimizer.step()
    clock.mark("optimizer")
    optimizer.zero_grad(set_to_none=True)
    clock.mark("zero_grad")


def profile_case(spec: str, cfg, env, out: Path, log) -> None:
    case = parse_case(spec, cfg)
    start = time.perf_counter()
    ours = Ours(cfg, case, env)
    for _ in range(4):
        ours.step()
    synchronize(env.device)
    log(f"\n=== {spec}: build + 4 warm-up steps {time.perf_counter() - start:.1f}s")
    rows = {}
    for _ in range(5):
        clock = Clock(env.device)
        step_phases(ours, clock)
        for name, host, dev in clock.phases():
            rows.setdefault(name, []).append((host, dev))
    total_host = total_dev = 0.0
    for name, values in rows.items():
        host = statistics.median(v[0] for v in values)
        dev = statistics.median(v[1] for v in values) if values[0][1] is not None else float("nan")
        total_host, total_dev = total_host + host, total_dev + dev
        log(f"  {name:<14} host {host:8.2f} ms   device {dev:8.2f} ms")
    log(f"  {'step':<14} host {total_host:8.2f} ms   device {total_dev:8.2f} ms")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            ours.step()
        synchronize(env.device)
    averages = prof.key_averages()
    name = spec.replace(",", "_").replace("=", "")
    sort_device = "self_cuda_time_total" if env.device.type == "cuda" else "self_cpu_time_total"
    by_device = averages.table(sort_by=sort_device, row_limit=60, max_name_column_width=90)
    by_host = averages.table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=90)
    (out / f"profile_{name}.txt").write_text(f"by device time\n{by_device}\n\nby host time\n{by_host}\n")
    log("  top by device time (2 steps):\n" + "\n".join(by_device.splitlines()[:18]))
    log("  top by host time (2 steps):\n" + "\n".join(by_host.splitlines()[:14]))
    del ours


def time_fn(fn, device, warmup=3, steps=10) -> float:
    from smollm2.bench import time_steps

    return statistics.median(time_steps(fn, device, warmup, steps))


def loss_bench(cfg, device, log) -> None:
    tokens = 8 * 2048 if device.type == "cuda" else 2 * 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    d, vocab = cfg.model.d_model, cfg.model.vocab_size
    padded = model_module.padded_vocab_size(cfg.model)
    torch.manual_seed(0)
    h = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(padded, d, device=device) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device=device)

    def plain(h, w, t):
        logits = (h @ w.t()).float()
        logits = logits.masked_fill(torch.arange(padded, device=device) >= vocab, float("-inf"))
        return F.cross_entropy(logits, t)

    plain_compiled = torch.compile(plain)
    log(f"\n=== LM head + loss, forward + backward: {tokens} tokens x {padded} vocab, {dtype}")
    variants = [("F.cross_entropy eager", lambda: plain(h, w, t)),
                ("F.cross_entropy compiled", lambda: plain_compiled(h, w, t))]
    default_chunk = model_module.LOSS_CHUNK_ELEMENTS, model_module.LOSS_CHUNK_ELEMENTS_CUDA
    for elements in (2**25, 2**28):
        for compiled in (False, True):
            def fused(elements=elements, compiled=compiled):
                model_module.LOSS_CHUNK_ELEMENTS = model_module.LOSS_CHUNK_ELEMENTS_CUDA = elements
                return model_module.linear_cross_entropy(h, w, t, vocab, compiled=compiled)
            rows = elements // padded
            variants.append((f"fused chunk ~{rows} rows {'compiled' if compiled else 'eager'}", fused))
    for label, fn in variants:
        def run(fn=fn):
            h.grad = w.grad = None
            fn().backward()
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        try:
            ms = time_fn(run, device)
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            log(f"  {label:<36} {ms:8.2f} ms   peak {mem:6.2f} GiB")
        except Exception as exc:  # noqa: BLE001 - a diagnosis reports every variant
            log(f"  {label:<36} ERROR {type(exc).__name__}: {str(exc)[:200]}")
    model_module.LOSS_CHUNK_ELEMENTS, model_module.LOSS_CHUNK_ELEMENTS_CUDA = default_chunk


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--config", default=None)
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--loss", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    cfg = load_config(args.config or ("configs/smollm2_135.yaml" if cuda else "configs/tiny.yaml"), args.overrides)
    env = init_distributed(cfg.train.device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "profile.log").open("a")

    def log(text):
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    log(f"torch {torch.__version__} | {torch.cuda.get_device_name() if cuda else 'cpu'}")
    cases = args.cases or (["B=8,T=2048,ac=none,compile=false", "B=8,T=2048,ac=none"] if cuda else ["B=4,T=64"])
    for spec in cases:
        try:
            profile_case(spec, cfg, env, out, log)
        except Exception as exc:  # noqa: BLE001
            log(f"=== {spec}: ERROR {type(exc).__name__}: {str(exc)[:1500]}")
    if args.loss:
        loss_bench(cfg, env.device, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
