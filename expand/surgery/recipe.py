"""mergekit passthrough recipes -> LayerPlan, with mergekit 0.1.5's own semantics.

    slices:
      - sources: [{model: M, layer_range: [0, 20]}]
      - sources: [{model: M, layer_range: [10, 30], parameters: {scale: [{filter: o_proj, value: 0}, {value: 1}]}}]
    merge_method: passthrough
    dtype: float16

What mergekit does, and so what this does:
- `layer_range` is end-exclusive; slices stack in order; the embeddings come from the first slice's model,
  the final norm and lm_head from the last slice's.
- The only passthrough parameter is `scale`, looked up for each tensor by its *source* HF name
  (`model.layers.12.self_attn.o_proj.weight`): first the slice source's `parameters`, then the slice's,
  then the recipe's top-level `parameters`; the first that yields a value wins.
- A setting is a number; a list of numbers (a gradient interpolated at t = i / (n - 1) over the n layers
  of the slice, t = 1 for a one-layer slice); a `{filter, value}` mapping or a list of them, where the first
  whose filter is absent, '*' or a substring of the tensor name gives the value; an empty list gives none.
- The tensor is cast to `dtype` and multiplied by the scale (in float32, rounded back), then cast to
  `out_dtype` if given.
- The tokenizer is MODEL's (the recipe model that leads), or `base_model`'s with `tokenizer_source: base`;
  `chat_template` (a Jinja template, or `auto`: the source's) replaces its chat template.
Refused, each with a message that names the key and the fix: keys mergekit does not know (with the nearest
valid one), settings passthrough would silently ignore (parameters other than `scale`, a slice's
`base_model` or `residual_weight`), what mergekit itself refuses (several sources in a slice, a merge method
other than passthrough, an unknown dtype), and what would write a broken model (a layer_range outside the
model or empty, an integer dtype), and what expand does not implement (`models`, `modules`, `tokenizer`,
`tokenizer_source` other than `base`, mergekit's named chat templates).
"""

from __future__ import annotations

import math

import difflib
from pathlib import Path
from typing import Any, Mapping

import yaml

from expand.params import TABLE
from expand.surgery.plan import LayerPlan, Slot

Setting = Any

KEYS = {
    "recipe": ("merge_method", "slices", "parameters", "dtype", "out_dtype", "base_model", "tokenizer_source",
               "chat_template", "models", "modules", "tokenizer"),
    "slice": ("sources", "parameters", "base_model", "residual_weight"),
    "source": ("model", "layer_range", "parameters"),
    "parameters": ("scale",),
    "condition": ("filter", "value"),
}
NOT_IMPLEMENTED = {
    "models": "'models' merges whole models by averaging (linear, ties, ...), which is mergekit's job; "
              "describe the layers with 'slices'",
    "modules": "per-module slices are not implemented; describe the layers with 'slices'",
    "tokenizer": "tokenizer building is not implemented; expand keeps MODEL's tokenizer (or base_model's with "
                 "tokenizer_source: base)",
}
IGNORED_BY_PASSTHROUGH = ("base_model", "residual_weight")  # at the slice level
DTYPES = ("float32", "float16", "bfloat16", "float64")


def check_keys(mapping: Mapping, level: str, where: str) -> None:
    """Refuse a key the recipe schema does not have at this level, suggesting the nearest valid one."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: expected a mapping of {', '.join(KEYS[level])}, got {mapping!r}")
    for key in mapping:
        if key not in KEYS[level]:
            near = difflib.get_close_matches(str(key), KEYS[level], n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"{where}: unknown key {key!r}; {hint}(valid here: {', '.join(KEYS[level])})")


def check_parameters(holder: Mapping, where: str) -> None:
    params = holder.get("parameters")
    if params is None:
        return
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}: parameters must be a mapping like {{scale: 0.5}}, got {params!r}")
    for key in params:
        if key != "scale":
            near = difflib.get_close_matches(str(key), ["scale"], n=1)
            hint = "did you mean 'scale'? " if near else ""
            raise ValueError(f"{where}: parameter {key!r} has no effect in passthrough, which reads only 'scale'; "
                             f"{hint}remove it or use another merge tool")


def _number(value, where: str) -> float:
    """A scale: a number, or a string that is one (YAML reads 1e-3 as a string; mergekit converts it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: a scale must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: a scale must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: a scale must be finite, got {value!r} (it would write NaN or inf weights)")
    return number


def evaluate_setting(tensor_name: str, setting: Setting, t: float, where: str) -> float | None:
    """mergekit's `evaluate_setting` for the scale: a number, a gradient list, a {filter, value} mapping or
    a list of them (the first matching filter wins; none matching, or an empty list, gives None)."""
    if isinstance(setting, Mapping):  # mergekit 0.1.5 takes a bare condition as a one-element list
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, Mapping) for e in setting):
            for number, cond in enumerate(setting):
                check_keys(cond, "condition", f"{where}[{number}]")
                if "value" not in cond:
                    raise ValueError(f"{where}[{number}]: a condition needs a 'value'")
            for cond in setting:
                filt = cond.get("filter")
                if filt is None or filt == "*" or (tensor_name and str(filt) in tensor_name):
                    return evaluate_setting(tensor_name, cond["value"], t, where)
            return None
        values = [_number(e, where) for e in setting]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    return _number(setting, where)


def _lookup(name: str, t: float, source: dict, slice_: dict, recipe: dict, where: str) -> float | None:
    """First non-None `scale` from the source's, the slice's, then the recipe's parameters."""
    for level, holder in (("source", source), ("slice", slice_), ("recipe", recipe)):
        params = holder.get("parameters") or {}
        if "scale" in params:
            value = evaluate_setting(name, params["scale"], t, f"{where} {level} parameters.scale")
            if value is not None:
                return value
    return None


def read_recipe(recipe: str | Path | Mapping) -> dict:
    if isinstance(recipe, Mapping):
        return dict(recipe)
    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe at {recipe}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{recipe} is not valid YAML{at}: {getattr(e, 'problem', e)}; fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{recipe} is not a mergekit recipe (expected a YAML mapping with 'slices')")
    return data


def _check_dtype(recipe: dict, key: str) -> str | None:
    name = recipe.get(key)
    if name is None:
        return None
    bare = str(name).removeprefix("torch.")
    if bare not in DTYPES:
        near = difflib.get_close_matches(bare, DTYPES, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ValueError(f"recipe {key}: {name!r} is not a float dtype mergekit writes; {hint}"
                         f"(choose {', '.join(DTYPES)})")
    return bare


def _validate(recipe: dict) -> list[dict]:
    check_keys(recipe, "recipe", "recipe")
    method = recipe.get("merge_method")
    if method != "passthrough":
        raise ValueError(
            f"merge_method {method!r}: expand implements mergekit's passthrough (layer stacking); "
            "merges that average weights (linear, slerp, ties, ...) are mergekit's job"
        )
    for key, why in NOT_IMPLEMENTED.items():
        if key in recipe:
            raise ValueError(f"recipe key {key!r}: {why}")
    source = recipe.get("tokenizer_source")
    if source not in (None, "base"):
        raise ValueError(f"tokenizer_source {source!r}: expand keeps MODEL's tokenizer, or base_model's with "
                         "tokenizer_source: base ('union' and other models would rebuild the vocabulary and the "
                         "embeddings); remove the key or write base")
    if source == "base" and recipe.get("base_model") is None:
        raise ValueError("tokenizer_source: base needs a base_model whose tokenizer to take")
    check_chat_template(recipe.get("chat_template"))
    check_parameters(recipe, "recipe")
    slices = recipe.get("slices")
    if not slices:
        raise ValueError("the recipe has no 'slices'")
    if not isinstance(slices, list):
        raise ValueError(f"'slices' must be a list of {{sources: [...]}}, got {slices!r}")
    for i, s in enumerate(slices):
        check_keys(s, "slice", f"slice {i}")
        for key in IGNORED_BY_PASSTHROUGH:
            if key in s:
                raise ValueError(f"slice {i}: {key!r} has no effect in passthrough; remove it")
        check_parameters(s, f"slice {i}")
        sources = s.get("sources")
        if not isinstance(sources, list) or len(sources) != 1:
            raise ValueError(
                f"slice {i}: passthrough takes exactly one source per slice, got "
                f"{len(sources) if isinstance(sources, list) else 0} (mergekit fails with 'Passthrough merge "
                "expects exactly one tensor')"
            )
        check_keys(sources[0], "source", f"slice {i} source")
        check_parameters(sources[0], f"slice {i} source")
        if "model" not in sources[0] or "layer_range" not in sources[0]:
            raise ValueError(f"slice {i}: a source needs 'model' and 'layer_range'")
    return slices


def check_chat_template(template) -> None:
    """A Jinja template (mergekit: at least 20 characters with a '{') or 'auto'; mergekit's named templates
    (chatml, llama3, ...) are files of mergekit's, not reproduced here."""
    if template is None or template == "auto":
        return
    if not isinstance(template, str) or len(template) < 20 or "{" not in template:
        raise ValueError(f"chat_template {template!r}: give the Jinja template itself (or 'auto' to keep the "
                         "source's); mergekit's named templates (chatml, llama3, ...) are not shipped with expand")


def recipe_model_names(recipe: str | Path | Mapping) -> list[str]:
    """The models a recipe's slices read, in order of first use."""
    slices = _validate(read_recipe(recipe))
    return list(dict.fromkeys(str(s["sources"][0]["model"]) for s in slices))


def plan_from_recipe(recipe: str | Path | Mapping, num_layers: int | Mapping[str, int] | None = None) -> LayerPlan:
    """A mergekit passthrough recipe (a YAML path or a dict) -> LayerPlan.

    num_layers: the layer count of the recipe's model(s) (an int for single-model recipes, or a mapping
        model name -> count). If omitted, each model's config is read from disk (local paths, 'smollm2').
    Filters are matched against every layer tensor, biases included (mergekit's Llama definition lists
    no biases and drops them from its output; here they are kept and scaled like their weights)."""
    data = read_recipe(recipe)
    slices = _validate(data)
    dtype, out_dtype = _check_dtype(data, "dtype"), _check_dtype(data, "out_dtype")
    models = list(dict.fromkeys(str(s["sources"][0]["model"]) for s in slices))
    counts = _layer_counts(models, num_layers)
    single = len(models) == 1
    plan_slots: list[Slot] = []
    for i, slice_ in enumerate(slices):
        source = slice_["sources"][0]
        model = str(source["model"])
        start, stop = _layer_range(source["layer_range"], counts[model], i)
        n = stop - start
        for offset, layer in enumerate(range(start, stop)):
            t = offset / (n - 1) if n > 1 else 1.0
            scales = []
            for ours, hf_name in layer_tensor_names(layer):
                factor = _lookup(hf_name, t, source, slice_, data, f"slice {i}")
                if factor is not None and factor != 1.0:
                    scales.append((ours, factor))
            plan_slots.append(Slot(layer, None if single else model, tuple(scales)))
    outer = []
    first, last = slices[0], slices[-1]
    for ours, hf_name, holder in (("embed_tokens.weight", "model.embed_tokens.weight", first),
                                  ("norm.weight", "model.norm.weight", last),
                                  ("lm_head.weight", "lm_head.weight", last)):
        factor = _lookup(hf_name, 0.0, holder["sources"][0], holder, data, "outer tensor")
        if factor is not None and factor != 1.0:
            outer.append((ours, factor))
    description = recipe if isinstance(recipe, (str, Path)) else "recipe"
    tokenizer = str(data["base_model"]) if data.get("tokenizer_source") == "base" else None
    return LayerPlan(
        tuple(plan_slots), counts[models[0]] if single else max(counts.values()), tuple(outer),
        embed_model=None if single else str(first["sources"][0]["model"]),
        head_model=None if single else str(last["sources"][0]["model"]),
        dtype=dtype, out_dtype=out_dtype, description=str(description),
        models=() if single else tuple(models), tokenizer_model=tokenizer,
        chat_template=data.get("chat_template"),
    )


def _layer_range(value, count: int, index: int) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"slice {index}: layer_range must be [start, end], got {value!r}")
    start, stop = value
    if not 0 <= start < stop <= count:
        raise ValueError(
            f"slice {index}: layer_range {list(value)} is not a nonempty range of the model's {count} layers "
            f"(end-exclusive: use [a, b] with 0 <= a < b <= {count})"
        )
    return start, stop


def _layer_counts(models: list[str], num_layers) -> dict[str, int]:
    if isinstance(num_layers, int):
        if len(models) > 1:
            raise ValueError(f"the recipe names {len(models)} models ({', '.join(models)}); pass num_layers as a "
                             "mapping name -> count, or leave it out to read each model's config")
        return {models[0]: num_layers}
    if isinstance(num_layers, Mapping):
        missing = [m for m in models if m not in num_layers]
        if missing:
            raise ValueError(f"no layer count given for recipe models {missing}")
        return dict(num_layers)
    from expand.io import read_config

    counts = {}
    for model in models:
        try:
            counts[model] = read_config(model).num_hidden_layers
        except FileNotFoundError as e:
            raise ValueError(
                f"recipe model {model!r} is not a local model, so its layer count is unknown: fix its path in "
                "the recipe (for a single-model recipe, expand depth MODEL ... applies it to MODEL), or pass "
                "num_layers="
            ) from e
    return counts


def layer_tensor_names(layer: int) -> list[tuple[str, str]]:
    """[(our param name, HF name in layer `layer`)] for every layer tensor of the table, biases included
    (a model without biases simply has no such tensors to scale)."""
    return [(spec.name, spec.hf_name(layer)) for spec in TABLE if spec.stacked]
