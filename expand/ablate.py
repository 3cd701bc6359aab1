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

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from expand.check import compare_logits
from expand.container import Model
from expand.model import TRACE_COUNTS, forward
from expand.params import param_count
from expand.surgery.layerspec import parse_layer_spec, to_layer_spec
from expand.surgery.plan import LayerPlan, Slot

METRICS = ("loss", "ppl", "mean_kl", "top1", "max_abs_logit_delta", "params")
KINDS = ("delete-one", "duplicate-one", "delete-block", "window", "swap-adjacent", "prune-greedy", "prune-bi",
         "specs")


# ---- sweeps: what to run -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A parsed sweep. kind: one of KINDS; block: n of delete-block; widths/strides: window grid;
    target: final depth of the prune sweeps; specs: the layer specs of `specs:FILE`."""

    kind: str
    block: int = 1
    widths: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    target: int = 0
    specs: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.kind == "delete-block":
            return f"delete-block:{self.block}"
        if self.kind == "window":
            return f"window:{','.join(map(str, self.widths))}:{','.join(map(str, self.strides))}"
        if self.kind.startswith("prune"):
            return f"{self.kind}:{self.target}"
        return self.kind


def _ints(text: str, what: str, sweep: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"sweep {sweep!r}: {what} {text!r} is not an integer or a comma list of integers") from None
    if any(v < 1 for v in values):
        raise ValueError(f"sweep {sweep!r}: {what} must be at least 1")
    return values


def parse_sweep(text: str, num_layers: int) -> Sweep:
    """Parse and validate a sweep against a model of `num_layers` layers (errors before any compute)."""
    kind, _, rest = text.partition(":")
    hint = "choose delete-one, duplicate-one, delete-block:N, window:W:S, swap-adjacent, prune-greedy[:T], " \
           "prune-bi[:T] or specs:FILE"
    if kind not in KINDS:
        raise ValueError(f"unknown sweep {text!r}; {hint}")
    if kind in ("delete-one", "duplicate-one", "swap-adjacent"):
        if rest:
            raise ValueError(f"sweep {kind} takes no argument (got {text!r})")
        if kind == "swap-adjacent" and num_layers < 2:
            raise ValueError("swap-adjacent needs at least 2 layers")
        if kind == "delete-one" and num_layers < 2:
            raise ValueError("delete-one needs at least 2 layers (a model keeps at least one)")
        return Sweep(kind)
    if kind == "delete-block":
        (n,) = _ints(rest, "block size", text) if rest else (None,)
        if n is None or n >= num_layers:
            raise ValueError(f"sweep {text!r}: write delete-block:N with 1 <= N < {num_layers} (layers kept >= 1)")
        return Sweep(kind, block=n)
    if kind == "window":
        parts = rest.split(":")
        if len(parts) != 2:
            raise ValueError(f"sweep {text!r}: write window:W:S, e.g. window:8:4 or window:6,8,10:2,4")
        widths, strides = _ints(parts[0], "width", text), _ints(parts[1], "stride", text)
        bad = [w for w in widths if w > num_layers]
        if bad:
            raise ValueError(f"sweep {text!r}: window widths {bad} exceed the model's {num_layers} layers")
        if not any(s <= w for w in widths for s in strides):
            raise ValueError(f"sweep {text!r}: every stride is wider than every window, so layers would be "
                             "skipped; use strides <= widths")
        return Sweep(kind, widths=widths, strides=strides)
    if kind in ("prune-greedy", "prune-bi"):
        (target,) = _ints(rest, "target depth", text) if rest else (num_layers // 2,)
        if not 1 <= target < num_layers:
            raise ValueError(f"sweep {text!r}: the target depth must be between 1 and {num_layers - 1}")
        return Sweep(kind, target=target)
    path = Path(rest)
    if not rest or not path.is_file():
        raise ValueError(f"sweep {text!r}: write specs:FILE with a file of layer specs, one per line")
    specs = tuple(line.split("#")[0].strip() for line in path.read_text().splitlines())
    specs = tuple(s for s in specs if s)
    if not specs:
        raise ValueError(f"{path} has no layer specs (one per line, # for comments)")
    for number, spec in enumerate(specs, 1):
        try:
            parse_layer_spec(spec, num_layers)
        except ValueError as e:
            raise ValueError(f"{path}, spec {number}: {e}") from None
    return Sweep(kind, specs=specs)


def plan_of(layers: Sequence[int], num_layers: int) -> LayerPlan:
    """The plan running `layers` in order; its description is the canonical layer spec."""
    layers = [int(i) for i in layers]
    return LayerPlan(tuple(Slot(i) for i in layers), num_layers, description=to_layer_spec(layers))


def window_layers(num_layers: int, width: int, stride: int) -> list[int]:
    """Overlapping slices [0, w), [s, s + w), ... with the last slice ending at num_layers."""
    starts = list(range(0, num_layers - width + 1, stride))
    if starts[-1] != num_layers - width:
        starts.append(num_layers - width)
    return [layer for start in starts for layer in range(start, start + width)]


def fixed_variants(sweep: Sweep, num_layers: int) -> list[tuple[str, LayerPlan, dict]]:
    """(name, plan, fields) of every variant of a sweep whose variants do not depend on measurements;
    fields locate the variant in its sweep (layer, first layer of a block, window width and stride)."""
    layers = list(range(num_layers))
    out: list[tuple[str, list[int], dict]] = []
    if sweep.kind == "delete-one":
        out = [(f"delete {i}", layers[:i] + layers[i + 1:], {"layer": i}) for i in layers]
    elif sweep.kind == "duplicate-one":
        out = [(f"duplicate {i}", layers[:i + 1] + layers[i:], {"layer": i}) for i in layers]
    elif sweep.kind == "delete-block":
        n = sweep.block
        out = [(f"delete {i}-{i + n - 1}", layers[:i] + layers[i + n:], {"layer": i})
               for i in range(num_layers - n + 1)]
    elif sweep.kind == "swap-adjacent":
        out = [(f"swap {i},{i + 1}", layers[:i] + [i + 1, i] + layers[i + 2:], {"layer": i})
               for i in range(num_layers - 1)]
    elif sweep.kind == "window":
        out = [(f"window w={w} s={s}", window_layers(num_layers, w, s), {"width": w, "stride": s})
               for w in sweep.widths for s in sweep.strides if s <= w]
    elif sweep.kind == "specs":
        out = [(spec, list(parse_layer_spec(spec, num_layers)), {}) for spec in sweep.specs]
    else:
        raise ValueError(f"{sweep.kind} variants depend on measurements; see ablate()")
    return [(name, plan_of(ids, num_layers), fields) for name, ids, fields in out]


# ---- evaluation: one set of weights, one compile per length ----------------------------------------------


@dataclasses.dataclass
class Trunk:
    """A plan with its residual stream (N + 1, B, T, d) per eval batch kept on the device: a variant whose
    first k slots are the trunk's has the trunk's h_k entering slot k, and starts there."""

    plan: LayerPlan
    hidden: list[jax.Array]

    def shared_prefix(self, plan: LayerPlan) -> int:
        """k: how many leading slots (stored layer and scales) the plan has in common with the trunk."""
        pairs = zip(plan.slots, self.plan.slots)
        return next((s for s, (mine, theirs) in enumerate(pairs) if mine != theirs),
                    min(plan.num_layers, self.plan.num_layers))


@dataclasses.dataclass
class EvalSet:
    """The eval tokens split into equal batches (one compiled shape), with the base's logits (B, T, V) per
    batch and the base as a trunk, all on the device: each variant costs at most one forward, and only from
    the first slot where it departs from the base."""

    batches: list[jax.Array]
    base_logits: list[jax.Array]
    base: Trunk

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(b.shape[0] for b in self.batches), self.batches[0].shape[1])


def batch_size_for(num_sequences: int, limit: int = 4) -> int:
    """The largest batch size <= limit that divides num_sequences (so every batch has one shape)."""
    return max(b for b in range(1, min(limit, num_sequences) + 1) if num_sequences % b == 0)


def run_with_hidden(model: Model, tokens: jax.Array, plan: LayerPlan) -> tuple[jax.Array, jax.Array]:
    """Logits (B, T, V) and residual stream (N + 1, B, T, d) of the plan run virtually; one compile per
    plan length."""
    return forward(model.params, tokens, model.config, layer_ids=jnp.asarray(plan.layer_ids),
                   slot_scales=plan.slot_scales(), return_hidden=True)


def eval_set(model: Model, tokens: np.ndarray, batch_size: int | None = None) -> EvalSet:
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"eval tokens must be (sequences, length >= 2), got shape {tokens.shape}")
    size = batch_size or batch_size_for(len(tokens))
    if len(tokens) % size:
        raise ValueError(f"batch size {size} does not divide the {len(tokens)} eval sequences")
    batches = [jnp.asarray(tokens[i:i + size]) for i in range(0, len(tokens), size)]
    base = plan_of(range(model.config.num_hidden_layers), model.config.num_hidden_layers)
    runs = [run_with_hidden(model, b, base) for b in batches]
    return EvalSet(batches, [logits for logits, _ in runs], Trunk(base, [hidden for _, hidden in runs]))


def trunk_of(model: Model, evals: EvalSet, plan: LayerPlan) -> Trunk:
    """The plan's residual stream on every eval batch (one forward each)."""
    return Trunk(plan, [run_with_hidden(model, tokens, plan)[1] for tokens in evals.batches])


def variant_logits(model: Model, evals: EvalSet, batch: int, plan: LayerPlan,
                   trunk: Trunk | None = None) -> jax.Array:
    """Logits (B, T, V) of the plan on eval batch `batch`, run virtually on the model's weights and resumed
    from the trunk's (default: the base's) residual stream after their shared prefix: removing layer i from
    the base runs only slots i .. N-2. The prefix length is data, so every plan of one length shares one
    compiled forward."""
    trunk = trunk or evals.base
    k = trunk.shared_prefix(plan)
    return forward(model.params, evals.batches[batch], model.config, layer_ids=jnp.asarray(plan.layer_ids),
                   slot_scales=plan.slot_scales(), resume=(jnp.int32(k), trunk.hidden[batch][k]))


def evaluate(model: Model, evals: EvalSet, plan: LayerPlan, trunk: Trunk | None = None) -> dict[str, float]:
    """The metrics of one variant (see the module docstring), accumulated over the eval batches; the variant
    starts from the trunk (default: the base) where it departs from it."""
    nll = kl = agree = 0.0
    delta, positions, targets = 0.0, 0, 0
    for batch, (tokens, base_logits) in enumerate(zip(evals.batches, evals.base_logits)):
        logits = variant_logits(model, evals, batch, plan, trunk)
        stats = jax.device_get(compare_logits(base_logits, logits, tokens))
        nll += float(stats["nll"].sum(dtype=np.float64))
        kl += float(stats["kl"].sum(dtype=np.float64))
        agree += float(stats["agree"].sum())
        delta = max(delta, float(stats["max_abs_delta"].max()))
        positions += stats["kl"].size
        targets += stats["nll"].size
    loss = nll / targets
    return {"loss": loss, "ppl": math.exp(loss), "mean_kl": kl / positions, "top1": agree / positions,
            "max_abs_logit_delta": delta,
            "params": param_count(model.config.replace(num_hidden_layers=plan.num_layers))}


# ---- importance scores from one forward of the base -------------------------------------------------------


@jax.jit
def _cosines(hidden: jax.Array) -> jax.Array:
    """hidden (N + 1, B, T, d) -> (N + 1, N + 1, B, T) cosine of every pair of residual states."""
    h = hidden.astype(jnp.float32)
    unit = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-30)
    return jnp.einsum("ibtd,jbtd->ijbt", unit, unit)


def importance(model: Model, evals: EvalSet, block_sizes: Sequence[int] = (1,)) -> dict:
    """Block Influence per layer and angular distance per block of n layers (module docstring), over the
    eval batches. Returns {"block_influence": [N], "angular_distance": {n: [N - n + 1]}}."""
    n_layers = model.config.num_hidden_layers
    adjacent, last_token = [], []
    for hidden in evals.base.hidden:
        cos = np.asarray(_cosines(hidden), np.float64)  # (N+1, N+1, B, T)
        adjacent.append(np.stack([cos[i, i + 1] for i in range(n_layers)]).reshape(n_layers, -1))
        last_token.append(cos[..., -1])  # (N+1, N+1, B)
    adjacent_cos = np.concatenate(adjacent, axis=1).mean(axis=1)
    last = np.concatenate(last_token, axis=-1)
    angles = np.arccos(np.clip(last, -1.0, 1.0)).mean(axis=-1) / np.pi
    return {"block_influence": (1.0 - adjacent_cos).tolist(),
            "angular_distance": {int(n): [float(angles[l, l + n]) for l in range(n_layers - n + 1)]
                                 for n in block_sizes}}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


# ---- the sweep -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Table:
    """An ablation's results: one row per variant (name, layer_spec, depth and the metrics), the base's
    row, importance scores, the rank correlations of scores with measured effects, and compile count."""

    model: str
    sweep: str
    tokens: tuple[int, int]
    base: dict
    rows: list[dict]
    importance: dict
    correlations: dict
    compilations: int
    lengths: list[int]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, directory: str | Path) -> list[str]:
        """results.json, results.csv and the PNG plots; returns the file names written."""
        directory = Path(directory)
        (directory / "results.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        fields = [k for k in ("layer", "width", "stride", "removed", "candidates") if k in self.rows[0]]
        columns = ["name", "layer_spec", "depth", *fields, *[m for m in METRICS if m in self.rows[0]]]
        lines = [",".join(columns)]
        for row in [{"name": "base", "layer_spec": "all", "depth": self.base["depth"], **self.base}, *self.rows]:
            lines.append(",".join(_csv_cell(row.get(c, "")) for c in columns))
        (directory / "results.csv").write_text("\n".join(lines) + "\n")
        return ["results.json", "results.csv", *plot_all(self, directory)]


def _csv_cell(value) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if "," in text else text


def _row(name: str, plan: LayerPlan, metrics: dict, keep: Sequence[str]) -> dict:
    return {"name": name, "layer_spec": plan.description, "depth": plan.num_layers,
            **{k: v for k, v in metrics.items() if k in keep}}


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
    evals = eval_set(model, eval_tokens, batch_size)
    base = evaluate(model, evals, plan_of(range(n), n))
    base = {"depth": n, **{k: v for k, v in base.items() if k in metrics}}
    blocks = (parsed.block,) if parsed.kind == "delete-block" else (1,)
    scores = importance(model, evals, blocks)

    if parsed.kind == "prune-greedy":
        rows = _prune_greedy(model, evals, parsed.target, metrics)
    else:
        if parsed.kind == "prune-bi":
            variants = removal_path(n, np.argsort(scores["block_influence"], kind="stable")[: n - parsed.target])
        elif isinstance(sweep, str):
            variants = fixed_variants(parsed, n)
        else:
            variants = [(p.description, p, {}) for p in plans]
        rows = []
        with progress_bar(f"sweep {parsed.label}", total=len(variants)) as advance:
            for name, plan, fields in variants:
                rows.append(_row(name, plan, evaluate(model, evals, plan), metrics) | fields)
                advance()
    return Table(model=str(model.source), sweep=parsed.label, tokens=evals.shape, base=base, rows=rows,
                 importance=scores, correlations=correlations(parsed, scores, rows, base),
                 compilations=TRACE_COUNTS["forward"] - traces,
                 lengths=sorted({n} | {row["depth"] for row in rows}))


def removal_path(num_layers: int, order: Sequence[int]) -> list[tuple[str, LayerPlan, dict]]:
    """Variants removing order[:1], order[:2], ...: a pruning curve."""
    variants = []
    for k in range(1, len(order) + 1):
        gone = [int(i) for i in order[:k]]
        plan = plan_of([i for i in range(num_layers) if i not in gone], num_layers)
        variants.append((f"remove {gone[-1]}", plan, {"removed": gone[-1]}))
    return variants


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
            result, layer, plan = min(trials, key=lambda t: t[0]["mean_kl"])
            kept.remove(layer)
            if len(kept) > target:
                trunk = trunk_of(model, evals, plan)
            rows.append(_row(f"remove {layer}", plan, result, metrics) | {"removed": layer,
                                                                          "candidates": len(trials)})
    return rows


def correlations(sweep: Sweep, scores: dict, rows: list[dict], base: dict) -> dict:
    """Spearman rank correlation of each importance score with the measured effect of removing that layer
    (delete-one) or block (delete-block:n): mean KL to the base, and the loss increase."""
    if sweep.kind not in ("delete-one", "delete-block") or "mean_kl" not in base | rows[0]:
        return {}
    n = sweep.block
    measured = {"mean_kl": [r["mean_kl"] for r in rows]}
    if "loss" in rows[0]:
        measured["loss_increase"] = [r["loss"] - base["loss"] for r in rows]
    predictors = {f"angular_distance_n{n}": scores["angular_distance"][n]}
    if n == 1:
        predictors["block_influence"] = scores["block_influence"]
    return {f"{p} vs {m}": spearman(pv, mv) for p, pv in predictors.items() for m, mv in measured.items()}


# ---- plots ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(table: Table, directory: Path) -> list[str]:
    """importance.png always; pruning.png for prune sweeps, window.png for window grids, effect.png for
    the one-change-per-layer sweeps. Returns the names written."""
    written = ["importance.png"]
    plot_importance(table, directory / "importance.png")
    kind = table.sweep.split(":")[0]
    if kind.startswith("prune"):
        plot_pruning({table.sweep: table}, directory / "pruning.png")
        written.append("pruning.png")
    elif kind == "window":
        plot_window_grid(table, directory / "window.png")
        written.append("window.png")
    else:
        plot_effects(table, directory / "effect.png")
        written.append("effect.png")
    return written


def plot_importance(table: Table, path: Path) -> None:
    """Block Influence and angular distance per layer; for delete sweeps also the measured KL of each
    removal (each curve scaled to its own maximum, so their shapes compare)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    curves = {"Block Influence": table.importance["block_influence"],
              **{f"angular distance, n={n}": v for n, v in table.importance["angular_distance"].items()}}
    if table.sweep.split(":")[0] in ("delete-one", "delete-block") and "mean_kl" in table.rows[0]:
        curves["measured: KL to base after removal"] = [r["mean_kl"] for r in table.rows]
    for label, values in curves.items():
        values = np.asarray(values, float)
        ax.plot(range(len(values)), values / (values.max() or 1.0), marker=".", label=label)
    ax.set_xlabel("layer (first layer of the block)")
    ax.set_ylabel("score / max score")
    rho = "".join(f"\nSpearman {k}: {v:+.2f}" for k, v in table.correlations.items())
    ax.set_title(f"layer importance, {Path(table.model).name}{rho}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pruning(tables: dict[str, Table], path: Path, metric: str = "loss") -> None:
    """Loss (or another metric) against depth for one or more pruning paths, with the base's value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, table in tables.items():
        depths = [table.base["depth"]] + [r["depth"] for r in table.rows]
        values = [table.base[metric]] + [r[metric] for r in table.rows]
        ax.plot(depths, values, marker="o", ms=3, label=label)
    ax.axhline(next(iter(tables.values())).base[metric], color="k", lw=0.8, ls="--", label="base")
    ax.invert_xaxis()
    ax.set_xlabel("layers kept")
    ax.set_ylabel(metric)
    ax.set_yscale("log" if metric in ("mean_kl", "ppl") else "linear")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_window_grid(table: Table, path: Path, metric: str = "loss") -> None:
    """Heatmap of a window sweep's metric over window width x stride (blank where stride > width)."""
    plt = _pyplot()
    cells = {(r["width"], r["stride"]): r for r in table.rows}
    widths, strides = sorted({w for w, _ in cells}), sorted({s for _, s in cells})
    grid = np.full((len(widths), len(strides)), np.nan)
    for (w, s), row in cells.items():
        grid[widths.index(w), strides.index(s)] = row[metric]
    fig, ax = plt.subplots(figsize=(1.2 * len(strides) + 3, 0.6 * len(widths) + 2))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            depth = cells[(widths[i], strides[j])]["depth"]
            ax.text(j, i, f"{value:.3f}\n{depth} L", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(strides)), strides)
    ax.set_yticks(range(len(widths)), widths)
    ax.set_xlabel("stride")
    ax.set_ylabel("window width")
    ax.set_title(f"self-merge {metric} (base {table.base[metric]:.3f}, {table.base['depth']} layers)", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_effects(table: Table, path: Path) -> None:
    """Loss increase and mean KL of every variant, in sweep order."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(table.rows) + 2), 4))
    x = np.arange(len(table.rows))
    if "loss" in table.rows[0]:
        ax.bar(x, [r["loss"] - table.base["loss"] for r in table.rows], color="tab:blue", label="loss - base loss")
    if "mean_kl" in table.rows[0]:
        ax.plot(x, [r["mean_kl"] for r in table.rows], "o", color="tab:red", ms=3, label="mean KL to base")
    ax.set_xticks(x, [r["name"] for r in table.rows], rotation=90, fontsize=6)
    ax.set_title(f"{table.sweep} on {Path(table.model).name}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
