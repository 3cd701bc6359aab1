"""Four ablation studies of SmolLM2-135M-Instruct (30 layers), each written to its own folder beside this
file (results.json, results.csv, PNGs), all on the same eval text: the first 32 x 512 = 16,384 tokens of
the shipped text `python-reference` (CPython 3.11.7's Python Language Reference topics, frozen in
expand/data; its sha256 is recorded in every results.json and in summary.json under "texts").

    importance   delete-one: Block Influence and angular distance against the measured effect of removing
                 each layer (mean KL to the base, loss increase), with Spearman correlations
    pruning      greedy removal (choosing on 1 x 512 held-out tokens that follow the eval tokens in the text)
                 and removal in Block-Influence order, each down to 15 layers, evaluated on the eval tokens
    self-merge   window width x stride grid of overlapping-slice self-merges (the Llama-3-120B pattern)
    duplication  duplicate-one: which single duplicated layer hurts least, and how its cost ranks against
                 the cost of removing the layer (from importance/results.json) and against Block Influence

Every loss, KL and top-1 carries a 95% bootstrap interval over the 32 eval windows (`ci`), and every rank
correlation one too (`correlation_intervals`): see expand/ablate/spread.py. Each study's wall time is its
own (a timer per study, with the start and end time and the load average, since the machine is shared).

    python -m experiments.ablation.run [importance pruning self-merge duplication]   # default: all four
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import expand
from expand.ablate import ablate, plot_pruning, spearman
from expand.ablate.spread import correlation_intervals, window_draws
from expand.io.atomic import atomic_dir
from expand.text import shipped_text, text_sha256, token_batch
from experiments.benchlib import write_json

HERE = Path(__file__).parent
TEXT = "python-reference"
SEQ_LEN, EVAL_SEQUENCES, SELECT_SEQUENCES = 512, 32, 1
TARGET_DEPTH = 15
WINDOW = "window:6,10,15:3,5"
ROW_KEYS = ("loss", "mean_kl", "top1", "ci")


def texts(model):
    """(eval tokens (32, 512), held-out selection tokens (1, 512), {text name: sha256})."""
    text = shipped_text(TEXT)
    ids = token_batch(model, text, SEQ_LEN, EVAL_SEQUENCES + SELECT_SEQUENCES)
    return ids[:EVAL_SEQUENCES], ids[EVAL_SEQUENCES:], {TEXT: text_sha256(text)}


def write(name: str, table, text_hashes: dict) -> None:
    """The table's files, with the texts it was measured on recorded in results.json."""
    with atomic_dir(HERE / name, overwrite=True) as tmp:
        table.write(tmp)
        results = json.loads((tmp / "results.json").read_text())
        (tmp / "results.json").write_text(json.dumps({"texts": text_hashes, **results}, indent=2) + "\n")


def pick(row: dict, keys) -> dict:
    return {k: row[k] for k in keys if k in row}


def importance_study(model, tokens, _, text_hashes):
    table = ablate(model, "delete-one", tokens)
    write("importance", table, text_hashes)
    return {"correlations": table.correlations, "correlation_intervals": table.correlation_intervals,
            "compilations": table.compilations,
            "least_harmful_removals": [pick(r, ("name", *ROW_KEYS)) for r in sorted(table.rows,
                                                                                     key=lambda r: r["mean_kl"])[:5]],
            "most_harmful_removals": [pick(r, ("name", *ROW_KEYS)) for r in sorted(table.rows,
                                                                                    key=lambda r: -r["mean_kl"])[:3]]}


def pruning_study(model, tokens, select, text_hashes):
    greedy_path = ablate(model, f"prune-greedy:{TARGET_DEPTH}", select)
    greedy = ablate(model, [r["layer_spec"] for r in greedy_path.rows], tokens)
    for row, chosen in zip(greedy.rows, greedy_path.rows):
        row.update(name=chosen["name"], removed=chosen["removed"])
    greedy.sweep = f"prune-greedy:{TARGET_DEPTH} (chosen on held-out tokens)"
    by_bi = ablate(model, f"prune-bi:{TARGET_DEPTH}", tokens)
    write("pruning/greedy", greedy, text_hashes)
    write("pruning/block-influence", by_bi, text_hashes)
    paths = {"greedy (KL, held-out choice)": greedy, "Block Influence order": by_bi}
    plot_pruning(paths, HERE / "pruning/loss.png")
    plot_pruning(paths, HERE / "pruning/kl.png", metric="mean_kl")
    return {"greedy": [pick(r, ("depth", "removed", *ROW_KEYS)) for r in greedy.rows],
            "block_influence": [pick(r, ("depth", "removed", *ROW_KEYS)) for r in by_bi.rows]}


def self_merge_study(model, tokens, _, text_hashes):
    table = ablate(model, WINDOW, tokens)
    write("self-merge", table, text_hashes)
    return {"grid": [pick(r, ("width", "stride", "depth", *ROW_KEYS)) for r in table.rows],
            "compilations": table.compilations, "lengths": table.lengths}


def rank_agreement(x_windows: np.ndarray, y_windows: np.ndarray, layers: list[int]) -> dict:
    """Spearman correlation of two per-layer quantities (each (N, S): a value per layer and eval window)
    over `layers`, with its 95% bootstrap interval over the windows (the draws of expand.ablate.spread)."""
    x, y = x_windows[layers], y_windows[layers]
    draws = window_draws(x.shape[1], 1000, 0)
    interval = correlation_intervals({"y": y}, {"x": x}, draws, 0.95)["x vs y"]
    return {"spearman": spearman(x.mean(axis=1), y.mean(axis=1)), "ci": interval}


def duplication_study(model, tokens, _, text_hashes):
    table = ablate(model, "duplicate-one", tokens)
    write("duplication", table, text_hashes)
    ranked = sorted(table.rows, key=lambda r: r["mean_kl"])
    n = len(table.rows)
    duplicated = np.asarray([table.rows[i]["windows"]["mean_kl"] for i in range(n)])
    block_influence = np.asarray(table.importance["windows"]["block_influence"])
    removal = json.loads((HERE / "importance/results.json").read_text())
    removed = np.asarray([r["windows"]["mean_kl"] for r in sorted(removal["rows"], key=lambda r: r["layer"])])
    return {"least_harmful": [pick(r, ("layer", *ROW_KEYS)) for r in ranked[:5]],
            "most_harmful": [pick(r, ("layer", *ROW_KEYS)) for r in ranked[-3:]],
            "rank_agreement": {
                "block_influence vs duplication mean_kl, all layers": rank_agreement(block_influence, duplicated,
                                                                                     list(range(n))),
                f"block_influence vs duplication mean_kl, layers 2-{n - 2}": rank_agreement(
                    block_influence, duplicated, list(range(2, n - 1))),
                "removal mean_kl vs duplication mean_kl, all layers": rank_agreement(removed, duplicated,
                                                                                     list(range(n)))}}


STUDIES = {"importance": importance_study, "pruning": pruning_study, "self-merge": self_merge_study,
           "duplication": duplication_study}


def main(names: list[str]) -> None:
    unknown = set(names) - set(STUDIES)
    if unknown:
        sys.exit(f"unknown studies {sorted(unknown)}; choose from {', '.join(STUDIES)}")
    model = expand.load("smollm2")
    tokens, select, text_hashes = texts(model)
    summary_file = HERE / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    summary = {k: v for k, v in summary.items() if k in STUDIES}
    summary = {"model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to fp32)", "texts": text_hashes,
               "eval_tokens": list(tokens.shape), "selection_tokens": list(select.shape), **summary}
    for name in names or list(STUDIES):
        started, load = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), os.getloadavg()[0]
        start = time.perf_counter()
        result = STUDIES[name](model, tokens, select, text_hashes)
        summary[name] = result | {"wall_s": round(time.perf_counter() - start, 1), "started": started,
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "load_average_1min": {"start": round(load, 2),
                                                        "end": round(os.getloadavg()[0], 2)},
                                  "cpu_count": os.cpu_count()}
        write_json(summary_file, summary)
        print(f"{name}: done in {summary[name]['wall_s']} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
