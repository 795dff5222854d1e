"""The training loop.

    torchrun --nproc_per_node=8 -m smollm2.train --config configs/smollm2_135.yaml [key=value ...]
    python -m smollm2.train --config configs/tiny.yaml --resume latest train.max_steps=5050

One global step = grad_accum micro-steps on every rank (gradients sync on the last one), clipping, AdamW, the LR of the
schedule. Logging, eval, samples and checkpoints fire on their configured steps; there is no host sync on other steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from smollm2.checkpoint import Checkpointer
from smollm2.config import Config, load_config, to_dict, to_yaml
from smollm2.data import Dataset, TrainLoader, ValWindows
from smollm2.distributed import DistEnv, check_shared_dir, describe_ranks, init_distributed, shutdown
from smollm2.errors import STOP_EXIT_CODE, STOP_MARKER, UserError
from smollm2.generate import generate
from smollm2.gradflow import GradientFlow
from smollm2.metrics import (
    ConsoleSink,
    JsonlSink,
    Metrics,
    Throughput,
    device_peak_tflops,
    flops_per_token,
    peak_memory_gib,
    resources,
)
from smollm2.optim import LRSchedule, build_optimizer
from smollm2.parallelize import build_model
from smollm2.ranklog import RankLog, fault_hook
from smollm2.step import train_step
from smollm2.stopping import StopRequest, mark_stopped
from smollm2.tokenizer import get_tokenizer
from smollm2.tracking import make_wandb_sink, watching


class TrainingDiverged(UserError):
    pass


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps
    tokens_seen: int = 0
    logger_run_id: str | None = None
    stopped_by_signal: bool = False  # this process's run ended on a stop request (not saved in checkpoints)


def _value(tensor) -> float:
    """A scalar tensor (a DTensor under FSDP2) as a Python float: a host sync, for log and checkpoint steps only."""
    return float(tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor)


def _log(env: DistEnv, message: str) -> None:
    if env.is_main:
        print(message, flush=True)


@torch.no_grad()
def evaluate(model, val: ValWindows, cfg: Config, env: DistEnv) -> dict:
    """Mean loss over the fixed val windows. Every rank runs the same number of forwards (FSDP's all-gathers are
    collective); a rank with fewer windows repeats its last one with weight 0."""
    model.eval()
    windows = val.rank_windows(env.rank, env.world_size)
    batch = cfg.data.micro_batch
    most = math.ceil(val.num_windows / env.world_size)
    n_batches = max(1, math.ceil(most / batch))
    loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
    token_count = torch.zeros((), device=env.device, dtype=torch.float64)
    for b in range(n_batches):
        chunk = windows[b * batch : (b + 1) * batch]
        weight = 1.0
        if len(chunk) == 0:  # keep step with the other ranks
            chunk, weight = (windows[-1:] if len(windows) else val.rank_windows(0, 1)[:1]), 0.0
        chunk = chunk.to(env.device, non_blocking=True)
        loss = model(chunk[:, :-1], chunk[:, 1:])
        tokens = chunk[:, 1:].numel()
        loss_sum += loss.double() * tokens * weight
        token_count += tokens * weight
    totals = torch.stack([loss_sum, token_count])
    dist.all_reduce(totals)
    model.train()
    val_loss = (totals[0] / totals[1]).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "windows": val.num_windows}


def write_samples(model, cfg: Config, env: DistEnv, step: int, metrics: Metrics) -> None:
    # Decoding feeds the blocks one new token at a time against a growing KV cache: every shape is new, so compiled
    # blocks would recompile per token. Sampling is a small cost; run it eagerly.
    with torch.compiler.set_stance("force_eager"):
        _write_samples(model, cfg, env, step, metrics)


def _write_samples(model, cfg: Config, env: DistEnv, step: int, metrics: Metrics) -> None:
    tok = get_tokenizer()
    for i, prompt in enumerate(cfg.sample.prompts):  # one seed per prompt: samples differ, and repeat across evals
        settings = dataclasses.replace(cfg.generate, seed=cfg.generate.seed + i)
        ids = generate(model, tok.encode(prompt), settings, device=env.device)
        metrics.log("sample", {"step": step, "prompt": prompt, "text": tok.decode(ids), "tokens": len(ids)})


def _agree(env: DistEnv, watch: list[str]) -> list[bool]:
    """Rank 0's [histogram gradients?, histogram parameters?] on every rank."""
    flags = torch.tensor([float("grad" in watch), float("param" in watch)], device=env.device)
    dist.broadcast(flags, src=0)
    return [bool(f) for f in flags.tolist()]


def train(cfg: Config, env: DistEnv, stop: StopRequest | None = None) -> TrainState:
    run_dir = Path(cfg.train.run_dir)
    check_shared_dir(run_dir, env)  # creates it; a node-local run_dir would fail only at the first checkpoint
    if env.is_main:
        (run_dir / STOP_MARKER).unlink(missing_ok=True)  # a marker describes the run that wrote it, not this one
    torch.manual_seed(cfg.train.seed + env.rank)

    dataset = Dataset.open(cfg.data.path, cfg.model.vocab_size)
    micro, accum, seq_len = cfg.data.micro_batch, cfg.train.grad_accum, cfg.data.seq_len
    loader = TrainLoader(dataset, seq_len, micro, accum, env.rank, env.world_size, cfg.data.seed,
                         device=env.device, prefetch=cfg.data.prefetch)
    val = ValWindows(dataset, seq_len, cfg.eval.windows) if cfg.eval.interval else None

    model = build_model(cfg, env)
    optimizer = build_optimizer(model, cfg.optim, env.device)
    schedule = LRSchedule(cfg.optim)
    state = TrainState()
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last, env.rank, env.world_size,
                                keep_every=cfg.checkpoint.keep_every, async_save=cfg.checkpoint.async_save)

    # Rank 0 picks (and checks) the checkpoint, every rank follows: a stale directory cache on one node must not make
    # ranks resume from different checkpoints. Without --resume, a run_dir that holds checkpoints is an error.
    if env.local_rank == 0 and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:  # counted by the node whose
        print(f"rank {env.rank}: torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']} of "  # rank died
              f"{os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}: continuing from the newest complete checkpoint",
              flush=True)
    path = checkpointer.choose(cfg.train.resume)
    if cfg.train.resume:
        if path is None:
            _log(env, f"resume=latest: no complete checkpoint in {run_dir / 'checkpoints'} yet; starting from step 0")
        else:
            saved = checkpointer.load(path, model, optimizer, cfg, verified=True)  # choose() checked its files
            state = TrainState(step=saved["step"], tokens_seen=saved["tokens_seen"],
                               logger_run_id=saved.get("logger_run_id"))
            loader.load_state_dict(saved["loader"])
            for change in schedule.changes_from(saved.get("schedule", {})):
                _log(env, f"warning: the LR schedule differs from the checkpoint's ({change}): the curve will jump")
            _log(env, f"resumed from {path} at step {state.step} (world size {env.world_size})")
    if env.is_main:  # only now: a refused start (bad data, another model shape) leaves the run's config as it was
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    n_params = model.num_params()
    tokens_per_step = micro * accum * env.world_size * seq_len
    throughput = Throughput(tokens_per_step,
                            flops_per_token(n_params, cfg.model.n_layer, cfg.model.n_head,
                                            cfg.model.d_model // cfg.model.n_head, seq_len),
                            device_peak_tflops(env.device, cfg.logging.peak_tflops), env.world_size)
    sinks: list = []
    wandb_sink = None
    if env.is_main:
        sinks = [ConsoleSink(), JsonlSink(run_dir)]
        wandb_sink = make_wandb_sink(cfg.logging.wandb, run_dir, state.logger_run_id, to_dict(cfg))
        if wandb_sink is not None:
            state.logger_run_id = wandb_sink.run_id
            sinks.append(wandb_sink)
    metrics = Metrics(sinks)
    if path is not None:  # a resume (phase 2, a requeue, a crash rerun): marked in events.jsonl and in WandB
        metrics.log("event", {"event": "restart", "step": state.step, "from_checkpoint": path.name, "time": time.time()})
    # What to histogram is rank 0's (WandB's) business, but the histograms are collective: every rank learns it.
    watch = [what for what, flag in zip(("grad", "param"), _agree(env, watching(wandb_sink))) if flag]
    flow = GradientFlow(watch, cfg.logging.wandb.histogram_interval)
    _log(env, f"model {n_params:,} parameters | world size {env.world_size} on {env.device.type} | "
              f"{tokens_per_step:,} tokens/step ({micro} x {accum} x {env.world_size} windows of {seq_len}) | "
              f"dtype {cfg.train.dtype} | activation checkpointing {cfg.train.activation_checkpointing}")
    for line in describe_ranks(env):  # where each rank runs: host, device, GPU (collective)
        _log(env, line)
    if state.step >= cfg.train.max_steps:
        _log(env, f"already at step {state.step} >= train.max_steps={cfg.train.max_steps}: nothing to do")

    in_flight: list[dict] = []  # the background save's event, logged once it is committed

    def committed() -> None:  # collective: waits for the background save (async), then records it
        checkpointer.wait()
        for event in in_flight:
            metrics.log("event", {**event, "time": time.time()})
        in_flight.clear()

    def save() -> None:
        norm = _value(grad_norm)
        if not math.isfinite(norm):  # never write a diverged state over the good ones
            raise TrainingDiverged(f"gradient norm is {norm} at step {state.step}; not checkpointing. The last "
                                   f"good checkpoint is kept in {run_dir / 'checkpoints'}")
        train_state = {"step": state.step, "tokens_seen": state.tokens_seen, "logger_run_id": state.logger_run_id,
                       "loader": loader.state_dict(), "schedule": schedule.state_dict()}
        committed()
        start = time.perf_counter()
        final = state.step >= cfg.train.max_steps  # the run's last checkpoint: kept forever, never rotated by keep_last
        path = checkpointer.save(state.step, model, optimizer, train_state, cfg, final=final)
        stall = time.perf_counter() - start  # what training waited for: the whole save, or (async) the host copy
        how = "; writing in the background" if cfg.checkpoint.async_save else ""
        _log(env, f"checkpoint {path} ({stall:.1f}s{how})")
        in_flight.append({"event": "checkpoint", "step": state.step, "path": str(path), "final": final,
                          "stall_s": round(stall, 4)})
        if not cfg.checkpoint.async_save:
            committed()

    stop = stop or StopRequest()
    if stop.agreed(env.device):  # a signal during setup: nothing trained since the last checkpoint, nothing to save
        _log(env, f"stop requested (signal) before the first step: exiting at step {state.step} without a checkpoint")
        mark_stopped(run_dir, env, state.step)
        loader.close()
        metrics.close()
        state.stopped_by_signal = True
        return state
    loss_sum = torch.zeros((), device=env.device)
    grad_norm = torch.zeros((), device=env.device)
    steps_since_log, data_wait = 0, 0.0
    try:
        while state.step < cfg.train.max_steps:
            lr = schedule.apply(optimizer, state.step)
            log_step = (state.step + 1) % cfg.logging.interval == 0 or state.step + 1 == cfg.train.max_steps
            wait_start = time.perf_counter()
            fault_hook(state.step + 1, env.rank)
            batch = loader.next_step()  # the time spent here is the input pipeline's (an input-bound run shows it)
            data_wait += time.perf_counter() - wait_start
            loss_sum, grad_norm = train_step(model, optimizer, batch, accum, cfg.optim.grad_clip, loss_sum=loss_sum,
                                             inspect_grads=flow.hook(log_step))
            state.step += 1
            state.tokens_seen += tokens_per_step
            steps_since_log += 1
            throughput.step()

            step = state.step
            last = step == cfg.train.max_steps
            if step % cfg.logging.interval == 0 or last:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG if env.device.type == "cuda" else dist.ReduceOp.SUM)
                if env.device.type != "cuda":  # gloo has no AVG
                    loss_sum /= env.world_size
                loss_value = loss_sum.item() / steps_since_log
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(
                        f"loss became {loss_value} by step {step}; stopping without saving. The last good checkpoint "
                        f"is kept in {run_dir / 'checkpoints'} (lower optim.lr or check the data, then --resume latest)")
                speed = throughput.measure(cfg.train.max_steps - step)
                group_norms, histograms = flow.take()
                metrics.log("train", {"step": step, "max_steps": cfg.train.max_steps, "loss": loss_value, "lr": lr,
                                      "grad_norm": _value(grad_norm), "tokens_seen": state.tokens_seen,
                                      "peak_mem_gib": peak_memory_gib(env.device), **speed,
                                      "data_wait_ms": 1000 * data_wait / steps_since_log, **resources(env.device),
                                      **{f"grad_norm/{g}": v for g, v in group_norms.items()}, "time": time.time()})
                for what, groups in histograms.items():
                    metrics.log("histogram", {"step": step, "what": what, "groups": groups})
                loss_sum.zero_()
                steps_since_log, data_wait = 0, 0.0
                if stop.agreed(env.device):
                    _log(env, f"stop requested (signal): checkpointing at step {step} and exiting")
                    save()
                    committed()
                    mark_stopped(run_dir, env, step)
                    state.stopped_by_signal = True
                    return state
            with throughput.paused():
                if val is not None and cfg.eval.interval and (step % cfg.eval.interval == 0 or last):
                    metrics.log("eval", {"step": step, **evaluate(model, val, cfg, env)})
                if cfg.sample.interval and (step % cfg.sample.interval == 0 or last):
                    write_samples(model, cfg, env, step, metrics)
                if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or last:
                    save()
        committed()  # the run's last save is committed before it ends
    finally:
        loader.close()
        metrics.close()
    return state


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

