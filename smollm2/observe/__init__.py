"""Watching a run: the log records and their sinks (metrics.py), WandB (tracking.py), gradient flow under sharding
(gradflow.py), per-rank log files (ranklog.py) and the offline plot (plot.py)."""
