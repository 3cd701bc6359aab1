"""The delete-one sweep of SmolLM2-135M (30 variants) two ways, in one run, on the same tokens:

- expand: `expand.ablate(model, "delete-one", tokens)`: one copy of the weights, one compiled forward per
  variant length, nothing written;
- mergekit then transformers: for each variant a passthrough recipe, `mergekit-yaml` writes the
  checkpoint, transformers loads it and computes its logits, and the same metrics (loss, mean KL to the
  base, top-1 agreement) are computed with torch.

Each way runs in its own child process, timed from start to exit (model loading included). The two ways'
metrics are compared variant by variant, so the speed is for the same answer. A third child, untimed as a
whole, splits expand's time into its parts (`expand_costs`): the fixed cost every variant pays whatever
layers it runs (the final norm, the lm_head and the comparison with the base over the 49,152-token
vocabulary: the base row, which resumes after the last layer) against the bare lm_head matmul on the same
shapes, timed alternately in the same process (median of --repeats each).

Run from the repository root (the machine's load average before and after is recorded: on a shared machine
the timings are only as quiet as it was):

    python -m experiments.bench_ablate [--num-sequences 1] [--seq-len 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from experiments.benchlib import add_repeats_option, cache_dir, run_measured, write_results

ROOT = Path(__file__).parents[1]
FIXED_COST_TARGET = 1.5  # per-variant fixed cost / bare lm_head matmul


def child(name: str, *args) -> list[str]:
    """The command that runs `name(*args)` of this module in a child process (from the repository root)."""
    return [sys.executable, "-m", "experiments.bench_ablate", "--child", name, *map(str, args)]


def run_child(name: str, *args) -> None:
    done = subprocess.run(child(name, *args), cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")


def mergekit_executable() -> Path:
    """mergekit-yaml 0.1.5 of this environment (the test extras install it)."""
    exe = Path(sys.executable).parent / "mergekit-yaml"
    if not exe.exists():
        sys.exit("mergekit-yaml is not installed here: pip install -e '.[test]' (mergekit 0.1.5)")
    return exe


def delete_one_recipe(model: str, layer: int, num_layers: int) -> dict:
    ranges = [r for r in ([0, layer], [layer + 1, num_layers]) if r[1] > r[0]]
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": model, "layer_range": r}]} for r in ranges]}


# ---- children ----------------------------------------------------------------------------------------------


def prepare(source: str, tokens_file: str, num_sequences: str, seq_len: str, device_file: str) -> None:
    """SmolLM2 as an fp32 HF directory (once), the eval tokens (the first num_sequences x seq_len tokens of
    the Python Language Reference) and the device line."""
    import numpy as np

    import expand
    from experiments.benchlib import device_line
    from expand.text import shipped_text, token_batch

    model = expand.load("smollm2")
    if not Path(source).exists():
        expand.save(source, model.config, model.params, tokenizer_from=model)
    np.save(tokens_file, token_batch(model, shipped_text("python-reference"), int(seq_len), int(num_sequences)))
    Path(device_file).write_text(json.dumps(device_line()))


def expand_way(source: str, tokens_file: str, out: str) -> None:
    import numpy as np

    import expand
    from expand.ablate import ablate

    table = ablate(expand.load(source), "delete-one", np.load(tokens_file))
    Path(out).write_text(json.dumps({"rows": table.rows, "base": table.base, "compilations": table.compilations}))


def expand_costs(source: str, tokens_file: str, out: str, repeats: str) -> None:
    """Where expand's time goes: import and load, the eval set (the base's one forward with hidden states),
    the fixed cost per variant (the base row: final norm, lm_head and comparison with the base) against the
    bare lm_head matmul (B, T, d) x (d, V) at the forward's precision, alternately, and each delete-one
    variant in turn (the first includes the compilation of their length)."""
    start = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import expand
    from expand.ablate import eval_set, evaluate, fixed_variants, parse_sweep, plan_of

    model = expand.load(source)
    costs = {"import_and_load_s": time.perf_counter() - start}
    start = time.perf_counter()
    evals = eval_set(model, np.load(tokens_file))
    jax.block_until_ready(evals.base.hidden)
    costs["eval_set_s"] = time.perf_counter() - start
    n, config = model.config.num_hidden_layers, model.config
    base = plan_of(range(n), n)
    head = model.params.get("lm_head.weight", model.params["embed_tokens.weight"].T)
    normed = jax.random.normal(jax.random.key(0), (*evals.batches[0].shape, config.hidden_size), jnp.float32)
    matmul = jax.jit(lambda h, w: jnp.einsum("btd,dv->btv", h, w, precision="highest"))
    timed = {"lm_head_matmul": lambda: matmul(normed, head).block_until_ready(),
             "fixed_cost_per_variant": lambda: evaluate(model, evals, base)}
    samples = {name: [] for name in timed}
    for name, run in timed.items():  # compile both first
        run()
    for _ in range(int(repeats)):
        for name, run in timed.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in samples.items()}
    costs |= {f"{name}_s": value for name, value in median.items()} | {"samples_s": samples}
    costs["fixed_cost_over_matmul"] = median["fixed_cost_per_variant"] / median["lm_head_matmul"]
    variants = []
    for _, plan, _ in fixed_variants(parse_sweep("delete-one", n), n):
        start = time.perf_counter()
        evaluate(model, evals, plan)
        variants.append(time.perf_counter() - start)
    costs |= {"variant_s": variants, "mean_variant_after_compile_s": float(np.mean(variants[1:]))}
    Path(out).write_text(json.dumps(costs))


def mergekit_way(source: str, tokens_file: str, out: str, mergekit: str, work: str) -> None:
    """One checkpoint per variant with mergekit-yaml, evaluated with transformers; times per stage."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    def logits_of(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(torch.as_tensor(tokens)).logits.float()

    tokens = np.load(tokens_file).astype(np.int64)
    base_log = torch.log_softmax(logits_of(source), -1)
    num_layers = json.loads((Path(source) / "config.json").read_text())["num_hidden_layers"]
    rows, times = [], {"mergekit_s": 0.0, "load_and_eval_s": 0.0}
    for layer in range(num_layers):
        variant = Path(work) / "variant"
        shutil.rmtree(variant, ignore_errors=True)
        recipe = Path(work) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(delete_one_recipe(source, layer, num_layers)))
        start = time.perf_counter()
        subprocess.run([mergekit, str(recipe), str(variant), "--no-copy-tokenizer"], check=True, capture_output=True)
        times["mergekit_s"] += time.perf_counter() - start
        start = time.perf_counter()
        log_q = torch.log_softmax(logits_of(variant), -1)
        kl = (base_log.exp() * (base_log - log_q)).sum(-1).clamp_min(0)
        nll = -log_q[:, :-1].gather(-1, torch.as_tensor(tokens)[:, 1:, None])[..., 0]
        rows.append({"name": f"delete {layer}", "loss": float(nll.mean()), "mean_kl": float(kl.mean()),
                     "top1": float((base_log.argmax(-1) == log_q.argmax(-1)).float().mean())})
        times["load_and_eval_s"] += time.perf_counter() - start
    Path(out).write_text(json.dumps({"rows": rows, **times}))


CHILDREN = {f.__name__: f for f in (prepare, expand_way, expand_costs, mergekit_way)}


# ---- the run -----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-sequences", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    add_repeats_option(parser, 7, "alternate timings of the fixed cost and the matmul")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child[0]](*args.child[1:])
        return
    load_before = [round(x, 2) for x in os.getloadavg()]
    mergekit = mergekit_executable()
    work = cache_dir("ablate")
    source, tokens_file, device_file = work / "smollm2-fp32", work / "tokens.npy", work / "device.json"
    ours, theirs, costs_file = work / "expand.json", work / "mergekit.json", work / "expand_costs.json"
    run_child("prepare", source, tokens_file, args.num_sequences, args.seq_len, device_file)
    device = json.loads(device_file.read_text())
    expand_run = run_measured(child("expand_way", source, tokens_file, ours))
    run_measured(child("expand_costs", source, tokens_file, costs_file, args.repeats))
    costs = json.loads(costs_file.read_text())
    mergekit_run = run_measured(child("mergekit_way", source, tokens_file, theirs, mergekit, work))
    load_after = [round(x, 2) for x in os.getloadavg()]
    a, b = json.loads(ours.read_text()), json.loads(theirs.read_text())
    agreement = {m: max(abs(x[m] - y[m]) for x, y in zip(a["rows"], b["rows"])) for m in ("loss", "mean_kl", "top1")}
    speedup = mergekit_run["wall_s"] / expand_run["wall_s"]
    variants = len(a["rows"])
    # expand's side if no variant ran a single layer: every variant (and the base row) still pays the fixed cost
    floor_s = costs["import_and_load_s"] + costs["eval_set_s"] + (variants + 1) * costs["fixed_cost_per_variant_s"]
    ratio = costs["fixed_cost_over_matmul"]
    from expand.text import shipped_text, text_sha256

    results = {"device": device, "load_average_before": load_before, "load_average_after": load_after,
               "texts": {"python-reference": text_sha256(shipped_text("python-reference"))}, "sweep": "delete-one", "variants": variants, "tokens": [args.num_sequences, args.seq_len],
               "expand": expand_run | {"compilations": a["compilations"]},
               "mergekit_then_transformers": mergekit_run | {k: round(b[k], 2) for k in ("mergekit_s", "load_and_eval_s")},
               "speedup": round(speedup, 1), "max_metric_difference": agreement,
               "fixed_cost_target": FIXED_COST_TARGET,
               "expand_costs": costs | {"no_layers_floor_s": floor_s,
                                        "best_possible_speedup": mergekit_run["wall_s"] / floor_s}}
    lines = [f"device: {device}", f"load average (1, 5, 15 min) before {load_before}, after {load_after}",
             f"delete-one sweep of SmolLM2-135M-Instruct, {variants} variants, {args.num_sequences} x {args.seq_len} "
             "tokens of the Python Language Reference", "",
             f"expand (one process, {a['compilations']} compilations)       {expand_run['wall_s']:8.1f} s  "
             f"peak RSS {expand_run['peak_rss_mib']:.0f} MiB",
             f"mergekit-yaml + transformers, per variant       {mergekit_run['wall_s']:8.1f} s  "
             f"(mergekit {b['mergekit_s']:.1f} s, load + eval {b['load_and_eval_s']:.1f} s)",
             f"expand is {speedup:.1f}x faster; largest difference between the two ways' metrics: "
             + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items()), "",
             f"fixed cost per variant (final norm, lm_head, comparison with the base; median of {args.repeats}) "
             f"{costs['fixed_cost_per_variant_s']:.3f} s against the bare lm_head matmul "
             f"{costs['lm_head_matmul_s']:.3f} s in the same run: {ratio:.2f}x (target <= {FIXED_COST_TARGET}x: "
             f"{'met' if ratio <= FIXED_COST_TARGET else 'not met'})",
             f"expand's time by part (a separate run): import + load {costs['import_and_load_s']:.1f} s, base "
             f"forward with hidden states {costs['eval_set_s']:.1f} s, delete-one variant "
             f"{costs['mean_variant_after_compile_s']:.2f} s on average once compiled (first "
             f"{costs['variant_s'][0]:.2f} s); transformers load + eval {b['load_and_eval_s'] / variants:.2f} s "
             "per variant",
             f"with no layer run at all expand's side would still take {floor_s:.1f} s: at most "
             f"{mergekit_run['wall_s'] / floor_s:.1f}x on this machine"]
    print("\n".join(lines))
    write_results("bench_ablate", results, "\n".join(lines))


if __name__ == "__main__":
    main()
