"""Helpers shared by the benchmark scripts: the device line, child processes measured for wall time and
peak RSS, several tools run alternately with repeats (median and range), and where benchmark inputs are
cached. Run the scripts as modules from the repository root (`python -m experiments.bench_depth`).

Peak RSS comes from the kernel's accounting of each child (wait4's ru_maxrss). That figure includes the
memory the parent had when it forked the child, so a measuring parent must stay small: it imports
neither jax nor expand while it measures, and does its own heavy work in child processes (`python_json`);
`write_results` imports expand (its atomic writes) only once every child has run.

Timings are taken as quiet only when other processes left the CPUs alone meanwhile (`timed_call`,
`refuse_busy_run`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parents[1]
STARTED = time.monotonic()  # a run's wall time (`write_results`) counts from this import, the start of every benchmark


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


def cpu_vector_extensions(flags: str) -> str:
    """The widest x86 vector extensions named in /proc/cpuinfo's flags line, e.g. "AVX-512 (F, VNNI), FMA": the
    matmul and softmax throughput of both JAX and PyTorch on a CPU depends on them; "" when none is named."""
    names = set(flags.split())
    found = []
    if "avx512f" in names:
        extra = [label for flag, label in (("avx512_bf16", "BF16"), ("avx512_vnni", "VNNI")) if flag in names]
        found.append("AVX-512 (" + ", ".join(["F", *extra]) + ")")
    elif "avx2" in names:
        found.append("AVX2")
    elif "avx" in names:
        found.append("AVX")
    found += [label for flag, label in (("fma", "FMA"), ("amx_tile", "AMX")) if flag in names]
    return ", ".join(found)


def device_line() -> str:
    """CPU model (name, family and model numbers, clock), its vector extensions, core count, RAM, and the
    accelerator JAX sees."""
    import jax

    info = {}  # the first processor's fields
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name") or platform.processor() or "cpu"
    details = [f"family {info['cpu family']} model {info['model']}" if "cpu family" in info else "",
               f"{float(info['cpu MHz']):.0f} MHz" if "cpu MHz" in info else "",
               cpu_vector_extensions(info.get("flags", ""))]
    details = "; ".join(d for d in details if d)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    accel = jax.devices()[0]
    return (f"{cpu}{f' ({details})' if details else ''}, {os.cpu_count()} cores, {ram:.0f} GiB RAM; "
            f"jax {jax.__version__} on {accel.platform}:{accel.device_kind}")


def python_json(code: str):
    """Run Python code in a child process (cwd: experiments/, the repository root on its PYTHONPATH, so that
    `from experiments import bench_depth` works) and return the JSON it prints last."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=Path(__file__).parent,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
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


def alternating(runs: dict[str, Callable[[], dict]], repeats: int, warmup: bool = True) -> dict:
    """Call every run `repeats` times, alternating: round r calls them in their order rotated by r, so each
    takes each place in the order about equally often. With `warmup`, one uncounted round comes first (it
    fills the page cache, compiles, installs). Each call returns {"wall_s": .., "peak_rss_mib": .., ...};
    returns {name: {key: [its value in each counted round], "order": [its place in each round]}}."""
    names = list(runs)
    out = {name: {"order": []} for name in names}
    for r in range(-1 if warmup else 0, repeats):
        order = names[r % len(names):] + names[:r % len(names)] if r >= 0 else names
        for place, name in enumerate(order):
            result = runs[name]()
            print(f"{'warm-up' if r < 0 else f'round {r + 1}/{repeats}'}: {name}: {result['wall_s']:.2f} s, "
                  f"{result['peak_rss_mib']:.0f} MiB", flush=True)
            if r >= 0:
                for key, value in result.items():
                    out[name].setdefault(key, []).append(value)
                out[name]["order"].append(place)
    return out


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine may be shared: timings are only as quiet as it)."""
    return [round(x, 2) for x in os.getloadavg()]


# A measurement is taken as quiet when other processes used at most this fraction of the time of the CPUs
# this process may use during its timed calls (PyTorch's threads slow down far more than XLA's when a core
# is taken: a busy spell skews ratios). It is judged over a measurement's calls (a row's side, a part, a
# program), not call by call: /proc/stat counts in ticks of 1/100 s, a few percent of a 0.1 s call.
QUIET_SHARE = 0.10


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity; all of the machine's where that is unknown)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def machine_busy_seconds(cpus: set[int]) -> float:
    """CPU seconds every process (this one included) has run so far on these CPUs: /proc/stat's user, nice,
    system, irq, softirq and steal (time the hypervisor gave to another guest) of each."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines()[1:]:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            break
        if int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
            total += user + nice + system + irq + softirq + steal
    return total / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has run so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_call(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds of fn(), CPU seconds other processes ran meanwhile on the CPUs this process may use: their
    busy time minus this process's)."""
    cpus = usable_cpus()
    busy, own, start = machine_busy_seconds(cpus), own_cpu_seconds(), time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    return wall, max((machine_busy_seconds(cpus) - busy) - (own_cpu_seconds() - own), 0.0)


def other_share(walls: list[float], others: list[float]) -> float:
    """The share of the usable CPUs' time that other processes took over timed calls: their CPU seconds over
    the calls' wall seconds times the CPUs (0 on a quiet machine)."""
    return sum(others) / (sum(walls) * len(usable_cpus()))


def refuse_busy_run(shares: dict[str, float]) -> None:
    """Exit (status 1, before anything is written) when other processes took more than QUIET_SHARE of the
    CPU during some measurement: shares maps a measurement to `other_share` over its timed calls."""
    name, share = max(shares.items(), key=lambda item: item[1])
    if share > QUIET_SHARE:
        sys.exit(f"error: other processes took {share:.1%} of the CPU during the timed calls of {name} (at most "
                 f"{QUIET_SHARE:.0%} counts as quiet): results not written; rerun on a quiet machine")


def add_repeats_option(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    """--repeats N (N >= 3: a median and a spread need three), refused with exit 2 otherwise."""
    def at_least_three(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < 3:
            raise argparse.ArgumentTypeError(f"{value}: a median and a spread need at least 3 repeats")
        return value

    parser.add_argument("--repeats", type=at_least_three, default=default, help=f"{what} (default: {default}; >= 3)")


def replace_file(path: Path, text: str) -> None:
    """Write `path` whole: a run killed while writing leaves the file it replaces, never a part of either."""
    from expand.io.atomic import atomic_file

    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: dict) -> None:
    """A results JSON (indented, newline-terminated), written whole (`replace_file`)."""
    replace_file(path, json.dumps(data, indent=2) + "\n")


def write_results(name: str, results: dict, text: str) -> None:
    """results/<name>.json and .txt, each with the whole run's wall time (`run_wall_s`, s), each written
    whole."""
    wall = round(time.monotonic() - STARTED, 1)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{name}.json", {**results, "run_wall_s": wall})
    replace_file(RESULTS / f"{name}.txt", f"{text}\nwhole run: {wall} s\n")
    print(f"wrote {RESULTS / name}.json and .txt")
