"""Applying a depth plan: in memory (`apply_depth`, a pure function of config and params) or from
checkpoint to checkpoint on disk (`depth_to_disk`, tensor by tensor, so peak memory is about one tensor
whatever the model size). Running a plan virtually needs no function here:
`forward(params, tokens, config, layer_ids=plan.layer_ids, slot_scales=plan.slot_scales())`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from expand.config import Config
from expand.io import open_source, resolve, source_dtype, validate_source, write_metadata
from expand.io.atomic import atomic_dir, refuse_overlap
from expand.io.safetensors import TensorEntry, parse_size, write_sharded
from expand.container import Model
from expand.numerics import scale_rounded
from expand.params import Params, tensor_specs
from expand.progress import progress_bar
from expand.provenance import Provenance
from expand.surgery.plan import LayerPlan

OUTER_SOURCE = {"embed_tokens.weight": "embed_model", "norm.weight": "head_model", "lm_head.weight": "head_model"}


def depth_config(config: Config, plan: LayerPlan) -> Config:
    if plan.num_source_layers != config.num_hidden_layers and plan.is_single_model:
        raise ValueError(
            f"the plan was made for {plan.num_source_layers} layers but the model has {config.num_hidden_layers}"
        )
    return config.replace(num_hidden_layers=plan.num_layers)


def _check_models(config: Config, plan: LayerPlan, others: Mapping[str, tuple[Config, object]]) -> None:
    for name in plan.models:
        if name not in others:
            raise ValueError(f"the plan reads model {name!r}: pass it (models={{{name!r}: ...}})")
        other = others[name][0]
        if other.replace(num_hidden_layers=1) != config.replace(num_hidden_layers=1):
            raise ValueError(f"recipe model {name!r} has another architecture than the base; passthrough "
                             "stacking needs every model to have the same shapes")
        top = max((s.layer for s in plan.slots if s.model == name), default=-1)
        if top >= other.num_hidden_layers:
            raise ValueError(f"the plan uses layer {top} of {name!r}, which has {other.num_hidden_layers} layers")


def _slot_source(plan: LayerPlan, model: str | None, base, others: Mapping[str, tuple[Config, object]]):
    return base if model is None or (not plan.models) else others[model][1]


def apply_depth(config: Config, params: Params, plan: LayerPlan,
                models: Mapping[str, tuple[Config, Params]] | None = None) -> tuple[Config, Params]:
    """Materialize a plan: every slot gets its own copy of its layer's weights (clones decoupled), with
    the plan's scales multiplied in. For multi-model recipes pass `models={name: (config, params)}`.
    Casts to the plan's `dtype` before scaling and to `out_dtype` after, as mergekit does."""
    models = models or {}
    _check_models(config, plan, models)
    new_config = depth_config(config, plan)
    cast_in = jnp.dtype(plan.dtype) if plan.dtype else None
    cast_out = jnp.dtype(plan.out_dtype) if plan.out_dtype else None

    def finish(array, factor):
        array = array.astype(cast_in) if cast_in else array
        array = scale_rounded(array, factor) if np.any(np.asarray(factor) != 1.0) else array
        return array.astype(cast_out) if cast_out else array

    scales = plan.slot_scales()
    outer = dict(plan.outer_scales)
    new: Params = {}
    for spec in tensor_specs(config):
        if spec.stacked:
            if plan.is_single_model:
                gathered = params[spec.name][plan.layer_ids]
            else:
                gathered = jnp.stack([_slot_source(plan, s.model, params, models)[spec.name][s.layer]
                                      for s in plan.slots])
            factor = scales.get(spec.name, np.ones(plan.num_layers, np.float32))
            new[spec.name] = finish(gathered, factor.reshape((-1,) + (1,) * len(spec.axes)))
        else:
            model = getattr(plan, OUTER_SOURCE[spec.name])
            new[spec.name] = finish(_slot_source(plan, model, params, models)[spec.name], outer.get(spec.name, 1.0))
    return new_config, new


def depth_model(model: Model, plan: LayerPlan, models: Mapping[str, Model] | None = None) -> Model:
    """apply_depth on a Model, carrying its provenance forward (slot -> base layer)."""
    others = {name: (m.config, m.params) for name, m in (models or {}).items()}
    config, params = apply_depth(model.config, model.params, plan, others)
    lineage = plan.lineage_after(model.lineage())
    return Model(config, params, model.source, lineage)


def recipe_models(plan: LayerPlan, first_model) -> dict[str, str]:
    """For a multi-model recipe, where each of its models is: the recipe's names as paths, except the
    first slice's model, which is `first_model` (the MODEL argument)."""
    if not plan.models:
        return {}
    return {name: (str(first_model) if name == plan.embed_model else name) for name in plan.models}


def depth_to_disk(model: str | Path, out: str | Path, plan: LayerPlan, *, models: Mapping[str, str | Path] | None = None,
                  dtype=None, max_shard_size: str | int = "2GB", overwrite: bool = False) -> Path:
    """Stream a plan from one checkpoint (HF safetensors or GGUF) into a new HF directory, one tensor at a
    time: each output tensor is read from its source, scaled, cast and written before the next is read.

    dtype: output dtype (default: the recipe's out_dtype or dtype, else the source's)."""
    path = resolve(model)
    inputs = [path, *(resolve(other) for other in (models or {}).values())]
    refuse_overlap(out, inputs)
    source, hf_config = open_source(path)
    config = Config.from_hf(hf_config)
    validate_source(config, source)
    others = {}
    for name, other_path in (models or {}).items():
        other_source, other_hf = open_source(resolve(other_path))
        other_config = Config.from_hf(other_hf)
        validate_source(other_config, other_source)
        others[name] = (other_config, other_source)
    _check_models(config, plan, others)
    new_config = depth_config(config, plan)
    cast_in = np.dtype(jnp.dtype(plan.dtype)) if plan.dtype else None
    out_dtype = np.dtype(jnp.dtype(dtype or plan.out_dtype or plan.dtype or source_dtype(source)))

    # (output HF name) -> (source, source HF name, scale)
    recipe: dict[str, tuple[object, str, float]] = {}
    outer = dict(plan.outer_scales)
    for spec in tensor_specs(config):
        if not spec.stacked:
            src = _slot_source(plan, getattr(plan, OUTER_SOURCE[spec.name]), source, others)
            recipe[spec.hf_name()] = (src, spec.hf_name(), outer.get(spec.name, 1.0))
    for index, slot in enumerate(plan.slots):
        src = _slot_source(plan, slot.model, source, others)
        for spec in tensor_specs(config):
            if spec.stacked:
                recipe[spec.hf_name(index)] = (src, spec.hf_name(slot.layer), slot.scale_of(spec.name))
    entries = [TensorEntry(name, tuple(src.shape(src_name)), out_dtype) for name, (src, src_name, _) in recipe.items()]

    def produce(entry: TensorEntry) -> np.ndarray:
        src, src_name, factor = recipe[entry.name]
        array = src.read(src_name)
        array = array.astype(cast_in) if cast_in is not None else array
        if factor != 1.0:
            array = np.asarray(scale_rounded(array, factor))
        return array.astype(out_dtype, copy=False)

    provenance = Provenance.read(path) if path.is_dir() else None
    provenance = plan.lineage_after(provenance or Provenance.identity(config, str(model)))
    with atomic_dir(out, overwrite, inputs=inputs) as tmp:
        with progress_bar(f"writing {Path(out).name}", total=len(entries)) as advance:
            write_sharded(tmp, entries, produce, parse_size(max_shard_size), on_tensor=lambda e: advance())
        write_metadata(tmp, new_config, out_dtype, model, provenance)
    return Path(out)
