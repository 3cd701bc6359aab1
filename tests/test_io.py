"""Saving and loading: expand.save -> transformers, save -> load, orbax, and bad inputs that must each
fail with a clear message and leave nothing behind."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import expand
from expand.io.atomic import OutputExistsError
from tests.helpers import make_hf_checkpoint, random_tokens, torch_logits, torch_reference

CONFIGS = Path(__file__).parents[1] / "experiments" / "configs"


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("variant", [dict(), dict(tie_word_embeddings=True, attention_bias=True)])
def test_save_loads_in_transformers_without_warnings(tmp_path, caplog, variant):
    src = make_hf_checkpoint(tmp_path / "src", seed=3, **variant)
    model = expand.load(src)
    out = expand.save(tmp_path / "out", model.config, model.params, tokenizer_from=None, max_shard_size="30KB")
    assert (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    with caplog.at_level(logging.WARNING):
        reloaded = torch_reference(out)
    assert not [r for r in caplog.records if "weights" in r.getMessage().lower()], caplog.text
    tokens = random_tokens(model.config.vocab_size, (2, 64), seed=1)
    # the same bits in the same layout: transformers computes the same logits, bit for bit
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(torch_reference(src), tokens))


def test_save_then_load_gives_identical_arrays(tmp_path, tiny_checkpoint):
    model = expand.load(tiny_checkpoint)
    expand.save(tmp_path / "again", *model)
    again = expand.load(tmp_path / "again")
    assert again.config == model.config
    for name in model.params:
        np.testing.assert_array_equal(np.asarray(again.params[name]), np.asarray(model.params[name]))


def test_orbax_round_trip_and_convert_back_to_hf(tmp_path, tiny_checkpoint):
    model = expand.load(tiny_checkpoint)
    expand.save(tmp_path / "orbax", *model, format="orbax")
    restored = expand.load(tmp_path / "orbax")
    for name in model.params:
        np.testing.assert_array_equal(np.asarray(restored.params[name]), np.asarray(model.params[name]))
    expand.save(tmp_path / "hf", *restored)
    tokens = random_tokens(256, (1, 32))
    np.testing.assert_array_equal(torch_logits(torch_reference(tmp_path / "hf"), tokens),
                                  torch_logits(torch_reference(tiny_checkpoint), tokens))


def test_load_dtype_chooses_param_dtype(tiny_checkpoint):
    model = expand.load(tiny_checkpoint, dtype=jax.numpy.bfloat16)
    assert {str(p.dtype) for p in model.params.values()} == {"bfloat16"}


def test_bf16_checkpoint_saves_as_bf16(tmp_path, tiny_checkpoint):
    model = expand.load(tiny_checkpoint, dtype=jax.numpy.bfloat16)
    out = expand.save(tmp_path / "bf16", *model)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again = expand.load(out, dtype=jax.numpy.bfloat16)
    np.testing.assert_array_equal(np.asarray(again.params["layers.mlp.up_proj.weight"], np.float32),
                                  np.asarray(model.params["layers.mlp.up_proj.weight"], np.float32))


# ---- bad inputs ----------------------------------------------------------------------------------------


def test_missing_config_json(tmp_path, tiny_checkpoint):
    broken = tmp_path / "no-config"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        expand.load(broken)


def test_unknown_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(expand.ConfigError, match="unknown architecture .*gpt2"):
        expand.read_config(tmp_path / "gpt2")


def test_truncated_safetensors(tmp_path, tiny_checkpoint):
    broken = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(expand.CheckpointError, match="truncated"):
        expand.load(broken)


def test_shape_mismatch_between_config_and_tensors(tmp_path, tiny_checkpoint):
    broken = tmp_path / "mismatch"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 128
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(expand.CheckpointError, match="mlp.up_proj.weight has shape"):
        expand.load(broken)


def test_existing_output_needs_overwrite_and_nothing_is_left_behind(tmp_path, tiny_checkpoint):
    model = expand.load(tiny_checkpoint)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = _siblings(out)
    with pytest.raises(OutputExistsError, match="--force"):
        expand.save(out, *model)
    assert _siblings(out) == before and (out / "keep.txt").read_text() == "mine"
    expand.save(out, *model, overwrite=True)
    assert not (out / "keep.txt").exists() and _siblings(out) == before


def test_failed_write_leaves_nothing(tmp_path, tiny_checkpoint):
    model = expand.load(tiny_checkpoint)
    params = dict(model.params)
    params["norm.weight"] = params["norm.weight"][:3]
    with pytest.raises(ValueError, match="norm.weight"):
        expand.save(tmp_path / "bad", model.config, params)
    assert list(tmp_path.iterdir()) == []


# ---- shapes of the real thing, without weights ------------------------------------------------------------

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False,
                 architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
                 max_position_embeddings=8192)
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64}


@pytest.mark.parametrize("hf, count", [(LLAMA3_8B, 8_030_261_248), (LLAMA3_70B, 70_553_706_496)])
def test_eval_shape_of_llama3(hf, count):
    from expand.params import abstract_params

    config = expand.Config.from_hf(hf)
    assert expand.param_count(config) == count
    params = abstract_params(config, jax.numpy.bfloat16)
    assert sum(int(np.prod(p.shape)) for p in params.values()) == count
    d, L = config.hidden_size, config.num_hidden_layers
    assert params["layers.self_attn.q_proj.weight"].shape == (L, d, config.num_attention_heads, 128)
    assert params["layers.self_attn.k_proj.weight"].shape == (L, d, 8, 128)
    assert params["layers.mlp.down_proj.weight"].shape == (L, config.intermediate_size, d)
    logits = jax.eval_shape(lambda p: expand.forward(p, np.zeros((2, 16), np.int32), config), params)
    assert logits.shape == (2, 16, 128256)


def test_config_fields_transformers_knows_are_handled_or_refused_by_name():
    """Every field of today's LlamaConfig and MistralConfig is read by expand or known to have no effect; a
    field transformers adds tomorrow (simulated by extending the real defaults) is refused by name when set."""
    import json as json_module

    from transformers import LlamaConfig, MistralConfig

    from expand.config import HANDLED, NO_EFFECT, unhandled_settings

    for cls in (LlamaConfig, MistralConfig):
        assert set(cls().to_dict()) <= HANDLED | NO_EFFECT, cls.__name__
    defaults = {**LlamaConfig().to_dict(), "attention_sink_size": 0}
    config = json_module.loads((CONFIGS / "llama-3-8b" / "config.json").read_text())
    assert unhandled_settings(config, defaults) == []
    assert unhandled_settings({**config, "attention_sink_size": 0}, defaults) == []  # the default: no effect
    assert unhandled_settings({**config, "attention_sink_size": 4}, defaults) == ["attention_sink_size"]
    with pytest.raises(expand.ConfigError, match="hidden_act"):
        expand.Config.from_hf({**config, "hidden_act": "gelu"})


def test_reading_a_config_written_by_transformers_does_not_import_it(tiny_checkpoint):
    """transformers costs seconds and a few hundred MB to import: a config whose fields are all handled or
    without effect is read without it (every verb reads one at start)."""
    import subprocess
    import sys

    code = ("import sys; import expand; from expand.config import Config; "
            f"Config.from_file({str(tiny_checkpoint / 'config.json')!r}); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
