"""The checkpoint manager: which checkpoint to resume from, saving (in the foreground or the background), loading, and
retention. Every public method is collective: all ranks call it, in the same order.

A run hands the manager its stateful parts (each with `state_dict` / `load_state_dict`, torchtitan's pattern):

    parts = {"model": ModelAndOptimizer(model, optimizer), "train": train_state, "loader": loader, "schedule": schedule}

"model" is written sharded by DCP (every rank its part; DCP reshards on load, so a checkpoint resumes at any world
size); every other part as JSON in train_state.json: "train" at its top level, the others under their names.
`ModelWeights(model)` is the model alone: what `python -m smollm2.convert` saves, and what `load_model` (train.init_from)
reads from any checkpoint.

The lifecycle (docs/checkpoints.md, "What is guaranteed"):
- Resuming sets aside what would otherwise be mistaken for this run's line: `--resume latest` renames a damaged newer
  checkpoint to `.damaged-step-N` (named in a warning) and takes the one before it; a resume from an older checkpoint
  moves the newer ones into `abandoned-after-step-N/`. So every complete checkpoint left is of the line this run
  continues, and nothing is deleted.
- A save is skipped only at the step of the checkpoint this run resumed from; any other complete checkpoint at that step
  is replaced (the old one removed only after the new one is committed).
- Retention never deletes the checkpoint just written: checkpoints at multiples of `keep_every` and each run's final one
  are kept forever; only the others rotate under `keep_last`. `latest` is pointed after retention, at one that exists.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

from smollm2.checkpoint.background import BackgroundSave, host_stager, start_write
from smollm2.checkpoint.integrity import damaged, problems, verify_files
from smollm2.checkpoint.layout import (
    CheckpointStorage,
    checkpoint_step,
    is_final,
    read_meta,
    read_train_state,
    resolve,
    step_dir_name,
)
from smollm2.checkpoint.rng import load_rng
from smollm2.checkpoint.save import SaveJob, root_cause, warn
from smollm2.checkpoint.trust import TrustedPlanner, TrustedReader
from smollm2.config import MAY_DIFFER_ON_RESUME, Config, ModelConfig, to_dict
from smollm2.distributed import every_rank, rank0_decides
from smollm2.errors import CheckpointError

# Optimizer param-group keys that say how the update runs, not what it computes: loading keeps the running optimizer's.
_UPDATE_IMPLEMENTATION = ("foreach", "fused", "capturable")
# A train_state.json key: the checkpoint holds the model's weights alone (ModelWeights), so no run can continue from it.
WEIGHTS_ONLY = "weights_only"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelAndOptimizer:
    """The sharded part of a checkpoint: the model's and the optimizer's state as DCP sees them (full names, DTensor
    shards), loaded back into this run's (possibly differently sharded) model and optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        how = [{k: group[k] for k in _UPDATE_IMPLEMENTATION if k in group} for group in self.optimizer.param_groups]
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for group, flags in zip(self.optimizer.param_groups, how):  # this run's choice (optim.fused, the device), not
            group.update(flags)  # the checkpoint's: a GPU run's fused update resumed on CPU runs as configured there


class ModelWeights:
    """The model alone, under the entry ModelAndOptimizer saves it in ("model"): what `python -m smollm2.convert` saves
    (a step-0 checkpoint without optimizer state, WEIGHTS_ONLY in its train state), and what `train.init_from` reads
    from any checkpoint (its optimizer's entries are left unread)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return {"model": get_model_state_dict(self.model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"])


def check_model_matches(meta: dict[str, Any], cfg: Config, path: Path,
                        fix: str = "resume with the same model config or start a new run_dir") -> None:
    """The checkpoint's model section against this run's: every key but those a resume may change must be equal."""
    # A key the checkpoint lacks was added since it was written: it was written with the default. n_kv_head: null and
    # n_head are the same shape.
    saved = {**to_dict(ModelConfig()), **meta.get("model", {})}
    current = to_dict(cfg.model)
    for section in (saved, current):
        section["n_kv_head"] = section["n_kv_head"] or section["n_head"]
    diffs = [f"model.{k}: checkpoint {saved[k]!r}, config {current[k]!r}" for k in current
             if k not in MAY_DIFFER_ON_RESUME and saved[k] != current[k]]
    if diffs:
        raise CheckpointError(f"{path} was written for another model shape ({'; '.join(diffs)}); {fix}")


def refuse_weights_only(path: Path, train_state: dict[str, Any]) -> None:
    """A resume needs the optimizer state and the data position, which a weights-only checkpoint does not hold."""
    if train_state.get(WEIGHTS_ONLY):
        raise CheckpointError(f"{path} holds weights only (python -m smollm2.convert wrote it: no optimizer state, no data "
                              f"position), so no run continues from it: start a new run from it with "
                              f"train.init_from={path} instead of --resume")


def load_sharded(path: Path, part: Stateful) -> None:
    """Collective: DCP reads `part`'s entries of the checkpoint at `path` into it, resharded to this world size (DCP shares
    its failures between the ranks; nothing in the files runs as code: trust.py)."""
    state = part.state_dict()
    try:
        dcp.load(state, storage_reader=TrustedReader(path), planner=TrustedPlanner(path))
    except (Exception, CheckpointException) as err:  # DCP raises assorted errors for damaged/foreign files
        raise load_failure(path, err) from None
    part.load_state_dict(state)


def load_failure(path: Path, err: BaseException) -> CheckpointError:
    """What DCP raised, as one line naming the checkpoint (the first rank's error, not every rank's traceback)."""
    err = root_cause(err)
    if isinstance(err, CheckpointError):  # ours, raised inside DCP's load (an untrusted byte item)
        return err
    lines = str(err).strip().splitlines()
    detail = lines[0][:300] if lines else "no message (a truncated or damaged file?)"
    return CheckpointError(f"cannot load {path}: {type(err).__name__}: {detail}")


class Checkpointer:
    """A run's checkpoints under `ckpt_root` (`storage`: the directory as this rank sees it; see layout.py)."""

    def __init__(self, ckpt_root: str | Path, keep_last: int, rank: int, world_size: int, keep_every: int = 0,
                 async_save: bool = False, storage: CheckpointStorage | None = None):
        self.storage = storage or CheckpointStorage(ckpt_root)
        assert self.storage.root == Path(ckpt_root), (self.storage.root, ckpt_root)
        self.root = self.storage.root
        self.keep_last, self.keep_every, self.rank, self.world_size = keep_last, keep_every, rank, world_size
        self.async_save = async_save
        # The background save's collectives run on a gloo group of their own (DCP plans on the CPU).
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self._pending: BackgroundSave | None = None
        self._stager = host_stager() if async_save else None
        self.loaded: Path | None = None  # the checkpoint this run resumed from: a save at its step is already done

    # ---------------------------------------------------------------------------------------------------- resume

    def choose(self, spec: str | None) -> Path | None:
        """The checkpoint to resume from, the same on every rank: rank 0 looks at the directory and checks the
        checkpoint's files against meta.json, then broadcasts its choice.

        spec None (no --resume): None, or a CheckpointError if the run directory already holds checkpoints.
        `latest`: the newest complete checkpoint whose files check out, a damaged one skipped with a warning naming the
        file; None if there is none yet. A path (see `resolve`): that checkpoint; damaged, it is an error naming the file.
        `load(..., verified=True)` then skips checking the files a second time."""
        chosen = rank0_decides(lambda: self._choose(spec))
        return None if chosen is None else Path(chosen)

    def _choose(self, spec: str | None) -> str | None:  # rank 0
        self.storage.recover()
        if not spec:
            if (existing := self.storage.latest()) is not None:
                restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
                hint = " (torchrun restarted the ranks: with it in the launch line, a restart continues)" if restarted else ""
                raise CheckpointError(f"{self.root.parent} already holds checkpoints (latest: {existing.name}); pass "
                                      f"--resume latest to continue that run{hint}, or set a new train.run_dir")
            return None
        if spec == "latest":
            found = self.storage.complete()
            for _, path in reversed(found):
                if not (wrong := self._problems(path)):
                    self.storage.point_latest()
                    return str(path)
                aside = self.storage.set_aside(path, f".damaged-{path.name}")
                warn(f"skipping {path}: {'; '.join(wrong)}; set aside as {aside.name}, trying the checkpoint before it")
            if found:
                self.storage.point_latest()
                raise CheckpointError(f"every checkpoint under {self.root} is damaged (see the warnings above; they are set "
                                      "aside as .damaged-step-*); restore one from a copy, or start a new train.run_dir")
            return None
        path = resolve(spec, self.root)
        if wrong := self._problems(path):
            raise damaged(path, wrong)
        refuse_weights_only(path, read_train_state(path))  # before any checkpoint here is moved aside
        self._abandon_other_lines(path)
        return str(path)

    def _abandon_other_lines(self, path: Path) -> None:  # rank 0
        """Resuming from `path`: the complete checkpoints here that are not of its line (the newer ones when it is one of
        them; all of them when it comes from elsewhere, e.g. an abandoned-after-* folder or another run) belong to a line
        this run leaves. Moved (not deleted) into one folder, so that no save of this run is mistaken for them or rotated
        out in their favour, and `latest` names this run's line."""
        step, here = checkpoint_step(path), path.resolve().parent == self.root.resolve()
        others = [p for s, p in self.storage.complete() if s > step or not here]
        if not others:
            return
        name = f"abandoned-after-{step_dir_name(step)}" if here else f"abandoned-for-{step_dir_name(step)}-from-elsewhere"
        folder, n = self.storage.root / name, 1
        while folder.exists():
            n += 1
            folder = self.storage.root / f"{name}-{n}"
        folder.mkdir()
        for other in others:
            os.rename(other, folder / other.name)
        self.storage.point_latest()
        which = "the newer checkpoints" if here else f"{path} is not in {self.root}: its checkpoints"
        warn(f"resuming from step {step}: {which} {', '.join(p.name for p in others)} are moved to {folder} (move them "
             f"back into {self.root} to continue that line instead)")

    @staticmethod
    def _problems(path: Path) -> list[str]:
        """What is wrong with a complete-looking checkpoint: an unreadable meta.json, or files that differ from it."""
        try:
            return problems(path, read_meta(path))
        except CheckpointError as err:
            return [str(err)]

    # ------------------------------------------------------------------------------------------------------ save

    def save(self, step: int, parts: dict[str, Stateful], cfg: Config, final: bool = False) -> Path:
        """Save `parts` (see the module docstring) as the checkpoint of `step`; returns the directory it is (or, saving in
        the background, will be) committed as. `final`: the run's last checkpoint, kept forever like the multiples of
        keep_every.

        A failure (a full disk, a quota, permissions) on any rank raises the same one-line CheckpointError on every
        rank; the unfinished `.tmp-step-*` directory is removed and the previous checkpoint stays the latest. With
        `async_save`, this returns once the state is copied to host memory; the files are written, checked and
        committed by a background thread, and its failure is raised by the next `save` or by `wait`."""
        self.wait()  # one save at a time: the previous one is committed (or has failed) before this one starts
        train_state = {**parts["train"].state_dict(), **{name: part.state_dict() for name, part in parts.items()
                                                          if name not in ("model", "train")}}
        job = SaveJob(self.storage, step, train_state, cfg, final, self.rank, self.world_size, on_commit=self.prune,
                      loaded=self.loaded)
        if job.prepare():
            return job.target
        if not self.async_save:
            names = every_rank(job.guard(lambda: job.write(parts["model"].state_dict())), job.remove_tmp)
            return job.finish(names[self.rank])
        futures: list = []  # this rank's write (not gathered: a future does not pickle)
        every_rank(job.guard(lambda: futures.append(start_write(job, parts["model"].state_dict(), self._group,
                                                                self._stager))), job.remove_tmp)
        self._pending = BackgroundSave(job, futures[0], self._group)
        return job.target

    def wait(self, timeout: float | None = None) -> Path | None:
        """Collective with `async_save`: wait (up to `timeout` seconds) until the background save (if any) is committed;
        returns its directory. Raises its failure (the same CheckpointError on every rank). Without `async_save`, nothing
        to wait for."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result(timeout)

    def kept_forever(self, step: int, path: Path) -> bool:
        """Milestones (multiples of keep_every) and each run's final checkpoint: a later phase's preemption saves must
        not rotate them out (launch/train.sh, rerun, checks phase 1's final step again)."""
        return (self.keep_every > 0 and step % self.keep_every == 0) or is_final(path)

    def prune(self, written: Path) -> None:  # rank 0, after the commit of `written`
        """keep_last rotation: the newest `keep_last` of the rotating checkpoints stay, and `written` whatever it is."""
        if self.keep_last <= 0:
            return
        rotating = [path for step, path in self.storage.complete() if not self.kept_forever(step, path)]
        for path in rotating[: -self.keep_last]:
            if path != written:
                self.storage.remove(path)

    # ------------------------------------------------------------------------------------------------------ load

    def load(self, path: Path, parts: dict[str, Stateful], cfg: Config, verified: bool = False) -> None:
        """Restore `parts` from the checkpoint at `path`: the sharded part resharded to this world size, the others from
        train_state.json, and this rank's RNG when the world size matches. `verified`: `choose` has just checked the
        files, skip the second pass (otherwise the ranks check them, each a share)."""
        self.loaded = None
        meta = rank0_decides(lambda: read_meta(path))  # one reading, so every rank decides alike below
        check_model_matches(meta, cfg, path)
        if not verified:
            verify_files(path, meta, self.rank, self.world_size)
        saved = rank0_decides(lambda: read_train_state(path))
        refuse_weights_only(path, saved)
        load_sharded(path, parts["model"])
        for name, part in parts.items():
            if name != "model":
                part.load_state_dict(saved if name == "train" else saved.get(name, {}))
        every_rank(lambda: load_rng(path, meta, self.rank, self.world_size))
        self.loaded = Path(path)

    def load_model(self, spec: str, model: torch.nn.Module, cfg: Config) -> Path:
        """Collective, for `train.init_from`: the weights alone of the checkpoint `spec` names (its directory, a run
        directory, `.../latest`), resharded onto this run's model at any world size; its optimizer state, data position,
        step and RNG are not read, and `self.loaded` stays None (this is a new run). The files are checked first, and
        the model section must match `cfg.model`. Returns the checkpoint's path."""
        def find() -> str:  # rank 0
            path = resolve(spec, Path(spec))
            if path is None:
                raise CheckpointError(f"train.init_from={spec}: no complete checkpoint there")
            return str(path)

        path = Path(rank0_decides(find))
        meta = rank0_decides(lambda: read_meta(path))
        check_model_matches(meta, cfg, path, "set model.* to the checkpoint's (its config.yaml) to start from it")
        verify_files(path, meta, self.rank, self.world_size)
        load_sharded(path, ModelWeights(model))
        return path


def load_weights(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """In one process, without a process group (generate, export): check the checkpoint's files, then load its model
    weights into `model` (built from its config). Returns its meta.json."""
    meta = read_meta(path)
    verify_files(path, meta)
    state = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=TrustedReader(path), planner=TrustedPlanner(path), no_dist=True)
    except (Exception, CheckpointException) as err:
        raise load_failure(path, err) from None
    model.load_state_dict(state["model"])
    return meta
