"""`python -m smollm2.convert --from-hf HF_DIR --out CKPT_DIR`: a transformers folder as a step-0 checkpoint.

The code is smollm2/serve/hf_import.py; this name is the command users type.
"""

from smollm2.serve.hf_import import main

if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
