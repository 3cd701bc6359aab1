"""Surgery as a plan: depth and width (and both) emit per-tensor plans that one in-memory and one streaming
executor run; the two agree bit for bit, and depth-then-width in one pass equals the two steps in turn."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

import expand
from expand.cli import main
from expand.params import param_shapes
from expand.surgery.tensorplan import BASE, DONOR, copy_tensors, depth_tensors, width_tensors
from expand.surgery.width import width_plan
from tests.helpers import make_hf_checkpoint, random_tokens

SIZES = dict(hidden_size=80, num_attention_heads=10, num_key_value_heads=5, intermediate_size=200)


def test_a_plan_names_every_output_tensor_once_with_its_source(tiny_checkpoint):
    from expand.surgery.execute import execute

    config = expand.read_config(tiny_checkpoint)
    depth = expand.with_identity(expand.plan_from_layer_spec("0:3,1:", 4), duplicates=True)
    tensors = width_tensors(depth_tensors(config, depth), width_plan(config.replace(num_hidden_layers=6), **SIZES))
    assert tensors.config.num_hidden_layers == 6 and tensors.config.hidden_size == 80
    names = [out.hf_name for out in tensors.outputs]
    assert len(names) == len(set(names)) == 2 + 6 * 9 + 1  # embed, norm, 9 tensors x 6 layers, lm_head
    assert {out.rule.source.layer for out in tensors.outputs if out.layer == 3} == {1}  # slot 3 re-runs layer 1
    identity = {out.name: out.rule.scale for out in tensors.outputs if out.layer == 3}
    assert identity["layers.self_attn.o_proj.weight"] == 0.0 and identity["layers.mlp.up_proj.weight"] == 1.0
    assert all(out.rule.grow is not None and out.rule.grow.layer == out.layer for out in tensors.outputs)
    assert all((out.layer is not None) == out.spec.stacked for out in tensors.outputs)
    params = execute(tensors, {BASE: expand.load(tiny_checkpoint).params})
    assert {name: tuple(value.shape) for name, value in params.items()} == param_shapes(tensors.config)


def test_grow_on_disk_equals_depth_then_widen_in_memory(tmp_path, tiny_checkpoint):
    donor = make_hf_checkpoint(tmp_path / "donor", seed=4, hidden_size=96, num_attention_heads=12,
                               num_key_value_heads=6, intermediate_size=240, num_hidden_layers=6)
    plan = expand.with_identity(expand.plan_from_layer_spec("0:3,1:", 4), duplicates=True)
    out = expand.grow_to_disk(tiny_checkpoint, tmp_path / "grown", plan=plan, donor=donor, **SIZES)
    model, d = expand.load(tiny_checkpoint), expand.load(donor)
    in_memory = expand.widen_model(expand.depth_model(model, plan), donor=d, **SIZES)
    on_disk = expand.load(out)
    assert on_disk.config == in_memory.config
    for name, value in in_memory.params.items():
        np.testing.assert_array_equal(np.asarray(on_disk.params[name]), np.asarray(value), err_msg=name)
    assert list(on_disk.provenance.layer_map) == [0, 1, 2, 2, 2, 3]
    assert [op["op"] for op in on_disk.provenance.history] == ["depth", "widen"]
    # identity copies and an exact widening: the same function as the base
    tokens = random_tokens(256, (2, 64), seed=2)
    base = np.asarray(expand.forward(model.params, tokens, model.config))
    grown = np.asarray(expand.forward(on_disk.params, tokens, on_disk.config))
    assert np.abs(grown - base).max() <= 1e-4


def test_executors_refuse_plans_whose_inputs_are_missing(tiny_checkpoint):
    from expand.surgery.execute import execute

    model = expand.load(tiny_checkpoint)
    tensors = width_tensors(copy_tensors(model.config), width_plan(model.config, **SIZES, donor=model.config.replace(
        hidden_size=96, num_attention_heads=12, num_key_value_heads=6, intermediate_size=240)),
        donor=model.config.replace(hidden_size=96, num_attention_heads=12, num_key_value_heads=6,
                                   intermediate_size=240))
    assert set(tensors.inputs) == {BASE, DONOR}
    with pytest.raises(ValueError, match="donor"):
        execute(tensors, {BASE: model.params})


def test_cli_grow_and_multi_model_recipes(tmp_path, capsys):
    a = make_hf_checkpoint(tmp_path / "a", seed=1)
    b = make_hf_checkpoint(tmp_path / "b", seed=2)
    recipe = tmp_path / "ab.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]}]}))
    assert main(["depth", str(a), str(tmp_path / "ab"), "--recipe", str(recipe)]) == 0
    merged, mb = expand.load(tmp_path / "ab"), expand.load(b)
    np.testing.assert_array_equal(merged.params["layers.mlp.up_proj.weight"][3], mb.params["layers.mlp.up_proj.weight"][1])
    other = make_hf_checkpoint(tmp_path / "c", seed=3)
    assert main(["depth", str(other), str(tmp_path / "x"), "--recipe", str(recipe)]) == 2
    assert "not one of the recipe's models" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text(recipe.read_text().replace(str(b), str(tmp_path / "bb")))
    assert main(["depth", str(a), str(tmp_path / "x"), "--recipe", str(typo)]) == 2
    assert "bb" in capsys.readouterr().err
    assert main(["grow", str(a), str(tmp_path / "g"), "--layer-spec", "0:3,1:", "--hidden-size", "80",
                 "--num-heads", "10", "--num-kv-heads", "5", "--intermediate-size", "200"]) == 0
    grown = expand.load(tmp_path / "g")
    assert (grown.config.num_hidden_layers, grown.config.hidden_size) == (6, 80)
    assert not (tmp_path / "x").exists()
