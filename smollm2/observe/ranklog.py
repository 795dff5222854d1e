"""Per-rank log files: `<run_dir>/logs/rank-NNNNN.log` holds everything a rank printed, its warnings, and on a fatal
error the full traceback (the console shows a user error as one line; the file keeps the whole story).

The console stays as it is: stdout and stderr are teed into the file, line-buffered, so a `kill -9` loses at most the
line being written. Each attempt (a rerun, a torchrun restart) appends below a header line saying who and when.
Output that bypasses Python (C++ warnings written straight to file descriptor 2) reaches the console only.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import TextIO

from smollm2.errors import UserError


class _Tee:
    """A text stream that writes to the console stream and to the rank's log file."""

    def __init__(self, console: TextIO, log: TextIO):
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.console.write(text)
        try:
            self.log.write(text)
        except (OSError, ValueError):  # a full disk or a closed file must not break the run's own output
            pass
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        try:
            self.log.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the console's
        return getattr(self.console, name)


class RankLog:
    """The open log of this rank; `close()` puts the console streams back."""

    def __init__(self, run_dir: Path, rank: int, local_rank: int, world_size: int):
        self.path = Path(run_dir) / "logs" / f"rank-{rank:05d}.log"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
        except OSError as err:  # a node that cannot write there (permissions, a full local disk): this rank's own problem
            raise UserError(f"cannot write the rank log {self.path} (train.run_dir): {err}", rank_specific=True) from None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.file.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} host {socket.gethostname()} pid {os.getpid()} "
                        f"rank {rank} local rank {local_rank} world size {world_size} torchrun restart {restart} "
                        f"| {' '.join(sys.argv)}\n")
        self._stdout, self._stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)

    @classmethod
    def from_env(cls, run_dir: Path) -> RankLog:
        """The log of the rank torchrun / srun (RANK, LOCAL_RANK, WORLD_SIZE) or a plain run (rank 0 of 1) made this
        process: opened before the process group is joined, so a failure to join is in the file too."""
        env = os.environ
        return cls(run_dir, int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    def exception(self, err: BaseException) -> None:
        """The full traceback, into the file only (the console gets what the CLI wrapper prints)."""
        try:
            self.file.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
            self.file.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        sys.stdout, sys.stderr = self._stdout, self._stderr
        try:
            self.file.close()
        except OSError:
            pass


def fault_hook(step: int, rank: int) -> None:
    """For tests of the failure path only: SMOLLM2_TEST_FAULT=STEP:RANK makes that rank fail as an unreadable shard
    would, when it fetches the data of that step. Unset (always, in real runs) it costs one dict lookup."""
    spec = os.environ.get("SMOLLM2_TEST_FAULT")
    if spec and spec == f"{step}:{rank}":
        raise OSError(f"[Errno 5] Input/output error: simulated unreadable shard at step {step} (SMOLLM2_TEST_FAULT)")
