"""`python -m smollm2.generate`: sampling from a checkpoint or an export.

The code is smollm2/serve/generate.py; this name is the command users type.
"""

from smollm2.serve.generate import main

if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
