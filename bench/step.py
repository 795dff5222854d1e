"""Training-step benchmark: our step (FSDP2, mixed precision, activation checkpointing, compile: `smollm2.step.train_step`
on `build_model`) against a deliberately plain nanoGPT-style reference (`bench/reference.py`), in one process. From the
repository root:

    python -m bench.step                                     # CUDA: seed model, the target rows first; CPU: tiny config
    python -m bench.step --config configs/tiny.yaml --cases B=4,T=64,ac=none --json out.json
    python -m bench.step --cases B=8,T=2048,ac=none,sdpa=cudnn B=8,T=2048,ac=none,sdpa=flash --no-reference

A case is `key=value` pairs joined by commas: B (micro-batch), T (seq_len), accum (grad accumulation, default 1),
ac (none|full|selective), compile (true|false|whole), sdpa (default|flash|cudnn|efficient|math), reshard (true|false),
wrap (auto|block|root: train.fsdp_wrap), cpp (true|false: train.cpp_wrapper),
ref (1: also time the reference on this (B, T, accum, compile), default for ac=none rows). Random tokens, no dataset.
Timing: median of the timed steps after warm-up (CUDA events on GPUs, wall clock on CPU; bench/timing.py); MFU against
the bf16 (or fp32) matmul peak measured in the same process; FLOPs per token 6N + 12*L*H*Q*T. Rows print as they finish;
a table, the targets (PASS/FAIL against `TARGETS` in bench/cases.py) and JSON (`--json`, or `$OUT/bench.json` when $OUT
is set) at the end. `--budget-s` skips the cases that would start after that many seconds, so a time-boxed GPU run still
prints its table.

Named proxies (`--proxy NAME`, see `PROXIES` in bench/cases.py) fix a config, overrides and cases; `--proxy host` is the
GPU-free measure of host overhead: the seed model's structure (12 blocks, FSDP2 root, per-block compile) with
tiny math, fp32 on CPU, compile on for both, 3 interleaved rounds; options and overrides given on the command line still
apply on top; `--proxy host-llama` is the same for SmolLM2-135M's Llama-style structure (30 thin blocks; ours only).
`--count-ops` (on for proxies) profiles one more step of each implementation after timing
(`torch.profiler`, CPU activity): aten ops, all profiler events and the profiled CPU time per step, in the table and the
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.cases import CPU_CASES, GPU_CASES, PROXIES, Case, case_config, compile_on, evaluate_targets, parse_case, random_batches
from bench.reference import GPTConfig, ReferenceTrainer
from bench.timing import count_ops, matmul_peak_tflops, reset_memory, sdpa_backend, synchronize, time_alternating, time_steps
from smollm2.config import Config, load_config
from smollm2.distributed import DistEnv, init_distributed, shutdown
from smollm2.model import padded_vocab_size
from smollm2.observe.metrics import PEAK_TFLOPS, flops_per_token, peak_memory_gib
from smollm2.optim import build_optimizer
from smollm2.parallelize import build_model
from smollm2.step import train_step

ROOT = Path(__file__).resolve().parents[1]  # presets are found from here too when run from another directory


# -------------------------------------------------------------------------------------------------------- the two runs


class Ours:
    """The training step exactly as `smollm2.train` runs it."""

    def __init__(self, cfg: Config, case: Case, env: DistEnv):
        self.cfg = case_config(cfg, case)
        self.model = build_model(self.cfg, env)
        if case.compile == "whole":  # lever: the model's forward body as one graph; FSDP2's hooks (registered on the
            # module, run by its __call__) stay outside it. `Module.compile()` would trace __call__, hooks included.
            self.model.forward = torch.compile(self.model.forward)
        self.optimizer = build_optimizer(self.model, self.cfg.optim, env.device)
        self.batches = random_batches(case, self.cfg.model.vocab_size, env.device, seed=env.rank)
        self.loss_sum = torch.zeros((), device=env.device)
        self.n_params = self.model.flops_params()

    def step(self) -> None:
        train_step(self.model, self.optimizer, self.batches, self.cfg.train.grad_accum, self.cfg.optim.grad_clip,
                   loss_sum=self.loss_sum)


class Reference:
    def __init__(self, cfg: Config, case: Case, device: torch.device):
        m, o = cfg.model, cfg.optim
        self.padded = padded_vocab_size(m)
        config = GPTConfig(vocab_size=m.vocab_size, padded_vocab=self.padded, n_layer=m.n_layer, n_head=m.n_head,
                           n_embd=m.d_model, n_mlp=m.d_mlp, block_size=max(m.max_seq_len, case.seq_len),
                           rope_theta=m.rope_theta, norm_eps=m.norm_eps)
        self.trainer = ReferenceTrainer(config, device, dtype=str(cfg.train.dtype), compile=compile_on(case, device),
                                        lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps,
                                        grad_clip=o.grad_clip, fused=o.fused)  # optim.fused: both sides alike
        self.batches = random_batches(case, m.vocab_size, device, seed=0)

    def step(self) -> None:
        self.trainer.step(self.batches)


# ---------------------------------------------------------------------------------------------------------------- rows


def make_row(impl: str, case: Case, cfg: Config, env: DistEnv, times: list[float], n_params: int, peak: float,
             memory: float, setup_s: float) -> dict:
    m = cfg.model
    step_ms = statistics.median(times)
    world = env.world_size if impl == "smollm2" else 1
    tokens = case.micro_batch * case.seq_len * case.accum * world
    tok_per_s = tokens / (step_ms / 1000)
    tflops = tok_per_s * flops_per_token(n_params, m.n_layer, m.n_head, m.head_dim, case.seq_len) / 1e12
    return {"impl": impl, "case": case.label, "micro_batch": case.micro_batch, "seq_len": case.seq_len,
            "accum": case.accum, "activation_checkpointing": case.ac if impl == "smollm2" else "none",
            "compile": case.compile if impl == "smollm2" else str(compile_on(case, env.device)).lower(),
            "sdpa": case.sdpa if impl == "smollm2" else "default", "reshard_after_forward": case.reshard,
            "fsdp_wrap": case.wrap if impl == "smollm2" else None,
            "dtype": str(cfg.train.dtype), "world_size": world, "step_ms": step_ms, "step_ms_min": min(times),
            "step_ms_max": max(times), "timed_steps": len(times), "tok_per_s": tok_per_s, "tflops": tflops,
            "mfu": tflops / (peak * world) if peak else None, "peak_mem_gib": memory, "setup_and_warmup_s": setup_s,
            "ratio_to_reference": None, "round_ms": None, "round_ratios": None, "ops": None}


def build_and_warm(build, device: torch.device, warmup: int) -> tuple[object, float, float]:
    """Build a runner and take its warm-up steps: (runner, build + warm-up seconds, peak memory GiB)."""
    start = time.perf_counter()
    runner = build()
    for _ in range(warmup):
        runner.step()
    synchronize(device)
    return runner, time.perf_counter() - start, peak_memory_gib(device)


def run_case(case: Case, cfg: Config, env: DistEnv, args, peak: float, reference_cache: dict) -> list[dict]:
    """Our step on `case` (and the reference on its (B, T, accum, compile) once), timed in `args.rounds` rounds of
    `args.steps` steps. With the reference and rounds > 1, both models stay alive (fairer on noisy CPUs, but CUDA memory
    then counts both) and take turns step by step within each round; each row keeps its per-round medians, and
    `round_ratios` are ours / reference tok/s per round. With rounds <= 1 they run one after the other, one alive."""
    device = env.device
    ref_key = (case.micro_batch, case.seq_len, case.accum, compile_on(case, device))
    want_ref = case.reference and not args.no_reference and ref_key not in reference_cache
    rows = []
    with sdpa_backend(case.sdpa, device):
        reset_memory(device)
        ours, ours_setup, ours_memory = build_and_warm(lambda: Ours(cfg, case, env), device, args.warmup)
        n_params = ours.n_params
        ours_rounds, ref_rounds, reference = [], [], None
        if want_ref and args.rounds > 1:
            reference, ref_setup, ref_memory = build_and_warm(lambda: Reference(cfg, case, device), device, args.warmup)
            for r in range(args.rounds):
                ours_times, ref_times = time_alternating([ours.step, reference.step], device, int(r > 0), args.steps)
                ours_rounds.append(ours_times)
                ref_rounds.append(ref_times)
        else:
            for r in range(max(1, args.rounds)):
                ours_rounds.append(time_steps(ours.step, device, int(r > 0), args.steps))
            if want_ref:
                del ours
                ours = None
                reset_memory(device)
                reference, ref_setup, ref_memory = build_and_warm(lambda: Reference(cfg, case, device), device,
                                                                  args.warmup)
                ref_rounds.append(time_steps(reference.step, device, 0, args.steps))
        ours_ops = count_ops(ours.step, device) if args.count_ops and ours is not None else None
        ref_ops = count_ops(reference.step, device) if args.count_ops and reference is not None else None
        rows.append(make_row("smollm2", case, cfg, env, sum(ours_rounds, []), n_params, peak, ours_memory, ours_setup))
        rows[0].update(round_ms=[statistics.median(r) for r in ours_rounds], ops=ours_ops)
        if want_ref:
            ref_row = make_row("reference", case, cfg, env, sum(ref_rounds, []), n_params, peak, ref_memory, ref_setup)
            ref_row.update(round_ms=[statistics.median(r) for r in ref_rounds], ops=ref_ops)
            if len(ref_rounds) == len(ours_rounds) > 1:  # interleaved: tok/s ratio = reference ms / ours ms, per round
                rows[0]["round_ratios"] = [r / o for o, r in zip(rows[0]["round_ms"], ref_row["round_ms"])]
            reference_cache[ref_key] = ref_row
            rows.append(ref_row)
        del ours, reference
        reset_memory(device)
    ref_row = reference_cache.get(ref_key)
    if ref_row is not None:
        rows[0]["ratio_to_reference"] = rows[0]["tok_per_s"] / ref_row["tok_per_s"]
    return rows


# ---------------------------------------------------------------------------------------------------------------- output


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], stream=sys.stdout) -> None:
    head = (f"{'impl':<9} {'B':>3} {'T':>5} {'acc':>3} {'ac':<9} {'compile':<7} {'sdpa':<7} {'reshard':<7} {'wrap':<5} "
            f"{'step ms':>9} {'tok/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} {'x ref':>6} {'aten ops':>8} "
            f"{'events':>7} {'prof ms':>7}")
    print(head, file=stream)
    print("-" * len(head), file=stream)
    for r in rows:
        if r.get("error"):
            print(f"{r['impl']:<9} {r['case']}: ERROR {r['error']}", file=stream)
            continue
        reshard = "-" if r["reshard_after_forward"] is None else str(r["reshard_after_forward"]).lower()
        wrap = r.get("fsdp_wrap") or "-"
        ops = r.get("ops")
        print(f"{r['impl']:<9} {r['micro_batch']:>3} {r['seq_len']:>5} {r['accum']:>3} {r['activation_checkpointing']:<9} "
              f"{r['compile']:<7} {r['sdpa']:<7} {reshard:<7} {wrap:<5} {r['step_ms']:>9.2f} {r['tok_per_s']:>11,.0f} "
              f"{r['tflops']:>8.3f} {_fmt(r['mfu'], '.3f'):>6} {r['peak_mem_gib']:>8.2f} "
              f"{_fmt(r['ratio_to_reference'], '.3f'):>6} {_fmt(ops and ops['aten_ops'], 'd'):>8} "
              f"{_fmt(ops and ops['profiler_events'], 'd'):>7} {_fmt(ops and ops['profiled_cpu_ms'], '.1f'):>7}",
              file=stream, flush=True)
    for r in rows:
        if r.get("round_ratios"):
            ratios = r["round_ratios"]
            print(f"{r['case']}: x ref per round {' '.join(f'{x:.3f}' for x in ratios)} "
                  f"(median {statistics.median(ratios):.3f}; ms/step per round, ours "
                  f"{' '.join(f'{x:.1f}' for x in r['round_ms'])})", file=stream)


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["vendor_peak_tflops"] = next((v for k, v in PEAK_TFLOPS.items() if k in info["gpu"]), None)
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with a named proxy's settings under whatever it gives."""
    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="preset (default: configs/smollm2_135.yaml on CUDA, configs/tiny.yaml on CPU)")
    parser.add_argument("--cases", nargs="+", help="case specs, e.g. B=8,T=2048,ac=none,ref=1 (default: a preset sweep)")
    parser.add_argument("--warmup", type=int, help="untimed steps per case (default: 8 on CUDA, 3 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per case and round (default: 20 on CUDA, 10 on CPU)")
    parser.add_argument("--rounds", type=int, help="alternating ours/reference timing rounds (default: 1 CUDA, 3 CPU)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference")
    parser.add_argument("--proxy", choices=sorted(PROXIES), help="a named benchmark (config, overrides, cases, rounds): "
                        + "; ".join(f"{k}: {v.about}" for k, v in PROXIES.items()))
    parser.add_argument("--count-ops", action="store_true", help="profile one step of each: aten ops, events, CPU ms "
                        "(on with --proxy)")
    parser.add_argument("--json", help="write the results here (default: $OUT/bench.json when $OUT is set)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (train.dtype=bf16, ...)")
    args = parser.parse_args(argv)
    if args.proxy:  # the proxy's settings, under whatever the command line gives
        proxy = PROXIES[args.proxy]
        args.config = args.config or proxy.config
        args.cases = args.cases or list(proxy.cases)
        args.overrides = [*proxy.overrides, *args.overrides]
        args.warmup = proxy.warmup if args.warmup is None else args.warmup
        args.steps = proxy.steps if args.steps is None else args.steps
        args.rounds = proxy.rounds if args.rounds is None else args.rounds
        args.count_ops = True
    return args


def setup(args: argparse.Namespace) -> tuple[str, Config, DistEnv, list[Case]]:
    """The config (path and loaded), the process group, the device's defaults for the options left unset, and the
    cases; TF32 on GPUs and one static graph per shape."""
    cuda = torch.cuda.is_available() and not any(o.startswith("train.device=cpu") for o in args.overrides)
    config = args.config or ("configs/smollm2_135.yaml" if cuda else "configs/tiny.yaml")
    if not Path(config).is_file() and (ROOT / config).is_file():
        config = str(ROOT / config)
    cfg = load_config(config, args.overrides)
    env = init_distributed(cfg.train.device)
    device = env.device
    args.warmup = args.warmup if args.warmup is not None else (8 if device.type == "cuda" else 3)
    args.steps = args.steps if args.steps is not None else (20 if device.type == "cuda" else 10)
    args.rounds = args.rounds if args.rounds is not None else (1 if device.type == "cuda" else 3)
    specs = args.cases or (GPU_CASES if device.type == "cuda" else CPU_CASES)
    cases = [parse_case(spec, cfg) for spec in specs]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Each (B, T) compiles to its own static graph, as a fresh training run would (no dynamic-shape fallback).
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return config, cfg, env, cases


def error_row(case: Case, error: str) -> dict:
    """The row of a case that was skipped or failed: the table and the JSON keep it."""
    return {"impl": "smollm2", "case": case.label, "error": error, "sdpa": case.sdpa,
            "reshard_after_forward": case.reshard, "fsdp_wrap": case.wrap, "accum": case.accum}


def run_cases(cases: list[Case], cfg: Config, env: DistEnv, args: argparse.Namespace, peak: float,
              started: float) -> list[dict]:
    """Every case in order (none started once `--budget-s` is spent; a failing one is an error row), each row printed
    as it finishes."""
    rows: list[dict] = []
    reference_cache: dict = {}
    previous_sdpa = "default"
    for case in cases:
        elapsed = time.perf_counter() - started
        if args.budget_s is not None and elapsed > args.budget_s:
            rows.append(error_row(case, f"skipped: budget {args.budget_s:.0f}s spent"))
            continue
        if case.sdpa != previous_sdpa or case.compile == "whole":  # compiled graphs bake the attention kernel in
            torch._dynamo.reset()
        previous_sdpa = case.sdpa
        try:
            new = run_case(case, cfg, env, args, peak, reference_cache)
        except Exception as err:  # noqa: BLE001 - one failing lever must not lose the table
            new = [error_row(case, f"{type(err).__name__}: {str(err)[:300]}")]
            reset_memory(env.device)
        rows.extend(new)
        if env.is_main:
            for row in new:
                status = row.get("error") or (f"{row['step_ms']:.2f} ms, {row['tok_per_s']:,.0f} tok/s, "
                                              f"x ref {_fmt(row['ratio_to_reference'], '.3f')}")
                print(f"[{time.perf_counter() - started:6.0f}s] {row['impl']:<9} {case.label}: {status}", flush=True)
    return rows


def report(result: dict, json_path: str | None) -> None:
    """The table, the targets and the JSON (`--json`, else $OUT/bench.json when $OUT is set)."""
    print()
    print_table(result["rows"])
    print()
    for t in result["targets"]:
        print(f"{t['status']:<5} {t['target']}: {_fmt(t['value'], '.3f')}")
    out = json_path or (os.path.join(os.environ["OUT"], "bench.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, cfg, env, cases = setup(args)
    device = env.device
    started = time.perf_counter()
    peak_dtype = torch.bfloat16 if (device.type == "cuda" or cfg.train.dtype == "bf16") else torch.float32
    peak = matmul_peak_tflops(device, peak_dtype)
    info = environment(device)
    if env.is_main:
        print(f"bench | {config} | {info} | world size {env.world_size} | dtype {cfg.train.dtype} | "
              f"measured {str(peak_dtype).removeprefix('torch.')} matmul peak {peak:.4g} TFLOP/s | "
              f"warmup {args.warmup}, timed {args.steps} x {args.rounds} round(s)", flush=True)
    rows = run_cases(cases, cfg, env, args, peak, started)
    targets = evaluate_targets(rows, device, proxy=args.proxy)
    result = {"config": config, "overrides": args.overrides, "environment": info, "world_size": env.world_size,
              "matmul_peak_tflops": peak, "matmul_peak_dtype": str(peak_dtype).removeprefix("torch."),
              "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "proxy": args.proxy, "rows": rows,
              "targets": targets,
              "elapsed_s": time.perf_counter() - started}
    if env.is_main:
        report(result, args.json)
    shutdown()
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main, sys.argv[1:])
