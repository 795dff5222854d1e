"""Ship a checkpoint: a Hugging Face `transformers` folder, one consolidated safetensors file, or a Space.

    python -m smollm2.export --checkpoint runs/x/checkpoints/latest --out export/hf                    # transformers
    python -m smollm2.export --checkpoint runs/x --out export/st --format safetensors                  # our names
    python -m smollm2.export --checkpoint runs/x --out export/space --format space [--push user/space] # Gradio Space

`hf` is a class `transformers` loads with no custom code (smollm2/serve/hf_mapping.py holds the mapping): the spec's
model is GPT-NeoX's sequential-residual variant (rotate-half RoPE over the whole head dim, LayerNorm with bias, biases on
every linear, tied embeddings, tanh GELU: only the fused QKV rows are regrouped per head), a Llama-style model
(model.norm=rmsnorm, mlp=swiglu, bias=false; any n_kv_head) is LlamaForCausalLM, and another combination is refused
before anything is written. The storage padding of the vocabulary is stripped (50,258 rows). The activation is
"gelu_pytorch_tanh", i.e. the very `F.gelu(approximate="tanh")` call our MLP makes ("gelu_new" is the same function
written out in Python ops, 1e-7 apart): fp32 logits agree exactly. Every folder is written under a temporary name beside
OUT and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from smollm2.checkpoint import read_meta, resolve
from smollm2.config import Config, ModelConfig, to_yaml
from smollm2.data.tokenizer import EOS_ID, PAD_ID, TOKENIZER_FILE
from smollm2.errors import UserError
from smollm2.files import publish_folder, read_jsonl
from smollm2.serve.hf_mapping import LLAMA, NEOX, architecture, hf_config, legacy_config_keys, memory_names, to_hf
from smollm2.serve.loading import INFO_FILE, is_safetensors_export, load_model_for_inference, load_tokenizer_for_inference

FORMATS = ("hf", "safetensors", "space")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The spec's sampling defaults; pad suppressed because our sampler never emits it either.
GENERATION = {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "max_new_tokens": 100,
              "bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "suppress_tokens": [PAD_ID]}
SPACE_APP = Path(__file__).with_name("space_app.py")


def generation_settings(tok=None) -> dict:
    """generation_config.json: GENERATION with the checkpoint's tokenizer's EOS and pad (GPT-2's: GENERATION as it is);
    pad is suppressed unless it is EOS (a tokenizer without a pad token pads with EOS)."""
    if tok is None or tok.sha256 is None:
        return GENERATION
    return {**GENERATION, "bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
            "suppress_tokens": [tok.pad_id] if tok.pad_id != tok.eos_id else []}


def token_ids(tok=None) -> dict[str, int]:
    """bos/eos/pad_token_id of a transformers config: the tokenizer's (BOS = EOS, GPT-2's convention)."""
    return {k: v for k, v in generation_settings(tok).items() if k.endswith("_token_id")}


class ExportError(UserError):
    pass


def _log(message: str) -> None:
    print(f"export: {message}", file=sys.stderr, flush=True)


def hf_model_config(cfg: ModelConfig, dtype: str = "fp32", tok=None):
    """The `transformers` config (GPT-NeoX or Llama: hf_mapping.architecture) that computes what our model computes, with
    the token ids of `tok`, the checkpoint's tokenizer (default GPT-2's)."""
    return hf_config(cfg, token_ids(tok), dtype)


def find_hf_folder(spec: str | Path) -> Path | None:
    """SPEC itself if it is a `transformers` export, or its `model/` if it is a Space folder; None otherwise."""
    for folder in (Path(spec), Path(spec) / "model"):
        if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
            return folder
    return None


def run_info(spec: str) -> tuple[Path, dict]:
    """The checkpoint a spec means (or a `safetensors` export folder), and what the card shows: tokens seen and the
    run's val loss at that step (the last eval at or before it in <run_dir>/eval.jsonl; None without one)."""
    if is_safetensors_export(Path(spec)):
        saved = json.loads((Path(spec) / INFO_FILE).read_text()) if (Path(spec) / INFO_FILE).is_file() else {}
        return Path(spec), {"source_checkpoint": saved.get("source_checkpoint", str(Path(spec).resolve())),
                            "val_loss": saved.get("val_loss"), "tokens_seen": saved.get("tokens_seen")}
    if (Path(spec) / "config.json").is_file():
        raise ExportError(f"{spec} is already a transformers export; pass a checkpoint, a run directory or a "
                          "safetensors export")
    path = resolve(str(spec), Path(spec))
    if path is None:
        raise ExportError(f"no complete checkpoint under {spec}")
    info: dict = {"source_checkpoint": str(path), "val_loss": None, "tokens_seen": None}
    if (path / "train_state.json").is_file():
        info["tokens_seen"] = json.loads((path / "train_state.json").read_text()).get("tokens_seen")
    evals = path.parent.parent / "eval.jsonl"  # <run_dir>/checkpoints/step-N -> <run_dir>/eval.jsonl
    if evals.is_file():
        step = int(read_meta(path)["step"])
        before = [r for r in read_jsonl(evals) if r["step"] <= step and "val_loss" in r]  # torn lines skipped
        info["val_loss"] = before[-1]["val_loss"] if before else None
    return path, info


def _architecture_card(m: ModelConfig) -> dict[str, str]:
    """What the model card says about the architecture, by the class it is exported as (the spec model's card reads as
    it always has)."""
    kv = f", {m.kv_heads} KV heads" if m.kv_heads != m.n_head else ""
    if architecture(m) == NEOX:
        return {"tag": "gpt-neox", "what": "A GPT-2-small-style decoder with rotary position embeddings", "as": "GPT-NeoX",
                "mlp": f"{m.d_model} -> {m.d_mlp} -> {m.d_model}, GELU (tanh)", "kv": kv}
    return {"tag": "llama", "what": "A Llama-style decoder (RMSNorm, SwiGLU, rotary position embeddings)",
            "as": LLAMA, "mlp": f"{m.d_model} -> 2 x {m.d_mlp} -> {m.d_model}, SwiGLU; RMSNorm (eps {m.norm_eps:g}), "
                                "no biases", "kv": kv}


def _model_card(cfg: Config, info: dict) -> str:
    m, o, arch = cfg.model, cfg.optim, _architecture_card(cfg.model)
    val = f"{info['val_loss']:.4f}" if info.get("val_loss") is not None else "n/a"
    tokens = f"{info['tokens_seen']:,}" if info.get("tokens_seen") is not None else "n/a"
    return f"""---
library_name: transformers
license: mit
pipeline_tag: text-generation
tags: [smollm2, {arch['tag']}, causal-lm, pretraining, rope]
---

# SmolLM2 ({info['n_params']:,} parameters), step {info['step']:,}

{arch['what']}, pretrained with smollm2 (FSDP2) and exported as {arch['as']},
so `transformers` loads it with no custom code (no `trust_remote_code`).

| | |
|---|---|
| parameters | {info['n_params']:,} |
| layers / width / heads | {m.n_layer} / {m.d_model} / {m.n_head} x {m.head_dim}{arch['kv']} |
| MLP | {arch['mlp']} |
| context | {m.max_seq_len:,} tokens, RoPE (theta {m.rope_theta:g}, whole head dim) |
| vocabulary | {m.vocab_size:,} ({_tokenizer_line(info.get("tokenizer"))}) |
| training | step {info['step']:,}, {tokens} tokens seen, {cfg.train.dtype} compute |
| optimizer | AdamW, lr {o.lr:g}, betas {o.beta1:g}/{o.beta2:g}, weight decay {o.weight_decay:g}, clip {o.grad_clip:g} |
| schedule | {o.schedule}, warmup {o.warmup_steps}, horizon {o.decay_steps}, floor {o.min_lr_ratio:g} x lr |
| batch per step | {cfg.data.micro_batch} x {cfg.train.grad_accum} (x ranks) windows of {cfg.data.seq_len} tokens |
| final val loss | {val} |
| weights | {info['dtype']} |

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("PATH_OR_REPO")
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")
ids = tok("To be, or not to be", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids)[0]))  # generation_config.json: T 1.0, top-k 50, top-p 0.95, 100 new tokens
```
"""


def _tokenizer_line(tok: dict | None) -> str:
    if tok is None:
        return f"GPT-2 BPE + `<|pad|>` = {PAD_ID}; EOS = {EOS_ID}"
    return f"tokenizer `{tok['name']}`, {tok['vocab_size']:,} ids; EOS = {tok['eos_id']}, pad = {tok['pad_id']}"


def _write_hf(out: Path, model, cfg: Config, info: dict, dtype: str, tok=None) -> None:
    import transformers
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    from smollm2.serve.hf_tokenizer import save_hf_tokenizer

    hf_logging.disable_progress_bar()
    config = hf_model_config(cfg.model, dtype, tok)
    arch = config.architectures[0]
    hf_class = getattr(transformers, arch)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in hf_class(config).parameters())  # the tied head counted once
    if n_params != model.num_params():
        raise ExportError(f"the {arch} config has {n_params:,} parameters, the checkpoint {model.num_params():,}")
    hf = hf_class(config)
    missing, unexpected = hf.load_state_dict(memory_names(to_hf(model.state_dict(), cfg.model), hf.state_dict()),
                                             strict=False)
    if unexpected or set(missing) - ({"lm_head.weight", "embed_out.weight"} if cfg.model.tie_embeddings else set()):
        raise ExportError(f"the weights do not map onto {arch}: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    _log(f"writing {n_params:,} parameters ({dtype}) as {arch} to {out.name}/model.safetensors")
    hf.to(DTYPES[dtype]).save_pretrained(str(out))
    config_file = out / "config.json"  # transformers 4.x reads the rotary settings under their old names
    saved = json.loads(config_file.read_text())
    saved.update(legacy_config_keys(cfg.model))
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    GenerationConfig(**generation_settings(tok)).save_pretrained(str(out))
    if tok is not None and tok.sha256 is not None:  # the checkpoint's own tokenizer.json, byte for byte
        tok.save(out, cfg.model.max_seq_len)
        _log(f"{TOKENIZER_FILE} copied from the checkpoint ({tok.name}, {tok.vocab_size:,} ids)")
    else:
        took = save_hf_tokenizer(out, cfg.model.max_seq_len)
        _log(f"tokenizer.json built from the bundled BPE ranks ({took:.1f}s)")
    (out / "README.md").write_text(_model_card(cfg, info))
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _write_space(out: Path, model, cfg: Config, info: dict, dtype: str, tok=None) -> None:
    import gradio

    if not SPACE_APP.is_file():
        raise ExportError(f"{SPACE_APP} is missing: reinstall the package (pip install -e .)")
    _write_hf(out / "model", model, cfg, info, dtype, tok)
    kind = {NEOX: "GPT-NeoX", LLAMA: "Llama"}[architecture(cfg.model)]
    shutil.copyfile(SPACE_APP, out / "app.py")
    (out / "requirements.txt").write_text("gradio\ntransformers\ntorch\nsafetensors\n")
    (out / "README.md").write_text(f"""---
title: SmolLM2 step {info['step']}
emoji: 📜
colorFrom: indigo
colorTo: gray
sdk: gradio
sdk_version: {gradio.__version__}
app_file: app.py
pinned: false
license: mit
---

SmolLM2 ({info['n_params']:,} parameters, step {info['step']:,}): type a prompt, get a sampled continuation. The model
is in `model/` (a `transformers` {kind} folder with its own model card). Locally: `pip install -r requirements.txt &&
python app.py`.
""")
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def write_safetensors(out: Path, model, cfg: Config, info: dict, dtype: str, tok=None) -> None:
    """Our own parameter names, the padded table as stored (so the round trip is bit-exact), the tied head once, and the
    checkpoint's tokenizer.json if it has one; `load_model_for_inference(out)` (and `load_tokenizer_for_inference`)
    read it back. `info` needs at least the step."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    _log(f"writing {len(state)} tensors ({dtype}) to {out.name}/model.safetensors")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "step": str(info["step"])})
    (out / "config.yaml").write_text(to_yaml(cfg))
    if tok is not None and tok.sha256 is not None:
        (out / TOKENIZER_FILE).write_bytes(tok.raw)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _holds_a_run(folder: Path) -> bool:
    """Whether a folder holds, at any depth, a training run or a checkpoint (what `--force` never replaces)."""
    markers = {"checkpoints", "metrics.jsonl", ".metadata", "COMPLETE", "meta.json", "train_state.json"}
    return any(markers.intersection(dirs) or markers.intersection(files) for _, dirs, files in os.walk(folder))


def _check_out(out: Path, source: Path, force: bool) -> None:
    """Refuse, before anything is loaded or written, an `out` that would overwrite the source, a run, or a folder that is
    not an earlier export (--force replaces only those), or that cannot be written."""
    out_r, src_r = out.resolve(), source.resolve()
    if out_r == src_r or out_r in src_r.parents or src_r in out_r.parents:
        where = "is" if out_r == src_r else "contains" if out_r in src_r.parents else "lies inside"
        raise ExportError(f"--out {out} {where} the checkpoint being exported ({source}): choose a folder outside it")
    if out.exists() or out.is_symlink():
        if out.is_dir() and _holds_a_run(out):
            raise ExportError(f"--out {out} holds a training run or a checkpoint, which --force never replaces: choose "
                              "another --out")
        if not out.is_dir() or any(out.iterdir()):
            if not force:
                raise ExportError(f"{out} exists and is not empty: choose another --out, or pass --force to replace it")
            if not (out / INFO_FILE).is_file():
                raise ExportError(f"--out {out} is not an earlier export (no {INFO_FILE}), and --force replaces only "
                                  "one: choose another --out")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(f"{ancestor} is not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".smollm2-probe-", dir=ancestor))  # can a folder be made there?
    except OSError as err:
        raise ExportError(f"cannot write --out {out}: {err.strerror or err}"
                          f"{f' ({ancestor})' if err.strerror else ''}") from None


def export(spec: str, out: str | Path, fmt: str = "hf", dtype: str = "fp32", force: bool = False) -> Path:
    """Write the export of the checkpoint `spec` to `out` and return `out`. Refuses a non-empty `out` unless `force`, and
    always an `out` that is, holds or lies in the checkpoint, or holds a run."""
    if fmt not in FORMATS or dtype not in DTYPES:
        raise ExportError(f"format must be one of {', '.join(FORMATS)} and dtype one of {', '.join(DTYPES)}")
    out = Path(out)
    path, info = run_info(spec)
    _check_out(out, path, force)
    _log(f"loading {path}")
    model, cfg, step = load_model_for_inference(path)
    if fmt != "safetensors":
        architecture(cfg.model)  # a model no transformers class runs without custom code: refused before any write
    info.update(step=step, n_params=model.num_params(), max_seq_len=cfg.model.max_seq_len, format=fmt, dtype=dtype)
    tok = load_tokenizer_for_inference(path)  # the checkpoint's (GPT-2's if it carries none)
    if tok.sha256 is not None:
        info["tokenizer"] = tok.describe()
    write = {"hf": _write_hf, "safetensors": write_safetensors, "space": _write_space}[fmt]
    publish_folder(out, lambda tmp: write(tmp, model, cfg, info, dtype, tok))
    _log(f"{fmt} ({dtype}) of step {step} written to {out}")
    return out


def push(out: Path, repo_id: str, fmt: str) -> None:
    """Upload the folder to the Hugging Face Hub: needs network and a token (`hf auth login` or HF_TOKEN)."""
    from huggingface_hub import HfApi

    repo_type = "space" if fmt == "space" else "model"
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type=repo_type, exist_ok=True, space_sdk="gradio" if fmt == "space" else None)
        api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type=repo_type)
    except Exception as err:  # noqa: BLE001 - offline, no token, no permission: one line; the folder stays
        raise ExportError(f"push to {repo_id} failed ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}); "
                          f"the export is complete in {out}: log in (hf auth login) or go online, then "
                          f"`hf upload {repo_id} {out} --repo-type {repo_type}`") from None
    _log(f"pushed {out} to https://huggingface.co/{'spaces/' if fmt == 'space' else ''}{repo_id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm2.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint dir, .../checkpoints/latest, or a run dir")
    parser.add_argument("--out", required=True, help="the folder to write (absent or empty, or pass --force)")
    parser.add_argument("--format", default="hf", choices=FORMATS)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--push", metavar="REPO_ID", help="then upload to the Hugging Face Hub (user/name)")
    args = parser.parse_args(argv)
    if args.push is not None:  # checked before the export, which takes a while
        if args.push.count("/") != 1:
            raise ExportError(f"--push takes a repo id like user/name (got {args.push!r})")
        from huggingface_hub import get_token

        if get_token() is None:
            raise ExportError("--push needs a Hugging Face token: `hf auth login`, or set HF_TOKEN")
    out = export(args.checkpoint, args.out, args.format, args.dtype, args.force)
    if args.push:
        push(out, args.push, args.format)
    print(out)
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
