"""Outputs never touch an input, belong to one run at a time, and appear whole or not at all.

- `refuse_overlap(output, inputs)`: an output may not be, lie inside or contain anything a command reads,
  compared as written and with symlinks resolved (by device and inode), whether or not the output exists.
- `claim_output(path, overwrite, inputs)`: an exclusive `fcntl.flock` on `.NAME.lock` beside the output,
  held until `release_output` or until the process dies (the kernel drops it), so of two runs writing one
  path exactly one goes ahead and the other gets OutputExistsError. The holder removes the temporaries of
  runs that died (`.NAME.tmp-*`, `.NAME.old-*`); none of them can belong to a live run. While held, SIGTERM
  raises SystemExit(143), so the cleanup below runs as it does for SIGINT (KeyboardInterrupt).
- `atomic_dir(path, overwrite, inputs=...)`: the write goes to `.NAME.tmp-*`; every file and folder in it is
  fsynced, it is renamed into place and the parent folder is fsynced. An existing output (overwrite=True)
  is swapped with the new one in one step by renameat2(RENAME_EXCHANGE) on Linux; elsewhere it is renamed
  aside to `.NAME.old-*` first, and a run killed between the two renames is undone by the next claim,
  which puts it back. An error, SIGINT or SIGTERM removes the temporary; a full disk is NoSpaceError,
  naming the output and the space it needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

TMP, OLD, LOCK = "tmp", "old", "lock"
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100


class OutputExistsError(FileExistsError):
    """The output exists (and overwriting was not asked for), or another run is writing it."""


class NoSpaceError(OSError):
    """The disk holding an output has no room for it. `needed`: the bytes the write needs, where known."""

    def __init__(self, message: str, needed: int | None = None):
        super().__init__(errno.ENOSPC, message)
        self.needed = needed

    def __str__(self) -> str:
        return self.strerror


# ---- inputs are sacred ----------------------------------------------------------------------------------


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _normal(path: str | Path) -> Path:
    """An output path with its folder's symlinks resolved (and a trailing `.` or `..` taken as the kernel
    does); the output itself, if a symlink, stays one, and is what gets replaced."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        return Path(os.path.realpath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def _chain(path: str | Path) -> list[tuple[int, int] | None]:
    """(device, inode) of what `path` names as a writer resolves it (`_normal`; None when it does not exist),
    then of each existing ancestor of it, as written and with symlinks resolved."""
    target = _normal(path)
    chain = [_identity(target)]
    for form in (target, Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for ancestor in form.parents:
            ident = _identity(ancestor)
            if ident is not None and ident not in chain:
                chain.append(ident)
    return chain


def _with_linked_files(inputs: Iterable[str | Path | None]) -> Iterator[tuple[str | Path, str]]:
    """(input, path) for each input itself and, for an input folder, each file or folder its symlinks point
    at (a Hugging Face cache snapshot is a folder of links into blobs/: writing over those changes the input)."""
    for item in inputs:
        if item is None:
            continue
        yield item, str(item)
        if os.path.isdir(item):
            for folder, folders, files in os.walk(item):
                for name in folders + files:
                    entry = os.path.join(folder, name)
                    if os.path.islink(entry):
                        yield item, os.path.realpath(entry)


def refuse_overlap(output: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Inputs are never modified: refuse an output that is, lies inside or contains any input, or any file an
    input folder links to (an input that does not exist is left to whatever reads it). Raises ValueError
    naming both paths."""
    out_chain = _chain(output)
    for item, path in _with_linked_files(inputs):
        in_chain = _chain(path)
        if in_chain[0] is None:
            continue
        if in_chain[0] == out_chain[0]:
            relation = "is"
        elif in_chain[0] in out_chain[1:]:
            relation = "lies inside"
        elif out_chain[0] is not None and out_chain[0] in in_chain[1:]:
            relation = "contains"
        else:
            continue
        through = "" if path == str(item) else f" (through its link to {path})"
        raise ValueError(f"output {output} {relation} the input {item}{through}, so writing it would overwrite the "
                         "input; choose an output path that neither is, lies inside nor contains anything the "
                         "command reads")


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --force) to replace it")


# ---- one run per output -------------------------------------------------------------------------------


def _sibling(path: Path, kind: str) -> Path:
    """`.NAME.lock`, or `.NAME.tmp-XXXXXXXX` / `.NAME.old-XXXXXXXX` (a fresh suffix each call)."""
    suffix = "" if kind == LOCK else f"-{uuid.uuid4().hex[:8]}"
    return path.parent / f".{path.name}.{kind}{suffix}"


@dataclass
class _Claim:
    fd: int
    lock: Path
    count: int
    sigterm: object  # the SIGTERM handler to restore, or None when this claim did not install one


_claims: dict[str, _Claim] = {}


def _lock(path: Path) -> tuple[int, Path]:
    """Take the exclusive lock of `path` without waiting; a held lock means a live run is writing it."""
    lock = _sibling(path, LOCK)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputExistsError(f"another run (pid {owner}) is writing {path}; wait for it to finish, or "
                                    "choose another output path") from None
        # a finishing run unlinks the lock file while holding it: the file locked must be the one at the path
        if _identity(lock) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd, lock
        os.close(fd)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def _clean_after_dead_runs(path: Path) -> None:
    """Called holding the claim, so every temporary of `path` belongs to a run that died. An output that a
    kill left aside during a replacement (`.NAME.old-*`, path missing) is put back; the rest is removed."""
    names = os.listdir(path.parent)
    tmp = [path.parent / n for n in names if n.startswith(f".{path.name}.{TMP}-")]
    aside = sorted((path.parent / n for n in names if n.startswith(f".{path.name}.{OLD}-")),
                   key=lambda p: p.lstat().st_mtime)
    if aside and not os.path.lexists(path):
        os.rename(aside.pop(), path)
        print(f"note: restored {path} from a replacement that was interrupted", file=sys.stderr)
    for stale in tmp + aside:
        _remove(stale)


def claim_output(path: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Make `path` this run's output: refuse an overlap with `inputs`, take its lock (OutputExistsError if
    another live run holds it), clean up after dead runs, and refuse an existing output unless `overwrite`.
    Claims nest within a process; each must be matched by `release_output` (or `release_all`)."""
    refuse_overlap(path, inputs)
    path = _normal(path)
    key = str(path)
    if key not in _claims:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, lock = _lock(path)
        sigterm = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            sigterm = signal.signal(signal.SIGTERM, _terminate)
        _claims[key] = _Claim(fd, lock, 0, sigterm)
        try:
            _clean_after_dead_runs(path)
        except BaseException:
            _release(key)
            raise
    _claims[key].count += 1
    try:
        refuse_existing(path, overwrite)
    except OutputExistsError:
        release_output(path)
        raise
    return path


def _release(key: str) -> None:
    claim = _claims.pop(key)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(claim.lock)
    os.close(claim.fd)
    if claim.sigterm is not None:
        signal.signal(signal.SIGTERM, claim.sigterm)


def release_output(path: str | Path) -> None:
    """Undo one `claim_output(path)`; the last one unlocks (and removes the lock file)."""
    key = str(_normal(path))
    if key in _claims:
        _claims[key].count -= 1
        if _claims[key].count <= 0:
            _release(key)


def release_all() -> None:
    """Drop every claim this process holds (the command line's last step, whatever happened)."""
    for key in list(_claims):
        _release(key)


# ---- whole or not at all ------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (and `root` itself, a folder or a file) to the disk."""
    if root.is_file():
        _fsync(root)
        return
    for folder, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync(os.path.join(folder, name))
        _fsync(folder)


def _load_renameat2():
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2); False where the C library, kernel or file system does not offer it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `path`: never over an existing output unless `overwrite`, and then so
    that some complete output is at `path` (or, on the fallback, aside for the next claim) at every moment."""
    if not os.path.lexists(path):
        try:
            renamed = _renameat2(tmp, path, RENAME_NOREPLACE)
        except FileExistsError:
            renamed = False
        if not renamed:
            refuse_existing(path, overwrite=False)
            os.rename(tmp, path)
    elif not overwrite:
        refuse_existing(path, overwrite=False)
    elif _renameat2(tmp, path, RENAME_EXCHANGE):
        _fsync(path.parent)
        _remove(tmp)  # now the old output
    else:
        old = _sibling(path, OLD)
        os.rename(path, old)
        os.rename(tmp, path)
        _fsync(path.parent)
        trash = _sibling(path, TMP)  # a partly removed old output must never be put back
        os.rename(old, trash)
        _remove(trash)
    _fsync(path.parent)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the renames are done (they are delivered right after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _tree_bytes(root: Path) -> int:
    if root.is_file():
        return root.stat().st_size
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files
               if not os.path.islink(os.path.join(d, f)))


def is_disk_full(error: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is a full disk, as OSError or as a library's message."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full(path: Path, written: int, error: BaseException) -> NoSpaceError:
    """The error for a write of `path` that filled the disk after `written` bytes (its temporary removed)."""
    needed = getattr(error, "needed", None)
    free = shutil.disk_usage(path.parent).free
    need = f"it needs {needed:,} bytes" if needed else f"it needs more than the {written:,} bytes written before " \
                                                       "the disk filled"
    return NoSpaceError(f"no space left on the device to write {path}: {need}, and {free:,} bytes are free "
                        f"there; free some space or write to another disk", needed)


@contextlib.contextmanager
def _atomic(path: str | Path, overwrite: bool, inputs: Iterable[str | Path | None], folder: bool) -> Iterator[Path]:
    """The write of one output, a folder or a single file, as `atomic_dir` describes."""
    path = claim_output(path, overwrite, inputs)
    try:
        tmp = _sibling(path, TMP)
        if folder:
            tmp.mkdir()
        try:
            yield tmp
            fsync_tree(tmp)
            with _signals_held():
                _publish(tmp, path, overwrite)
        except BaseException as e:
            written = _tree_bytes(tmp) if is_disk_full(e) else None
            _remove(tmp)
            if written is not None:
                raise _disk_full(path, written, e) from e
            raise
    finally:
        release_output(path)


def atomic_dir(path: str | Path, overwrite: bool = False, *,
               inputs: Iterable[str | Path | None] = ()) -> contextlib.AbstractContextManager[Path]:
    """Yield a fresh temporary directory beside `path`; when the block succeeds, fsync it and rename it to
    `path`. Refuses an output overlapping `inputs`, another run's output, and an existing one unless
    `overwrite`; on any error or interruption the temporary is removed and `path` is as it was."""
    return _atomic(path, overwrite, inputs, folder=True)


def atomic_file(path: str | Path, overwrite: bool = False, *,
                inputs: Iterable[str | Path | None] = ()) -> contextlib.AbstractContextManager[Path]:
    """`atomic_dir` for an output that is one file (a GGUF): yield a temporary path beside `path` to write."""
    return _atomic(path, overwrite, inputs, folder=False)
