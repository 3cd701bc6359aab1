"""Compile time against depth: `jit(...).lower(...)` and `.compile()` of the check forward, the heal step
and the decoding loop of `generate`, for models of 30, 60, 140 and 400 slots.

The forward scans over `layer_ids`, so the program XLA compiles is one slot's body inside a loop whatever
the depth: compile time should stay flat. Measured on a tiny width (hidden 64, 4 heads, 2 kv heads, MLP
128, vocab 256; batch 2 x 32 tokens), where compile time is all program and no data, two ways:

- stored: a model with N layers (params stacked over N), run as it is;
- virtual: a 30-layer model run through an N-slot plan (`layer_ids` = 0..29 repeated), as `expand check
  --layer-spec` and a healed self-merge do.

The check forward is `forward(..., return_hidden=True)` (what `expand check` runs); the heal step is
`expand.heal.make_step` built from its public pieces (student, optimizer, step) with a teacher, so its
program holds the forward, the backward through the scan, the KL and the AdamW update; the decoding loop
is `expand.generate._decode` (CHUNK steps of forward + sampling, the slot scan nested in the token loop).
Each point is the median of `--repeats` fresh compilations (JAX's caches cleared before each; the depths
taken in turn, after one warm-up compilation of each), with the number of instructions in the optimized
HLO. Flat means compile(400) / compile(30) <= 1.3 for every program and way; the run exits 1 (after
writing its results) when one is not, and (writing nothing) when other processes took more than 10% of the
CPU while a program's compilations ran (`benchlib.refuse_busy_run`).

    python -m experiments.bench_compile [--repeats 3]

writes experiments/results/bench_compile.{json,txt,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from experiments.benchlib import (RESULTS, add_repeats_option, device_line, other_share, refuse_busy_run, timed_call,
                                  write_results)

SLOTS = [30, 60, 140, 400]
FLAT = 1.3  # the largest compile(400) / compile(30) called flat
STORED_FOR_VIRTUAL = 30
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256, hidden_size=64,
            intermediate_size=128, num_hidden_layers=STORED_FOR_VIRTUAL, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
BATCH, LENGTH = 2, 32


def tiny_model(num_layers: int):
    import jax

    from expand.config import Config
    from expand.container import Model
    from expand.params import init_params

    config = Config.from_hf({**TINY, "num_hidden_layers": num_layers})
    return Model(config, init_params(config, jax.random.key(0)))


def check_forward(model, layer_ids):
    """forward(..., return_hidden=True) as `expand check` calls it: (jitted function, its arguments)."""
    from expand.model import forward

    tokens = np.zeros((BATCH, LENGTH), np.int32)
    return lambda: forward.lower(model.params, tokens, model.config, layer_ids=layer_ids, return_hidden=True)


def heal_step(model, layer_ids):
    """expand.heal's jitted step (the default distillation, KL to a teacher, AdamW, the loss a chunk of
    positions at a time) for the student `model` run through the plan `layer_ids` (None: as it is)."""
    import jax.numpy as jnp

    from expand.heal import HealOptions
    from expand.heal.loss import make_step
    from expand.heal.optimizer import make_optimizer
    from expand.heal.student import make_student
    from expand.model import head_weight
    from expand.surgery.plan import LayerPlan, Slot

    plan = None if layer_ids is None else LayerPlan(tuple(Slot(int(i)) for i in layer_ids),
                                                    model.config.num_hidden_layers)
    options = HealOptions(batch_size=BATCH)
    student = make_student(model, plan, options)
    optimizer = make_optimizer(options, student)
    step = make_step(student, optimizer, options)
    tokens = jnp.zeros((BATCH, LENGTH), jnp.int32)
    teacher = (jnp.zeros((BATCH, LENGTH - 1, model.config.hidden_size), jnp.float32),
               head_weight(model.params, model.config))  # the teacher's hidden states and head (a teacher view)
    return lambda: step.lower(student.params, optimizer.init(student.params), tokens, teacher)


def decode_loop(model, layer_ids):
    """generate's compiled decoding loop (`_decode`) on a cache of LENGTH positions."""
    import jax
    import jax.numpy as jnp

    from expand.generate import _decode
    from expand.model import default_layer_ids

    config = model.config
    layer_ids = default_layer_ids(config) if layer_ids is None else jnp.asarray(layer_ids, jnp.int32)
    shape = (len(layer_ids), BATCH, config.num_key_value_heads, LENGTH, config.head_dim)
    cache = (jnp.zeros(shape), jnp.zeros(shape))
    tokens = jnp.zeros((BATCH,), jnp.int32)
    return lambda: _decode.lower(model.params, tokens, tokens, jnp.zeros(BATCH, bool), jnp.ones((BATCH, LENGTH), bool),
                                 cache, 0, jax.random.key(0), 1, jnp.zeros((0,), jnp.int32), config=config,
                                 layer_ids=layer_ids, slot_scales={}, temperature=0.0, top_p=1.0)


PROGRAMS = {"check forward": check_forward, "heal step": heal_step, "decode loop": decode_loop}


def compile_once(lower) -> tuple[float, float, int]:
    """One fresh lowering and compilation (JAX's caches cleared first): lower (s), compile (s), and the
    number of instructions in the optimized HLO."""
    import jax

    jax.clear_caches()
    start = time.perf_counter()
    lowered = lower()
    lowered_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    return lowered_s, compile_s, sum(1 for line in compiled.as_text().splitlines() if " = " in line)


def measure(points: dict, repeats: int, advance) -> dict:
    """points {name: lower}: one compilation of each first (warm-up, not counted), then `repeats` rounds
    over all points, the order reversed every other round so that a slow spell falls on every depth;
    per point the median lower and compile times (s), the compile range, and the HLO size."""
    for lower in points.values():
        compile_once(lower)
    runs = {name: [] for name in points}
    for round_ in range(repeats):
        for name in list(points)[:: 1 if round_ % 2 == 0 else -1]:
            runs[name].append(compile_once(points[name]))
            advance()
    out = {}
    for name, samples in runs.items():
        lowered, compiled, sizes = zip(*samples)
        out[name] = {"lower_s": round(statistics.median(lowered), 3), "compile_s": round(statistics.median(compiled), 3),
                     "compile_range_s": [round(min(compiled), 3), round(max(compiled), 3)],
                     "hlo_instructions": sizes[0]}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for program, series in results["programs"].items():
        for way, style in (("stored", "-o"), ("virtual", "--s")):
            points = series[way]
            ax.plot(SLOTS, [points[str(n)]["compile_s"] for n in SLOTS], style, label=f"{program}, {way}")
    ax.set_xscale("log")
    ax.set_xticks(SLOTS, [str(n) for n in SLOTS])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("slots (depth)")
    ax.set_ylabel("XLA compile time (s)")
    ax.set_title("Compile time against depth (tiny width; median of fresh compilations)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_repeats_option(parser, 3, "fresh compilations per point")
    args = parser.parse_args()
    import jax

    from expand.progress import progress_bar

    load_start = os.getloadavg()
    base = tiny_model(STORED_FOR_VIRTUAL)
    results = {"device": device_line(), "jax": jax.__version__, "config": TINY, "batch": BATCH, "length": LENGTH,
               "repeats": args.repeats, "programs": {}}
    lines, shares, ratios = [], {}, []
    with progress_bar("compiling", total=len(PROGRAMS) * len(SLOTS) * 2 * args.repeats) as advance:
        for program, build in PROGRAMS.items():
            points = {}
            for n in SLOTS:
                points[("stored", n)] = build(tiny_model(n), None)
                points[("virtual", n)] = build(base, np.arange(n) % STORED_FOR_VIRTUAL)
            measured = {}
            wall, others = timed_call(lambda: measured.update(measure(points, args.repeats, advance)))
            shares[program] = round(other_share([wall], [others]), 3)
            series = results["programs"][program] = {"stored": {}, "virtual": {}}
            for (way, n), point in measured.items():
                series[way][str(n)] = point
            for way, points in series.items():
                ratio = points[str(SLOTS[-1])]["compile_s"] / points[str(SLOTS[0])]["compile_s"]
                points["ratio_last_to_first"] = round(ratio, 3)
                ratios.append(ratio)
                cells = "  ".join(f"{n}: {points[str(n)]['compile_s']:.2f} s ({points[str(n)]['hlo_instructions']} HLO)"
                                  for n in SLOTS)
                lines.append(f"{program + ', ' + way:<24} {cells}  | {SLOTS[-1]}/{SLOTS[0]} = {ratio:.2f}x")
                print(lines[-1], flush=True)
    results["load_average"] = {"start": [round(x, 2) for x in load_start],
                               "end": [round(x, 2) for x in os.getloadavg()]}
    header = [f"device: {results['device']}",
              f"XLA compile time (median of {args.repeats} fresh compilations) against slots; tiny width "
              f"(hidden 64, vocab 256), batch {BATCH} x {LENGTH}; stored = N-layer model, virtual = 30-layer "
              f"model through an N-slot plan; load average {results['load_average']['start']} at start, "
              f"{results['load_average']['end']} at end", ""]
    worst = max(ratios)
    results["flat"] = worst <= FLAT
    lines += ["", f"largest {SLOTS[-1]}/{SLOTS[0]} ratio {worst:.2f}x: "
                  f"{'flat' if results['flat'] else 'NOT flat'} (flat means <= {FLAT}x)"]
    print(lines[-1])
    results["other_cpu_share"] = shares
    lines.append(f"other processes took at most {max(shares.values()):.1%} of the CPU while one program compiled")
    refuse_busy_run(shares)
    write_results("bench_compile", results, "\n".join(header + lines))
    plot(results, RESULTS / "bench_compile.png")
    if not results["flat"]:
        sys.exit(f"error: compile time grows with depth: {worst:.2f}x from {SLOTS[0]} to {SLOTS[-1]} slots")


if __name__ == "__main__":
    main()
