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
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from expand.container import Model
from expand.distributed import to_host
from expand.model import forward
from expand.numerics import accumulation_dtype, kl_from_log_probs, log_partition, picked
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


# ---- running ----------------------------------------------------------------------------------------------


def run(model: Model, tokens, dtype, layer_ids=None, slot_scales=None) -> tuple[jax.Array, jax.Array]:
    """(logits (B, T, V) float, hidden (N + 1, B, T, d)) of a model in `dtype`, on the model's devices."""
    params = {name: value.astype(dtype) for name, value in model.params.items()}
    return forward(params, tokens, model.config, layer_ids=layer_ids, slot_scales=slot_scales, return_hidden=True)


def run_in(dtype_name: str, model: Model, tokens, layer_ids=None, slot_scales=None) -> tuple[np.ndarray, np.ndarray]:
    """`run` in a dtype named by DTYPES, fetched to every process as numpy (logits, hidden)."""
    with jax.enable_x64(dtype_name == "fp64"):
        return to_host(run(model, tokens, DTYPES[dtype_name], layer_ids, slot_scales))


def reference_dtype(dtype_name: str) -> str:
    """The dtype whose difference from `dtype_name` is that dtype's floor."""
    return {"fp32": "fp64", "bf16": "fp32", "fp64": "fp32"}[dtype_name]


class Reference(NamedTuple):
    """The base's side of every comparison on one token batch, computed once (`reference_of`): its logits
    (B, T, V), their logsumexp (B, T) over the vocabulary (log p = logits - lse), its top-1 token (B, T)
    and whether each position's logits are all finite (B, T)."""

    logits: jax.Array
    lse: jax.Array
    top1: jax.Array
    finite: jax.Array


@jax.jit
def reference_of(base_logits) -> Reference:
    z = base_logits.astype(accumulation_dtype(base_logits.dtype))
    return Reference(base_logits, log_partition(z), jnp.argmax(z, -1).astype(jnp.int32),
                     jnp.isfinite(z).all(-1))


@jax.jit
def compare_with(reference: Reference, logits, tokens) -> dict[str, jax.Array]:
    """Per-position comparison of a candidate's logits z (B, T, V) with the base's (`Reference`) on the same
    tokens (B, T), in the logits' precision (at least float32): one log-softmax of the candidate (log q =
    z - max z - log sum exp(z - max z)) and one pass over the base's (log p = logits - lse, p = exp log p).
    The one place where check and ablate get their numbers.

    kl (B, T): KL(base || candidate) = sum_v p_v (log p_v - log q_v) (a token the base gives p = 0 adds 0),
        clipped at 0 (rounding).
    agree (B, T): the base's top-1 token has the candidate's largest logit (argmax of candidate == argmax of
        base; an exact tie at the top counts as agreement).
    max_abs_delta (B, T): max_v |logit_candidate - logit_base| (inf where a difference is NaN).
    nll (B, T - 1): -log q(tokens[:, t + 1]) at position t, the candidate's next-token loss terms
        (its mean is `lm_loss`).
    finite (B, T): every logit of both is finite at this position: the base's are, the candidate's
        log-partition is finite (a NaN or +inf logit makes it NaN) and so is max_abs_delta (a -inf logit
        makes it inf). Where it is False the other numbers mean nothing: callers must look at it first.

    (Written for XLA:CPU's fast reductions: no argmax and no separate finiteness pass over V per call, the
    differences' NaN test as a `where` (which XLA:CPU reduces in a faster loop than a bare |.|), the
    log-partition and KL terms of `expand.numerics`.)"""
    acc = accumulation_dtype(logits.dtype)
    z, base = logits.astype(acc), reference.logits.astype(acc)
    lse = log_partition(z)
    kl = jnp.maximum(kl_from_log_probs(base - reference.lse[..., None].astype(acc), z - lse[..., None]), 0.0)
    difference = z - base
    max_abs_delta = jnp.where(jnp.isnan(difference), jnp.inf, jnp.abs(difference)).max(-1)
    length = tokens.shape[1] - 1
    return {"kl": kl, "agree": picked(z, reference.top1) == z.max(-1), "max_abs_delta": max_abs_delta,
            "nll": lse[:, :length] - picked(z[:, :length], jnp.asarray(tokens)[:, 1:]),
            "finite": reference.finite & jnp.isfinite(lse) & jnp.isfinite(max_abs_delta)}


def compare_logits(base_logits, logits, tokens) -> dict[str, jax.Array]:
    """`compare_with` the base's logits (B, T, V) directly (for one comparison)."""
    return compare_with(reference_of(base_logits), logits, tokens)


@jax.jit
def _max_abs_difference(a, b):
    acc = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    return jnp.abs(a.astype(acc) - b.astype(acc)).max()


@jax.jit
def _drift(hidden, index, reference, reference_index):
    """Residual streams hidden (N + 1, B, T, d') and reference (L + 1, B, T, d), pairs (index[k],
    reference_index[k]) -> (K,) relative drift max |hidden[i][..., :d] - reference[j]| / max |reference[j]| of
    each pair, one pair at a time (no (K, B, T, d) gather). A width candidate is compared on the base's first
    d coordinates."""
    d = reference.shape[-1]

    def one(k):
        h, ref = hidden[index[k]][..., :d], reference[reference_index[k]]
        acc = jnp.promote_types(jnp.promote_types(h.dtype, ref.dtype), jnp.float32)
        scale = jnp.abs(ref).max().astype(acc)
        return jnp.abs(h.astype(acc) - ref.astype(acc)).max() / jnp.where(scale > 0, scale, 1.0)

    return jax.lax.map(one, jnp.arange(index.shape[0]))


@jax.jit
def _finite_slots(hidden):
    """hidden (N + 1, B, T, d) -> (N + 1,) whether each residual state is all finite."""
    return jnp.isfinite(hidden).reshape(hidden.shape[0], -1).all(axis=1)


def first_nonfinite_slot(finite_slots: np.ndarray) -> int | None:
    """(N + 1,) finiteness of the residual stream (`_finite_slots`) -> the first slot whose output holds a
    NaN or inf (-1: the embeddings), or None when all is finite."""
    bad = ~np.asarray(finite_slots)
    return int(np.argmax(bad)) - 1 if bad.any() else None


@dataclasses.dataclass
class BaseRun:
    """The base's outputs on one token batch, on its devices (`reference`: its logits as every comparison
    reads them; `hidden` (L + 1, B, T, d) its residual stream), and the floor measured against the reference
    dtype (computed once, reused for every candidate checked against the same base and tokens)."""

    reference: Reference
    hidden: jax.Array
    floor: float
    layer_floor: list[float]
    logit_std: float
    finite: bool


def run_base(base: Model, tokens: np.ndarray, dtype_name: str) -> BaseRun:
    reference_name = reference_dtype(dtype_name)
    with jax.enable_x64("fp64" in (dtype_name, reference_name)):
        logits, hidden = run(base, tokens, DTYPES[dtype_name])
        ref_logits, ref_hidden = run(base, tokens, DTYPES[reference_name])
        every_layer = jnp.arange(hidden.shape[0])
        floor, layer_floor, std, finite = to_host((
            _max_abs_difference(logits, ref_logits), _drift(hidden, every_layer, ref_hidden, every_layer),
            jnp.std(logits.astype(accumulation_dtype(logits.dtype))), jnp.isfinite(logits).all()))
        reference = reference_of(logits)
    floor, layer_floor = float(floor), [float(f) for f in layer_floor]
    if dtype_name == "fp64":
        floor *= EPS_RATIO_64_32
        layer_floor = [f * EPS_RATIO_64_32 for f in layer_floor]
    return BaseRun(reference, hidden, floor, layer_floor, float(std), bool(finite))


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
    mapping = layer_map(base, cand)
    with jax.enable_x64(dtype == "fp64"):
        logits, hidden = run(cand.model, tokens, DTYPES[dtype], cand.layer_ids, cand.slot_scales)
        stats, drifts, finite_slots = to_host((
            compare_with(base_run.reference, logits, tokens),
            _drift(hidden, jnp.arange(1, len(mapping) + 1), base_run.hidden, jnp.asarray(mapping) + 1),
            _finite_slots(hidden)))
    nonfinite = int((~stats["finite"]).sum())
    bad_weights = nonfinite_tensors(cand.model.params)
    base_is_finite = base_run.finite and math.isfinite(base_run.floor) and not nonfinite_tensors(base.params)
    tolerance = FLOOR_FACTOR * base_run.floor
    layers, first = [], None
    for slot, base_layer in enumerate(mapping):
        drift, floor = float(drifts[slot]), base_run.layer_floor[base_layer + 1]
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
        base_logit_std=base_run.logit_std, nonfinite_positions=nonfinite,
        first_nonfinite_slot=first_nonfinite_slot(finite_slots), base_is_finite=base_is_finite,
        nonfinite_weights=bad_weights,
    )
