"""The few numbers every verb computes, each defined once: scaled rounding of weights, next-token
cross-entropy and KL divergence between two sets of logits, and both computed a chunk of positions at a
time (`chunked_token_terms`) for losses over a large vocabulary.

Shapes: logits (..., V) over a vocabulary of V; the leading axes are positions (B, T) or anything else.
Every reduction over V runs in at least float32, whatever the logits' dtype.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for bf16/fp16, the dtype itself for float32 and float64."""
    return jnp.promote_types(dtype, jnp.float32)


def scale_rounded(array: jax.Array, factor) -> jax.Array:
    """array * factor computed in at least float32 and rounded back to the array's dtype: the rounding
    mergekit (torch opmath) applies to a scaled tensor, used by every path that scales weights (virtual
    slots, materialized depth plans, width growth), so they agree bit for bit. factor: a scalar or an array
    that broadcasts against `array`."""
    acc = accumulation_dtype(array.dtype)
    return (array.astype(acc) * jnp.asarray(factor, acc)).astype(array.dtype)


def log_partition(z: jax.Array) -> jax.Array:
    """log sum_v exp(z_v) over the last axis, (..., V) -> (...), as max z + log sum exp(z - max z). A NaN or
    +inf logit makes it NaN; a -inf logit adds exactly 0. (The terms pass through a `where`: XLA:CPU then
    reduces them in its vectorized loop instead of a slower fused exp-and-sum; with this and
    `expand.check.compare_with`'s reductions, ablate's fixed cost per variant fell from 1.57x to 1.22x of
    the bare lm_head matmul, experiments/results/bench_ablate.txt.)"""
    top = z.max(-1)
    return top + jnp.log(jnp.where(z == -jnp.inf, 0.0, jnp.exp(z - top[..., None])).sum(-1))


def log_probs(logits: jax.Array) -> jax.Array:
    """log softmax over the last axis, in at least float32: z - log_partition(z)."""
    z = logits.astype(accumulation_dtype(logits.dtype))
    return z - log_partition(z)[..., None]


def picked(values: jax.Array, targets: jax.Array) -> jax.Array:
    """values (..., V) at the target index of each position, targets (...) int -> (...)."""
    return jnp.take_along_axis(values, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)[..., 0]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position: logits (..., V), targets (...) int -> (...)."""
    return -picked(log_probs(logits), targets)


def next_token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """The next-token loss terms of a sequence: logits (B, T', V) at positions 0..T-2 predict tokens (B, T)
    at 1..T-1 (T' is T or T - 1; a last position without a target is dropped) -> (B, T - 1)."""
    length = tokens.shape[1] - 1
    return token_nll(logits[:, :length], tokens[:, 1:])


def kl_from_log_probs(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probabilities (..., V) x 2 -> (...); a token p
    gives probability 0 adds 0 (the product under a `where`, which also keeps XLA:CPU from fusing the
    product and the sum into a much slower kernel)."""
    return jnp.where(log_p > -jnp.inf, jnp.exp(log_p) * (log_p - log_q), 0.0).sum(-1)


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """KL(p || q) per position from logits, (..., V) x 2 -> (...). Not clipped: a value slightly below 0 is
    rounding, and a loss needs its gradient there (reports clip it)."""
    return kl_from_log_probs(log_probs(p_logits), log_probs(q_logits))


def chunked_token_terms(hidden: jax.Array, targets: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                        teacher_hidden: jax.Array | None = None,
                        teacher_logits_fn: Callable[[jax.Array], jax.Array] | None = None,
                        chunk: int = 256) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per position p: the cross-entropy -log softmax(z_p)[y_p], KL(teacher_p || student_p) and whether the
    two argmaxes agree, where z = logits_fn(hidden) (the student's logits) and the teacher's are
    teacher_logits_fn(teacher_hidden); computed `chunk` positions at a time, so that no (P, V) array exists.

    hidden (P, d) and teacher_hidden (P, d'): final hidden states; targets (P,) int; logits_fn (c, d) ->
    (c, V) and teacher_logits_fn (c, d') -> (c, V), e.g. a head projection. Returns nll, kl, agree, each (P,)
    float (kl and agree are zeros without a teacher). The values are `token_nll` and `kl_divergence` on the
    whole logits, summed in another order. Each chunk is recomputed in the backward pass (jax.checkpoint)
    instead of keeping its logits, so differentiating holds O(chunk x V) floats rather than O(P x V): the
    head's matmuls run twice, in exchange for memory independent of P."""
    positions = hidden.shape[0]
    chunk = max(1, min(chunk, positions))
    count = -(-positions // chunk)

    def split(x):
        if x is None:
            return None
        padded = jnp.pad(x, [(0, count * chunk - positions)] + [(0, 0)] * (x.ndim - 1))
        return padded.reshape((count, chunk) + x.shape[1:])

    def terms(xs):
        h, y, teacher_h = xs
        logits = logits_fn(h)
        nll = token_nll(logits, y)
        if teacher_logits_fn is None:
            return nll, jnp.zeros_like(nll), jnp.zeros_like(nll)
        teacher = teacher_logits_fn(teacher_h)
        agree = jnp.argmax(teacher, axis=-1) == jnp.argmax(logits, axis=-1)
        return nll, kl_divergence(teacher, logits), agree.astype(nll.dtype)

    out = jax.lax.map(jax.checkpoint(terms), (split(hidden), split(targets), split(teacher_hidden)))
    return tuple(o.reshape(-1)[:positions] for o in out)
