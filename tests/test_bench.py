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


@pytest.mark.e2e
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


def test_host_proxy_is_a_named_case_with_op_counts():
    """`--proxy host`: the seed model's structure with tiny math on CPU; its target reads the median of the
    interleaved rounds' ratios; `count_ops` profiles one step."""
    from bench.cases import PROXIES, evaluate_targets, parse_case
    from bench.timing import count_ops

    proxy = PROXIES["host"]
    cfg = load_config(ROOT / proxy.config, list(proxy.overrides))
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.vocab_size, str(cfg.train.dtype)) == (12, 96, 1024, "fp32")
    (case,) = [parse_case(spec, cfg) for spec in proxy.cases]
    assert (case.micro_batch, case.seq_len, case.compile, case.reference) == (1, 64, "true", True)
    assert proxy.rounds == 3
    llama = PROXIES["host-llama"]  # SmolLM2-135M's structure, ours only (the reference has no GQA or SwiGLU)
    llama_cfg = load_config(ROOT / llama.config, list(llama.overrides))
    assert (llama_cfg.model.n_layer, llama_cfg.model.kv_heads, llama_cfg.model.head_dim, str(llama_cfg.model.mlp)) == \
        (30, 3, 16, "swiglu")
    assert [parse_case(spec, llama_cfg).reference for spec in llama.cases] == [False]
    from bench.cases import case_config  # the cpp wrapper lever: the config's setting unless a case names it

    assert case_config(cfg, case).train.cpp_wrapper is None
    lever = parse_case("B=8,T=2048,ac=none,cpp=true", cfg)
    assert case_config(cfg, lever).train.cpp_wrapper is True and lever.label.endswith("cpp=True")
    row = {"impl": "smollm2", "activation_checkpointing": "none", "round_ratios": [0.9, 1.2, 1.05],
           "ratio_to_reference": 1.0}
    (target,) = evaluate_targets([row], torch.device("cpu"), proxy="host")
    assert target["status"] == "PASS" and target["value"] == pytest.approx(1.05)
    a = torch.randn(8, 8)
    ops = count_ops(lambda: (a @ a).relu().sum(), torch.device("cpu"))
    assert ops["aten_ops"] >= 3 and ops["profiler_events"] >= ops["aten_ops"] and ops["profiled_cpu_ms"] > 0


def test_real_loop_compares_the_logged_tok_s_with_the_bench_row(tmp_path):
    from bench.real_loop import compare

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "loss": 5.0, "tok_per_s": t})
                                 for s, t in ((10, 10.0), (20, 96.0), (30, 100.0), (40, 98.0))))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [{"impl": "reference", "case": "B=8 T=2048 accum=1 ac=none", "tok_per_s": 1.0},
                                          {"impl": "smollm2", "case": "B=8 T=2048 accum=1 ac=none compile=auto",
                                           "tok_per_s": 100.0}]}))
    result = compare(metrics, bench, "B=8 T=2048 accum=1 ac=none")
    assert result["real_steps"] == [20, 30, 40] and result["ratio"] == pytest.approx(0.98)
    assert result["status"] == "PASS"
