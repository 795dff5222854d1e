"""`python -m smollm2.model --config configs/smollm2_135.yaml [key=value ...]`: the parameter table of a config."""

from __future__ import annotations

import argparse

from smollm2.config import load_config
from smollm2.errors import run_cli
from smollm2.model.model import parameter_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm2.model", description="Print the parameter table.")
    parser.add_argument("--config", default="configs/smollm2_135.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides).model
    print(f"{'component':<48} {'parameters':>14}")
    for name, n in parameter_table(cfg):
        print(f"{name:<48} {n:>14,}")
    return 0


if __name__ == "__main__":
    run_cli(main)
