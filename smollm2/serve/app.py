"""The Space, locally: the Gradio page for an exported folder, a Space folder, or straight from a checkpoint.

    python -m smollm2.app --model runs/x                 # a run dir / checkpoint: exported first (see hf_folder)
    python -m smollm2.app --model export/hf --port 7861  # a `--format hf` export, or a `--format space` folder

The page is `smollm2/serve/space_app.py`, the very file `python -m smollm2.export --format space` ships as the Space's app.py,
so what you try here is what the Space serves. It listens on 127.0.0.1 (this machine only) unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import tempfile
from pathlib import Path

from smollm2.errors import UserError

CACHE_DIR = "export"  # <run_dir>/export/hf-step-NNNNNN: a checkpoint's export, made once and reused


def _cached(out: Path, ckpt: Path) -> bool:
    """Whether OUT is a complete export of exactly this checkpoint (the export renames a folder into place when done)."""
    try:
        info = json.loads((out / "smollm2_export.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (out / "config.json").is_file() and info.get("source_checkpoint") == str(ckpt)


def hf_folder(spec: str) -> Path:
    """A `transformers` folder for SPEC, exporting it first when it is a checkpoint.

    An hf export (has config.json) is served as it is; a Space folder serves its `model/`. A checkpoint, a
    `checkpoints/latest` or a run directory is exported once to `<run_dir>/export/hf-step-NNNNNN` and reused from there
    on later starts; where that cannot be written (a read-only run directory) or the checkpoint is not inside a run
    (a `--format safetensors` export), the export goes to a temporary folder removed when the app exits."""
    from smollm2.serve.export import export, find_hf_folder, run_info

    path = Path(spec)
    if (folder := find_hf_folder(path)) is not None:
        return folder
    if not path.exists():
        raise UserError(f"--model {spec} not found: give an exported folder, a checkpoint or a run directory")
    ckpt, _ = run_info(spec)
    if ckpt.parent.name == "checkpoints":
        out = ckpt.parent.parent / CACHE_DIR / f"hf-{ckpt.name}"
        if _cached(out, ckpt):
            print(f"using the export {out} of {ckpt}", flush=True)
            return out
        try:
            print(f"exporting {ckpt} to {out} (kept for next time)", flush=True)
            return export(str(ckpt), out, fmt="hf", force=True)
        except OSError as err:
            print(f"cannot write {out} ({err.strerror}); exporting to a temporary folder instead", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="smollm2-app-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    print(f"exporting {ckpt} to {tmp / 'hf'} (removed on exit)", flush=True)
    return export(str(ckpt), tmp / "hf", fmt="hf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm2.app", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an hf export, a Space folder, a checkpoint, or a run directory")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) serves this machine only; 0.0.0.0 all")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also a public gradio.live link (needs network)")
    args = parser.parse_args(argv)
    folder = hf_folder(args.model)
    from smollm2.serve.space_app import build_demo

    demo = build_demo(folder)
    print(f"serving {folder} at http://{args.host}:{args.port}/", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
