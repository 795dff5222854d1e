"""Training-step benchmark: our step (FSDP2, mixed precision, activation checkpointing, compile: `smollm2.step.train_step`
on `build_model`) against a deliberately plain nanoGPT-style reference (`bench/reference.py`), in one process. From the
repository root:

    python -m bench.step                                     # CUDA: seed model, the target rows first; CPU: tiny config
    python -m bench.step --config configs/tiny.yaml --cases B=4,T=64,ac=none --json out.json
    python -m bench.step --cases B=8,T=2048,ac=none,sdpa=cudnn B=8,T=2048,ac=none,sdpa=flash --no-reference

A case is `key=value` pairs joined by commas: B (micro-batch), T (seq_len), accum (grad accumulation, default 1),
ac (none|full|selective), compile (true|false|whole), sdpa (default|flash|cudnn|efficient|math), reshard (true|false),
wrap (auto|block|root: train.fsdp_wrap),
ref (1: also time the reference on this (B, T, accum, compile), default for ac=none rows). Random tokens, no dataset.
Timing: median of the timed steps after warm-up (CUDA events on GPUs, wall clock on CPU); MFU against the bf16 (or fp32)
matmul peak measured in the same process; FLOPs per token 6N + 12*L*H*Q*T. Rows print as they finish; a table, the
targets (PASS/FAIL against `TARGETS` below) and JSON (`--json`, or `$OUT/bench.json` when $OUT is set) at the end.
`--budget-s` skips the cases that would start after that many seconds, so a time-boxed GPU run still prints its table.

Named proxies (`--proxy NAME`, see `PROXIES`) fix a config, overrides and cases; `--proxy host` is the GPU-free measure of
host overhead (issue 13): the seed model's structure (12 blocks, FSDP2 root, per-block compile) with tiny math, fp32 on
CPU, compile on for both, 3 interleaved rounds; options and overrides given on the command line still apply on top.
`--count-ops` (on for proxies) profiles one more step of each implementation after timing (`torch.profiler`, CPU
activity): aten ops, all profiler events and the profiled CPU time per step, in the table and the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.reference import GPTConfig, ReferenceTrainer
from smollm2.config import Config, load_config
from smollm2.distributed import DistEnv, init_distributed, shutdown
from smollm2.metrics import PEAK_TFLOPS, flops_per_token, peak_memory_gib
from smollm2.model import padded_vocab_size
from smollm2.optim import build_optimizer
from smollm2.parallelize import build_model
from smollm2.step import train_step

ROOT = Path(__file__).resolve().parents[1]  # presets are found from here too when run from another directory


@dataclass(frozen=True)
class Targets:
    """What PASS means (`evaluate_targets`). Ratios are tok/s over tok/s; MFU is against the matmul peak measured in the
    same process; the GPU targets are read on the B x T no-AC, full-AC and selective-AC rows of the default sweep."""

    cpu_min_ratio: float = 0.90  # CPU (tiny config, 1 process): ours vs the reference; FSDP2 at world size 1 costs a little
    gpu_batch: tuple[int, int] = (8, 2048)  # (B, T) of the GPU target rows
    gpu_min_ratio: float = 1.10  # no AC: ours vs the compiled reference
    gpu_min_mfu: float = 0.60  # no AC
    gpu_max_mem_gib: float = 9.0  # no AC, peak allocated (issue 13; was 12)
    full_ac_min_ratio: float = 0.80  # full AC vs no AC (issue 13; was 0.75)
    selective_ac_min_ratio: float = 0.95  # selective AC vs no AC (issue 13)
    host_proxy_min_ratio: float = 1.0  # `--proxy host`: ours vs the reference, median of the interleaved rounds' ratios


TARGETS = Targets()

GPU_CASES = [  # the targets' rows first; later rows are levers, skipped when --budget-s runs out
    "B=8,T=2048,ac=none,ref=1", "B=8,T=2048,ac=full", "B=8,T=2048,ac=selective",
    "B=8,T=2048,ac=none,wrap=block", "B=8,T=2048,ac=none,cpp=true", "B=8,T=2048,ac=none,compile=false,ref=1",
    "B=8,T=2048,ac=none,sdpa=cudnn", "B=8,T=2048,ac=none,sdpa=flash", "B=16,T=1024,ac=none,ref=1",
    "B=8,T=2048,ac=none,wrap=block,reshard=false",
]
CPU_CASES = ["ac=none,ref=1", "ac=full", "ac=selective"]


@dataclass(frozen=True)
class Proxy:
    """A named benchmark: what `--proxy NAME` sets (command-line options and overrides still apply on top)."""

    config: str
    cases: tuple[str, ...]
    overrides: tuple[str, ...]
    warmup: int = 3
    steps: int = 10
    rounds: int = 3
    about: str = ""


PROXIES = {
    "host": Proxy(  # issue 13: host overhead without a GPU; the seed model's structure, tiny math
        config="configs/smollm2_135.yaml", cases=("B=1,T=64,ac=none,ref=1,compile=true",),
        # each side's own CPU AdamW (ours foreach, nanoGPT's single-tensor); optim.fused=true fuses both alike
        overrides=("model.d_model=96", "model.d_mlp=384", "model.vocab_size=1024", "train.dtype=fp32", "data.seq_len=64",
                   "train.device=cpu"),
        about="12 blocks of d_model 96, vocab 1024, B=1 T=64, fp32, CPU, compile on for both: the step is host overhead"),
}


@dataclass(frozen=True)
class Case:
    micro_batch: int
    seq_len: int
    accum: int = 1
    ac: str = "none"
    compile: str = "auto"  # auto | true | false | whole
    sdpa: str = "default"
    reshard: bool | None = None  # None: the config's
    wrap: str | None = None  # None: the config's train.fsdp_wrap
    cpp: bool | None = None  # None: the config's train.cpp_wrapper
    reference: bool = False

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("sdpa", self.sdpa), ("reshard", self.reshard), ("wrap", self.wrap),
                                                 ("cpp", self.cpp)) if v not in ("default", None))
        return f"B={self.micro_batch} T={self.seq_len} accum={self.accum} ac={self.ac} compile={self.compile}{extra}"


def parse_case(spec: str, cfg: Config) -> Case:
    fields = dict(micro_batch=cfg.data.micro_batch, seq_len=cfg.data.seq_len, accum=1, ac="none", compile="auto",
                  sdpa="default", reshard=None, wrap=None, cpp=None, reference=False)
    names = {"B": "micro_batch", "T": "seq_len", "accum": "accum", "ac": "ac", "compile": "compile", "sdpa": "sdpa",
             "reshard": "reshard", "wrap": "wrap", "cpp": "cpp", "ref": "reference"}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in names or not value:
            raise SystemExit(f"bench: bad case item {item!r} in {spec!r}; keys: {', '.join(names)}")
        name = names[key]
        if name in ("micro_batch", "seq_len", "accum"):
            fields[name] = int(value)
        elif name in ("reshard", "reference", "cpp"):
            fields[name] = value.lower() in ("1", "true", "yes")
        else:
            fields[name] = value.lower()
    case = Case(**fields)
    if case.ac not in ("none", "full", "selective") or case.compile not in ("auto", "true", "false", "whole"):
        raise SystemExit(f"bench: bad ac/compile in {spec!r}")
    if case.sdpa not in ("default", "flash", "cudnn", "efficient", "math"):
        raise SystemExit(f"bench: bad sdpa in {spec!r}")
    if case.wrap not in (None, "auto", "block", "root"):
        raise SystemExit(f"bench: bad wrap in {spec!r} (auto | block | root)")
    return case


# ------------------------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Milliseconds of each timed step (after `warmup` untimed ones). CUDA events recorded around each step, read once at
    the end (the step itself never syncs with the host); wall clock on CPU."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    return times


def time_alternating(steps_fns: list, device: torch.device, warmup: int, steps: int) -> list[list[float]]:
    """Milliseconds of each timed step of each function, the functions taking turns step by step (A B A B ...), so a
    burst of load from another process lands on all of them alike; `warmup` untimed turns first."""
    for _ in range(warmup):
        for fn in steps_fns:
            fn()
    synchronize(device)
    if device.type == "cuda":
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
                  for _ in steps_fns]
        for i in range(steps):
            for fn, fn_events in zip(steps_fns, events):
                fn_events[i][0].record()
                fn()
                fn_events[i][1].record()
        torch.cuda.synchronize(device)
        return [[start.elapsed_time(end) for start, end in fn_events] for fn_events in events]
    times: list[list[float]] = [[] for _ in steps_fns]
    for _ in range(steps):
        for fn, fn_times in zip(steps_fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(1000 * (time.perf_counter() - start))
    return times


def count_ops(step, device: torch.device) -> dict:
    """One more step under `torch.profiler` (CPU activity): dispatched aten ops, all profiler events (aten ops, autograd
    nodes, compiled-graph calls, record_function ranges), the profiled CPU time (sum of self times) and wall time."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        synchronize(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    return {"aten_ops": sum(a.count for a in averages if a.key.startswith("aten::")),
            "profiler_events": sum(a.count for a in averages),
            "profiled_cpu_ms": sum(a.self_cpu_time_total for a in averages) / 1000, "profiled_wall_ms": 1000 * wall}


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's dense matmul throughput in this process (bf16 on GPUs): best of a few timed runs."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 5
    best = float("inf")
    for _ in range(3):
        times = time_steps(lambda: torch.mm(a, b), device, warmup=2, steps=reps)
        best = min(best, statistics.median(times))
    return 2 * n**3 / (best / 1000) / 1e12


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextmanager
def sdpa_backend(choice: str, device: torch.device):
    """Restrict SDPA to one backend for the case (global flags: read when a compiled graph is traced)."""
    if choice == "default" or device.type != "cuda":
        yield
        return
    b = torch.backends.cuda
    flags = {"flash": b.flash_sdp_enabled(), "efficient": b.mem_efficient_sdp_enabled(), "math": b.math_sdp_enabled(),
             "cudnn": b.cudnn_sdp_enabled()}
    setters = {"flash": b.enable_flash_sdp, "efficient": b.enable_mem_efficient_sdp, "math": b.enable_math_sdp,
               "cudnn": b.enable_cudnn_sdp}
    try:
        for name, setter in setters.items():
            setter(name == choice)
        yield
    finally:
        for name, setter in setters.items():
            setter(flags[name])


def random_batches(case: Case, vocab: int, device: torch.device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, vocab, (case.accum, case.micro_batch, case.seq_len + 1), generator=generator)
    windows = windows.to(device)
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]


# -------------------------------------------------------------------------------------------------------- the two runs


def case_config(cfg: Config, case: Case) -> Config:
    # train.compile: None = auto (on for CUDA); "whole" compiles the model from outside build_model, so not per block
    compile_setting = {"auto": None, "true": True, "false": False, "whole": False}[case.compile]
    train = replace(cfg.train, activation_checkpointing=case.ac, grad_accum=case.accum, compile=compile_setting,
                    reshard_after_forward=cfg.train.reshard_after_forward if case.reshard is None else case.reshard,
                    fsdp_wrap=cfg.train.fsdp_wrap if case.wrap is None else case.wrap,
                    cpp_wrapper=cfg.train.cpp_wrapper if case.cpp is None else case.cpp)
    return replace(cfg, train=train, data=replace(cfg.data, micro_batch=case.micro_batch, seq_len=case.seq_len))


def compile_on(case: Case, device: torch.device) -> bool:
    return case.compile in ("true", "whole") or (case.compile == "auto" and device.type == "cuda")


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
        self.n_params = self.model.num_params()

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
    tflops = tok_per_s * flops_per_token(n_params, m.n_layer, m.n_head, m.d_model // m.n_head, case.seq_len) / 1e12
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


# ------------------------------------------------------------------------------------------------------------- targets


def _find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _ratio(row: dict | None) -> float | None:
    """Ours / reference tok/s: the median of the interleaved rounds' ratios when there were several, else the row's."""
    if row is None:
        return None
    return statistics.median(row["round_ratios"]) if row.get("round_ratios") else row["ratio_to_reference"]


def evaluate_targets(rows: list[dict], device: torch.device, targets: Targets = TARGETS,
                     proxy: str | None = None) -> list[dict]:
    """Each target PASS / FAIL / n/a (a row it needs is missing)."""
    def line(name, ok, value):
        return {"target": name, "status": "n/a" if ok is None else ("PASS" if ok else "FAIL"), "value": value}

    t = targets
    if proxy == "host":
        ratio = _ratio(_find([r for r in rows if r.get("error") is None], impl="smollm2", activation_checkpointing="none"))
        return [line(f"host proxy: smollm2 tok/s >= {t.host_proxy_min_ratio:.2f}x reference (median of rounds)",
                     None if ratio is None else ratio >= t.host_proxy_min_ratio, ratio)]
    ours = [r for r in rows if r["impl"] == "smollm2" and r["sdpa"] == "default" and r["reshard_after_forward"] is None
            and r.get("fsdp_wrap") is None and r["accum"] == 1 and r.get("error") is None]
    if device.type != "cuda":
        base = _find(ours, activation_checkpointing="none", compile="auto")
        ratio = base and base["ratio_to_reference"]
        return [line(f"CPU: smollm2 tok/s >= {t.cpu_min_ratio:.2f}x reference (1 process)",
                     None if ratio is None else ratio >= t.cpu_min_ratio, ratio)]
    B, T = t.gpu_batch
    compiled = {"compile": "auto", "micro_batch": B, "seq_len": T}
    none = _find(ours, activation_checkpointing="none", **compiled)
    full = _find(ours, activation_checkpointing="full", **compiled)
    selective = _find(ours, activation_checkpointing="selective", **compiled)
    ratio = _ratio(none)
    out = [line(f"B={B} T={T} no AC: tok/s >= {t.gpu_min_ratio:.2f}x reference (median of rounds)",
                None if ratio is None else ratio >= t.gpu_min_ratio, ratio),
           line(f"B={B} T={T} no AC: MFU >= {t.gpu_min_mfu:.2f} (measured peak)",
                None if none is None else none["mfu"] >= t.gpu_min_mfu, none and none["mfu"]),
           line(f"B={B} T={T} no AC: peak memory <= {t.gpu_max_mem_gib:g} GiB",
                None if none is None else none["peak_mem_gib"] <= t.gpu_max_mem_gib, none and none["peak_mem_gib"])]
    full_ratio = full["tok_per_s"] / none["tok_per_s"] if full and none else None
    out.append(line(f"full AC: tok/s >= {t.full_ac_min_ratio:.2f}x no AC",
                    None if full_ratio is None else full_ratio >= t.full_ac_min_ratio, full_ratio))
    sel_ratio = selective["tok_per_s"] / none["tok_per_s"] if selective and none else None
    between = None if not (selective and full and none) else (  # 1-2% slack: run-to-run noise, not a target
        full["tok_per_s"] <= selective["tok_per_s"] <= none["tok_per_s"] * 1.01
        and full["peak_mem_gib"] <= selective["peak_mem_gib"] * 1.01 <= none["peak_mem_gib"] * 1.02)
    out.append(line(f"selective AC: tok/s >= {t.selective_ac_min_ratio:.2f}x no AC",
                    None if sel_ratio is None else sel_ratio >= t.selective_ac_min_ratio, sel_ratio))
    out.append(line("selective AC: between full and none (tok/s and memory)", between, sel_ratio))
    ref = _find(rows, impl="reference", **{"micro_batch": B, "seq_len": T, "compile": "true"})
    out.append(line("info: reference MFU (nanoGPT on H200: 0.545)", None, ref and ref["mfu"]))
    return out


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


def main(argv: list[str] | None = None) -> int:
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

    started = time.perf_counter()
    main_rank = env.is_main
    peak_dtype = torch.bfloat16 if (device.type == "cuda" or cfg.train.dtype == "bf16") else torch.float32
    peak = matmul_peak_tflops(device, peak_dtype)
    info = environment(device)
    if main_rank:
        print(f"bench | {config} | {info} | world size {env.world_size} | dtype {cfg.train.dtype} | "
              f"measured {str(peak_dtype).removeprefix('torch.')} matmul peak {peak:.4g} TFLOP/s | "
              f"warmup {args.warmup}, timed {args.steps} x {args.rounds} round(s)", flush=True)
    rows: list[dict] = []
    reference_cache: dict = {}
    previous_sdpa = "default"
    for case in cases:
        elapsed = time.perf_counter() - started
        if args.budget_s is not None and elapsed > args.budget_s:
            rows.append({"impl": "smollm2", "case": case.label, "error": f"skipped: budget {args.budget_s:.0f}s spent",
                         "sdpa": case.sdpa, "reshard_after_forward": case.reshard, "fsdp_wrap": case.wrap,
                         "accum": case.accum})
            continue
        if case.sdpa != previous_sdpa or case.compile == "whole":  # compiled graphs bake the attention kernel in
            torch._dynamo.reset()
        previous_sdpa = case.sdpa
        try:
            new = run_case(case, cfg, env, args, peak, reference_cache)
        except Exception as err:  # noqa: BLE001 - one failing lever must not lose the table
            new = [{"impl": "smollm2", "case": case.label, "error": f"{type(err).__name__}: {str(err)[:300]}",
                    "sdpa": case.sdpa, "reshard_after_forward": case.reshard, "fsdp_wrap": case.wrap,
                    "accum": case.accum}]
            reset_memory(device)
        rows.extend(new)
        if main_rank:
            for row in new:
                status = row.get("error") or (f"{row['step_ms']:.2f} ms, {row['tok_per_s']:,.0f} tok/s, "
                                              f"x ref {_fmt(row['ratio_to_reference'], '.3f')}")
                print(f"[{time.perf_counter() - started:6.0f}s] {row['impl']:<9} {case.label}: {status}", flush=True)
    targets = evaluate_targets(rows, device, proxy=args.proxy)
    result = {"config": config, "overrides": args.overrides, "environment": info, "world_size": env.world_size,
              "matmul_peak_tflops": peak, "matmul_peak_dtype": str(peak_dtype).removeprefix("torch."),
              "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "proxy": args.proxy, "rows": rows,
              "targets": targets,
              "elapsed_s": time.perf_counter() - started}
    if main_rank:
        print()
        print_table(rows)
        print()
        for t in targets:
            print(f"{t['status']:<5} {t['target']}: {_fmt(t['value'], '.3f')}")
        out = args.json or (os.path.join(os.environ["OUT"], "bench.json") if os.environ.get("OUT") else None)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=1))
            print(f"wrote {out}")
    shutdown()
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main, sys.argv[1:])
