"""The command line: each verb runs in-process through `expand.cli.main`, exit codes included."""

from __future__ import annotations

import json
import shutil

import numpy as np

import expand
from expand.cli import main
from tests.helpers import random_tokens, torch_logits, torch_reference


def test_show_works_from_config_json_alone(tmp_path, tiny_checkpoint, capsys):
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", only_config)
    assert main(["show", str(only_config), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == expand.param_count(expand.read_config(tiny_checkpoint))
    assert info["config"]["num_hidden_layers"] == 4
    assert main(["show", str(tiny_checkpoint)]) == 0
    assert "parameters" in capsys.readouterr().out


def test_convert_to_orbax_and_back(tmp_path, tiny_checkpoint):
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "orbax"), "--format", "orbax"]) == 0
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    tokens = random_tokens(256, (1, 24))
    np.testing.assert_array_equal(torch_logits(torch_reference(tmp_path / "hf"), tokens),
                                  torch_logits(torch_reference(tiny_checkpoint), tokens))


def test_convert_refuses_existing_output_and_own_input(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "taken")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", str(tiny_checkpoint), str(tiny_checkpoint / "inside")]) == 2
    assert "overwrite the input" in capsys.readouterr().err


def test_missing_model_is_exit_2(tmp_path, capsys):
    assert main(["show", str(tmp_path / "nowhere")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_generate_streams_text(smollm2, capsys):
    assert main(["generate", "smollm2", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_layer_specs_starting_with_a_minus_work_as_written(tiny_checkpoint, capsys):
    assert main(["show", str(tiny_checkpoint), "--layer-spec", "-2:", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["slots"] == [2, 3]
    assert main(["show", str(tiny_checkpoint), "--layer-spec", "-4:-1,-1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["slots"] == [0, 1, 2, 3]


def test_empty_and_dash_range_specs_are_refused_with_the_fix(tmp_path, tiny_checkpoint, capsys):
    assert main(["depth", str(tiny_checkpoint), str(tmp_path / "out"), "--layer-spec", ""]) == 2
    assert "the layer spec is empty" in capsys.readouterr().err
    assert main(["check", str(tiny_checkpoint), "--layer-spec", "", "--random-tokens"]) == 2
    assert "the layer spec is empty" in capsys.readouterr().err
    assert main(["depth", str(tiny_checkpoint), str(tmp_path / "out"), "--layer-spec", "0-2"]) == 2
    assert "did you mean 0:3?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_option_says_what_it_does_and_its_default(capsys):
    import pytest

    from expand.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    for name, sub in verbs.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"expand {name} {action.option_strings[0]} has no help"
            if action.default not in (None, False):
                text = " ".join(sub.format_help().split())  # help lines wrap
                assert f"(default: {action.default})" in text, f"expand {name} {action.option_strings[0]}"
    with pytest.raises(SystemExit):
        main(["depth", "--help"])
    assert "stop is exclusive" in capsys.readouterr().out


def test_the_command_line_does_not_import_flax_nnx_until_llama_is_asked_for():
    """`expand.Llama` (flax.nnx) is imported on first use; it is still a listed name of the package."""
    import subprocess
    import sys

    code = ("import sys, expand.cli, expand; assert 'flax.nnx' not in sys.modules; assert 'Llama' in dir(expand); "
            "expand.Llama; assert 'flax.nnx' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generate_refuses_nan_weights_and_a_run_past_the_context_window(tmp_path, capsys):
    """A model whose logits are NaN is exit 2 naming the NaN tensor (not an empty answer and exit 0); more
    new tokens than the context window holds is exit 2 naming --max-new-tokens (not an allocation error)."""
    from safetensors.numpy import load_file, save_file

    from tests.helpers import make_hf_checkpoint
    from tests.tiny_tokenizer import VOCAB_SIZE, save_tiny_tokenizer

    model = save_tiny_tokenizer(make_hf_checkpoint(tmp_path / "model", vocab_size=VOCAB_SIZE))
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], np.nan)
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["generate", str(broken), "--prompt", "hi", "--raw", "--max-new-tokens", "5"]) == 2
    assert "NaN or inf (norm.weight)" in capsys.readouterr().err
    assert main(["generate", str(model), "--prompt", "hi", "--raw", "--max-new-tokens", "1000000000"]) == 2
    assert "context window (max_position_embeddings = 2048)" in capsys.readouterr().err
