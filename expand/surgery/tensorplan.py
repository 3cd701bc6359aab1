"""Surgery as data: for every tensor of the new model, where it comes from and how it is computed.

A `TensorPlan` lists the output tensors one layer at a time (param name in expand's layout, output layer),
each with a `Rule`:

    x = read(source)                      one stored tensor: input model, param name, stored layer
    x = x.astype(cast_in)                 a recipe's `dtype` (mergekit casts before scaling)
    x = scale_rounded(x, scale)           a depth plan's per-slot scale (identity blocks, recipe `scale`)
    x = x.astype(cast_out)                a recipe's `out_dtype`
    x = grow(x, read(donor), layer)       width growth (expand.surgery.width), when the plan widens

Depth plans (`depth_tensors`) and widenings (`width_tensors`, on top of a depth plan or of the model as it
is) produce such plans; `expand.surgery.execute` runs any plan in memory or streamed from checkpoint to
checkpoint, through the same `compute`, so the two agree by construction. Shapes follow from the output
config and the param table; nothing here touches an array.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from expand.config import Config
from expand.params import TensorSpec, spec_by_name, tensor_specs
from expand.provenance import Provenance
from expand.surgery.plan import LayerPlan
from expand.surgery.width import WidthPlan

BASE = "base"  # the input model a single-model plan reads
DONOR = "donor"  # the wider model whose values fill a widening's new blocks


@dataclasses.dataclass(frozen=True)
class Read:
    """One stored tensor: param `name` of input model `model`, stored layer `layer` (None: not stacked)."""

    model: str
    name: str
    layer: int | None


@dataclasses.dataclass(frozen=True)
class Grow:
    """A widening step: the output layer whose random key the fill uses, and the donor tensor (or None)."""

    layer: int | None
    donor: Read | None


@dataclasses.dataclass(frozen=True)
class Rule:
    source: Read
    scale: float = 1.0
    cast_in: str | None = None
    cast_out: str | None = None
    grow: Grow | None = None


@dataclasses.dataclass(frozen=True)
class OutputTensor:
    name: str
    layer: int | None
    rule: Rule

    @property
    def spec(self) -> TensorSpec:
        return spec_by_name(self.name)

    @property
    def hf_name(self) -> str:
        return self.spec.hf_name(self.layer)


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """config: the new model. inputs: the config of every input model a rule reads, by key. depth / width:
    the plans it was made from (for provenance and the model card)."""

    config: Config
    inputs: Mapping[str, Config]
    outputs: tuple[OutputTensor, ...]
    depth: LayerPlan | None = None
    width: WidthPlan | None = None

    def lineage(self, provenance: Provenance) -> Provenance:
        """The new model's provenance, given the leading input's."""
        if self.depth is not None:
            provenance = self.depth.lineage_after(provenance)
        if self.width is not None:
            provenance = provenance.with_operation(self.width.to_json())
        return provenance


# ---- depth ----------------------------------------------------------------------------------------------

# Which model a multi-model recipe takes the non-layer tensors from (mergekit: embeddings from the first
# slice's model, final norm and lm_head from the last slice's).
OUTER_SOURCE = {"embed_tokens.weight": "embed_model", "norm.weight": "head_model", "lm_head.weight": "head_model"}


def check_depth_inputs(config: Config, plan: LayerPlan, inputs: Mapping[str, Config]) -> None:
    """The plan fits the model (single-model plans) or every recipe model it reads (multi-model plans)."""
    if plan.is_single_model:
        if plan.num_source_layers != config.num_hidden_layers:
            raise ValueError(f"the plan was made for {plan.num_source_layers} layers but the model has "
                             f"{config.num_hidden_layers}")
        return
    for name in plan.models:
        if name not in inputs:
            raise ValueError(f"the plan reads model {name!r}: pass it (models={{{name!r}: ...}})")
        other = inputs[name]
        if other.replace(num_hidden_layers=1) != config.replace(num_hidden_layers=1):
            raise ValueError(f"recipe model {name!r} has another architecture than the base; passthrough "
                             "stacking needs every model to have the same shapes")
        top = max((s.layer for s in plan.slots if s.model == name), default=-1)
        if top >= other.num_hidden_layers:
            raise ValueError(f"the plan uses layer {top} of {name!r}, which has {other.num_hidden_layers} layers")


def depth_tensors(config: Config, plan: LayerPlan, inputs: Mapping[str, Config] | None = None) -> TensorPlan:
    """The tensors of `config`'s model rebuilt by a depth plan: slot s of every layer tensor reads its slot's
    stored layer (of its recipe model), scaled by the slot's scale; the other tensors come from the base (or
    the recipe's embedding / head model). inputs: configs of a multi-model recipe's models, by name."""
    inputs = {BASE: config, **(inputs or {})}
    check_depth_inputs(config, plan, inputs)

    def model_key(name: str | None) -> str:
        return BASE if name is None or plan.is_single_model else name

    cast_in, cast_out = plan.dtype, plan.out_dtype
    outer = dict(plan.outer_scales)
    outputs = []
    for spec in tensor_specs(config):
        if spec.stacked:
            for index, slot in enumerate(plan.slots):
                rule = Rule(Read(model_key(slot.model), spec.name, slot.layer), slot.scale_of(spec.name),
                            cast_in, cast_out)
                outputs.append(OutputTensor(spec.name, index, rule))
        else:
            source = Read(model_key(getattr(plan, OUTER_SOURCE[spec.name])), spec.name, None)
            outputs.append(OutputTensor(spec.name, None, Rule(source, outer.get(spec.name, 1.0), cast_in, cast_out)))
    used = {out.rule.source.model for out in outputs}
    return TensorPlan(config.replace(num_hidden_layers=plan.num_layers), {k: inputs[k] for k in used},
                      tuple(outputs), depth=plan)


def copy_tensors(config: Config) -> TensorPlan:
    """The model as it is: every tensor read unchanged (what a widening without a depth plan starts from)."""
    outputs = tuple(OutputTensor(spec.name, layer, Rule(Read(BASE, spec.name, layer)))
                    for spec in tensor_specs(config)
                    for layer in (range(config.num_hidden_layers) if spec.stacked else [None]))
    return TensorPlan(config, {BASE: config}, outputs)


# ---- width ----------------------------------------------------------------------------------------------


def width_tensors(prior: TensorPlan, width: WidthPlan, donor: Config | None = None) -> TensorPlan:
    """`prior` (a depth plan's tensors, or `copy_tensors`) widened by `width`, which was planned on
    prior.config: every output tensor is grown, output layer l taking donor layer width.donor_layers[l]."""
    if width.base != prior.config:
        raise ValueError("the width plan was made for another model than the one it widens")
    if (donor is None) != (width.donor_layers is None):
        raise ValueError("a width plan with donor layers needs the donor's config, and only then")
    outputs = []
    for out in prior.outputs:
        donor_read = None
        if donor is not None:
            donor_read = Read(DONOR, out.name, None if out.layer is None else width.donor_layers[out.layer])
        outputs.append(dataclasses.replace(out, rule=dataclasses.replace(out.rule, grow=Grow(out.layer, donor_read))))
    inputs = dict(prior.inputs) | ({DONOR: donor} if donor is not None else {})
    return TensorPlan(width.config, inputs, tuple(outputs), depth=prior.depth, width=width)
