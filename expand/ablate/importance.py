"""Layer importance from one forward of the base: Block Influence (ShortGPT) and angular distance (Gromov et
al.), and their rank correlations with the measured effect of removing each layer or block."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from expand.ablate.evaluate import EvalSet
from expand.ablate.sweeps import Sweep
from expand.container import Model
from expand.distributed import to_host


@jax.jit
def _cosines(hidden: jax.Array) -> jax.Array:
    """hidden (N + 1, B, T, d) -> (N + 1, N + 1, B, T) cosine of every pair of residual states."""
    h = hidden.astype(jnp.float32)
    unit = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-30)
    return jnp.einsum("ibtd,jbtd->ijbt", unit, unit)


def importance(model: Model, evals: EvalSet, block_sizes: Sequence[int] = (1,)) -> dict:
    """Block Influence per layer and angular distance per block of n layers (expand.ablate), over the eval
    sequences: {"block_influence": [N], "angular_distance": {n: [N - n + 1]}, "windows": the same per eval
    sequence, [N][S] and {n: [N - n + 1][S]}} (the bootstrap resamples the sequences)."""
    n_layers = model.config.num_hidden_layers
    adjacent, last_token = [], []
    for hidden in evals.base.hidden:
        cos = to_host(_cosines(hidden)).astype(np.float64)  # (N+1, N+1, B, T)
        adjacent.append(np.stack([cos[i, i + 1].mean(axis=-1) for i in range(n_layers)]))  # (N, B)
        last_token.append(cos[..., -1])  # (N+1, N+1, B)
    block_influence = 1.0 - np.concatenate(adjacent, axis=1)  # (N, S): every window has T positions
    angles = np.arccos(np.clip(np.concatenate(last_token, axis=-1), -1.0, 1.0)) / np.pi  # (N+1, N+1, S)
    distances = {int(n): np.stack([angles[l, l + n] for l in range(n_layers - n + 1)]) for n in block_sizes}
    return {"block_influence": block_influence.mean(axis=1).tolist(),
            "angular_distance": {n: d.mean(axis=1).tolist() for n, d in distances.items()},
            "windows": {"block_influence": block_influence.tolist(),
                        "angular_distance": {n: d.tolist() for n, d in distances.items()}}}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def effects_and_scores(sweep: Sweep, scores: dict, rows: list[dict], base: dict,
                       windows: bool = False) -> tuple[dict, dict]:
    """The measured effect of removing each layer (delete-one) or block (delete-block:n) -- mean KL to the
    base, and the loss increase -- and the importance scores that should predict it, one value per variant;
    with windows=True the per-window values instead, (variants, S) arrays (for the bootstrap). Empty for
    other sweeps."""
    if sweep.kind not in ("delete-one", "delete-block") or "mean_kl" not in base | rows[0]:
        return {}, {}
    n = sweep.block

    def values(holder: dict, key: str):
        return np.asarray(holder["windows"][key]) if windows else np.asarray(holder[key])

    measured = {"mean_kl": np.stack([values(r, "mean_kl") for r in rows])}
    if "loss" in rows[0]:
        measured["loss_increase"] = np.stack([values(r, "loss") - values(base, "loss") for r in rows])
    source = scores["windows"] if windows else scores
    predictors = {f"angular_distance_n{n}": np.asarray(source["angular_distance"][n])}
    if n == 1:
        predictors["block_influence"] = np.asarray(source["block_influence"])
    return measured, predictors


def correlations(sweep: Sweep, scores: dict, rows: list[dict], base: dict) -> dict:
    """Spearman rank correlation of each importance score with each measured effect of removal."""
    measured, predictors = effects_and_scores(sweep, scores, rows, base)
    return {f"{p} vs {m}": spearman(pv, mv) for p, pv in predictors.items() for m, mv in measured.items()}
