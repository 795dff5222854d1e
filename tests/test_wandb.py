"""WandB offline: the run id survives a resume, and the records land in the same run (read back from the .wandb files)."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
wandb = pytest.importorskip("wandb")
ROOT = Path(__file__).resolve().parents[1]


def wandb_records(path: Path, block: int = 32768):
    """The records of a .wandb file (a LevelDB-style log: 32 KiB blocks of crc32/length/type-framed chunks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def history(path: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in wandb_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_offline_run_is_continued_on_resume(shakespeare_data, tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "smollm2.train", "--config", "configs/tiny.yaml", f"data.path={shakespeare_data}",
            f"train.run_dir={run}", "data.seq_len=32", "data.micro_batch=2", "logging.interval=2", "eval.interval=4",
            "sample.interval=0", "checkpoint.interval=4", "logging.wandb.mode=offline", "logging.wandb.project=test"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path)}
    subprocess.run([*base, "train.max_steps=4"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([*base, "train.max_steps=6", "--resume", "latest"], cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=300)

    run_id = json.loads((run / "checkpoints/step-000006/train_state.json").read_text())["logger_run_id"]
    assert run_id and json.loads((run / "checkpoints/step-000004/train_state.json").read_text())["logger_run_id"] == run_id
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    steps = []
    for offline in runs:
        rows = history(next(offline.glob("*.wandb")))
        steps += [row["_step"] for row in rows if "train/loss" in row]
        assert all(isinstance(row.get("train/loss", 0.0), float) for row in rows)
    assert steps == [2, 4, 6]
    last_eval = [row for row in history(next(runs[-1].glob("*.wandb"))) if "eval/val_loss" in row]
    assert last_eval and last_eval[-1]["_step"] == 6
