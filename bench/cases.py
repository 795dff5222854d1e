"""What `python -m bench.step` measures and what PASS means: the case specs (`Case`, `parse_case`, the default sweeps),
a case's config and random inputs (`case_config`, `random_batches`), the named proxies (`PROXIES`) and the targets
(`TARGETS`, `evaluate_targets`)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

import torch

from smollm2.config import Config

GPU_CASES = [  # the targets' rows first; later rows are levers, skipped when --budget-s runs out
    "B=8,T=2048,ac=none,ref=1", "B=8,T=2048,ac=full", "B=8,T=2048,ac=selective",
    "B=8,T=2048,ac=none,wrap=block", "B=8,T=2048,ac=none,cpp=true", "B=8,T=2048,ac=none,compile=false,ref=1",
    "B=8,T=2048,ac=none,sdpa=cudnn", "B=8,T=2048,ac=none,sdpa=flash", "B=16,T=1024,ac=none,ref=1",
    "B=8,T=2048,ac=none,wrap=block,reshard=false",
]
CPU_CASES = ["ac=none,ref=1", "ac=full", "ac=selective"]


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


def case_config(cfg: Config, case: Case) -> Config:
    # train.compile: None = auto (on for CUDA); "whole" compiles the model from outside build_model, so not per block
    compile_setting = {"auto": None, "true": True, "false": False, "whole": False}[case.compile]
    train = replace(cfg.train, activation_checkpointing=case.ac, grad_accum=case.accum, compile=compile_setting,
                    reshard_after_forward=cfg.train.reshard_after_forward if case.reshard is None else case.reshard,
                    fsdp_wrap=cfg.train.fsdp_wrap if case.wrap is None else case.wrap,
                    cpp_wrapper=cfg.train.cpp_wrapper if case.cpp is None else case.cpp)
    return replace(cfg, train=train, data=replace(cfg.data, micro_batch=case.micro_batch, seq_len=case.seq_len))


def random_batches(case: Case, vocab: int, device: torch.device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, vocab, (case.accum, case.micro_batch, case.seq_len + 1), generator=generator)
    windows = windows.to(device)
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]


def compile_on(case: Case, device: torch.device) -> bool:
    return case.compile in ("true", "whole") or (case.compile == "auto" and device.type == "cuda")


# --------------------------------------------------------------------------------------------------------------- proxies


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
    "host": Proxy(  # host overhead without a GPU: the seed model's structure, tiny math
        config="configs/smollm2_135.yaml", cases=("B=1,T=64,ac=none,ref=1,compile=true",),
        # each side's own CPU AdamW (ours foreach, nanoGPT's single-tensor); optim.fused=true fuses both alike
        overrides=("model.d_model=96", "model.d_mlp=384", "model.vocab_size=1024", "train.dtype=fp32", "data.seq_len=64",
                   "train.device=cpu"),
        about="12 blocks of d_model 96, vocab 1024, B=1 T=64, fp32, CPU, compile on for both: the step is host overhead"),
    # The reference has no GQA or SwiGLU: this one is compared with `host` (ours), run alternately (bench/NOTES.md)
    "host-llama": Proxy(
        config="configs/smollm2_135m_llama.yaml", cases=("B=1,T=64,ac=none,ref=0,compile=true",),
        overrides=("model.d_model=144", "model.d_mlp=384", "model.vocab_size=1024", "train.dtype=fp32",
                   "data.seq_len=64", "train.device=cpu"),
        about="SmolLM2-135M's structure (30 blocks, 9 heads / 3 KV heads, SwiGLU, RMSNorm) with tiny math, as `host`"),
}


# --------------------------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Targets:
    """What PASS means (`evaluate_targets`). Ratios are tok/s over tok/s; MFU is against the matmul peak measured in the
    same process; the GPU targets are read on the B x T no-AC, full-AC and selective-AC rows of the default sweep."""

    cpu_min_ratio: float = 0.90  # CPU (tiny config, 1 process): ours vs the reference; FSDP2 at world size 1 costs a little
    gpu_batch: tuple[int, int] = (8, 2048)  # (B, T) of the GPU target rows
    gpu_min_ratio: float = 1.10  # no AC: ours vs the compiled reference
    gpu_min_mfu: float = 0.60  # no AC
    gpu_max_mem_gib: float = 9.0  # no AC, peak allocated
    full_ac_min_ratio: float = 0.80  # full AC vs no AC
    selective_ac_min_ratio: float = 0.95  # selective AC vs no AC
    host_proxy_min_ratio: float = 1.0  # `--proxy host`: ours vs the reference, median of the interleaved rounds' ratios


TARGETS = Targets()


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
