"""mergekit passthrough recipes -> LayerPlan, with mergekit's own semantics.

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
  of the slice, t = 1 for a one-layer slice); or a list of `{filter, value}` conditions where the first
  whose filter is absent, '*' or a substring of the tensor name gives the value.
- The tensor is cast to `dtype` and multiplied by the scale (in float32, rounded back), then cast to
  `out_dtype` if given.
Where mergekit would write a broken model or crash, this refuses with a message instead: a layer_range
outside the model or empty, a slice with several sources, a bare `{filter, value}` mapping (mergekit
raises "Unexpected setting value"), a merge method other than passthrough.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from expand.params import TABLE
from expand.surgery.plan import LayerPlan, Slot

Setting = Any
IGNORED_KEYS = {"base_model", "tokenizer_source", "tokenizer", "chat_template", "name"}


def evaluate_setting(tensor_name: str, setting: Setting, t: float, where: str) -> float | None:
    """mergekit's `evaluate_setting`: a scalar, a gradient list, or a list of {filter, value}."""
    if isinstance(setting, (int, float, bool, str)):
        return setting
    if isinstance(setting, list):
        if all(isinstance(e, (int, float)) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if all(isinstance(e, (int, float, bool, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        if all(isinstance(e, dict) for e in setting):
            for cond in setting:
                filt = cond.get("filter")
                if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
                    return evaluate_setting(tensor_name, cond.get("value"), t, where)
            return None
    if isinstance(setting, dict):
        raise ValueError(
            f"{where}: a single {{filter, value}} mapping is not a valid mergekit setting (mergekit fails with "
            "'Unexpected setting value'); write it as a list: [{filter: ..., value: ...}]"
        )
    raise ValueError(f"{where}: unexpected setting {setting!r} (a number, a list of numbers, or a list of "
                     "{filter, value})")


def _lookup(name: str, t: float, source: dict, slice_: dict, recipe: dict, where: str) -> float | None:
    """First non-None `scale` from the source's, the slice's, then the recipe's parameters."""
    for level, holder in (("source", source), ("slice", slice_), ("recipe", recipe)):
        params = holder.get("parameters") or {}
        if "scale" in params:
            value = evaluate_setting(name, params["scale"], t, f"{where} {level} parameters.scale")
            if value is not None:
                return float(value)
    return None


def read_recipe(recipe: str | Path | Mapping) -> dict:
    if isinstance(recipe, Mapping):
        return dict(recipe)
    path = Path(recipe)
    if not path.exists():
        raise FileNotFoundError(f"no recipe at {recipe}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{recipe} is not a mergekit recipe (expected a YAML mapping with 'slices')")
    return data


def _validate(recipe: dict) -> list[dict]:
    method = recipe.get("merge_method")
    if method != "passthrough":
        raise ValueError(
            f"merge_method {method!r}: expand implements mergekit's passthrough (layer stacking); "
            "merges that average weights (linear, slerp, ties, ...) are mergekit's job"
        )
    for key in ("models", "modules"):
        if key in recipe:
            raise ValueError(f"recipe key {key!r} is not supported: describe the layers with 'slices'")
    unknown = set(recipe) - {"slices", "merge_method", "dtype", "out_dtype", "parameters"} - IGNORED_KEYS
    if unknown:
        raise ValueError(f"unknown recipe keys {sorted(unknown)} (a typo of 'slices' or 'parameters'?)")
    slices = recipe.get("slices")
    if not slices:
        raise ValueError("the recipe has no 'slices'")
    for i, s in enumerate(slices):
        sources = s.get("sources") if isinstance(s, dict) else None
        if not sources or len(sources) != 1:
            raise ValueError(
                f"slice {i}: passthrough takes exactly one source per slice, got "
                f"{len(sources) if sources else 0} (mergekit fails with 'Passthrough merge expects exactly one tensor')"
            )
        src = sources[0]
        if "model" not in src or "layer_range" not in src:
            raise ValueError(f"slice {i}: a source needs 'model' and 'layer_range'")
    return slices


def recipe_model_names(recipe: str | Path | Mapping) -> list[str]:
    """The models a recipe's slices read, in order of first use."""
    slices = _validate(read_recipe(recipe))
    return list(dict.fromkeys(s["sources"][0]["model"] for s in slices))


def plan_from_recipe(recipe: str | Path | Mapping, num_layers: int | Mapping[str, int] | None = None) -> LayerPlan:
    """A mergekit passthrough recipe (a YAML path or a dict) -> LayerPlan.

    num_layers: the layer count of the recipe's model(s) (an int for single-model recipes, or a mapping
        model name -> count). If omitted, each model's config is read from disk (local paths, 'smollm2').
    Filters are matched against every layer tensor, biases included (mergekit's Llama definition lists
    no biases and drops them from its output; here they are kept and scaled like their weights)."""
    data = read_recipe(recipe)
    slices = _validate(data)
    models = list(dict.fromkeys(s["sources"][0]["model"] for s in slices))
    counts = _layer_counts(models, num_layers)
    single = len(models) == 1
    plan_slots: list[Slot] = []
    for i, slice_ in enumerate(slices):
        source = slice_["sources"][0]
        model = source["model"]
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
    return LayerPlan(
        tuple(plan_slots), counts[models[0]] if single else max(counts.values()), tuple(outer),
        embed_model=None if single else first["sources"][0]["model"],
        head_model=None if single else last["sources"][0]["model"],
        dtype=data.get("dtype"), out_dtype=data.get("out_dtype"), description=str(description),
        models=() if single else tuple(models),
    )


def _layer_range(value, count: int, index: int) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
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
            raise ValueError(f"the recipe names {len(models)} models; pass num_layers as a mapping name -> count")
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
                f"recipe model {model!r} is not a local model, so its layer count is unknown: pass the model "
                "(CLI: expand depth MODEL ... maps a single-model recipe onto MODEL) or num_layers="
            ) from e
    return counts


def layer_tensor_names(layer: int) -> list[tuple[str, str]]:
    """[(our param name, HF name in layer `layer`)] for every layer tensor of the table, biases included
    (a model without biases simply has no such tensors to scale)."""
    return [(spec.name, spec.hf_name(layer)) for spec in TABLE if spec.stacked]
