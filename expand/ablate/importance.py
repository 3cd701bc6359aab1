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
