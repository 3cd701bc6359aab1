"""The delete-one sweep of SmolLM2-135M (30 variants) two ways, in one run, on the same tokens:

- expand: `expand.ablate(model, "delete-one", tokens)`: one copy of the weights, one compiled forward per
  variant length, nothing written;
- mergekit then transformers: for each variant a passthrough recipe, `mergekit-yaml` writes the
  checkpoint, transformers loads it and computes its logits, and the same metrics (loss, mean KL to the
  base, top-1 agreement) are computed with torch.

Each way runs in its own child process, timed from start to exit (model loading included). The two ways'
metrics are compared variant by variant, so the speed is for the same answer. A third child, untimed as a
whole, splits expand's time into its parts (`expand_costs`) and so bounds the ratio this machine allows.

    python experiments/bench_ablate.py [--num-sequences 1] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_depth import mergekit_venv, sources  # noqa: E402
from benchlib import cache_dir, python_json, run_measured, write_results  # noqa: E402


def delete_one_recipe(model: str, layer: int, num_layers: int) -> dict:
    ranges = [r for r in ([0, layer], [layer + 1, num_layers]) if r[1] > r[0]]
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": model, "layer_range": r}]} for r in ranges]}


def write_tokens(path: Path, num_sequences: int, seq_len: int) -> None:
    """The first num_sequences x seq_len tokens of the Python Language Reference (expand.text)."""
    import numpy as np

    import expand
    from expand.text import python_reference_text, token_batch

    np.save(path, token_batch(expand.load("smollm2"), python_reference_text(), seq_len, num_sequences))


def expand_way(source: str, tokens_file: str, out: str) -> None:
    import numpy as np

    import expand
    from expand.ablate import ablate

    table = ablate(expand.load(source), "delete-one", np.load(tokens_file))
    Path(out).write_text(json.dumps({"rows": table.rows, "base": table.base, "compilations": table.compilations}))


def expand_costs(source: str, tokens_file: str, out: str) -> None:
    """Where expand's time goes, measured in a child of its own (not part of the timed run): import and load,
    the eval set (the base's one forward with hidden states), the base row (its plan resumes after the
    last layer, so it is the lm_head and the comparison with the base alone; timed once compiled), and each
    delete-one variant in turn (the first includes the compilation of their length)."""
    start = time.perf_counter()
    import jax
    import numpy as np

    import expand
    from expand.ablate import eval_set, evaluate, fixed_variants, parse_sweep, plan_of

    model = expand.load(source)
    costs = {"import_and_load_s": time.perf_counter() - start}
    start = time.perf_counter()
    evals = eval_set(model, np.load(tokens_file))
    jax.block_until_ready(evals.base.hidden)
    costs["eval_set_s"] = time.perf_counter() - start
    n = model.config.num_hidden_layers
    evaluate(model, evals, plan_of(range(n), n))
    start = time.perf_counter()
    evaluate(model, evals, plan_of(range(n), n))
    costs["head_and_compare_s"] = time.perf_counter() - start
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-sequences", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    mergekit = mergekit_venv()
    source = next(iter(sources().values()))[0]  # SmolLM2 as an fp32 HF directory
    work = cache_dir("ablate")
    tokens_file, ours, theirs = work / "tokens.npy", work / "expand.json", work / "mergekit.json"
    python_json(f"import bench_ablate; bench_ablate.write_tokens({str(tokens_file)!r}, {args.num_sequences}, "
                f"{args.seq_len}); print('null')")
    device = python_json("import benchlib; print(json.dumps(benchlib.device_line()))")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_ablate; bench_ablate.{{}}"
    expand_run = run_measured([sys.executable, "-c", code.format(
        f"expand_way({str(source)!r}, {str(tokens_file)!r}, {str(ours)!r})")])
    costs_file = work / "expand_costs.json"
    run_measured([sys.executable, "-c", code.format(
        f"expand_costs({str(source)!r}, {str(tokens_file)!r}, {str(costs_file)!r})")])
    costs = json.loads(costs_file.read_text())
    mergekit_run = run_measured([sys.executable, "-c", code.format(
        f"mergekit_way({str(source)!r}, {str(tokens_file)!r}, {str(theirs)!r}, {str(mergekit)!r}, {str(work)!r})")])
    a, b = json.loads(ours.read_text()), json.loads(theirs.read_text())
    agreement = {m: max(abs(x[m] - y[m]) for x, y in zip(a["rows"], b["rows"])) for m in ("loss", "mean_kl", "top1")}
    speedup = mergekit_run["wall_s"] / expand_run["wall_s"]
    variants = len(a["rows"])
    # expand's side if no variant ran a single layer: every variant (and the base row) still pays the lm_head
    # and the comparison with the base
    floor_s = costs["import_and_load_s"] + costs["eval_set_s"] + (variants + 1) * costs["head_and_compare_s"]
    results = {"device": device, "sweep": "delete-one", "variants": variants,
               "tokens": [args.num_sequences, args.seq_len], "expand": expand_run | {"compilations": a["compilations"]},
               "mergekit_then_transformers": mergekit_run | {k: round(b[k], 2) for k in ("mergekit_s", "load_and_eval_s")},
               "speedup": round(speedup, 1), "max_metric_difference": agreement,
               "expand_costs": costs | {"no_layers_floor_s": floor_s,
                                        "best_possible_speedup": mergekit_run["wall_s"] / floor_s}}
    lines = [f"device: {device}", f"delete-one sweep of SmolLM2-135M-Instruct, {variants} variants, "
             f"{args.num_sequences} x {args.seq_len} tokens of the Python Language Reference", "",
             f"expand (one process, {a['compilations']} compilations)       {expand_run['wall_s']:8.1f} s  "
             f"peak RSS {expand_run['peak_rss_mib']:.0f} MiB",
             f"mergekit-yaml + transformers, per variant       {mergekit_run['wall_s']:8.1f} s  "
             f"(mergekit {b['mergekit_s']:.1f} s, load + eval {b['load_and_eval_s']:.1f} s)",
             f"expand is {speedup:.1f}x faster; largest difference between the two ways' metrics: "
             + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items()), "",
             f"expand's time by part (a separate run): import + load {costs['import_and_load_s']:.1f} s, base "
             f"forward with hidden states {costs['eval_set_s']:.1f} s, delete-one variant "
             f"{costs['mean_variant_after_compile_s']:.2f} s on average once compiled (first "
             f"{costs['variant_s'][0]:.2f} s), of which lm_head + comparison with the base "
             f"{costs['head_and_compare_s']:.2f} s; transformers load + eval {b['load_and_eval_s'] / variants:.2f} s "
             "per variant",
             f"with no layer run at all expand's side would still take {floor_s:.1f} s: at most "
             f"{mergekit_run['wall_s'] / floor_s:.1f}x on this machine"]
    print("\n".join(lines))
    write_results("bench_ablate", results, "\n".join(lines))


if __name__ == "__main__":
    main()
