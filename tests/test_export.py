"""Shipping the model: a checkpoint from the session's 2-rank run exported to `transformers` (GPT-NeoX, no custom code), to one
safetensors file in our own names, and to a Space folder; the tokenizer rebuilt for `tokenizers` from our BPE ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from smollm2.checkpoint import resolve  # noqa: E402
from smollm2.config import GenerateConfig, load_config  # noqa: E402
from smollm2.data.tokenizer import EOS_ID, PAD_ID, get_tokenizer  # noqa: E402
from smollm2.errors import UserError  # noqa: E402
from smollm2.serve import export as export_module  # noqa: E402
from smollm2.serve.export import export, hf_model_config, write_safetensors  # noqa: E402
from smollm2.serve.generate import generate  # noqa: E402
from smollm2.serve.loading import load_model_for_inference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Accents, CJK, emoji (with joiners), CRLF, tabs, code, runs of spaces and newlines, leading/trailing whitespace.
MIXED = ("  Héllo wörld — naïve café, Ça va? 日本語のテキスト、中文。 🙂🚀👩‍👩‍👧 emoji\r\nCRLF line\tTab\tseparated\n"
         "    def f(x):\n        return {'a': x ** 2}  # code\n\n\n  several   spaces   \u00a0nbsp 3.14159 I'll we've end  \n")


@pytest.fixture(scope="module")
def run(two_rank_run) -> Path:
    """The session's two-rank run (sharded DCP checkpoints; an eval at its last step, step 20, for the model card)."""
    return two_rank_run


@pytest.fixture(scope="module")
def hf_dir(space_export) -> Path:
    """The `transformers` folder inside the session's Space export (`python -m smollm2.export --format space`, which
    writes it exactly as `--format hf` does)."""
    return space_export / "model"


def greedy_pairs(ours, hf, prompts=("ROMEO:", "To be, or not to be"), n=24) -> list[tuple[list[int], list[int]]]:
    """(our greedy tokens, transformers' greedy tokens up to its EOS) per prompt; the saved generation_config applies
    (it suppresses pad, as our sampler does)."""
    tok, pairs = get_tokenizer(), []
    for prompt in prompts:
        ids = tok.encode(prompt)
        mine = generate(ours, ids, GenerateConfig(temperature=0.0, max_new_tokens=n))
        theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)[0, len(ids):].tolist()
        pairs.append((mine, theirs[: theirs.index(EOS_ID)] if EOS_ID in theirs else theirs))
    return pairs


@pytest.mark.e2e
def test_transformers_loads_it_and_computes_our_logits(run, hf_dir):
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and "auto_map" not in config  # no custom code
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0 and config["rope_parameters"]["rope_theta"] == 10000
    assert (config["vocab_size"], config["max_position_embeddings"], config["layer_norm_eps"]) == (50258, 128, 1e-5)
    assert config["use_parallel_residual"] is False and config["tie_word_embeddings"] is True
    assert config["hidden_act"] == "gelu_pytorch_tanh" and config["attention_dropout"] == config["hidden_dropout"] == 0
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (EOS_ID, EOS_ID, PAD_ID)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert isinstance(hf, GPTNeoXForCausalLM) and hf.lm_head.weight.data_ptr() == hf.gpt_neox.embed_in.weight.data_ptr()
    ours, cfg, step = load_model_for_inference(run)
    assert sum(p.numel() for p in hf.parameters()) == ours.num_params()
    g = torch.Generator().manual_seed(0)
    for length in (1, 37, cfg.model.max_seq_len):
        idx = torch.randint(0, PAD_ID + 1, (3, length), generator=g)
        with torch.no_grad():
            theirs, mine = hf(idx).logits, ours(idx)[..., : cfg.model.vocab_size]
        assert theirs.shape == mine.shape == (3, length, 50258)
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4)
    for mine, theirs in greedy_pairs(ours, hf):
        assert theirs == mine and len(mine) > 0

    info = json.loads((hf_dir / "smollm2_export.json").read_text())
    state = json.loads((run / "checkpoints" / "latest" / "train_state.json").read_text())
    val = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["val_loss"]
    assert info == {"step": 20, "tokens_seen": state["tokens_seen"], "n_params": ours.num_params(), "val_loss": val,
                    "max_seq_len": 128, "source_checkpoint": str(resolve("latest", run / "checkpoints")),
                    "format": "space", "dtype": "fp32"} and step == 20
    card = (hf_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\nlicense: mit\n") and f"{val:.4f}" in card
    assert f"{ours.num_params():,}" in card and "AutoModelForCausalLM.from_pretrained" in card
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert {k: gen[k] for k in ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "eos_token_id",
                                "pad_token_id")} == {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.95,
                                                     "max_new_tokens": 100, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


@pytest.mark.e2e
def test_greedy_decoding_matches_on_a_model_with_varied_output(run, tmp_path):
    """A few training steps make a model that repeats one token; noise makes greedy decoding wander over the vocabulary
    (so the KV-cached positions really matter), exported through a safetensors folder as the source."""
    from transformers import AutoModelForCausalLM

    noisy, cfg, step = load_model_for_inference(run)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.3)
    write_safetensors(tmp_path / "noisy", noisy, cfg, {"step": step}, "fp32")
    hf = AutoModelForCausalLM.from_pretrained(export(str(tmp_path / "noisy"), tmp_path / "hf")).eval()
    pairs = greedy_pairs(noisy, hf)
    assert all(theirs == mine for mine, theirs in pairs), pairs
    assert max(len(set(mine)) for mine, _ in pairs) >= 5, pairs


@pytest.mark.e2e
def test_its_tokenizer_equals_tiktoken(hf_dir):
    from transformers import AutoTokenizer

    hf_tok, ours = AutoTokenizer.from_pretrained(hf_dir), get_tokenizer()
    assert type(hf_tok).__module__.startswith("transformers.")  # no custom code here either
    for text in (MIXED, MIXED.upper(), MIXED.strip(), " leading", "trailing\n\n", "\r\n\t ", "", "x" * 300,
                 "'s 've 're 'll 'd 't 'S", "a  b   c\n\n d"):
        assert hf_tok(text)["input_ids"] == ours.encode(text), repr(text)
        assert hf_tok.decode(ours.encode(text)) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, len(hf_tok), hf_tok.model_max_length) == (EOS_ID, PAD_ID, 50258, 128)
    assert hf_tok.convert_ids_to_tokens([EOS_ID, PAD_ID]) == ["<|endoftext|>", "<|pad|>"]


def test_seed_shape_exports_exactly_123_654_144_parameters():
    from transformers import GPTNeoXForCausalLM

    cfg = load_config(ROOT / "configs/smollm2_135.yaml")
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(hf_model_config(cfg.model))
    assert sum(p.numel() for p in model.parameters()) == 123_654_144
    assert model.config.max_position_embeddings == 2048 and model.config.rope_parameters["rope_theta"] == 10000


@pytest.mark.e2e
def test_safetensors_round_trip_is_bit_exact(run, tmp_path):
    out = export(str(run), tmp_path / "st", fmt="safetensors")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "smollm2_export.json"]
    ckpt, ckpt_cfg, step = load_model_for_inference(run)
    back, cfg, back_step = load_model_for_inference(out)
    assert back_step == step == 20 and cfg.model == ckpt_cfg.model
    a, b = ckpt.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert back.head.weight is back.embed.weight  # still tied


@pytest.mark.e2e
def test_bf16_refusal_force_and_nothing_half_written(run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    out = export(str(run), tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(out).parameters()} == {torch.bfloat16}
    proc = subprocess.run([sys.executable, "-m", "smollm2.export", "--checkpoint", str(run), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {out} exists and is not empty")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # untouched
    export(str(run), out, force=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    with pytest.raises(UserError, match="user/name"):
        export_module.main(["--checkpoint", str(run), "--out", str(tmp_path / "p"), "--push", "no-slash"])
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HF_HOME": str(tmp_path / "no_hf_home")}
    proc = subprocess.run([sys.executable, "-m", "smollm2.export", "--checkpoint", str(run), "--out", str(tmp_path / "p"),
                           "--push", "user/name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        "error: --push needs a Hugging Face token: `hf auth login`, or set HF_TOKEN"
    monkeypatch.setattr(export_module, "SPACE_APP", tmp_path / "missing.py")  # fails inside the temporary folder
    with pytest.raises(UserError, match="missing.py is missing"):
        export(str(run), tmp_path / "space", fmt="space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]  # no .tmp-*/.old-* left, no partial space


@pytest.mark.e2e
def test_space_folder(space_export):
    import gradio

    out = space_export
    front, body = (out / "README.md").read_text().split("---\n")[1:3]
    fields = dict(line.split(": ", 1) for line in front.strip().splitlines())
    assert (fields["sdk"], fields["sdk_version"], fields["app_file"], fields["pinned"]) == \
        ("gradio", gradio.__version__, "app.py", "false") and fields["title"]
    assert (out / "app.py").read_bytes() == (ROOT / "smollm2" / "serve" / "space_app.py").read_bytes()
    assert set((out / "requirements.txt").read_text().split()) == {"gradio", "transformers", "torch", "safetensors"}
    model = out / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (model / name).is_file(), name
    assert json.loads((model / "smollm2_export.json").read_text())["step"] == 20


def test_export_never_overwrites_its_source_or_a_run(tmp_path):
    """`--out` that is the checkpoint, contains it (its run directory) or lies inside it is refused, with or without
    --force, before anything is loaded; so is one that holds another run at any depth, a folder that is not an earlier
    export (--force replaces only those), and one that cannot be written."""
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step-000004"
    shutil.copytree(ROOT / "tests/fixtures/checkpoint-0.1.0/checkpoints/step-000004", checkpoint)
    (run / "metrics.jsonl").write_text('{"step": 4, "loss": 5.5}\n')
    other = tmp_path / "runs" / "other-run"
    shutil.copytree(run, other)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me\n")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for out, message in [(run, "contains the checkpoint being exported"), (run / "checkpoints", "contains the checkpoint"),
                         (checkpoint, "is the checkpoint being exported"), (checkpoint / "hf", "lies inside the checkpoint"),
                         (other, "holds a training run or a checkpoint, which --force never replaces"),
                         (other.parent, "holds a training run or a checkpoint"),
                         (tmp_path / "notes", "is not an earlier export .no smollm2_export.json., and --force replaces only")]:
        with pytest.raises(UserError, match=message):
            export(str(run), out, fmt="safetensors", force=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="cannot write --out"):
        export(str(checkpoint), tmp_path / "a-file" / "out", fmt="safetensors")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == sorted([*before, "a-file"])
