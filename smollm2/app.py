"""`python -m smollm2.app`: the Space's page, served locally.

The code is smollm2/serve/app.py; this name is the command users type.
"""

from smollm2.serve.app import main

if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
