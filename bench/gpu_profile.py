"""Where does our training step spend its time? A diagnosis for a GPU machine (also runs on CPU with the tiny config).

    python -m bench.gpu_profile [--out DIR] [--cases B=8,T=2048,ac=none,compile=false ...] [--loss]

Per case, the step `python -m bench.step` times (`smollm2.step.train_step` on `build_model`, as training runs it):
- the whole step timed on the host (time to enqueue it, no sync) and on the device (CUDA events): a step whose host time
  reaches its device time is launch-bound (the GPU waits for Python);
- a torch.profiler trace of two steps: the top ops by device time and by host time (FSDP2's hooks, the compiled graphs,
  clip and the optimizer show up under their own names; full tables in DIR).
`--loss`: the LM head + loss alone (h [B*T, C], tied weight [padded vocab, C]), forward + backward, for the fused chunked
loss at two chunk sizes (eager and compiled) against `F.cross_entropy` over the full logits (eager and compiled).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.step import Ours, parse_case, synchronize, time_steps
from smollm2.config import load_config
from smollm2.distributed import init_distributed
from smollm2.model import loss as loss_module
from smollm2.model import padded_vocab_size


def host_and_device_ms(ours: Ours, device: torch.device, steps: int = 5) -> tuple[float, float | None]:
    """Median host (enqueue) and device milliseconds of `steps` whole training steps."""
    host, events = [], []
    for _ in range(steps):
        start_event = end_event = None
        if device.type == "cuda":
            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
        start = time.perf_counter()
        ours.step()
        host.append(1000 * (time.perf_counter() - start))
        if end_event is not None:
            end_event.record()
            events.append((start_event, end_event))
    synchronize(device)
    device_ms = statistics.median(s.elapsed_time(e) for s, e in events) if events else None
    return statistics.median(host), device_ms


def profile_case(spec: str, cfg, env, out: Path, log) -> None:
    case = parse_case(spec, cfg)
    start = time.perf_counter()
    ours = Ours(cfg, case, env)
    for _ in range(4):
        ours.step()
    synchronize(env.device)
    log(f"\n=== {spec}: build + 4 warm-up steps {time.perf_counter() - start:.1f}s")
    host, device = host_and_device_ms(ours, env.device)
    device_text = "n/a (CPU: host time is the step)" if device is None else f"{device:8.2f} ms"
    log(f"  train_step     host {host:8.2f} ms   device {device_text}")
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
    return statistics.median(time_steps(fn, device, warmup, steps))


def loss_bench(cfg, device, log) -> None:
    tokens = 8 * 2048 if device.type == "cuda" else 2 * 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    d, vocab = cfg.model.d_model, cfg.model.vocab_size
    padded = padded_vocab_size(cfg.model)
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
    default_chunk = loss_module.CHUNK_ELEMENTS, loss_module.CHUNK_ELEMENTS_CUDA
    for elements in (2**25, 2**28):
        for compiled in (False, True):
            def fused(elements=elements, compiled=compiled):
                loss_module.CHUNK_ELEMENTS = loss_module.CHUNK_ELEMENTS_CUDA = elements
                return loss_module.linear_cross_entropy(h, w, t, vocab, compiled=compiled)
            rows = elements // padded
            variants.append((f"fused chunk ~{rows} rows {'compiled' if compiled else 'eager'}", fused))
    for label, fn in variants:
        def run(fn=fn):
            h.grad = w.grad = None
            fn().backward()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            ms = time_fn(run, device)
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            log(f"  {label:<36} {ms:8.2f} ms   peak {mem:6.2f} GiB")
        except Exception as exc:  # noqa: BLE001 - a diagnosis reports every variant
            log(f"  {label:<36} ERROR {type(exc).__name__}: {str(exc)[:200]}")
    loss_module.CHUNK_ELEMENTS, loss_module.CHUNK_ELEMENTS_CUDA = default_chunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results", help="profile.log and the full profiler tables go here")
    parser.add_argument("--config", default=None, help="preset (default: smollm2_135 on CUDA, tiny on CPU)")
    parser.add_argument("--cases", nargs="*", default=None, help="case specs as in bench.step")
    parser.add_argument("--loss", action="store_true", help="also time the LM head + loss variants")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
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
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
            log(f"=== {spec}: ERROR {type(exc).__name__}: {str(exc)[:1500]}")
    if args.loss:
        loss_bench(cfg, env.device, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
