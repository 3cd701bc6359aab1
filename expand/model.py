"""The Llama forward pass: one jit-compiled function that scans over layer slots.

A *slot* is one position in the depth of the network; `layer_ids[s]` names the stored layer whose weights
slot `s` runs. The default `layer_ids = arange(num_hidden_layers)` is the model as stored; any other int
array runs a depth plan *virtually* (duplicated layers share one copy of their weights). Because
`layer_ids` is data, not shape, every plan of the same length reuses one compiled function.

Shapes: B batch, T query tokens, S key slots (T, or the KV cache length), d hidden, n query heads,
m kv heads, h head_dim, f intermediate size, V vocab, L stored layers, N slots.

Numerics follow transformers' LlamaForCausalLM: RMSNorm in float32 then cast back before the gain,
rotate-half RoPE with cos/sin cast to the compute dtype, attention scores and softmax in float32 (float64
for float64 params). Float32 (and float64)
params run with `matmul precision = highest` (the reference mode: no TF32 on GPUs); bfloat16 params run
in bfloat16.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from expand.config import Config
from expand.numerics import next_token_nll, scale_rounded
from expand.params import Params
from expand.sharding import constrain_batch

# How many times each jitted entry point was traced (= compiled); read by tests and sweep reports.
TRACE_COUNTS: Counter = Counter()


# ---- building blocks ---------------------------------------------------------------------------------


def rms_norm(x: jax.Array, gain: jax.Array, eps: float) -> jax.Array:
    """x (..., d) -> gain * x / sqrt(mean(x^2) + eps), the mean taken in float32 (or float64)."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(acc)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return gain * normed.astype(x.dtype)


def rope_inv_freq(config: Config) -> np.ndarray:
    """(h/2,) float32 inverse frequencies theta^(-2i/h), with linear or llama3 scaling applied.

    Computed in float32 in transformers' order of operations (the exponent 2i/h is rounded to float32
    before the power), so the frequencies are bit-identical to transformers' `inv_freq`."""
    f32 = np.float32
    h = config.head_dim
    exponent = np.arange(0, h, 2).astype(f32) / f32(h)
    inv = f32(1.0) / np.power(np.float64(config.rope_theta), exponent.astype(np.float64)).astype(f32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv
    factor = f32(scaling.factor)
    if scaling.rope_type == "linear":
        return inv / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    old_len = f32(scaling.original_max_position_embeddings)
    low, high = f32(scaling.low_freq_factor), f32(scaling.high_freq_factor)
    wavelen = f32(2 * math.pi) / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(f32)


def rope_cos_sin(positions: jax.Array, config: Config, dtype) -> tuple[jax.Array, jax.Array]:
    """positions (B, T) int -> cos, sin (B, T, h) in the compute dtype, rotate-half layout (the h/2
    frequencies repeated twice). Angles and their cos/sin are computed in float32 whatever the dtype,
    exactly as transformers does (autocast disabled): that rounding is part of the function HF defines,
    so float64 runs of expand and transformers compute the same function."""
    inv = jnp.asarray(rope_inv_freq(config))
    angles = positions.astype(jnp.float32)[..., None] * inv
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, heads, h): x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def linear(x, weight, bias, equation):
    """x contracted with weight by the einsum `equation` (e.g. "btd,dnh->btnh"), plus bias when not None."""
    y = jnp.einsum(equation, x, weight)
    return y if bias is None else y + bias


# Queries per block of causal attention: a block reads only the keys up to its last query.
ATTENTION_BLOCK = 64


def _masked_value(dtype) -> float:
    """What masked keys add to their scores: finite (a query with no valid key gets finite weights, not
    NaN), and so far below any real score that their weights are exactly 0 otherwise."""
    return -0.7 * float(jnp.finfo(jnp.promote_types(dtype, jnp.float32)).max)


def attend(q, k, v, mask, scale: float, first_query: int | None):
    """Softmax attention: q (B, T, n, h), k and v (B, m, S, h) (kv-head-major), mask (B, 1, T, S) ->
    (B, T, n, h); query head j reads kv head j // (n/m). Scores q.k * scale (plus `_masked_value` where the mask is False) and
    the softmax in float32 (float64 for float64 inputs), the probabilities cast to the values' dtype for
    the value product; the softmax denominator divides the output (B, T, n, h) rather than every score.

    first_query: the key position of query 0 when it is a trace-time int (a forward pass or a prefill:
    query t sees no key after first_query + t); queries then run in blocks of ATTENTION_BLOCK, each
    reading only the keys up to its last query, which skips about half the scores of a long prompt.
    None (a decoding step at a traced position): every query reads all S keys."""
    batch, length, heads, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)  # (B, m, g, T, h)
    bias = jnp.where(mask, jnp.zeros((), acc), _masked_value(acc))[:, :, None]  # (B, 1, 1, T, S)
    if first_query is None:
        blocks = [(0, length, num_keys)]
    else:
        starts = range(0, length, ATTENTION_BLOCK)
        blocks = [(a, min(a + ATTENTION_BLOCK, length), min(first_query + a + ATTENTION_BLOCK, num_keys))
                  for a in starts]
    outs = []
    for start, stop, keys in blocks:
        scores = jnp.einsum("bmgth,bmsh->bmgts", q[:, :, :, start:stop], k[:, :, :keys], preferred_element_type=acc)
        scores = scores * scale + bias[:, :, :, start:stop, :keys]
        weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
        out = jnp.einsum("bmgts,bmsh->bmgth", weights.astype(v.dtype), v[:, :, :keys], preferred_element_type=acc)
        outs.append((out / weights.sum(axis=-1, keepdims=True)).astype(q.dtype))
    out = jnp.concatenate(outs, axis=3)  # (B, m, g, T, h)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def attention(x, w, cos, sin, mask, kv_cache, cache_at, config: Config, implementation):
    """x (B, T, d) -> (B, T, d), and the cache after writing this step's keys and values.

    q = x Wq (B,T,n,h), k = x Wk, v = x Wv (B,m,T,h); RoPE on q and k; softmax(q k^T / sqrt(h) + mask) v
    (`attend`, or `jax.nn.dot_product_attention` with the named implementation); then Wo back to d.
    cache_at = (slot, index): this step's first query sits at key position `index`. With a cache (k, v),
    each (N, B, m, S, h), k and v are written in place at [slot, :, :, index:index+T] and attention runs
    over that slot's S cache positions."""
    q = linear(x, w["layers.self_attn.q_proj.weight"], w.get("layers.self_attn.q_proj.bias"), "btd,dnh->btnh")
    k = linear(x, w["layers.self_attn.k_proj.weight"], w.get("layers.self_attn.k_proj.bias"), "btd,dmh->btmh")
    v = linear(x, w["layers.self_attn.v_proj.weight"], w.get("layers.self_attn.v_proj.bias"), "btd,dmh->btmh")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # kv-head-major (B, m, T, h)
    slot, index = cache_at
    if kv_cache is not None:
        kv_cache = tuple(jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), (slot, 0, 0, index, 0))
                         for c, new in zip(kv_cache, (k, v)))
        k, v = (c[slot] for c in kv_cache)
    scale = config.head_dim**-0.5
    if implementation is None:
        out = attend(q, k, v, mask, scale, index if isinstance(index, int) else None)
    else:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)
    y = linear(out, w["layers.self_attn.o_proj.weight"], w.get("layers.self_attn.o_proj.bias"), "btnh,nhd->btd")
    return y, kv_cache


def mlp(x, w):
    """SwiGLU: down(silu(x Wgate) * (x Wup)), x (B, T, d) -> (B, T, d) through f hidden units."""
    gate = linear(x, w["layers.mlp.gate_proj.weight"], w.get("layers.mlp.gate_proj.bias"), "btd,df->btf")
    up = linear(x, w["layers.mlp.up_proj.weight"], w.get("layers.mlp.up_proj.bias"), "btd,df->btf")
    return linear(jax.nn.silu(gate) * up, w["layers.mlp.down_proj.weight"], w.get("layers.mlp.down_proj.bias"),
                   "btf,fd->btd")


def decoder_layer(h, w, cos, sin, mask, kv_cache, cache_at, config: Config, implementation):
    """One pre-norm residual block: h + attn(norm(h)), then + mlp(norm(.))."""
    a, kv_cache = attention(
        rms_norm(h, w["layers.input_layernorm.weight"], config.rms_norm_eps),
        w, cos, sin, mask, kv_cache, cache_at, config, implementation,
    )
    h = h + a
    h = h + mlp(rms_norm(h, w["layers.post_attention_layernorm.weight"], config.rms_norm_eps), w)
    return h, kv_cache


def matmul_precision(dtype):
    """A context in which matmuls of float32 and float64 inputs run at full precision ("highest": no
    reduced-precision passes on backends that would otherwise take them); other dtypes keep the default."""
    if jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def decoder(params: Params, tokens, positions, key_valid, config: Config, layer_ids, slot_scales,
            kv_cache=None, cache_index=0, collect_hidden=False, implementation=None, resume=None, remat=False):
    """The stack of slots, without the final norm and head (`lm_head`). tokens, positions (B, T);
    key_valid (B, S) marks keys that may be attended; layer_ids (N,); slot_scales {name: (N,)};
    kv_cache (k, v) each (N, B, m, S, h) or None: this step's keys and values are written in place at
    cache positions [cache_index, cache_index + T) (the cache is part of the scan's carry, so nothing but
    those positions is rewritten).
    resume (k, h): start from the residual stream h (B, T, d) entering slot k and skip slots 0 .. k-1
    (a `lax.cond` per slot, so one compiled function serves every k); the caller vouches that h is what
    those slots compute. remat: under differentiation, recompute each slot's activations in the backward
    pass instead of storing them (only the residual stream entering each slot is kept).

    Returns the residual stream after the last slot (B, T, d), the updated cache, and (if collect_hidden)
    the residual stream per slot (N + 1, B, T, d): index 0 is the embedding output, index s + 1 the output
    of slot s. Under a mesh with a data axis the residual stream is split over it along B
    (`expand.sharding.constrain_batch`)."""
    embed = params["embed_tokens.weight"]
    dtype = embed.dtype
    with matmul_precision(dtype):
        h = constrain_batch(embed[tokens] if resume is None else resume[1])
        cos, sin = rope_cos_sin(positions, config, dtype)
        num_keys = key_valid.shape[1]
        query_slots = cache_index + jnp.arange(tokens.shape[1])
        causal = jnp.arange(num_keys)[None, :] <= query_slots[:, None]  # (T, S)
        mask = key_valid[:, None, None, :] & causal[None, None]  # (B, 1, T, S)
        stacked = {n: a for n, a in params.items() if n.startswith("layers.")}

        def run_slot(h, cache, index, layer, scales):
            w = {n: a[layer] for n, a in stacked.items()}
            for name, s in scales.items():
                if name in w:  # a plan may scale biases that this model does not have
                    w[name] = scale_rounded(w[name], s)
            h, cache = decoder_layer(h, w, cos, sin, mask, cache, (index, cache_index), config, implementation)
            return constrain_batch(h), cache

        if remat:
            run_slot = jax.checkpoint(run_slot)

        def slot(carry, xs):
            index, layer, scales = xs
            if resume is None:
                carry = run_slot(*carry, index, layer, scales)
            else:
                carry = jax.lax.cond(index < resume[0], lambda h, cache: (h, cache),
                                     lambda h, cache: run_slot(h, cache, index, layer, scales), *carry)
            return carry, carry[0] if collect_hidden else None

        slots = jnp.arange(layer_ids.shape[0])
        (h_out, kv_cache), hidden = jax.lax.scan(slot, (h, kv_cache), (slots, layer_ids, slot_scales))
    if collect_hidden:
        hidden = jnp.concatenate([h[None], hidden], axis=0)
    return h_out, kv_cache, hidden


def lm_head(params: Params, h, config: Config) -> jax.Array:
    """The final RMSNorm and the output projection: h (..., d) -> logits (..., V) in float32 (float64 for
    float64 params); the head is embed_tokens transposed when the embeddings are tied."""
    with matmul_precision(params["embed_tokens.weight"].dtype):
        normed = rms_norm(h, params["norm.weight"], config.rms_norm_eps)
    return logits_from_hidden(normed, head_weight(params, config))


def head_weight(params: Params, config: Config) -> jax.Array:
    """The output projection as (V, d) rows, one per token: the embedding itself when the two are tied (no
    copy), else lm_head (stored (d, V)) transposed."""
    return params["embed_tokens.weight"] if config.tie_word_embeddings else params["lm_head.weight"].T


def logits_from_hidden(normed: jax.Array, head: jax.Array) -> jax.Array:
    """Final-normed hidden states (..., d) times the head rows (V, d) -> logits (..., V), in at least float32,
    at the forward pass's matmul precision."""
    with matmul_precision(head.dtype):
        return jnp.einsum("...d,vd->...v", normed, head).astype(jnp.promote_types(head.dtype, jnp.float32))


def final_hidden(params: Params, tokens, config: Config, layer_ids=None, slot_scales=None, remat: bool = False):
    """The final-normed residual stream (B, T, d) of tokens (B, T): what `forward` computes before the head
    (`logits_from_hidden(final_hidden(...), head_weight(...))` are its logits). For losses that apply the head to a few positions at a time. remat: see
    `decoder`. Not jitted itself: call it inside a jitted function."""
    tokens = jnp.asarray(tokens, jnp.int32)
    batch, length = tokens.shape
    layer_ids = default_layer_ids(config) if layer_ids is None else jnp.asarray(layer_ids, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    h, _, _ = decoder(params, tokens, positions, jnp.ones((batch, length), bool), config, layer_ids,
                      slot_scales or {}, remat=remat)
    with matmul_precision(params["embed_tokens.weight"].dtype):
        return rms_norm(h, params["norm.weight"], config.rms_norm_eps)


def default_layer_ids(config: Config) -> jax.Array:
    return jnp.arange(config.num_hidden_layers, dtype=jnp.int32)


@partial(jax.jit, static_argnames=("config", "return_hidden", "implementation"))
def forward(params: Params, tokens, config: Config, layer_ids=None, slot_scales=None, attention_mask=None,
            return_hidden: bool = False, implementation: str | None = None, resume=None):
    """Logits (B, T, V) float32 for tokens (B, T).

    layer_ids (N,) int: the slots to run (default: every stored layer once).
    slot_scales {tensor name: (N,)}: per-slot multipliers of layer tensors (identity copies scale
        o_proj and down_proj by 0; mergekit `scale` parameters; residual gates).
    attention_mask (B, T): 1 for real tokens, 0 for right padding (positions stay 0..T-1).
    return_hidden: also return the residual stream per slot, (N + 1, B, T, d).
    implementation: None for `attend` (XLA ops on any backend, causal blocks), or 'xla' / 'cudnn' for
        `jax.nn.dot_product_attention` with that backend.
    resume (k, h (B, T, d)): skip the first k slots and start from h, the residual stream another run
        computed entering slot k (e.g. `return_hidden`'s [k] of a plan with the same first k slots).
    """
    TRACE_COUNTS["forward"] += 1
    tokens = jnp.asarray(tokens, jnp.int32)
    batch, length = tokens.shape
    layer_ids = default_layer_ids(config) if layer_ids is None else jnp.asarray(layer_ids, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    key_valid = jnp.ones((batch, length), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    h, _, hidden = decoder(params, tokens, positions, key_valid, config, layer_ids, slot_scales or {},
                           collect_hidden=return_hidden, implementation=implementation, resume=resume)
    logits = lm_head(params, h, config)
    return (logits, hidden) if return_hidden else logits


def lm_loss(params: Params, tokens, config: Config, **forward_options) -> jax.Array:
    """Mean next-token cross-entropy of tokens (B, T): the logits at positions 0..T-2 predict 1..T-1.
    forward_options go to `forward` (layer_ids, slot_scales, attention_mask ...)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return next_token_nll(forward(params, tokens[:, :-1], config, **forward_options), tokens).mean()
