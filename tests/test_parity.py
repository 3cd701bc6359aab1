"""expand's forward against transformers' PyTorch LlamaForCausalLM, fp32, on checkpoints that transformers
itself wrote. max |delta logit| <= 1e-4 on 512-token prompts and a right-padded batch."""

from __future__ import annotations

import numpy as np
import pytest

import expand
from tests.helpers import make_hf_checkpoint, random_tokens, torch_logits, torch_reference

TOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}

VARIANTS = {
    "mha": dict(num_key_value_heads=8),
    "gqa-kv1": dict(num_key_value_heads=1),
    "gqa-kv2": dict(num_key_value_heads=2),
    "gqa-kv4": dict(num_key_value_heads=4),
    "tied": dict(tie_word_embeddings=True),
    "head-dim-24": dict(head_dim=24),
    "attention-and-mlp-bias": dict(attention_bias=True, mlp_bias=True),
    "llama3-rope": dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0}),
    "linear-rope": dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "sharded": dict(max_shard_size="40KB"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    overrides = dict(VARIANTS[variant])
    path = make_hf_checkpoint(tmp_path / variant, seed=len(variant), **overrides)
    if variant == "sharded":
        assert (path / "model.safetensors.index.json").exists()
        assert len(list(path.glob("model-*.safetensors"))) > 3
    reference = torch_reference(path)

    config, params = expand.load(path)
    tokens = random_tokens(config.vocab_size, (2, 512), seed=1)
    expected = torch_logits(reference, tokens)
    assert expected.std() > 0.5, "reference logits too flat to test anything"
    got = np.asarray(expand.forward(params, tokens, config))
    print(f"{variant}: max |delta logit| {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() <= TOL


def test_right_padded_batch_matches_transformers(tiny_checkpoint):
    reference = torch_reference(tiny_checkpoint)
    config, params = expand.load(tiny_checkpoint)
    tokens = random_tokens(config.vocab_size, (3, 512), seed=2)
    lengths = [512, 300, 37]
    mask = np.zeros_like(tokens)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        tokens[row, n:] = 0
    expected = torch_logits(reference, tokens, mask)
    got = np.asarray(expand.forward(params, tokens, config, attention_mask=mask))
    for row, n in enumerate(lengths):
        assert np.abs(got[row, :n] - expected[row, :n]).max() <= TOL
    # each padded row equals the same sequence run alone, unpadded
    alone = np.asarray(expand.forward(params, tokens[2:3, :37], config))
    assert np.abs(alone[0] - got[2, :37]).max() <= 1e-5


def test_hidden_states_match_transformers(tiny_checkpoint):
    """Per-slot residual stream = transformers' output_hidden_states (all but the last, which HF
    returns after the final norm)."""
    import torch

    reference = torch_reference(tiny_checkpoint)
    config, params = expand.load(tiny_checkpoint)
    tokens = random_tokens(config.vocab_size, (1, 512), seed=3)
    with torch.no_grad():
        hf_hidden = reference(torch.as_tensor(tokens), output_hidden_states=True).hidden_states
    _, hidden = expand.forward(params, tokens, config, return_hidden=True)
    assert hidden.shape == (config.num_hidden_layers + 1, 1, 512, config.hidden_size)
    for layer in range(config.num_hidden_layers):
        np.testing.assert_allclose(np.asarray(hidden[layer]), hf_hidden[layer].numpy(), atol=TOL, rtol=0)


def test_bf16_is_as_accurate_as_transformers_bf16(tiny_checkpoint):
    """bf16 params run in bf16. Against the fp32 reference, expand's bf16 error is no larger than
    transformers' own bf16 error on the same inputs (measured: mean 0.028 vs 0.028, max 0.36 vs 0.32; printed with -s)."""
    import jax.numpy as jnp
    import torch

    config, _ = expand.load(tiny_checkpoint)
    _, params16 = expand.load(tiny_checkpoint, dtype=jnp.bfloat16)
    assert params16["layers.mlp.up_proj.weight"].dtype == jnp.bfloat16
    tokens = random_tokens(config.vocab_size, (2, 256), seed=4)
    truth = torch_logits(torch_reference(tiny_checkpoint), tokens)
    torch_error = np.abs(torch_logits(torch_reference(tiny_checkpoint, torch.bfloat16), tokens) - truth)
    expand_error = np.abs(np.asarray(expand.forward(params16, tokens, config)) - truth)
    print(f"bf16 error vs fp32: expand mean {expand_error.mean():.3f} max {expand_error.max():.2f}, "
          f"transformers mean {torch_error.mean():.3f} max {torch_error.max():.2f}")
    assert expand_error.mean() > 1e-3  # really ran in bf16
    assert expand_error.mean() <= 1.25 * torch_error.mean()
    assert expand_error.max() <= 1.5 * torch_error.max()
