"""Ablation sweeps: many depth variants of one model, evaluated on one copy of its weights.

A depth plan is data (`layer_ids`), not shape, so every variant of the same length runs through one
compiled forward; nothing is written to disk and no weights are reloaded. A variant whose first k slots are
the base's resumes from the base's residual stream entering slot k (kept from the base's one forward), so
removing layer i costs the layers after i, not the whole stack; prune-greedy's candidates resume from the
current pruned model's stream the same way. Sweeps on a model of N layers:

    delete-one        N variants: layer i removed
    duplicate-one     N variants: layer i run twice in a row
    delete-block:n    N - n + 1 variants: layers i .. i+n-1 removed (contiguous runs of n)
    window:W:S        one self-merge per (w, s) in W x S (comma lists): slices [0, w), [s, s + w), ...,
                      the last one ending at N (w=20, s=10 on 80 layers is Llama-3-120B's pattern)
    swap-adjacent     N - 1 variants: layers i and i+1 swapped
    prune-greedy[:T]  remove the layer whose removal raises KL to the base least, re-measure, repeat down
                      to T layers (default N // 2); the path is the table
    prune-bi[:T]      remove layers in increasing Block Influence order down to T layers (one forward scores)
    specs:FILE        one layer spec per line (blank lines and # comments skipped)

Metrics of each variant over the eval tokens (B, T), from `expand.check.compare_logits` (the numbers the
check reports): `loss` (mean next-token NLL of the variant) and `ppl` = exp(loss), `mean_kl` =
KL(base || variant) averaged over positions, `top1` agreement with the base, `max_abs_logit_delta`, and
`params`, the parameter count of the variant once materialized.

Importance from one forward of the base (h_l: the residual stream entering layer l, h_N after the last):
    Block Influence (ShortGPT):   BI_l = 1 - mean_{b,t} cos(h_l[b, t], h_{l+1}[b, t])
    angular distance (Gromov et al.), blocks of n layers:
                                  d_n(l) = mean_b arccos(cos(h_l[b, T-1], h_{l+n}[b, T-1])) / pi
(on the residual stream before the final norm), reported beside the measured effect of removing each
layer or block, with Spearman rank correlations.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from expand.ablate.evaluate import (METRICS, EvalSet, Trunk, batch_size_for, eval_set, evaluate, trunk_of,
                                    variant_logits)
from expand.ablate.importance import correlations, importance, spearman
from expand.ablate.plots import plot_all, plot_effects, plot_importance, plot_pruning, plot_window_grid
from expand.ablate.spread import bootstrap
from expand.ablate.sweeps import KINDS, Sweep, fixed_variants, parse_sweep, plan_of, removal_path, window_layers
from expand.ablate.table import Table
from expand.container import Model
from expand.model import TRACE_COUNTS
from expand.surgery.layerspec import parse_layer_spec
from expand.surgery.plan import LayerPlan

__all__ = ["KINDS", "METRICS", "EvalSet", "Sweep", "Table", "Trunk", "ablate", "batch_size_for", "correlations",
           "eval_set", "evaluate", "fixed_variants", "importance", "parse_sweep", "plan_of", "plot_all",
           "plot_effects", "plot_importance", "plot_pruning", "plot_window_grid", "removal_path", "spearman",
           "trunk_of", "variant_logits", "window_layers"]


def _row(name: str, plan: LayerPlan, metrics: dict, keep: Sequence[str]) -> dict:
    return {"name": name, "layer_spec": plan.description, "depth": plan.num_layers,
            **{k: v for k, v in metrics.items() if k in keep or k == "windows"}}


def _measure_base(model: Model, eval_tokens, batch_size, blocks, metrics) -> tuple[EvalSet, dict, dict]:
    """The eval set (the base's one forward), the base's row and the importance scores."""
    n = model.config.num_hidden_layers
    evals = eval_set(model, eval_tokens, batch_size)
    base = evaluate(model, evals, plan_of(range(n), n))
    base = {"depth": n, **{k: v for k, v in base.items() if k in metrics or k == "windows"}}
    return evals, base, importance(model, evals, blocks)


def ablate(model: Model, sweep, eval_tokens: np.ndarray, metrics: Sequence[str] = METRICS,
           batch_size: int | None = None) -> Table:
    """Run a sweep over depth variants of `model` on eval_tokens (B, T).

    sweep: a sweep string (module docstring) or a list of LayerPlans / layer specs.
    metrics: which of METRICS to keep in the rows (all are computed by the same pass).
    batch_size: sequences per forward (default: the largest divisor of B up to 4)."""
    from expand.progress import progress_bar

    n = model.config.num_hidden_layers
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    if isinstance(sweep, str):
        parsed = parse_sweep(sweep, n)
    else:
        plans = [s if isinstance(s, LayerPlan) else plan_of(parse_layer_spec(s, n), n) for s in sweep]
        parsed = Sweep("specs", specs=tuple(p.description for p in plans))
    traces = TRACE_COUNTS["forward"]
    blocks = (parsed.block,) if parsed.kind == "delete-block" else (1,)
    if parsed.kind == "prune-greedy":
        evals, base, scores = _measure_base(model, eval_tokens, batch_size, blocks, metrics)
        rows = _prune_greedy(model, evals, parsed.target, metrics)
    else:
        count = n - parsed.target if parsed.kind == "prune-bi" else (
            len(fixed_variants(parsed, n)) if isinstance(sweep, str) else len(plans))
        rows = []
        with progress_bar(f"sweep {parsed.label} (the base, then {count} variants)", total=count + 1) as advance:
            evals, base, scores = _measure_base(model, eval_tokens, batch_size, blocks, metrics)
            advance()
            if parsed.kind == "prune-bi":
                order = np.argsort(scores["block_influence"], kind="stable")[: n - parsed.target]
                variants = removal_path(n, order)
            elif isinstance(sweep, str):
                variants = fixed_variants(parsed, n)
            else:
                variants = [(p.description, p, {}) for p in plans]
            for name, plan, fields in variants:
                rows.append(_row(name, plan, evaluate(model, evals, plan), metrics) | fields)
                advance()
    row_intervals, correlation_intervals = bootstrap(parsed, scores, rows, base)
    for row, interval in zip([base, *rows], row_intervals):
        row["ci"] = interval
    return Table(model=str(model.source), sweep=parsed.label, tokens=evals.shape, base=base, rows=rows,
                 importance=scores, correlations=correlations(parsed, scores, rows, base),
                 compilations=TRACE_COUNTS["forward"] - traces,
                 lengths=sorted({n} | {row["depth"] for row in rows}), correlation_intervals=correlation_intervals)


def nan_last(value: float) -> float:
    """A sort key that ranks NaN (a non-finite variant) after every number."""
    return math.inf if math.isnan(value) else value


def _prune_greedy(model: Model, evals: EvalSet, target: int, metrics) -> list[dict]:
    """Remove, one at a time, the layer whose removal gives the lowest mean KL to the base; one row per
    step (the chosen removal's metrics, and how many candidates were measured). Each step's candidates
    start from the current model's residual stream where they depart from it (one extra forward per step
    and batch, and one compile per depth for it)."""
    from expand.progress import progress_bar

    n = model.config.num_hidden_layers
    kept, rows, trunk = list(range(n)), [], evals.base
    with progress_bar(f"prune-greedy to {target}", total=sum(range(target + 1, n + 1))) as advance:
        while len(kept) > target:
            trials = []
            for layer in kept:
                plan = plan_of([i for i in kept if i != layer], n)
                trials.append((evaluate(model, evals, plan, trunk), layer, plan))
                advance()
            result, layer, plan = min(trials, key=lambda t: nan_last(t[0]["mean_kl"]))
            kept.remove(layer)
            if len(kept) > target:
                trunk = trunk_of(model, evals, plan)
            rows.append(_row(f"remove {layer}", plan, result, metrics) | {"removed": layer,
                                                                          "candidates": len(trials)})
    return rows
