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
# Written to <run_dir> by rank 0 on such a stop (with the step): torchrun reports any non-zero worker exit as its own
# exit 1, so the launch scripts read this marker to tell a stop from a failure.
STOP_MARKER = "STOPPED"


class UserError(Exception):
    """A problem the user can fix; the message names it and, where possible, the fix."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; a UserError becomes `error: <message>` on stderr and exit status 2.

    Set SMOLLM2_TRACEBACK=1 to see the full traceback instead."""
    try:
        code = main(argv)
    except UserError as err:
        if os.environ.get("SMOLLM2_TRACEBACK") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)
