"""What the healing studies share: the data (training windows and held-out windows of the Python Language
Reference), one healing run recorded for a results file, the statistics over seeds, and the results file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from expand.heal import HealOptions, heal
from expand.text import shipped_text, text_sha256, token_batch

HERE = Path(__file__).parent
TEXT = "python-reference"
SEEDS = (0, 1, 2)
CURVE_KEYS = ("step", "loss", "lm", "kl")


def data(base) -> tuple[np.ndarray, np.ndarray]:
    """(training windows (S, 129), held-out windows (4, 256)) of the Python Language Reference: the held-out
    windows are its first 1,024 tokens, the training windows start after its first 16,384."""
    ids = token_batch(base, shipped_text(TEXT), 128, None).reshape(-1)
    train = ids[32 * 512:]
    rows = len(train) // 129
    return train[:rows * 129].reshape(rows, 129), ids[:1024].reshape(4, 256)


def texts() -> dict:
    return {TEXT: text_sha256(shipped_text(TEXT))}


def run(name: str, model, plan, train, held_out, teacher, options: dict, seed: int):
    """One healing run judged on the held-out windows (keep="last": the numbers after the last step).
    Returns (the record for the results file, the HealResult)."""
    start = time.perf_counter()
    options = HealOptions(**{**options, "seed": seed, "keep": "last"})
    result = heal(model, train, plan, teacher=teacher, options=options, eval_tokens=held_out)
    record = {"name": name, "seed": seed, "options": options.to_json(), "before": result.before,
              "after": result.held_out[-1], "held_out": result.held_out,
              "curve": [{k: h[k] for k in CURVE_KEYS} for h in result.history],
              "wall_s": round(time.perf_counter() - start)}
    before, after = record["before"], record["after"]
    print(f"{name:60s} seed {seed}  KL {before['kl']:.4f} -> {after['kl']:.4f}  top-1 {before['top1']:.1%} -> "
          f"{after['top1']:.1%}  loss {before['lm']:.3f} -> {after['lm']:.3f}  ({record['wall_s']} s)", flush=True)
    return record, result


def spread(values) -> dict:
    """mean, sample standard deviation, min and max of one number over seeds."""
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max()), "n": len(values)}


def settings(runs: list[dict]) -> dict:
    """Per setting (runs sharing a name): the spread over seeds of the held-out numbers after healing."""
    names = list(dict.fromkeys(r["name"] for r in runs))
    return {name: {key: spread([r["after"][key] for r in runs if r["name"] == name]) for key in ("kl", "top1", "lm")}
            for name in names}


def compare(summary: dict, a: str, b: str, key: str) -> dict:
    """Is setting a's `key` different from b's beyond the seed spread? resolved: the two ranges over seeds
    (min..max) do not overlap; otherwise the difference of the means is not resolved by these runs."""
    x, y = summary[a][key], summary[b][key]
    return {"a": a, "b": b, "key": key, "mean_a": x["mean"], "mean_b": y["mean"],
            "difference": x["mean"] - y["mean"], "resolved": x["max"] < y["min"] or y["max"] < x["min"]}


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


