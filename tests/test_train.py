"""Training end to end on CPU: real torchrun, gloo, configs/tiny.yaml, each run a separate process group as users run it:
the golden loss curve, the cadences, eval across ranks, bitwise resume, interrupted saves, the launch script's failures,
divergence never reaching a checkpoint, compiled blocks. (Resuming at other world sizes: tests/test_scale.py.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import ROOT, SHAPE, SMALL, TWO_RANK_RUN, cli, copy_run, losses, records
from tiny import train as launch

from smollm2.checkpoint import find_latest
from smollm2.data import Dataset, ValWindows
from smollm2.serve.loading import load_model_for_inference

pytestmark = pytest.mark.e2e
GOLDEN = json.loads((ROOT / "tests/fixtures/golden_loss_tiny_fp32.json").read_text())


def train(nproc: int, run_dir: Path, data: Path, *extra: str, check: bool = True, env: dict | None = None):
    """The session run's settings (tiny.TWO_RANK_RUN) at nproc ranks (0: one plain process), the same global batch."""
    return launch(nproc, run_dir, data, *TWO_RANK_RUN, *SHAPE[max(nproc, 1)], *extra, check=check, env=env)


def test_the_loss_curve_is_the_golden_one(two_rank_run):
    """configs/tiny.yaml's first 20 steps, fp32 (tests/fixtures/golden_loss_tiny_fp32.json says what and the
    tolerance's why): a change of the model, the init, the data order, the schedule or the numerics shows here."""
    by_step = losses(two_rank_run)
    assert sorted(by_step) == list(range(1, 21))
    assert [by_step[s] for s in range(1, 21)] == pytest.approx(GOLDEN["loss"], rel=GOLDEN["tolerance"]["relative"])
    assert by_step[20] < by_step[1] - 1.0  # and it trains


def test_cadences_fire_at_the_configured_steps(two_rank_run):
    assert [r["step"] for r in records(two_rank_run, "eval.jsonl")] == [10, 20]
    samples = records(two_rank_run, "samples.jsonl")
    assert [r["step"] for r in samples] == [15, 15, 20, 20]  # two prompts in tiny.yaml; the last step always samples
    assert all(r["tokens"] <= 6 for r in samples)
    steps = sorted(p.name for p in (two_rank_run / "checkpoints").glob("step-*"))
    assert steps == ["step-000010", "step-000020"]
    assert (two_rank_run / "checkpoints" / "latest").resolve().name == "step-000020"
    meta = json.loads((two_rank_run / "checkpoints/step-000020/meta.json").read_text())
    assert meta["step"] == 20 and meta["world_size"] == 2 and meta["model"]["d_model"] == 64
    assert (two_rank_run / "config.yaml").is_file()
    line = records(two_rank_run)[-1]
    for key in ("loss", "lr", "grad_norm", "tok_per_s", "mfu", "peak_mem_gib", "step_ms", "eta_s"):
        assert key in line


def test_eval_with_windows_that_do_not_split_evenly_across_ranks(shakespeare_data, tmp_path):
    """7 val windows on 2 ranks in micro-batches of 3: rank 0 evaluates windows [0 2 4] then [6]; rank 1 [1 3 5], then
    repeats window 5 with weight 0 to keep step with rank 0's forwards (FSDP's all-gathers are collective). The val loss
    is still the token-weighted mean over the 7 windows, as the saved model computes it here in one process."""
    train(2, tmp_path / "two", shakespeare_data, "train.max_steps=1", "eval.interval=1", "eval.windows=7",
          "sample.interval=0", "checkpoint.interval=1")  # SHAPE[2]: micro_batch=3
    (two,) = records(tmp_path / "two", "eval.jsonl")
    assert two["step"] == 1 and two["windows"] == 7

    model, cfg, step = load_model_for_inference(tmp_path / "two/checkpoints/latest")
    assert step == 1
    windows = ValWindows(Dataset.open(shakespeare_data, cfg.model.vocab_size), cfg.data.seq_len, 7).windows
    assert windows.shape == (7, 33)
    with torch.no_grad():
        per_window = [model(w[None, :-1], w[None, 1:]).item() for w in windows]  # equal token counts: a plain mean
    expected = sum(per_window) / 7
    assert two["val_loss"] == pytest.approx(expected, rel=1e-6)
    # counting the weight-0 repeat after all would move the mean (measured: by 2.3e-5 relative) well past the tolerance
    assert abs((sum(per_window) + per_window[5]) / 8 - expected) > 1e-5 * expected


def test_bitwise_resume(two_rank_run, resumed_run):
    a, b = records(two_rank_run), records(resumed_run)
    assert [r["step"] for r in b] == list(range(1, 21))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact, fp32
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    model_a, _, step_a = load_model_for_inference(two_rank_run / "checkpoints/latest")
    model_b, _, step_b = load_model_for_inference(resumed_run / "checkpoints/latest")
    assert step_a == step_b == 20
    for (name, x), (_, y) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(x, y), name


def test_an_interrupted_save_is_ignored(resumed_run, shakespeare_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(resumed_run / "checkpoints", run / "checkpoints", symlinks=True)
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step-000020", ckpts / ".tmp-step-000030")  # killed before the rename
    (ckpts / ".tmp-step-000030" / "COMPLETE").unlink()
    shutil.copytree(ckpts / "step-000020", ckpts / "step-000040")  # a complete-looking name without its marker
    (ckpts / "step-000040" / "COMPLETE").unlink()
    assert find_latest(ckpts).name == "step-000020"
    verify = cli("smollm2.checkpoint", "verify", run, "40")
    assert verify.returncode == 2 and "no complete checkpoint at step 40" in verify.stderr

    proc = train(0, run, shakespeare_data, "train.max_steps=21", "--resume", "latest")
    assert "resumed from" in proc.stdout and "step-000020 at step 20" in proc.stdout
    assert find_latest(ckpts).name == "step-000021"


def test_the_launch_script_names_the_phase_that_failed(two_rank_run, shakespeare_data, tmp_path):
    """launch/train.sh verifies each phase (its exit status, a verified checkpoint at its last step): a phase 1 that
    cannot start, and a phase 2 that ends below phase 1's step, fail naming the phase. (Both phases verified end to end:
    tests/test_signals.py, after a stop and a rerun.)"""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "NPROC": "1", "PYTHON": sys.executable,
           "HOME": str(tmp_path)}
    args = ["launch/train.sh", "configs/tiny.yaml", *TWO_RANK_RUN, *SHAPE[1], f"data.path={shakespeare_data}"]
    bad = subprocess.run([*args, f"train.run_dir={tmp_path / 'bad'}", "data.path=/nonexistent/data"], cwd=ROOT,
                         env={**env, "PHASE1_STEPS": "4", "PHASE2_STEPS": "6"}, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "FAILED: phase 1" in bad.stderr
    run = copy_run(two_rank_run, tmp_path / "run")  # at step 20: phase 1 has nothing to do, phase 2 ends below it
    short = subprocess.run([*args, f"train.run_dir={run}"], cwd=ROOT, env={**env, "PHASE1_STEPS": "20", "PHASE2_STEPS": "15"},
                           capture_output=True, text=True, timeout=600)
    assert short.returncode != 0 and "FAILED: phase 2" in short.stderr, short.stdout[-2000:] + short.stderr[-2000:]


@pytest.mark.parametrize("diverge, where", [
    (["optim.lr=10", "optim.weight_decay=1e38"],  # the first update makes the weights infinite; the norm was finite
     "error: the weights hold NaN or infinite values at step 1; not checkpointing"),
    (["optim.lr=1e30"], "error: loss became nan by step"),  # huge but finite weights: the next loss is NaN
])
def test_no_checkpoint_ever_holds_non_finite_weights(shakespeare_data, tmp_path, diverge, where):
    """A diverging run stops (exit 2) before its state reaches a checkpoint, and keeps the good ones it wrote."""
    run = tmp_path / "run"
    proc = train(0, run, shakespeare_data, "train.max_steps=10", *diverge, "optim.warmup_steps=0",
                 "optim.grad_clip=0", "checkpoint.interval=1", "eval.interval=0", "sample.interval=0", check=False)
    assert proc.returncode == 2 and where in proc.stderr, proc.stderr[-3000:]
    assert "The last good checkpoint is kept in" in proc.stderr
    for step, path in [(int(p.name[5:]), p) for p in (run / "checkpoints").glob("step-*")]:
        model, _, _ = load_model_for_inference(path)
        assert all(torch.isfinite(p).all() for p in model.parameters()), step


def test_an_error_right_after_a_background_save_still_commits_it(shakespeare_data, tmp_path):
    """checkpoint.async_save: step 2 goes to the background, then step 3 fails (an unreadable shard). The run still
    ends with an error, but only after step 2 is committed: it held a good state (it used to be thrown away)."""
    run = tmp_path / "run"
    proc = train(0, run, shakespeare_data, *SMALL, "train.max_steps=6", "checkpoint.interval=2",
                 "checkpoint.async_save=true", check=False, env={**os.environ, "SMOLLM2_TEST_FAULT": "3:0"})
    assert proc.returncode != 0 and "simulated unreadable shard at step 3" in proc.stderr, proc.stderr[-3000:]
    assert find_latest(run / "checkpoints") == run / "checkpoints/step-000002" and not list(run.glob("checkpoints/.tmp-*"))
    assert cli("smollm2.checkpoint", "verify", run, "2").returncode == 0
    assert [e["step"] for e in records(run, "events.jsonl") if e["event"] == "checkpoint"] == [2]


@pytest.mark.compile
def test_compiled_blocks_match_eager(shakespeare_data, tmp_path):
    """train.compile=true with per-block FSDP units (per-block torch.compile + the compiled loss chunk: the layout of
    every multi-rank run) trains the same model as eager, evals included; sampling, which would recompile per token,
    runs eagerly. (The one-graph layout of world size 1: tests/test_parallelize.py.) The small model keeps the cold
    compile short; the C++ wrapper, which launches the same kernels, is off for the same reason."""
    by_mode = {}
    for compile_setting in ("false", "true"):
        run = tmp_path / compile_setting
        train(0, run, shakespeare_data, *SMALL, "train.max_steps=3", f"train.compile={compile_setting}",
              "train.fsdp_wrap=block", "train.cpp_wrapper=false", "eval.interval=3", "sample.interval=3",
              "generate.max_new_tokens=4")
        by_mode[compile_setting] = [r["loss"] for r in records(run)]
        assert len(records(run, "samples.jsonl")) == 2
    assert by_mode["true"] == pytest.approx(by_mode["false"], rel=1e-4)


def test_the_spike_guard_through_the_trainer(shakespeare_data, tmp_path):
    """optim.spike_guard in a real run: skips are logged (train/skipped_steps, a console line), the window is in the
    checkpoint and its count continues after a resume, and spike_max_skips in a row stop the run in one line without a
    checkpoint of that state. (What is skipped, and that a resume keeps the window bitwise: tests/test_optim.py.) A tiny
    z makes most steps count as spikes."""
    run = tmp_path / "run"
    guard = [*SMALL, "optim.spike_guard=true", "optim.spike_window=2", "optim.spike_z_loss=1e-6",
             "optim.spike_z_grad=1e-6", "optim.warmup_steps=0"]
    first = launch(0, run, shakespeare_data, *guard, "optim.spike_max_skips=100", "train.max_steps=6")
    skipped = [r["skipped_steps"] for r in records(run)]
    assert skipped[-1] > 0 and skipped == sorted(skipped) and "update(s) as loss or gradient-norm spikes" in first.stdout
    saved = json.loads((run / "checkpoints/latest/train_state.json").read_text())["spike_guard"]
    assert saved["skipped"] == skipped[-1] and len(saved["window"][0]) == 2
    second = launch(0, run, shakespeare_data, *guard, "optim.spike_max_skips=2", "train.max_steps=20", "--resume", "latest",
                    check=False)
    assert second.returncode == 2, second.stderr[-2000:]
    assert "error: 2 updates in a row skipped as spikes, by step " in second.stderr
    assert records(run)[-1]["skipped_steps"] > skipped[-1]
    assert [c.name for c in (run / "checkpoints").glob("step-*")] == ["step-000006"]
