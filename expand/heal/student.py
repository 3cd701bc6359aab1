"""The student: what trains (a model run through a depth plan, with optional gates), which of its weights
may move, and the plain Llama it exports to."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from expand.container import Model
from expand.heal.options import HealOptions
from expand.params import BRANCH_OUTPUTS, Params
from expand.surgery.grow import apply_depth
from expand.surgery.layerspec import parse_layer_spec
from expand.surgery.plan import LayerPlan, Slot, with_slot_scale

GATES = "gates"


@dataclasses.dataclass(frozen=True)
class Student:
    """What trains. params: stored weights (+ GATES (G,) when gated; with shared="decoupled" one layer per
    slot); layer_ids (N,): the slots' stored layers; scales: the plan's fixed per-slot scales {name: (N,)};
    gated_slots: slots whose branch outputs are multiplied by the gates; trainable_slots: slots whose layer
    weights train; plan: the depth plan over the original model, gated slots without identity scales."""

    config: object
    params: Params
    layer_ids: np.ndarray
    scales: dict
    gated_slots: tuple[int, ...]
    trainable_slots: tuple[int, ...]
    plan: LayerPlan
    shared: str

    def slot_scales(self, gates) -> dict:
        """The plan's scales with the gated slots' branch outputs replaced by their gates."""
        if not self.gated_slots:
            return self.scales
        n = len(self.layer_ids)
        out = dict(self.scales)
        for name in BRANCH_OUTPUTS:
            base = jnp.asarray(self.scales.get(name, np.ones(n, np.float32)))
            out[name] = base.at[jnp.asarray(self.gated_slots)].set(gates)
        return out


def weights_of(params: Params) -> Params:
    """The model tensors of a student's params (the gates left out)."""
    return {name: value for name, value in params.items() if name != GATES}


def new_slots(layer_ids) -> list[int]:
    """Slots whose stored layer already ran in an earlier slot."""
    seen, out = set(), []
    for slot, layer in enumerate(np.asarray(layer_ids).tolist()):
        if layer in seen:
            out.append(slot)
        seen.add(layer)
    return out


def make_student(model: Model, plan: LayerPlan | None, options: HealOptions) -> Student:
    """The student of `model` run through `plan`. Without a plan the model trains as it is (every layer
    owns its weights), and its new slots are read from its provenance (expand.json of a grown model)."""
    options.validate()
    n_stored = model.config.num_hidden_layers
    shared = options.shared
    if plan is None:
        plan = LayerPlan(tuple(Slot(i) for i in range(n_stored)), n_stored, description="all")
        fresh = new_slots(model.provenance.layer_map if model.provenance else plan.layer_ids)
        shared = "decoupled"
    else:
        fresh = new_slots(plan.layer_ids)
    if options.train != "all" and shared == "virtual":
        raise ValueError(f"--train {options.train} needs --shared decoupled: with virtual sharing a new slot runs "
                         "the same weights as the original, so they cannot train separately")
    gated = tuple(fresh) if options.gates else ()
    if options.gates and not gated:
        raise ValueError("--gates needs new slots (layers that run twice) to gate; this plan has none")
    if gated:  # the gates replace the identity scales of the gated slots (a gate of 0 is the identity)
        slots = [dataclasses.replace(s, scales=tuple((k, v) for k, v in s.scales if k not in BRANCH_OUTPUTS))
                 if i in gated else s for i, s in enumerate(plan.slots)]
        plan = dataclasses.replace(plan, slots=tuple(slots))
    if options.train == "all":
        trainable = tuple(range(plan.num_layers))
    elif options.train == "new":
        if not fresh:
            raise ValueError("--train new: the plan has no new slots (no layer runs twice)")
        trainable = tuple(fresh)
    else:
        trainable = tuple(sorted(set(parse_layer_spec(options.train[len("slots:"):], plan.num_layers))))
    config, params, layer_ids, scales = model.config, dict(model.params), plan.layer_ids, plan.slot_scales()
    if shared == "decoupled":
        config, params = apply_depth(model.config, model.params, plan)
        layer_ids, scales = np.arange(plan.num_layers, dtype=np.int32), {}
    if gated:
        params[GATES] = jnp.zeros(len(gated), jnp.float32)
    return Student(config, params, np.asarray(layer_ids, np.int32), scales, gated, trainable, plan, shared)


def layer_factors(student: Student) -> np.ndarray:
    """(stored layers,) multiplier of each stored layer's update: 1/k for a layer run by k slots (virtual
    sharing), 1 for a trainable slot (decoupled), 0 for frozen layers."""
    n_stored = student.config.num_hidden_layers
    factors = np.zeros(n_stored, np.float32)
    if student.shared == "decoupled":
        factors[list(student.trainable_slots)] = 1.0
        return factors
    counts = np.bincount(student.layer_ids, minlength=n_stored)
    factors[counts > 0] = 1.0 / counts[counts > 0]
    return factors


def trainable_leaves(student: Student, train: str) -> dict[str, bool]:
    """Which tensors train at all: with train="all" every one; otherwise the layer tensors (only the
    trainable slots' layers move, through layer_factors) and the gates."""
    return {name: train == "all" or name.startswith("layers.") or name == GATES for name in student.params}


def first_nonfinite(params: Params) -> str | None:
    """The first tensor holding NaN or inf, as `name` (or `name, layer i` for a stacked layer tensor), with
    how many such values; None when every value is finite."""
    for name, value in params.items():
        bad = ~jnp.isfinite(value)
        count = int(bad.sum())
        if count:
            where = name
            if name.startswith("layers.") and value.ndim > 1:
                where += f", layer {int(np.flatnonzero(np.asarray(bad.reshape(len(value), -1).any(-1)))[0])}"
            return f"{where} ({count} NaN or inf values)"
    return None


def export(student: Student, params: Params) -> tuple[object, Params]:
    """A plain Llama (config, params): the plan materialized (virtual sharing) and the gates folded into
    o_proj / down_proj (and their biases)."""
    params = dict(params)
    gates = params.pop(GATES, None)
    n = len(student.layer_ids)
    plan = student.plan if student.shared == "virtual" else LayerPlan(tuple(Slot(i) for i in range(n)), n)
    for gate, slot in zip([] if gates is None else np.asarray(gates).tolist(), student.gated_slots):
        for name in BRANCH_OUTPUTS:
            plan = with_slot_scale(plan, slot, name, gate)
    return apply_depth(student.config, params, plan)
