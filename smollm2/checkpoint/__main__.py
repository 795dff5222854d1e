"""What the launch scripts ask about a run's checkpoints, so that no script parses config files or step-NNNNNN names:

    python -m smollm2.checkpoint verify RUN_DIR STEP             exit 0 iff a complete, undamaged checkpoint is at STEP
    python -m smollm2.checkpoint list RUN_DIR                    the complete checkpoints, oldest first
    python -m smollm2.checkpoint latest-step RUN_DIR             the newest complete one's step (exit 2 if there is none)
    python -m smollm2.checkpoint run-dir CONFIG [key=value ...]  the resolved train.run_dir of a config + overrides
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smollm2.checkpoint.integrity import verify_files
from smollm2.checkpoint.layout import find_latest, is_complete, list_checkpoints, read_meta, step_dir_name
from smollm2.config import load_config
from smollm2.errors import CheckpointError, run_cli


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
    run_dir = sub.add_parser("run-dir", help="print the train.run_dir that CONFIG with these overrides resolves to")
    run_dir.add_argument("config")
    run_dir.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.command == "run-dir":
        print(load_config(args.config, args.overrides).train.run_dir)  # ConfigError -> one line, exit 2
        return 0
    root = Path(args.run_dir) / "checkpoints"
    if args.command == "list":
        for step, path in list_checkpoints(root):
            meta = read_meta(path)
            final = "  final" if meta.get("final") is True else ""
            print(f"{step:>8}  {path}  world_size={meta.get('world_size')}  {meta.get('time')}{final}")
        return 0
    if args.command == "latest-step":
        found = list_checkpoints(root)
        if not found:
            raise CheckpointError(f"no complete checkpoint under {root}")
        print(found[-1][0])
        return 0
    path = root / step_dir_name(args.step)
    if not is_complete(path):
        raise CheckpointError(f"no complete checkpoint at step {args.step} ({path})")
    meta = read_meta(path)
    if meta.get("step") != args.step:
        raise CheckpointError(f"{path}/meta.json records step {meta.get('step')}, expected {args.step}")
    verify_files(path, meta)  # every file's size and sha256 as written
    latest = find_latest(root)
    print(f"ok: {path} (step {meta['step']}, world size {meta['world_size']}, latest = {latest.name if latest else None})")
    return 0


if __name__ == "__main__":
    run_cli(main)
