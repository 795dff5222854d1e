"""Any tokenizer, end to end with the real commands: a 2,000-token byte-level BPE trained on the bundled corpus (`python
-m data_prep.tokenizer`), the corpus prepared with it, configs/tiny_llama.yaml (model.vocab_size=2000, 2 query heads
sharing 1 KV head) trained 2 steps on it, its checkpoint carrying the tokenizer, the in-training samples and `python
-m smollm2.generate` decoding with it, and an `hf` export whose tokenizer transformers' AutoTokenizer loads with our
ids; a resume on data of another tokenizer is refused in one line and changes nothing. Everything is built offline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from test_catalog import OLD_CHECKPOINT, refused

from data_prep.prep import PrepOptions, prepare
from smollm2.data.shards import open_shard
from smollm2.data.tokenizer import HFTokenizer
from smollm2.serve.generate import SpecialIds, generate
from smollm2.serve.loading import load_model_for_inference, load_tokenizer_for_inference

pytestmark = pytest.mark.e2e

VOCAB = 2000
RUN = [*tiny.SMALL, "model.n_kv_head=1", f"model.vocab_size={VOCAB}", "train.max_steps=2", "sample.interval=2",
       "generate.max_new_tokens=8"]
LLAMA = "configs/tiny_llama.yaml"  # the SmolLM2 architecture: its export is a LlamaForCausalLM
MIXED = ("  Héllo wörld — naïve café, Ça va? 日本語のテキスト、中文。 🙂🚀👩‍👩‍👧 emoji\r\nCRLF line\tTab\tseparated\n"
         "    def f(x):\n        return {'a': x ** 2}  # code\n\n\n  several   spaces   \u00a0nbsp 3.14159 I'll we've end  \n")


@pytest.fixture(scope="module")
def tokenizer_file(shakespeare_data, tmp_path_factory) -> Path:
    """`python -m data_prep.tokenizer` on the bundled corpus (cached by the session's prep of it)."""
    out = tmp_path_factory.mktemp("tokenizer") / "shakespeare-2k" / "tokenizer.json"
    proc = tiny.cli("data_prep.tokenizer", "--source", "shakespeare", "--vocab-size", VOCAB, "--out", out, "--no-progress",
                    timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"trained {out}: 2,000 ids (<|endoftext|> = 0, <|pad|> = 1) from 42 documents")
    return out


@pytest.fixture(scope="module")
def data(tokenizer_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shakespeare-2k"
    proc = tiny.cli("data_prep", "--source", "shakespeare", "--tokenizer", tokenizer_file, "--out", out, "--no-progress",
                    timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenizer shakespeare-2k (2,000 ids, EOS 0, pad 1; uint16 shards), copied to tokenizer.json" in proc.stdout
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    tiny.train(0, run, data, *RUN, config=LLAMA)
    return run


def test_the_data_is_tokenized_with_it(tokenizer_file, data):
    tok = HFTokenizer(tokenizer_file)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"name": "shakespeare-2k", "vocab_size": VOCAB, "eos_id": 0, "pad_id": 1,
                                     "sha256": hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()}
    assert (data / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()  # the dataset is self-contained
    val = np.asarray(open_shard(data / "val_000000.bin", VOCAB))
    assert val.dtype == np.uint16 and val[-1] == 0
    first = val[: int(np.argmax(val == 0))].tolist()
    assert tok.encode(tok.decode(first)) == first and tok.decode(first).lstrip().split("\n")[0].isupper()  # a title


def test_the_checkpoint_carries_it_and_the_samples_use_it(run, data):
    ckpt = run / "checkpoints" / "step-000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    manifest = json.loads((data / "manifest.json").read_text())
    assert (ckpt / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    assert meta["tokenizer"] == manifest["tokenizer"]
    assert meta["files"]["tokenizer.json"]["sha256"] == manifest["tokenizer"]["sha256"]  # digested like the data files
    model, cfg, _ = load_model_for_inference(ckpt)
    tok = load_tokenizer_for_inference(run)
    assert tok.describe() == manifest["tokenizer"]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == cfg.sample.prompts
    for i, sample in enumerate(samples):  # decoded with the dataset's tokenizer, as generate decodes them now
        settings = dataclasses.replace(cfg.generate, seed=cfg.generate.seed + i)
        ids = generate(model, tok.encode(sample["prompt"]), settings, special=SpecialIds.of(tok))
        assert sample["text"] == tok.decode(ids) and sample["tokens"] == len(ids)


def test_generate_decodes_with_it(run):
    proc = tiny.cli("smollm2.generate", "--checkpoint", run, "--prompt", "ROMEO:", "--temperature", "0",
                    "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, cfg, _ = load_model_for_inference(run)
    tok = load_tokenizer_for_inference(run)
    greedy = dataclasses.replace(cfg.generate, temperature=0.0, max_new_tokens=12)
    ids = generate(model, tok.encode("ROMEO:"), greedy, special=SpecialIds.of(tok))
    assert proc.stdout == f"ROMEO:{tok.decode(ids)}\n" and max(ids) < VOCAB


def test_the_hf_export_carries_it_and_autotokenizer_gives_our_ids(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    proc = tiny.cli("smollm2.export", "--checkpoint", run, "--out", out, "--format", "hf", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenizer.json copied from the checkpoint (shakespeare-2k, 2,000 ids)" in proc.stderr
    assert "vocabulary" not in proc.stderr  # no transformers warning about ids outside the vocab
    ours = load_tokenizer_for_inference(run)
    assert (out / "tokenizer.json").read_bytes() == ours.raw
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert type(hf_tok).__module__.startswith("transformers.")  # no custom code
    for text in (MIXED, MIXED.upper(), " leading", "trailing\n\n", "", "ROMEO: To be, or not to be"):
        assert hf_tok(text)["input_ids"] == ours.encode(text), repr(text)
        assert hf_tok.decode(ours.encode(text)) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, len(hf_tok)) == (0, 1, VOCAB)
    config, generation = (json.loads((out / name).read_text()) for name in ("config.json", "generation_config.json"))
    assert [config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size")] == [0, 0, 1, VOCAB]
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["suppress_tokens"]) == (0, 1, [1])
    assert json.loads((out / "smollm2_export.json").read_text())["tokenizer"] == ours.describe()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    model, cfg, _ = load_model_for_inference(run)
    ids = ours.encode("To be, or not to be")
    mine = generate(model, ids, dataclasses.replace(cfg.generate, temperature=0.0, max_new_tokens=10),
                    special=SpecialIds.of(ours))
    theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10)[0, len(ids):].tolist()
    assert (theirs[: theirs.index(0)] if 0 in theirs else theirs) == mine


def test_a_resume_on_data_of_another_tokenizer_is_refused(run, data, tmp_path):
    """Each refused in one line, before anything is written: the run's checkpoints and the data stay as they were."""
    copy = tiny.copy_run(run, tmp_path / "run")
    texts = ["ROMEO: But soft, what light through yonder window breaks?", "JULIET: O Romeo, Romeo!"] * 20
    (tmp_path / "corpus.txt").write_text("\n".join(texts))
    other = tiny.train_tokenizer(tmp_path / "other" / "tokenizer.json", texts, 300)
    other_data = prepare(PrepOptions(source=str(tmp_path / "corpus.txt"), out=str(tmp_path / "other-data"),
                                     tokenizer=str(other), val_fraction=0.0, progress=False, workers=1)).out
    resume = tiny.trainer(copy, other_data, *RUN, "train.max_steps=3", "--resume", "latest", config=LLAMA)[1:]
    refused(resume, f"{copy / 'checkpoints' / 'step-000002'} was trained on data tokenized with shakespeare-2k (sha256 ",
            copy / "checkpoints", other_data)
    # A GPT-2 checkpoint (any made before, without a tokenizer) on this data: refused before its model is even loaded
    gpt2 = tiny.trainer(tmp_path / "fresh", data, *RUN, "--resume", str(OLD_CHECKPOINT), config=LLAMA)[1:]
    refused(gpt2, "was trained on data tokenized with the bundled GPT-2 BPE, but", OLD_CHECKPOINT)
    assert not (tmp_path / "fresh" / "checkpoints").exists()
