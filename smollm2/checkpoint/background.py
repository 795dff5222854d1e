"""Saving in the background (checkpoint.async_save): training waits only while every rank copies its shards to host
memory; the files are written, hashed and committed by a thread while training goes on.

The thread's collectives run on a gloo group of the checkpointer's own: two threads' collectives on one group could
interleave differently on different ranks. The next save, a stop and the end of the run wait for it (`BackgroundSave.
result`), and its failure is raised there, on every rank, as the same one-line error.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from smollm2.checkpoint.integrity import written_files
from smollm2.checkpoint.save import SaveJob
from smollm2.distributed import every_rank
from smollm2.errors import CheckpointError


def host_stager():
    """One host copy of the state, reused by every save (the first allocates it, the next ones copy into it; pinned on
    CUDA, for fast device-to-host copies). None where torch has no DefaultStager (< 2.9): DCP then allocates a copy
    per save."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return None
    return DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=False))


def start_write(job: SaveJob, state: dict[str, Any], group, stager) -> Any:  # every rank
    """Stage this rank's shards of `state` in host memory and start writing them from DCP's background thread (on
    `group`); the RNG file, a few KB, is written now. Returns the future of the write."""
    extra = {} if stager is None else {"async_stager": stager}
    future = dcp.async_save(state, process_group=group, storage_writer=dcp.FileSystemWriter(job.tmp, sync_files=True),
                            **extra)
    future = getattr(future, "upload_completion", future)  # torch >= 2.9 with async staging returns both futures
    job.write_rng()
    return future


class BackgroundSave:
    """A save writing in the background: the thread waits for this rank's write, then every rank's (a collective on
    `group`), then finishes the job (hashes, commit). `result()` joins it and raises what failed."""

    def __init__(self, job: SaveJob, future, group):
        self.job, self.future, self.group = job, future, group
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"checkpoint-{job.step}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        job = self.job
        try:
            names = every_rank(job.guard(lambda: written_files(self.future.result(), job.world_size)), job.remove_tmp,
                               self.group)
            job.finish(names[job.rank], self.group)
        except BaseException as err:  # noqa: BLE001 - raised in the training thread by result()
            self.error = err

    def result(self, timeout: float | None = None) -> Path:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise CheckpointError(f"the checkpoint of step {self.job.step} was still being written after {timeout:.0f} s "
                                  f"(train.dist_timeout_min); it is not committed ({self.job.tmp})")
        if self.error is not None:
            raise self.error
        return self.job.target
