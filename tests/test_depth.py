"""Depth surgery: plans applied virtually (layer_ids, shared weights) and materialized (apply_depth), on disk
(`expand depth`), and mergekit passthrough semantics checked tensor by tensor on the shipped recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import expand
from expand.cli import main
from expand.surgery.plan import IDENTITY_SCALES
from tests.helpers import make_hf_checkpoint, random_tokens, torch_logits, torch_reference

RECIPES = Path(__file__).parents[1] / "experiments" / "recipes"
SMOLLM2_RECIPES = sorted(RECIPES.glob("smollm2-*.yaml"))


@pytest.fixture(scope="module")
def tiny30(tmp_path_factory):
    """A tiny random Llama with SmolLM2's 30 layers, so the SmolLM2 recipes apply to it unchanged."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny30") / "model", seed=7, num_hidden_layers=30,
                              hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=True)


def _logits(model, tokens, plan=None):
    if plan is None:
        return np.asarray(expand.forward(model.params, tokens, model.config))
    return np.asarray(expand.forward(model.params, tokens, model.config, layer_ids=plan.layer_ids,
                                     slot_scales=plan.slot_scales()))


def test_identity_duplicates_leave_logits_unchanged(tiny_checkpoint):
    model = expand.load(tiny_checkpoint)
    tokens = random_tokens(256, (2, 96), seed=3)
    base = _logits(model, tokens)
    plan = expand.with_identity(expand.plan_from_layer_spec("0:3,1:3,2:", 4), duplicates=True)
    assert plan.layer_ids.tolist() == [0, 1, 2, 1, 2, 2, 3]
    assert [i for i, s in enumerate(plan.slots) if s.scales == IDENTITY_SCALES] == [3, 4, 5]
    np.testing.assert_array_equal(_logits(model, tokens, plan), base)  # h + 0 is h: bit for bit
    grown = expand.depth_model(model, plan)
    assert grown.config.num_hidden_layers == 7
    np.testing.assert_array_equal(_logits(grown, tokens), base)


def test_llama_pro_plan_is_identity():
    plan = expand.llama_pro_plan(8, 10)
    assert plan.layer_ids.tolist() == [0, 1, 2, 3, 3, 4, 5, 6, 7, 7]
    with pytest.raises(ValueError, match="equal groups"):
        expand.llama_pro_plan(8, 11)


@pytest.mark.parametrize("spec", ["0:3,1:4", "3,2,1,0", "0,0,0,1,2,3", "0:4:2"])
def test_virtual_and_materialized_plans_give_the_same_logits(tiny_checkpoint, spec):
    model = expand.load(tiny_checkpoint)
    tokens = random_tokens(256, (2, 64), seed=5)
    plan = expand.with_slot_scale(expand.plan_from_layer_spec(spec, 4), 0, "layers.mlp.up_proj.weight", 0.5)
    virtual = _logits(model, tokens, plan)
    materialized = _logits(expand.depth_model(model, plan), tokens)
    np.testing.assert_allclose(materialized, virtual, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec, at_least", [("0:3,1:3,2:", 0.05), ("0,1,3", 0.05), ("0,2,1,3", 0.05)])
def test_plain_duplicates_deletions_and_swaps_change_the_function(tiny_checkpoint, spec, at_least):
    """Without identity initialisation the function changes; the measured amount is printed."""
    model = expand.load(tiny_checkpoint)
    tokens = random_tokens(256, (2, 96), seed=3)
    base = _logits(model, tokens)
    delta = np.abs(_logits(model, tokens, expand.plan_from_layer_spec(spec, 4)) - base).max()
    print(f"{spec}: max |delta logit| {delta:.3f} (logit std {base.std():.3f})")
    assert delta >= at_least


def test_materialized_clones_are_decoupled(tiny_checkpoint):
    model = expand.load(tiny_checkpoint)
    grown = expand.depth_model(model, expand.plan_from_layer_spec("0,0,1,2,3", 4))
    q = grown.params["layers.self_attn.q_proj.weight"]
    edited = q.at[1].multiply(2.0)
    assert not np.array_equal(np.asarray(edited[0]), np.asarray(edited[1]))
    assert np.array_equal(np.asarray(q[0]), np.asarray(q[1]))


# ---- mergekit passthrough semantics -------------------------------------------------------------------


def mergekit_expected_scale(hf_name: str, t: float, source: dict, slice_: dict, recipe: dict) -> float:
    """mergekit's passthrough scale for one tensor, written out from its documentation: the source's,
    then the slice's, then the recipe's `parameters.scale`; a number, a gradient list interpolated at t, or
    a list of {filter, value} where the first filter that is a substring of the name wins."""
    for holder in (source, slice_, recipe):
        setting = (holder.get("parameters") or {}).get("scale")
        while isinstance(setting, list) and setting and isinstance(setting[0], dict):
            setting = next((c["value"] for c in setting if c.get("filter") in (None, "*") or c["filter"] in hf_name),
                           None)
        if isinstance(setting, list):
            x = t * (len(setting) - 1)
            lo = int(np.floor(x))
            hi = min(lo + 1, len(setting) - 1)
            setting = setting[lo] + (x - lo) * (setting[hi] - setting[lo])
        if setting is not None:
            return float(setting)
    return 1.0


def mergekit_expected_tensors(recipe: dict, source) -> dict[str, np.ndarray]:
    """The HF tensors mergekit's passthrough writes for a single-model recipe (float32)."""
    out, index = {}, 0
    for slice_ in recipe["slices"]:
        src = slice_["sources"][0]
        start, stop = src["layer_range"]
        for offset, layer in enumerate(range(start, stop)):
            t = offset / (stop - start - 1) if stop - start > 1 else 1.0
            for name in source.names():
                prefix = f"model.layers.{layer}."
                if name.startswith(prefix):
                    scale = mergekit_expected_scale(name, t, src, slice_, recipe)
                    out[f"model.layers.{index}." + name[len(prefix):]] = source.read(name) * np.float32(scale)
            index += 1
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        holder = recipe["slices"][0 if "embed" in name else -1]
        scale = mergekit_expected_scale(name, 0.0, holder["sources"][0], holder, recipe)
        out[name] = source.read(name) * np.float32(scale)
    return out


@pytest.mark.parametrize("recipe_path", SMOLLM2_RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_match_mergekit_semantics_on_disk(tmp_path, tiny30, recipe_path):
    from expand.io.safetensors import SafetensorsSource

    recipe = yaml.safe_load(recipe_path.read_text())
    assert main(["depth", str(tiny30), str(tmp_path / "out"), "--recipe", str(recipe_path)]) == 0
    written = SafetensorsSource(tmp_path / "out")
    expected = mergekit_expected_tensors(recipe, SafetensorsSource(tiny30))
    assert written.names() == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(written.read(name), array, err_msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    plan = expand.plan_from_recipe(recipe_path, num_layers=30)
    assert config["num_hidden_layers"] == plan.num_layers
    # in memory: the same plan through apply_depth writes the same tensors
    grown = expand.depth_model(expand.load(tiny30), plan)
    again = expand.save(tmp_path / "again", *grown)
    for name in expected:
        np.testing.assert_array_equal(SafetensorsSource(again).read(name), written.read(name), err_msg=name)


def test_recipe_with_two_models_takes_embeddings_from_first_and_head_from_last(tmp_path):
    a = make_hf_checkpoint(tmp_path / "a", seed=1)
    b = make_hf_checkpoint(tmp_path / "b", seed=2)
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
    ]}
    plan = expand.plan_from_recipe(recipe)
    assert plan.num_layers == 6
    models = {str(a): str(a), str(b): str(b)}
    out = expand.depth_to_disk(a, tmp_path / "ab", plan, models=models)
    merged, ma, mb = expand.load(out), expand.load(a), expand.load(b)
    np.testing.assert_array_equal(merged.params["embed_tokens.weight"], ma.params["embed_tokens.weight"])
    np.testing.assert_array_equal(merged.params["lm_head.weight"], mb.params["lm_head.weight"])
    np.testing.assert_array_equal(merged.params["norm.weight"], mb.params["norm.weight"])
    np.testing.assert_array_equal(merged.params["layers.mlp.up_proj.weight"][3], mb.params["layers.mlp.up_proj.weight"][1])
    np.testing.assert_array_equal(merged.params["layers.mlp.up_proj.weight"][2], ma.params["layers.mlp.up_proj.weight"][2])


@pytest.mark.parametrize("recipe, message", [
    ({"merge_method": "linear", "slices": []}, "passthrough"),
    ({"merge_method": "passthrough"}, "no 'slices'"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m", "layer_range": [0, 40]}]}]}, "layer_range"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m", "layer_range": [3, 3]}]}]}, "nonempty"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m", "layer_range": [0, 2]},
                                                             {"model": "m", "layer_range": [0, 2]}]}]}, "exactly one"),
    ({"merge_method": "passthrough", "slice": []}, "unknown key 'slice'; did you mean 'slices'"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m", "layer_range": [0, 2],
                                                               "paramters": {"scale": 0.5}}]}]},
     "unknown key 'paramters'; did you mean 'parameters'"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m", "layer_range": [0, 2],
                                                               "parameters": {"scael": 0.5}}]}]},
     "did you mean 'scale'"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}],
      "parameters": {"scale": [{"fliter": "o_proj", "value": 0}]}}, "unknown key 'fliter'; did you mean 'filter'"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}],
                                                 "residual_weight": 0.5}]}, "no effect in passthrough"),
    ({"merge_method": "passthrough", "dtype": "flaot16",
      "slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}]}, "did you mean float16"),
    ({"merge_method": "passthrough", "dtype": "float8",
      "slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}]}, "not a float dtype"),
    ({"merge_method": "passthrough", "tokenizer_source": "union",
      "slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}]}, "keeps MODEL's tokenizer"),
    ({"merge_method": "passthrough", "chat_template": "chatml",
      "slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}]}, "Jinja template itself"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m", "layer_range": [0, 2],
                                                               "parameters": {"scale": "half"}}]}]},
     "must be a number"),
])
def test_bad_recipes_are_refused(recipe, message):
    with pytest.raises(ValueError, match=re.escape(message) if "(" in message else message):
        expand.plan_from_recipe(recipe, num_layers=30)


def test_a_bare_filter_mapping_is_mergekit_s_one_element_list():
    """mergekit 0.1.5 accepts `scale: {filter: o_proj, value: 0}` and applies it as a one-element list."""
    def plan(scale):
        return expand.plan_from_recipe({"merge_method": "passthrough", "parameters": {"scale": scale},
                                        "slices": [{"sources": [{"model": "m", "layer_range": [0, 3]}]}]},
                                       num_layers=30)

    bare, listed = plan({"filter": "o_proj", "value": 0}), plan([{"filter": "o_proj", "value": 0}])
    assert bare.slots == listed.slots
    assert [s.scale_of("layers.self_attn.o_proj.weight") for s in bare.slots] == [0.0, 0.0, 0.0]
    assert all(s.scale_of("layers.mlp.down_proj.weight") == 1.0 for s in bare.slots)
    assert plan([]).slots == plan(1.0).slots  # an empty list sets nothing
    assert plan("0.5").slots == plan(0.5).slots  # YAML reads some numbers as strings; mergekit converts them


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: passthrough\nslices:\n  - sources: [{model: m, layer_range: [0, 2]}\n")
    with pytest.raises(ValueError, match="not valid YAML at line"):
        expand.plan_from_recipe(path, num_layers=30)


# ---- on disk -------------------------------------------------------------------------------------------


def test_expand_depth_output_loads_in_transformers_and_matches_expand(tmp_path, tiny_checkpoint):
    out = tmp_path / "deep"
    assert main(["depth", str(tiny_checkpoint), str(out), "--layer-spec", "0:3,1:", "--identity", "duplicates",
                 "--max-shard-size", "60KB"]) == 0
    reference = torch_reference(out)
    assert reference.config.num_hidden_layers == 6
    tokens = random_tokens(256, (1, 80), seed=9)
    grown = expand.load(out)
    assert list(grown.provenance.layer_map) == [0, 1, 2, 2, 2, 3]  # identity copies correspond to layer 2
    ours = np.asarray(expand.forward(grown.params, tokens, grown.config))
    assert np.abs(ours - torch_logits(reference, tokens)).max() <= 1e-4
    base = torch_logits(torch_reference(tiny_checkpoint), tokens)
    np.testing.assert_array_equal(torch_logits(reference, tokens), base)  # identity duplicates, in transformers too


def test_expand_depth_refuses_bad_input_and_keeps_existing_output(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    assert main(["depth", str(tiny_checkpoint), str(out), "--layer-spec", "0:9"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["depth", str(tiny_checkpoint), str(out), "--layer-spec", "0:2"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["depth", str(tiny_checkpoint), str(tmp_path / "x"), "--layer-spec", "0:2", "--recipe", "r"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_show_plan_for_llama3_8b_from_config_alone(capsys):
    config = Path(__file__).parents[1] / "experiments" / "configs" / "llama-3-8b"
    assert main(["show", str(config), "--layer-spec", "0:8,4:12,8:16,12:20,16:24,20:28,24:32", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] == 56 and info["new_parameters"] == 13_264_949_248
    assert info["layer_map"] == "0-7, 4-11, 8-15, 12-19, 16-23, 20-27, 24-31"


def test_recipe_chat_template_and_tokenizer_source_base(tmp_path, tiny30):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    def with_tokenizer(path, template):
        backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=template).save_pretrained(path)

    base = tmp_path / "base"
    import shutil

    shutil.copytree(tiny30, base)
    with_tokenizer(base, "{{ 'BASE' }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    recipe = {"merge_method": "passthrough", "base_model": str(base), "tokenizer_source": "base",
              "chat_template": template, "slices": [{"sources": [{"model": "any", "layer_range": [0, 4]}]}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["depth", str(tiny30), str(tmp_path / "out"), "--recipe", str(path)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.get_vocab() == {"[UNK]": 0, "a": 1, "b": 2}  # base_model's tokenizer
    assert tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "<<a>>"
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == template
