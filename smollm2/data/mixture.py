"""What a run trains and validates on, from its data config: one dataset (data.path) or a mixture (data.mixture,
data.stages), opened and checked before anything is built.

A mixture's checks, each a one-line DataError before the first step: every dataset opens (smollm2/data/dataset.py says
what is wrong with one that does not), every source has the first source's tokenizer, and every source holds a window.
A source the run will draw more than once is announced with how many epochs it repeats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from smollm2.config import Config, DataStage, source_name
from smollm2.data.dataset import Dataset
from smollm2.data.loader import TrainLoader, ValWindows
from smollm2.data.order import SourceStream, Stage, WindowOrder, source_key
from smollm2.data.tokenizer import dataset_tokenizer
from smollm2.errors import DataError


@dataclass
class TrainingData:
    loader: TrainLoader
    val: dict[str, ValWindows] | None  # per source name ("" for data.path alone); None without eval
    tokenizer: object  # the data's: samples are decoded with it, a resume must match it
    notes: list[str]  # for the start-up log: the sources, their shares, what repeats

    @property
    def mixed(self) -> bool:
        return self.loader.order.mixed

    def shares(self, drawn: dict[str, int]) -> dict[str, float]:
        """For the log line of a mixture: each source's tokens so far, and its share of the windows `drawn` since the last
        line (TrainLoader.take_news); nothing for one dataset."""
        if not self.mixed:
            return {}
        total, seq_len = sum(drawn.values()), self.loader.seq_len
        return {**{f"data/{name}/tokens": n * seq_len for name, n in zip(drawn, self.loader.cursor.consumed)},
                **{f"data/{name}/share": n / total for name, n in drawn.items()}}

    def weights(self) -> dict[str, float]:
        """The sources' weights in the stage of the last step taken (normalized): what the mixed val loss averages by."""
        order = self.loader.order
        return dict(zip(order.names, order.stages[self.loader.cursor.stage].weights))


def open_training_data(cfg: Config, rank: int, world_size: int, device, eos_masking: bool) -> TrainingData:
    """The run's loader (this rank's slice), val windows and tokenizer; `eos_masking`: batches carry the documents."""
    data = cfg.data
    stages = data.stage_list()
    paths = {source_name(s): s.path for stage in stages for s in stage.mixture} or {"": data.path}
    datasets = {name: Dataset.open(path, cfg.model.vocab_size) for name, path in paths.items()}
    tokenizer = _one_tokenizer(paths)
    if stages:
        order = WindowOrder([SourceStream(name, ds, data.seq_len, data.seed, source_key(name))
                             for name, ds in datasets.items()], _stages(stages, list(paths)))
    else:
        order = WindowOrder([SourceStream("data", datasets[""], data.seq_len, data.seed)])
    reset = data.position_reset if data.position_reset is not None else eos_masking
    loader = TrainLoader(order, data.seq_len, data.micro_batch, cfg.train.grad_accum, rank, world_size, data.seed,
                         device=device, prefetch=data.prefetch, eos_id=tokenizer.eos_id if eos_masking else None,
                         position_reset=reset)
    val = None
    if cfg.eval.interval:  # a mixture's val set: an equal part of eval.windows from each source
        per_source = cfg.eval.windows if not stages else max(1, math.ceil(cfg.eval.windows / len(datasets)))
        val = {name: ValWindows(ds, data.seq_len, per_source) for name, ds in datasets.items()}
    notes = _plan_notes(order, cfg, world_size) if stages else []
    return TrainingData(loader, val, tokenizer, notes)


def _stages(stages: list[DataStage], names: list[str]) -> list[Stage]:
    out = []
    for stage in stages:
        weights = {source_name(s): float(s.weight) for s in stage.mixture}  # type: ignore[arg-type]
        total = sum(weights.values())
        out.append(Stage(stage.start_step, tuple(weights.get(name, 0.0) / total for name in names)))
    return out


def _one_tokenizer(paths: dict[str, str]):
    """The sources' one tokenizer (the first source's); DataError naming the first source that has another."""
    (first, first_path), *rest = paths.items()
    tok = dataset_tokenizer(first_path)
    for name, path in rest:
        other = dataset_tokenizer(path)
        if (other.sha256, other.eos_id, other.vocab_size) != (tok.sha256, tok.eos_id, tok.vocab_size):
            what = lambda t: f"{t.name} ({t.vocab_size:,} ids, EOS {t.eos_id})"  # noqa: E731
            raise DataError(f"data.mixture: source '{name}' ({path}) was tokenized with {what(other)}, source "
                            f"'{first}' ({first_path}) with {what(tok)}: every source of a mixture must share one "
                            f"tokenizer; re-prepare it (python -m data_prep --tokenizer ... --out {path})")
    return tok


def _plan_notes(order: WindowOrder, cfg: Config, world_size: int) -> list[str]:
    """Each source's share per stage, and the epochs the run (to train.max_steps) will draw of it."""
    per_step = cfg.data.micro_batch * cfg.train.grad_accum * world_size
    bounds = [min(s.start_step, cfg.train.max_steps) for s in order.stages] + [cfg.train.max_steps]
    notes = []
    for k, stage in enumerate(order.stages):
        shares = ", ".join(f"{name} {w:.1%}" for name, w in zip(order.names, stage.weights) if w > 0)
        notes.append(f"data: from step {stage.start_step}: {shares}")
    for i, source in enumerate(order.sources):
        windows = sum(stage.weights[i] * per_step * (bounds[k + 1] - bounds[k]) for k, stage in enumerate(order.stages))
        epochs = windows / source.windows_per_epoch
        if epochs > 1:
            notes.append(f"data: source '{source.name}' ({source.windows_per_epoch:,} windows) is drawn about "
                         f"{epochs:.1f} times over by step {cfg.train.max_steps}: it repeats, with a new shuffle each "
                         "epoch")
    return notes
