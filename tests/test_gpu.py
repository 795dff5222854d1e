"""The CUDA path: NCCL process group, bf16 mixed precision, per-block compile, SDPA kernels. Skipped without CUDA.

Data is random tokens (64 distinct ids) in llm.c-style shards (no manifest), so these run on a GPU machine with no
network and no cache."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import ROOT, command

from smollm2.config import load_config
from smollm2.data.shards import write_shard
from smollm2.optim import LRSchedule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def random_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-data")
    rng = np.random.default_rng(0)
    ids = rng.choice(50257, size=64, replace=False).astype(np.uint16)  # 64 distinct tokens: learnable in a few steps
    write_shard(out / "fineweb_train_000001.bin", ids[rng.integers(0, 64, 400_000)])
    write_shard(out / "fineweb_val_000000.bin", ids[rng.integers(0, 64, 40_000)])
    return out


def test_fused_loss_matches_cross_entropy_on_cuda():
    from smollm2.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(2048, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(50304, 768, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 50258, (2048,), device="cuda")
    ours = linear_cross_entropy(h, w, t, 50258)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logits = (h @ w.t()).float()
    logits[:, 50258:] = float("-inf")
    ref = torch.nn.functional.cross_entropy(logits, t)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-3)
    # Scale-free: dL/dh entries are ~1e-5 here, so an absolute tolerance would pass an all-zero gradient. Compare the
    # error's norm to the gradient's own norm (bf16 rounding gives ~1e-2) and require the gradients to point the same way.
    for ours_grad, ref_grad in ((gh, h.grad), (gw, w.grad)):
        ours_grad, ref_grad = ours_grad.float(), ref_grad.float()
        assert ref_grad.norm() > 0
        assert (ours_grad - ref_grad).norm() / ref_grad.norm() < 2e-2
        assert torch.nn.functional.cosine_similarity(ours_grad.flatten(), ref_grad.flatten(), dim=0) > 0.999


@pytest.mark.timeout(1800)  # two training subprocesses of up to 900 s each
@pytest.mark.parametrize("ac", ["none", "selective"])
def test_bf16_compiled_training_on_cuda(random_shards, tmp_path, ac):
    run = tmp_path / "run"
    cmd = command(0, run, random_shards, "train.max_steps=6", "data.seq_len=1024", "data.micro_batch=4",
                  "train.grad_accum=2", f"train.activation_checkpointing={ac}", "train.compile=true", "logging.interval=1",
                  "optim.warmup_steps=2", "eval.interval=6", "eval.windows=8", "sample.interval=6",
                  "generate.max_new_tokens=8", "checkpoint.interval=0", config="configs/smollm2_135.yaml")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["mfu"] is None or 0 < r["mfu"] < 1 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # 64 random tokens: it learns their unigram distribution
    assert (run / "checkpoints/step-000006/COMPLETE").is_file()
    if ac != "none":
        return
    # Resume on CUDA (NCCL group, DCP load into the compiled, sharded bf16 model) and train two more steps.
    proc = subprocess.run([*cmd, "train.max_steps=8", "--resume", "latest"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/step-000006 at step 6" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    schedule = LRSchedule(load_config("configs/smollm2_135.yaml", ["optim.warmup_steps=2"]).optim)
    assert [r["lr"] for r in rows] == pytest.approx([schedule.lr_at(s - 1) for s in range(1, 9)], rel=1e-9)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert (run / "checkpoints/step-000008/COMPLETE").is_file()
