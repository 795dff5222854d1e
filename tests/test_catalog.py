"""The bad-input catalog (docs/errors.md): each input gives one `error:` line on stderr, no traceback, exit 2, and
changes nothing that already exists (shards, manifest, checkpoints).

Every row runs the real command as a subprocess (the rows of ROWS all at once). To add a row: write its setup (make the
bad input, return the command and the paths that must not change) and add (name, setup, message) to ROWS; or, for a row
that needs a trained run, a test that calls `refused(...)` with the run's checkpoints as the paths to keep.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import ROOT, SHAPE, SMALL, TWO_RANK_RUN, cli, copy_run, trainer, word_level_tokenizer

from data_prep.prep import PrepOptions, prepare
from smollm2.data.shards import write_shard

pytestmark = pytest.mark.e2e


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (symlinks by target): what must not change."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root] if root.exists() else []:
            if path.is_symlink():
                out[str(path)] = f"-> {path.readlink()}"
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2 with exactly one stderr line, `error: ...` holding `message`, and no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in lines[0], lines[0]


def refused(args: tuple[str, ...], message: str, *keep: Path) -> subprocess.CompletedProcess:
    """Run the command; it must fail in one line holding `message` and leave every file under `keep` as it was."""
    before = snapshot(*keep)
    assert before or not keep, f"nothing to compare under {keep}"
    proc = cli(*args)
    assert_one_line_error(proc, message)
    assert snapshot(*keep) == before, "a refused command changed existing files"
    return proc


def train_cmd(run: Path, data: Path, *extra: str) -> tuple[str, ...]:
    """A SMALL training's `python -m` arguments (tiny.trainer, the shared launcher's)."""
    return tuple(trainer(run, data, *SMALL, *extra)[1:])


@pytest.fixture(scope="module")
def trained(two_rank_run, tmp_path_factory) -> Path:
    """A copy of the session's two-rank run (checkpoints at steps 10 and 20): the commands here write into a run."""
    return copy_run(two_rank_run, tmp_path_factory.mktemp("catalog") / "run")


def resume_cmd(run: Path, data: Path, *extra: str) -> tuple[str, ...]:
    """A one-process resume of `trained` with its own settings."""
    return tuple(trainer(run, data, *TWO_RANK_RUN, *SHAPE[1], *extra)[1:])


def llmc_dir(root: Path, train_tokens: np.ndarray) -> Path:
    """An llm.c-style directory (no manifest): one train shard, one val shard."""
    root.mkdir(parents=True)
    write_shard(root / "fineweb_train_000001.bin", train_tokens)
    write_shard(root / "fineweb_val_000000.bin", np.arange(200, dtype=np.uint16))
    return root


# ------------------------------------------------------------- rows: setup(tmp, data, run) -> (command, paths to keep)


def config_typo(tmp, data, run):
    return train_cmd(run, data, "train.max_step=5"), []


def missing_data_dir(tmp, data, run):
    return train_cmd(run, tmp / "nope"), []


def empty_data_dir(tmp, data, run):
    (tmp / "empty").mkdir()
    (tmp / "empty" / "README").write_text("not a dataset\n")  # something to compare
    return train_cmd(run, tmp / "empty"), [tmp / "empty"]


def bad_magic(tmp, data, run):
    root = llmc_dir(tmp / "d", np.arange(500, dtype=np.uint16))
    raw = bytearray((root / "fineweb_train_000001.bin").read_bytes())
    raw[0:4] = (12345).to_bytes(4, "little")
    (root / "fineweb_train_000001.bin").write_bytes(raw)
    return train_cmd(run, root), [root]


def truncated_shard(tmp, data, run):
    root = llmc_dir(tmp / "d", np.arange(500, dtype=np.uint16))
    raw = (root / "fineweb_train_000001.bin").read_bytes()
    (root / "fineweb_train_000001.bin").write_bytes(raw[:-100])  # 1,024 + 1,000 bytes -> 1,924
    return train_cmd(run, root), [root]


def id_beyond_vocab(tmp, data, run):
    tokens = np.arange(500, dtype=np.uint16)
    tokens[321] = 60000
    root = llmc_dir(tmp / "d", tokens)
    return train_cmd(run, root), [root]


def manifest_of_another_vocab(tmp, data, run):
    root = tmp / "other-vocab"
    shutil.copytree(data, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 100277  # e.g. cl100k
    (root / "manifest.json").write_text(json.dumps(manifest))
    return train_cmd(run, root), [root]


def manifest_shard_changed_after_prep(tmp, data, run):
    """Same size, so the header and token-count checks pass; the open-time id scan does not trust the manifest."""
    root = tmp / "changed"
    shutil.copytree(data, root)
    shard = root / "val_000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[1024 + 2 * 10 : 1024 + 2 * 11] = (65535).to_bytes(2, "little")  # token 10
    shard.write_bytes(raw)
    return train_cmd(run, root), [root]


def prep_missing_source(tmp, data, run):
    return ("data_prep", "--source", str(tmp / "nope"), "--out", str(tmp / "out")), []


def a_corpus(tmp: Path) -> Path:
    (tmp / "corpus.txt").write_text("w1 w2 w3 w4\n" * 200)
    return tmp / "corpus.txt"


def data_of_a_tokenizer_larger_than_the_model(tmp, data, run):
    """Prepared with a 3,002-id tokenizer (3,000 words, [UNK], EOS); the model's vocab is 2,000."""
    words = word_level_tokenizer(tmp / "words" / "tokenizer.json", 3000)
    root = prepare(PrepOptions(source=str(a_corpus(tmp)), out=str(tmp / "words-data"), tokenizer=str(words),
                               val_fraction=0.0, progress=False, workers=1)).out
    return train_cmd(run, root, "model.vocab_size=2000"), [root]


OLD_CHECKPOINT = ROOT / "tests/fixtures/checkpoint-0.1.0/checkpoints/step-000004"  # small; any checkpoint would do


def an_unset_environment_variable_for_run_dir(tmp, data, run):
    return ("smollm2.checkpoint", "run-dir", "configs/tiny.yaml", "train.run_dir=${oc.env:SMOLLM2_TEST_UNSET}"), []


def generate_with_an_infinite_temperature(tmp, data, run):
    return ("smollm2.generate", "--checkpoint", str(OLD_CHECKPOINT), "--prompt", "a", "--temperature", "inf"), \
        [OLD_CHECKPOINT]


def generate_on_a_device_that_is_not_one(tmp, data, run):
    return ("smollm2.generate", "--checkpoint", str(OLD_CHECKPOINT), "--prompt", "a", "--device", "foo"), [OLD_CHECKPOINT]


def generate_on_cuda_without_cuda(tmp, data, run):
    return ("smollm2.generate", "--checkpoint", str(OLD_CHECKPOINT), "--prompt", "a", "--device", "cuda"), [OLD_CHECKPOINT]


def convert_cmd(tmp, run, config: dict) -> tuple[tuple[str, ...], list[Path]]:
    """`python -m smollm2.convert` of a folder holding only this config.json (refused before any weight is read), into
    the row's run dir (which must not appear)."""
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text(json.dumps(config))
    return ("smollm2.convert", "--from-hf", str(tmp / "hf"), "--out", str(run)), [tmp / "hf"]


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 10000.0}


def init_from_another_shape(tmp, data, run):
    return train_cmd(run, data, f"train.init_from={OLD_CHECKPOINT}"), [OLD_CHECKPOINT]


def masking_on_a_kernel_that_cannot_run(tmp, data, run):
    return train_cmd(run, data, "model.document_masking=true", "model.attention=flash_attn"), []


ROWS = [
    ("config typo", config_typo, "unknown config key 'train.max_step'; did you mean 'train.max_steps'?"),
    ("missing data dir", missing_data_dir, "no prepared dataset at"),
    ("empty data dir", empty_data_dir, "holds no manifest.json and no *train*.bin shards"),
    ("bad magic", bad_magic, "fineweb_train_000001.bin: bad magic 12345 (expected 20240520): not an llm.c token shard"),
    ("truncated shard", truncated_shard,
     "fineweb_train_000001.bin: truncated: 1,924 bytes, the header's 500 tokens need 2,024"),
    ("id >= vocab", id_beyond_vocab,
     "fineweb_train_000001.bin: token id 60000 at position 321 is >= the vocab size 50258"),
    ("manifest of another vocab", manifest_of_another_vocab,
     "was tokenized with a 100277-token vocab, the model has 50258"),
    ("manifest shard changed after prep", manifest_shard_changed_after_prep,
     "val_000000.bin: token id 65535 at position 10 is >= the vocab size 50258"),
    ("data_prep: missing source", prep_missing_source, "source not found:"),
    ("data of a tokenizer larger than model.vocab_size", data_of_a_tokenizer_larger_than_the_model,
     "was tokenized with a 3002-token vocab, the model has 2000 (model.vocab_size): set model.vocab_size=3002 or more"),
    ("unset environment variable (checkpoint run-dir)", an_unset_environment_variable_for_run_dir,
     "invalid config: train.run_dir is an interpolation that does not resolve"),
    ("generate: infinite temperature", generate_with_an_infinite_temperature,
     "invalid config: generate.temperature must be a finite number (got inf)"),
    ("generate: not a device", generate_on_a_device_that_is_not_one, "--device 'foo' is not a device"),
    ("generate: cuda without CUDA", generate_on_cuda_without_cuda, "--device cuda, but torch sees no CUDA device"),
    ("train: init_from of another model shape", init_from_another_shape,
     "was written for another model shape (model.vocab_size: checkpoint 256, config 50258; "),
    ("train: document masking on a kernel that cannot run here", masking_on_a_kernel_that_cannot_run,
     "model.attention=flash_attn runs on CUDA only, not cpu; use model.attention=auto"),
]


@pytest.fixture(scope="module")
def rows_run(shakespeare_data, tmp_path_factory) -> dict[str, tuple]:
    """Every row's command, all started at once: each is mostly an interpreter and torch starting up, so together they
    keep both cores busy. name -> (the finished process, the paths to keep, their snapshot before, the row's run dir)."""
    started = {}
    for name, setup, _ in ROWS:
        tmp = tmp_path_factory.mktemp("row")
        args, keep = setup(tmp, shakespeare_data, tmp / "run")
        keep = [shakespeare_data, *keep]
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        started[name] = (proc, keep, snapshot(*keep), tmp / "run")
    done = {}
    for name, (proc, keep, before, run) in started.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=60)
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), keep, before, run)
    return done


@pytest.mark.parametrize("name, message", [(name, message) for name, _, message in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(rows_run, name, message):
    if name == "generate: cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc, keep, before, run = rows_run[name]
    assert_one_line_error(proc, message)
    assert snapshot(*keep) == before, "a refused command changed existing files"
    assert not (run / "checkpoints").exists()  # nothing trained, nothing saved


# ---------------------------------------------------------------------------------------------- rows about runs


def test_resume_under_another_model_shape(trained, shakespeare_data):
    cmd = resume_cmd(trained, shakespeare_data, "model.n_layer=3", "train.max_steps=21", "--resume", "latest")
    refused(cmd, "was written for another model shape (model.n_layer: checkpoint 2, config 3)", trained / "checkpoints")


def test_a_damaged_checkpoint_is_named_by_resume_and_verify(trained, shakespeare_data, tmp_path):
    """A shard damaged in place (the same size): --resume of it and `verify` (what launch/train.sh runs after each phase)
    refuse it in one line naming the checkpoint and the file."""
    run = tmp_path / "run"
    damaged = run / "checkpoints" / "step-000010"
    shutil.copytree(trained / "checkpoints" / "step-000010", damaged)
    shard = damaged / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    shard.write_bytes(data)
    message = f"{damaged} is damaged: __0_0.distcp has changed since it was written (sha256 differs)"
    refused(resume_cmd(tmp_path / "other", shakespeare_data, "train.max_steps=11", "--resume", str(damaged)), message,
            damaged)
    refused(("smollm2.checkpoint", "verify", str(run), "10"), message, damaged)


def test_resume_latest_with_no_checkpoint_starts_from_step_0(shakespeare_data, tmp_path):
    """Not an error (the launch scripts pass --resume latest to phase 1 too): a note, then a run from step 0."""
    proc = cli(*train_cmd(tmp_path / "fresh", shakespeare_data, "train.max_steps=1", "--resume", "latest"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = f"resume=latest: no complete checkpoint in {tmp_path / 'fresh' / 'checkpoints'} yet; starting from step 0"
    assert note in proc.stdout
    assert (tmp_path / "fresh" / "checkpoints" / "step-000001").is_dir()


def test_generate_on_a_missing_path(tmp_path):
    refused(("smollm2.generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "A"),
            f"checkpoint not found: {tmp_path / 'nope'}")


def test_generate_with_a_prompt_longer_than_the_context(trained):
    """Not an error: the prompt keeps its last max_seq_len - 1 tokens, a warning says so, and one new token follows."""
    before = snapshot(trained / "checkpoints")
    proc = cli("smollm2.generate", "--checkpoint", str(trained / "checkpoints" / "latest"), "--prompt", "word " * 200)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("it is 201 tokens and the model's context (model.max_seq_len) is 128: prompt truncated to its last 127 tokens"
            in proc.stderr), proc.stderr
    assert proc.stdout.startswith("word " * 200)
    assert snapshot(trained / "checkpoints") == before
