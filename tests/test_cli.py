"""The command line: each verb runs in-process through `expand.cli.main`, exit codes included."""

from __future__ import annotations

import json
import shutil

import numpy as np

import expand
from expand.cli import main
from tests.conftest import random_tokens, torch_logits, torch_reference


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
