"""The training-step benchmark on CPU (tiny config): output structure, the reference's equivalence."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.reference import GPT, GPTConfig
from smollm2.config import load_config
from smollm2.model import SmolLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_cli_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench.step", "--config", "configs/tiny.yaml", "--cases", "ac=none,ref=1",
           "ac=selective", "--warmup", "1", "--steps", "2", "--rounds", "2", "--json", str(out),
           "data.seq_len=32", "data.micro_batch=2", "train.device=cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x ref" in proc.stdout and "CPU: smollm2 tok/s >= 0.90x reference" in proc.stdout
    result = json.loads(out.read_text())
    assert result["matmul_peak_tflops"] > 0 and result["environment"]["device"] == "cpu"
    rows = {(r["impl"], r["activation_checkpointing"]): r for r in result["rows"]}
    assert set(rows) == {("smollm2", "none"), ("reference", "none"), ("smollm2", "selective")}
    for row in rows.values():
        assert row.get("error") is None
        for key in ("tok_per_s", "tflops", "mfu", "step_ms", "peak_mem_gib"):
            assert row[key] > 0, key
        assert row["timed_steps"] == 4 and row["micro_batch"] == 2 and row["seq_len"] == 32
    for ac in ("none", "selective"):
        ours = rows[("smollm2", ac)]
        assert ours["ratio_to_reference"] == pytest.approx(ours["tok_per_s"] / rows[("reference", "none")]["tok_per_s"])
    assert [t["status"] for t in result["targets"]][0] in ("PASS", "FAIL")


def test_reference_shares_no_code_with_smollm2():
    tree = ast.parse((ROOT / "bench/reference.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.startswith("smollm2") for name in imported)


def test_reference_is_the_same_model():
    cfg = load_config("configs/tiny.yaml", []).model
    ours = SmolLM(cfg)
    ours.init_weights(5)
    ref = GPT(GPTConfig(vocab_size=cfg.vocab_size, padded_vocab=ours.padded_vocab, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, n_embd=cfg.d_model, n_mlp=cfg.d_mlp, block_size=cfg.max_seq_len))
    ref.load_smollm2_state(ours.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 33))
    inputs, targets = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    loss_ours, loss_ref = ours(inputs, targets), ref(inputs, targets)
    assert loss_ours.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx), rtol=1e-4, atol=1e-4)
