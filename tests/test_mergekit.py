"""mergekit 0.1.5 itself (its Python API, in this process) against `expand depth` on every shipped SmolLM2
recipe and on a bare `{filter, value}` scale mapping, applied to a tiny random checkpoint with SmolLM2's 30
layers: the same tensor names, shapes, dtypes and values, bit for bit. tests/test_depth.py checks the same recipes against mergekit's semantics as
documented; this checks them against what mergekit does."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import yaml

from expand.cli import main
from expand.io.safetensors import SafetensorsSource
from tests.test_depth import SMOLLM2_RECIPES, tiny30  # noqa: F401  (tiny30: the fixture)


def run_mergekit(recipe: dict, out) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(recipe), str(out), options)


def test_mergekit_version_is_the_pinned_one():
    from importlib.metadata import version

    assert version("mergekit") == "0.1.5"


BARE_MAPPING = {  # a bare {filter, value} mapping, which mergekit takes as a one-element list
    "merge_method": "passthrough", "dtype": "float32",
    "slices": [{"sources": [{"model": "smollm2", "layer_range": [0, 20]}]},
               {"sources": [{"model": "smollm2", "layer_range": [10, 30]}],
                "parameters": {"scale": {"filter": "o_proj", "value": [0.0, 1.0]}}}]}


def recipes() -> list:
    return [pytest.param(yaml.safe_load(p.read_text()), id=p.stem) for p in SMOLLM2_RECIPES] + [
        pytest.param(BARE_MAPPING, id="bare-filter-mapping")]


@pytest.mark.parametrize("recipe", recipes())
def test_expand_depth_writes_mergekit_s_tensors(tmp_path, tiny30, recipe):  # noqa: F811
    recipe = copy.deepcopy(recipe)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for slice_ in recipe["slices"]:
        for source in slice_["sources"]:
            source["model"] = str(tiny30)
    run_mergekit(recipe, tmp_path / "mergekit")
    assert main(["depth", str(tiny30), str(tmp_path / "expand"), "--recipe", str(tmp_path / "recipe.yaml")]) == 0
    theirs, ours = SafetensorsSource(tmp_path / "mergekit"), SafetensorsSource(tmp_path / "expand")
    assert ours.names() == theirs.names()
    for name in sorted(theirs.names()):
        a, b = ours.read(name), theirs.read(name)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        np.testing.assert_array_equal(a, b, err_msg=name)
    ours_config = json.loads((tmp_path / "expand" / "config.json").read_text())
    theirs_config = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert ours_config["num_hidden_layers"] == theirs_config["num_hidden_layers"]
