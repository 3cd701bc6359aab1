"""The loss and one step: per-position cross-entropy, KL to the teacher and top-1 agreement computed a chunk
of positions at a time (`expand.numerics.chunked_token_terms`), the jitted training step, and the held-out
evaluation.

Shapes: tokens (B, T); the logits at positions 0..T-2 predict tokens 1..T-1, so there are P = B (T - 1)
loss positions; V the vocabulary, d the hidden size."""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from expand.container import Model
from expand.heal.optimizer import apply_updates
from expand.heal.options import HealOptions
from expand.heal.student import GATES, Student, layer_factors, new_slots, trainable_leaves, weights_of
from expand.model import final_hidden, head_weight, logits_from_hidden
from expand.numerics import chunked_token_terms
from expand.params import Params


@partial(jax.jit, static_argnames=("config",))
def teacher_hidden(params: Params, tokens, config) -> jax.Array:
    """The frozen teacher's final-normed hidden states (B, T-1, d') at the loss positions of token windows
    (B, T). Compiled once per teacher config and shape, outside the training step."""
    return final_hidden(params, jnp.asarray(tokens)[:, :-1], config)


def teacher_views(teacher: Model) -> Callable[[object], tuple[jax.Array, jax.Array]]:
    """view(tokens (B, T)) -> what the loss needs of the frozen teacher on those windows: its hidden states
    (`teacher_hidden`) and its head rows (V, d'), from which `token_terms` computes its logits a chunk at a
    time. The head is made once here and shared by every view: the embedding itself when tied, a transposed
    copy of lm_head otherwise."""
    head = head_weight(teacher.params, teacher.config)
    return lambda tokens: (teacher_hidden(teacher.params, tokens, teacher.config), head)


def token_terms(params: Params, tokens, student: Student, teacher: tuple[jax.Array, jax.Array] | None,
                options: HealOptions) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(nll, kl, agree), each (P,): the student's next-token cross-entropy, KL(teacher || student) and
    whether the two argmaxes agree at every loss position (kl and agree are zeros without a teacher).
    teacher: a `teacher_views` view of the same tokens, or None. The student runs through its plan and gates (with
    options.remat); neither model's (B, T, V) logits are ever formed (options.loss_chunk positions at a
    time)."""
    weights = weights_of(params)
    hidden = final_hidden(weights, tokens[:, :-1], student.config, layer_ids=student.layer_ids,
                          slot_scales=student.slot_scales(params.get(GATES)), remat=options.remat)
    teacher_hidden, teacher_logits = None, None
    if teacher is not None:
        teacher_hidden = teacher[0].reshape(-1, teacher[0].shape[-1])
        teacher_logits = partial(logits_from_hidden, head=teacher[1])
    return chunked_token_terms(hidden.reshape(-1, hidden.shape[-1]), tokens[:, 1:].reshape(-1),
                               partial(logits_from_hidden, head=head_weight(weights, student.config)),
                               teacher_hidden, teacher_logits, chunk=options.loss_chunk)


def heal_loss(params: Params, tokens, teacher: tuple[jax.Array, jax.Array] | None, student: Student,
              options: HealOptions):
    """(loss, (lm, kl)): lm_weight * mean cross-entropy + distill_weight * mean KL(teacher || student), the
    weights of `options.loss_weights`."""
    lm_weight, distill_weight = options.loss_weights(teacher is not None)
    nll, kl, _ = token_terms(params, tokens, student, teacher, options)
    lm, kl = nll.mean(), kl.mean()
    return lm_weight * lm + distill_weight * kl, (lm, kl)


def group_norms(grads: Params, student: Student) -> dict[str, jax.Array]:
    """Gradient norms of the groups people watch: embeddings and head, old slots' layers, new slots'
    layers (decoupled), gates."""
    sq = {"embed/norm/head": 0.0, "layers": 0.0}
    new = np.zeros(student.config.num_hidden_layers, bool)
    if student.shared == "decoupled":
        new[new_slots(student.plan.layer_ids)] = True
    for name, g in grads.items():
        g2 = jnp.square(g.astype(jnp.float32))
        if name == GATES:
            sq["gates"] = g2.sum()
        elif name.startswith("layers."):
            per_layer = g2.reshape(g2.shape[0], -1).sum(-1)
            sq["layers"] = sq["layers"] + jnp.where(new, 0.0, per_layer).sum()
            if new.any():
                sq["new layers"] = sq.get("new layers", 0.0) + jnp.where(new, per_layer, 0.0).sum()
        else:
            sq["embed/norm/head"] = sq["embed/norm/head"] + g2.sum()
    return {k: jnp.sqrt(v) for k, v in sq.items()}


def make_step(student: Student, optimizer: optax.GradientTransformation, options: HealOptions):
    """The jitted training step: (params, opt_state, tokens (B, T), teacher view or None) -> (params,
    opt_state, logs, whether every new weight is finite). params and opt_state are donated: their buffers
    become the new ones."""
    trainable = trainable_leaves(student, options.train)
    frozen_layers = layer_factors(student) == 0

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens, teacher):
        (loss, (lm, kl)), grads = jax.value_and_grad(heal_loss, has_aux=True)(params, tokens, teacher, student,
                                                                              options)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = apply_updates(params, updates, trainable, frozen_layers)
        norms = {f"grad_norm {k}": v for k, v in group_norms(grads, student).items()}
        logs = {"loss": loss, "lm": lm, "kl": kl, **norms}
        finite = jnp.stack([jnp.isfinite(p).all() for p in params.values()]).all()
        return params, opt_state, logs, finite

    return step


def make_evaluate(student: Student, options: HealOptions, views: Callable | None,
                  rows: np.ndarray) -> Callable[[Params], dict]:
    """evaluate(params) -> {"lm", "kl", "top1"}: the student's mean cross-entropy, mean KL(teacher ||
    student) and top-1 agreement with the teacher over every loss position of the held-out rows (S, T) (kl
    and top1 only with a teacher), options.batch_size rows at a time (one compiled shape: the last batch is
    padded with rows that count 0). views: `teacher_views` of the teacher, or None; the teacher's side is
    computed once, here."""
    size = min(options.batch_size, len(rows))
    batches = []
    for start in range(0, len(rows), size):
        batch = rows[start:start + size]
        weights = np.r_[np.ones(len(batch)), np.zeros(size - len(batch))].astype(np.float32)
        batch = jnp.asarray(np.concatenate([batch, rows[:size - len(batch)]]))
        view = None if views is None else views(batch)
        batches.append((batch, view, jnp.asarray(weights)))

    @jax.jit
    def sums(params, tokens, teacher, row_weights):
        nll, kl, agree = token_terms(params, tokens, student, teacher, options)
        weight = jnp.repeat(row_weights, tokens.shape[1] - 1)
        return jnp.stack([(nll * weight).sum(), (kl * weight).sum(), (agree * weight).sum(), weight.sum()])

    def evaluate(params: Params) -> dict:
        lm, kl, top1, count = sum(np.asarray(sums(params, *batch), np.float64) for batch in batches)
        return {"lm": float(lm / count), **({} if views is None else {"kl": float(kl / count),
                                                                       "top1": float(top1 / count)})}

    return evaluate
