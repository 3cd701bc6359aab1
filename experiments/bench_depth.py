"""`expand depth` vs `mergekit-yaml` 0.1.5 on the same passthrough recipe and source: wall time and peak RSS
of each whole process (start-up, imports, reading, planning, writing), and a check that both wrote the same
tensors.

Sources: the embedded SmolLM2 converted to an fp32 HF directory (recipe: the Llama-3-120B pattern scaled to
30 layers, experiments/recipes/smollm2-120b-pattern.yaml) and a random Llama-3.2-1B-shaped model in bf16
(16 layers -> 24, slices 0-8, 4-12, 8-16).

Settings (written into the output too):
  shard sizes  expand at its default --max-shard-size 2GB (2e9 bytes). mergekit at its default
               --out-shard-size 5B and at 2B: mergekit counts bytes (its help says parameters), so 5B is a
               5e9-byte shard, larger than either output here, and mergekit keeps every output tensor in
               memory until it writes the one shard at the end; 2B is expand's 2e9 bytes.
  page cache   warm: an uncounted warm-up round reads the sources first; nothing is dropped.
  repeats      REPEATS counted rounds after the warm-up; in round r the three runs go in their order rotated
               by r (each is first once); medians with min and max are reported.
  load         the 1/5/15-minute load average before and after: the machine may be shared.

    python -m experiments.bench_depth [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from experiments.benchlib import (add_repeats_option, alternating, cache_dir, load_average, python_json,
                                  run_measured, spread, write_results)

MERGEKIT = "mergekit==0.1.5"
RECIPES = Path(__file__).parent / "recipes"
REPEATS = 3
EXPAND_SHARD = "2GB"
MERGEKIT_SHARDS = {"mergekit (5B shard, its default)": "5B", "mergekit (2B shard)": "2B"}


def mergekit_venv() -> Path:
    """mergekit-yaml 0.1.5: this environment's (the test extras install it), else one installed (with
    torch==2.13.0) into its own venv under the cache on first use."""
    here = Path(sys.executable).parent / "mergekit-yaml"
    if here.exists() and python_json("from importlib.metadata import version; "
                                     "print(json.dumps(version('mergekit')))") == "0.1.5":
        return here
    venv = cache_dir("mergekit-0.1.5")
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        print(f"installing {MERGEKIT} into {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", MERGEKIT], check=True)
    return exe


def prepare_sources(smol: Path, big: Path) -> None:
    """Write the two source checkpoints once (run in a child process: see benchlib.run_measured)."""
    import expand
    from experiments.synthetic import LLAMA_1B, write_random_checkpoint

    smol, big = Path(smol), Path(big)
    if not smol.exists():
        model = expand.load("smollm2")
        expand.save(smol, *model, tokenizer_from=model)
    if not big.exists():
        write_random_checkpoint(big, expand.Config.from_hf(LLAMA_1B), "bfloat16", max_shard_size="1GB")


def sources() -> dict[str, tuple[Path, dict]]:
    """name -> (checkpoint dir, recipe dict with the model path filled in)."""
    root = cache_dir("depth-sources")
    smol, big = root / "smollm2-fp32", root / "random-1b-bf16"
    python_json(f"from experiments import bench_depth; bench_depth.prepare_sources({str(smol)!r}, {str(big)!r})")
    smol_recipe = yaml.safe_load((RECIPES / "smollm2-120b-pattern.yaml").read_text())
    for s in smol_recipe["slices"]:
        s["sources"][0]["model"] = str(smol)
    big_recipe = {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": str(big), "layer_range": [a, a + 8]}]} for a in (0, 4, 8)]}
    return {"smollm2-135m fp32 (30 -> 50 layers)": (smol, smol_recipe),
            "random llama 1.2b bf16 (16 -> 24 layers)": (big, big_recipe)}


def same_tensors(ours: Path, theirs: Path) -> tuple[bool, int]:
    """Every tensor mergekit wrote equals expand's (run in a child process)."""
    import numpy as np

    from expand.io.safetensors import SafetensorsSource

    a, b = SafetensorsSource(Path(ours)), SafetensorsSource(Path(theirs))
    names = b.names()
    extra = a.names() - names
    if extra - {"lm_head.weight"}:
        return False, 0
    equal = all(np.array_equal(a.read(n), b.read(n)) for n in sorted(names))
    return bool(equal and names <= a.names()), len(names)


def fresh(command: list[str], out: Path):
    """A run of `command` into an emptied `out` (mergekit writes into an existing directory)."""
    def run() -> dict:
        shutil.rmtree(out, ignore_errors=True)
        return run_measured(command)
    return run


def output_facts(directory: Path) -> dict:
    files = sorted(directory.glob("*.safetensors"))
    return {"bytes": sum(f.stat().st_size for f in files), "shards": len(files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_repeats_option(parser, REPEATS, "rounds, each tool once per round")
    args = parser.parse_args()
    mergekit = mergekit_venv()
    work = cache_dir("depth-outputs")
    results = {"device": python_json("from experiments import benchlib; print(json.dumps(benchlib.device_line()))"),
               "mergekit": MERGEKIT,
               "settings": {"expand_max_shard_size": EXPAND_SHARD,
                            "mergekit_out_shard_size": MERGEKIT_SHARDS,
                            "page_cache": "warm (an uncounted warm-up round first; nothing dropped)",
                            "repeats": args.repeats,
                            "order": "alternating: round r runs the tools in their listed order rotated by r",
                            "timed": "each whole process: start-up, imports, read, plan, write"},
               "load_average_before": load_average(), "runs": []}
    lines = [f"device: {results['device']}",
             f"settings: expand --max-shard-size {EXPAND_SHARD}; mergekit --out-shard-size "
             f"{' and '.join(MERGEKIT_SHARDS.values())} (bytes); warm page cache after a warm-up round; "
             f"{args.repeats} rounds, order rotated each round; whole processes timed",
             f"load average before (1/5/15 min): {results['load_average_before']}", "",
             f"{'source':42s} {'tool':33s} {'wall s: median (min-max)':>26s} {'peak RSS MiB: median (min-max)':>32s}"]
    for name, (source, recipe) in sources().items():
        recipe_file = work / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe))
        outs = {"expand": work / "expand-out", **{tool: work / f"mergekit-out-{size}"
                                                  for tool, size in MERGEKIT_SHARDS.items()}}
        runs = {"expand": fresh([sys.executable, "-m", "expand.cli", "depth", str(source), str(outs["expand"]),
                                 "--recipe", str(recipe_file), "--max-shard-size", EXPAND_SHARD, "--force"],
                                outs["expand"])}
        for tool, size in MERGEKIT_SHARDS.items():
            runs[tool] = fresh([str(mergekit), str(recipe_file), str(outs[tool]), "--no-copy-tokenizer",
                                "--out-shard-size", size], outs[tool])
        measured = alternating(runs, args.repeats)
        row = {"source": name, "source_bytes": sum(f.stat().st_size for f in source.glob("*.safetensors")),
               "tools": {}}
        for tool, values in measured.items():
            row["tools"][tool] = values | {"wall": spread(values["wall_s"]), "rss": spread(values["peak_rss_mib"]),
                                           "output": output_facts(outs[tool])}
            w, m = row["tools"][tool]["wall"], row["tools"][tool]["rss"]
            lines.append(f"{name:42s} {tool:33s} {w['median']:9.2f} ({w['min']:.2f}-{w['max']:.2f})"
                         f"       {m['median']:9.0f} ({m['min']:.0f}-{m['max']:.0f})")
        for tool in MERGEKIT_SHARDS:
            equal, count = python_json(f"from experiments import bench_depth; print(json.dumps("
                                       f"bench_depth.same_tensors({str(outs['expand'])!r}, {str(outs[tool])!r})))")
            ours, theirs = row["tools"]["expand"], row["tools"][tool]
            wall_ratio = round(theirs["wall"]["median"] / ours["wall"]["median"], 2)
            rss_ratio = round(ours["rss"]["median"] / theirs["rss"]["median"], 3)
            theirs |= {"tensors_compared": count, "identical_to_expand": equal,
                       "median_wall_over_expand": wall_ratio, "expand_median_rss_over_it": rss_ratio}
            lines.append(f"{'':42s} {tool}'s median wall / expand's: {wall_ratio}; expand's median peak RSS / "
                         f"its: {rss_ratio:.0%}; {count} tensors compared, identical: {equal}")
        results["runs"].append(row)
        print("\n".join(lines[-5:]), flush=True)
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    results["load_average_after"] = load_average()
    lines += ["", f"load average after (1/5/15 min): {results['load_average_after']}"]
    write_results("bench_depth", results, "\n".join(lines))


if __name__ == "__main__":
    main()
