"""Stopping a run with a signal, end to end: trainer -> torchrun -> launch/train.sh. A stop checkpoints at the next log
step, exits with the stop code (75), leaves no rank behind, and a rerun continues. Every wait has a deadline."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import ROOT, SMALL, command

from smollm2.checkpoint import list_checkpoints
from smollm2.errors import STOP_EXIT_CODE, STOP_MARKER

pytestmark = pytest.mark.e2e
STOPPABLE = [*SMALL, "logging.interval=2"]  # a stop is taken at a log step


def launch_env(nproc: int, phase1: int, phase2: int) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # torchrun of this interpreter
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "NPROC": str(nproc),
            "PHASE1_STEPS": str(phase1), "PHASE2_STEPS": str(phase2), "SMOLLM2_STOP_GRACE_S": "60"}


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.1)
    if not condition():
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"{what} did not happen in {timeout} s (exit {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"still running {timeout} s after the signal:\n{out[-2000:]}\n{err[-3000:]}")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def train_sh(run: Path, data: Path, nproc: int, phase1: int, phase2: int, *extra: str) -> subprocess.Popen:
    """launch/train.sh in a process group of its own (as a terminal's job is: Ctrl-C there is SIGINT to the group)."""
    return subprocess.Popen(["launch/train.sh", "configs/tiny.yaml", *STOPPABLE, f"data.path={data}", f"train.run_dir={run}",
                             *extra], cwd=ROOT, env=launch_env(nproc, phase1, phase2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def assert_stopped(run: Path, err: str) -> int:
    step = int((run / STOP_MARKER).read_text())
    assert f"stopped at step {step} by a signal; rerun to continue" in err, err[-3000:]
    assert list_checkpoints(run / "checkpoints")[-1][0] == step and step >= 2
    return step


def alive(pid: int) -> bool:
    """pid is a running process (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_usr1_to_torchrun_checkpoints_exits_with_the_stop_code_and_a_rerun_continues(shakespeare_data, tmp_path):
    """torchrun forwards SIGUSR1 (by default it died of it at once, exit 138, orphaning the ranks); train.sh reports the
    stop (torchrun itself exits 1) with the stop code; rerunning train.sh finishes both phases."""
    run = tmp_path / "run"
    # the stop (at step ~6, 0.1 s after the signal) comes long before step 60; the rerun stays short
    phases = {"nproc": 2, "phase1": 60, "phase2": 62}
    proc = train_sh(run, shakespeare_data, **phases)
    wait_for(lambda: logged_steps(run) >= 2, proc, "two logged steps")
    (torchrun,) = children(proc.pid)
    workers = children(torchrun)
    assert len(workers) == 2, workers
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in cmdline(torchrun)
    assert "--shutdown-timeout=60" in cmdline(torchrun)  # SMOLLM2_STOP_GRACE_S
    os.kill(torchrun, signal.SIGUSR1)
    out, err = finish(proc)
    assert proc.returncode == STOP_EXIT_CODE, err[-3000:]
    step = assert_stopped(run, err)
    assert step < 60
    # No rank left running: the workers and torchrun are gone (train.sh waited for torchrun, which reaped them).
    assert [pid for pid in [torchrun, *workers] if alive(pid)] == []
    assert processes_mentioning(str(run)) == []
    # the rerun on one rank (a requeued job may get fewer nodes): the stream and the model reshard, the phases verify
    rerun = subprocess.run(["launch/train.sh", "configs/tiny.yaml", *STOPPABLE, f"data.path={shakespeare_data}",
                            f"train.run_dir={run}"], cwd=ROOT, env=launch_env(**{**phases, "nproc": 1}),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/step-{step:06d} at step {step}" in rerun.stdout
    assert "both phases verified" in rerun.stdout and not (run / STOP_MARKER).exists()


def test_usr1_to_train_sh_is_passed_on(shakespeare_data, tmp_path):
    """A signal to the script itself (one rank: no torchrun) reaches the trainer instead of killing the script."""
    run = tmp_path / "run"
    proc = train_sh(run, shakespeare_data, nproc=1, phase1=2000, phase2=2002)
    wait_for(lambda: logged_steps(run) >= 2, proc, "two logged steps")
    os.kill(proc.pid, signal.SIGUSR1)
    out, err = finish(proc)
    assert proc.returncode == STOP_EXIT_CODE, err[-3000:]
    assert assert_stopped(run, err) < 2000
    assert processes_mentioning(str(run)) == []


def test_usr1_to_train_sh_with_an_old_torchrun_is_passed_on_as_sigterm(shakespeare_data, tmp_path):
    """torch <= 2.9: torchrun has no --signals-to-handle and would die of SIGUSR1, so train.sh passes the SIGUSR1 it
    receives on as SIGTERM, which every torchrun forwards. Simulated by a torchrun whose --help lacks the flags."""
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    real = Path(sys.executable).parent / "torchrun"
    fake.write_text(f'#!/usr/bin/env bash\n[ "${{1:-}}" = --help ] && {{ echo "usage: torchrun [--standalone]"; exit 0; }}\n'
                    f'exec "{real}" "$@"\n')
    fake.chmod(0o755)
    run = tmp_path / "run"
    env = launch_env(2, 150, 152)
    env["PATH"] = f"{fake.parent}:{env['PATH']}"
    proc = subprocess.Popen(["launch/train.sh", "configs/tiny.yaml", *STOPPABLE, f"data.path={shakespeare_data}",
                             f"train.run_dir={run}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    wait_for(lambda: logged_steps(run) >= 2, proc, "two logged steps")
    (torchrun,) = children(proc.pid)
    assert "--signals-to-handle" not in cmdline(torchrun) and "--shutdown-timeout" not in cmdline(torchrun)
    os.kill(proc.pid, signal.SIGUSR1)
    out, err = finish(proc)
    assert proc.returncode == STOP_EXIT_CODE, err[-3000:]
    assert "Received 15 death signal" in err  # torchrun got SIGTERM (signal 15), not SIGUSR1
    assert assert_stopped(run, err) < 150
    assert processes_mentioning(str(run)) == []


def test_ctrl_c_checkpoints_and_exits_with_the_stop_code(shakespeare_data, tmp_path):
    """Ctrl-C in the terminal (SIGINT to the script's process group): torchrun's ranks died of it without a checkpoint;
    now every rank checkpoints at its next log step and the script exits with the stop code. (With NPROC=1 the trainer
    ignored it, a background child of a non-interactive shell: the next test's first Ctrl-C shows it is heard now.)"""
    run = tmp_path / "run"
    proc = train_sh(run, shakespeare_data, 2, 2000, 2002)
    wait_for(lambda: logged_steps(run) >= 2, proc, "two logged steps")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = finish(proc)
    assert proc.returncode == STOP_EXIT_CODE, err[-3000:]
    assert "interrupted: checkpointing at the next log step" in err
    assert assert_stopped(run, err) < 2000
    assert processes_mentioning(str(run)) == []


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(shakespeare_data, tmp_path):
    """The first Ctrl-C asks for a checkpoint at the next log step (1000 steps away here); the second ends the run now."""
    run = tmp_path / "run"
    proc = train_sh(run, shakespeare_data, 1, 2000, 2002, "logging.interval=1000", "checkpoint.interval=0")
    wait_for(lambda: trainer_handles_sigint(proc.pid), proc, "the trainer's SIGINT handler", timeout=60)
    log = run / "logs" / "rank-00000.log"  # its start-up line: the loop is next (a stop before it needs no second one)
    wait_for(lambda: log.exists() and "world size 1 on cpu" in log.read_text(), proc, "the start-up line", timeout=60)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = finish(proc)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: checkpointing at the next log step" in err  # the first one, heard by the one trainer
    assert "interrupted again: exiting now, without a checkpoint" in err
    assert "interrupted: phase 1 exited at once, without a checkpoint" in err
    assert list_checkpoints(run / "checkpoints") == [] and not (run / STOP_MARKER).exists()


def proc_child(pid: int) -> int:
    """The launch script's one child (its trainer, with NPROC=1), or the script itself until it has started it."""
    found = children(pid)
    return found[0] if found else pid


def handles_usr1(pid: int, signum: int = signal.SIGUSR1) -> bool:
    """The process has installed a handler for `signum` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signum - 1)))


def trainer_handles_sigint(script: int) -> bool:
    """The launch script's trainer catches SIGINT (it starts with SIGINT ignored, as a background child of a script)."""
    for pid in children(script):
        try:
            trainer = b"smollm2.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if trainer and handles_usr1(pid, signal.SIGINT):
            return True
    return False


def test_signal_during_setup_stops_before_the_first_step_without_a_checkpoint(shakespeare_data, tmp_path):
    """The handlers are installed before data, model and checkpoint setup: a signal then (as soon as the process can
    take it) is not fatal; the run exits with the stop code before its first step and writes no checkpoint."""
    run = tmp_path / "run"
    proc = subprocess.Popen(command(0, run, shakespeare_data, *STOPPABLE, "train.max_steps=50"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: handles_usr1(proc.pid), proc, "a SIGUSR1 handler", timeout=60)
    os.kill(proc.pid, signal.SIGUSR1)
    out, err = finish(proc)
    assert proc.returncode == STOP_EXIT_CODE, err[-3000:]
    assert "stop requested (signal) before the first step: exiting at step 0 without a checkpoint" in out
    assert list_checkpoints(run / "checkpoints") == [] and logged_steps(run) == 0  # no step ran
    assert (run / STOP_MARKER).read_text() == "0\n"
