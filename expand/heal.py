"""Healing: fine-tune a grown or pruned model with optax, checkpoint with orbax, and record what recovers.

The student is a model plus a depth plan (`layer_ids`, per-slot scales). Its loss on a batch of tokens
(B, T) is

    L = a * CE(student) + w * KL(teacher || student)

over the positions 0..T-2 (predicting tokens 1..T-1), with the teacher frozen; a = lm_weight (1 by
default; 0 is pure distillation), w = distill_weight (used when a teacher is given).

Options (`HealOptions`):
- shared = "virtual": slots that run the same stored layer share its weights. The gradient of a layer
  shared by k slots is the sum of k slot gradients, so its update is divided by k (lr/k), applied after
  Adam (which would otherwise undo a gradient scale). shared = "decoupled": the plan is materialized
  first and every slot owns its weights.
- train = "all" | "new" | "slots:SPEC": which slots' layer weights train; with anything but "all" the
  embeddings, final norm and lm_head are frozen (LLaMA-Pro trains only the new blocks). "new" = the slots
  whose stored layer already ran in an earlier slot (duplicates and identity copies). Freezing is exact:
  frozen tensors and frozen layers are bitwise unchanged.
- gates: a scalar gate g_s per new slot multiplies its o_proj and down_proj (the residual branches), in
  place of the plan's identity scales; g_s = 0 at init is an exact identity. `export` folds the gates
  into the weights, so the result is a plain Llama checkpoint.
- AdamW with linear warmup and cosine decay to lr/10, gradient clipping at global norm `clip`, through
  optax `multi_transform` (trainable / frozen labels per tensor).

Batches are taken in order from the token rows (step s uses rows s*B .. s*B+B-1, wrapping), so the data
position is a function of the step. An orbax CheckpointManager saves params, optimizer state and step
every `checkpoint_every` steps; `resume` restarts from the latest one and follows the same trajectory as
an uninterrupted run. A non-finite loss stops the run with `HealDiverged`; the last checkpoint (always
from a finite step) is kept.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from expand.container import Model
from expand.model import forward
from expand.numerics import kl_divergence, next_token_nll
from expand.params import BRANCH_OUTPUTS, Params
from expand.provenance import Provenance
from expand.surgery.grow import apply_depth
from expand.surgery.layerspec import parse_layer_spec
from expand.surgery.plan import LayerPlan, Slot, with_slot_scale

GATES = "gates"


class HealDiverged(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class HealOptions:
    steps: int = 100
    lr: float = 1e-4
    warmup: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    batch_size: int = 4
    distill_weight: float = 1.0
    lm_weight: float = 1.0
    train: str = "all"
    shared: str = "virtual"
    gates: bool = False
    gate_lr: float | None = None
    checkpoint_every: int = 50

    def validate(self) -> None:
        if self.shared not in ("virtual", "decoupled"):
            raise ValueError(f"shared must be 'virtual' or 'decoupled', got {self.shared!r}")
        if not (self.train in ("all", "new") or self.train.startswith("slots:")):
            raise ValueError(f"train must be 'all', 'new' or 'slots:SPEC', got {self.train!r}")
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch size and checkpoint interval must be at least 1")
        if self.lm_weight < 0 or self.distill_weight < 0 or self.lm_weight + self.distill_weight == 0:
            raise ValueError("the LM and distillation weights must be >= 0 and not both 0")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be positive, got {self.lr}")
        if self.gate_lr is not None and not (self.gates and self.gate_lr > 0):
            raise ValueError(f"gate_lr={self.gate_lr} needs gates=True (--gates) and a positive value")


# ---- the student: params, slots, gates ------------------------------------------------------------------


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


# ---- the optimizer -------------------------------------------------------------------------------------


def trainable_leaves(student: Student, train: str) -> dict[str, bool]:
    """Which tensors train at all: with train="all" every one; otherwise the layer tensors (only the
    trainable slots' layers move, through layer_factors) and the gates."""
    return {name: train == "all" or name.startswith("layers.") or name == GATES for name in student.params}


def scale_layers(factors: np.ndarray) -> optax.GradientTransformation:
    """Multiply the update of every stacked layer tensor by factors[layer] (lr/k, or 0 to freeze)."""
    factors = jnp.asarray(factors)

    def update(updates, state, params=None):
        def one(name, u):
            if not name.startswith("layers.") or isinstance(u, optax.MaskedNode):
                return u
            return u * factors.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)

        return {name: one(name, u) for name, u in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(options: HealOptions, student: Student) -> optax.GradientTransformation:
    """Clipped AdamW with warmup and cosine decay (to lr/10) on the trainable tensors, shared layers scaled
    by lr/k; frozen tensors get zero updates. With gate_lr the gates are their own group (own clipping and
    schedule peaking at gate_lr): Adam moves a parameter by at most about its lr per step, so gates that
    start at 0 open slowly at a weight-sized lr."""

    def adamw(peak: float) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, min(options.warmup, options.steps - 1),
                                                      options.steps, end_value=peak / 10)
        return optax.chain(optax.clip_by_global_norm(options.clip),
                           optax.adamw(schedule, weight_decay=options.weight_decay),
                           scale_layers(layer_factors(student)))

    groups = {"train": adamw(options.lr), "frozen": optax.set_to_zero()}
    labels = {name: "train" if t else "frozen" for name, t in trainable_leaves(student, options.train).items()}
    if options.gate_lr is not None:
        groups["gates"] = adamw(options.gate_lr)
        labels[GATES] = "gates"
    return optax.multi_transform(groups, labels)


def apply_updates(params: Params, updates: Params, trainable: dict[str, bool], frozen_layers: np.ndarray) -> Params:
    """params + updates, except frozen tensors and frozen layers (bool (stored layers,)), which keep their
    exact bits (p + 0 would turn -0.0 into +0.0)."""
    out = {}
    for name, p in params.items():
        if not trainable[name]:
            out[name] = p
        elif name.startswith("layers.") and frozen_layers.any():
            keep = jnp.asarray(frozen_layers).reshape((-1,) + (1,) * (p.ndim - 1))
            out[name] = jnp.where(keep, p, (p + updates[name]).astype(p.dtype))
        else:
            out[name] = (p + updates[name]).astype(p.dtype)
    return out


# ---- the loss and one step -------------------------------------------------------------------------------


def heal_loss(params: Params, tokens, teacher_logits, student: Student, lm_weight: float, distill_weight: float):
    """(loss, (lm, kl)): lm_weight times the mean next-token cross-entropy of the student plus
    distill_weight times the mean KL(teacher || student) per position (teacher_logits (B, T-1, V) or
    None)."""
    weights = {k: v for k, v in params.items() if k != GATES}
    logits = forward(weights, tokens[:, :-1], student.config, layer_ids=student.layer_ids,
                     slot_scales=student.slot_scales(params.get(GATES)))
    lm = next_token_nll(logits, tokens).mean()
    if teacher_logits is None:
        return lm_weight * lm, (lm, jnp.zeros(()))
    kl = kl_divergence(teacher_logits, logits).mean()
    return lm_weight * lm + distill_weight * kl, (lm, kl)


def group_norms(grads: Params, student: Student) -> dict[str, jax.Array]:
    """Gradient norms of the groups people watch: embeddings and head, old slots' layers, new slots'
    layers (decoupled), gates."""
    sq = {"embed/norm/head": 0.0, "layers": 0.0}
    new = np.zeros(student.config.num_hidden_layers, bool)
    if student.shared == "decoupled":
        new[new_slots(student.plan.layer_ids)] = True
    for name, g in grads.items():
        g2 = jnp.square(g.astype(jnp.float32))
        if name == GATES:
            sq["gates"] = g2.sum()
        elif name.startswith("layers."):
            per_layer = g2.reshape(g2.shape[0], -1).sum(-1)
            sq["layers"] = sq["layers"] + jnp.where(new, 0.0, per_layer).sum()
            if new.any():
                sq["new layers"] = sq.get("new layers", 0.0) + jnp.where(new, per_layer, 0.0).sum()
        else:
            sq["embed/norm/head"] = sq["embed/norm/head"] + g2.sum()
    return {k: jnp.sqrt(v) for k, v in sq.items()}


def make_step(student: Student, optimizer: optax.GradientTransformation, options: HealOptions):
    """The jitted training step: (params, opt_state, tokens (B, T), teacher_logits) -> (params, opt_state,
    logs)."""
    trainable = trainable_leaves(student, options.train)
    frozen_layers = layer_factors(student) == 0

    @jax.jit
    def step(params, opt_state, tokens, teacher_logits):
        (loss, (lm, kl)), grads = jax.value_and_grad(heal_loss, has_aux=True)(
            params, tokens, teacher_logits, student, options.lm_weight, options.distill_weight)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = apply_updates(params, updates, trainable, frozen_layers)
        logs = {"loss": loss, "lm": lm, "kl": kl, **{f"grad_norm {k}": v for k, v in group_norms(grads, student).items()}}
        return params, opt_state, logs

    return step


def batch_at(tokens: np.ndarray, step: int, batch_size: int) -> np.ndarray:
    """Rows step*B .. step*B+B-1 of the token rows, wrapping around: the data position is the step."""
    rows = (np.arange(batch_size) + step * batch_size) % len(tokens)
    return tokens[rows]


# ---- the run ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HealResult:
    """student: what trained; params: its final params; history: logs per step; provenance: the healed
    model's lineage (the plan's slot -> base layer map, with the healing run in its history)."""

    student: Student
    params: Params
    history: list[dict]
    provenance: Provenance

    def export(self) -> Model:
        """The healed model as a plain Llama (gates folded, plan materialized)."""
        config, params = export(self.student, self.params)
        return Model(config, params, source="healed", provenance=self.provenance)

    def write_history(self, directory: str | Path) -> None:
        """history.json and loss.png (loss, LM loss and KL against step)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        directory = Path(directory)
        (directory / "history.json").write_text(json.dumps(self.history, indent=2) + "\n")
        steps = [h["step"] for h in self.history]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("loss", "lm", "kl"):
            ax.plot(steps, [h[key] for h in self.history], label=key)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(directory / "loss.png", dpi=120)
        plt.close(fig)


def _manager(directory: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(directory.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2))


def _all_finite(tree) -> bool:
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(tree))


def heal(model: Model, tokens: np.ndarray, plan: LayerPlan | None = None, teacher: Model | None = None,
         options: HealOptions = HealOptions(), checkpoint_dir: str | Path | None = None, resume: bool = False,
         on_step: Callable[[int, dict], None] | None = None) -> HealResult:
    """Fine-tune `model` run through `plan` (default: as it is) on token rows (S, T).

    teacher: the frozen model whose logits the student is distilled towards (weight
        options.distill_weight); None trains on the LM loss only.
    checkpoint_dir: orbax checkpoints every options.checkpoint_every steps; with resume=True the run
        continues from the latest one (same options and tokens required).
    on_step(step, logs): called after every step (logs are floats)."""
    import orbax.checkpoint as ocp

    from expand.progress import progress_bar

    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"training tokens must be (rows, length >= 2), got shape {tokens.shape}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs the checkpoint directory of the run to continue")
    student = make_student(model, plan, options)
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"the teacher's vocab ({teacher.config.vocab_size}) differs from the student's "
                         f"({student.config.vocab_size})")
    optimizer = make_optimizer(options, student)
    params, opt_state = student.params, optimizer.init(student.params)
    step_fn = make_step(student, optimizer, options)
    history: list[dict] = []
    start = 0
    manager = _manager(Path(checkpoint_dir)) if checkpoint_dir is not None else None
    meta = {"options": dataclasses.asdict(options), "tokens": list(tokens.shape)}
    if manager is not None and manager.latest_step() is not None:
        if not resume:
            raise ValueError(f"{checkpoint_dir} already holds checkpoints; pass resume=True (CLI: --resume) to "
                             "continue that run, or choose another directory")
        start = manager.latest_step()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        restored = manager.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                   meta=ocp.args.JsonRestore()))
        if restored["meta"]["options"] != meta["options"] or restored["meta"]["tokens"] != meta["tokens"]:
            raise ValueError(f"the checkpoints in {checkpoint_dir} were made with other options or tokens: "
                             f"{restored['meta']['options']}, tokens {restored['meta']['tokens']}")
        params, opt_state = restored["state"]["params"], restored["state"]["opt_state"]
        history = restored["meta"]["history"]
    with progress_bar("healing", total=options.steps) as advance:
        advance(start)
        for step in range(start, options.steps):
            batch = jnp.asarray(batch_at(tokens, step, options.batch_size))
            teacher_logits = None
            if teacher is not None and options.distill_weight > 0:
                teacher_logits = forward(teacher.params, batch[:, :-1], teacher.config)
            new_params, new_state, logs = step_fn(params, opt_state, batch, teacher_logits)
            logs = {"step": step + 1, **{k: float(v) for k, v in logs.items()}}
            if not np.isfinite(logs["loss"]) or not _all_finite(new_params):
                last = manager.latest_step() if manager is not None else None
                kept = f"the last good checkpoint is step {last} in {checkpoint_dir}" if last is not None else \
                    "no checkpoint was written"
                raise HealDiverged(f"the loss or the weights became non-finite at step {step + 1} (loss "
                                   f"{logs['loss']}); {kept}. Lower the learning rate or raise the warmup.")
            params, opt_state = new_params, new_state
            history.append(logs)
            if on_step is not None:
                on_step(step + 1, logs)
            if manager is not None and ((step + 1) % options.checkpoint_every == 0 or step + 1 == options.steps):
                manager.save(step + 1, args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                    meta=ocp.args.JsonSave({**meta, "history": history})))
                manager.wait_until_finished()
            advance()
    if manager is not None:
        manager.close()
    lineage = plan.lineage_after(model.lineage()) if plan is not None else model.lineage()
    operation = {"op": "heal", "teacher": None if teacher is None else str(teacher.source),
                 "tokens": list(tokens.shape), **dataclasses.asdict(options)}
    return HealResult(student, params, history, lineage.with_operation(operation))
