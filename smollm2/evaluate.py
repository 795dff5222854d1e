"""`python -m smollm2.evaluate`: lm-evaluation-harness on an export or a checkpoint.

The code is smollm2/serve/evaluate.py; this name is the command users type.
"""

from smollm2.serve.evaluate import main

if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
