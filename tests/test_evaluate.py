"""lm-evaluation-harness on our export, offline: a local multiple-choice task (JSONL + task YAML) scored by lm-eval's
own Hugging Face model class, checked against the same log-likelihoods computed with our model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate", reason="lm-eval's HF model class needs accelerate (lm-eval[hf])")

from smollm2.config import load_config  # noqa: E402
from smollm2.data.tokenizer import get_tokenizer  # noqa: E402
from smollm2.model import SmolLM  # noqa: E402
from smollm2.serve.export import write_safetensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e
CHOICES = ["a", "the", "ROMEO", "and", "thee"]
QUESTIONS = ["To be, or not to be", "ROMEO: But soft", "What light through yonder window", "O Romeo, Romeo",
             "A plague o' both", "Now is the winter", "All the world's a", "Friends, Romans,", "Double, double toil",
             "If music be the food"]
TASK = """task: {name}
dataset_path: {dataset_path}
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[Path, SmolLM]:
    """A tiny model (seeded init, then noise so the choices score differently) in a `safetensors` export folder: the
    evaluate command exports it to `transformers` itself, as it does a checkpoint."""
    cfg = load_config(ROOT / "configs/tiny.yaml")
    model = SmolLM(cfg.model)
    model.init_weights(seed=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.2)
    out = tmp_path_factory.mktemp("eval") / "st"
    write_safetensors(out, model, cfg, {"step": 0}, "fp32")
    return out, model.eval()


def run_evaluate(tmp_path: Path, model: Path, task: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "smollm2.evaluate", "--model", str(model), "--tasks", task, "--device", "cpu",
           "--include-path", str(tmp_path / "tasks"), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def our_choices(model: SmolLM) -> list[int]:
    """What lm-eval's multiple choice should pick, from our own model: the largest summed log-probability of
    " " + choice after the question (the continuation's tokens are the full text's tokens past the question's)."""
    tok, picks = get_tokenizer(), []
    for question in QUESTIONS:
        context, scores = tok.encode(question), []
        for choice in CHOICES:
            ids = tok.encode(question + " " + choice)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)
            scores.append(sum(logprobs[pos - 1, ids[pos]].item() for pos in range(len(context), len(ids))))
        picks.append(max(range(len(CHOICES)), key=scores.__getitem__))
    return picks


def write_task(tmp_path: Path, name: str, dataset_path: str, answers: list[int]) -> None:
    (tmp_path / "tasks").mkdir(exist_ok=True)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": CHOICES, "answer": a}) + "\n"
                            for q, a in zip(QUESTIONS, answers)))
    (tmp_path / "tasks" / f"{name}.yaml").write_text(TASK.format(name=name, dataset_path=dataset_path, data=data))


def test_lm_eval_scores_the_export_on_a_local_task(model_dir, tmp_path):
    folder, model = model_dir
    picks = our_choices(model)
    assert len(set(picks)) > 1  # the choices really score differently
    # The answer key agrees with our model on 6 questions of 10 and disagrees on 4: lm-eval must score 0.6, which it
    # can only do by ranking the choices of every question as our model does.
    answers = [pick if i % 3 else (pick + 1) % len(CHOICES) for i, pick in enumerate(picks)]
    write_task(tmp_path, "smollm2_local_mc", "json", answers)
    proc = run_evaluate(tmp_path, folder, "smollm2_local_mc", "--out", str(tmp_path / "results.json"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    acc = results["results"]["smollm2_local_mc"]["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert acc == pytest.approx(0.6, abs=1e-9)
    assert results["config"]["model"] == "hf"  # lm-eval's own HFLM ran it
    assert results["config"]["model_num_parameters"] == model.num_params()
    assert results["n-samples"]["smollm2_local_mc"]["effective"] == len(QUESTIONS)
    table = proc.stdout.splitlines()
    assert table[0].split() == ["task", "metric", "value", "stderr"]
    assert table[1].split()[:3] == ["smollm2_local_mc", "acc", f"{acc:.4f}"]
    assert "exporting it to" in proc.stderr


def test_unreachable_task_data_is_one_line(model_dir, tmp_path):
    folder, _ = model_dir
    write_task(tmp_path, "smollm2_hub_task", "smollm2-tests/not-on-this-machine", [0] * len(QUESTIONS))
    proc = run_evaluate(tmp_path, folder, "smollm2_hub_task")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the data of smollm2_hub_task is not reachable") and "--include-path" in last
    assert "Traceback" not in proc.stderr
