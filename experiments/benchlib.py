"""Helpers shared by the benchmark scripts: the device line, child processes measured for wall time and
peak RSS, and where benchmark inputs are cached.

Peak RSS comes from the kernel's accounting of each child (wait4's ru_maxrss). That figure includes the
memory the parent had when it forked the child, so a measuring parent must stay small: it imports
neither jax nor expand, and does its own heavy work in child processes (`python_json`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def cache_dir(name: str) -> Path:
    """<expand's cache>/bench/<name>. The root is the rule of `expand.io.embedded.cache_dir`, restated here
    because importing expand would load jax into this (measuring, so deliberately small) process."""
    if os.environ.get("EXPAND_CACHE"):
        root = Path(os.environ["EXPAND_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "expand"
    path = root / "bench" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def device_line() -> str:
    """CPU model, core count, RAM, and the accelerator JAX sees."""
    import jax

    cpu = platform.processor() or "cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    accel = jax.devices()[0]
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM; jax {jax.__version__} on "
            f"{accel.platform}:{accel.device_kind}")


def python_json(code: str):
    """Run Python code in a child process (cwd: experiments/) and return the JSON it prints last."""
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=Path(__file__).parent,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"child process failed:\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def run_measured(command: list[str], env: dict | None = None) -> dict:
    """Run a child process; return its wall time (s) and peak resident memory (MiB, from wait4)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(command)} failed with exit status {code}:\n{output[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def write_results(name: str, results: dict, text: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{name}.txt").write_text(text + "\n")
    print(f"wrote {RESULTS / name}.json and .txt")
