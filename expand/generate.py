"""Generation with a KV cache: prefill the prompts, then decode in compiled chunks of tokens, greedy or
nucleus sampling.

Every slot of the network keeps its own KV cache (N, B, m, S, h), also when two slots run the same stored
layer (a depth plan run virtually), so a virtual plan generates exactly what its materialized model would.

Decoding runs up to `CHUNK` tokens per call of one compiled loop (`_decode`): the forward step, the cache
update (in place) and the sampling stay on the device, and the host sees each chunk's tokens once, to
stream them and to stop when every row has ended. The loop itself stops early once every row has produced
an EOS token.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from expand.config import Config
from expand.distributed import to_host
from expand.model import TRACE_COUNTS, decoder, default_layer_ids, lm_head
from expand.params import Params, nonfinite_tensors

# Tokens per compiled decoding call: the granularity of streaming and of stopping at EOS on the host.
CHUNK = 16
# What the device returns instead of a token for a row whose logits are not finite (never a token id).
NONFINITE = -1


class NonFiniteLogits(ValueError):
    """A row's logits were NaN or inf: generation stops rather than emit a token chosen from them."""


def sample_next(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """logits (B, V) -> tokens (B,): argmax when temperature == 0, else nucleus sampling at `top_p`."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)  # always keeps the top token
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def _next_tokens(params, tokens, positions, key_valid, kv_cache, cache_index, rng, config, layer_ids, slot_scales,
                 temperature, top_p):
    """Run tokens (B, T) at positions (B, T) into cache positions [cache_index, cache_index + T) and sample
    one token per row from the last position's logits. Returns tokens (B,) int32 (NONFINITE for a row whose
    logits are not all finite: nothing can be sampled from them), the cache, the rng."""
    h, kv_cache, _ = decoder(params, tokens, positions, key_valid, config, layer_ids, slot_scales,
                             kv_cache=kv_cache, cache_index=cache_index)
    rng, key = jax.random.split(rng)
    logits = lm_head(params, h[:, -1:], config)[:, 0]
    chosen = sample_next(logits, key, temperature, top_p).astype(jnp.int32)
    return jnp.where(jnp.isfinite(logits).all(axis=-1), chosen, NONFINITE), kv_cache, rng


@partial(jax.jit, static_argnames=("config", "temperature", "top_p"), donate_argnames=("kv_cache",))
def _prefill(params, tokens, positions, key_valid, kv_cache, rng, config, layer_ids, slot_scales, temperature,
             top_p):
    """The prompts (B, P) into cache positions [0, P); returns the first new token of each row (B,), the
    cache and the rng."""
    TRACE_COUNTS["prefill"] += 1
    return _next_tokens(params, tokens, positions, key_valid, kv_cache, 0, rng, config, layer_ids, slot_scales,
                        temperature, top_p)


@partial(jax.jit, static_argnames=("config", "temperature", "top_p"), donate_argnames=("kv_cache",))
def _decode(params, tokens, positions, done, key_valid, kv_cache, cache_index, rng, num_steps, eos, config,
            layer_ids, slot_scales, temperature, top_p):
    """Up to num_steps (<= CHUNK) decoding steps in one loop. Step i runs tokens (B,) at positions + i into
    cache position cache_index + i and samples the next tokens; done (B,) marks rows that have produced an
    EOS token (one of eos (E,)) or NONFINITE, and the loop ends early when every row has.

    Returns the chosen tokens (B, CHUNK) (the first `steps` columns are valid), steps, the last tokens
    (B,), the cache and the rng."""
    TRACE_COUNTS["decode"] += 1

    def running(state):
        step, _, _, done, _, _ = state
        return (step < num_steps) & ~done.all()

    def one_step(state):
        step, chosen, tokens, done, kv_cache, rng = state
        tokens, kv_cache, rng = _next_tokens(params, tokens[:, None], (positions + step)[:, None], key_valid,
                                             kv_cache, cache_index + step, rng, config, layer_ids, slot_scales,
                                             temperature, top_p)
        chosen = jax.lax.dynamic_update_slice_in_dim(chosen, tokens[:, None], step, axis=1)
        return step + 1, chosen, tokens, done | jnp.isin(tokens, eos) | (tokens == NONFINITE), kv_cache, rng

    chosen = jnp.zeros((tokens.shape[0], CHUNK), jnp.int32)
    state = (jnp.int32(0), chosen, tokens, done, kv_cache, rng)
    steps, chosen, tokens, _, kv_cache, rng = jax.lax.while_loop(running, one_step, state)
    return chosen, steps, tokens, kv_cache, rng


def nonfinite_message(params: Params, row: int, new_token: int) -> str:
    """Why new token `new_token` of prompt `row` cannot be chosen: the weights that hold NaN or inf, or, when
    every weight is finite, an overflow of the activations."""
    bad = nonfinite_tensors(params)
    cause = (f"the weights hold NaN or inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else
             "the weights are finite, so the activations overflow in this dtype (`expand check` shows the slot)")
    return f"the logits for new token {new_token} of prompt {row} are NaN or inf, so no token can be chosen: {cause}"


def generate(params: Params, config: Config, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             layer_ids=None, slot_scales=None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_token_ids: Sequence[int] | None = None,
             on_token: Callable[[int, int], None] | None = None,
             stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens`, stopping a row at EOS, or once
    `stop(row, its new tokens so far)` is true (e.g. a stop string appeared); decoding ends when every row
    has stopped.

    Prompts are left-padded to one length; every slot keeps its own KV cache (N, B, m, S, h), also when
    two slots share weights. `on_token(row, token)` is called for each chosen token, in order, as each
    chunk of up to CHUNK tokens arrives from the device (for streaming).
    Returns the new tokens of each row, without the EOS token. Raises ValueError when the prompt and the new
    tokens do not fit in the model's context window (max_position_embeddings), and NonFiniteLogits (a
    ValueError) when a row's logits are NaN or inf."""
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return outputs
    layer_ids = default_layer_ids(config) if layer_ids is None else jnp.asarray(layer_ids, jnp.int32)
    slot_scales = slot_scales or {}
    eos_ids = sorted(set(config.eos_token_ids if eos_token_ids is None else eos_token_ids))
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    window = config.max_position_embeddings
    if prompt_len >= window:
        raise ValueError(f"the prompt has {prompt_len} tokens, which leaves no room for a new token in the model's "
                         f"context window (max_position_embeddings = {window}): shorten it")
    if total > window:
        raise ValueError(f"a prompt of {prompt_len} tokens and {max_new_tokens} new tokens take {total} positions, "
                         f"more than the model's context window (max_position_embeddings = {window}): ask for at "
                         f"most {window - prompt_len} new tokens (--max-new-tokens)")
    dtype = params["embed_tokens.weight"].dtype

    pad = config.pad_token_id if config.pad_token_id is not None else 0
    tokens = np.full((batch, prompt_len), pad, np.int32)
    key_valid = np.zeros((batch, total), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt):] = prompt
        key_valid[row, prompt_len - len(prompt):] = True
    lengths = np.array([len(p) for p in prompts], np.int32)
    positions = np.clip(np.cumsum(key_valid[:, :prompt_len], axis=1) - 1, 0, None).astype(np.int32)

    cache_shape = (len(layer_ids), batch, config.num_key_value_heads, total, config.head_dim)
    kv_cache = (jnp.zeros(cache_shape, dtype), jnp.zeros(cache_shape, dtype))
    key_valid = jnp.asarray(key_valid)
    sampling = {"config": config, "layer_ids": layer_ids, "slot_scales": slot_scales,
                "temperature": float(temperature), "top_p": float(top_p)}
    last, kv_cache, rng = _prefill(params, tokens, positions, key_valid, kv_cache, jax.random.key(seed),
                                   **sampling)
    eos = jnp.asarray(eos_ids, jnp.int32)
    done = np.zeros(batch, bool)

    def emit(chosen: np.ndarray) -> None:
        """chosen (B, steps): append each row's tokens up to its EOS, streaming them."""
        for column in chosen.T.tolist():
            for row, token in enumerate(column):
                if done[row]:
                    continue
                if token == NONFINITE:
                    raise NonFiniteLogits(nonfinite_message(params, row, len(outputs[row]) + 1))
                if token in eos_ids:
                    done[row] = True
                    continue
                outputs[row].append(token)
                if on_token is not None:
                    on_token(row, token)
                if stop is not None and stop(row, outputs[row]):
                    done[row] = True

    emit(to_host(last)[:, None])
    produced = 1
    while produced < max_new_tokens and not done.all():
        steps = min(CHUNK, max_new_tokens - produced)
        chosen, steps, last, kv_cache, rng = _decode(
            params, last, jnp.asarray(lengths + produced - 1), jnp.asarray(done), key_valid, kv_cache,
            prompt_len + produced - 1, rng, steps, eos, **sampling)
        steps = int(to_host(steps))
        emit(to_host(chosen)[:, :steps])
        produced += steps
    return outputs
