"""The surgery verbs of the library: a depth plan, a widening, or both, applied in memory or from checkpoint
to checkpoint. Each builds a `TensorPlan` (expand.surgery.tensorplan) and runs it with one of the two
executors (expand.surgery.execute); running a depth plan virtually needs none of this:
`forward(params, tokens, config, layer_ids=plan.layer_ids, slot_scales=plan.slot_scales())`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from expand.config import Config
from expand.container import Model
from expand.io import open_checkpoint, resolve
from expand.params import Params
from expand.surgery.execute import execute, execute_to_disk
from expand.surgery.plan import LayerPlan
from expand.surgery.tensorplan import BASE, DONOR, copy_tensors, depth_tensors, width_tensors
from expand.surgery.width import width_plan


def apply_depth(config: Config, params: Params, plan: LayerPlan,
                models: Mapping[str, tuple[Config, Params]] | None = None) -> tuple[Config, Params]:
    """Materialize a plan: every slot gets its own copy of its layer's weights (clones decoupled), with
    the plan's scales multiplied in. For multi-model recipes pass `models={name: (config, params)}`.
    Casts to the plan's `dtype` before scaling and to `out_dtype` after, as mergekit does."""
    models = models or {}
    tensors = depth_tensors(config, plan, {name: c for name, (c, _) in models.items()})
    return tensors.config, execute(tensors, {BASE: params, **{name: p for name, (_, p) in models.items()}})


def depth_model(model: Model, plan: LayerPlan, models: Mapping[str, Model] | None = None) -> Model:
    """apply_depth on a Model, carrying its provenance forward (slot -> base layer)."""
    others = {name: (m.config, m.params) for name, m in (models or {}).items()}
    config, params = apply_depth(model.config, model.params, plan, others)
    return Model(config, params, model.source, plan.lineage_after(model.lineage()))


def _widening(config: Config, params: Params, donor: tuple[Config, Params] | None, sizes_and_options: dict):
    """(the TensorPlan of a widening, the widened params)."""
    donor_config = None if donor is None else donor[0]
    tensors = width_tensors(copy_tensors(config), width_plan(config, donor=donor_config, **sizes_and_options),
                            donor_config)
    return tensors, execute(tensors, {BASE: params, **({DONOR: donor[1]} if donor is not None else {})})


def widen(config: Config, params: Params, *, donor: tuple[Config, Params] | None = None,
          **sizes_and_options) -> tuple[Config, Params]:
    """Widen a model (expand.surgery.width has the math of each mode). Returns (config, params).

    sizes: hidden_size, num_attention_heads, num_key_value_heads, intermediate_size (unchanged if omitted).
    donor: (config, params) of a wider model of the same family; its values go where the mode puts new
        values, cropped to the target sizes (donor layer donor_layers[l] for base layer l).
    options: mode ('exact', 'frankenllama', 'zero-norm', 'duplicate'), fill ('random' or 'zeros', without a
        donor), donor_layers (None, 'proportional' or a list), triangular, noise (duplicate), seed."""
    tensors, params = _widening(config, params, donor, sizes_and_options)
    return tensors.config, params


def widen_model(model: Model, donor: Model | None = None, **sizes_and_options) -> Model:
    """`widen` on a `Model`, recording the plan (sizes, mode, axis maps) in its provenance."""
    tensors, params = _widening(model.config, model.params, None if donor is None else (donor.config, donor.params),
                                sizes_and_options)
    return Model(tensors.config, params, model.source, tensors.lineage(model.lineage()))


def grow_to_disk(model, out, *, plan: LayerPlan | None = None, models: Mapping[str, str | Path] | None = None,
                 donor=None, dtype=None, max_shard_size: str | int = "2GB", overwrite: bool = False,
                 extra=None, **width_request) -> Path:
    """A depth plan, then a widening of its result, streamed from checkpoint(s) to a new HF directory in one
    pass: each output tensor is read, scaled, grown and written before the next is read.

    plan: the depth plan (None: the model's layers as they are). models: where each model of a multi-model
        recipe is, by the recipe's names. donor: a wider model for the widening.
    width_request: the sizes and options of `widen` (none: no widening).
    dtype: output dtype (default: the recipe's out_dtype or dtype, else the source's).
    extra(directory): run on the complete output before it is published (`execute_to_disk`)."""
    if plan is None and not width_request:
        raise ValueError("nothing to do: give a depth plan, target sizes, or both")
    if plan is not None and plan.tokenizer_model is not None:
        resolve(plan.tokenizer_model)  # refuse a missing tokenizer model before writing anything
    lead = open_checkpoint(model)
    checkpoints = {BASE: lead, **{name: open_checkpoint(path) for name, path in (models or {}).items()}}
    configs = {name: c.config for name, c in checkpoints.items() if name != BASE}
    tensors = copy_tensors(lead.config) if plan is None else depth_tensors(lead.config, plan, configs)
    if width_request:
        donor_checkpoint = None if donor is None else open_checkpoint(donor)
        donor_config = None if donor_checkpoint is None else donor_checkpoint.config
        widening = width_plan(tensors.config, donor=donor_config, **width_request)
        tensors = width_tensors(tensors, widening, donor_config)
        if donor_checkpoint is not None:
            checkpoints[DONOR] = donor_checkpoint
    elif donor is not None:
        raise ValueError("a donor fills a widening's new blocks: give target sizes too")
    return execute_to_disk(tensors, checkpoints, out, dtype=dtype, max_shard_size=max_shard_size,
                           overwrite=overwrite, extra=extra)


def depth_to_disk(model, out, plan: LayerPlan, *, models: Mapping[str, str | Path] | None = None, dtype=None,
                  max_shard_size: str | int = "2GB", overwrite: bool = False) -> Path:
    """Stream a depth plan from one checkpoint (HF safetensors or GGUF; for a multi-model recipe, `models`
    maps its names to paths) into a new HF directory, one tensor at a time."""
    return grow_to_disk(model, out, plan=plan, models=models, dtype=dtype, max_shard_size=max_shard_size,
                        overwrite=overwrite)


def widen_to_disk(model, out, *, donor=None, dtype=None, max_shard_size: str | int = "2GB",
                  overwrite: bool = False, **sizes_and_options) -> Path:
    """`widen` from checkpoint to checkpoint, one output tensor (one layer) at a time."""
    return grow_to_disk(model, out, donor=donor, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                        **sizes_and_options)
