"""Hugging Face in both directions, offline: small random LlamaForCausalLM (grouped-query, tied and untied) and
GPTNeoXForCausalLM built with transformers' own classes and `save_pretrained`, imported (`python -m smollm2.convert`'s
code), compared with transformers logit for logit, exported back bit for bit, served and trained from (`train.init_from`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402
from tiny import SMALL, cli, records, train, word_level_tokenizer  # noqa: E402

from smollm2.checkpoint import read_meta, resolve  # noqa: E402
from smollm2.checkpoint.__main__ import main as checkpoint_main  # noqa: E402
from smollm2.config import GenerateConfig, Mlp, ModelConfig, Norm, load_config  # noqa: E402
from smollm2.data import Dataset, TrainLoader  # noqa: E402
from smollm2.data.tokenizer import EOS_ID, PAD_ID, get_tokenizer  # noqa: E402
from smollm2.errors import UserError  # noqa: E402
from smollm2.serve.export import export, hf_model_config  # noqa: E402
from smollm2.serve.generate import generate  # noqa: E402
from smollm2.serve.hf_import import MARKER, convert  # noqa: E402
from smollm2.serve.hf_mapping import architecture  # noqa: E402
from smollm2.serve.loading import load_model_for_inference, load_tokenizer_for_inference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V = 50258  # GPT-2 + pad: the test corpus's vocabulary, so that a converted model trains on it
TINY_LLAMA = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)  # configs/tiny_llama.yaml
NEOX = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
            use_parallel_residual=False, hidden_act="gelu_pytorch_tanh",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})
MODELS = {  # name: (transformers class, its config's arguments)
    "llama-gqa-tied": ("LlamaForCausalLM", {**TINY_LLAMA, "tie_word_embeddings": True}),
    "llama-mqa-untied": ("LlamaForCausalLM", {**TINY_LLAMA, "num_key_value_heads": 1, "tie_word_embeddings": False,
                                              "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default",
                                                                                       "rope_theta": 100000.0}}),
    "neox-tied": ("GPTNeoXForCausalLM", {**NEOX, "tie_word_embeddings": True}),  # as python -m smollm2.export writes it
    "neox-untied": ("GPTNeoXForCausalLM", {**NEOX, "tie_word_embeddings": False}),
}


def hf_config(name: str):
    model_class, kwargs = MODELS[name]
    config_class = getattr(transformers, model_class.replace("ForCausalLM", "Config"))
    return config_class(vocab_size=V, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                        architectures=[model_class], **kwargs)


def hf_model(name: str, seed: int = 0):
    """A random model of transformers' own class, every parameter (norms included) moved off its init by noise."""
    torch.manual_seed(seed)
    model = getattr(transformers, MODELS[name][0])(hf_config(name))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path, object]]:
    """name -> (its save_pretrained folder, its converted checkpoint, the transformers model)."""
    root, out = tmp_path_factory.mktemp("hf"), {}
    for name in MODELS:
        model = hf_model(name)
        model.save_pretrained(root / name)
        out[name] = (root / name, convert(root / name, root / f"{name}-ckpt"), model)
    return out


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory) -> dict[str, Path]:
    """name -> `python -m smollm2.export --format hf` of its converted checkpoint."""
    root = tmp_path_factory.mktemp("export")
    return {name: export(str(ckpt), root / name) for name, (_, ckpt, _) in converted.items()}


def max_diffs(ours, theirs, lengths=(1, 29, 128)) -> dict[int, float]:
    """The largest |logit difference| at each sequence length (2 random rows; logical vocabulary)."""
    g, diffs = torch.Generator().manual_seed(1), {}
    for length in lengths:
        idx = torch.randint(0, V, (2, length), generator=g)
        with torch.no_grad():
            diffs[length] = (ours(idx)[..., :V] - theirs(idx).logits).abs().max().item()
    return diffs


@pytest.mark.parametrize("name", MODELS)
def test_import_computes_transformers_logits(converted, name, capsys):
    folder, ckpt, hf = converted[name]
    ours, cfg, step = load_model_for_inference(ckpt)
    diffs = max_diffs(ours, hf)
    assert step == 0 and max(diffs.values()) <= 1e-4, diffs
    config = json.loads((folder / "config.json").read_text())
    llama = config["model_type"] == "llama"
    assert (cfg.model.vocab_size, cfg.model.n_layer, cfg.model.d_model, cfg.model.d_mlp, cfg.model.max_seq_len) == \
        (V, 2, 64, config["intermediate_size"], 128)
    assert cfg.model.kv_heads == config.get("num_key_value_heads", 4) and cfg.model.tie_embeddings == \
        config["tie_word_embeddings"] and cfg.model.norm == (Norm.rmsnorm if llama else Norm.layernorm)
    assert cfg.model.rope_theta == config["rope_parameters"]["rope_theta"]
    assert cfg.model.norm_eps == config["rms_norm_eps" if llama else "layer_norm_eps"]
    assert checkpoint_main(["verify", str(ckpt), "0"]) == 0 and "ok: " in capsys.readouterr().out
    assert json.loads((ckpt / MARKER).read_text())["architecture"] == config["architectures"][0]
    assert json.loads((resolve(str(ckpt), ckpt) / "train_state.json").read_text())["weights_only"] is True


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_hf_ours_hf_is_bit_exact(converted, exported, name):
    folder, out = converted[name][0], exported[name]
    before, after = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype == torch.float32 for k in before)
    theirs, ours = json.loads((folder / "config.json").read_text()), json.loads((out / "config.json").read_text())
    keys = ["architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "rope_parameters", "hidden_act",
            "rms_norm_eps", "layer_norm_eps", "attention_bias", "mlp_bias", "use_parallel_residual", "eos_token_id",
            "pad_token_id"]
    assert {k: ours.get(k) for k in keys} == {k: theirs.get(k) for k in keys} and "auto_map" not in ours


def greedy_pairs(ours, hf, n: int = 24) -> list[tuple[list[int], list[int]]]:
    """(our greedy tokens, transformers' greedy tokens up to its EOS) for two prompts."""
    pairs = []
    for prompt in ("ROMEO:", "To be, or not to be"):
        ids = get_tokenizer().encode(prompt)
        mine = generate(ours, ids, GenerateConfig(temperature=0.0, max_new_tokens=n))
        theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)[0, len(ids):].tolist()
        pairs.append((mine, theirs[: theirs.index(EOS_ID)] if EOS_ID in theirs else theirs))
    return pairs


@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama-mqa-untied"])
def test_llama_export_loads_with_auto_and_decodes_alike(converted, exported, name):
    """Our model exported as LlamaForCausalLM: AutoModelForCausalLM (no custom code) computes our logits, greedy decoding
    gives our tokens, and the config says what the model is."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ours, cfg, _ = load_model_for_inference(converted[name][1])
    out = exported[name]
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["hidden_act"], config["attention_bias"], config["mlp_bias"]) == \
        ("llama", "silu", False, False)
    assert (config["num_key_value_heads"], config["rms_norm_eps"], config["rope_theta"], config["vocab_size"]) == \
        (cfg.model.kv_heads, cfg.model.norm_eps, cfg.model.rope_theta, V)
    assert (config["eos_token_id"], config["pad_token_id"], config["max_position_embeddings"]) == (EOS_ID, PAD_ID, 128)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, LlamaForCausalLM) and sum(p.numel() for p in hf.parameters()) == ours.num_params()
    assert max(max_diffs(ours, hf).values()) <= 1e-4
    pairs = greedy_pairs(ours, hf)
    assert all(mine == theirs for mine, theirs in pairs) and max(len(set(mine)) for mine, _ in pairs) >= 5, pairs
    card = (out / "README.md").read_text()
    assert "tags: [smollm2, llama," in card and "SwiGLU" in card and "GELU" not in card and "GPT-NeoX" not in card


def write_config(folder: Path, **changes) -> Path:
    """A transformers folder with only a config.json (the tiny Llama's, changed): refused before any weight is read."""
    folder.mkdir(parents=True)
    config = hf_config("llama-gqa-tied").to_dict() | changes
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
     "architectures GPT2LMHeadModel is not supported: GPT-2 adds learned position embeddings"),
    ({"architectures": ["MistralForCausalLM"]}, "architectures MistralForCausalLM is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     'rope_scaling="linear" is not supported (our RoPE has no scaling)'),
    ({"sliding_window": 64}, "sliding_window=64 is not supported"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"hidden_act": "gelu"}, 'hidden_act="gelu" is not supported'),
])
def test_unsupported_llama_configs_are_one_line_and_write_nothing(tmp_path, changes, message):
    folder = write_config(tmp_path / "hf", **changes)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        convert(folder, tmp_path / "out")
    assert "\n" not in str(err.value) and "config.json" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_unsupported_neox_and_weights_are_refused(converted, tmp_path):
    neox = converted["neox-untied"][0]
    for changes, message in [({"use_parallel_residual": True}, "use_parallel_residual=true is not supported"),
                             ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor":
                                                   0.25}}, "partial_rotary_factor=0.25 is not supported"),
                             ({"hidden_act": "gelu"}, 'hidden_act="gelu" is not supported')]:
        folder = tmp_path / f"neox-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(json.loads((neox / "config.json").read_text()) | changes))
        with pytest.raises(UserError, match=message):
            convert(folder, tmp_path / "out")
    # a config that says tied over weights whose head is its own; weights that are not safetensors
    tied = tmp_path / "tied"
    tied.mkdir()
    (tied / "model.safetensors").write_bytes((neox / "model.safetensors").read_bytes())
    (tied / "config.json").write_text(json.dumps(json.loads((neox / "config.json").read_text()) |
                                                 {"tie_word_embeddings": True}))
    with pytest.raises(UserError, match="tie_word_embeddings=true, but the weights hold a embed_out.weight that differs"):
        convert(tied, tmp_path / "out")
    (tied / "model.safetensors").rename(tied / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"holds no model.safetensors \(only pytorch_model.bin\): only safetensors"):
        convert(tied, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_out_is_refused_unless_an_earlier_convert_output(converted, tmp_path):
    folder, ckpt, _ = converted["llama-gqa-tied"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me\n")
    for out, force, message in [(tmp_path / "notes", False, "exists and is not empty: choose another --out, or pass"),
                                (tmp_path / "notes", True, "is not an earlier convert output"),
                                (folder, True, "is or contains --from-hf")]:
        with pytest.raises(UserError, match=message):
            convert(folder, out, force=force)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me\n"
    again = convert(folder, tmp_path / "again")
    (again / "checkpoints" / "step-000005").mkdir()  # a run has trained in it since: --force never replaces it
    with pytest.raises(UserError, match="a run has trained in it"):
        convert(folder, again, force=True)
    (again / "checkpoints" / "step-000005").rmdir()
    assert convert(folder, again, force=True) == again and read_meta(again / "checkpoints" / "latest")["step"] == 0


def test_the_tokenizer_travels_with_the_checkpoint(converted, exported, tmp_path, capsys):
    """The folder's tokenizer.json is copied into the checkpoint, digested and described in its meta.json; our own export
    of a GPT-2 checkpoint carries the bundled BPE rebuilt, which a checkpoint does not carry (so a round trip trains on
    data prepared without --tokenizer)."""
    folder = tmp_path / "hf"
    shutil.copytree(converted["llama-mqa-untied"][0], folder)
    word_level_tokenizer(folder / "tokenizer.json", 300)  # [UNK], w0 ... w299, <|endoftext|> = 301
    ckpt = convert(folder, tmp_path / "ckpt")
    path, raw = resolve(str(ckpt), ckpt), (folder / "tokenizer.json").read_bytes()
    meta = read_meta(path)
    assert (path / "tokenizer.json").read_bytes() == raw and meta["tokenizer"]["eos_id"] == 301
    assert meta["tokenizer"]["sha256"] == meta["files"]["tokenizer.json"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert load_tokenizer_for_inference(ckpt).sha256 == meta["tokenizer"]["sha256"]
    assert checkpoint_main(["verify", str(ckpt), "0"]) == 0 and "ok: " in capsys.readouterr().out
    again = resolve(str(convert(exported["llama-gqa-tied"], tmp_path / "again")), tmp_path / "again")
    assert not (again / "tokenizer.json").exists() and "tokenizer" not in read_meta(again)
    ours, _, _ = load_model_for_inference(again)
    assert max(max_diffs(ours, converted["llama-gqa-tied"][2], lengths=(29,)).values()) <= 1e-4


def test_the_released_smollm2_config_is_the_presets_model(tmp_path):
    """HuggingFaceTB/SmolLM2-135M's config.json as published (transformers 4.x's spelling: rope_theta, rope_scaling null)
    reads as configs/smollm2_135m_llama.yaml's model section; only max_seq_len (8192 there) may differ, and does not
    stop init_from (no tensor depends on it)."""
    from smollm2.checkpoint import check_model_matches
    from smollm2.config import to_dict
    from smollm2.serve.hf_import import model_config, read_hf_config

    published = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                 "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576,
                 "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
                 "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
                 "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                 "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
                 "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True, "vocab_size": 49152}
    (tmp_path / "config.json").write_text(json.dumps(published))
    ours = model_config(*read_hf_config(tmp_path), tmp_path)
    preset = load_config(ROOT / "configs/smollm2_135m_llama.yaml")
    assert ours.max_seq_len == 8192 and to_dict(ours) | {"max_seq_len": 2048} == to_dict(preset.model)
    check_model_matches({"model": to_dict(ours)}, preset, tmp_path)  # raises on any difference that matters


def test_no_transformers_class_runs_the_other_combinations():
    for changes, field in [({"norm": Norm.rmsnorm}, "model.mlp"), ({"mlp": Mlp.swiglu}, "model.norm"),
                           ({"bias": False}, "model.bias"), ({"n_kv_head": 4}, "model.n_kv_head"),
                           ({"norm": Norm.rmsnorm, "mlp": Mlp.swiglu}, "model.bias")]:
        with pytest.raises(UserError, match=field):
            architecture(ModelConfig(**changes))
    assert architecture(load_config(ROOT / "configs/tiny_llama.yaml").model) == "LlamaForCausalLM"
    assert architecture(ModelConfig()) == "GPTNeoXForCausalLM"
    cfg = load_config(ROOT / "configs/smollm2_135m_llama.yaml")  # the released SmolLM2-135M shape, as transformers has it
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_model_config(cfg.model))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.config.num_key_value_heads == 3


@pytest.mark.e2e
def test_the_space_app_serves_a_llama_export(converted, exported):
    """The Space's page code (AutoModelForCausalLM) on a Llama export: greedy text is our greedy text."""
    pytest.importorskip("gradio")
    from smollm2.serve.space_app import Generator

    ours, _, _ = load_model_for_inference(converted["llama-gqa-tied"][1])
    gen = Generator(exported["llama-gqa-tied"], device="cpu")
    text, message = list(gen.stream("ROMEO:", 0.0, 50, 0.95, 12, 0))[-1]
    mine = generate(ours, get_tokenizer().encode("ROMEO:"), GenerateConfig(temperature=0.0, max_new_tokens=12))
    assert text == "ROMEO:" + get_tokenizer().decode(mine) and message.startswith("Done: ")


LLAMA_RUN = [o for o in SMALL if not o.startswith("model.")] + ["train.max_steps=2"]


@pytest.mark.e2e
def test_init_from_trains_from_the_imported_weights(converted, shakespeare_data, tmp_path):
    """Two ranks (FSDP2) start from the converted tiny Llama: its first logged loss is transformers' loss on the same first
    batch of both ranks, it is a new run (step 0, no resume), and its checkpoint exports back to transformers."""
    folder, ckpt, hf = converted["llama-gqa-tied"]
    run = tmp_path / "run"
    proc = train(2, run, shakespeare_data, *LLAMA_RUN, f"train.init_from={ckpt}", config="configs/tiny_llama.yaml",
                 timeout=300)
    assert f"init_from: starting a new run from the weights of {ckpt / 'checkpoints' / 'step-000000'}" in proc.stdout
    cfg = load_config(ROOT / "configs/tiny_llama.yaml", LLAMA_RUN)
    losses = []
    for rank in range(2):
        loader = TrainLoader(Dataset.open(shakespeare_data), cfg.data.seq_len, cfg.data.micro_batch, 1, rank, 2,
                             cfg.data.seed, prefetch=0)
        for inputs, targets in loader.next_step():
            with torch.no_grad():
                losses.append(F.cross_entropy(hf(inputs).logits.flatten(0, 1), targets.flatten()).item())
        loader.close()
    logged = {r["step"]: r["loss"] for r in records(run)}
    assert logged[1] == pytest.approx(sum(losses) / len(losses), rel=1e-5) and logged[2] != logged[1]
    assert not (run / "events.jsonl").exists() or "restart" not in (run / "events.jsonl").read_text()
    assert read_meta(run / "checkpoints" / "latest")["step"] == 2
    # its checkpoint exports as LlamaForCausalLM and transformers computes its logits
    ours, _, _ = load_model_for_inference(run)
    exported = transformers.AutoModelForCausalLM.from_pretrained(export(str(run), tmp_path / "hf")).eval()
    assert max(max_diffs(ours, exported).values()) <= 1e-4
    # a converted checkpoint holds no optimizer state: --resume from it is refused in one line
    proc = cli("smollm2.train", "--config", "configs/tiny_llama.yaml", f"data.path={shakespeare_data}",
               f"train.run_dir={tmp_path / 'other'}", *LLAMA_RUN, "--resume", str(ckpt))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ") and \
        "holds weights only" in proc.stderr and "start a new run from it with train.init_from=" in proc.stderr, \
        proc.stderr[-2000:]
