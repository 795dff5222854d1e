"""launch/slurm.sbatch on a real (local) SLURM cluster of two nodes (two slurmd daemons on this machine): one torchrun per
node meeting through c10d, both phases verified; a preemption signal makes the ranks checkpoint and the job requeue itself
and resume. Skips where no cluster answers (tests/slurm/local_cluster.sh). The checks a requeued job makes before it
trains run anywhere, with SLURM's commands stood in for."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smollm2.checkpoint import COMPLETE, list_checkpoints, step_dir_name

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def cluster_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:  # one line per node
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return len(re.findall(r"^(idle|mix)", out, re.M)) >= 2


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "GONE"


@pytest.mark.skipif(not cluster_up(), reason="no two-node SLURM cluster (tests/slurm/local_cluster.sh start)")
def test_sbatch_phases_with_preemption_and_requeue(shakespeare_data, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    env_vars = f"ALL,PYTHON={sys.executable},PHASE1_STEPS=20,PHASE2_STEPS=22,NPROC_PER_NODE=1"
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--export={env_vars}", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
         "--cpus-per-task=1", f"--output={log}", "--job-name=smollm2-test", "launch/slurm.sbatch", "configs/tiny.yaml",
         f"data.path={shakespeare_data}", f"train.run_dir={run}", "data.seq_len=32", "eval.interval=0",
         "sample.interval=0", "logging.interval=2", "checkpoint.interval=0"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    job = submit.stdout.strip().split(";")[0]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.5)
        assert (run / "metrics.jsonl").exists(), log.read_text() if log.exists() else "no job output"
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)  # what --signal=USR1@120 sends before the limit
        while time.time() < deadline and "requeueing" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.5)
        # A requeued job may start again once its old credential has expired (cred_expire=10 s in local_cluster.sh,
        # 120 s by default). Forcing an earlier start (StartTime=now) makes slurmd refuse the launch ("Job credential
        # revoked") and the job ends FAILED, so only a job still pending 30 s after its requeue is nudged.
        requeued = time.time()
        while time.time() < deadline and "restart 1" not in log.read_text():
            if time.time() - requeued > 30 and job_state(job) == "PENDING":
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True, timeout=30)
            time.sleep(1)
        while time.time() < deadline and job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED", "GONE"):
            time.sleep(1)
        output = log.read_text()
        state = job_state(job)
        if state not in ("COMPLETED", "GONE"):
            details = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
            ctld = Path("/var/log/slurm/slurmctld.log")
            ctld_tail = "\n".join(ctld.read_text(errors="replace").splitlines()[-20:]) if ctld.exists() else ""
            pytest.fail(f"job {job} ended {state}\n--- job output ---\n{output[-3000:]}\n--- scontrol ---\n{details}"
                        f"\n--- slurmctld.log ---\n{ctld_tail}")
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    assert "1 rank(s) on each of 2 node(s)" in output and "world size 2 on cpu" in output  # one torchrun per node
    assert "stop requested (signal): checkpointing at step" in output
    assert "stopped early" in output and "requeueing" in output
    stopped = int(re.search(r"checkpointing at step (\d+)", output).group(1))
    assert 2 <= stopped < 20
    assert "(restart 1)" in output and f"resumed from {run}/checkpoints/step-{stopped:06d} at step {stopped}" in output
    assert "=== both phases verified ===" in output
    assert [step for step, _ in list_checkpoints(run / "checkpoints")][-2:] == [20, 22]  # both complete


def test_a_requeued_job_checks_a_phase_it_finished_before_again(tmp_path):
    """A job requeued after phase 1 ended finds step 6 (phase 2's) complete and checks phase 1's step 4 again, instead of
    taking it as done: a damaged step 4 fails the job, naming it (it used to pass as "phase 1: already at step 4", and
    the job reported both phases verified). SLURM's commands are stand-ins that fail if training is started."""
    ckpts = tmp_path / "run" / "checkpoints"
    for step, files in ((4, {".metadata": {"bytes": 7, "sha256": "0"}}), (6, {})):
        path = ckpts / step_dir_name(step)
        path.mkdir(parents=True)
        (path / ".metadata").write_bytes(b"")
        (path / "meta.json").write_text(json.dumps({"step": step, "world_size": 1, "files": files}))
        (path / COMPLETE).write_text(f"{step}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", 'case "$1 $2" in "show hostnames") echo n1 ;; *) echo "NodeName=n1 NodeAddr=n1" ;; '
                                    "esac"),
                       ("srun", "echo 'srun: training started' >&2; exit 1")):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "PHASE1_STEPS": "4",
           "PHASE2_STEPS": "6", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_SUBMIT_DIR": str(ROOT)}
    proc = subprocess.run(["bash", "launch/slurm.sbatch", "configs/tiny.yaml", f"train.run_dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: {ckpts / step_dir_name(4)} is damaged: .metadata has 0 bytes, 7 were written" in proc.stderr
    assert "FAILED: phase 1 verification" in proc.stderr
    assert "already at step" not in proc.stdout and "verified" not in proc.stdout and "srun" not in proc.stderr
