"""Checkpoints on CPU, in this process (a one-rank gloo group, a small model): retention (keep_last, milestones, final),
`resolve`, damaged files (and `--resume latest` falling back past them), fsync, the RNG files' safe format, a disk filling
up mid-save, saving in the background; and on two spawned gloo ranks, that rank 0 decides what the directory holds and
every rank follows, errors included (a rank is handed a stale view of the directory through `CheckpointStorage`)."""

import dataclasses
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from multirank import run_ranks  # tests/ helper
from tiny import ROOT, SMALL, parts, train

from smollm2.checkpoint import (
    Checkpointer,
    CheckpointStorage,
    file_digest,
    find_latest,
    list_checkpoints,
    resolve,
    step_dir_name,
)
from smollm2.checkpoint.__main__ import main as checkpoint_main
from smollm2.config import load_config
from smollm2.distributed import init_distributed, shutdown
from smollm2.errors import CheckpointError, ConfigError
from smollm2.model import SmolLM
from smollm2.serve.loading import load_model_for_inference


@contextmanager
def one_rank_group():
    """A one-rank gloo process group (an in-process store: nothing in the environment to undo)."""
    try:
        yield init_distributed("cpu")
    finally:
        shutdown()


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


def save_steps(root: Path, steps, keep_last: int, keep_every: int = 0, final=()) -> dict[int, dict[str, torch.Tensor]]:
    """Save a checkpoint at each step (the weights differ between them; the steps in `final` as a run's last); returns
    each step's model state."""
    cfg = small_config()
    saved = {}
    with one_rank_group():
        model, optimizer = small_model(cfg)
        checkpointer = Checkpointer(root, keep_last, rank=0, world_size=1, keep_every=keep_every)
        for step in steps:
            mark_and_save(checkpointer, step, model, optimizer, cfg, final=step in final)
            saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return saved


def mark_and_save(checkpointer: Checkpointer, step: int, model, optimizer, cfg, final: bool = False) -> Path:
    with torch.no_grad():
        model.norm.bias.fill_(step)  # mark the weights with the step
    path = checkpointer.save(step, parts(model, optimizer, step=step, tokens_seen=10 * step), cfg, final=final)
    assert path == checkpointer.root / f"step-{step:06d}"
    return path


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "latest")


class NodeView(CheckpointStorage):
    """The checkpoint directory as one node sees it: `listed`, if given, is its stale cached listing (complete
    checkpoints); `sees_complete`, a stale belief that every step is saved; `full_at`, the name of the file whose write
    fails as on a full disk."""

    def __init__(self, root: Path, listed: list[tuple[int, Path]] | None = None, sees_complete: bool = False,
                 full_at: str | None = None):
        super().__init__(root)
        self.listed, self.sees_complete, self.full_at = listed, sees_complete, full_at

    def complete(self):
        return super().complete() if self.listed is None else list(self.listed)

    def is_complete(self, path: Path) -> bool:
        return self.sees_complete or super().is_complete(path)

    def write_file(self, path: Path, write) -> None:
        self._fill(path)
        super().write_file(path, write)

    def write_json(self, path: Path, data) -> None:
        self._fill(path)
        super().write_json(path, data)

    def _fill(self, path: Path) -> None:
        if path.name == self.full_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


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
        loaded = parts(model, optimizer)
        Checkpointer(root, 0, rank=0, world_size=1).load(root / "step-000001", loaded, cfg)
    assert loaded["train"].state == {"step": 1, "tokens_seen": 10}
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[1][name]), name
    assert not torch.equal(saved[1]["norm.bias"], saved[2]["norm.bias"])  # the two checkpoints do differ


def test_load_keeps_how_this_run_updates(tmp_path):
    """The optimizer's state and hyperparameters come from the checkpoint; how the update runs (fused, foreach) stays
    this run's: a fused run's checkpoint resumes into an unfused optimizer unfused, with the same moments."""
    root = tmp_path / "checkpoints"
    cfg = small_config()
    with one_rank_group():
        model, _ = small_model(cfg)
        fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        model(*torch.randint(0, 1000, (2, 2, 8))).backward()
        fused.step()
        mark_and_save(Checkpointer(root, 0, rank=0, world_size=1), 1, model, fused, cfg)
        other, unfused = small_model(cfg, seed=1)
        Checkpointer(root, 0, rank=0, world_size=1).load(root / "step-000001", parts(other, unfused), cfg)
    assert [g["fused"] for g in fused.param_groups] == [True]
    assert [g["fused"] for g in unfused.param_groups] == [None]  # its own setting (None: not fused), not the file's
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(fused.state[p]["exp_avg_sq"], unfused.state[q]["exp_avg_sq"])


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
            Checkpointer(damaged.parent, 0, rank=0, world_size=1).load(damaged, parts(model, optimizer), cfg)
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
            Checkpointer(path.parent, 0, rank=0, world_size=1).load(path, parts(model, optimizer), cfg)
    assert_one_line_naming(err.value, path, "cannot load")
    with pytest.raises(CheckpointError) as err:
        load_model_for_inference(path)
    assert_one_line_naming(err.value, path, "cannot load")


# ------------------------------------------------------------------------------------------------ milestones, final


def test_milestones_and_final_checkpoints_are_never_pruned(tmp_path, capsys):
    """checkpoint.interval 2, keep_every 4, keep_last 2, steps 2..12 with preemption saves at 5 and 9 and the final one
    at 13; then a second phase's preemption saves at 14 and 15 must not rotate out phase 1's final step 13 (what
    launch/train.sh checks again when it is rerun)."""
    root = tmp_path / "checkpoints"
    save_steps(root, [2, 4, 5, 6, 8, 9, 10, 12, 13], keep_last=2, keep_every=4, final={13})
    assert step_dirs(root) == [f"step-{s:06d}" for s in (4, 8, 9, 10, 12, 13)]  # 2, 5, 6 rotated out
    assert [json.loads((root / name / "meta.json").read_text())["final"] for name in step_dirs(root)] == \
        [False] * 5 + [True]
    save_steps(root, [14, 15], keep_last=2, keep_every=4)  # phase 2, preempted twice
    assert step_dirs(root) == [f"step-{s:06d}" for s in (4, 8, 12, 13, 14, 15)]
    assert os.readlink(root / "latest") == "step-000015" and find_latest(root) == root / "step-000015"
    assert resolve("latest", root) == root / "step-000015"
    with one_rank_group():
        assert Checkpointer(root, 2, rank=0, world_size=1).choose("latest") == root / "step-000015"
    capsys.readouterr()
    assert checkpoint_main(["list", str(tmp_path)]) == 0 and capsys.readouterr().out.count("  final\n") == 1


def test_keep_every_zero_keeps_only_the_final_one_beyond_keep_last(tmp_path):
    root = tmp_path / "checkpoints"
    save_steps(root, [1, 2, 3, 4, 5], keep_last=1, keep_every=0, final={3})
    assert step_dirs(root) == ["step-000003", "step-000005"]


def test_resaving_the_step_this_run_resumed_from_marks_it_final(tmp_path):
    """A run resumed at the step it then ends at writes nothing new, but that checkpoint is now the run's final one."""
    root = tmp_path / "checkpoints"
    save_steps(root, [4], keep_last=1)
    assert not json.loads((root / "step-000004/meta.json").read_text())["final"]
    cfg = small_config()
    with one_rank_group():
        model, optimizer = small_model(cfg, seed=1)
        checkpointer = Checkpointer(root, 1, rank=0, world_size=1)
        checkpointer.load(checkpointer.choose("latest"), parts(model, optimizer), cfg)
        before = (root / "step-000004/__0_0.distcp").stat().st_mtime_ns
        checkpointer.save(4, parts(model, optimizer, step=4, tokens_seen=40), cfg, final=True)
    assert json.loads((root / "step-000004/meta.json").read_text())["final"] is True
    assert (root / "step-000004/__0_0.distcp").stat().st_mtime_ns == before  # nothing rewritten
    save_steps(root, [5, 6], keep_last=1)
    assert step_dirs(root) == ["step-000004", "step-000006"]


def test_keep_every_must_not_be_negative():
    with pytest.raises(ConfigError, match="checkpoint.keep_every"):
        load_config(ROOT / "configs/tiny.yaml", ["checkpoint.keep_every=-1"])


# ------------------------------------------------------------------------------------------ resume skips damage


def test_resume_latest_sets_damaged_checkpoints_aside_with_a_warning(tmp_path, capfd):
    root = tmp_path / "checkpoints"
    save_steps(root, [1, 2, 3], keep_last=0)
    damage(root / "step-000003", "overwrite")
    (root / "step-000002/meta.json").write_text("{not json")
    with one_rank_group():
        checkpointer = Checkpointer(root, 0, rank=0, world_size=1)
        with pytest.raises(CheckpointError) as named:  # named explicitly: an error, not a fallback, nothing moved
            checkpointer.choose(str(root / "step-000003"))
        assert_one_line_naming(named.value, root / "step-000003", "is damaged", "__0_0.distcp", "sha256 differs")
        assert checkpointer.choose("latest") == root / "step-000001"
        err = capfd.readouterr().err
        assert (f"warning: skipping {root / 'step-000003'}: __0_0.distcp has changed since it was written (sha256 "
                "differs); set aside as .damaged-step-000003, trying the checkpoint before it") in err
        assert f"warning: skipping {root / 'step-000002'}: {root / 'step-000002'}/meta.json is unreadable" in err
        assert step_dirs(root) == [".damaged-step-000002", ".damaged-step-000003", "step-000001"]
        assert os.readlink(root / "latest") == "step-000001"  # nothing treats the damaged ones as complete again
        with pytest.raises(CheckpointError, match="already holds checkpoints"):  # no --resume into a used run_dir
            checkpointer.choose(None)
        damage(root / "step-000001", "delete")
        with pytest.raises(CheckpointError, match="every checkpoint under .* is damaged"):
            checkpointer.choose("latest")
        assert not (root / "latest").exists()
        assert Checkpointer(tmp_path / "fresh", 0, rank=0, world_size=1).choose("latest") is None


# -------------------------------------------------------------- the lifecycle: nothing good lost, no save skipped


def resume(root: Path, spec: str, keep_last: int, cfg, model, optimizer) -> Checkpointer:
    """What a run does at its start: choose, load."""
    checkpointer = Checkpointer(root, keep_last, rank=0, world_size=1)
    checkpointer.load(checkpointer.choose(spec), parts(model, optimizer), cfg)
    return checkpointer


def test_retention_after_skipping_a_damaged_newest_keeps_the_new_save(tmp_path):
    """Checkpoints 1, 2, 3 and a damaged 5, keep_last=1: resume latest takes 3 (5 set aside); the save at 4 is kept and
    becomes `latest` (it used to be deleted at once, keeping only the damaged 5)."""
    root = tmp_path / "checkpoints"
    save_steps(root, [1, 2, 3, 5], keep_last=0)
    damage(root / "step-000005", "overwrite")
    cfg = small_config()
    with one_rank_group():
        model, optimizer = small_model(cfg, seed=1)
        checkpointer = resume(root, "latest", 1, cfg, model, optimizer)
        mark_and_save(checkpointer, 4, model, optimizer, cfg)
    assert step_dirs(root) == [".damaged-step-000005", "step-000004"]
    assert checkpointer.loaded == root / "step-000003"
    assert os.readlink(root / "latest") == "step-000004" and (root / "latest").resolve().is_dir()
    assert checkpoint_main(["verify", str(tmp_path), "4"]) == 0


def test_resuming_an_older_checkpoint_moves_the_newer_line_aside_and_saves(tmp_path, capfd):
    """Resume from 2 while 3 and 4 exist (e.g. to retry with another lr): 3 and 4 move to one folder, named in a warning;
    the save at 3 writes this run's state (it used to be skipped as 'already saved', keeping the old run's files), and
    retention does not count the abandoned 4 as newer."""
    root = tmp_path / "checkpoints"
    saved = save_steps(root, [1, 2, 3, 4], keep_last=0)
    cfg = small_config()
    with one_rank_group():
        model, optimizer = small_model(cfg, seed=1)
        checkpointer = resume(root, str(root / "step-000002"), 1, cfg, model, optimizer)
        folder = root / "abandoned-after-step-000002"
        assert f"the newer checkpoints step-000003, step-000004 are moved to {folder}" in capfd.readouterr().err
        assert os.readlink(root / "latest") == "step-000002"
        with torch.no_grad():
            model.norm.bias.fill_(30.0)  # this run's step 3
        checkpointer.save(3, parts(model, optimizer, step=3, tokens_seen=30), cfg)
    assert step_dirs(root) == ["abandoned-after-step-000002", "step-000003"]
    assert sorted(p.name for p in folder.iterdir()) == ["step-000003", "step-000004"]
    loaded, _, _ = load_model_for_inference(root / "latest")
    assert loaded.norm.bias[0].item() == 30.0  # the new run's weights, not the old line's
    old, _, _ = load_model_for_inference(folder / "step-000004")
    assert torch.equal(old.norm.bias, saved[4]["norm.bias"])  # the old line is intact


def test_a_complete_checkpoint_this_run_did_not_load_is_replaced_not_skipped(tmp_path, capfd):
    """A save at a step that holds another run's complete checkpoint writes this run's, and removes the old one only
    once the new one is committed."""
    root = tmp_path / "checkpoints"
    save_steps(root, [3], keep_last=0)
    cfg = small_config()
    with one_rank_group():
        model, optimizer = small_model(cfg, seed=1)
        with torch.no_grad():
            model.norm.bias.fill_(33.0)
        Checkpointer(root, 0, rank=0, world_size=1).save(3, parts(model, optimizer, step=3, tokens_seen=30), cfg)
    assert f"warning: replaced {root / 'step-000003'}" in capfd.readouterr().err
    assert step_dirs(root) == ["step-000003"]  # the old one removed after the commit, no leftover
    loaded, _, _ = load_model_for_inference(root / "step-000003")
    assert loaded.norm.bias[0].item() == 33.0



def test_a_save_killed_while_replacing_a_checkpoint_leaves_it_restored(tmp_path, capfd):
    """What a kill -9 between a replacing save's two renames leaves (the old step 3 set aside as .replaced-step-000003,
    the new one still .tmp-step-000003): the next resume renames the old one back and resumes from it. A leftover
    .replaced-* whose new step did commit is removed, and so is what a deletion cut short left."""
    root = tmp_path / "checkpoints"
    saved = save_steps(root, [2, 3], keep_last=0)
    shutil.copytree(root / "step-000003", root / ".tmp-step-000003")  # the new one, written, not yet committed
    os.rename(root / "step-000003", root / ".replaced-step-000003")
    shutil.copytree(root / "step-000002", root / ".replaced-step-000002")  # step 2 replaced, and committed
    shutil.copytree(root / "step-000002", root / ".removing-step-000001")  # a deletion cut short
    cfg = small_config()
    with one_rank_group():
        model, optimizer = small_model(cfg, seed=1)
        assert resume(root, "latest", 0, cfg, model, optimizer).loaded == root / "step-000003"
    assert "step-000003 is restored" in capfd.readouterr().err
    assert torch.equal(model.norm.bias, saved[3]["norm.bias"])
    assert step_dirs(root) == [".tmp-step-000003", "step-000002", "step-000003"]  # the .tmp-* goes with the next save


def test_resuming_from_outside_the_folder_moves_its_checkpoints_aside(tmp_path, capfd):
    """Back to an abandoned line (or on from another run's checkpoint): the checkpoints already in the folder are another
    line; they move to a folder of their own rather than being counted by keep_last, deleted, or named by `latest`."""
    root = tmp_path / "checkpoints"
    save_steps(root, [1, 2, 3, 4], keep_last=0)
    cfg = small_config()
    with one_rank_group():
        model, optimizer = small_model(cfg, seed=1)
        resume(root, str(root / "step-000002"), 0, cfg, model, optimizer)  # 3, 4 -> abandoned-after-step-000002
        mark_and_save(Checkpointer(root, 0, rank=0, world_size=1), 3, model, optimizer, cfg)
        back = root / "abandoned-after-step-000002" / "step-000004"
        checkpointer = resume(root, str(back), 1, cfg, model, optimizer)
        folder = root / "abandoned-for-step-000004-from-elsewhere"
        assert (f"{back} is not in {root}: its checkpoints step-000001, step-000002, step-000003 are moved to {folder}"
                in capfd.readouterr().err)
        for step in (5, 6, 7):
            mark_and_save(checkpointer, step, model, optimizer, cfg)
    assert step_dirs(root) == ["abandoned-after-step-000002", "abandoned-for-step-000004-from-elsewhere", "step-000007"]
    assert step_dirs(folder) == ["step-000001", "step-000002", "step-000003"]
    assert os.readlink(root / "latest") == "step-000007"


def test_a_latest_link_that_cannot_be_made_is_a_warning(tmp_path, capfd):
    """`latest` is a convenience: where it cannot be made (here a directory holds its name; a filesystem without
    symlinks alike), resuming and saving go on with a warning."""
    root = tmp_path / "checkpoints"
    save_steps(root, [1], keep_last=0)
    (root / "latest").unlink()
    (root / "latest" / "x").mkdir(parents=True)
    cfg = small_config()
    with one_rank_group():
        model, optimizer = small_model(cfg, seed=1)
        checkpointer = resume(root, "latest", 0, cfg, model, optimizer)
        mark_and_save(checkpointer, 2, model, optimizer, cfg)
    assert f"warning: could not point {root / 'latest'} at step-000002" in capfd.readouterr().err
    assert checkpoint_main(["verify", str(tmp_path), "2"]) == 0


# ---------------------------------------------------------------------------------------------------- durability


def test_save_fsyncs_its_files_and_then_the_directories(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    root = tmp_path / "checkpoints"
    save_steps(root, [1], keep_last=0)
    tmp = str(root / ".tmp-step-000001")
    for name in ("__0_0.distcp", ".metadata.tmp", "rng/rank-00000.pt", "train_state.json.tmp", "config.yaml",
                 "meta.json.tmp", "COMPLETE"):  # DCP's (sync_files) and ours
        assert f"{tmp}/{name}" in synced, (name, synced)
    assert synced.index(f"{tmp}/rng") < synced.index(tmp) < len(synced) - 1 - synced[::-1].index(str(root))
    assert synced.index(f"{tmp}/COMPLETE") < synced.index(tmp)  # the marker, then its directory entry, then the rename


# ------------------------------------------------------------------------------------------------------- RNG files


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.normal(), random.random(), random.gauss(0, 1)


def test_rng_files_load_with_weights_only_and_restore_every_generator(tmp_path):
    cfg = small_config()
    root = tmp_path / "checkpoints"
    with one_rank_group():
        model, optimizer = small_model(cfg)
        torch.manual_seed(1), np.random.seed(2), random.seed(3)
        np.random.normal(), random.gauss(0, 1)  # the cached second Gaussians are part of the states too
        checkpointer = Checkpointer(root, 0, rank=0, world_size=1)
        path = mark_and_save(checkpointer, 1, model, optimizer, cfg)
        expected = draws()
        draws()
        checkpointer.load(path, parts(model, optimizer), cfg)
        assert draws() == expected
    state = torch.load(path / "rng/rank-00000.pt", weights_only=True)  # plain tensors, lists and numbers
    assert set(state) >= {"cpu", "numpy", "python"}
    assert json.loads((path / "meta.json").read_text())["rng_format"] == 2


class _RunsCode:
    """Unpickling this creates a file: what a crafted pickle in a checkpoint could do (any call, not just this one)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def record_digest(path: Path, name: str, **meta_changes) -> None:
    """Record a rewritten file's digest in meta.json, as whoever crafted it would (it protects against accidents only)."""
    meta = json.loads((path / "meta.json").read_text())
    meta["files"][name] = file_digest(path / name)
    meta.update(meta_changes)
    (path / "meta.json").write_text(json.dumps(meta))


def craft(path: Path, payload: str, marker: Path) -> None:
    """Make the checkpoint at `path` run code when read carelessly: its .metadata, a DCP byte item (the optimizer's
    param_groups lr, moved to the payload appended to the shard) or its RNG file."""
    import pickle

    if payload == "metadata":
        (path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
        record_digest(path, ".metadata")
    elif payload == "byte item":
        metadata = pickle.loads((path / ".metadata").read_bytes())
        index = next(i for i in metadata.storage_data if i.fqn == "optim.param_groups.0.lr")
        shard = path / metadata.storage_data[index].relative_path
        buffer = io.BytesIO()
        torch.save(_RunsCode(marker), buffer)
        offset = shard.stat().st_size
        shard.write_bytes(shard.read_bytes() + buffer.getvalue())
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], offset=offset,
                                                           length=len(buffer.getvalue()))
        (path / ".metadata").write_bytes(pickle.dumps(metadata))
        record_digest(path, shard.name)
        record_digest(path, ".metadata")
    else:
        torch.save({"cpu": _RunsCode(marker)}, path / "rng/rank-00000.pt")
        record_digest(path, "rng/rank-00000.pt", rng_format=2)  # format 2 promises plain data


def entry_points(path: Path, tmp_path: Path) -> dict[str, object]:
    """What each entry point that reads a checkpoint does with it, in this process: the error it raises, or None."""
    from smollm2.serve.app import hf_folder
    from smollm2.serve.export import export
    from smollm2.serve.generate import main as generate_main

    cfg = small_config()
    results: dict[str, object] = {}

    def attempt(name, fn):
        try:
            fn()
            results[name] = None
        except CheckpointError as err:
            results[name] = err

    def resume():
        with one_rank_group():
            model, optimizer = small_model(cfg, seed=1)
            checkpointer = Checkpointer(path.parent, 0, rank=0, world_size=1)
            checkpointer.load(checkpointer.choose(str(path)), parts(model, optimizer), cfg)

    attempt("--resume", resume)
    attempt("generate", lambda: generate_main(["--checkpoint", str(path), "--prompt", "A", "--max-new-tokens", "2"]))
    attempt("export", lambda: export(str(path), tmp_path / "export", fmt="safetensors"))
    attempt("the app", lambda: hf_folder(str(path)))
    attempt("verify", lambda: checkpoint_main(["verify", str(path.parent.parent), "1"]))
    return results


@pytest.mark.parametrize("payload", ["metadata", "byte item", "rng"])
@pytest.mark.parametrize("digests", ["recorded", "absent"])
def test_a_crafted_checkpoint_runs_no_code_from_any_entry_point(tmp_path, payload, digests):
    """Whoever writes a shard can write meta.json: each pickled part is read so that it cannot call anything. A crafted
    one is refused in one line, by every entry point, with its digests recorded (verify reads the parts as a load
    would) or without them (a checkpoint from before digests: the loads themselves refuse what they read; inference
    reads neither the optimizer's byte items nor the RNG files)."""
    root = tmp_path / "run" / "checkpoints"
    save_steps(root, [1], keep_last=0)
    path, marker = root / "step-000001", tmp_path / "code-ran"
    craft(path, payload, marker)
    if digests == "absent":
        meta = json.loads((path / "meta.json").read_text())
        del meta["files"]
        (path / "meta.json").write_text(json.dumps(meta))
    results = entry_points(path, tmp_path)
    assert not marker.exists(), "code from the checkpoint ran"
    for name, err in results.items():
        if digests == "absent" and name == "verify":  # nothing recorded to check against
            continue
        if digests == "absent" and payload != "metadata" and name != "--resume":  # inference reads only the weights
            continue
        assert err is not None, f"{name} loaded a crafted {payload}"
        assert "not a trusted checkpoint format" in str(err) and "\n" not in str(err), (name, str(err))
    if results["export"] is not None:  # a refusal writes nothing
        assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".tmp-export"))
    if results["the app"] is not None:
        assert not (root.parent / "export").exists()


def test_a_metadata_file_cannot_change_a_class_it_may_name(tmp_path):
    """.metadata may name pathlib's path classes (DCP records the checkpoint id as one), not set state on the class
    itself: a BUILD on PosixPath (replacing its is_file for the whole process) is refused before it applies."""
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    from smollm2.checkpoint.trust import read_metadata

    legit = pickle.dumps(Metadata(state_dict_metadata={"a": BytesStorageMetadata()}), protocol=2)
    change = b"cpathlib\nPosixPath\nN}X\x07\x00\x00\x00is_fileccollections\nOrderedDict\ns\x86b0"
    (tmp_path / ".metadata").write_bytes(legit[:2] + change + legit[2:])
    with pytest.raises(CheckpointError, match="not a trusted checkpoint format .*sets the state of type"):
        read_metadata(tmp_path)
    assert (tmp_path / ".metadata").is_file() is True


def test_rng_files_of_the_old_pickled_format_are_not_read(tmp_path, capfd):
    """meta.json without "rng_format" (checkpoints before it) says the RNG files are pickled objects: they are not read
    (that would run whatever they hold); the run resumes with its RNG from the seed, and a warning says so."""
    cfg = small_config()
    root = tmp_path / "checkpoints"
    save_steps(root, [1], keep_last=0)
    path, marker = root / "step-000001", tmp_path / "code-ran"
    torch.save({"cpu": _RunsCode(marker)}, path / "rng/rank-00000.pt")
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["rng/rank-00000.pt"] = file_digest(path / "rng/rank-00000.pt")
    del meta["rng_format"]
    (path / "meta.json").write_text(json.dumps(meta))
    with one_rank_group():
        model, optimizer = small_model(cfg)
        loaded = parts(model, optimizer)
        Checkpointer(root, 0, rank=0, world_size=1).load(path, loaded, cfg)
    assert loaded["train"].state["step"] == 1 and not marker.exists()
    assert "RNG files are of the older pickled format, which is not read" in capfd.readouterr().err


# ------------------------------------------------------------------------------------------------------- disk full


def fill_disk(monkeypatch, checkpointer: Checkpointer, where: str) -> None:
    """Make the next save run out of space at `where`: in DCP's shard writes (after part of a shard), in this rank's RNG
    file, or in rank 0's meta.json."""
    if where == "shards":
        def write_then_fail(transforms, stream, data, *args):
            stream.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(dcp_filesystem, "_write_item", write_then_fail)
    else:
        monkeypatch.setattr(checkpointer.storage, "full_at", {"rng": "rank-00000.pt", "meta": "meta.json"}[where])


def assert_previous_is_intact(root: Path, failed_step: int, previous_step: int) -> None:
    assert not list(root.glob(".tmp-*")) and not (root / step_dir_name(failed_step)).exists()
    assert find_latest(root) == root / step_dir_name(previous_step)
    assert os.readlink(root / "latest") == step_dir_name(previous_step)
    assert checkpoint_main(["verify", str(root.parent), str(previous_step)]) == 0


@pytest.mark.parametrize("where", ["shards", "rng", "meta"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    cfg = small_config()
    root = tmp_path / "checkpoints"
    with one_rank_group():
        model, optimizer = small_model(cfg)
        checkpointer = Checkpointer(root, 1, rank=0, world_size=1, storage=NodeView(root))
        mark_and_save(checkpointer, 2, model, optimizer, cfg)
        with monkeypatch.context() as patch:
            fill_disk(patch, checkpointer, where)
            with pytest.raises(CheckpointError) as err:
                mark_and_save(checkpointer, 3, model, optimizer, cfg)
        assert str(err.value).startswith(f"disk full while saving step 3 to {root / 'step-000003'}; the previous "
                                         f"checkpoint step 2 is intact ({root / 'step-000002'})")
        assert "\n" not in str(err.value)
        assert_previous_is_intact(root, 3, 2)
        assert checkpointer.choose("latest") == root / "step-000002"
        mark_and_save(checkpointer, 3, model, optimizer, cfg)  # space again: the same step saves
    assert step_dirs(root) == ["step-000003"]


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB tmpfs (as root, as CI runs): room for one SMALL checkpoint (~19 MB), not for two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)],
                                           capture_output=True, timeout=30).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30)


@pytest.mark.e2e
def test_a_really_full_disk_is_one_line_and_keeps_the_previous_checkpoint(small_disk, shakespeare_data):
    """torch's writer reports a full disk as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`, which
    used to escape as an 81-line traceback: the trainer says it in one line, and step 1 stays the intact latest."""
    run = small_disk / "run"
    proc = train(0, run, shakespeare_data, *SMALL, "train.max_steps=3", "checkpoint.interval=1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: disk full while saving step 2 to {run / 'checkpoints/step-000002'}; the previous checkpoint step 1 is "
        "intact"), proc.stderr[-3000:]
    assert_previous_is_intact(run / "checkpoints", 2, 1)


# ------------------------------------------------------------------------------------------ saving in the background


def test_async_save_holds_the_state_of_its_step_and_commits_it(tmp_path):
    cfg = small_config()
    root = tmp_path / "checkpoints"
    with one_rank_group():
        model, optimizer = small_model(cfg)
        checkpointer = Checkpointer(root, 0, rank=0, world_size=1, async_save=True)
        path = mark_and_save(checkpointer, 3, model, optimizer, cfg)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():  # training goes on while the files are written: the checkpoint keeps step 3's weights
            for p in model.parameters():
                p.add_(1.0)
        assert checkpointer.wait() == path
        assert find_latest(root) == path and os.readlink(root / "latest") == path.name
        assert checkpoint_main(["verify", str(root.parent), "3"]) == 0
        assert checkpointer.wait() is None  # nothing in flight any more
        mark_and_save(checkpointer, 4, model, optimizer, cfg)  # the next save waits for nothing, then runs
        checkpointer.wait()
    loaded, _, step = load_model_for_inference(path)
    assert step == 3
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert [s for s, _ in list_checkpoints(root)] == [3, 4]


def test_async_save_failure_is_raised_by_the_next_save(tmp_path, monkeypatch):
    cfg = small_config()
    root = tmp_path / "checkpoints"
    with one_rank_group():
        model, optimizer = small_model(cfg)
        checkpointer = Checkpointer(root, 0, rank=0, world_size=1, async_save=True)
        mark_and_save(checkpointer, 2, model, optimizer, cfg)
        checkpointer.wait()
        with monkeypatch.context() as patch:
            fill_disk(patch, checkpointer, "shards")
            mark_and_save(checkpointer, 3, model, optimizer, cfg)  # returns: the write fails in the background
            with pytest.raises(CheckpointError) as err:
                checkpointer.wait()
        assert str(err.value).startswith(f"disk full while saving step 3 to {root / 'step-000003'}; the previous "
                                         f"checkpoint step 2 is intact")
        assert_previous_is_intact(root, 3, 2)


_KILLED_MID_WRITE = """
import os, signal, sys, time
from pathlib import Path
root = Path(sys.argv[1])
import torch.distributed.checkpoint.filesystem as fs
from test_checkpoint import Checkpointer, mark_and_save, one_rank_group, small_config, small_model
cfg = small_config()
with one_rank_group():
    model, optimizer = small_model(cfg)
    checkpointer = Checkpointer(root, 0, rank=0, world_size=1, async_save=True)
    mark_and_save(checkpointer, 1, model, optimizer, cfg)
    checkpointer.wait()
    writing = fs._write_files_from_queue
    def slow(*args, **kwargs):  # the background write: its files on disk, then stuck before the commit
        writing(*args, **kwargs)
        time.sleep(60)
    fs._write_files_from_queue = slow
    mark_and_save(checkpointer, 2, model, optimizer, cfg)
    deadline = time.monotonic() + 30
    while not list((root / ".tmp-step-000002").glob("*.distcp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    print("writing", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # a crash while step 2 is written in the background
"""


@pytest.mark.e2e
def test_kill_during_a_background_write_leaves_the_previous_checkpoint_latest(tmp_path):
    root = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(root)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL and "writing" in proc.stdout, proc.stderr[-3000:]
    assert list(root.glob(".tmp-step-000002/*.distcp"))  # killed mid-write
    assert not (root / "step-000002").exists()
    assert find_latest(root) == root / "step-000001" and os.readlink(root / "latest") == "step-000001"
    assert checkpoint_main(["verify", str(root.parent), "1"]) == 0
    cfg = small_config()
    with one_rank_group():
        model, optimizer = small_model(cfg)
        checkpointer = Checkpointer(root, 0, rank=0, world_size=1, async_save=True)
        assert checkpointer.choose("latest") == root / "step-000001"
        mark_and_save(checkpointer, 2, model, optimizer, cfg)  # the leftover is replaced
        checkpointer.wait()
    assert [s for s, _ in list_checkpoints(root)] == [1, 2] and not list(root.glob(".tmp-*"))


# --------------------------------------------------------------------------- two ranks: rank 0 decides, all follow
# Two spawned processes joined by a FileStore gloo group (no torchrun), so one rank can be handed a stale view of the
# directory (a NodeView) while the other sees the truth. The group's timeout bounds every collective: a rank left
# waiting for another fails within GROUP_TIMEOUT_S instead of hanging, and the test's own deadline is above it.

GROUP_TIMEOUT_S = 20


def two_ranks(scenario, *args, tmp_path: Path, deadline_s: float = 90) -> list[tuple[str, object]]:
    """scenario(rank, *args) on two ranks: [(status, value)] by rank; an error's value is its one-line message."""
    results = run_ranks(scenario, [args, args], tmp_path, timeout=deadline_s, group_timeout_s=GROUP_TIMEOUT_S)
    return [(status, value if status == "ok" else value.splitlines()[0]) for status, value in results]


def _save_two_ranks(rank: int, root: Path, steps: list[int]) -> tuple:
    """Both ranks save `steps` (seeing the directory as it is); returns the model and optimizer, marked with the last."""
    torch.set_num_threads(1)
    cfg = small_config()
    model, optimizer = small_model(cfg)
    checkpointer = Checkpointer(root, 0, rank=rank, world_size=2)
    for step in steps:
        mark_and_save(checkpointer, step, model, optimizer, cfg)
    return cfg, model, optimizer


def _resume_with_a_stale_listing(rank: int, root: Path) -> tuple:
    """Steps 1 and 2 are saved; then rank 1's node still lists the directory as it was before step 2 was."""
    cfg, model, optimizer = _save_two_ranks(rank, root, [1, 2])
    with torch.no_grad():
        model.norm.bias.fill_(-1.0)  # forget the weights: the load must bring step 2's back
    view = NodeView(root, listed=[(1, root / "step-000001")]) if rank == 1 else None
    checkpointer = Checkpointer(root, 0, rank=rank, world_size=2, storage=view)
    chosen = checkpointer.choose("latest")
    loaded = parts(model, optimizer)
    checkpointer.load(chosen, loaded, cfg, verified=True)
    return chosen.name, loaded["train"].state["step"], float(model.norm.bias[0])


@pytest.mark.multirank
def test_ranks_resume_from_rank_0s_choice_despite_a_stale_listing(tmp_path):
    root = tmp_path / "checkpoints"
    assert two_ranks(_resume_with_a_stale_listing, root, tmp_path=tmp_path) == [("ok", ("step-000002", 2, 2.0))] * 2
    assert step_dirs(root) == ["step-000001", "step-000002"]
    assert json.loads((root / "step-000002/meta.json").read_text())["world_size"] == 2


def _save_with_a_stale_complete_marker(rank: int, root: Path) -> str:
    """Rank 1 believes step 2 is already saved (e.g. it sees a stale copy); rank 0 knows it is not."""
    torch.set_num_threads(1)
    cfg = small_config()
    model, optimizer = small_model(cfg)
    view = NodeView(root, sees_complete=True) if rank == 1 else None
    mark_and_save(Checkpointer(root, 0, rank=rank, world_size=2, storage=view), 2, model, optimizer, cfg)
    return "saved"


@pytest.mark.multirank
def test_already_saved_is_decided_by_rank_0(tmp_path):
    root = tmp_path / "checkpoints"
    assert two_ranks(_save_with_a_stale_complete_marker, root, tmp_path=tmp_path) == [("ok", "saved")] * 2
    assert step_dirs(root) == ["step-000002"] and checkpoint_main(["verify", str(tmp_path), "2"]) == 0


def _errors_reach_every_rank(rank: int, root: Path, missing: str) -> list[str]:
    """Step 2 is saved; then rank 1 sees no checkpoints (stale) where rank 0 sees it; then a bad path; then a disk full
    on rank 1 alone."""
    cfg, model, optimizer = _save_two_ranks(rank, root, [2])
    view = NodeView(root, listed=[]) if rank == 1 else NodeView(root)
    checkpointer = Checkpointer(root, 1, rank=rank, world_size=2, storage=view)
    errors = []
    for spec in (None, missing):  # without --resume into a run_dir that has checkpoints; a path that does not exist
        try:
            checkpointer.choose(spec)
        except CheckpointError as err:
            errors.append(str(err))
    if rank == 1:
        view.listed, view.full_at = None, "rank-00001.pt"
    try:
        mark_and_save(checkpointer, 3, model, optimizer, cfg)
    except CheckpointError as err:
        errors.append(str(err))
    return errors


@pytest.mark.multirank
def test_errors_reach_every_rank_as_the_same_line(tmp_path):
    root = tmp_path / "checkpoints"
    missing = str(tmp_path / "nope")
    results = two_ranks(_errors_reach_every_rank, root, missing, tmp_path=tmp_path)
    assert results[0] == results[1], results
    status, errors = results[0]
    assert status == "ok" and len(errors) == 3, results
    assert errors[0].startswith(f"{tmp_path} already holds checkpoints (latest: step-000002)")
    assert errors[1] == f"checkpoint not found: {missing}"
    assert errors[2].startswith(f"disk full while saving step 3 to {root / 'step-000003'}; the previous checkpoint step 2")
    assert_previous_is_intact(root, 3, 2)


def _load_with_a_damaged_shard(rank: int, root: Path) -> str:
    """Step 1 is saved; rank 0 damages rank 1's shard in place (the same size); both ranks verify before loading, each
    hashing a share of the files: rank 0's share holds rank 1's shard."""
    import torch.distributed as dist

    cfg, model, optimizer = _save_two_ranks(rank, root, [1])
    path = root / "step-000001"
    if rank == 0:
        shard = path / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
        shard.write_bytes(data)
    dist.barrier()
    Checkpointer(root, 0, rank=rank, world_size=2).load(path, parts(model, optimizer), cfg)
    return "loaded"


@pytest.mark.multirank
def test_a_damaged_shard_is_refused_by_every_rank(tmp_path):
    """meta.json records each shard's sha256; on resume the ranks each hash a share and share what they found: the
    rank that did not hash the damaged file refuses too, with the same line."""
    root = tmp_path / "checkpoints"
    results = two_ranks(_load_with_a_damaged_shard, root, tmp_path=tmp_path)
    message = f"{root / 'step-000001'} is damaged: __1_0.distcp has changed since it was written (sha256 differs)"
    assert [status for status, _ in results] == ["CheckpointError"] * 2, results
    assert all(value.startswith(message) for _, value in results), results


# ------------------------------------------------------------------------------------------------------------- chaos


def _chaos_seeds() -> list[int]:
    runs = int(os.environ.get("SMOLLM2_CHAOS_RUNS", "1"))
    return [0] if runs == 1 else [random.randrange(1 << 30) for _ in range(runs)]


def _plant_a_damaged_newer_checkpoint(root: Path, rnd: random.Random) -> None:
    """A copy of the newest good checkpoint at a step above every other, one shard damaged (a trap for retention)."""
    from smollm2.checkpoint.integrity import problems

    found = list_checkpoints(root)
    good = [(step, path) for step, path in found if not problems(path, json.loads((path / "meta.json").read_text()))]
    if not good:
        return
    newest = good[-1][1]
    fake = root / step_dir_name(found[-1][0] + rnd.randint(1, 50))
    if fake.exists():
        return
    shutil.copytree(newest, fake)
    meta = json.loads((fake / "meta.json").read_text())
    (fake / "meta.json").write_text(json.dumps({**meta, "step": int(fake.name[5:]), "final": False}))
    damage(fake, rnd.choice(["overwrite", "truncate", "delete"]))


def _saving_since(root: Path, launched: float) -> bool:
    """A save of this process is being written: a .tmp-step-* changed since it started (one a killed attempt left behind
    is not one; it is removed by the next save)."""
    for tmp in root.glob(".tmp-step-*"):
        try:
            if tmp.stat().st_mtime >= launched:
                return True
        except FileNotFoundError:  # committed or removed meanwhile
            pass
    return False


def _kill_at_random(cmd: list[str], run: Path, rnd: random.Random, deadline_s: float = 120) -> int | None:
    """Start the run and, once it trains (a new line in metrics.jsonl) and a random time has passed, kill -9 it: at a
    random point of its next save, or at once (between saves). Returns its exit status if it ended by itself first."""
    metrics = run / "metrics.jsonl"
    lines_before = metrics.stat().st_size if metrics.exists() else 0
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    during_a_save, after = rnd.random() < 0.6, rnd.uniform(0.0, 2.0)
    deadline, started = time.monotonic() + deadline_s, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if started is None and metrics.exists() and metrics.stat().st_size > lines_before:
                started = time.monotonic()
            if started is not None and time.monotonic() - started > after:
                if not during_a_save or _saving_since(run / "checkpoints", launched):
                    time.sleep(rnd.uniform(0.0, 0.05) if during_a_save else 0.0)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    return None
            time.sleep(0.005)
        assert proc.poll() is not None, "the run neither ended nor was killed in time"
        assert "every checkpoint" not in proc.stderr.read()
        return proc.returncode
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.e2e
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", _chaos_seeds())
def test_chaos_kills_during_saves_and_planted_damage_never_lose_every_checkpoint(shakespeare_data, tmp_path, seed):
    """keep_last=1, a checkpoint every step, kill -9 at random moments (often mid-save), and between attempts a damaged
    newer checkpoint planted at random: after every attempt there is a verified checkpoint, and the run always gets to
    its end with a verified `latest`, never "every checkpoint is damaged". `SMOLLM2_CHAOS_RUNS=10` repeats it with
    random seeds."""
    rnd = random.Random(seed)
    run = tmp_path / "run"
    root = run / "checkpoints"
    cmd = [sys.executable, "-m", "smollm2.train", "--config", "configs/tiny.yaml", *SMALL, f"data.path={shakespeare_data}",
           f"train.run_dir={run}", "train.max_steps=15", "checkpoint.interval=1", "checkpoint.keep_last=1",
           "checkpoint.keep_every=0", "logging.interval=1", "--resume", "latest"]
    for attempt in range(12):
        code = _kill_at_random(cmd, run, rnd)
        if list_checkpoints(root):
            assert checkpoint_main(["latest-step", "--verify", str(run)]) == 0, f"attempt {attempt}: nothing verifies"
        if code == 0:
            break
        assert code is None, f"attempt {attempt} failed with exit status {code}"
        if rnd.random() < 0.7:
            _plant_a_damaged_newer_checkpoint(root, rnd)
    else:  # killed every time: the last attempt runs to the end
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert checkpoint_main(["verify", str(run), "15"]) == 0
    assert os.readlink(root / "latest") == "step-000015"
