"""What the launch scripts ask about a run's checkpoints, so that no script parses config files or step-NNNNNN names:

    python -m smollm2.checkpoint verify RUN_DIR STEP             exit 0 iff a complete, undamaged checkpoint is at STEP
    python -m smollm2.checkpoint list RUN_DIR                    the complete checkpoints, oldest first
    python -m smollm2.checkpoint latest-step [--verify] RUN_DIR  the newest complete (--verify: and undamaged) one's step
                                                                 (exit 2 if there is none)
    python -m smollm2.checkpoint run-dir CONFIG [key=value ...]  the resolved train.run_dir of a config + overrides
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smollm2.checkpoint.integrity import verify_files
from smollm2.checkpoint.layout import find_latest, is_complete, list_checkpoints, read_meta, step_dir_name
from smollm2.config import load_config
from smollm2.errors import CheckpointError, run_cli


def _list(root: Path) -> None:
    """One line per complete checkpoint, oldest first; an unreadable one is reported and the listing goes on."""
    for step, path in list_checkpoints(root):
        try:
            meta = read_meta(path)
        except CheckpointError as err:
            print(f"{step:>8}  {path}  unreadable: {err}")
            continue
        final = "  final" if meta.get("final") is True else ""
        print(f"{step:>8}  {path}  world_size={meta.get('world_size')}  {meta.get('time')}{final}")


def _latest_step(root: Path, verify: bool) -> int:
    """The newest complete checkpoint's step; with `verify`, the newest whose files check out (a damaged one is skipped
    with a warning, as --resume latest does)."""
    found = list_checkpoints(root)
    for step, path in reversed(found):
        if not verify:
            return step
        try:
            verify_files(path, read_meta(path))
            return step
        except CheckpointError as err:
            print(f"warning: skipping {err}", file=sys.stderr, flush=True)
    raise CheckpointError(f"no complete{' and undamaged' if verify else ''} checkpoint under {root}")


def _verify(root: Path, step: int) -> str:
    path = root / step_dir_name(step)
    if not is_complete(path):
        raise CheckpointError(f"no complete checkpoint at step {step} ({path})")
    meta = read_meta(path)
    if meta.get("step") != step:
        raise CheckpointError(f"{path}/meta.json records step {meta.get('step')}, expected {step}")
    verify_files(path, meta)  # every file's size and sha256 as written, and each pickled part of a trusted format
    latest = find_latest(root)
    return f"ok: {path} (step {meta['step']}, world size {meta['world_size']}, latest = {latest.name if latest else None})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm2.checkpoint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="exit 0 iff a complete, undamaged checkpoint exists at STEP")
    verify.add_argument("run_dir")
    verify.add_argument("step", type=int)
    listing = sub.add_parser("list", help="list the complete checkpoints of a run")
    listing.add_argument("run_dir")
    latest_step = sub.add_parser("latest-step", help="print the step of the newest complete checkpoint (exit 2 if none)")
    latest_step.add_argument("run_dir")
    latest_step.add_argument("--verify", action="store_true", help="the newest whose files check out (skip damaged ones)")
    run_dir = sub.add_parser("run-dir", help="print the train.run_dir that CONFIG with these overrides resolves to")
    run_dir.add_argument("config")
    run_dir.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.command == "run-dir":
        print(load_config(args.config, args.overrides).train.run_dir)  # ConfigError -> one line, exit 2
        return 0
    root = Path(args.run_dir) / "checkpoints"
    if args.command == "list":
        _list(root)
    elif args.command == "latest-step":
        print(_latest_step(root, args.verify))
    else:
        print(_verify(root, args.step))
    return 0


if __name__ == "__main__":
    run_cli(main)
