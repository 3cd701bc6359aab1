"""The optimizer: clipped AdamW on the trainable tensors, a learning-rate schedule that does not depend on
the number of steps, updates of shared layers scaled by 1/k, frozen tensors kept bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from expand.heal.options import HealOptions
from expand.heal.student import GATES, Student, layer_factors, trainable_leaves
from expand.params import Params


def schedule(peak: float, options: HealOptions) -> optax.Schedule:
    """The learning rate at optimizer step t (0-based): a linear ramp from 0 to `peak` over options.warmup
    steps, then `peak`; with options.decay_steps, a cosine from `peak` at the end of the warmup down to
    peak/10 at decay_steps, then peak/10. It never reads options.steps, so a run extended with --resume
    follows the schedule an uninterrupted run of the longer length would."""
    if options.decay_steps is not None:
        return optax.warmup_cosine_decay_schedule(0.0, peak, options.warmup, options.decay_steps,
                                                  end_value=peak / 10)
    if options.warmup == 0:
        return optax.constant_schedule(peak)
    return optax.linear_schedule(0.0, peak, options.warmup)


def scale_layers(factors: np.ndarray) -> optax.GradientTransformation:
    """Multiply the update of every stacked layer tensor by factors[layer] (lr/k, or 0 to freeze)."""
    factors = jnp.asarray(factors)

    def update(updates, state, params=None):
        def one(name, u):
            if not name.startswith("layers.") or isinstance(u, optax.MaskedNode):
                return u
            return u * factors.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)

        return {name: one(name, u) for name, u in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm as one scalar: every update times min(1, max_norm / ||updates||_2). XLA fuses
    a multiply by a scalar into both of Adam's moment updates; optax's per-element divide is not fused
    (division counts as expensive), so it materialized a clipped copy of every gradient (538 MB for SmolLM2)."""

    def update(updates, state, params=None):
        norm = optax.global_norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree_util.tree_map(lambda u: u * factor.astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(options: HealOptions, student: Student) -> optax.GradientTransformation:
    """Clipped AdamW with `schedule` on the trainable tensors, shared layers scaled by lr/k; frozen tensors
    get zero updates. With gate_lr the gates are their own group (own clipping and schedule peaking at
    gate_lr): Adam moves a parameter by at most about its lr per step, so gates that start at 0 open slowly
    at a weight-sized lr."""

    def adamw(peak: float) -> optax.GradientTransformation:
        return optax.chain(clip_by_global_norm(options.clip),
                           optax.adamw(schedule(peak, options), weight_decay=options.weight_decay),
                           scale_layers(layer_factors(student)))

    groups = {"train": adamw(options.lr), "frozen": optax.set_to_zero()}
    labels = {name: "train" if t else "frozen" for name, t in trainable_leaves(student, options.train).items()}
    if options.gate_lr is not None:
        groups["gates"] = adamw(options.gate_lr)
        labels[GATES] = "gates"
    return optax.multi_transform(groups, labels)


def apply_updates(params: Params, updates: Params, trainable: dict[str, bool], frozen_layers: np.ndarray) -> Params:
    """params + updates, except frozen tensors and frozen layers (bool (stored layers,)), which keep their
    exact bits (p + 0 would turn -0.0 into +0.0)."""
    out = {}
    for name, p in params.items():
        if not trainable[name]:
            out[name] = p
        elif name.startswith("layers.") and frozen_layers.any():
            keep = jnp.asarray(frozen_layers).reshape((-1,) + (1,) * (p.ndim - 1))
            out[name] = jnp.where(keep, p, (p + updates[name]).astype(p.dtype))
        else:
            out[name] = (p + updates[name]).astype(p.dtype)
    return out
