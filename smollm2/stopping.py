"""Stopping a run on request: SIGTERM / SIGUSR1 (SLURM preemption, `scancel --signal`, torchrun forwarding) and Ctrl-C
(SIGINT) make every rank checkpoint at its next log step and exit with STOP_EXIT_CODE, leaving STOP_MARKER for the
launch scripts. A second Ctrl-C exits at once, without a checkpoint."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from smollm2.distributed import DistEnv, any_rank
from smollm2.errors import INTERRUPTED_EXIT_CODE, STOP_MARKER


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption, `scancel --signal`, torchrun forwarding): checkpoint at the next log step and
    exit with STOP_EXIT_CODE. Installed first thing in `main`, so a signal during setup (data, model, checkpoint load,
    WandB) is not fatal: the run stops before its first step instead, without a checkpoint."""

    def __init__(self):
        self.requested = False
        # SIGINT too: a background child of a non-interactive shell (launch/train.sh with NPROC=1) inherits it ignored,
        # and Python's KeyboardInterrupt would end a rank without a checkpoint.
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # The request first, and the message written straight to fd 2: a print here could meet stderr's buffer in the
        # middle of another write (a reentrant-call error would end the rank without its checkpoint).
        again, self.requested = self.requested, True
        speak = os.environ.get("RANK", "0") == "0"
        if signum == signal.SIGINT and again:
            if speak:
                os.write(2, b"interrupted again: exiting now, without a checkpoint\n")
            os._exit(INTERRUPTED_EXIT_CODE)
        if signum == signal.SIGINT and speak:
            os.write(2, b"interrupted: checkpointing at the next log step, then exiting (interrupt again to exit now, "
                        b"without a checkpoint)\n")

    def agreed(self, device: torch.device) -> bool:
        """Collective: whether any rank was asked to stop (then every rank stops at the same step)."""
        return any_rank(self.requested, device)


def mark_stopped(run_dir: Path, env: DistEnv, step: int) -> None:
    """Rank 0 leaves STOP_MARKER (read by launch/*.sh); a barrier, so no rank exits before it is written."""
    if env.is_main:
        (run_dir / STOP_MARKER).write_text(f"{step}\n")
    dist.barrier()
