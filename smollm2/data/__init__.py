"""The data path: token shards (shards.py) listed by a manifest (manifest.py), read as a dataset (dataset.py) and cut into
training windows in one global deterministic order (loader.py); the tokenizer (tokenizer.py) that made them."""

from smollm2.data.dataset import Dataset
from smollm2.data.loader import TrainLoader, ValWindows

__all__ = ["Dataset", "TrainLoader", "ValWindows"]
