"""`python -m smollm2.hf_tokenizer OUT_DIR`: the bundled GPT-2 BPE as a Hugging Face tokenizer.json.

The code is smollm2/serve/hf_tokenizer.py; this name is the command users type.
"""

from smollm2.serve.hf_tokenizer import main

if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
