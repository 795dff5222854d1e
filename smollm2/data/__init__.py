"""The data path: token shards (shards.py) listed by a manifest (manifest.py), read as a dataset (dataset.py); the windows
of one dataset or a mixture in one global deterministic order (order.py), batched per rank (loader.py); what a run
trains on, opened and checked from its config (mixture.py); the tokenizer (tokenizer.py) that made them."""

from smollm2.data.dataset import Dataset

# The loader (torch) is imported on first use: data prep (`python -m data_prep`) reads and writes shards without torch.
_LOADER = {"TrainLoader", "ValWindows"}


def __getattr__(name: str):
    if name in _LOADER:
        from smollm2.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'smollm2.data' has no attribute {name!r}")


__all__ = ["Dataset", "TrainLoader", "ValWindows"]
