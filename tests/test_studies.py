"""Committed results agree with what expand ships and with what their READMEs state.

Every results JSON under experiments/ records the sha256 of each text it was measured on ("texts": {name:
sha256}), and each is a text expand ships (`expand.text.SHIPPED_TEXTS`), so every study reruns on the
same tokens; benchmarks that measure no text are listed with what they measure instead. The parameter
table of experiments/recipes/README.md is recomputed from the configs and recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from expand.text import SHIPPED_TEXTS

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
TEXT_FREE = {  # benchmarks whose inputs are no text
    "results/bench_depth.json": "checkpoints on disk (time and memory of depth surgery)",
    "results/bench_scale.json": "a random checkpoint on disk (time and memory of surgery)",
    "results/cpu_gemm_accuracy.json": "random matrices",
    "results/bench_forward_cpu.json": "random tokens",
    "results/bench_forward_cpu_42c0621.json": "random tokens (bench_forward run against the code of 42c0621)",
    "results/bench_compile.json": "random tokens (compile time of programs)",
    "results/profile_prefill_cpu.json": "random tokens and activations",
    "results/eval_window_sweep.json": "lm-eval tasks (tests/data/lm_eval), scored by lm-eval, not a text",
}
def results_files() -> list[str]:
    return sorted(str(p.relative_to(EXPERIMENTS)) for p in EXPERIMENTS.rglob("*.json")
                  if "configs" not in p.relative_to(EXPERIMENTS).parts)


def test_every_results_file_is_classified():
    files = set(results_files())
    assert set(TEXT_FREE) <= files
    assert {"frankenllama/results.json", "ablation/summary.json", "results/parity_floor.json"} <= files


@pytest.mark.parametrize("name", [f for f in results_files() if f not in TEXT_FREE])
def test_study_records_shipped_texts(name):
    results = json.loads((EXPERIMENTS / name).read_text())
    texts = results.get("texts")
    assert texts, f"{name} records no text hash (a 'texts': {{name: sha256}} entry)"
    for text, sha in texts.items():
        assert SHIPPED_TEXTS.get(text) == sha, f"{name}: {text} {sha} is not a text expand ships"


# ---- experiments/recipes/README.md ----------------------------------------------------------------------


def recipe_table() -> list[list[str]]:
    lines = (EXPERIMENTS / "recipes" / "README.md").read_text().splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| `")]
    assert len(rows) == len(list((EXPERIMENTS / "recipes").glob("*.yaml")))
    return rows


@pytest.mark.parametrize("row", recipe_table(), ids=lambda row: row[0].strip("`"))
def test_recipe_table_states_what_expand_computes(row):
    import expand
    from expand.io import read_config
    from expand.params import param_count

    recipe, source, layers, parameters, layer_map, identity = row
    folder = re.search(r"configs/[\w.-]+", source)
    config = read_config(EXPERIMENTS / folder.group(0) if folder else "smollm2")
    plan = expand.plan_from_recipe(EXPERIMENTS / "recipes" / recipe.strip("`"), num_layers=config.num_hidden_layers)
    assert layers == f"{config.num_hidden_layers} -> {plan.num_layers}"
    assert int(parameters.replace(",", "")) == param_count(config, plan.layer_ids)
    head, _, tail = layer_map.partition(", ..., ")
    assert plan.layer_map().startswith(head) and plan.layer_map().endswith(tail)
    assert identity == (", ".join(map(str, plan.identity_slots)) or "-")
