"""A trained model for inference, in one process without a process group: from a DCP checkpoint (any world size wrote
it) or from a `python -m smollm2.export --format safetensors` folder. What generate, export, the app and lm-eval load;
and its tokenizer, which travels with it (a `tokenizer.json` in the folder; none: GPT-2's).

Configs saved with a checkpoint or an export are read leniently (smollm2.config.load_saved_config): a key this version
does not know is dropped with a warning, so a checkpoint stays loadable when the schema changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from smollm2.checkpoint import load_weights, read_meta, resolve
from smollm2.config import Config, load_saved_config, model_config_from_dict
from smollm2.data.tokenizer import folder_tokenizer
from smollm2.errors import CheckpointError, one_line
from smollm2.model import SmolLM

INFO_FILE = "smollm2_export.json"  # step, tokens, parameters, val loss: the model card and the Space app read it


def is_safetensors_export(path: Path) -> bool:
    """A `python -m smollm2.export --format safetensors` folder (what load_model_for_inference reads besides DCP)."""
    return (path / "model.safetensors").is_file() and (path / "config.yaml").is_file()


def load_model_for_inference(spec: str | Path, device: torch.device | str = "cpu") -> tuple[SmolLM, Config, int]:
    """(model, config, step) from a checkpoint (a step directory, `latest`, a run directory) or a safetensors export."""
    if is_safetensors_export(Path(spec)):
        return _load_safetensors_export(Path(spec), device)
    path = resolve(str(spec), Path(spec))
    if path is None:
        raise CheckpointError(f"no complete checkpoint under {spec}")
    meta = read_meta(path)
    saved = path / "config.yaml"
    cfg = load_saved_config(saved) if saved.is_file() else load_saved_config(meta.get("config", {}), f"{path}/meta.json")
    cfg.model = model_config_from_dict(meta["model"])  # the shape the weights were saved in
    model = SmolLM(cfg.model)
    load_weights(path, model)
    return model.to(device).eval(), cfg, int(meta["step"])


def load_tokenizer_for_inference(spec: str | Path):
    """The tokenizer of what `load_model_for_inference(spec)` loads: the `tokenizer.json` its checkpoint (or safetensors
    export) carries, checked against the sha256 its meta.json (smollm2_export.json) recorded; GPT-2's without one."""
    if is_safetensors_export(Path(spec)):
        info = Path(spec) / INFO_FILE
        return folder_tokenizer(spec, json.loads(info.read_text()).get("tokenizer") if info.is_file() else None)
    path = resolve(str(spec), Path(spec))
    if path is None:
        raise CheckpointError(f"no complete checkpoint under {spec}")
    return folder_tokenizer(path, read_meta(path).get("tokenizer"))


def _load_safetensors_export(path: Path, device) -> tuple[SmolLM, Config, int]:
    """Our names, the padded table, the run's config."""
    from safetensors.torch import load_file

    cfg = load_saved_config(path / "config.yaml")
    model = SmolLM(cfg.model)
    try:
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    except Exception as err:  # noqa: BLE001 - a damaged file (SafetensorError), shapes of another config (RuntimeError)
        raise CheckpointError(f"cannot load {path / 'model.safetensors'}: {one_line(err)}") from None
    if unexpected or set(missing) - {"head.weight"}:  # the tied head is the embedding, stored once
        raise CheckpointError(f"{path / 'model.safetensors'} does not fit its config.yaml: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]} (of {len(missing)}, {len(unexpected)})")
    info = path / INFO_FILE
    step = int(json.loads(info.read_text())["step"]) if info.is_file() else 0
    return model.to(device).eval(), cfg, step
