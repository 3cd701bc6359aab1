"""Launching one `expand` command as several real OS processes on localhost (jax.distributed over gloo),
each with its own simulated CPU devices, the way a user runs it on several hosts."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


@dataclasses.dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(devices: int) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(ROOT)}


def rank_options(port: int, processes: int, rank: int) -> list[str]:
    return ["--coordinator", f"localhost:{port}", "--num-processes", str(processes), "--process-id", str(rank)]


@dataclasses.dataclass
class Running:
    """`python -m expand` processes started at once, each in its own session (so it is killed with its
    children), stdout and stderr in temporary files."""
    children: list[subprocess.Popen]
    outputs: list[tuple]

    def finish(self, timeout: float) -> list[Finished]:
        """Wait for every process; if any outlives `timeout` seconds, every one still running is killed (with
        its children) and the timeout is raised."""
        deadline = time.monotonic() + timeout
        try:
            for child in self.children:
                child.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for child in self.children:
                if child.poll() is None:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
        finished = []
        for child, (out, err) in zip(self.children, self.outputs):
            out.seek(0)
            err.seek(0)
            finished.append(Finished(child.returncode, out.read(), err.read()))
            out.close()
            err.close()
        return finished


def start_expand(commands: list[list[str]], devices: int = 2) -> Running:
    """`python -m expand ARGS` for each ARGS in `commands`, at once, each process with `devices` CPU devices."""
    outputs, children = [], []
    for args in commands:
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        outputs.append((out, err))
        children.append(subprocess.Popen([sys.executable, "-m", "expand", *args], cwd=ROOT, env=environment(devices),
                                         stdout=out, stderr=err, start_new_session=True))
    return Running(children, outputs)


def run_expand(*args: str, processes: int = 2, devices: int = 2, timeout: float = 600) -> list[Finished]:
    """`python -m expand ARGS --coordinator localhost:PORT --num-processes N --process-id I` for every I, at
    once, each process with `devices` CPU devices, waited for (`Running.finish`)."""
    port = free_port()
    commands = [[*args, *rank_options(port, processes, rank)] for rank in range(processes)]
    return start_expand(commands, devices).finish(timeout)


def run_expand_alone(*args: str, timeout: float = 600) -> Finished:
    """The same command as one process on one CPU device."""
    done = subprocess.run([sys.executable, "-m", "expand", *args], cwd=ROOT, env=environment(1), capture_output=True,
                          text=True, timeout=timeout)
    return Finished(done.returncode, done.stdout, done.stderr)
