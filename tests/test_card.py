"""Every output directory explains itself: README.md (the model card) beside expand.json, with the plan as a
recipe that rebuilds the same plan, the exact parameter count, and the source's chat template carried over."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

import expand
from expand.cli import main
from expand.io.card import recipe_of
from expand.surgery.plan import with_identity, with_slot_scale
from tests.helpers import make_hf_checkpoint
from tests.tiny_tokenizer import VOCAB_SIZE, save_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("tiny_lm") / "model", vocab_size=VOCAB_SIZE)
    return save_tiny_tokenizer(path)


def card_recipes(card: str) -> list[dict]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", card, re.S)]


def same_plan(a, b) -> bool:
    return a.layer_ids.tolist() == b.layer_ids.tolist() and [dict(s.scales) for s in a.slots] == \
        [dict(s.scales) for s in b.slots] and dict(a.outer_scales) == dict(b.outer_scales)


@pytest.mark.parametrize("plan", [
    expand.plan_from_layer_spec("0:20,10:30", 30),
    expand.llama_pro_plan(30, 36),
    with_identity(expand.plan_from_layer_spec("0:10,5:15,10:30:2", 30), duplicates=True),
    with_slot_scale(expand.plan_from_layer_spec("3,2,1,0", 30), 2, "layers.mlp.down_proj.weight", 0.5),
])
def test_recipe_of_a_plan_rebuilds_the_plan(plan):
    recipe = recipe_of(plan.to_json(), "base-model")
    assert same_plan(expand.plan_from_recipe(recipe, num_layers=30), plan)


def test_outer_scales_survive_the_recipe():
    recipe = {"slices": [{"sources": [{"model": "m", "layer_range": [0, 4]}]}], "merge_method": "passthrough",
              "parameters": {"scale": [{"filter": "lm_head", "value": 0.5}, {"filter": "o_proj", "value": 2.0}]}}
    plan = expand.plan_from_recipe(recipe, num_layers=4)
    assert same_plan(expand.plan_from_recipe(recipe_of(plan.to_json(), "m"), num_layers=4), plan)


def test_depth_output_card(tiny_lm, tmp_path):
    out = tmp_path / "grown"
    assert main(["depth", str(tiny_lm), str(out), "--llama-pro", "6"]) == 0
    card = (out / "README.md").read_text()
    assert f"from `{tiny_lm}`" in card and f"expand {expand.io.card.expand_version()}" in card
    config = expand.read_config(out)
    assert f"| parameters | {expand.param_count(config):,} |" in card
    (recipe,) = card_recipes(card)
    rebuilt = expand.plan_from_recipe(recipe)  # the recipe names the source by its path: runnable as it is
    assert same_plan(rebuilt, expand.llama_pro_plan(4, 6))
    assert f"expand check {tiny_lm} grown" in card
    assert (out / "chat_template.jinja").read_text() == (tiny_lm / "chat_template.jinja").read_text()
    assert (out / "expand.json").exists()


def test_every_output_directory_has_a_card(tiny_lm, tmp_path):
    assert main(["convert", str(tiny_lm), str(tmp_path / "copy")]) == 0
    assert main(["widen", str(tiny_lm), str(tmp_path / "wide"), "--hidden-size", "96"]) == 0
    copy, wide = (tmp_path / "copy" / "README.md").read_text(), (tmp_path / "wide" / "README.md").read_text()
    assert f"from `{tiny_lm}`." in copy and "How it was made" not in copy
    assert "### 1. widen" in wide and "hidden_size: 96" in wide and "mode: exact" in wide
    model = expand.load(tiny_lm)
    expand.save(tmp_path / "saved", model.config, model.params, tokenizer_from=tiny_lm)
    saved = (tmp_path / "saved" / "README.md").read_text()
    assert "no recorded source" in saved and f"| parameters | {expand.param_count(model.config):,} |" in saved
    assert np.all([(tmp_path / d / "chat_template.jinja").exists() for d in ("copy", "wide", "saved")])


@pytest.mark.parametrize("verb, args, verdict", [("depth", ["--layer-spec", "0:3,1:"], "drifted"),
                                                 ("widen", ["--hidden-size", "96"], "preserved")])
def test_check_recorded_in_the_output(tiny_lm, tmp_path, verb, args, verdict):
    """--check: the output carries check.json and the verdict in its card, the same report `expand check`
    gives afterwards on the same text."""
    out = tmp_path / "out"
    assert main([verb, str(tiny_lm), str(out), *args, "--check"]) == 0
    recorded = json.loads((out / "check.json").read_text())
    text = expand.shipped_text("expand-docs")
    assert recorded["texts"] == {"expand-docs": expand.text.text_sha256(text)}
    after = expand.check(tiny_lm, out, text=text)
    assert recorded["verdict"] == after.verdict == verdict
    # the same check run again: equal up to the order of XLA:CPU's threaded reductions
    assert recorded["max_abs_logit_delta"] == pytest.approx(after.max_abs_logit_delta, rel=1e-5)
    assert recorded["mean_kl"] == pytest.approx(after.mean_kl, rel=1e-5, abs=1e-12)
    card = (out / "README.md").read_text()
    assert "No function check was recorded" not in card
    assert f"| {verdict} | {recorded['max_abs_logit_delta']:.3g} |" in card
    assert card.index("## Check") < card.index("## Files")

