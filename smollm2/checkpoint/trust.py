"""Loading a checkpoint runs no code from it, wherever it came from.

Three parts of a checkpoint are pickles, and a pickle can call any function while it is read. Whoever can write a shard
can also write meta.json (its digests only catch accidents), so each is read in a way that cannot call one:

    .metadata           DCP's index of the shards: a restricted unpickler that builds only DCP's metadata types (and
                        the torch sizes, dtypes and layouts they hold); DCP itself would `pickle.load` it
    byte items          what DCP stores as bytes inside the shards (the optimizer's param_groups): `torch.load` with
                        `weights_only=True`; DCP's own planner would use `weights_only=False`
    rng/rank-*.pt       `torch.load(weights_only=True)` (smollm2/checkpoint/rng.py; files of the older pickled format are
                        not read at all)

Anything else in them is refused as "not a trusted checkpoint format", in one line naming the file.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from smollm2.errors import CheckpointError, one_line

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# What a DCP .metadata file is built from (seen in every checkpoint this project writes, torch 2.6-2.14).
_ALLOWED = {
    **{(_METADATA_MODULE, name): None for name in ("Metadata", "MetadataIndex", "BytesStorageMetadata",
                                                    "ChunkStorageMetadata", "TensorStorageMetadata", "TensorProperties",
                                                    "StorageMeta", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): None,
    ("torch", "Size"): None,
    ("torch.serialization", "_get_layout"): None,  # a layout from its name
    ("pathlib", "PosixPath"): None, ("pathlib", "WindowsPath"): None,  # StorageMeta.checkpoint_id
    ("collections", "OrderedDict"): None,
}
# The classes whose instances a .metadata may set state on (BUILD): the allowed classes, not anything reachable from them.
_INSTANCE_TYPES = {getattr(importlib.import_module(module), name) for module, name in _ALLOWED}
_INSTANCE_TYPES = {t for t in _INSTANCE_TYPES if isinstance(t, type)} | {type(Path())}


class _MetadataUnpickler(pickle._Unpickler):  # the Python implementation: its opcodes can be overridden
    """Builds only the allowed classes, and sets state only on their instances: BUILD on a class or a function (e.g.
    `PosixPath`, with a state that replaces one of its methods) would change it for the whole process."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not one of DCP's metadata types")

    def load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, type) or type(target) not in _INSTANCE_TYPES:
            raise pickle.UnpicklingError(f"it sets the state of {type(target).__name__} {target!r:.60}, which is not an "
                                         "instance of one of DCP's metadata types")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def untrusted(path: Path, what: str, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: {what} is not a trusted checkpoint format ({one_line(err)}): reading it could run "
                           "code from the file, so it is refused; use a checkpoint this project wrote")


def read_metadata(path: Path) -> Metadata:
    """A checkpoint's `.metadata`, read without running code from it."""
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - UnpicklingError, or what a damaged pickle raises
        raise untrusted(path, ".metadata", err) from None
    if not isinstance(metadata, Metadata):
        raise untrusted(path, ".metadata", TypeError(f"it holds a {type(metadata).__name__}, not DCP's Metadata"))
    return metadata


def load_bytes(data: io.BytesIO, path: Path, name: str) -> Any:
    """One DCP byte item (plain data: numbers, strings, lists, tuples, dicts, tensors), read with weights_only=True."""
    try:
        return torch.load(data, weights_only=True)
    except Exception as err:  # noqa: BLE001 - weights_only refuses objects with an UnpicklingError
        raise untrusted(path, f"the byte item {name}", err) from None


class TrustedReader(FileSystemReader):
    """DCP's file reader, its `.metadata` read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TrustedPlanner(DefaultLoadPlanner):
    """DCP's default load planner, its byte items read with weights_only=True."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = load_bytes(value, self.path, fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def byte_item_problems(path: Path, names: list[str]) -> list[str]:
    """Which byte items stored in the shard files `names` (of the checkpoint at `path`) are not plain data (for
    `verify`, before anything is loaded)."""
    shards = {name for name in names if name.endswith(".distcp")}
    if not shards:
        return []
    try:
        metadata = read_metadata(path)
    except CheckpointError as err:
        return [str(err).removeprefix(f"{path}: ")]
    byte_items = {fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    problems = []
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn in byte_items and getattr(info, "relative_path", None) in shards:
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                data = io.BytesIO(f.read(info.length))
            try:
                load_bytes(data, path, index.fqn)
            except CheckpointError as err:
                problems.append(str(err).removeprefix(f"{path}: "))
    return problems
