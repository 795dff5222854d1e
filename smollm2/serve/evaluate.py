"""Benchmarks through lm-evaluation-harness, on an exported `transformers` folder (or a checkpoint, exported first).

    python -m smollm2.evaluate --model export/hf --tasks hellaswag,arc_easy --limit 500 --out results.json
    python -m smollm2.evaluate --model runs/x --tasks my_task --include-path my_tasks/   # a checkpoint; local task YAMLs

lm-eval runs its own Hugging Face model class (`model="hf"`) on the folder, so the numbers are what anyone gets from
the published model. Task data comes from the Hugging Face hub (or its local cache): offline, a task whose data is not
cached stops with one line instead of a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from smollm2.errors import UserError
from smollm2.files import atomic_write_json

# What the datasets / huggingface_hub / requests stacks raise when the hub cannot be reached (by name: each library has
# its own classes, and importing them all just to catch them is not worth it).
_OFFLINE = {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectTimeout", "ReadTimeout",
            "TimeoutError", "DatasetNotFoundError", "HfHubHTTPError", "GatedRepoError", "RepositoryNotFoundError"}


class EvalError(UserError):
    pass


def _log(message: str) -> None:
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


def hf_folder(spec: str, stack: ExitStack, dtype: str) -> Path:
    """`spec` itself if it is an exported `transformers` folder (or a Space folder's model/); otherwise a checkpoint (or
    a safetensors export), exported to a temporary folder that `stack` removes."""
    from smollm2.serve.export import export, find_hf_folder

    path = Path(spec)
    if (folder := find_hf_folder(path)) is not None:
        return folder
    if not path.exists():
        raise EvalError(f"--model {spec} does not exist (an export folder, a checkpoint or a run directory)")

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smollm2-eval-")))
    _log(f"{spec} is not a transformers folder: exporting it to {tmp / 'hf'} first")
    return export(spec, tmp / "hf", fmt="hf", dtype=dtype)


def task_manager(names: list[str], include_path: str | None):
    """lm-eval's TaskManager. Indexing all of lm-eval's bundled task configs takes seconds (docs/inference.md), so when
    every task asked for is in --include-path, only that directory is indexed. Unknown names are an error naming the
    closest known ones."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise EvalError(f"--include-path {include_path} is not a directory of task YAML files")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = TaskManager(include_path=include_path)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm-eval ls tasks` lists them"
            raise EvalError(f"unknown lm-eval task {name!r}{hint}")
    return manager


def _offline_cause(err: BaseException) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in _OFFLINE or isinstance(err, (ConnectionError, TimeoutError)):
            return err
        err = err.__cause__ or err.__context__
    return None


def evaluate(model_dir: Path, tasks: list[str], *, limit: float | None, batch_size: int, device: str, dtype: str,
             include_path: str | None, num_fewshot: int | None = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate with lm-eval's own HF model class on `model_dir`; returns lm-eval's results dict."""
    import importlib.util

    import lm_eval

    if importlib.util.find_spec("accelerate") is None:  # lm-eval's HF model class imports it; its `hf` extra has it
        raise EvalError("lm-eval's Hugging Face model class needs `accelerate`: pip install 'lm-eval[hf]' (or accelerate)")
    manager = task_manager(tasks, include_path)
    _log(f"{', '.join(tasks)} on {model_dir} ({device}, {dtype}, batch {batch_size}, limit {limit})")
    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype]},
            tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
            task_manager=manager, log_samples=False)
    except Exception as err:  # noqa: BLE001 - only the hub's unreachability becomes a one-line error
        if (cause := _offline_cause(err)) is None:
            raise
        raise EvalError(f"the data of {', '.join(tasks)} is not reachable ({type(cause).__name__}: "
                        f"{(str(cause).splitlines() or [''])[0][:200]}): run once with network access so the Hugging "
                        "Face datasets cache holds it, or use a local task (--include-path DIR)") from None
    if results is None:
        raise EvalError("lm-eval returned no results")
    return results


def result_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every numeric metric lm-eval reported."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, comma, _filter = key.partition(",")  # "acc,none": metric, filter (other keys: alias, sample_len)
            if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{name}_stderr,{_filter}")
            rows.append((task, name, float(value), float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def print_table(rows: list[tuple[str, str, float, float | None]]) -> None:
    print(f"{'task':<28} {'metric':<16} {'value':>8} {'stderr':>8}")
    for task, metric, value, stderr in rows:
        err = f"{stderr:8.4f}" if stderr is not None and math.isfinite(stderr) else f"{'':>8}"
        print(f"{task:<28} {metric:<16} {value:8.4f} {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm2.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported hf folder, or a checkpoint / run dir (exported first)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction if < 1); default: all")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", help="write lm-eval's results as JSON here")
    parser.add_argument("--include-path", help="a directory of extra task YAMLs (lm-eval's --include_path)")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda, but torch sees no CUDA device: use --device cpu")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--tasks is empty: name at least one lm-eval task, e.g. --tasks hellaswag")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    with ExitStack() as stack:
        model_dir = hf_folder(args.model, stack, args.dtype)
        results = evaluate(model_dir, tasks, limit=limit, batch_size=args.batch_size, device=device, dtype=args.dtype,
                           include_path=args.include_path, num_fewshot=args.num_fewshot)
    rows = result_rows(results)
    print_table(rows)
    if args.out:
        plain = json.loads(json.dumps({k: v for k, v in results.items() if k != "samples"}, default=str))
        plain["smollm2"] = {"model": args.model, "model_dir": str(model_dir), "rows": [list(r) for r in rows]}
        atomic_write_json(args.out, plain)
        _log(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
