"""A depth plan: which stored layer each slot of the new model runs, and per-slot tensor scales.

Scales are how every per-slot edit is expressed: an identity copy (LLaMA-Pro) scales o_proj and down_proj
(weights and biases) by 0, so the block adds nothing to the residual stream; a mergekit `scale` parameter
scales whichever tensors its filter names; a residual gate is a trainable scale of a block's branches.
The same plan runs virtually (`forward(..., layer_ids=plan.layer_ids, slot_scales=plan.slot_scales())`,
weights shared) or materialized (`apply_depth`), and both give the same logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import jax.numpy as jnp
import numpy as np

from expand.params import BRANCH_OUTPUTS
from expand.surgery.layerspec import format_layer_map, parse_layer_spec, to_layer_spec

Scales = tuple[tuple[str, float], ...]  # (param name, factor), only factors that are not 1


@dataclass(frozen=True)
class Slot:
    """One layer of the new model: stored layer `layer` of model `model` (None = the base model)."""

    layer: int
    model: str | None = None
    scales: Scales = ()

    def scale_of(self, name: str) -> float:
        return dict(self.scales).get(name, 1.0)


@dataclass(frozen=True)
class LayerPlan:
    """slots: the new model's layers in order. num_source_layers: layers of the model the plan reads.
    outer_scales: factors for embed_tokens / norm / lm_head (from mergekit parameters). embed_model and
    head_model: which model the embeddings and the final norm + lm_head come from (mergekit takes the
    first slice's and the last slice's). dtype/out_dtype: a recipe's load and output dtypes.
    description: the spec or recipe the plan was made from. tokenizer_model: where the output's tokenizer
    comes from when not from the model the plan reads (a recipe's base_model with tokenizer_source: base).
    chat_template: a recipe's chat template for the output (a Jinja template, or 'auto': the source's)."""

    slots: tuple[Slot, ...]
    num_source_layers: int
    outer_scales: Scales = ()
    embed_model: str | None = None
    head_model: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    description: str = ""
    models: tuple[str, ...] = field(default=())
    tokenizer_model: str | None = None
    chat_template: str | None = None

    def __post_init__(self):
        if not self.slots:
            raise ValueError("a plan needs at least one slot")
        bad = [s.layer for s in self.slots if not 0 <= s.layer < self.num_source_layers]
        if bad:
            raise ValueError(f"plan names layers {bad} but the source has {self.num_source_layers} layers")

    def output_dtype(self, stored: np.dtype) -> np.dtype:
        """The dtype a written plan has: the recipe's out_dtype or dtype, else `stored` (the source's)."""
        chosen = self.out_dtype or self.dtype
        return np.dtype(jnp.dtype(chosen)) if chosen else np.dtype(stored)

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    @property
    def layer_ids(self) -> np.ndarray:
        return np.asarray([s.layer for s in self.slots], np.int32)

    def slot_scales(self) -> dict[str, np.ndarray]:
        """{param name: (num_layers,) float32} for every layer tensor that some slot scales."""
        names = sorted({name for s in self.slots for name, _ in s.scales})
        return {n: np.asarray([s.scale_of(n) for s in self.slots], np.float32) for n in names}

    @property
    def is_single_model(self) -> bool:
        return all(s.model is None for s in self.slots) and not self.models

    @property
    def identity_slots(self) -> list[int]:
        """Slots whose residual branches are scaled to zero (they add nothing to the residual stream)."""
        return [i for i, s in enumerate(self.slots) if all(s.scale_of(n) == 0.0 for n in BRANCH_OUTPUTS)]

    def lineage_after(self, provenance):
        """The provenance of a model built by this plan from a model with `provenance`."""
        return provenance.after_depth(self.layer_ids, {"op": "depth", **self.to_json()}, self.identity_slots)

    def layer_map(self) -> str:
        return format_layer_map(self.layer_ids.tolist())

    def to_json(self) -> dict:
        return {
            "description": self.description,
            "num_source_layers": self.num_source_layers,
            "layer_spec": to_layer_spec(self.layer_ids.tolist()),
            "slots": [{"layer": s.layer, "model": s.model, "scales": dict(s.scales)} for s in self.slots],
            "outer_scales": dict(self.outer_scales),
            "embed_model": self.embed_model,
            "head_model": self.head_model,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "tokenizer_model": self.tokenizer_model,
            "chat_template": self.chat_template,
        }

    def __str__(self) -> str:
        return json.dumps(self.to_json())


IDENTITY_SCALES: Scales = tuple((name, 0.0) for name in BRANCH_OUTPUTS)


def plan_from_layer_spec(spec: str, num_layers: int) -> LayerPlan:
    return LayerPlan(tuple(Slot(i) for i in parse_layer_spec(spec, num_layers)), num_layers, description=spec)


def with_identity(plan: LayerPlan, slots=None, duplicates: bool = False) -> LayerPlan:
    """Make chosen slots identity blocks (o_proj and down_proj scaled by 0; they add nothing to the
    residual stream, so the function is unchanged, yet they train from the first step).

    slots: slot indices to make identity; duplicates=True: every slot whose layer already ran earlier."""
    chosen = set(slots or ())
    if duplicates:
        seen: set = set()
        for index, slot in enumerate(plan.slots):
            if (slot.model, slot.layer) in seen:
                chosen.add(index)
            seen.add((slot.model, slot.layer))
    bad = sorted(i for i in chosen if not 0 <= i < plan.num_layers)
    if bad:
        raise ValueError(f"identity slots {bad} are out of range for a plan of {plan.num_layers} slots")
    new = tuple(
        replace(s, scales=tuple(dict(s.scales, **dict(IDENTITY_SCALES)).items())) if i in chosen else s
        for i, s in enumerate(plan.slots)
    )
    what = f"identity {sorted(chosen)}"
    return replace(plan, slots=new, description=f"{plan.description} + {what}".strip(" +"))


def with_slot_scale(plan: LayerPlan, slot: int, name: str, factor: float) -> LayerPlan:
    """Scale one layer tensor (by param name, e.g. 'layers.mlp.down_proj.weight') in one slot."""
    if not 0 <= slot < plan.num_layers:
        raise ValueError(f"slot {slot} is out of range for a plan of {plan.num_layers} slots")
    if not name.startswith("layers."):
        raise ValueError(f"{name!r} is not a layer tensor (names look like 'layers.mlp.down_proj.weight')")
    slots = list(plan.slots)
    slots[slot] = replace(slots[slot], scales=tuple(dict(slots[slot].scales, **{name: factor}).items()))
    return replace(plan, slots=tuple(slots))


def llama_pro_plan(num_layers: int, new_num_layers: int) -> LayerPlan:
    """LLaMA-Pro block expansion: split the N layers into (new - N) equal groups and after each group
    insert an identity copy of its last layer. 32 -> 40 adds a copy after layers 3, 7, ..., 31."""
    added = new_num_layers - num_layers
    if added <= 0:
        raise ValueError(f"LLaMA-Pro expansion must add layers: {num_layers} -> {new_num_layers}")
    if num_layers % added:
        raise ValueError(
            f"LLaMA-Pro needs the {added} new layers to split {num_layers} layers into equal groups; "
            f"choose new_num_layers = {num_layers} + a divisor of {num_layers}"
        )
    group = num_layers // added
    slots: list[Slot] = []
    for g in range(added):
        slots += [Slot(layer) for layer in range(g * group, (g + 1) * group)]
        slots.append(Slot((g + 1) * group - 1, scales=IDENTITY_SCALES))
    return LayerPlan(tuple(slots), num_layers, description=f"llama-pro {num_layers}->{new_num_layers}")
