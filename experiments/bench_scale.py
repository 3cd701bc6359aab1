"""Bounded-memory surgery on disk: `expand depth` and `expand widen` on a random Llama-3.2-3B-shaped
checkpoint in bf16 (3.21 B parameters, 6.4 GB in 2 GB shards, written by experiments/synthetic.py), beside
the disk's raw copy speed and mergekit on the same depth recipe. The widening (exact mode, 3072 -> 3840
hidden, 30/10 heads, MLP 10240; 4.90 B parameters out) runs with the default random fill and with
`--fill zeros` (what the I/O alone costs); the output counts the normal draws the random fill makes (each
filled tensor draws its whole target shape) and how many of them it keeps (the new entries).

Settings (written into the output too):
  shard sizes  expand --max-shard-size 2GB (2e9 bytes). mergekit --out-shard-size 5B (its default) and
               2B: mergekit counts bytes (its help says parameters) and holds a whole shard in memory
               before writing it, so its peak RSS grows with the shard size; 2B is expand's 2e9 bytes.
  page cache   dropped before every run when this process may (root; `cold_cache` says whether it was),
               so every tool reads its source from the disk; wall time runs up to a finished `sync`, so the
               bytes are on the disk when the clock stops; throughput is bytes written / wall time.
  repeats      an uncounted warm-up round, then REPEATS rounds; in round r the runs go in their order
               rotated by r; medians with min and max are reported. Peak RSS is the child's (wait4).
  load         the 1/5/15-minute load average before and after: the machine may be shared.

The claim checked: peak RSS stays below one output shard plus the largest tensor (the bound; expand in
fact holds about one tensor in and one out, never a shard) and far below the checkpoint's size.

    python -m experiments.bench_scale [--repeats 3]
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

from experiments.bench_depth import MERGEKIT, mergekit_venv
from experiments.benchlib import (add_repeats_option, alternating, cache_dir, load_average, python_json,
                                  run_measured, spread, write_results)

CONFIG = Path(__file__).parent / "configs" / "llama-3.2-3b"
REPEATS = 3
SHARD = "2GB"
MERGEKIT_SHARDS = {"5B": "its default", "2B": "expand's 2e9 bytes"}
DEPTH_SLICES = [(0, 14), (7, 21), (14, 28)]  # 28 -> 42 layers, the overlapping-slice self-merge pattern
WIDTH = {"--hidden-size": 3840, "--num-heads": 30, "--num-kv-heads": 10, "--intermediate-size": 10240}


def prepare_source(out: str) -> None:
    """Write the random source checkpoint once (run in a child process)."""
    from expand.config import Config
    from experiments.synthetic import write_random_checkpoint

    if not Path(out).exists():
        config = Config.from_hf(json.loads((CONFIG / "config.json").read_text()))
        write_random_checkpoint(Path(out), config, "bfloat16", max_shard_size=SHARD)


def checkpoint_facts(directory: str) -> dict:
    """Bytes on disk, parameter count, largest tensor and largest shard of a checkpoint (child process)."""
    import math

    from expand.io.safetensors import CODE_DTYPES, SafetensorsSource

    source = SafetensorsSource(Path(directory))
    sizes = {n: math.prod(source.shape(n)) for n in source.names()}
    largest = max(sizes, key=sizes.get)
    files = sorted(Path(directory).glob("*.safetensors"))
    return {"bytes": sum(f.stat().st_size for f in files), "shards": len(files),
            "largest_shard_bytes": max(f.stat().st_size for f in files),
            "parameters": sum(sizes.values()), "largest_tensor": largest,
            "largest_tensor_bytes": sizes[largest] * CODE_DTYPES[source.dtype(largest)].itemsize}


def fill_draws() -> dict:
    """Normal draws of `expand widen`'s random fill in exact mode (child process): every tensor whose new
    entries take fill values (not norms, which take the mean gain, nor tensors that write the residual
    stream, which take zeros) draws its whole target shape (`expand.surgery.width._fill`) and keeps the
    draws at its new entries."""
    import math

    import numpy as np

    from expand.config import Config
    from expand.params import NORM, WRITES, axis_sizes, tensor_specs
    from expand.surgery.width import new_positions, width_plan

    config = Config.from_hf(json.loads((CONFIG / "config.json").read_text()))
    plan = width_plan(config, hidden_size=WIDTH["--hidden-size"], num_attention_heads=WIDTH["--num-heads"],
                      num_key_value_heads=WIDTH["--num-kv-heads"], intermediate_size=WIDTH["--intermediate-size"],
                      mode="exact")
    sizes, drawn, kept = axis_sizes(plan.config), 0, 0
    for spec in tensor_specs(plan.config):
        if spec.role in (NORM, WRITES):
            continue
        shape = tuple(sizes[a] for a in spec.axes)
        copies = plan.config.num_hidden_layers if spec.stacked else 1
        new = np.asarray(new_positions(spec.axes, set(spec.axes), plan.maps, shape))
        drawn += copies * math.prod(shape)
        kept += copies * int(new.sum())
    return {"drawn": drawn, "kept": kept}


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache; False where this process is not allowed to."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


FACTS = "from experiments import bench_scale; print(json.dumps(bench_scale.checkpoint_facts({!r})))"
SAME = "from experiments import bench_depth; print(json.dumps(bench_depth.same_tensors({!r}, {!r})))"


def cold_synced(command: list[str], out: Path, keep: bool = False, same_as: Path | None = None):
    """A run of `command` into an emptied `out`, from a dropped page cache (where allowed), timed up to a
    finished sync; then (untimed) the facts of what it wrote and, with `same_as`, whether its tensors equal
    that checkpoint's; `out` is removed afterwards unless `keep` (the disk holds one output at a time)."""
    def run() -> dict:
        shutil.rmtree(out, ignore_errors=True)
        cold = drop_page_cache()
        measured = run_measured(command)
        start = time.perf_counter()
        subprocess.run(["sync"], check=True)
        result = {"wall_s": round(measured["wall_s"] + time.perf_counter() - start, 2),
                  "peak_rss_mib": measured["peak_rss_mib"], "cold_cache": cold,
                  "output": python_json(FACTS.format(str(out)))}
        if same_as is not None:
            equal, count = python_json(SAME.format(str(same_as), str(out)))
            result["same_tensors"] = {"tensors_compared": count, "identical": equal}
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        return result
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_repeats_option(parser, REPEATS, "rounds, each tool once per round")
    args = parser.parse_args()
    source = cache_dir("scale-source") / "llama-3.2-3b-shape-random-bf16"
    python_json(f"from experiments import bench_scale; bench_scale.prepare_source({str(source)!r})")
    work = cache_dir("scale-outputs")
    src = python_json(FACTS.format(str(source)))
    draws = python_json("from experiments import bench_scale; print(json.dumps(bench_scale.fill_draws()))")
    recipe = {"merge_method": "passthrough", "dtype": "bfloat16",
              "slices": [{"sources": [{"model": str(source), "layer_range": [a, b]}]} for a, b in DEPTH_SLICES]}
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    spec = ",".join(f"{a}:{b}" for a, b in DEPTH_SLICES)
    expand_cli = [sys.executable, "-m", "expand.cli"]
    sizes = [str(x) for option in WIDTH.items() for x in option]
    depth_out, mergekit = work / "depth", mergekit_venv()
    runs = {
        "raw copy (cp -r)": cold_synced(["cp", "-r", str(source), str(work / "copy")], work / "copy"),
        f"expand depth {spec}": cold_synced(expand_cli + ["depth", str(source), str(depth_out), "--layer-spec",
                                                          spec, "--max-shard-size", SHARD], depth_out, keep=True),
        "expand widen 3072 -> 3840": cold_synced(expand_cli + ["widen", str(source), str(work / "widen"),
                                                               "--max-shard-size", SHARD] + sizes, work / "widen"),
        "expand widen 3072 -> 3840, zeros": cold_synced(expand_cli + ["widen", str(source), str(work / "zeros"),
                                                                      "--max-shard-size", SHARD, "--fill", "zeros"]
                                                        + sizes, work / "zeros"),
    }
    for size in MERGEKIT_SHARDS:  # after expand depth in the warm-up round; its output is kept to compare with
        out = work / f"mergekit-{size}"
        runs[f"mergekit depth {spec}, {size} shard"] = cold_synced(
            [str(mergekit), str(recipe_file), str(out), "--no-copy-tokenizer", "--out-shard-size", size], out,
            same_as=depth_out)
    results = {"device": python_json("from experiments import benchlib; print(json.dumps(benchlib.device_line()))"),
               "mergekit": MERGEKIT, "source": src, "random_fill_normal_draws": draws,
               "settings": {"expand_max_shard_size": SHARD, "mergekit_out_shard_size": MERGEKIT_SHARDS,
                            "page_cache": "dropped before every run (where allowed: see cold_cache)",
                            "wall": "up to a finished sync", "repeats": args.repeats,
                            "order": "an uncounted warm-up round, then rounds in the listed order rotated by r"},
               "load_average_before": load_average(), "runs": []}
    measured = alternating(runs, args.repeats)
    lines = [f"device: {results['device']}",
             f"source: random Llama-3.2-3B shape, bf16, {src['parameters'] / 1e9:.2f} B parameters, "
             f"{src['bytes'] / 1e9:.2f} GB in {src['shards']} shards; largest tensor {src['largest_tensor']} "
             f"{src['largest_tensor_bytes'] / 1e6:.0f} MB",
             f"settings: expand --max-shard-size {SHARD}; mergekit --out-shard-size {' and '.join(MERGEKIT_SHARDS)} "
             f"(bytes); page cache dropped before every run; wall up to a finished sync; a warm-up round, then "
             f"{args.repeats} rounds, order rotated each round",
             f"random fill: {draws['drawn'] / 1e9:.2f} B normal draws, {draws['kept'] / 1e9:.2f} B kept (new entries)",
             f"load average before (1/5/15 min): {results['load_average_before']}", "",
             f"{'run':40s} {'wall s: median (min-max)':>24s} {'written GB':>10s} {'GB/s':>5s} "
             f"{'peak RSS MB: median (min-max)':>30s} {'RSS/source':>10s} {'RSS/bound':>9s}"]
    for name, values in measured.items():
        written = values["output"][-1]
        bound = written["largest_shard_bytes"] + max(src["largest_tensor_bytes"], written["largest_tensor_bytes"])
        wall, rss = spread(values["wall_s"]), spread(values["peak_rss_mib"])
        peak = rss["median"] * 2**20
        row = {"run": name, **{k: v for k, v in values.items() if k != "output"}, "wall": wall, "rss": rss,
               "output": written,
               "written_gb_per_s": round(written["bytes"] / 1e9 / wall["median"], 3),
               "rss_over_source": round(peak / src["bytes"], 3), "rss_bound_bytes": bound,
               "rss_over_bound": round(rss["max"] * 2**20 / bound, 2)}
        results["runs"].append(row)
        lines.append(f"{name:40s} {wall['median']:7.1f} ({wall['min']:.1f}-{wall['max']:.1f}) "
                     f"{written['bytes'] / 1e9:10.2f} {row['written_gb_per_s']:5.2f} "
                     f"{peak / 1e6:10.0f} ({rss['min'] * 2**20 / 1e6:.0f}-{rss['max'] * 2**20 / 1e6:.0f}) "
                     f"{row['rss_over_source']:10.1%} {row['rss_over_bound']:9.2f}")
    for name, values in measured.items():
        for same in values.get("same_tensors", [])[-1:]:
            lines.append(f"{name} vs expand depth: {same['tensors_compared']} tensors compared (last round), "
                         f"identical in every round: {all(s['identical'] for s in values['same_tensors'])}")
    cold = all(all(c) for c in (measured[name].get("cold_cache", [True]) for name in measured))
    results["load_average_after"] = load_average()
    lines += ["", "GB/s: bytes written / median wall; RSS/source: median peak RSS / source bytes; RSS/bound: "
              "largest peak RSS / (one output shard + the largest tensor)",
              f"page cache dropped before each run: {cold}",
              f"load average after (1/5/15 min): {results['load_average_after']}"]
    shutil.rmtree(depth_out, ignore_errors=True)
    write_results("bench_scale", results, "\n".join(lines))


if __name__ == "__main__":
    main()
