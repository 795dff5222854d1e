"""WandB, offline, read back from the .wandb files: everything a run logs, the settings' precedence, and a crash resume
that stays visible (one run id; every step that ran is recorded, re-run steps included, with a restart marker)."""

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multirank import kill_tree  # tests/ helper
from tiny import ROOT, command

from smollm2.config import WandbConfig, WandbMode, WandbWatch
from smollm2.errors import ConfigError
from smollm2.observe.tracking import wandb_settings

wandb = pytest.importorskip("wandb")


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


def records(path: Path, kind: str) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for raw in wandb_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == kind:
            out.append(getattr(record, kind))
    return out


def history(path: Path) -> list[dict]:
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in h.item} for h in records(path, "history")]


def offline_runs(run: Path) -> list[Path]:
    """The offline run folders, oldest first, each as its .wandb file."""
    folders = sorted((run / "wandb").glob("offline-run-*"))
    return [next(f.glob("*.wandb")) for f in folders]


def torchrun(run: Path, data: Path, *args: str) -> list[str]:
    return command(2, run, data, *args)


def clean_env(tmp_path: Path, **extra: str) -> dict:
    """No WandB login (HOME without a netrc, no key) and no WANDB_* from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "HOME": str(tmp_path / "home"), "WANDB_SILENT": "true", **extra}


# ------------------------------------------------------------------------------------------------------ settings


def test_settings_environment_wins_and_auto_needs_no_login(tmp_path):
    yaml = WandbConfig(mode=WandbMode.auto, project="yaml-project", watch=WandbWatch.off, log_model="false")
    home = {"HOME": str(tmp_path)}
    s = wandb_settings(yaml, home)
    assert (s.mode, s.project, s.watch, s.log_model) == ("offline", "yaml-project", "off", "false")
    assert "no WandB login" in s.reason
    assert wandb_settings(yaml, {**home, "WANDB_API_KEY": "x" * 40}).mode == "online"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_settings(yaml, home).mode == "online"  # what `wandb login` leaves
    env = {"HOME": str(tmp_path / "none"), "WANDB_PROJECT": "env-project", "WANDB_ENTITY": "team", "WANDB_NAME": "n",
           "WANDB_WATCH": "gradients", "WANDB_LOG_MODEL": "true", "WANDB_MODE": "disabled"}
    s = wandb_settings(yaml, env)
    assert (s.mode, s.project, s.entity, s.name, s.watch, s.log_model) == \
        ("disabled", "env-project", "team", "n", "gradients", "checkpoint")
    assert wandb_settings(yaml, {**env, "WANDB_MODE": "dryrun", "WANDB_WATCH": "false"}).watch == "off"
    with pytest.raises(ConfigError, match="WANDB_LOG_MODEL='sometimes'"):
        wandb_settings(yaml, {**env, "WANDB_LOG_MODEL": "sometimes"})


@pytest.mark.e2e
def test_disabled_imports_nothing_from_wandb(shakespeare_data, tmp_path):
    code = ("import sys; from smollm2.train import main; "
            f"main(['--config', 'configs/tiny.yaml', 'data.path={shakespeare_data}', 'train.run_dir={tmp_path / 'run'}', "
            "'train.max_steps=1', 'eval.interval=0', 'sample.interval=0', 'data.seq_len=32']); "
            "print('wandb imported:', 'wandb' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb imported: False" in proc.stdout


# ------------------------------------------------------------------------------------------------ what is logged


@pytest.mark.e2e
def test_a_run_logs_everything_the_spec_lists(shakespeare_data, tmp_path):
    run = tmp_path / "run"
    env = clean_env(tmp_path, WANDB_PROJECT="env-project", WANDB_WATCH="gradients", WANDB_LOG_MODEL="checkpoint")
    proc = subprocess.run(torchrun(run, shakespeare_data, "train.max_steps=4",
                                   "data.seq_len=32", "logging.interval=2", "eval.interval=2", "sample.interval=4",
                                   "checkpoint.interval=2", "logging.peak_tflops=1", "logging.wandb.mode=auto",
                                   "logging.wandb.project=yaml-project", "logging.wandb.histogram_interval=1"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"to upload it: wandb sync {run / 'wandb'}/offline-run-*" in proc.stdout  # auto without a login: offline
    [path] = offline_runs(run)
    assert [r.project for r in records(path, "run")] == ["env-project"]  # the environment wins over the YAML
    rows = history(path)
    keys = set().union(*rows)
    for key in ("loss", "lr", "grad_norm", "tok_per_s", "mfu", "step_ms", "peak_mem_gib", "host_rss_gib",
                "data_wait_ms", "tokens_seen"):
        values = [row[f"train/{key}"] for row in rows if f"train/{key}" in row]
        assert len(values) == 2 and all(isinstance(v, (int, float)) for v in values), key
    assert [row["eval/val_loss"] for row in rows if "eval/val_loss" in row][-1] == pytest.approx(
        json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["val_loss"])
    groups = {"embed", "final_norm"} | {f"block_0{i}/{k}" for i in range(2) for k in ("attn", "mlp", "norm")}
    assert {f"grad_norm/{g}" for g in groups} <= keys
    hist_rows = [row for row in rows if "hist/grad/embed/_type" in row]
    assert len(hist_rows) == 2 and hist_rows[0]["hist/grad/embed/_type"] == "histogram"
    assert sum(hist_rows[0]["hist/grad/block_00/mlp/values"]) == 2 * (64 * 256) + 256 + 64  # every value, once
    assert any(row.get("samples/_type") == "table-file" for row in rows)
    assert all("train/step" in row for row in rows)  # the x-axis of every chart
    models = [a for a in records(path, "artifact") if a.type == "model"]
    assert [sorted(a.aliases) for a in models] == [["latest", "step-2"], ["latest", "step-4"]]
    for artifact, step in zip(models, (2, 4)):  # a reference per file, with its size and content md5: nothing copied
        folder = run / "checkpoints" / f"step-{step:06d}"
        assert {e.ref for e in artifact.manifest.contents} == {f"file://{f}" for f in folder.rglob("*") if f.is_file()}
        for entry in artifact.manifest.contents:
            data = Path(entry.ref.removeprefix("file://")).read_bytes()
            assert entry.size == len(data) and entry.digest == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert not [f for d in (tmp_path / "home", run / "wandb") for f in d.rglob("*.distcp")]  # no shard copied




# ------------------------------------------------------------------------------------------------ a crash resume


def _kill_after_a_checkpoint(cmd: list[str], env: dict, run: Path, deadline_s: float = 240) -> None:
    """Start the run, wait until it has logged steps past a checkpoint, then kill -9 every process of it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}"
            saved = [int(p.name[5:]) for p in (run / "checkpoints").glob("step-*")]
            lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
            if saved and len(lines) >= 2 and json.loads(lines[-2])["step"] > max(saved):
                return
            time.sleep(0.05)
        raise AssertionError("no step was logged past a checkpoint in time")
    finally:
        kill_tree(proc.pid)  # the run and anything it started, at once: a crash of the node
        proc.wait(timeout=30)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_crash_resume_records_every_step_that_ran(shakespeare_data, tmp_path):
    run = tmp_path / "run"
    common = ["data.seq_len=32", "logging.interval=1",
              "eval.interval=0", "sample.interval=0", "checkpoint.interval=4", "checkpoint.keep_last=10",
              "logging.wandb.mode=offline", "logging.wandb.project=test"]
    env = clean_env(tmp_path)
    _kill_after_a_checkpoint(command(0, run, shakespeare_data, *common, "train.max_steps=40"), env, run)
    killed_at = json.loads((run / "metrics.jsonl").read_text().splitlines()[-2])["step"]
    assert killed_at < 12  # the rerun below trains again what the killed attempt had logged
    for steps in (12, 14):  # the rerun (phase 1 to its end), then phase 2
        cmd = command(0, run, shakespeare_data, *common, f"train.max_steps={steps}", "--resume", "latest")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    ids = {json.loads(p.read_text())["logger_run_id"] for p in (run / "checkpoints").glob("step-*/train_state.json")}
    paths = offline_runs(run)
    assert len(ids) == 1 and len(paths) == 3
    run_id = ids.pop()
    assert all(p.parent.name.endswith(f"-{run_id}") for p in paths)
    rerun, phase2 = history(paths[1]), history(paths[2])
    [marker] = [row for row in rerun if "restart/step" in row]
    resumed_from = marker["restart/step"]
    assert marker["restart/from_checkpoint"] == f"step-{resumed_from:06d}" and resumed_from < killed_at
    # every step after the checkpoint is recorded again, the re-run ones included, in the order they ran
    assert [row["train/step"] for row in rerun if "train/loss" in row] == list(range(resumed_from + 1, 13))
    assert [row["train/step"] for row in phase2 if "train/loss" in row] == [13, 14]
    assert [row["restart/step"] for row in phase2 if "restart/step" in row] == [12]
    # WandB's own step only grows across the attempts, so nothing is dropped when they are synced
    wandb_steps = [row["_step"] for path in paths for row in history(path)]
    assert wandb_steps == sorted(wandb_steps) and len(set(wandb_steps)) == len(wandb_steps)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 14 and [r["train/loss"] for r in phase2 if "train/loss" in r][-1] == last["loss"]
