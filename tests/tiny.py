"""What the tests share: the one launcher of tiny training runs, SMALL (configs/tiny.yaml made smaller still), the readers
of what a run wrote, a free port, and checkpoints of an in-process model.

Every test that trains goes through `command` / `train`: a plain `python -m smollm2.train` (nproc 0) or torchrun
--standalone with nproc ranks, from the repository root, with a deadline.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny.yaml"
# configs/tiny.yaml shrunk to what starts and steps fastest, every cadence off (the vocab stays: the test corpus is
# GPT-2-tokenized). Tests add what they check on top; later overrides win.
SMALL = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.d_mlp=64", "data.seq_len=16",
         "data.micro_batch=2", "train.grad_accum=1", "train.device=cpu", "train.dtype=fp32", "train.compile=false",
         "eval.interval=0", "sample.interval=0", "checkpoint.interval=0", "logging.interval=1", "data.prefetch=0"]

# The session's two-rank run (conftest.two_rank_run): configs/tiny.yaml on 2 gloo ranks, fp32, 20 steps, every step
# logged, evals at 10 and 20, samples at 15 and 20, sharded checkpoints at 10 and 20. The golden loss curve, the resume
# tests, the export, the app, the bad-input catalog read it. SHAPE: the same global batch (12 windows of 32 tokens) at
# world sizes 1, 2 and 3, so runs at other world sizes take the same windows.
TWO_RANK_RUN = ["data.seq_len=32", "train.dtype=fp32", "eval.windows=12", "logging.interval=1", "eval.interval=10",
                "sample.interval=15", "checkpoint.interval=10", "checkpoint.keep_last=0", "generate.max_new_tokens=6",
                "data.prefetch=1"]
SHAPE = {1: ["data.micro_batch=3", "train.grad_accum=4"], 2: ["data.micro_batch=3", "train.grad_accum=2"],
         3: ["data.micro_batch=2", "train.grad_accum=2"]}


def trainer(run_dir: Path, data: Path, *overrides: str, config: str = TINY) -> list[str]:
    """The trainer's part of a command line (after `python` or a torchrun launcher)."""
    return ["-m", "smollm2.train", "--config", config, f"data.path={data}", f"train.run_dir={run_dir}", *overrides]


def command(nproc: int, run_dir: Path, data: Path, *overrides: str, config: str = TINY) -> list[str]:
    """A tiny training run's command line: nproc 0 = one plain process (no launcher), else torchrun with nproc ranks."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*(launcher if nproc else [sys.executable]), *trainer(run_dir, data, *overrides, config=config)]


def train(nproc: int, run_dir: Path, data: Path, *overrides: str, check: bool = True, env: dict | None = None,
          timeout: float = 600, config: str = TINY) -> subprocess.CompletedProcess:
    """Run a tiny training to its end; `check`: a non-zero exit fails the test with the run's output."""
    proc = subprocess.run(command(nproc, run_dir, data, *overrides, config=config), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m <args>` from the repository root."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir)}


def copy_run(source: Path, dest: Path) -> Path:
    """A private copy of a shared run (its checkpoints and logs): tests that resume or write must not change the original."""
    shutil.copytree(source, dest, symlinks=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JsonPart:
    """A checkpoint part saved as JSON, as TrainState, the loader and the schedule are: what it saved, what it loaded."""

    def __init__(self, **state: Any):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)


def parts(model, optimizer, **train_state: Any) -> dict[str, Any]:
    """A checkpoint's parts for an in-process model: the sharded model + optimizer and a train state."""
    from smollm2.checkpoint import ModelAndOptimizer

    return {"model": ModelAndOptimizer(model, optimizer), "train": JsonPart(**train_state)}


def train_tokenizer(path: Path, texts: list[str], vocab_size: int) -> Path:
    """A byte-level BPE trained in this process on `texts`, as `python -m data_prep.tokenizer` trains one (<|endoftext|>
    = 0, <|pad|> = 1), saved as `path`: tests build their tokenizers offline."""
    from tokenizers import pre_tokenizers, trainers

    from data_prep.tokenizer import SPECIAL_TOKENS, new_tokenizer

    tok = new_tokenizer()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def word_level_tokenizer(path: Path, words: int, eos: str | None = "<|endoftext|>") -> Path:
    """A WordLevel tokenizer.json of `words` words w0, w1, ... split at whitespace (+ `eos` as a special token, and
    [UNK]): a vocab of any size, built in milliseconds."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos is not None:
        tok.add_special_tokens([AddedToken(eos, special=True, normalized=False)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
