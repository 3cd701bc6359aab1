"""Generation with a per-slot KV cache: greedy output equals transformers' greedy `generate`, cached steps
equal a full forward, sampling follows temperature/top-p, and rows stop at EOS."""

from __future__ import annotations

import jax
import numpy as np

import expand
from expand.generate import sample_next
from tests.helpers import random_tokens, torch_reference


def test_greedy_equals_transformers_for_a_left_padded_batch(tiny_checkpoint):
    import torch

    model = expand.load(tiny_checkpoint)
    prompts = [random_tokens(256, (11,), seed=1).tolist(), random_tokens(256, (5,), seed=2).tolist()]
    ours = expand.generate(model.params, model.config, prompts, 12, eos_token_ids=[])
    reference = torch_reference(tiny_checkpoint)
    for prompt, row in zip(prompts, ours):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
        assert row == out[0, len(prompt):].tolist()


def test_cached_steps_equal_full_forward(tiny_checkpoint):
    """Logits of the generated sequence, recomputed from scratch, pick the same tokens: the cache holds
    every slot's own keys and values, including when two slots share weights."""
    config, params = expand.load(tiny_checkpoint)
    layer_ids = np.array([0, 1, 1, 2, 3, 3])
    prompt = random_tokens(256, (9,), seed=4).tolist()
    new = expand.generate(params, config, [prompt], 8, layer_ids=layer_ids, eos_token_ids=[])[0]
    logits = expand.forward(params, np.array([prompt + new]), config, layer_ids=layer_ids)
    assert np.argmax(np.asarray(logits[0, len(prompt) - 1:-1]), axis=-1).tolist() == new


def test_generation_stops_at_eos(tiny_checkpoint):
    config, params = expand.load(tiny_checkpoint)
    prompt = random_tokens(256, (6,), seed=5).tolist()
    free = expand.generate(params, config, [prompt], 6, eos_token_ids=[])[0]
    stopped = expand.generate(params, config, [prompt], 6, eos_token_ids=[free[2]])[0]
    assert stopped == free[: free.index(free[2])]


def test_sampling_respects_top_p_and_temperature():
    logits = jax.numpy.log(jax.numpy.array([[0.6, 0.3, 0.05, 0.05]]))
    draws = {int(sample_next(logits, jax.random.key(i), 1.0, 0.5)[0]) for i in range(50)}
    assert draws == {0}  # the nucleus at 0.5 holds only the top token
    draws = {int(sample_next(logits, jax.random.key(i), 1.0, 0.85)[0]) for i in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, jax.random.key(i), 5.0, 1.0)[0]) for i in range(200)}
    assert draws == {0, 1, 2, 3}


def test_nnx_module_runs_the_same_forward(tiny_checkpoint):
    from flax import nnx

    config, params = expand.load(tiny_checkpoint)
    module = expand.Llama(config, params)
    state = nnx.state(module, nnx.Param)
    assert len(jax.tree.leaves(state)) == len(params)
    tokens = random_tokens(256, (1, 16))
    np.testing.assert_array_equal(np.asarray(module(tokens)), np.asarray(expand.forward(params, tokens, config)))


def test_chunked_decoding_equals_a_full_forward_and_streams_in_order(tiny_checkpoint):
    """Longer than several decoding chunks, for a left-padded batch through a virtual plan: every token
    is the argmax of a full forward over the row's own tokens, and `on_token` sees each row's tokens in
    order, as they are returned."""
    from expand.generate import CHUNK

    config, params = expand.load(tiny_checkpoint)
    layer_ids = np.array([0, 1, 1, 2, 3])
    prompts = [random_tokens(256, (7,), seed=6).tolist(), random_tokens(256, (3,), seed=7).tolist()]
    streamed: list[tuple[int, int]] = []
    new_tokens = 2 * CHUNK + 5
    out = expand.generate(params, config, prompts, new_tokens, layer_ids=layer_ids, eos_token_ids=[],
                          on_token=lambda row, token: streamed.append((row, token)))
    for row, (prompt, new) in enumerate(zip(prompts, out)):
        assert len(new) == new_tokens
        logits = expand.forward(params, np.array([prompt + new]), config, layer_ids=layer_ids)
        assert np.argmax(np.asarray(logits[0, len(prompt) - 1:-1]), axis=-1).tolist() == new
        assert [token for r, token in streamed if r == row] == new


def test_a_row_that_ends_inside_a_chunk_stops_while_the_others_continue(tiny_checkpoint):
    config, params = expand.load(tiny_checkpoint)
    prompts = [random_tokens(256, (6,), seed=8).tolist(), random_tokens(256, (6,), seed=9).tolist()]
    free = expand.generate(params, config, prompts, 30, eos_token_ids=[])
    eos = free[0][20]  # inside the second chunk of row 0
    stopped = expand.generate(params, config, prompts, 30, eos_token_ids=[eos])
    assert stopped[0] == free[0][: free[0].index(eos)]
    assert stopped[1] == (free[1][: free[1].index(eos)] if eos in free[1] else free[1])


def test_a_stop_callback_ends_a_row_and_decoding_ends_when_every_row_has(tiny_checkpoint):
    """stop(row, tokens): row 0 stops after 3 tokens, row 1 after 20 (past the first chunk); each is the
    start of what it generates without stopping, and a row asked to stop at once ends after one token."""
    model = expand.load(tiny_checkpoint)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12]]
    full = expand.generate(model.params, model.config, prompts, 24, eos_token_ids=[])
    limits = {0: 3, 1: 20, 2: 1}
    asked = []

    def stop(row, tokens):
        asked.append(row)
        return len(tokens) >= limits[row]

    stopped = expand.generate(model.params, model.config, prompts, 24, eos_token_ids=[], stop=stop)
    assert [len(t) for t in stopped] == [3, 20, 1]
    assert all(s == f[:len(s)] for s, f in zip(stopped, full))
    assert asked.count(2) == 1


def test_non_finite_logits_stop_generation_with_the_row_and_token(tiny_checkpoint):
    """A row whose logits turn NaN is an error naming the prompt, the new token and the weights that hold NaN,
    at the prompt (prefill) and mid-decoding (the embedding row of the first generated token is NaN: the
    second step's logits are), never a token chosen from NaN."""
    import pytest

    from expand.generate import NonFiniteLogits

    config, params = expand.load(tiny_checkpoint)
    assert not config.tie_word_embeddings  # a NaN embedding row leaves the head, and so the prompt's logits, finite
    prompt = random_tokens(256, (7,), seed=6).tolist()
    first = expand.generate(params, config, [prompt], 1, eos_token_ids=[])[0][0]
    poisoned = {**params, "embed_tokens.weight": params["embed_tokens.weight"].at[first].set(np.nan)}
    with pytest.raises(NonFiniteLogits, match="the logits for new token 2 of prompt 0 are NaN or inf.*embed_tokens.weight"):
        expand.generate(poisoned, config, [prompt], 20, eos_token_ids=[])
    broken = {**params, "norm.weight": params["norm.weight"] * np.nan}
    with pytest.raises(NonFiniteLogits, match="the logits for new token 1 of prompt 0 are NaN or inf.*weights hold NaN or inf .norm.weight."):
        expand.generate(broken, config, [prompt, prompt[:3]], 5, eos_token_ids=[])


def test_generation_past_the_context_window_is_refused(tiny_checkpoint):
    import pytest

    config, params = expand.load(tiny_checkpoint)
    prompt = random_tokens(256, (10,), seed=7).tolist()
    limit = config.max_position_embeddings
    with pytest.raises(ValueError, match=f"more than the model's context window .* at most {limit - 10} new tokens"):
        expand.generate(params, config, [prompt], limit - 9, eos_token_ids=[])
    with pytest.raises(ValueError, match=f"the prompt has {limit} tokens, which leaves no room"):
        expand.generate(params, config, [prompt, [1] * limit], 1, eos_token_ids=[])
