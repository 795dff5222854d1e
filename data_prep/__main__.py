"""`python -m data_prep`: errors a user can cause print one line (`error: ...`) and exit 2."""

from data_prep.prep import main
from smollm2.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
