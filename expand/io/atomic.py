"""Outputs are written to a temporary sibling and renamed into place: a failed or interrupted write leaves
nothing behind, and an existing output is replaced only when asked."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


class OutputExistsError(FileExistsError):
    pass


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    if Path(path).exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --force) to replace it")


def refuse_same_path(source: str | Path, output: str | Path) -> None:
    """Inputs are never modified: an output may not be its own input, nor inside it."""
    src, out = Path(source).resolve(), Path(output).resolve()
    if out == src or src in out.parents:
        raise ValueError(f"output {output} would overwrite the input {source}; choose another output path")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on success rename it to `path`."""
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside the file `path`; on success rename it to `path`."""
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
