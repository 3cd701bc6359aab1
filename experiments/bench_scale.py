"""Bounded-memory surgery on disk: `expand depth` and `expand widen` on a random Llama-3.2-3B-shaped
checkpoint in bf16 (3.21 B parameters, 6.4 GB in 2 GB shards, written by experiments/synthetic.py), beside
the disk's raw copy speed and mergekit on the same depth recipe, all measured in one run. The widening
(exact mode, 3072 -> 3840 hidden, 30/10 heads, MLP 10240; 4.90 B parameters out) runs twice: with the
default random fill (1.7 B new normal draws, compute-bound on a small CPU) and with `--fill zeros`
(what the I/O alone costs).

Each command runs in a child process; its wall time includes a `sync` afterwards, so the bytes are on the
disk when the clock stops, and throughput is bytes written / wall time. Peak RSS is the child's (wait4).
Before each command the page cache is dropped when the process may do so (root), so every tool reads its
source from the disk; `cold_cache` in the output says whether that happened.

The claim checked: peak RSS stays below one output shard plus the largest tensor (the bound; expand in
fact holds about one tensor in and one out, never a shard) and far below the checkpoint's size.

    python experiments/bench_scale.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_depth import MERGEKIT, mergekit_venv  # noqa: E402
from benchlib import cache_dir, python_json, run_measured, write_results  # noqa: E402

CONFIG = Path(__file__).parent / "configs" / "llama-3.2-3b"
REPEATS = 2  # a shared disk's speed varies from run to run: the fastest of REPEATS is reported
SHARD = "2GB"
# mergekit's --out-shard-size counts bytes (its help says parameters): "1B" gives it 1 GB shards, which it
# buffers whole in memory before writing, so its peak RSS here is lower than with expand's 2 GB shards.
MERGEKIT_SHARD = "1B"
DEPTH_SLICES = [(0, 14), (7, 21), (14, 28)]  # 28 -> 42 layers, the overlapping-slice self-merge pattern
WIDTH = {"--hidden-size": 3840, "--num-heads": 30, "--num-kv-heads": 10, "--intermediate-size": 10240}


def prepare_source(out: str) -> None:
    """Write the random source checkpoint once (run in a child process)."""
    from synthetic import write_random_checkpoint

    from expand.config import Config

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


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache; False where this process is not allowed to."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measured_with_sync(command: list[str], out: Path) -> dict:
    """Run `command` REPEATS times, each from a cold cache (where allowed) into a fresh `out`, timed up to a
    finished sync. Returns the fastest wall time, every wall time, and the largest peak RSS."""
    walls, peaks, cold = [], [], True
    for _ in range(REPEATS):
        shutil.rmtree(out, ignore_errors=True)
        cold &= drop_page_cache()
        run = run_measured(command)
        start = time.perf_counter()
        subprocess.run(["sync"], check=True)
        walls.append(round(run["wall_s"] + time.perf_counter() - start, 2))
        peaks.append(run["peak_rss_mib"])
    return {"wall_s": min(walls), "walls_s": walls, "peak_rss_mib": max(peaks), "cold_cache": cold}


def main() -> None:
    source = cache_dir("scale-source") / "llama-3.2-3b-shape-random-bf16"
    python_json(f"import bench_scale; bench_scale.prepare_source({str(source)!r})")
    work = cache_dir("scale-outputs")
    src = python_json(f"import bench_scale; print(json.dumps(bench_scale.checkpoint_facts({str(source)!r})))")
    recipe = {"merge_method": "passthrough", "dtype": "bfloat16",
              "slices": [{"sources": [{"model": str(source), "layer_range": [a, b]}]} for a, b in DEPTH_SLICES]}
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    spec = ",".join(f"{a}:{b}" for a, b in DEPTH_SLICES)
    expand_cli = [sys.executable, "-m", "expand.cli"]
    sizes = [str(x) for option in WIDTH.items() for x in option]
    commands = {
        "raw copy (cp -r)": (["cp", "-r", str(source), str(work / "copy")], work / "copy"),
        f"expand depth {spec}": (expand_cli + ["depth", str(source), str(work / "depth"), "--layer-spec", spec,
                                               "--max-shard-size", SHARD], work / "depth"),
        "expand widen 3072 -> 3840": (expand_cli + ["widen", str(source), str(work / "widen"), "--max-shard-size",
                                                    SHARD] + sizes, work / "widen"),
        "expand widen 3072 -> 3840, zeros": (expand_cli + ["widen", str(source), str(work / "widen-zeros"),
                                                           "--max-shard-size", SHARD, "--fill", "zeros"] + sizes,
                                             work / "widen-zeros"),
        f"mergekit depth {spec}": ([str(mergekit_venv()), str(recipe_file), str(work / "mergekit"),
                                    "--no-copy-tokenizer", "--out-shard-size", MERGEKIT_SHARD], work / "mergekit"),
    }
    results = {"device": python_json("import benchlib; print(json.dumps(benchlib.device_line()))"),
               "mergekit": MERGEKIT, "source": src, "runs": []}
    lines = [f"device: {results['device']}",
             f"source: random Llama-3.2-3B shape, bf16, {src['parameters'] / 1e9:.2f} B parameters, "
             f"{src['bytes'] / 1e9:.2f} GB in {src['shards']} shards; largest tensor {src['largest_tensor']} "
             f"{src['largest_tensor_bytes'] / 1e6:.0f} MB", "",
             f"{'run':34s} {'wall s':>7s} {'written GB':>10s} {'GB/s':>6s} {'peak RSS MB':>11s} "
             f"{'RSS/source':>10s} {'RSS/bound':>9s}"]
    for name, (command, out) in commands.items():
        run = measured_with_sync(command, out)
        written = python_json(f"import bench_scale; print(json.dumps(bench_scale.checkpoint_facts({str(out)!r})))")
        bound = written["largest_shard_bytes"] + max(src["largest_tensor_bytes"], written["largest_tensor_bytes"])
        peak = run["peak_rss_mib"] * 2**20
        row = {"run": name, **run, "output": written,
               "written_gb_per_s": round(written["bytes"] / 1e9 / run["wall_s"], 3),
               "rss_over_source": round(peak / src["bytes"], 3), "rss_bound_bytes": bound,
               "rss_over_bound": round(peak / bound, 2)}
        results["runs"].append(row)
        lines.append(f"{name:34s} {run['wall_s']:7.1f} {written['bytes'] / 1e9:10.2f} {row['written_gb_per_s']:6.2f} "
                     f"{peak / 1e6:11.0f} {row['rss_over_source']:10.1%} {row['rss_over_bound']:9.2f}")
        print(lines[-1], flush=True)
    equal, count = python_json("import bench_depth; print(json.dumps(bench_depth.same_tensors("
                               f"{str(work / 'depth')!r}, {str(work / 'mergekit')!r})))")
    results["depth_equals_mergekit"] = {"tensors_compared": count, "identical": equal}
    lines += ["", f"wall: fastest of {REPEATS}, up to a finished sync; GB/s: bytes written / wall; "
              "bound: one output shard plus the largest tensor",
              f"expand depth vs mergekit: {count} tensors compared, identical: {equal}",
              f"page cache dropped before each run: {all(r['cold_cache'] for r in results['runs'])}"]
    for out in {out for _, out in commands.values()}:
        shutil.rmtree(out, ignore_errors=True)
    write_results("bench_scale", results, "\n".join(lines))


if __name__ == "__main__":
    main()
