"""`expand depth` vs `mergekit-yaml` on the same passthrough recipe and source: wall time and peak RSS of
each, measured in one run, and a check that both wrote the same tensors.

Sources: the embedded SmolLM2 converted to an fp32 HF directory (recipe: the Llama-3-120B pattern scaled to
30 layers, experiments/recipes/smollm2-120b-pattern.yaml) and a random Llama-3.2-1B-shaped model in bf16
(16 layers -> 24, slices 0-8, 4-12, 8-16). mergekit 0.1.5 is installed (with torch==2.13.0) into its own
venv under the cache on first use.

    python experiments/bench_depth.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import cache_dir, python_json, run_measured, write_results  # noqa: E402

MERGEKIT = "mergekit==0.1.5"
RECIPES = Path(__file__).parent / "recipes"


def mergekit_venv() -> Path:
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
    from synthetic import LLAMA_1B, write_random_checkpoint

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
    python_json(f"import bench_depth; bench_depth.prepare_sources({str(smol)!r}, {str(big)!r})")
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


def main() -> None:
    mergekit = mergekit_venv()
    work = cache_dir("depth-outputs")
    results = {"device": python_json("import benchlib; print(json.dumps(benchlib.device_line()))"),
               "mergekit": MERGEKIT, "runs": []}
    lines = [f"device: {results['device']}", "",
             f"{'source':42s} {'tool':9s} {'wall s':>8s} {'peak RSS MiB':>13s}"]
    for name, (source, recipe) in sources().items():
        recipe_file = work / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe))
        ours, theirs = work / "expand-out", work / "mergekit-out"
        expand_run = run_measured([sys.executable, "-m", "expand.cli", "depth", str(source), str(ours),
                                   "--recipe", str(recipe_file), "--force"])
        subprocess.run(["rm", "-rf", str(theirs)], check=True)
        mergekit_run = run_measured([str(mergekit), str(recipe_file), str(theirs), "--no-copy-tokenizer"])
        equal, count = python_json(
            f"import bench_depth; print(json.dumps(bench_depth.same_tensors({str(ours)!r}, {str(theirs)!r})))")
        run = {"source": name, "expand": expand_run, "mergekit": mergekit_run,
               "speedup": round(mergekit_run["wall_s"] / expand_run["wall_s"], 2),
               "peak_rss_ratio": round(expand_run["peak_rss_mib"] / mergekit_run["peak_rss_mib"], 3),
               "tensors_compared": count, "identical_tensors": equal,
               "source_bytes": sum(f.stat().st_size for f in source.glob("*.safetensors"))}
        results["runs"].append(run)
        for tool in ("expand", "mergekit"):
            lines.append(f"{name:42s} {tool:9s} {run[tool]['wall_s']:8.2f} {run[tool]['peak_rss_mib']:13.1f}")
        lines.append(f"{'':42s} expand is {run['speedup']}x faster, uses {run['peak_rss_ratio']:.0%} of mergekit's "
                     f"peak RSS; {count} tensors compared, identical: {equal}")
        print("\n".join(lines[-3:]), flush=True)
    write_results("bench_depth", results, "\n".join(lines))


if __name__ == "__main__":
    main()
