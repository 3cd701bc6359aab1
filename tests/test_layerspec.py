"""The layer-spec language: a table of specs with hand-computed slot lists, refusals, and fuzzing that
shows the parser fails only with a ValueError naming the bad item."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import expand
from expand.surgery.layerspec import format_layer_map, parse_layer_spec, to_layer_spec

R = lambda a, b, s=1: list(range(a, b, s))  # noqa: E731

TABLE = [
    # (spec, num_layers, slots)
    ("0:8,4:12,8:16,12:20,16:24,20:28,24:32", 32,  # chatllm.cpp's README example: 56 layers
     R(0, 8) + R(4, 12) + R(8, 16) + R(12, 20) + R(16, 24) + R(20, 28) + R(24, 32)),
    ("0:10,10:20:2,20:", 32, R(0, 10) + [10, 12, 14, 16, 18] + R(20, 32)),  # chatllm.cpp's second example
    ("all", 4, [0, 1, 2, 3]),
    ("all,all", 3, [0, 1, 2, 0, 1, 2]),
    (":", 5, [0, 1, 2, 3, 4]),
    ("3", 8, [3]),
    ("-1", 8, [7]),
    ("-8", 8, [0]),
    (":3", 8, [0, 1, 2]),
    ("5:", 8, [5, 6, 7]),
    ("-3:", 8, [5, 6, 7]),
    (":-6", 8, [0, 1]),
    ("::2", 8, [0, 2, 4, 6]),
    ("1::3", 8, [1, 4, 7]),
    ("7:3:-1", 8, [7, 6, 5, 4]),
    ("::-1", 4, [3, 2, 1, 0]),
    ("0, 2 ,4", 8, [0, 2, 4]),
    ("0:2,0:2,0:2", 4, [0, 1, 0, 1, 0, 1]),
    ("0:20,10:30,20:40,30:50,40:60,50:70,60:80", 80,  # Llama-3-120B: seven 20-layer slices of 70B
     sum((R(a, a + 20) for a in range(0, 61, 10)), [])),
    ("0:24,8:32", 32, R(0, 24) + R(8, 32)),  # SOLAR depth up-scaling (48 layers)
]


@pytest.mark.parametrize("spec, n, slots", TABLE)
def test_spec_table(spec, n, slots):
    assert list(parse_layer_spec(spec, n)) == slots
    assert list(parse_layer_spec(to_layer_spec(slots), n)) == slots


def test_llama3_120b_has_140_layers():
    assert len(parse_layer_spec(TABLE[-2][0], 80)) == 140


REFUSED = [
    ("0:40", 32, "out of range"),
    ("33", 32, "out of range"),
    ("32", 32, "does not exist"),
    ("-33", 32, "out of range"),
    ("8:4", 32, "empty or reversed"),
    ("4:4", 32, "empty or reversed"),
    ("0:8:0", 32, "step 0"),
    ("0:8,", 32, "empty item"),
    ("", 32, "the layer spec is empty"),
    ("a:3", 32, "not an integer"),
    ("1.5", 32, "not an integer"),
    ("0:1:2:3", 32, "too many"),
    ("3:7:-1", 32, "empty or reversed"),
]


@pytest.mark.parametrize("spec, n, message", REFUSED)
def test_bad_specs_are_refused_naming_the_item(spec, n, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_spec(spec, n)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789:-, al", max_size=24), st.integers(1, 40))
def test_fuzzing_never_crashes_with_anything_but_a_clear_value_error(spec, n):
    try:
        slots = parse_layer_spec(spec, n)
    except ValueError as e:
        assert "layer spec" in str(e)
        return
    assert slots and all(0 <= s < n for s in slots)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 29), min_size=1, max_size=60))
def test_any_slot_list_round_trips_through_a_spec(slots):
    assert list(parse_layer_spec(to_layer_spec(slots), 30)) == slots


def test_layer_map_is_compressed_into_ranges():
    assert format_layer_map(parse_layer_spec("0:8,4:12", 32)) == "0-7, 4-11"
    assert format_layer_map(parse_layer_spec("0:10,10:20:2,20:", 32)) == "0-9, 10-18 step 2, 20-31"
    assert expand.parse_layer_spec is parse_layer_spec


# ---- fuzzing: the parsers only ever raise ValueError, with a message ------------------------------------

SPEC_ALPHABET = st.sampled_from(list("0123456789:,-all []x\t") + ["all", "10", "-1", "::", "1e3"])


@settings(max_examples=400, deadline=None)
@given(st.lists(SPEC_ALPHABET, max_size=12).map("".join), st.integers(min_value=-2, max_value=40))
def test_layer_spec_parser_raises_only_value_errors(spec, num_layers):
    try:
        slots = parse_layer_spec(spec, num_layers)
    except ValueError as e:
        assert str(e)
    else:
        assert slots and all(0 <= s < num_layers for s in slots)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True), st.text(max_size=6))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["model", "layer_range", "sources", "parameters", "scale", "filter", "value",
                                     "merge_method", "slices", "dtype", "paramters", "x"]), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({"merge_method": st.sampled_from(["passthrough", "linear", None])}, optional={
    "slices": st.lists(st.fixed_dictionaries({"sources": st.lists(st.fixed_dictionaries(
        {"model": st.one_of(st.sampled_from(["m", "n"]), VALUES), "layer_range": st.one_of(st.lists(st.integers(-2, 40), max_size=3),
                                                                          VALUES)},
        optional={"parameters": VALUES}), max_size=2)}, optional={"parameters": VALUES}), max_size=3),
    "parameters": VALUES, "dtype": VALUES, "chat_template": VALUES, "tokenizer_source": VALUES}))
def test_recipe_parser_raises_only_value_errors(recipe):
    from expand.surgery.recipe import plan_from_recipe

    try:
        plan = plan_from_recipe(recipe, num_layers={"m": 30, "n": 12})
    except ValueError as e:
        assert str(e)
    else:
        assert plan.num_layers >= 1
