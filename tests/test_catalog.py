"""The bad-input catalog (README, "When something is wrong"): each input gives one `error:` line on stderr, no
traceback, exit 2, and changes nothing that already exists (shards, manifest, checkpoints).

Every row runs the real command as a subprocess. To add a row: write its setup (make the bad input, return the command
and the paths that must not change) and add (name, setup, message) to ROWS; or, for a row that needs a trained run,
a test that calls `refused(...)` with the run's checkpoints as the paths to keep.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smollm2.shards import write_shard

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# configs/tiny.yaml shrunk to what starts fastest: a row is mostly the interpreter and torch import (~3 s on 2 cores)
SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_mlp=64", "data.seq_len=16",
         "data.micro_batch=2", "train.grad_accum=1", "train.dtype=fp32", "eval.interval=0", "sample.interval=0",
         "checkpoint.interval=0", "logging.interval=1", "data.prefetch=0"]


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


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m <args>` from the repository root."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def refused(args: tuple[str, ...], message: str, *keep: Path) -> subprocess.CompletedProcess:
    """Run the command; it must exit 2 with exactly one stderr line, `error: ...` holding `message`, no traceback, and
    leave every file under `keep` byte-for-byte as it was."""
    before = snapshot(*keep)
    assert before or not keep, f"nothing to compare under {keep}"
    proc = cli(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in lines[0], lines[0]
    assert snapshot(*keep) == before, "a refused command changed existing files"
    return proc


def train_cmd(run: Path, data: Path, *extra: str) -> tuple[str, ...]:
    return ("smollm2.train", "--config", "configs/tiny.yaml", *SMALL, f"data.path={data}", f"train.run_dir={run}",
            *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare_data) -> Path:
    """A run with a complete checkpoint at step 2."""
    run = tmp_path_factory.mktemp("catalog") / "run"
    proc = cli(*train_cmd(run, shakespeare_data, "train.max_steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def llmc_dir(root: Path, train_tokens: np.ndarray) -> Path:
    """An llm.c-style directory (no manifest): one train shard, one val shard."""
    root.mkdir(parents=True)
    write_shard(root / "fineweb_train_000001.bin", train_tokens)
    write_shard(root / "fineweb_val_000000.bin", np.arange(200, dtype=np.uint16))
    return root


# ------------------------------------------------------------- rows: setup(tmp, data, run) -> (command, paths to keep)


def config_typo(tmp, data, run):
    return train_cmd(run, data, "train.max_step=5"), []


def wrong_type(tmp, data, run):
    return train_cmd(run, data, "train.max_steps=abc"), []


def bad_choice(tmp, data, run):
    return train_cmd(run, data, "train.dtype=fp16"), []


def seq_len_too_long(tmp, data, run):
    return train_cmd(run, data, "data.seq_len=4096"), []


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


ROWS = [
    ("config typo", config_typo, "unknown config key 'train.max_step'; did you mean 'train.max_steps'?"),
    ("wrong type", wrong_type,
     "bad value for 'train.max_steps': Value 'abc' of type 'str' could not be converted to Integer"),
    ("bad choice", bad_choice, "invalid config: train.dtype must be one of bf16, fp32 (got 'fp16')"),
    ("seq_len > max_seq_len", seq_len_too_long, "invalid config: data.seq_len (4096) must be <= model.max_seq_len (128)"),
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
]


@pytest.mark.parametrize("name, setup, message", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(name, setup, message, shakespeare_data, tmp_path):
    run = tmp_path / "run"
    args, keep = setup(tmp_path, shakespeare_data, run)
    refused(args, message, shakespeare_data, *keep)
    assert not (run / "checkpoints").exists()  # nothing trained, nothing saved


# ---------------------------------------------------------------------------------------------- rows about runs


def test_resume_under_another_model_shape(trained, shakespeare_data):
    cmd = train_cmd(trained, shakespeare_data, "model.n_layer=2", "train.max_steps=3", "--resume", "latest")
    refused(cmd, "was written for another model shape (model.n_layer: checkpoint 1, config 2)", trained / "checkpoints")


def test_resume_from_a_path_that_does_not_exist(trained, shakespeare_data, tmp_path):
    cmd = train_cmd(trained, shakespeare_data, "train.max_steps=3", "--resume", str(tmp_path / "nope"))
    refused(cmd, f"checkpoint not found: {tmp_path / 'nope'}", trained / "checkpoints")


def test_resume_latest_with_no_checkpoint_starts_from_step_0(shakespeare_data, tmp_path):
    """Not an error (the launch scripts pass --resume latest to phase 1 too): a note, then a run from step 0."""
    proc = cli(*train_cmd(tmp_path / "fresh", shakespeare_data, "train.max_steps=1", "--resume", "latest"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = f"resume=latest: no complete checkpoint in {tmp_path / 'fresh' / 'checkpoints'} yet; starting from step 0"
    assert note in proc.stdout
    assert (tmp_path / "fresh" / "checkpoints" / "step-000001").is_dir()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(trained, shakespeare_data):
    """optim.lr=1e30 from the step-2 checkpoint: the loss is inf/nan by step 4, the run stops before saving it."""
    cmd = train_cmd(trained, shakespeare_data, "train.max_steps=4", "optim.lr=1e30", "optim.warmup_steps=0",
                    "optim.grad_clip=0", "--resume", "latest")
    proc = refused(cmd, "stopping without saving. The last good checkpoint is kept in", trained / "checkpoints")
    assert "error: loss became nan by step" in proc.stderr or "error: loss became inf by step" in proc.stderr


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
