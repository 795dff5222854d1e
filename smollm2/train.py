"""The training loop.

    torchrun --nproc_per_node=8 -m smollm2.train --config configs/smollm2_135.yaml [key=value ...]
    python -m smollm2.train --config configs/tiny.yaml --resume latest train.max_steps=5050

`Run` is built once: data, model, optimizer, schedule, checkpointer and sinks, resumed from a checkpoint if asked.
`train` is the loop: one global step = grad_accum micro-steps on every rank (gradients sync on the last one), clipping,
AdamW at the schedule's LR; then, on their configured steps, the log line (and a stop request), eval, samples and the
checkpoint. Other steps make no host sync.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from smollm2.checkpoint import Checkpointer, ModelAndOptimizer, read_meta, resolve
from smollm2.config import Config, load_config, to_dict, to_yaml
from smollm2.data.mixture import open_training_data
from smollm2.data.tokenizer import check_resume_tokenizer
from smollm2.distributed import (
    DistEnv,
    check_shared_dir,
    describe_ranks,
    init_distributed,
    mean_over_ranks,
    rank0_decides,
    shutdown,
)
from smollm2.errors import STOP_EXIT_CODE, STOP_MARKER, CheckpointError, TrainingDiverged
from smollm2.observe.gradflow import GradientFlow
from smollm2.observe.metrics import (
    ConsoleSink,
    JsonlSink,
    Metrics,
    Throughput,
    device_peak_tflops,
    flops_per_token,
    peak_memory_gib,
    resources,
)
from smollm2.observe.profile import make_profiler
from smollm2.observe.ranklog import RankLog, fault_hook
from smollm2.observe.tracking import make_wandb_sink, watching
from smollm2.observe.validation import validation_loss
from smollm2.optim import LRSchedule, SpikeGuard, build_optimizer
from smollm2.parallelize import build_model, masked_attention
from smollm2.serve.generate import write_samples
from smollm2.step import train_step, weights_finite
from smollm2.stopping import StopRequest, mark_stopped


@dataclass
class TrainState:
    """The loop's own progress: the top level of every checkpoint's train_state.json."""

    step: int = 0  # completed optimizer steps
    tokens_seen: int = 0
    logger_run_id: str | None = None  # the WandB run this one continues
    stopped_by_signal: bool = False  # this process's run ended on a stop request (not saved)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "logger_run_id": self.logger_run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.logger_run_id = state.get("logger_run_id")


@dataclass
class LogWindow:
    """What the loop accumulates between two log lines."""

    loss_sum: torch.Tensor  # the detached losses, on the device (summed without a host sync)
    steps: int = 0
    data_wait: float = 0.0  # seconds spent waiting for batches


def _value(tensor) -> float:
    """A scalar tensor (a DTensor under FSDP2) as a Python float: a host sync, for log and checkpoint steps only."""
    return float(tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor)


def _due(interval: int, step: int, last: bool) -> bool:
    """A cadence: every `interval` steps (0: never), and at the run's last step."""
    return bool(interval) and (step % interval == 0 or last)


class Run:
    """Everything one training run is made of, built once from the config; the loop (`train`) only uses it."""

    def __init__(self, cfg: Config, env: DistEnv, stop: StopRequest):
        self.cfg, self.env, self.stop = cfg, env, stop
        self.kernel = masked_attention(cfg, env.device)  # first: a combination that cannot run stops before any work
        self.run_dir = Path(cfg.train.run_dir)
        check_shared_dir(self.run_dir, env)  # creates it; a node-local run_dir would fail only at the first checkpoint
        if env.is_main:
            (self.run_dir / STOP_MARKER).unlink(missing_ok=True)  # a marker describes the run that wrote it, not this one
        torch.manual_seed(cfg.train.seed + env.rank)
        data, train = cfg.data, cfg.train
        self.data = open_training_data(cfg, env.rank, env.world_size, env.device, cfg.model.document_masking)
        self.loader, self.tokenizer = self.data.loader, self.data.tokenizer
        self.model = build_model(cfg, env)
        self.optimizer = build_optimizer(self.model, cfg.optim, env.device)
        self.schedule = LRSchedule(cfg.optim)
        self.state = TrainState()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last, env.rank, env.world_size,
                                         keep_every=cfg.checkpoint.keep_every, async_save=cfg.checkpoint.async_save)
        self.tokens_per_step = data.micro_batch * train.grad_accum * env.world_size * data.seq_len
        self.in_flight: list[dict] = []  # the background save's event, logged once it is committed
        self.guard = SpikeGuard(cfg.optim, env.device) if cfg.optim.spike_guard else None
        self.profiler = make_profiler(self.run_dir, env.rank, env.device, train.profile_steps, train.memory_snapshot)
        resumed_from = self._resume()
        if env.is_main:  # only now: a refused start (bad data, another model shape) leaves the run's config as it was
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        m = cfg.model
        self.throughput = Throughput(self.tokens_per_step,
                                     flops_per_token(self.model.flops_params(), m.n_layer, m.n_head, m.head_dim,
                                                     data.seq_len),
                                     device_peak_tflops(env.device, cfg.logging.peak_tflops), env.world_size)
        self._open_sinks(resumed_from)
        self._announce()

    def parts(self) -> dict[str, Any]:
        """What a checkpoint holds (see smollm2/checkpoint/manager.py)."""
        return {"model": ModelAndOptimizer(self.model, self.optimizer), "train": self.state, "loader": self.loader,
                "schedule": self.schedule, **({"spike_guard": self.guard} if self.guard else {})}

    def say(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------------------ setup

    def _resume(self) -> Path | None:
        """Rank 0 picks (and checks) the checkpoint, every rank follows: a stale directory cache on one node must not
        make ranks resume from different checkpoints. Without --resume, a run_dir that holds checkpoints is an error."""
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if self.env.local_rank == 0 and restart > 0:  # counted by the node whose rank died
            print(f"rank {self.env.rank}: torchrun restart {restart} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}"
                  ": continuing from the newest complete checkpoint", flush=True)
        if self.cfg.train.resume:  # before choose(), which may move the checkpoints of other lines aside
            rank0_decides(lambda: self._check_tokenizer(self.cfg.train.resume))
        path = self.checkpointer.choose(self.cfg.train.resume)
        if path is None:
            if self.cfg.train.init_from:  # a new run from its weights: a fresh optimizer, step 0, the data from its start
                rank0_decides(lambda: self._check_tokenizer(self.cfg.train.init_from))
                source = self.checkpointer.load_model(self.cfg.train.init_from, self.model, self.cfg)
                self.say(f"init_from: starting a new run from the weights of {source}")
            elif self.cfg.train.resume:
                self.say(f"resume=latest: no complete checkpoint in {self.run_dir / 'checkpoints'} yet; starting from "
                         "step 0")
            return None
        rank0_decides(lambda: self._check_tokenizer(str(path)))  # the one chosen (latest may have skipped a damaged one)
        self.checkpointer.load(path, self.parts(), self.cfg, verified=True)  # choose() checked its files
        for change in self.schedule.changed:
            self.say(f"warning: the LR schedule differs from the checkpoint's ({change}): the curve will jump")
        for change in self.loader.changed:
            self.say(f"warning: data: {change}")
        self.say(f"resumed from {path} at step {self.state.step} (world size {self.env.world_size})")
        return path

    def _check_tokenizer(self, spec: str) -> None:  # rank 0
        """The checkpoint `spec` names was trained on data of this dataset's tokenizer (see check_resume_tokenizer)."""
        try:
            path = resolve(spec, self.checkpointer.root)
            recorded = None if path is None else read_meta(path).get("tokenizer")
        except CheckpointError:  # a missing or damaged checkpoint: choose() says so, as for any resume
            return
        if path is not None:
            check_resume_tokenizer(recorded, self.tokenizer, path, self.cfg.data.tokenizer_path())

    def _open_sinks(self, resumed_from: Path | None) -> None:
        """Rank 0's sinks (console, JSONL, WandB); the others log nothing. The gradient flow's histograms are collective,
        so every rank learns from rank 0 what WandB watches."""
        cfg, env, state = self.cfg, self.env, self.state
        sinks: list = []
        wandb_sink = None
        if env.is_main:
            sinks = [ConsoleSink(), JsonlSink(self.run_dir)]
            wandb_sink = make_wandb_sink(cfg.logging.wandb, self.run_dir, state.logger_run_id, to_dict(cfg))
            if wandb_sink is not None:
                state.logger_run_id = wandb_sink.run_id
                sinks.append(wandb_sink)
        self.metrics = Metrics(sinks)
        if resumed_from is not None:  # a resume (phase 2, a requeue, a crash rerun): marked in events.jsonl and in WandB
            self.metrics.log("event", {"event": "restart", "step": state.step, "from_checkpoint": resumed_from.name,
                                       "time": time.time()})
        self.flow = GradientFlow(rank0_decides(lambda: watching(wandb_sink)), cfg.logging.wandb.histogram_interval)

    def _announce(self) -> None:
        cfg, env = self.cfg, self.env
        micro, accum, seq_len = cfg.data.micro_batch, cfg.train.grad_accum, cfg.data.seq_len
        self.say(f"model {self.model.num_params():,} parameters | world size {env.world_size} on {env.device.type} | "
                 f"{self.tokens_per_step:,} tokens/step ({micro} x {accum} x {env.world_size} windows of {seq_len}) | "
                 f"dtype {cfg.train.dtype} | activation checkpointing {cfg.train.activation_checkpointing}")
        if self.kernel:
            reset = "restart at each document" if self.data.loader.position_reset else "0..T-1"
            self.say(f"document masking: {self.kernel} (positions {reset})")
        for line in describe_ranks(env) + self.data.notes:  # where each rank runs (collective); the mixture's plan
            self.say(line)
        if self.state.step >= cfg.train.max_steps:
            self.say(f"already at step {self.state.step} >= train.max_steps={cfg.train.max_steps}: nothing to do")

    # ------------------------------------------------------------------------------------------- what steps do

    def log_train(self, window: LogWindow, grad_norm: torch.Tensor, lr: float) -> None:
        """The log line (collective: the loss is averaged over the ranks); stops the run on a non-finite loss."""
        step, max_steps = self.state.step, self.cfg.train.max_steps
        loss = mean_over_ranks(window.loss_sum).item() / window.steps
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} by step {step}; stopping without saving. The last good checkpoint is kept in "
                f"{self.run_dir / 'checkpoints'} (lower optim.lr or check the data, then --resume latest)")
        speed = self.throughput.measure(max_steps - step)
        group_norms, histograms = self.flow.take()
        events, drawn = self.loader.take_news()
        spikes, tripped = self._spikes(step)
        for event in events:
            self.say(f"step {step}: {event}")
        self.metrics.log("train", {"step": step, "max_steps": max_steps, "loss": loss, "lr": lr,
                                   "grad_norm": _value(grad_norm), "tokens_seen": self.state.tokens_seen,
                                   "peak_mem_gib": peak_memory_gib(self.env.device), **speed,
                                   "data_wait_ms": 1000 * window.data_wait / window.steps, **resources(self.env.device),
                                   **{f"grad_norm/{g}": v for g, v in group_norms.items()}, **self.data.shares(drawn), **spikes,
                                   "time": time.time()})
        for what, groups in histograms.items():
            self.metrics.log("histogram", {"step": step, "what": what, "groups": groups})
        window.loss_sum.zero_()
        window.steps, window.data_wait = 0, 0.0
        if tripped:
            raise self.guard.stopped(tripped, "stopping without saving", self.run_dir / "checkpoints")

    def _spikes(self, step: int) -> tuple[dict[str, int], int]:
        """The spike guard's skips in all (a line when some came since the last one), and the step that ended
        spike_max_skips in a row (0: none)."""
        if self.guard is None:
            return {}, 0
        new, total, tripped = self.guard.take()
        if new:
            self.say(f"step {step}: skipped {new} update(s) as loss or gradient-norm spikes since the last line ({total} in all)")
        return {"skipped_steps": total}, tripped

    def save(self, grad_norm: torch.Tensor) -> None:
        """A checkpoint of this step; never of a diverged state (the good ones before it are kept)."""
        step = self.state.step
        norm, finite_weights = _value(grad_norm), weights_finite(self.model.parameters())  # the same on every rank
        self.committed()  # the previous save (in the background) held a good state: it is kept either way
        if self.guard is not None and int(self.guard.tripped_at):
            raise self.guard.stopped(int(self.guard.tripped_at), "not checkpointing", self.run_dir / "checkpoints")
        if not math.isfinite(norm) or not finite_weights:
            what = f"gradient norm is {norm}" if not math.isfinite(norm) else "the weights hold NaN or infinite values"
            raise TrainingDiverged(f"{what} at step {step}; not checkpointing. The last good checkpoint is kept in "
                                   f"{self.run_dir / 'checkpoints'}")
        start = time.perf_counter()
        final = step >= self.cfg.train.max_steps  # the run's last checkpoint: kept forever, never rotated by keep_last
        path = self.checkpointer.save(step, self.parts(), self.cfg, final=final)
        stall = time.perf_counter() - start  # what training waited for: the whole save, or (async) the host copy
        self.say(f"checkpoint {path} ({stall:.1f}s{'; writing in the background' if self.checkpointer.async_save else ''})")
        self.in_flight.append({"event": "checkpoint", "step": step, "path": str(path), "final": final,
                               "stall_s": round(stall, 4)})
        if not self.checkpointer.async_save:
            self.committed()

    def committed(self, timeout: float | None = None) -> None:
        """Collective: wait for the background save (if any), then record the saves that are committed."""
        self.checkpointer.wait(timeout)
        for event in self.in_flight:
            self.metrics.log("event", {**event, "time": time.time()})
        self.in_flight.clear()

    def settle(self) -> None:
        """On the way out after an error: commit the save in flight (bounded by train.dist_timeout_min); its own failure
        is a warning, the error that ended the run stays the one reported."""
        try:
            self.committed(timeout=60 * self.cfg.train.dist_timeout_min)
        except Exception as err:  # noqa: BLE001 - reported, not raised: the run's own error follows
            print(f"warning: the checkpoint being written in the background was not committed: {err}", file=sys.stderr,
                  flush=True)

    def stopped(self) -> None:
        """End the run on a stop request: its save committed, the marker left for the launch scripts."""
        self.committed()
        mark_stopped(self.run_dir, self.env, self.state.step)
        self.state.stopped_by_signal = True

    def close(self) -> None:
        if self.profiler:
            self.profiler.close(self.state.step)
            for line in self.profiler.take_lines():
                self.say(line)
        self.loader.close()
        self.metrics.close()


def train(cfg: Config, env: DistEnv, stop: StopRequest | None = None) -> TrainState:
    run = Run(cfg, env, stop or StopRequest())
    try:
        _loop(run)
    except BaseException as err:
        # An error every rank meets at the same point (a divergence, an agreed checkpoint or data error), or any at world
        # size 1: the save in flight in the background held a good state; it is committed before the run ends.
        if env.world_size == 1 or getattr(err, "agreed", False):
            run.settle()
        raise
    finally:
        run.close()
    return run.state


def _loop(run: Run) -> None:
    cfg, env, state = run.cfg, run.env, run.state
    if run.stop.agreed(env.device):  # a signal during setup: nothing trained since the last checkpoint, nothing to save
        run.say(f"stop requested (signal) before the first step: exiting at step {state.step} without a checkpoint")
        run.stopped()
        return
    window = LogWindow(loss_sum=torch.zeros((), device=env.device))
    grad_norm = torch.zeros((), device=env.device)
    while state.step < cfg.train.max_steps:
        # one optimizer step
        step, last = state.step + 1, state.step + 1 == cfg.train.max_steps
        log_step = step % cfg.logging.interval == 0 or last
        lr = run.schedule.apply(run.optimizer, state.step)
        wait_start = time.perf_counter()
        fault_hook(step, env.rank)
        if run.profiler:
            run.profiler.begin(step)
        batch = run.loader.next_step()  # the time spent here is the input pipeline's (an input-bound run shows it)
        window.data_wait += time.perf_counter() - wait_start
        guard = partial(run.guard.decide, run.optimizer, step=step) if run.guard else None
        _, grad_norm = train_step(run.model, run.optimizer, batch, cfg.train.grad_accum, cfg.optim.grad_clip,
                                  loss_sum=window.loss_sum, inspect_grads=run.flow.hook(log_step), before_update=guard)
        state.step, state.tokens_seen = step, state.tokens_seen + run.tokens_per_step
        window.steps += 1
        run.throughput.step()
        if run.profiler:
            run.profiler.end(step, last)
            for line in run.profiler.take_lines():
                run.say(line)
        # the log line, and there a stop request: every rank checkpoints this step and exits
        if log_step:
            run.log_train(window, grad_norm, lr)
            if run.stop.agreed(env.device):
                run.say(f"stop requested (signal): checkpointing at step {step} and exiting")
                run.save(grad_norm)
                run.stopped()
                return
        # eval, samples, checkpoint: not counted as training time
        with run.throughput.paused():
            if run.data.val is not None and _due(cfg.eval.interval, step, last):
                losses = validation_loss(run.model, run.data.val, run.data.weights(), cfg.data.micro_batch, env,
                                         (run.loader.eos_id, run.loader.position_reset))
                run.metrics.log("eval", {"step": step, **losses})
            if _due(cfg.sample.interval, step, last):
                write_samples(run.model, cfg.sample.prompts, cfg.generate, env.device, step, run.metrics.log, run.tokenizer)
            if _due(cfg.checkpoint.interval, step, last) or last:
                run.save(grad_norm)
    run.committed()  # the run's last save is committed before it ends


@record  # a failing rank's error (message + traceback) lands in torchrun's failure summary, naming the rank
def main(argv: list[str] | None = None) -> int:
    stop = StopRequest()  # first: a preemption signal during setup must not kill the rank
    parser = argparse.ArgumentParser(prog="python -m smollm2.train", description="Train (torchrun for several ranks).")
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/smollm2_135.yaml")
    parser.add_argument("--resume", help="latest | a checkpoint directory (same as train.resume=...)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.max_steps=100")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    log = RankLog.from_env(Path(cfg.train.run_dir))  # as soon as run_dir is known: joining the group can fail too
    try:
        env = init_distributed(cfg.train.device, cfg.train.dist_timeout_min)
        state = train(cfg, env, stop)
    except BaseException as err:
        log.exception(err)
        raise
    finally:
        shutdown()
        log.close()
    return STOP_EXIT_CODE if state.stopped_by_signal else 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main, sys.argv[1:])
