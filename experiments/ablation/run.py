"""Four ablation studies of SmolLM2-135M-Instruct (30 layers), each written to its own folder beside this
file (results.json, results.csv, PNGs), all on the same eval text: the first 32 x 512 = 16,384 tokens of
the Python Language Reference as installed with CPython (`expand.text.python_reference_text`; its sha256
is recorded in summary.json).

    importance   delete-one: Block Influence and angular distance against the measured effect of removing
                 each layer (mean KL to the base, loss increase), with Spearman correlations
    pruning      greedy removal (choosing on 1 x 512 held-out tokens that follow the eval tokens in the text)
                 and removal in Block-Influence order, each down to 15 layers, evaluated on the eval tokens
    self-merge   window width x stride grid of overlapping-slice self-merges (the Llama-3-120B pattern)
    duplication  duplicate-one: which single duplicated layer hurts least

    python experiments/ablation/run.py [importance pruning self-merge duplication]   # default: all four
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path


import expand
from expand.ablate import ablate, plot_pruning
from expand.io.atomic import atomic_dir
from expand.text import python_reference_text, token_batch

HERE = Path(__file__).parent
SEQ_LEN, EVAL_SEQUENCES, SELECT_SEQUENCES = 512, 32, 1
TARGET_DEPTH = 15
WINDOW = "window:6,10,15:3,5"


def texts(model):
    """(eval tokens (32, 512), held-out selection tokens (1, 512), the text's sha256)."""
    text = python_reference_text()
    ids = token_batch(model, text, SEQ_LEN, EVAL_SEQUENCES + SELECT_SEQUENCES)
    return ids[:EVAL_SEQUENCES], ids[EVAL_SEQUENCES:], hashlib.sha256(text.encode()).hexdigest()


def write(name: str, table) -> None:
    with atomic_dir(HERE / name, overwrite=True) as tmp:
        table.write(tmp)


def importance_study(model, tokens, _):
    table = ablate(model, "delete-one", tokens)
    write("importance", table)
    return {"correlations": table.correlations, "compilations": table.compilations,
            "least_harmful_removals": [r["name"] for r in sorted(table.rows, key=lambda r: r["mean_kl"])[:5]],
            "most_harmful_removals": [r["name"] for r in sorted(table.rows, key=lambda r: -r["mean_kl"])[:3]]}


def pruning_study(model, tokens, select):
    greedy_path = ablate(model, f"prune-greedy:{TARGET_DEPTH}", select)
    greedy = ablate(model, [r["layer_spec"] for r in greedy_path.rows], tokens)
    for row, chosen in zip(greedy.rows, greedy_path.rows):
        row.update(name=chosen["name"], removed=chosen["removed"])
    greedy.sweep = f"prune-greedy:{TARGET_DEPTH} (chosen on held-out tokens)"
    by_bi = ablate(model, f"prune-bi:{TARGET_DEPTH}", tokens)
    write("pruning/greedy", greedy)
    write("pruning/block-influence", by_bi)
    plot_pruning({"greedy (KL, held-out choice)": greedy, "Block Influence order": by_bi}, HERE / "pruning/loss.png")
    plot_pruning({"greedy (KL, held-out choice)": greedy, "Block Influence order": by_bi}, HERE / "pruning/kl.png",
                 metric="mean_kl")
    return {"greedy": [{k: r[k] for k in ("depth", "removed", "loss", "mean_kl", "top1")} for r in greedy.rows],
            "block_influence": [{k: r[k] for k in ("depth", "removed", "loss", "mean_kl", "top1")} for r in by_bi.rows]}


def self_merge_study(model, tokens, _):
    table = ablate(model, WINDOW, tokens)
    write("self-merge", table)
    return {"grid": [{k: r[k] for k in ("width", "stride", "depth", "loss", "mean_kl", "top1")} for r in table.rows],
            "compilations": table.compilations, "lengths": table.lengths}


def duplication_study(model, tokens, _):
    table = ablate(model, "duplicate-one", tokens)
    write("duplication", table)
    ranked = sorted(table.rows, key=lambda r: r["mean_kl"])
    return {"least_harmful": [{k: r[k] for k in ("layer", "loss", "mean_kl", "top1")} for r in ranked[:5]],
            "most_harmful": [{k: r[k] for k in ("layer", "loss", "mean_kl", "top1")} for r in ranked[-3:]]}


STUDIES = {"importance": importance_study, "pruning": pruning_study, "self-merge": self_merge_study,
           "duplication": duplication_study}


def main(names: list[str]) -> None:
    unknown = set(names) - set(STUDIES)
    if unknown:
        sys.exit(f"unknown studies {sorted(unknown)}; choose from {', '.join(STUDIES)}")
    model = expand.load("smollm2")
    tokens, select, sha = texts(model)
    summary_file = HERE / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    summary.update(model="SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to fp32)",
                   text=f"Python Language Reference (pydoc_data.topics, Python {sys.version.split()[0]})",
                   text_sha256=sha, eval_tokens=list(tokens.shape), selection_tokens=list(select.shape))
    for name in names or list(STUDIES):
        start = time.perf_counter()
        result = STUDIES[name](model, tokens, select)
        summary[name] = result | {"wall_s": round(time.perf_counter() - start, 1)}
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{name}: done in {summary[name]['wall_s']} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
