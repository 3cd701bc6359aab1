"""Prefill throughput of expand's forward vs transformers' PyTorch LlamaForCausalLM on the same model,
dtype and batch, measured in one run.

CPU: the embedded SmolLM2-135M in fp32, batch 1 x 512 and 4 x 512. With a GPU, add
`--llama3-8b` for a random Llama-3-8B-shaped model in bf16 at batch 8 x 2048 with MFU.

    python experiments/bench_forward.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import device_line, write_results  # noqa: E402

import expand  # noqa: E402


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_model(model, dtype):
    """The same weights in transformers' LlamaForCausalLM (built from expand's saved checkpoint)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        expand.save(Path(tmp) / "m", *model)
        return AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import jax
    import torch

    model = expand.load("smollm2")
    reference = torch_model(model, torch.float32)
    flops_per_token = 2 * expand.param_count(model.config)
    results = {"device": device_line(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "model": "SmolLM2-135M-Instruct fp32", "runs": []}
    lines = [f"device: {results['device']}; torch {torch.__version__} ({torch.get_num_threads()} threads)", ""]
    for batch, length in [(1, 512), (4, 512)]:
        tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, length)).astype(np.int32)
        ours = best_time(lambda: jax.block_until_ready(expand.forward(model.params, tokens, model.config)), args.repeats)
        with torch.no_grad():
            theirs = best_time(lambda: reference(torch.as_tensor(tokens, dtype=torch.long)).logits, args.repeats)
        n = batch * length
        run = {"batch": batch, "length": length, "expand_tokens_per_s": round(n / ours, 1),
               "torch_tokens_per_s": round(n / theirs, 1), "ratio": round(theirs / ours, 2),
               "expand_gflops": round(n * flops_per_token / ours / 1e9, 1)}
        results["runs"].append(run)
        lines.append(f"prefill {batch} x {length}: expand {run['expand_tokens_per_s']:,.0f} tok/s "
                     f"({run['expand_gflops']} GFLOP/s), transformers {run['torch_tokens_per_s']:,.0f} tok/s, "
                     f"expand / transformers = {run['ratio']}x")
        print(lines[-1], flush=True)
    write_results("bench_forward_cpu", results, "\n".join(lines))


if __name__ == "__main__":
    main()
