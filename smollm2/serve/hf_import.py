"""A local Hugging Face `transformers` folder as a step-0 checkpoint of ours: `python -m smollm2.convert`.

    python -m smollm2.convert --from-hf path/to/SmolLM2-135M --out ckpt/smollm2-135m
    python -m smollm2.train --config configs/smollm2_135m_llama.yaml train.init_from=ckpt/smollm2-135m ...

It reads `LlamaForCausalLM` (SmolLM2-135M's class) and `GPTNeoXForCausalLM` as our export writes it (sequential
residual, rotary over the whole head; smollm2/serve/hf_mapping.py holds the one table of names both directions share),
in safetensors only: a `pytorch_model.bin` is a pickle, and loading runs no code.
`GPT2LMHeadModel` is refused: its learned position embeddings have no counterpart in a RoPE-only model. So is every
setting our model would compute differently (rope scaling, sliding windows, Llama biases, NeoX's parallel residual or
partial rotary, a tied head that differs from the embedding), in one line naming the field, before anything is written.

The route is the one a run's own checkpoints take: our SmolLM is built on the CPU (fp32), the mapped weights are loaded
into it strictly, and Checkpointer.save (a one-process gloo group) writes a checkpoint with the model's weights only
(ModelWeights: no optimizer state, no data position; WEIGHTS_ONLY in its train state, so --resume refuses it and
`train.init_from` starts a new run from it). OUT is laid out like a run directory (`checkpoints/step-000000`, `latest`,
`config.yaml`), so `python -m smollm2.checkpoint verify OUT 0`, generate, export and init_from all take OUT. Its config
is the defaults with the model section read from config.json (max_seq_len = max_position_embeddings). The folder's
tokenizer.json (and tokenizer_config.json) is copied into the checkpoint, digested and described in its meta.json as
a trained run's is. Everything is written under a temporary name beside OUT and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from smollm2.checkpoint import Checkpointer, ModelWeights, file_digest, read_meta, step_dir_name
from smollm2.checkpoint.manager import WEIGHTS_ONLY
from smollm2.config import Config, Mlp, ModelConfig, Norm, to_yaml
from smollm2.data.tokenizer import TOKENIZER_FILE, HFTokenizer, TokenizerError
from smollm2.distributed import init_distributed, shutdown
from smollm2.errors import UserError, one_line
from smollm2.files import atomic_write_json, publish_folder
from smollm2.model import SmolLM
from smollm2.serve.hf_mapping import LLAMA, NEOX, NEOX_ACTS, OUTSIDE, file_names, from_hf
from smollm2.serve.loading import INFO_FILE

MARKER = "smollm2_convert.json"  # what marks OUT as a convert output: the only non-empty folder --force replaces
# Buffers older transformers versions saved with the weights: not parameters, recomputed by the model.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


class ConvertError(UserError):
    pass


def _log(message: str) -> None:
    print(f"convert: {message}", file=sys.stderr, flush=True)


def read_hf_config(folder: Path):
    """(architecture, the transformers config) of a supported folder; anything else is refused in one line."""
    file = folder / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConvertError(f"{file} is unreadable ({one_line(err)}): --from-hf takes a transformers model folder") from None
    arch = (raw.get("architectures") or [None])[0] if isinstance(raw, dict) else None
    if arch == "GPT2LMHeadModel":
        raise ConvertError(f"{file}: architectures GPT2LMHeadModel is not supported: GPT-2 adds learned position "
                           "embeddings (wpe) and our model has none (RoPE only), so no conversion computes the same "
                           "function; convert a LlamaForCausalLM or GPTNeoXForCausalLM model")
    if arch not in (LLAMA, NEOX):
        raise ConvertError(f"{file}: architectures {arch} is not supported: smollm2 converts LlamaForCausalLM and "
                           "GPTNeoXForCausalLM (as python -m smollm2.export writes them)")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its warnings about settings refused below would break the one-line error
    hf_logging.disable_progress_bar()
    config_class = getattr(transformers, {LLAMA: "LlamaConfig", NEOX: "GPTNeoXConfig"}[arch])
    try:
        return arch, config_class.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - a value transformers itself rejects: one line
        raise ConvertError(f"{file}: transformers cannot read it ({one_line(err)})") from None


def _rope(config) -> dict:
    """RoPE settings under transformers 5 (`rope_parameters`) or 4 (`rope_theta` / `rotary_emb_base`, `rope_scaling`,
    `rotary_pct`)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or getattr(config, "rotary_emb_base", 10000.0))
    params.setdefault("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _unsupported(arch: str, config, rope: dict) -> list[tuple[str, object, str]]:
    """(field, value, why) for every setting our model does not compute as the config says."""
    found = []
    if rope["rope_type"] != "default":
        found.append(("rope_scaling", rope["rope_type"], "our RoPE has no scaling"))
    if float(rope["partial_rotary_factor"]) != 1.0:
        found.append(("partial_rotary_factor", rope["partial_rotary_factor"], "ours rotates the whole head dim"))
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", window is not None) and window is not None:
        found.append(("sliding_window", window, "our attention is full causal"))
    if arch == LLAMA:
        for field in ("attention_bias", "mlp_bias"):
            if getattr(config, field, False):
                found.append((field, True, "a Llama-style model of ours has no biases"))
        if config.hidden_act != "silu":
            found.append(("hidden_act", config.hidden_act, "SwiGLU is silu"))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if head_dim * config.num_attention_heads != config.hidden_size:
            found.append(("head_dim", head_dim, "ours is hidden_size / num_attention_heads"))
    else:
        if config.use_parallel_residual:
            found.append(("use_parallel_residual", True, "our blocks are sequential"))
        if config.hidden_act not in NEOX_ACTS:
            found.append(("hidden_act", config.hidden_act, "ours is tanh GELU (gelu_pytorch_tanh)"))
        if not getattr(config, "attention_bias", True):
            found.append(("attention_bias", False, "a GPT-NeoX-style model of ours has biases on every layer"))
    return found


def model_config(arch: str, config, folder: Path) -> ModelConfig:
    """Our model section for the config: refused, naming the field, if our model would compute something else."""
    rope = _rope(config)
    if found := _unsupported(arch, config, rope):
        field, value, why = found[0]
        raise ConvertError(f"{folder / 'config.json'}: {field}={json.dumps(value)} is not supported ({why})")
    llama = arch == LLAMA
    kv = getattr(config, "num_key_value_heads", None) if llama else None
    cfg = ModelConfig(
        vocab_size=config.vocab_size, n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
        n_kv_head=None if kv in (None, config.num_attention_heads) else kv, d_model=config.hidden_size,
        d_mlp=config.intermediate_size, norm=Norm.rmsnorm if llama else Norm.layernorm, mlp=Mlp.swiglu if llama else Mlp.gelu,
        bias=not llama, tie_embeddings=bool(config.tie_word_embeddings), max_seq_len=config.max_position_embeddings,
        rope_theta=float(rope["rope_theta"]), norm_eps=float(config.rms_norm_eps if llama else config.layer_norm_eps),
        init_std=float(getattr(config, "initializer_range", 0.02)))
    try:
        cfg.check()
    except UserError as err:
        raise ConvertError(f"{folder / 'config.json'}: {err}") from None
    return cfg


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s) (one file, or the shards an index names)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        pickled = [p.name for p in folder.glob("*.bin")]
        raise ConvertError(f"{folder} holds no model.safetensors{f' (only {pickled[0]})' if pickled else ''}: only "
                           "safetensors is read (a .bin is a pickle, and loading runs no code); re-save it with "
                           "save_pretrained(..., safe_serialization=True)")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(str(file)))
        except Exception as err:  # noqa: BLE001 - missing shard, damaged file: one line
            raise ConvertError(f"cannot read {file}: {one_line(err)}") from None
    return {k: v for k, v in weights.items() if not k.endswith(IGNORED_SUFFIXES)}


def check_weights(weights: dict[str, torch.Tensor], arch: str, config, folder: Path) -> dict[str, torch.Tensor]:
    """The weights as the config's class holds them (names and shapes), fp32; the tied head dropped once it is shown to
    be the embedding."""
    import transformers

    with torch.device("meta"):
        expected = file_names({k: tuple(v.shape) for k, v in getattr(transformers, arch)(config).state_dict().items()},
                              arch)
    weights = file_names(weights, arch)
    head, embed = OUTSIDE[arch]["head.weight"], OUTSIDE[arch]["embed.weight"]
    if config.tie_word_embeddings:
        if head in weights and not torch.equal(weights[head], weights.get(embed, weights[head])):
            raise ConvertError(f"{folder / 'config.json'}: tie_word_embeddings=true, but the weights hold a {head} that "
                               f"differs from {embed}: set it to false if the head is its own")
        weights.pop(head, None)
        expected.pop(head, None)
    elif head not in weights:
        raise ConvertError(f"{folder / 'config.json'}: tie_word_embeddings=false, but the weights hold no {head}")
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    shapes = [f"{k} {tuple(weights[k].shape)} (config.json: {v})" for k, v in expected.items()
              if k in weights and tuple(weights[k].shape) != v]
    if missing or unexpected or shapes:
        raise ConvertError(f"the weights in {folder} do not fit its config.json: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}, shapes {shapes[:3]} (of {len(missing)}, {len(unexpected)}, {len(shapes)})")
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def _check_out(out: Path, source: Path, force: bool) -> None:
    """Refuse, before anything is read or written, an OUT that is the source folder or holds something other than an
    earlier convert output (--force replaces only that, and never one a run has trained in since)."""
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise ConvertError(f"--out {out} is or contains --from-hf {source}: choose a folder outside it")
    if not (out.exists() or out.is_symlink()) or (out.is_dir() and not any(out.iterdir())):
        return
    if not force:
        raise ConvertError(f"{out} exists and is not empty: choose another --out, or pass --force to replace an earlier "
                           "convert output")
    steps = {p.name for p in (out / "checkpoints").iterdir()} - {"latest"} if (out / "checkpoints").is_dir() else set()
    if not (out / MARKER).is_file() or steps - {step_dir_name(0)} or (out / "metrics.jsonl").exists():
        raise ConvertError(f"--out {out} is not an earlier convert output (no {MARKER}, or a run has trained in it), "
                           "and --force replaces only one: choose another --out")


@contextmanager
def _one_process():
    """A one-rank gloo group for Checkpointer.save (an in-process store; torchrun's environment is not needed)."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise ConvertError("python -m smollm2.convert runs in one process, not under torchrun")
    init_distributed("cpu")
    try:
        yield
    finally:
        shutdown()


def _copy_tokenizer(source: Path, checkpoint: Path) -> str | None:
    """The folder's tokenizer.json (and tokenizer_config.json) into the checkpoint, digested in its meta.json with the
    "tokenizer" entry a trained run's checkpoint has (name, vocab, EOS, pad, sha256); None if there is none, or if the
    folder is our export of a GPT-2 checkpoint (its tokenizer.json is the bundled BPE rebuilt: a checkpoint of the
    bundled GPT-2 carries none, so that a round trip still trains on data prepared without --tokenizer)."""
    info = source / INFO_FILE
    ours_gpt2 = info.is_file() and "tokenizer" not in json.loads(info.read_text())
    if not (source / TOKENIZER_FILE).is_file() or ours_gpt2:
        return None
    try:
        described = HFTokenizer(source / TOKENIZER_FILE, name=source.resolve().name).describe()
    except TokenizerError as err:
        raise ConvertError(f"{source / TOKENIZER_FILE}: {err}") from None
    meta = read_meta(checkpoint)
    for name in (TOKENIZER_FILE, "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, checkpoint / name)
            meta["files"][name] = file_digest(checkpoint / name)
    meta["files"] = dict(sorted(meta["files"].items()))
    atomic_write_json(checkpoint / "meta.json", {**meta, "tokenizer": described})
    return described["name"]


class _TrainState:
    """A converted checkpoint's train state: step 0, weights only (--resume refuses it), where it came from."""

    def __init__(self, source: Path):
        self.state = {"step": 0, "tokens_seen": 0, "logger_run_id": None, WEIGHTS_ONLY: True,
                      "converted_from": str(source.resolve())}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def _write(tmp: Path, model: SmolLM, cfg: Config, source: Path, arch: str) -> Path:
    """The checkpoint, its tokenizer, the run-directory config and the marker, into the temporary folder."""
    with _one_process():
        path = Checkpointer(tmp / "checkpoints", keep_last=0, rank=0, world_size=1).save(
            0, {"model": ModelWeights(model), "train": _TrainState(source)}, cfg)
    tokenizer = _copy_tokenizer(source, path)
    _log(f"tokenizer: {f'{TOKENIZER_FILE} copied ({tokenizer})' if tokenizer else 'GPT-2 (the folder has none of its own)'}")
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    (tmp / MARKER).write_text(json.dumps({"source": str(source), "architecture": arch, "step": 0,
                                          "checkpoint": str(path.relative_to(tmp)), "n_params": model.num_params()},
                                         indent=2) + "\n")
    return path


def convert(source: str | Path, out: str | Path, force: bool = False) -> Path:
    """`source` (a transformers folder) as a step-0 checkpoint under `out` (see the module docstring); returns `out`."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise ConvertError(f"--from-hf {source} is not a folder: give a local transformers model folder")
    _check_out(out, source, force)
    arch, config = read_hf_config(source)
    cfg = Config(model=model_config(arch, config, source))
    cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
    cfg.train.run_dir = str(out)
    theirs = check_weights(read_weights(source), arch, config, source)
    with torch.device("meta"):
        model = SmolLM(cfg.model)
    model.materialize("cpu")
    model.load_state_dict(from_hf(theirs, cfg.model, model.padded_vocab), strict=True)
    _log(f"{arch} with {model.num_params():,} parameters from {source}")
    publish_folder(out, lambda tmp: _write(tmp, model, cfg, source, arch))
    _log(f"step-0 checkpoint written to {out}: start a run from it with train.init_from={out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm2.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--from-hf", required=True, metavar="HF_DIR", help="a local transformers model folder")
    parser.add_argument("--out", required=True, metavar="CKPT_DIR", help="the folder to write (absent or empty)")
    parser.add_argument("--force", action="store_true", help="replace an earlier convert output at --out")
    args = parser.parse_args(argv)
    print(convert(args.from_hf, args.out, args.force))
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
