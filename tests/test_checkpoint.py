"""Checkpoints on CPU, in this process (a one-rank gloo group, a small model): retention, `resolve`, damaged files; and the
one-line errors the command lines give for a damaged checkpoint."""

import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from smollm2.checkpoint import Checkpointer, find_latest, list_checkpoints, load_model_for_inference, resolve
from smollm2.config import load_config
from smollm2.distributed import init_distributed, shutdown
from smollm2.errors import CheckpointError
from smollm2.model import SmolLM

ROOT = Path(__file__).resolve().parents[1]
# The tiny preset made smaller still (the vocab stays: the train CLI opens the GPT-2-tokenized corpus with it).
SMALL = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.d_mlp=64", "data.seq_len=16",
         "train.device=cpu", "train.dtype=fp32", "train.compile=false"]
_GROUP_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def one_rank_group():
    """A one-rank gloo process group, its environment variables removed again afterwards (subprocesses the tests start
    later must not inherit them)."""
    assert not any(var in os.environ for var in _GROUP_VARS), "tests run outside torchrun"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        yield init_distributed("cpu")
    finally:
        shutdown()
        for var in _GROUP_VARS:
            os.environ.pop(var, None)


def small_config():
    return load_config(ROOT / "configs/tiny.yaml", SMALL)


def small_model(cfg, seed: int = 0):
    """A model and an AdamW that has taken one step (so the optimizer has state to save)."""
    model = SmolLM(cfg.model)
    model.init_weights(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(seed))
    model(idx[:, :-1], idx[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def save_steps(root: Path, steps, keep_last: int) -> dict[int, dict[str, torch.Tensor]]:
    """Save a checkpoint at each step (the weights differ between them); returns each step's model state."""
    cfg = small_config()
    saved = {}
    with one_rank_group():
        model, optimizer = small_model(cfg)
        checkpointer = Checkpointer(root, keep_last, rank=0, world_size=1)
        for step in steps:
            with torch.no_grad():
                model.norm.bias.fill_(step)  # mark the weights with the step
            path = checkpointer.save(step, model, optimizer, {"step": step, "tokens_seen": 10 * step}, cfg)
            assert path == root / f"step-{step:06d}"
            saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return saved


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "latest")


# ------------------------------------------------------------------------------------------------------------ retention


def test_keep_last_keeps_the_newest_and_points_latest_at_it(tmp_path):
    root = tmp_path / "checkpoints"
    # 999999 -> 1000000 gains a digit: the order is numeric, not by name
    save_steps(root, [5, 10, 999_999, 1_000_000], keep_last=2)
    assert step_dirs(root) == ["step-1000000", "step-999999"]  # nothing else left: no .tmp-*, no .latest.tmp
    assert os.readlink(root / "latest") == "step-1000000"  # relative: the run directory can be moved
    assert find_latest(root) == root / "step-1000000"
    assert [step for step, _ in list_checkpoints(root)] == [999_999, 1_000_000]
    assert resolve("latest", root) == root / "step-1000000"
    assert resolve(str(root / "latest"), root) == (root / "step-1000000").resolve()


def test_keep_last_zero_keeps_every_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    save_steps(root, [1, 2, 3, 4], keep_last=0)
    assert step_dirs(root) == ["step-000001", "step-000002", "step-000003", "step-000004"]
    assert find_latest(root) == root / "step-000004" and os.readlink(root / "latest") == "step-000004"


def test_load_restores_the_saved_weights_and_train_state(tmp_path):
    root = tmp_path / "checkpoints"
    saved = save_steps(root, [1, 2], keep_last=0)
    cfg = small_config()
    with one_rank_group():
        model, optimizer = small_model(cfg, seed=1)  # other weights
        state = Checkpointer(root, 0, rank=0, world_size=1).load(root / "step-000001", model, optimizer, cfg)
    assert state == {"step": 1, "tokens_seen": 10}
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[1][name]), name
    assert not torch.equal(saved[1]["norm.bias"], saved[2]["norm.bias"])  # the two checkpoints do differ


# ------------------------------------------------------------------------------------------------------------- resolve


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run with complete checkpoints at steps 1 and 2 and an interrupted save at step 3 (no COMPLETE marker)."""
    run = tmp_path_factory.mktemp("resolve") / "run"
    save_steps(run / "checkpoints", [1, 2], keep_last=0)
    shutil.copytree(run / "checkpoints/step-000002", run / "checkpoints/step-000003")
    (run / "checkpoints/step-000003/COMPLETE").unlink()
    return run


def test_resolve_latest_without_checkpoints_is_none(tmp_path):
    assert resolve("latest", tmp_path / "checkpoints") is None  # not even the directory yet
    (tmp_path / "checkpoints").mkdir()
    assert resolve("latest", tmp_path / "checkpoints") is None


def test_resolve_finds_the_newest_complete_checkpoint(run_dir):
    newest = (run_dir / "checkpoints/step-000002").resolve()
    ckpts = run_dir / "checkpoints"
    assert resolve("latest", ckpts).resolve() == newest  # the incomplete step 3 is skipped
    assert resolve(str(run_dir), ckpts).resolve() == newest  # a run directory
    assert resolve(str(ckpts), ckpts).resolve() == newest  # its checkpoints directory
    assert resolve(str(ckpts / "latest"), ckpts).resolve() == newest  # the symlink
    assert resolve(str(ckpts / "step-000001"), ckpts) == (ckpts / "step-000001").resolve()  # a checkpoint: itself


def test_resolve_refuses_bad_paths(run_dir, tmp_path):
    ckpts = run_dir / "checkpoints"
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve(str(tmp_path / "nope"), ckpts)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve(str(tmp_path / "empty"), ckpts)
    with pytest.raises(CheckpointError, match="interrupted") as err:
        resolve(str(ckpts / "step-000003"), ckpts)
    assert str(ckpts / "step-000003") in str(err.value)


# ------------------------------------------------------------------------------------------------------- damaged files


def damage(path: Path, how: str) -> None:
    """Damage the checkpoint's (first) shard file in place."""
    shard = sorted(path.glob("__*_*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    if how == "truncate":  # to a header: every tensor, model or optimizer, lies past the end
        shard.write_bytes(data[:64])
    elif how == "overwrite":  # the same size: only the contents tell
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(64)
        shard.write_bytes(data)
    else:
        shard.unlink()


def assert_one_line_naming(err: CheckpointError, path: Path, *words: str) -> None:
    message = str(err)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message


@pytest.fixture
def damaged(tmp_path, request) -> Path:
    save_steps(tmp_path / "checkpoints", [1], keep_last=0)
    path = tmp_path / "checkpoints/step-000001"
    damage(path, request.param)
    return path


@pytest.mark.parametrize(("damaged", "words"), [("truncate", ["bytes", "were written"]),
                                                 ("overwrite", ["sha256 differs"]),
                                                 ("delete", ["is missing"])], indirect=["damaged"])
def test_damaged_shard_is_refused_in_one_line(damaged, words):
    cfg = small_config()
    with one_rank_group():
        model, optimizer = small_model(cfg, seed=1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CheckpointError) as err:
            Checkpointer(damaged.parent, 0, rank=0, world_size=1).load(damaged, model, optimizer, cfg)
    assert_one_line_naming(err.value, damaged, "is damaged", "__0_0.distcp", *words)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # refused before anything was loaded
    with pytest.raises(CheckpointError) as err:
        load_model_for_inference(damaged)
    assert_one_line_naming(err.value, damaged, "is damaged", *words)


def test_damage_dcp_notices_is_one_line_without_recorded_digests(tmp_path):
    """A checkpoint whose meta.json has no digests (written before they were recorded) still loads through DCP, whose
    own error for a truncated shard (a CheckpointException: a BaseException with every rank's traceback in its text)
    becomes one line."""
    save_steps(tmp_path / "checkpoints", [1], keep_last=0)
    path = tmp_path / "checkpoints/step-000001"
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))
    damage(path, "truncate")
    cfg = small_config()
    with one_rank_group():
        model, optimizer = small_model(cfg)
        with pytest.raises(CheckpointError) as err:
            Checkpointer(path.parent, 0, rank=0, world_size=1).load(path, model, optimizer, cfg)
    assert_one_line_naming(err.value, path, "cannot load")
    with pytest.raises(CheckpointError) as err:
        load_model_for_inference(path)
    assert_one_line_naming(err.value, path, "cannot load")


def assert_cli_error(proc: subprocess.CompletedProcess, path: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], proc.stderr[-3000:]
    assert "sha256 differs" in lines[0]


@pytest.mark.parametrize("damaged", ["overwrite"], indirect=True)
def test_cli_refuses_a_damaged_checkpoint_in_one_line(damaged, shakespeare_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in _GROUP_VARS}
    generate = subprocess.run([sys.executable, "-m", "smollm2.generate", "--checkpoint", str(damaged), "--prompt", "A",
                               "--max-new-tokens", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert_cli_error(generate, damaged)
    train = subprocess.run([sys.executable, "-m", "smollm2.train", "--config", "configs/tiny.yaml", *SMALL,
                            f"data.path={shakespeare_data}", f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2",
                            "--resume", str(damaged)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert_cli_error(train, damaged)
    verify = subprocess.run([sys.executable, "-m", "smollm2.checkpoint", "verify", str(damaged.parent.parent), "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert_cli_error(verify, damaged)  # what launch/train.sh runs after each phase
