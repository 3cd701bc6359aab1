"""Generation with a KV cache: prefill the prompts, then one token at a time, greedy or nucleus sampling.

Every slot of the network keeps its own KV cache (N, B, S, m, h), also when two slots run the same stored
layer (a depth plan run virtually), so a virtual plan generates exactly what its materialized model would.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from expand.config import Config
from expand.distributed import to_host
from expand.model import TRACE_COUNTS, decoder, default_layer_ids
from expand.params import Params


@partial(jax.jit, static_argnames=("config", "implementation"), donate_argnames=("kv_cache",))
def _cached_step(params, tokens, positions, key_valid, kv_cache, cache_index, config, layer_ids, slot_scales,
                 implementation=None):
    """Run T new tokens against the cache; return last-position logits (B, V) and the updated cache."""
    TRACE_COUNTS["cached_step"] += 1
    logits, kv_cache, _ = decoder(params, tokens, positions, key_valid, config, layer_ids, slot_scales,
                                  kv_cache=kv_cache, cache_index=cache_index, implementation=implementation)
    return logits[:, -1], kv_cache


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


def generate(params: Params, config: Config, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             layer_ids=None, slot_scales=None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_token_ids: Sequence[int] | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens`, stopping a row at EOS.

    Prompts are left-padded to one length; every slot keeps its own KV cache (N, B, S, m, h), also when
    two slots share weights. `on_token(row, token)` is called as each token is chosen (for streaming).
    Returns the new tokens of each row, without the EOS token."""
    layer_ids = default_layer_ids(config) if layer_ids is None else jnp.asarray(layer_ids, jnp.int32)
    slot_scales = slot_scales or {}
    eos = set(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    dtype = params["embed_tokens.weight"].dtype

    pad = config.pad_token_id if config.pad_token_id is not None else 0
    tokens = np.full((batch, prompt_len), pad, np.int32)
    key_valid = np.zeros((batch, total), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt):] = prompt
        key_valid[row, prompt_len - len(prompt):] = True
    lengths = np.array([len(p) for p in prompts])
    positions = np.clip(np.cumsum(key_valid[:, :prompt_len], axis=1) - 1, 0, None).astype(np.int32)

    cache_shape = (len(layer_ids), batch, total, config.num_key_value_heads, config.head_dim)
    kv_cache = (jnp.zeros(cache_shape, dtype), jnp.zeros(cache_shape, dtype))
    key_valid = jnp.asarray(key_valid)
    logits, kv_cache = _cached_step(params, tokens, positions, key_valid, kv_cache, 0, config, layer_ids,
                                    slot_scales)
    rng = jax.random.key(seed)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    for step in range(max_new_tokens):
        rng, key = jax.random.split(rng)
        next_tokens = to_host(sample_next(logits, key, temperature, top_p))
        for row, token in enumerate(next_tokens.tolist()):
            if done[row]:
                continue
            if token in eos:
                done[row] = True
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
        if done.all() or step == max_new_tokens - 1:
            break
        step_positions = (lengths + step)[:, None].astype(np.int32)
        logits, kv_cache = _cached_step(params, next_tokens[:, None].astype(np.int32), step_positions, key_valid,
                                        kv_cache, prompt_len + step, config, layer_ids, slot_scales)
    return outputs


