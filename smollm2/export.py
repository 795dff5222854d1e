"""`python -m smollm2.export`: a checkpoint as a transformers folder, safetensors or a Space.

The code is smollm2/serve/export.py; this name is the command users type.
"""

from smollm2.serve.export import main

if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
