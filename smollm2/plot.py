"""`python -m smollm2.plot`: the offline training plot of a run directory.

The code is smollm2/observe/plot.py; this name is the command users type.
"""

from smollm2.observe.plot import main

if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
