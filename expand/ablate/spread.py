"""How far an ablation's numbers would move on other text: bootstrap intervals over the eval windows.

Every metric of a variant (loss, mean KL, top-1) and every importance score is a mean over the eval
sequences ("windows"), all of one length. A bootstrap draw resamples the S windows with replacement and
recomputes each mean from the same draw for every variant and every score, so rank correlations are
recomputed on consistent draws too. The interval is the central `level` mass of `draws` draws (percentile
bootstrap). Two numbers differ, as far as this text can tell, only where their intervals separate.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from expand.ablate.importance import effects_and_scores, spearman
from expand.ablate.sweeps import Sweep

METRICS_WITH_SPREAD = ("loss", "mean_kl", "top1")


def percentile_interval(samples: np.ndarray, level: float) -> list[float]:
    """[low, high] holding the central `level` of the samples (along axis 0)."""
    tail = (1.0 - level) / 2 * 100
    return np.percentile(samples, [tail, 100 - tail], axis=0).tolist()


def window_draws(num_windows: int, draws: int, seed: int) -> np.ndarray:
    """(draws, S) indices of resampled windows."""
    return np.random.default_rng(seed).integers(0, num_windows, size=(draws, num_windows))


def metric_intervals(windows: dict[str, Sequence[float]], draws: np.ndarray, level: float) -> dict[str, list[float]]:
    """{metric: [low, high]} for one row's per-window values."""
    return {name: percentile_interval(np.asarray(windows[name])[draws].mean(axis=1), level)
            for name in METRICS_WITH_SPREAD if name in windows}


def correlation_intervals(measured_windows: dict[str, np.ndarray], score_windows: dict[str, np.ndarray],
                          draws: np.ndarray, level: float) -> dict[str, list[float]]:
    """{'score vs effect': [low, high]} of Spearman correlations recomputed on every draw.

    measured_windows: effect -> (variants, S) per-window values; score_windows: score -> (variants, S)."""
    out = {}
    for score, s_windows in score_windows.items():
        for effect, m_windows in measured_windows.items():
            rhos = [spearman(s_windows[:, d].mean(axis=1), m_windows[:, d].mean(axis=1)) for d in draws]
            out[f"{score} vs {effect}"] = percentile_interval(np.asarray(rhos), level)
    return out


def bootstrap(sweep: Sweep, scores: dict, rows: list[dict], base: dict, draws: int = 1000, seed: int = 0,
              level: float = 0.95) -> tuple[list[dict], dict]:
    """Intervals of every row (the base's first) and of every rank correlation, from one set of `draws`
    resamplings of the eval windows. Returns ([{metric: [low, high]}] for base + rows, {correlation: [low,
    high]}); both empty when there is a single window."""
    num_windows = len(base["windows"]["loss"])
    if num_windows < 2:
        return [{} for _ in range(len(rows) + 1)], {}
    chosen = window_draws(num_windows, draws, seed)
    row_intervals = [metric_intervals(row["windows"], chosen, level) for row in [base, *rows]]
    measured, predictors = effects_and_scores(sweep, scores, rows, base, windows=True)
    return row_intervals, correlation_intervals(measured, predictors, chosen, level)
