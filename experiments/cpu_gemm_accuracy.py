"""fp32 matrix-product accuracy and speed of XLA:CPU with its default GEMM path and with
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` (which turns the YNNPACK fusions off), measured in
one run. Error: max |C - C64| / max |C64| against numpy float64, for the SmolLM2 MLP shape
(512 x 576) @ (576 x 1536); time: best of 20.

    python -m experiments.cpu_gemm_accuracy
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from experiments.benchlib import python_json, write_results

MEASURE = """
import json, time
import numpy as np, jax, jax.numpy as jnp
rng = np.random.default_rng(0)
a, b = rng.standard_normal((512, 576), np.float32), rng.standard_normal((576, 1536), np.float32)
exact = a.astype(np.float64) @ b.astype(np.float64)
f = jax.jit(jnp.matmul)
out = np.asarray(f(a, b)).astype(np.float64)
times = []
for _ in range(20):
    t = time.perf_counter(); jax.block_until_ready(f(a, b)); times.append(time.perf_counter() - t)
print(json.dumps({"relative_error": float(np.abs(out - exact).max() / np.abs(exact).max()),
                  "gflops": 2 * 512 * 576 * 1536 / min(times) / 1e9}))
"""


def measure(xla_flags: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": xla_flags})
    if out.returncode:
        sys.exit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    device = python_json("from experiments import benchlib; print(json.dumps(benchlib.device_line()))")
    default, blas = measure(""), measure("--xla_cpu_experimental_ynn_fusion_type=")
    lines = [f"device: {device}", "",
             f"default XLA:CPU      relative error {default['relative_error']:.2e}  {default['gflops']:.1f} GFLOP/s",
             f"ynn fusions off      relative error {blas['relative_error']:.2e}  {blas['gflops']:.1f} GFLOP/s"]
    print("\n".join(lines))
    write_results("cpu_gemm_accuracy", {"device": device, "default": default, "ynn_fusions_off": blas}, "\n".join(lines))


if __name__ == "__main__":
    main()
