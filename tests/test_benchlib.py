"""The benchmarks' shared rules: a repeat count too small for a median and a spread is refused with exit 2,
and a timed call sees the CPU time other processes take meanwhile (a busy machine is not a quiet one)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.benchlib import cpu_vector_extensions, other_share, timed_call

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("script", ["bench_forward", "profile_prefill", "bench_compile"])
@pytest.mark.parametrize("repeats", ["2", "0", "abc"])
def test_too_few_repeats_exit_2_before_any_work(script, repeats):
    done = subprocess.run([sys.executable, "-m", f"experiments.{script}", "--repeats", repeats], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--repeats" in done.stderr and "Traceback" not in done.stderr


def test_unknown_benchmark_row_exits_2():
    done = subprocess.run([sys.executable, "-m", "experiments.bench_forward", "--rows", "prefill-9x9"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "unknown rows ['prefill-9x9']" in done.stderr


def test_a_timed_call_counts_the_cpu_another_process_takes():
    """A child spinning on one core during a 1.5 s sleep of this process: at least 1.2 CPU-seconds of
    others, so their share of the machine's CPU is above 1.2 / (1.5 x CPUs); the sleep itself costs none."""
    import os

    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)  # the child is running
        wall, others = timed_call(lambda: time.sleep(1.5))
    finally:
        spinner.kill()
        spinner.wait()
    assert wall >= 1.5 and others >= 1.2
    assert other_share([wall], [others]) >= 1.2 / (wall * os.cpu_count())


def test_vector_extensions_are_read_from_the_cpu_flags():
    flags = "fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16"
    assert cpu_vector_extensions(flags) == "AVX-512 (F, BF16, VNNI), FMA"
    assert cpu_vector_extensions("sse2 avx avx2 fma") == "AVX2, FMA"
    assert cpu_vector_extensions("neon asimd") == ""
