"""User-facing errors and the CLI wrapper that turns them into one line on stderr.

Anything a user can cause (a config, a path, a data set, a checkpoint) raises a subclass of `UserError` whose message says
what is wrong and how to fix it. Command-line entry points run through `run_cli`, so users see that one line, not a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# Exit status of a run stopped by SIGTERM / SIGUSR1 after its checkpoint (or before its first step): not a failure,
# rerun to continue. 75 is EX_TEMPFAIL ("try again later"). launch/train.sh exits with it; launch/slurm.sbatch requeues.
STOP_EXIT_CODE = 75
# A second Ctrl-C: the run ends at once, without a checkpoint (128 + SIGINT, what a shell reports for it).
INTERRUPTED_EXIT_CODE = 130
# Written to <run_dir> by rank 0 on such a stop (with the step): torchrun reports any non-zero worker exit as its own
# exit 1, so the launch scripts read this marker to tell a stop from a failure.
STOP_MARKER = "STOPPED"


class UserError(Exception):
    """A problem the user can fix; the message names it and, where possible, the fix.

    Under torchrun every rank usually meets the same problem (the same config, the same files), so only rank 0 prints
    it; `rank_specific=True` marks one that only some ranks may meet (a device, a path one node cannot see): each rank
    that meets it prints it, prefixed with its rank."""

    def __init__(self, *args, rank_specific: bool = False):
        super().__init__(*args)
        self.rank_specific = rank_specific


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class TrainingDiverged(UserError):
    """The loss, the gradient norm or the weights became NaN or infinite: the run stops without checkpointing them. Every
    rank meets it at the same step (the values it checks are the same on every rank)."""

    agreed = True


def one_line(err: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters): an error as one line of a log or of another error."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else 'no message'}"


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; a UserError becomes `error: <message>` on stderr, once (rank 0's; see UserError), and exit
    status 2 on every rank. Under torchrun the rank logs (`<run_dir>/logs/`) and torchrun's failure summary hold the
    traceback. Set SMOLLM2_TRACEBACK=1 to see the full traceback on the console instead."""
    try:
        code = main(argv)
    except UserError as err:
        if os.environ.get("SMOLLM2_TRACEBACK") == "1":
            raise
        rank = int(os.environ.get("RANK", "0") or 0)
        if err.rank_specific and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            print(f"error: rank {rank}: {err}", file=sys.stderr, flush=True)
        elif rank == 0 or err.rank_specific:
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    sys.exit(code or 0)
