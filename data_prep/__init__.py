"""Data preparation: `python -m data_prep --source ...` (what `make prep` runs). See data_prep/prep.py."""

from data_prep.prep import PrepOptions, PrepResult, prepare

__all__ = ["PrepOptions", "PrepResult", "prepare"]
