"""The commands README.md and docs/ name work: `--help` of every `python -m` entry point of this project (run as `python -m`
runs them, all in one process), every `make` target they name exists, and the launch scripts parse."""

import re
import subprocess
import sys

import pytest
from tiny import ROOT

pytestmark = pytest.mark.e2e
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OURS = ("smollm2", "data_prep", "bench")
# Runs each module as `python -m MODULE --help` would, in one interpreter: torch is imported once, not once per command.
HELP_ALL = """
import runpy, sys
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = None
    except SystemExit as exit_:
        code = exit_.code
    print(f"=== {module} exit {code}", flush=True)
"""


def named(pattern: str) -> set[str]:
    return {match for path in DOCS for match in re.findall(pattern, path.read_text())}


def test_every_python_m_command_named_in_the_docs_answers_help():
    modules = sorted(m for m in named(r"python -m ([A-Za-z_][\w.]*)") if m.split(".")[0] in OURS)
    assert {"smollm2.train", "smollm2.generate", "smollm2.export", "smollm2.checkpoint", "data_prep"} <= set(modules)
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, *modules], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = proc.stdout.split("=== ")
    for module in modules:
        (done,) = [s for s in sections if s.startswith(f"{module} exit")]
        assert done.startswith(f"{module} exit 0"), (module, proc.stdout[-3000:], proc.stderr[-3000:])
    helps = proc.stdout.split("=== ")[:-1]
    assert all("usage:" in text for text in helps), proc.stdout[-3000:]


def test_every_make_target_named_in_the_docs_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    missing = named(r"`make ([\w-]+)") - targets
    assert not missing, f"the docs name make targets the Makefile lacks: {missing}"


def test_the_launch_scripts_parse():
    for script in ("launch/train.sh", "launch/demo.sh", "launch/env.sh", "launch/slurm.sbatch"):
        proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (script, proc.stderr)


@pytest.mark.parametrize("module", ["data_prep.prep", "smollm2.checkpoint.__main__"])
def test_data_prep_and_the_checkpoint_cli_start_without_torch(module):
    """Preparing data needs no torch; the checkpoint CLI, which the launch scripts run before and after every phase,
    answers in a fraction of a second."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr
