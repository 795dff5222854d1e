"""The layout the README promises: imports point one way down the data path, and modules stay short."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# smollm2's modules in layers: a module imports only from lower layers (data_prep -> shards/manifest -> data -> train ->
# step -> model/loss, with parallelize between config and the model).
LAYERS = [
    {"errors", "files", "loss", "rotary", "step", "gradflow", "space_app"},
    {"config", "tokenizer", "shards", "manifest", "ranklog", "plot"},
    {"data", "distributed", "model", "optim", "metrics", "tracking", "hf_tokenizer"},
    {"parallelize", "checkpoint", "stopping"},
    {"generate", "export"},
    {"train", "evaluate", "app"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
DATA_PREP_MAY_USE = {"errors", "files", "config", "tokenizer", "shards", "manifest"}
# The modules the README's Layout section names as long, and why (see there); everything else stays near 300 lines.
LONG_MODULES = {"smollm2/config.py", "smollm2/checkpoint.py", "data_prep/sources.py", "data_prep/prep.py", "bench/step.py"}
MAX_LINES = 330


def smollm2_imports(path: Path) -> set[str]:
    """The smollm2 modules a file imports (anywhere in it, function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smollm2."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("smollm2.")}
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in (ROOT / "smollm2").glob("*.py")} - {"__init__"}
    assert modules == set(LAYER), "add new modules to LAYERS (and to the README's Layout)"


@pytest.mark.parametrize("name", sorted(LAYER))
def test_imports_point_down(name):
    upward = {m for m in smollm2_imports(ROOT / "smollm2" / f"{name}.py") if LAYER[m] >= LAYER[name]}
    assert not upward, f"smollm2/{name}.py imports {sorted(upward)} from its own layer or above"


def test_data_prep_uses_only_the_data_format_modules():
    for path in (ROOT / "data_prep").glob("*.py"):
        assert smollm2_imports(path) <= DATA_PREP_MAY_USE, path.name


def test_modules_stay_short_or_are_named_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for path in [*ROOT.glob("smollm2/*.py"), *ROOT.glob("data_prep/*.py"), *ROOT.glob("bench/*.py")]:
        relative = str(path.relative_to(ROOT))
        lines = len(path.read_text().splitlines())
        if relative in LONG_MODULES:
            assert f"`{relative.split('/', 1)[1] if relative.startswith('smollm2/') else relative}`" in readme, relative
        else:
            assert lines <= MAX_LINES, f"{relative} has {lines} lines: split it, or say why in the README's Layout"
