"""The layout holds: rooms (the top-level modules and packages of smollm2/) import one way down the pipeline, functions fit
on a screen, modules stay short, and the commands users type at the top only call their room's main."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A room imports only from rooms below it (and from itself).
LAYERS = [
    {"errors", "files"},
    {"config"},
    {"distributed", "model", "data"},
    {"parallelize", "optim", "step", "checkpoint", "observe"},
    {"serve", "stopping"},
    {"train"},
    {"generate", "export", "app", "evaluate", "plot", "hf_tokenizer", "convert"},  # the commands users type (python -m smollm2.X)
]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
COMMANDS = LAYERS[-1]
DATA_PREP_MAY_USE = {"errors", "files", "config", "data"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
CODE = [*ROOT.glob("smollm2/**/*.py"), *ROOT.glob("data_prep/*.py"), *ROOT.glob("bench/*.py")]


def room(path: Path) -> str:
    """smollm2/train.py -> train; smollm2/checkpoint/manager.py -> checkpoint."""
    parts = path.relative_to(ROOT / "smollm2").parts
    return parts[0].removesuffix(".py")


def imported_rooms(path: Path) -> set[str]:
    """The rooms of smollm2 a file imports (anywhere in it, function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smollm2."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("smollm2.")}
    return found


SMOLLM2 = sorted(p for p in ROOT.glob("smollm2/**/*.py") if p.name != "__init__.py" or p.parent != ROOT / "smollm2")


def test_every_room_has_a_layer():
    rooms = {room(p) for p in ROOT.glob("smollm2/*") if p.suffix == ".py" or (p / "__init__.py").is_file()} - {"__init__"}
    assert rooms == set(LAYER), "add the new room to LAYERS (and to the README's Layout)"


@pytest.mark.parametrize("path", SMOLLM2, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    here = room(path)
    upward = {r for r in imported_rooms(path) if r != here and LAYER[r] >= LAYER[here]}
    assert not upward, f"{path.relative_to(ROOT)} ({here}) imports {sorted(upward)} from its own layer or above"


def test_data_prep_uses_only_the_data_format_rooms():
    for path in (ROOT / "data_prep").glob("*.py"):
        assert imported_rooms(path) <= DATA_PREP_MAY_USE, path.name


def test_commands_only_call_their_rooms_main():
    """`python -m smollm2.generate` & co. stay the names users type; the code lives in its room."""
    for name in COMMANDS:
        tree = ast.parse((ROOT / f"smollm2/{name}.py").read_text())
        (imported,) = [node for node in tree.body if isinstance(node, ast.ImportFrom)]
        assert [a.name for a in imported.names] == ["main"] and imported.module.split(".")[1] in LAYER, name
        assert len(tree.body) == 3, f"smollm2/{name}.py holds more than its docstring, the import and the call"


def test_modules_stay_short():
    long = {str(p.relative_to(ROOT)): n for p in CODE if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these modules along a seam: {long}"


def test_functions_fit_on_a_screen():
    long = {}
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = n
    assert not long, f"split these functions: {long}"
