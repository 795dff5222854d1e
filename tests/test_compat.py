"""Checkpoints written by earlier versions keep loading: tests/fixtures/checkpoint-0.1.0 was written by smollm2 0.1.0
(before saved configs had a config_version; written_by.json says how), and is loaded here by generate, export and
`--resume`, which continues with exactly the losses the old version logged. A saved config with keys this version does
not know loads with one warning naming them."""

import json
import shutil

import pytest
import torch
from tiny import ROOT, records, train

from smollm2.serve.export import export
from smollm2.serve.generate import main as generate_main
from smollm2.serve.loading import load_model_for_inference

FIXTURE = ROOT / "tests/fixtures/checkpoint-0.1.0"
WRITTEN_BY = json.loads((FIXTURE / "written_by.json").read_text())
CHECKPOINT = FIXTURE / "checkpoints/step-000004"


def test_generate_loads_it(capsys):
    # "a" is one GPT-2 byte token (id 64): the fixture's model has a 256-token vocabulary
    assert generate_main(["--checkpoint", str(CHECKPOINT), "--prompt", "a", "--max-new-tokens", "8", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("a") and "# step 4," in err and "warning" not in err


def test_export_loads_it_bit_exact(tmp_path):
    model, cfg, step = load_model_for_inference(CHECKPOINT)
    assert step == 4 and cfg.model.vocab_size == 256 and model.num_params() == 6_352
    back, back_cfg, back_step = load_model_for_inference(export(str(CHECKPOINT), tmp_path / "st", fmt="safetensors"))
    assert back_step == 4 and back_cfg.model == cfg.model
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_a_saved_config_with_keys_this_version_does_not_know_loads_with_a_warning(tmp_path, capsys):
    path = tmp_path / "step-000004"
    shutil.copytree(CHECKPOINT, path)
    text = (path / "config.yaml").read_text()
    (path / "config.yaml").write_text(text.replace("model:\n", "model:\n  experts: 8\n").replace("train:\n", "train:\n"
                                                                                            "  renamed_key: x\n"))
    meta = json.loads((path / "meta.json").read_text())
    meta["model"]["experts"] = 8  # not covered by the recorded digests (meta.json is their record)
    (path / "meta.json").write_text(json.dumps(meta))
    model, cfg, step = load_model_for_inference(path)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {path / 'config.yaml'}: ignoring what this version does not know: model.experts, "
                        "train.renamed_key"]
    assert step == 4 and cfg.model.vocab_size == 256 and cfg.optim.lr == 3e-3  # the rest as saved


@pytest.mark.e2e
def test_resume_continues_with_the_losses_the_old_version_logged(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(CHECKPOINT, run / "checkpoints" / CHECKPOINT.name)
    proc = train(0, run, FIXTURE / "data", *WRITTEN_BY["overrides"], "train.max_steps=6", "--resume", "latest")
    assert f"resumed from {run / 'checkpoints' / CHECKPOINT.name} at step 4" in proc.stdout
    logged = {str(r["step"]): {"loss": r["loss"], "grad_norm": r["grad_norm"]} for r in records(run)}
    assert logged == WRITTEN_BY["resumed_to_step_6"]  # fp32, one process: bitwise
    assert (run / "checkpoints/step-000006/config.yaml").read_text().startswith("config_version: 1\n")
