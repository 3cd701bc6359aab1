"""Is the candidate the same function as the base? Both models run jit-compiled on the same token batch;
the report gives max |delta logit|, KL(base || candidate) (mean and max over positions), top-1 agreement,
and per-layer drift of the residual stream where layers correspond.

"Preserved" means: within the numerical floor of the dtype, measured on the same inputs. The floor of
fp32 is the base in fp32 against the base in float64; the floor of bf16 is the base in bf16 against
the base in fp32; the floor of fp64 is the fp32 floor scaled by the ratio of machine epsilons
(2^-52 / 2^-23). A candidate is `preserved` when its max |delta logit| is at most FLOOR_FACTOR times the
floor: an exact transformation only reorders rounding (about 1x the floor), a real change moves logits by
orders of magnitude more (the demo table in the README shows both on SmolLM2).

A NaN or inf in any logit of base or candidate is its own verdict, `non-finite`, whatever the other numbers
say (XLA's max skips NaNs, so a broken model can show a small max |delta logit|); the report names the
first slot whose output is non-finite. So is a NaN or inf anywhere in either model's weights, even where
these tokens never read it (a row of an unused token).

Layers correspond through the candidate's provenance: slot s of a depth candidate maps to base layer
layer_map[s], and its output is compared with that layer's output; a width candidate is compared on the
base's first d residual coordinates. Drift per layer is max |delta h| / max |h_base| (relative, because the
residual stream grows with depth), and the first layer whose drift exceeds FLOOR_FACTOR times that
layer's floor is named.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from expand.container import Model
from expand.model import forward
from expand.numerics import accumulation_dtype, kl_divergence, next_token_nll
from expand.params import nonfinite_tensors
from expand.provenance import Provenance
from expand.surgery.plan import LayerPlan, plan_from_layer_spec

FLOOR_FACTOR = 10.0
EPS_RATIO_64_32 = 2.0**-52 / 2.0**-23
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp64": jnp.float64}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """What runs as the candidate: params and config, the slots to run, and the slot -> base layer map."""

    name: str
    model: Model
    layer_ids: np.ndarray | None = None
    slot_scales: dict | None = None
    provenance: Provenance | None = None


@dataclasses.dataclass
class Report:
    base: str
    candidate: str
    dtype: str
    tokens: tuple[int, int]
    max_abs_logit_delta: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    floor: float
    tolerance: float
    verdict: str
    layers: list[dict]
    first_drift_layer: int | None
    base_logit_std: float
    nonfinite_positions: int = 0
    first_nonfinite_slot: int | None = None
    base_is_finite: bool = True
    nonfinite_weights: list[str] = dataclasses.field(default_factory=list)

    @property
    def preserved(self) -> bool:
        return self.verdict == "preserved"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


# ---- inputs ------------------------------------------------------------------------------------------------


def as_candidate(base: Model, candidate, name: str | None = None) -> Candidate:
    """A candidate from a Model, a path, a LayerPlan or a layer spec string (run virtually on the base)."""
    from expand.io import load

    if isinstance(candidate, Candidate):
        return candidate
    if isinstance(candidate, str) and not Path(candidate).exists() and any(c in candidate for c in ":,"):
        candidate = plan_from_layer_spec(candidate, base.config.num_hidden_layers)
    if isinstance(candidate, LayerPlan):
        lineage = candidate.lineage_after(base.lineage())
        return Candidate(name or f"{base.source} [{candidate.description}]", base, candidate.layer_ids,
                         candidate.slot_scales(), lineage)
    model = candidate if isinstance(candidate, Model) else load(candidate)
    return Candidate(name or str(model.source), model, None, None, model.provenance)


def check_compatible(base: Model, candidate: Candidate) -> None:
    b, c = base.config, candidate.model.config
    if b.vocab_size != c.vocab_size:
        raise ValueError(f"the candidate's vocab ({c.vocab_size}) differs from the base's ({b.vocab_size}): "
                         "logits cannot be compared token by token")
    if c.hidden_size < b.hidden_size:
        raise ValueError(f"the candidate is narrower ({c.hidden_size}) than the base ({b.hidden_size})")
    slots = c.num_hidden_layers if candidate.layer_ids is None else len(candidate.layer_ids)
    if candidate.provenance is None and slots != b.num_hidden_layers:
        raise ValueError(
            f"the candidate has {slots} layers and the base {b.num_hidden_layers}, and no provenance (expand.json) "
            "says which base layer each slot corresponds to: write it with expand depth, or compare logits of "
            "models of equal depth"
        )


def layer_map(base: Model, candidate: Candidate) -> list[int]:
    """For each candidate slot, the base layer whose output it should reproduce."""
    if candidate.provenance is not None:
        return list(candidate.provenance.layer_map)
    return list(range(base.config.num_hidden_layers))


# ---- running -----------------------------------------------------------------------------------------------


def run(model: Model, tokens: np.ndarray, dtype, layer_ids=None, slot_scales=None) -> tuple[np.ndarray, np.ndarray]:
    """(logits (B, T, V) float, hidden (N + 1, B, T, d)) of a model in `dtype`, as numpy."""
    params = {name: value.astype(dtype) for name, value in model.params.items()}
    logits, hidden = forward(params, tokens, model.config, layer_ids=layer_ids, slot_scales=slot_scales,
                             return_hidden=True)
    return np.asarray(logits), np.asarray(hidden)


def run_in(dtype_name: str, model: Model, tokens, layer_ids=None, slot_scales=None):
    with jax.enable_x64(dtype_name == "fp64"):
        return run(model, tokens, DTYPES[dtype_name], layer_ids, slot_scales)


def reference_dtype(dtype_name: str) -> str:
    """The dtype whose difference from `dtype_name` is that dtype's floor."""
    return {"fp32": "fp64", "bf16": "fp32", "fp64": "fp32"}[dtype_name]


@jax.jit
def compare_logits(base_logits, logits, tokens) -> dict[str, jax.Array]:
    """Per-position comparison of a candidate's logits (B, T, V) with the base's on the same tokens (B, T),
    in the logits' precision (at least float32). The one place where check and ablate get their numbers.

    kl (B, T): KL(base || candidate) = sum_v p_v (log p_v - log q_v), clipped at 0 (rounding).
    agree (B, T): argmax of candidate == argmax of base.
    max_abs_delta (B, T): max_v |logit_candidate - logit_base|.
    nll (B, T - 1): -log q(tokens[:, t + 1]) at position t, the candidate's next-token loss terms
        (its mean is `lm_loss`).
    finite (B, T): every logit of both is finite at this position. Where it is False the other numbers mean
        nothing (XLA's max skips NaN, so max_abs_delta can look small): callers must look at it first."""
    kl = jnp.maximum(kl_divergence(base_logits, logits), 0.0)
    agree = jnp.argmax(base_logits, -1) == jnp.argmax(logits, -1)
    nll = next_token_nll(logits, tokens)
    acc = accumulation_dtype(logits.dtype)
    delta = jnp.abs(logits.astype(acc) - base_logits.astype(acc)).max(-1)
    finite = jnp.isfinite(base_logits).all(-1) & jnp.isfinite(logits).all(-1)
    return {"kl": kl, "agree": agree, "max_abs_delta": delta, "nll": nll, "finite": finite}


def first_nonfinite_slot(hidden: np.ndarray) -> int | None:
    """hidden (N + 1, B, T, d) residual stream -> the first slot whose output holds a NaN or inf (-1: the
    embeddings), or None when all is finite."""
    bad = ~np.isfinite(hidden.reshape(hidden.shape[0], -1)).all(axis=1)
    return int(np.argmax(bad)) - 1 if bad.any() else None


def relative_drift(hidden: np.ndarray, reference: np.ndarray) -> float:
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(hidden.astype(np.float64) - reference.astype(np.float64)).max() / scale)


@dataclasses.dataclass
class BaseRun:
    """The base's outputs in the checked dtype and in the floor's reference dtype (computed once, reused
    for every candidate checked against the same base and tokens)."""

    logits: np.ndarray
    hidden: np.ndarray
    floor: float
    layer_floor: list[float]


def run_base(base: Model, tokens: np.ndarray, dtype_name: str) -> BaseRun:
    logits, hidden = run_in(dtype_name, base, tokens)
    ref_logits, ref_hidden = run_in(reference_dtype(dtype_name), base, tokens)
    floor = float(np.abs(logits.astype(np.float64) - ref_logits).max())
    layer_floor = [relative_drift(hidden[i], ref_hidden[i]) for i in range(len(hidden))]
    if dtype_name == "fp64":
        floor *= EPS_RATIO_64_32
        layer_floor = [f * EPS_RATIO_64_32 for f in layer_floor]
    return BaseRun(logits, hidden, floor, layer_floor)


def check(base, candidate, tokens: np.ndarray | None = None, text: str | None = None, dtype: str = "fp32",
          base_run: BaseRun | None = None, name: str | None = None, seq_len: int = 512,
          num_sequences: int = 4) -> Report:
    """Compare a candidate with its base on one token batch.

    base: a Model or path. candidate: a Model, a path, a LayerPlan or a layer spec (virtual, on the base);
        or a mapping {name: candidate}, checked against one run of the base: returns {name: Report}.
    tokens (B, T): token ids; else `text` (default: expand's own documentation) is tokenized with the base's
        tokenizer into `num_sequences` sequences of `seq_len` tokens.
    base_run: the base's outputs from an earlier call with the same tokens (checking many candidates)."""
    from expand.io import load
    from expand.text import token_batch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp64")
    base = base if isinstance(base, Model) else load(base)
    if isinstance(candidate, Mapping):
        if tokens is None:
            tokens = token_batch(base, text, seq_len, num_sequences)
        base_run = base_run or run_base(base, np.asarray(tokens), dtype)
        return {key: check(base, value, tokens, dtype=dtype, base_run=base_run, name=key)
                for key, value in candidate.items()}
    cand = as_candidate(base, candidate, name)
    check_compatible(base, cand)
    if tokens is None:
        tokens = token_batch(base, text, seq_len, num_sequences)
    tokens = np.asarray(tokens)
    base_run = base_run or run_base(base, tokens, dtype)
    logits, hidden = run_in(dtype, cand.model, tokens, cand.layer_ids, cand.slot_scales)

    with jax.enable_x64(dtype == "fp64"):
        stats = jax.device_get(compare_logits(base_run.logits, logits, tokens))
    nonfinite = int((~stats["finite"]).sum())
    bad_weights = nonfinite_tensors(cand.model.params)
    base_is_finite = (bool(np.isfinite(base_run.logits).all()) and math.isfinite(base_run.floor)
                      and not nonfinite_tensors(base.params))
    tolerance = FLOOR_FACTOR * base_run.floor
    d = base.config.hidden_size
    layers, first = [], None
    for slot, base_layer in enumerate(layer_map(base, cand)):
        drift = relative_drift(hidden[slot + 1][..., :d], base_run.hidden[base_layer + 1])
        floor = base_run.layer_floor[base_layer + 1]
        drifted = not drift <= FLOOR_FACTOR * floor  # a NaN drift is drift
        layers.append({"slot": slot, "base_layer": base_layer, "drift": drift, "floor": floor, "drifted": drifted})
        if drifted and first is None:
            first = slot
    if nonfinite or bad_weights or not base_is_finite:
        verdict, delta, kl_mean, kl_max = "non-finite", math.nan, math.nan, math.nan
    else:
        delta, kl_mean, kl_max = float(stats["max_abs_delta"].max()), float(stats["kl"].mean()), float(stats["kl"].max())
        verdict = "preserved" if delta <= tolerance else "drifted"
    return Report(
        base=str(base.source), candidate=cand.name, dtype=dtype, tokens=tuple(tokens.shape),
        max_abs_logit_delta=delta, mean_kl=kl_mean, max_kl=kl_max, top1_agreement=float(stats["agree"].mean()),
        floor=base_run.floor, tolerance=tolerance, verdict=verdict, layers=layers, first_drift_layer=first,
        base_logit_std=float(base_run.logits.std()), nonfinite_positions=nonfinite,
        first_nonfinite_slot=first_nonfinite_slot(hidden), base_is_finite=base_is_finite,
        nonfinite_weights=bad_weights,
    )
