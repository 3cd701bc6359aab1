"""Several processes running one program on one mesh (JAX's multi-controller SPMD, `jax.distributed`).

Each process runs the same command (CLI: --coordinator HOST:PORT --num-processes N --process-id I, or none
of them where JAX reads the cluster from the environment, on SLURM and TPU pods). What that takes, each
piece here once:

- `initialize`: jax.distributed.initialize, with CPU collectives over gloo (so CPU hosts run it too),
  before anything touches a backend (the CLI calls it before its verb runs; `jax.devices()` then lists
  every process's devices, and a mesh spans them all).
- `to_host`: the numbers a verb prints or writes, fetched to every process (arrays spanning other
  processes' devices are gathered with `multihost_utils.process_allgather`; replicated ones are read
  locally).
- `on_writer` / `write_on_writer`: only process 0 claims and writes outputs; the others take part in the
  gathers its writing needs, and every process learns whether it succeeded (a failure on process 0 is
  raised on every process, so none waits forever in a collective).
- `agree_on_exit_code`: every process exits with the largest exit status of all.

With one process every function here reduces to the plain single-process step.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
import numpy as np

T = TypeVar("T")
MESSAGE_BYTES = 1024  # the longest error message passed from process 0 to the others


class WriterFailed(ValueError):
    """Process 0 failed to claim or write an output; raised on the other processes with its message."""


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """jax.distributed.initialize with explicit arguments, or from the environment when none are given; CPU
    collectives over gloo. Must run before anything touches a backend."""
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ValueError("several processes need --coordinator, --num-processes and --process-id together "
                         "(or none of them, on clusters where JAX reads them from the environment)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in 0..{num_processes - 1} (--num-processes "
                         f"{num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def several() -> bool:
    """Whether this program runs as several processes (without touching a backend when it does not)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes outputs and prints reports (process 0, or the only one)."""
    return not several() or jax.process_index() == 0


def to_host(tree):
    """Every array leaf of `tree` as a numpy array holding its global value, on every process: gathered
    across processes where it spans other processes' devices (a collective: every process calls it with
    the same tree), read locally where this process holds all of it or it is replicated."""

    def fetch(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(fetch, tree)


def _share_outcome(error: BaseException | None) -> None:
    """Process 0's outcome to every process: nothing when it succeeded; else process 0 raises its own error
    and the others a WriterFailed with its message."""
    if not several():
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    text = np.zeros(MESSAGE_BYTES + 1, np.uint8)
    if error is not None:
        message = f"{type(error).__name__}: {error}".encode()[:MESSAGE_BYTES]
        text[0] = 1
        text[1:1 + len(message)] = np.frombuffer(message, np.uint8)
    text = np.asarray(multihost_utils.broadcast_one_to_all(text))
    if error is not None:
        raise error
    if text[0]:
        raise WriterFailed("process 0 failed: " + bytes(text[1:]).rstrip(b"\0").decode(errors="replace"))


def on_writer(step: Callable[[], T]) -> T | None:
    """step() on process 0 only (claiming an output, writing a report), its outcome shared with every
    process: an error there is raised on every process. Returns step()'s value on process 0, None elsewhere."""
    result, error = None, None
    if is_writer():
        try:
            result = step()
        except Exception as e:  # shared below, then raised on every process
            error = e
    _share_outcome(error)
    return result


def write_on_writer(write: Callable[[Callable[[int], object]], None], count: int,
                    gather: Callable[[int], object]) -> None:
    """An output that process 0 writes from data every process must help gather.

    gather(i) for i in 0..count-1 may be a collective, so every process calls it for every i, in order.
    Process 0 runs write(produce), which must call produce(i) (= gather(i)) for i in order, as far as it
    gets; if it fails midway, process 0 still gathers the rest, so no process is left waiting, and then
    every process raises (`_share_outcome`)."""
    done = 0

    def produce(i: int):
        nonlocal done
        if i != done:
            raise RuntimeError(f"write_on_writer: item {i} asked for out of order (expected {done})")
        done += 1
        return gather(i)

    error = None
    if is_writer():
        try:
            write(produce)
        except Exception as e:
            error = e
    if several():
        for i in range(done, count):
            gather(i)
    _share_outcome(error)


def agree_on_exit_code(code: int) -> int:
    """The largest exit status over all processes (every process exits with it); `code` with one process."""
    if not several():
        return code
    from jax.experimental import multihost_utils

    codes = multihost_utils.process_allgather(np.asarray([code], np.int32))
    return int(np.max(codes))
