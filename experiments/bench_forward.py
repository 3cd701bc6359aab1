"""The speed benchmark of record: expand against transformers' PyTorch LlamaForCausalLM on the same weights
(the embedded SmolLM2-135M in fp32), both in this one process, on this machine.

Rows:
- prefill B x T: one forward of B x T random tokens, logits at every position;
- decode B: greedy generation of 128 new tokens after a 10-token prompt per row, EOS ignored, prefill
  included (what a caller of `generate` waits for).

Each side is called once first (expand's first call includes its compilation, reported separately as
`first call`), then the two sides alternate for `--repeats` rounds, the order flipping every round (E T,
T E, E T, ...) so that a slow spell of the machine falls on both. Each row reports the median and range
of the repeats and the ratio of medians transformers / expand (> 1: expand is faster). The load average
at the start and end of the run is recorded, and each row states the share of the CPU time (of the CPUs
this process may use) that other processes took during one side's timed calls, first call included, the
larger side's (`benchlib.timed_call`, from /proc/stat); above `benchlib.QUIET_SHARE` (10%) in any row the
run stops without writing (PyTorch's threads lose far more than XLA's to a busy core, so a busy spell
inflates the ratios). A decode row also says how many greedy tokens the two sides agree on (fp32 rounding
decides near-ties differently after a while). After the first call expand must not compile again: the run
fails if it does.

    python -m experiments.bench_forward [--repeats 5] [--rows prefill-1x512,decode-8]

writes experiments/results/bench_forward_cpu.{json,txt} (only when every row ran).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

import expand
from experiments.benchlib import (add_repeats_option, device_line, other_share, refuse_busy_run, timed_call,
                                  write_results)

PREFILL = [(1, 512), (4, 512), (1, 2048)]
DECODE = [1, 8]
PROMPT_LEN, NEW_TOKENS = 10, 128
ROWS = [f"prefill-{b}x{t}" for b, t in PREFILL] + [f"decode-{b}" for b in DECODE]


def torch_model(model, dtype=None):
    """The same weights in transformers' LlamaForCausalLM (in `dtype`, default torch.float32), loaded from
    expand's saved checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        expand.save(Path(tmp) / "m", *model)
        return AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=dtype or torch.float32).eval()


def alternate(sides: dict, repeats: int) -> dict[str, dict]:
    """`repeats` rounds calling every side, the order flipping each round; per side the times (s), their
    median and range, and the CPU seconds other processes ran during its calls (`benchlib.timed_call`)."""
    out = {name: {"times_s": [], "other_cpu_s": []} for name in sides}
    names = list(sides)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            wall, others = timed_call(sides[name])
            out[name]["times_s"].append(wall)
            out[name]["other_cpu_s"].append(others)
    for side in out.values():
        times = side["times_s"]
        side.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times))
    return out


def busy_share(times: dict[str, dict]) -> float:
    """The larger of the two sides' `benchlib.other_share` over their timed calls in `alternate` (a busy spell
    during one side's calls skews the ratio as much as one over both), first calls included where recorded."""
    return max(other_share(side["times_s"] + [side.get("first_call_s", 0.0)],
                           side["other_cpu_s"] + [side.get("first_call_other_cpu_s", 0.0)]) for side in times.values())


def prefill_sides(model, reference, batch: int, length: int) -> tuple[dict, int]:
    import jax
    import torch

    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, length)).astype(np.int32)
    as_torch = torch.as_tensor(tokens, dtype=torch.long)

    def ours():
        jax.block_until_ready(expand.forward(model.params, tokens, model.config))

    def theirs():
        with torch.no_grad():
            reference(as_torch).logits

    return {"expand": ours, "transformers": theirs}, batch * length


def decode_sides(model, reference, batch: int, outputs: dict) -> tuple[dict, int]:
    """Greedy, NEW_TOKENS new tokens per row, EOS ignored on both sides; the last outputs land in `outputs`."""
    import torch

    prompts = np.random.default_rng(1).integers(0, model.config.vocab_size, (batch, PROMPT_LEN))
    as_torch = torch.as_tensor(prompts, dtype=torch.long)
    config = copy.deepcopy(reference.generation_config)
    config.update(eos_token_id=None, do_sample=False, max_new_tokens=NEW_TOKENS)

    def ours():
        outputs["expand"] = expand.generate(model.params, model.config, prompts.tolist(), NEW_TOKENS,
                                            eos_token_ids=[])

    def theirs():
        with torch.no_grad():
            out = reference.generate(as_torch, attention_mask=torch.ones_like(as_torch), generation_config=config)
        outputs["transformers"] = out[:, PROMPT_LEN:].tolist()

    return {"expand": ours, "transformers": theirs}, batch * NEW_TOKENS


def agreeing_prefix(a: list[list[int]], b: list[list[int]]) -> int:
    """The number of leading tokens identical in every row of a and b."""
    def prefix(x, y):
        return next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
    return min(prefix(x, y) for x, y in zip(a, b))


def run_row(name: str, model, reference, repeats: int) -> dict:
    from expand.model import TRACE_COUNTS

    outputs: dict = {}
    kind, shape = name.split("-")
    if kind == "prefill":
        batch, length = map(int, shape.split("x"))
        sides, tokens = prefill_sides(model, reference, batch, length)
        row = {"row": f"prefill {batch} x {length}", "batch": batch, "length": length}
    else:
        batch = int(shape)
        sides, tokens = decode_sides(model, reference, batch, outputs)
        row = {"row": f"decode {batch} x {NEW_TOKENS}", "batch": batch, "prompt_length": PROMPT_LEN,
               "new_tokens": NEW_TOKENS}
    traces = sum(TRACE_COUNTS.values())
    first_calls = {name: timed_call(fn) for name, fn in sides.items()}  # expand's compiles
    compiled = sum(TRACE_COUNTS.values())
    times = alternate(sides, repeats)
    if sum(TRACE_COUNTS.values()) != compiled:
        sys.exit(f"{row['row']}: expand compiled again after its first call ({dict(TRACE_COUNTS)})")
    for name, (first_call, others) in first_calls.items():
        times[name] |= {"first_call_s": first_call, "first_call_other_cpu_s": others}
    row["expand_compilations"] = compiled - traces
    row |= {side: {k: (round(v, 4) if isinstance(v, float) else [round(t, 4) for t in v]) for k, v in r.items()}
            for side, r in times.items()}
    row["tokens"] = tokens
    for side in ("expand", "transformers"):
        row[f"{side}_tokens_per_s"] = round(tokens / times[side]["median_s"], 1)
    row["ratio"] = round(times["transformers"]["median_s"] / times["expand"]["median_s"], 3)
    row["other_cpu_share"] = round(busy_share(times), 3)
    if kind == "prefill":
        row["expand_gflops"] = round(tokens * 2 * expand.param_count(model.config) / times["expand"]["median_s"] / 1e9, 1)
    else:
        row["greedy_tokens_agreeing"] = agreeing_prefix(outputs["expand"], outputs["transformers"])
    return row


def row_line(row: dict) -> str:
    e, t = row["expand"], row["transformers"]
    unit = "new tok/s" if "new_tokens" in row else "tok/s"
    extra = (f"; greedy tokens agree for the first {row['greedy_tokens_agreeing']}" if "new_tokens" in row
             else f"; expand {row['expand_gflops']} GFLOP/s")
    return (f"{row['row']:<17} expand {e['median_s']:7.3f} s [{e['min_s']:.3f}-{e['max_s']:.3f}] "
            f"{row['expand_tokens_per_s']:7.1f} {unit} | transformers {t['median_s']:7.3f} s "
            f"[{t['min_s']:.3f}-{t['max_s']:.3f}] {row['transformers_tokens_per_s']:7.1f} {unit} | "
            f"ratio {row['ratio']:.2f}x | expand first call {e['first_call_s']:.2f} s{extra}; other processes "
            f"{row['other_cpu_share']:.0%} of the CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_repeats_option(parser, 5, "alternating rounds per row")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS} (default: all; "
                        "a subset is printed, not written)")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown rows {unknown} (choose from {ROWS})")
    import jax
    import torch

    load_start = os.getloadavg()
    model = expand.load("smollm2")
    reference = torch_model(model)
    results = {"device": device_line(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "model": "SmolLM2-135M-Instruct fp32", "repeats": args.repeats, "rows": []}
    for name in rows:
        results["rows"].append(run_row(name, model, reference, args.repeats))
        print(row_line(results["rows"][-1]), flush=True)
    results["load_average"] = {"start": [round(x, 2) for x in load_start],
                               "end": [round(x, 2) for x in os.getloadavg()]}
    load = results["load_average"]
    lines = [f"device: {results['device']}; torch {torch.__version__} ({torch.get_num_threads()} threads)",
             f"SmolLM2-135M-Instruct fp32; median of {args.repeats} alternating repeats [min-max]; ratio = "
             f"transformers time / expand time (> 1: expand faster); load average (1, 5, 15 min) "
             f"{load['start']} at start, {load['end']} at end", ""]
    lines += [row_line(row) for row in results["rows"]]
    if rows != ROWS:
        print("\n".join(lines[:2]))
    refuse_busy_run({row["row"]: row["other_cpu_share"] for row in results["rows"]})
    if rows == ROWS:
        write_results("bench_forward_cpu", results, "\n".join(lines))


if __name__ == "__main__":
    main()
