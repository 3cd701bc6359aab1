"""Progress for long work, on stderr: a live bar on a terminal; in a log, a pipe or CI a plain line every
PLAIN_INTERVAL seconds, so a run that takes minutes is never silent; nothing in a notebook, whose cell shows
that it runs (and whose saved outputs should hold results, not progress lines)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
PLAIN_INTERVAL = 15.0


@contextlib.contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield `advance(n=1)`; the bar disappears when done."""
    if console.is_jupyter:
        yield lambda n=1: None
        return
    if not console.is_terminal:
        with plain_progress(description, total) as advance:
            yield advance
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


@contextlib.contextmanager
def plain_progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """`description: done/total, elapsed, about R s left` lines, at most one per PLAIN_INTERVAL seconds."""
    start = last = time.monotonic()
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= PLAIN_INTERVAL and done < total:
            left = (now - start) / done * (total - done)
            print(f"{description}: {done}/{total}, {now - start:.0f} s, about {left:.0f} s left", file=sys.stderr,
                  flush=True)
            last = now

    yield advance
