"""The frankenllama miniature: SmolLM2-135M (576 wide, 9/3 heads, 1536 MLP) widened to the SmolLM2-360M
shape (960, 15/5, 2560) in every mode, with two donors: a random one, and a self-donor (SmolLM2 tiled x2 by
the exact `duplicate` mode, 1152 wide, cropped to 960); `exact` also without a donor (each fill), and the
`duplicate` mode itself (x2, to 1152, with and without zero-sum noise). For each variant: max |delta logit|,
KL and top-1 agreement against the base on the shipped text `expand-docs` (expand.check; its sha256 is
recorded in results.json under "texts"), and which fraction of each tensor's new entries gets exactly zero
gradient at init (LM loss on the same text). "New" entries: those at a position the base does not have
(appended by exact, frankenllama, zero-norm); in duplicate mode, where every position copies a base one,
the copies beyond the first (positions d .. 2d - 1 of a tiled axis).

    python -m experiments.frankenllama.run [NAME ...]   # writes results.json and drift.png beside this file

results.json is rewritten after every variant (each with its own wall time and load average); given
variant names (or a prefix of them, e.g. "duplicate"), only those run and replace their entries, so a run
cut short resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import expand
from expand.check import check, run_base
from expand.model import lm_loss
from expand.params import init_params, tensor_specs
from expand.surgery.width import AxisMap, new_positions, width_plan
from expand.text import DEFAULT_TEXT, shipped_text, text_sha256, token_batch
from experiments.benchlib import write_json

HERE = Path(__file__).parent
TARGET = dict(hidden_size=960, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560)
DOUBLE = dict(hidden_size=1152, num_attention_heads=18, num_key_value_heads=6, intermediate_size=3072)
DONOR_MODES = [dict(mode="exact"), dict(mode="frankenllama"), dict(mode="frankenllama", triangular=True),
               dict(mode="zero-norm")]
NO_DONOR = [("exact, fill random", dict(TARGET, mode="exact", fill="random")),
            ("exact, fill zeros", dict(TARGET, mode="exact", fill="zeros")),
            ("duplicate x2 (1152 wide)", dict(DOUBLE, mode="duplicate")),
            ("duplicate x2, zero-sum noise 0.01", dict(DOUBLE, mode="duplicate", noise=0.01))]


def later_copies(axis_map: AxisMap) -> AxisMap:
    """The map with every position that repeats an earlier one's source marked new (-1): in a tiled map
    (duplicate mode) the copies beyond the first; appended positions stay new, first occurrences stay old."""
    seen, source = set(), []
    for s in axis_map.source:
        source.append(-1 if s < 0 or s in seen else s)
        seen.add(s)
    return AxisMap(tuple(source))


def zero_gradient_blocks(base_config, config, grads, options) -> dict[str, float]:
    """For each tensor: the fraction of its new entries (any axis at a new position; in duplicate mode at
    a later copy, `later_copies`) whose gradient is exactly 0."""
    plan = width_plan(base_config, **{k: v for k, v in options.items() if k != "donor"})
    maps = {axis: later_copies(m) for axis, m in plan.maps.items()} if plan.mode == "duplicate" else plan.maps
    out = {}
    for spec in tensor_specs(config):
        g = np.asarray(grads[spec.name])
        per_layer = g.shape[1:] if spec.stacked else g.shape
        new = np.asarray(new_positions(spec.axes, set(spec.axes), maps, per_layer))
        new = np.broadcast_to(new, g.shape)
        if new.any():
            out[spec.name] = float((g[new] == 0).mean())
    return out


def main(names: list[str]) -> None:
    base = expand.load("smollm2")
    text = shipped_text(DEFAULT_TEXT)
    tokens = token_batch(base, text, 512, 4)
    reference = run_base(base, tokens, "fp32")
    grad_tokens = jnp.asarray(tokens[:1, :257])
    results = {"base": "SmolLM2-135M-Instruct", "texts": {DEFAULT_TEXT: text_sha256(text)}, "target": TARGET,
               "tokens": list(tokens.shape), "fp32_floor": reference.floor, "variants": []}
    done = json.loads((HERE / "results.json").read_text())["variants"] if names else []
    order = [name for name, _, _ in variants(base, build=False)]
    for name, options, donor_name in variants(base, wanted=names):
        start, load = time.perf_counter(), os.getloadavg()[0]
        config, params = expand.widen(base.config, base.params, **options)
        report = check(base, expand.Model(config, params, "widened"), tokens=tokens, base_run=reference, name=name)
        grads = jax.grad(lm_loss)(params, grad_tokens, config)
        zero = zero_gradient_blocks(base.config, config, grads, options)
        done = [v for v in done if v["name"] != name] + [{
            "name": name, "options": {k: v for k, v in options.items() if k != "donor"}, "donor": donor_name,
            "max_abs_logit_delta": report.max_abs_logit_delta, "mean_kl": report.mean_kl,
            "top1_agreement": report.top1_agreement, "verdict": report.verdict,
            "first_drift_layer": report.first_drift_layer,
            "new_entries_with_zero_gradient": zero, "wall_s": round(time.perf_counter() - start, 1),
            "load_average_1min": {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)},
        }]
        results["variants"] = sorted(done, key=lambda v: order.index(v["name"]))
        write_json(HERE / "results.json", results)
        print(f"{name:45s} max|dlogit| {report.max_abs_logit_delta:9.2e} KL {report.mean_kl:8.2e} "
              f"top-1 {report.top1_agreement:6.1%} {report.verdict}; all-zero-gradient new blocks: "
              f"{[k for k, v in zero.items() if v == 1.0]}", flush=True)
        del config, params, grads, options  # freed before the next variant is built
    plot(results, HERE / "drift.png")


def variants(base, wanted: list[str] = (), build: bool = True):
    """(name, widen options, donor name) of every variant (those whose name starts with one of `wanted`, if
    given); each donor is built when its variants come and dropped after them, so at most one donor is in
    memory (with every donor at once the study needs 11 GB). build=False: the names only."""
    def chosen(name: str) -> bool:
        return not wanted or any(name.startswith(w) for w in wanted)

    donors = {"random donor": lambda: expand.Model(*_random_donor(base.config), source="random"),
              "self-donor (SmolLM2 tiled x2)": lambda: _self_donor(base)}
    for donor_name, make in donors.items():
        names = [f"{o['mode']}{' triangular' if o.get('triangular') else ''}, {donor_name}" for o in DONOR_MODES]
        if not any(map(chosen, names)):
            continue
        donor = make() if build else None
        for name, o in zip(names, DONOR_MODES):
            if chosen(name):
                yield name, dict(TARGET, **o, donor=(donor.config, donor.params) if build else None), donor_name
        del donor
    for name, options in NO_DONOR:
        if chosen(name):
            yield name, options, None


def _random_donor(base_config):
    config = base_config.replace(**TARGET)
    return config, init_params(config, jax.random.key(1), std=0.04)


def _self_donor(base):
    config, params = expand.widen(base.config, base.params, **DOUBLE, mode="duplicate")
    return expand.Model(config, params, "smollm2 x2")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    values = [max(v["max_abs_logit_delta"], 1e-6) for v in variants]
    ax.barh(range(len(variants)), values, color=["tab:green" if v["verdict"] == "preserved" else "tab:red"
                                                 for v in variants])
    ax.axvline(10 * results["fp32_floor"], color="k", ls="--", lw=1, label="10 x fp32 floor")
    ax.set_yticks(range(len(variants)), [v["name"] for v in variants], fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("max |delta logit| vs SmolLM2-135M (fp32, 4 x 512 tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1:])
