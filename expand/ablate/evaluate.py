"""Evaluating depth variants on one copy of the weights: the eval set (token batches, the base's logits with
their logsumexp, and its residual stream, kept on the device), and each variant's metrics, resumed from
where it departs from a trunk: one compiled function runs the variant's remaining slots, its lm_head and
the comparison with the base (one log-softmax of the variant over the vocabulary)."""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from expand.ablate.sweeps import plan_of
from expand.check import Reference, compare_with, reference_of
from expand.container import Model
from expand.distributed import to_host
from expand.model import forward
from expand.params import param_count
from expand.surgery.plan import LayerPlan

METRICS = ("loss", "ppl", "mean_kl", "top1", "max_abs_logit_delta", "params", "finite")


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
    """The eval tokens split into equal batches (one compiled shape), with the base's side of the comparison
    per batch (`expand.check.Reference`: logits (B, T, V), their logsumexp, top-1, finiteness) and the base
    as a trunk, all on the device: each variant costs at most one forward, and only from the first slot
    where it departs from the base."""

    batches: list[jax.Array]
    references: list[Reference]
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
    return EvalSet(batches, [reference_of(logits) for logits, _ in runs], Trunk(base, [hidden for _, hidden in runs]))


def trunk_of(model: Model, evals: EvalSet, plan: LayerPlan) -> Trunk:
    """The plan's residual stream on every eval batch (one forward each)."""
    return Trunk(plan, [run_with_hidden(model, tokens, plan)[1] for tokens in evals.batches])


def _resumed(model: Model, evals: EvalSet, batch: int, plan: LayerPlan, trunk: Trunk | None) -> dict:
    """forward's arguments for the plan on eval batch `batch`, resumed from the trunk's (default: the base's)
    residual stream after their shared prefix."""
    trunk = trunk or evals.base
    k = trunk.shared_prefix(plan)
    return dict(layer_ids=jnp.asarray(plan.layer_ids), slot_scales=plan.slot_scales(),
                resume=(jnp.int32(k), trunk.hidden[batch][k]))


def variant_logits(model: Model, evals: EvalSet, batch: int, plan: LayerPlan,
                   trunk: Trunk | None = None) -> jax.Array:
    """Logits (B, T, V) of the plan on eval batch `batch`, run virtually on the model's weights and resumed
    from the trunk's (default: the base's) residual stream after their shared prefix: removing layer i from
    the base runs only slots i .. N-2. The prefix length is data, so every plan of one length shares one
    compiled forward."""
    return forward(model.params, evals.batches[batch], model.config, **_resumed(model, evals, batch, plan, trunk))


@partial(jax.jit, static_argnames="config")
def _variant_stats(params, tokens, config, layer_ids, slot_scales, resume, reference):
    """`variant_logits` and `compare_with` the base in one compiled function: per-position stats (B, T)."""
    logits = forward(params, tokens, config, layer_ids=layer_ids, slot_scales=slot_scales, resume=resume)
    return compare_with(reference, logits, tokens)


def evaluate(model: Model, evals: EvalSet, plan: LayerPlan, trunk: Trunk | None = None) -> dict:
    """The metrics of one variant (see expand.ablate), over the eval sequences; the variant starts from the
    trunk (default: the base) where it departs from it. `windows` holds loss, mean_kl and top1 of each eval
    sequence (all of one length, so each metric is the mean of its windows; the bootstrap resamples them).
    `finite` is False when any logit of the variant or the base is NaN or inf; its metrics are then NaN
    (never a number that looks fine)."""
    windows: dict[str, list[np.ndarray]] = {"loss": [], "mean_kl": [], "top1": []}
    delta, finite = 0.0, True
    for batch, (tokens, reference) in enumerate(zip(evals.batches, evals.references)):
        stats = to_host(_variant_stats(model.params, tokens, model.config, reference=reference,
                                       **_resumed(model, evals, batch, plan, trunk)))
        finite = finite and bool(stats["finite"].all())
        windows["loss"].append(stats["nll"].astype(np.float64).mean(axis=1))
        windows["mean_kl"].append(stats["kl"].astype(np.float64).mean(axis=1))
        windows["top1"].append(stats["agree"].mean(axis=1, dtype=np.float64))
        delta = max(delta, float(stats["max_abs_delta"].max()))
    per_window = {name: np.concatenate(values) for name, values in windows.items()}
    measured = {name: float(values.mean()) for name, values in per_window.items()}
    measured = {"loss": measured["loss"], "ppl": math.exp(measured["loss"]), "mean_kl": measured["mean_kl"],
                "top1": measured["top1"], "max_abs_logit_delta": delta}
    if not finite:
        measured = {name: math.nan for name in measured}
        per_window = {name: np.full_like(values, np.nan) for name, values in per_window.items()}
    return {**measured, "params": param_count(model.config.replace(num_hidden_layers=plan.num_layers)),
            "finite": finite, "windows": {name: values.tolist() for name, values in per_window.items()}}
