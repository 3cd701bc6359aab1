"""Several processes running one program on one mesh (JAX's multi-controller SPMD, `jax.distributed`).

Each process runs the same command (CLI: --coordinator HOST:PORT --num-processes N --process-id I, or none
of them where JAX reads the cluster from the environment, on SLURM and TPU pods). What that takes, each
piece here once:

- `initialize`: every process first checks in with process 0 (`check_in`: a process that never starts,
  differing --num-processes or a repeated --process-id is an error on every process within a stated
  timeout, where JAX would wait silently and then abort), then jax.distributed.initialize, with CPU
  collectives over gloo (so CPU hosts run it too), before anything touches a backend (the CLI calls it
  before its verb runs; `jax.devices()` then lists every process's devices, and a mesh spans them all).
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

import os
import signal
import socket
import sys
import time
from typing import Callable, NoReturn, TypeVar

import jax
import numpy as np

T = TypeVar("T")
MESSAGE_BYTES = 1024  # the longest error message passed from process 0 to the others
CHECK_IN = "expand-check-in"  # the first word of a process's check-in line
WAITING_NOTE_AFTER_S = 5  # a process waiting longer than this says what it waits for
# a process silent this long counts as dead, and the others stop (JAX's default, 100 s, left a process
# waiting that long in a barrier, e.g. orbax's checkpoint commit, for a peer killed during it)
HEARTBEAT_TIMEOUT_S = 20


class WriterFailed(ValueError):
    """Process 0 failed to claim or write an output; raised on the other processes with its message."""


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None, timeout: float) -> None:
    """jax.distributed.initialize with explicit arguments (after `check_in`), or from the environment when
    none are given (then JAX's own start-up applies: it waits `timeout` seconds, then aborts); CPU
    collectives over gloo. Must run before anything touches a backend."""
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ValueError("several processes need --coordinator, --num-processes and --process-id together "
                         "(or none of them, on clusters where JAX reads them from the environment)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in 0..{num_processes - 1} (--num-processes "
                         f"{num_processes})")
    deadline = time.monotonic() + timeout
    if coordinator is not None and num_processes > 1:
        check_in(coordinator, num_processes, process_id, timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=max(30, int(deadline - time.monotonic())),
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    # jax.distributed takes SIGTERM as a preemption notice for a sync manager expand does not use, so a process
    # sent SIGTERM ran on to the end; it stops now, like a single process (the other processes then stop too)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---- check-in: every process known to process 0 before JAX's coordination service starts -------------


def check_in(coordinator: str, num_processes: int, process_id: int, timeout: float) -> None:
    """Every process reports `CHECK_IN process_id num_processes` to process 0 over a plain TCP connection
    to the coordinator's port; process 0 answers every one `ok` once all N-1 others have checked in with
    its own N, and then frees the port for jax.distributed. Raises ValueError (on every process that
    checked in) for a process still missing after `timeout` seconds, another --num-processes, or a
    --process-id given twice: what jax.distributed would wait on silently, abort on, or not compare."""
    host, port = parse_address(coordinator)
    if process_id == 0:
        _admit_all(port, num_processes, coordinator, timeout)
    else:
        _report_to_process_zero(host, port, process_id, num_processes, coordinator, timeout)


def parse_address(coordinator: str) -> tuple[str, int]:
    """HOST:PORT (or [IPV6]:PORT) as (host, port); ValueError naming the form otherwise."""
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {coordinator!r} is not HOST:PORT (e.g. node0:8476 or localhost:8476)")
    return host.strip("[]"), int(port)


def _read_line(conn: socket.socket, deadline: float) -> str:
    """One line (at most MESSAGE_BYTES) from conn, without its newline; '' on a closed connection."""
    data = b""
    while not data.endswith(b"\n") and len(data) <= MESSAGE_BYTES:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(MESSAGE_BYTES)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _waiting_note(what: str, deadline: float) -> None:
    print(f"waiting for {what} (up to {max(0, deadline - time.monotonic()):.0f} s more, --init-timeout)",
          file=sys.stderr, flush=True)


def _admit_all(port: int, num_processes: int, coordinator: str, timeout: float) -> None:
    """Process 0's side of `check_in`."""
    deadline = time.monotonic() + timeout
    dual = socket.has_dualstack_ipv6()
    try:
        server = socket.create_server(("", port), family=socket.AF_INET6 if dual else socket.AF_INET,
                                      dualstack_ipv6=dual)
    except OSError as e:
        raise ValueError(f"process 0 cannot listen on port {port} of --coordinator {coordinator} ({e.strerror}): "
                         f"is another run using it? Give every process another free port") from None
    peers: dict[int, socket.socket] = {}
    noted = False
    try:
        while len(peers) < num_processes - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, num_processes)) - set(peers))
                raise ValueError(f"process{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                                 f"{num_processes} did not check in at {coordinator} within {timeout:g} s "
                                 f"(--init-timeout): start the same command on every process with --coordinator "
                                 f"{coordinator} --num-processes {num_processes} and its own --process-id")
            server.settimeout(min(left, WAITING_NOTE_AFTER_S))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                if not noted:
                    _waiting_note(f"{num_processes - 1 - len(peers)} more process(es) to check in at {coordinator}",
                                  deadline)
                    noted = True
                continue
            try:
                words = _read_line(conn, min(deadline, time.monotonic() + WAITING_NOTE_AFTER_S)).split()
            except OSError:
                words = []
            if len(words) != 3 or words[0] != CHECK_IN or not (words[1].isdigit() and words[2].isdigit()):
                conn.close()  # not an expand process (a port scan, a stray client): ignored
                continue
            rank, claimed = int(words[1]), int(words[2])
            problem = _admission_problem(rank, claimed, num_processes, peers)
            if problem:
                _answer_all([conn], f"error: process 0 says: {problem}")
                raise ValueError(problem)
            peers[rank] = conn
    except ValueError as e:
        _answer_all(peers.values(), f"error: process 0 says: {e}")
        raise
    finally:
        server.close()
    _answer_all(peers.values(), "ok")


def _admission_problem(rank: int, claimed: int, num_processes: int, admitted) -> str | None:
    """Why the process that checked in as (rank, claimed count) cannot run with process 0 and the
    processes `admitted` so far; None if it can."""
    if claimed != num_processes:
        return (f"process {rank} was given --num-processes {claimed} and process 0 --num-processes "
                f"{num_processes}: give every process the same count")
    if rank == 0 or rank in admitted:
        return f"two processes were given --process-id {rank}: give each process its own index 0..{num_processes - 1}"
    return None


def _answer_all(conns, line: str) -> None:
    """Send `line` to every checked-in process and wait (briefly) for each to hang up first, so that the
    port's closing state stays on their side and jax.distributed can bind it at once."""
    for conn in conns:
        try:
            conn.sendall(line.encode()[:MESSAGE_BYTES] + b"\n")
            _read_line(conn, time.monotonic() + WAITING_NOTE_AFTER_S)
        except OSError:
            pass  # that process is gone; jax.distributed or its own check-in reports it
        finally:
            conn.close()


def _report_to_process_zero(host: str, port: int, process_id: int, num_processes: int, coordinator: str,
                            timeout: float) -> None:
    """A process other than 0: its side of `check_in`."""
    deadline = time.monotonic() + timeout
    noted = False
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=max(0.01, min(5.0, deadline - time.monotonic())))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise ValueError(f"process 0 did not answer at {coordinator} within {timeout:g} s (--init-timeout): "
                                 f"start process 0 there (--process-id 0), or check the address") from None
            if not noted and time.monotonic() > deadline - timeout + WAITING_NOTE_AFTER_S:
                _waiting_note(f"process 0 at {coordinator}", deadline)
                noted = True
            time.sleep(0.2)
    with conn:
        try:
            conn.sendall(f"{CHECK_IN} {process_id} {num_processes}\n".encode())
            answer = _read_line(conn, deadline)
        except TimeoutError:
            answer = ""
        except OSError as e:
            answer = f"error: the check-in at {coordinator} failed ({e.strerror})"
    if answer == "ok":
        return
    if answer.startswith("error: "):
        raise ValueError(answer.removeprefix("error: "))
    if answer:
        said = answer.splitlines()[0][:80]
        raise ValueError(f"what answers at {coordinator} is not expand's process 0 (it said {said!r}): give every "
                         f"process a --coordinator port that process 0 listens on and nothing else uses")
    raise ValueError(f"process 0 at {coordinator} did not admit process {process_id} within {timeout:g} s "
                     f"(--init-timeout): it stopped, or it waits for a process that has not started")


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

    try:
        codes = multihost_utils.process_allgather(np.asarray([code], np.int32))
    except jax.errors.JaxRuntimeError:
        stop_now(max(code, 1), "another process stopped before all agreed on the exit status")
    return int(np.max(codes))


# ---- a process that stops mid-run ---------------------------------------------------------------------


def is_runtime_failure(error: BaseException) -> bool:
    """Whether `error` is the runtime's (a collective whose peer is gone, a device out of memory), not a
    Python error in expand's own code."""
    return isinstance(error, jax.errors.JaxRuntimeError)


def stop_now(code: int, reason: str) -> NoReturn:
    """Stop this process at once, in a run of several processes that cannot finish without it (after a
    runtime failure, most likely another process stopping, or a SIGTERM / SIGINT here): a normal exit would
    wait in a collective or in jax.distributed's shutdown for the others until a timeout (100-300 s), then
    abort. Process 0's coordination service goes with it, and jax.distributed then stops the other
    processes. Outputs are written whole or not at all, so nothing partial is left; claims are released
    first."""
    from expand.io.atomic import release_all

    message = (f"error: this process stops: {reason}. Nothing partial was written; heal resumes from its last "
               f"checkpoint with --resume\n")  # no JAX call here: after a failed collective it may raise
    os.write(2, message.encode())  # to the file itself: a progress bar may hold sys.stderr until it redraws
    release_all()
    os._exit(code)
