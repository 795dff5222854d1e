"""WandB: the run's settings (YAML + WANDB_* environment), and the sink that writes every record to one WandB run.

Precedence, lowest to highest: the dataclass defaults, the YAML preset, `key=value` overrides, then the WANDB_*
environment variables (WandB's own convention: the environment wins). Mode `auto` is online when the user is logged in
(WANDB_API_KEY, or an api.wandb.ai entry in ~/.netrc / $NETRC) and offline otherwise: no prompt, no network wait.
With `disabled`, nothing is imported from wandb.

Continuity: the run id lives in the checkpoint, so phase 2 and every requeue continue the same run. After a crash the
run resumes from an older checkpoint and re-runs steps WandB already holds; WandB ignores a `step=` at or below its last
one, so this sink owns WandB's step (a counter kept in `<run_dir>/wandb/log_counter`, which only grows) and puts the
training step on its own axis, `train/step`: every step that ran is recorded, re-run ones included, and each resume
logs a `restart/step` marker.
"""

from __future__ import annotations

import netrc
import os
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smollm2.config import LOG_MODEL_CHOICES, WandbConfig, WandbMode, WandbWatch
from smollm2.errors import ConfigError

_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled",
          "auto": "auto"}
_WATCH = {"false": "off", "off": "off", "none": "off", "gradients": "gradients", "parameters": "parameters", "all": "all"}


@dataclass
class WandbSettings:
    mode: str  # online | offline | disabled (auto resolved)
    project: str
    entity: str | None
    name: str | None
    watch: str  # off | gradients | parameters | all
    log_model: str  # false | checkpoint | end
    histogram_interval: int
    reason: str = ""  # why auto picked what it picked


def logged_in(environ=os.environ) -> bool:
    """An API key in the environment, or a netrc entry for the WandB host: what `wandb login` leaves. No network."""
    if environ.get("WANDB_API_KEY"):
        return True
    host = environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    path = environ.get("NETRC") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_settings(cfg: WandbConfig, environ=os.environ) -> WandbSettings:
    """The one place the WandB settings are resolved. Precedence, lowest to highest: WandbConfig's defaults, the YAML
    preset, `key=value` overrides (those three are `cfg`), then WANDB_MODE / _PROJECT / _ENTITY / _NAME / _WATCH /
    _LOG_MODEL (WandB's convention: the environment wins; an empty variable counts as unset). `auto` is resolved here,
    without importing wandb and without a network call."""

    def env(name: str, table: dict[str, str], fallback: str) -> str:
        value = environ.get(name)
        if value is None or value == "":
            return fallback
        if value.lower() not in table:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(sorted(set(table)))}")
        return table[value.lower()]

    mode = env("WANDB_MODE", _MODES, str(cfg.mode))
    reason = ""
    if mode == WandbMode.auto:
        if logged_in(environ):
            mode, reason = "online", "logged in to WandB"
        else:
            mode, reason = "offline", "no WandB login (WANDB_API_KEY or ~/.netrc)"
    return WandbSettings(mode=mode, project=environ.get("WANDB_PROJECT") or cfg.project,
                         entity=environ.get("WANDB_ENTITY") or cfg.entity, name=environ.get("WANDB_NAME") or cfg.name,
                         watch=env("WANDB_WATCH", _WATCH, str(cfg.watch)),
                         log_model=env("WANDB_LOG_MODEL", LOG_MODEL_CHOICES, LOG_MODEL_CHOICES[str(cfg.log_model).lower()]),
                         histogram_interval=cfg.histogram_interval, reason=reason)


class WandbSink:
    """Every record in one WandB run (see the module docstring for continuity across resumes)."""

    def __init__(self, settings: WandbSettings, run_dir: Path, run_id: str | None, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"logging.wandb.mode={settings.mode} needs the wandb package (pip install wandb), "
                              "or set logging.wandb.mode=disabled") from None
        self._wandb, self.settings = wandb, settings
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.counter_file = run_dir / "wandb" / "log_counter"
        self.run = wandb.init(project=settings.project, entity=settings.entity, name=settings.name,
                              id=run_id or uuid.uuid4().hex[:8], resume="allow", mode=settings.mode, dir=str(run_dir),
                              config=config)
        self.run_id = self.run.id
        self.wandb_step = max(self._read_counter(), int(getattr(self.run, "step", 0) or 0))
        for prefix in ("train", "eval", "grad_norm", "data", "hist", "restart", "samples", "checkpoint"):
            self.run.define_metric(f"{prefix}/*", step_metric="train/step")
        self.run.define_metric("samples", step_metric="train/step")
        self.samples: list[list[Any]] = []
        # Checkpoint artifacts are checksummed (md5 of every file: docs/observe.md, "Checkpoints as artifacts") on one
        # background thread so that training goes on meanwhile; the run itself is only touched from the main thread
        # (see _flush_artifacts).
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wandb-artifact")
        self._pending: list[tuple[Future, dict[str, Any]]] = []
        if settings.mode == "offline":
            how = f" ({settings.reason})" if settings.reason else ""
            print(f"wandb: offline run {self.run_id}{how}; to upload it: wandb sync {run_dir / 'wandb'}/offline-run-*",
                  flush=True)

    def _read_counter(self) -> int:
        try:
            return int(self.counter_file.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _log(self, data: dict[str, Any], step: int) -> None:
        self.run.log({"train/step": step, **data}, step=self.wandb_step)
        self.wandb_step += 1
        tmp = self.counter_file.with_suffix(".tmp")
        tmp.write_text(str(self.wandb_step))
        os.replace(tmp, self.counter_file)

    def log(self, kind: str, record: dict[str, Any]) -> None:
        self._flush_artifacts(wait=False)
        step = record["step"]
        if kind == "sample":
            self.samples.append([step, record["prompt"], record["text"]])
            self._log({"samples": self._wandb.Table(columns=["step", "prompt", "text"], data=list(self.samples))}, step)
        elif kind == "histogram":
            hists = {f"hist/{record['what']}/{group}": self._wandb.Histogram(np_histogram=(counts, edges))
                     for group, (counts, edges) in record["groups"].items()}
            self._log(hists, step)
        elif kind == "event" and record["event"] == "restart":
            self._log({"restart/step": step, "restart/from_checkpoint": record.get("from_checkpoint") or ""}, step)
        elif kind == "event" and record["event"] == "checkpoint":
            self._log_model(record)
        elif kind in ("train", "eval"):
            numbers = {(k if "/" in k else f"{kind}/{k}"): v for k, v in record.items()
                       if k not in ("step", "max_steps", "time") and isinstance(v, (int, float))}
            self._log(numbers, step)

    def _log_model(self, record: dict[str, Any]) -> None:
        """Queue a `model` artifact for a checkpoint that was just saved, per log_model (checkpoint: all, end: the final)."""
        if self.settings.log_model == "false" or (self.settings.log_model == "end" and not record.get("final")):
            return
        self._pending.append((self._hasher.submit(self._model_artifact, record), record))

    def _model_artifact(self, record: dict[str, Any]):
        """(Background thread.) An artifact that references the checkpoint directory: one entry per file with its path,
        size and md5 (what `artifact.download()` / `verify()` check); no file is copied or uploaded."""
        path = Path(record["path"]).resolve()
        artifact = self._wandb.Artifact(f"model-{self.run_id}", type="model",
                                        metadata={"step": record["step"], "path": str(path), "final": record.get("final")})
        artifact.add_reference(f"file://{path}", name=path.name)
        return artifact

    def _flush_artifacts(self, wait: bool) -> None:
        """Log the checkpoint artifacts whose checksums are done (all of them, waiting, if `wait`), oldest first. A failure
        (the checkpoint rotated away by keep_last while being hashed) is a warning: it must not stop the training."""
        while self._pending and (wait or self._pending[0][0].done()):
            future, record = self._pending.pop(0)
            try:
                self.run.log_artifact(future.result(), aliases=[f"step-{record['step']}", "latest"])
            except Exception as err:  # noqa: BLE001
                print(f"wandb: warning: checkpoint {record['path']} not logged as an artifact: {err}", flush=True)

    def close(self) -> None:
        self._flush_artifacts(wait=True)
        self._hasher.shutdown()
        self.run.finish()


def make_wandb_sink(cfg: WandbConfig, run_dir: Path, run_id: str | None, config: dict[str, Any]) -> WandbSink | None:
    settings = wandb_settings(cfg)
    if settings.mode == "disabled":
        return None
    return WandbSink(settings, run_dir, run_id, config)


def watching(sink: WandbSink | None) -> list[str]:
    """What the histograms cover: [], ["grad"], ["param"] or both (WANDB_WATCH semantics)."""
    if sink is None:
        return []
    watch = sink.settings.watch
    return {WandbWatch.gradients: ["grad"], WandbWatch.parameters: ["param"], WandbWatch.all: ["grad", "param"]}.get(
        WandbWatch(watch), [])

