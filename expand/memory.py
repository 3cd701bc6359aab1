"""Memory per device, answered by the compiler: the functions a verb runs, lowered and compiled ahead of
time on abstract shapes (config.json is enough; no weight is read) for a mesh, and XLA's memory analysis
of each (arguments, outputs, temporaries per device), beside the hand arithmetic of the weights.

`expand check` on a plan (the candidate run virtually on the base's weights) holds, per device, the loaded
float32 weights W32 throughout, and runs three forwards with hidden states (`expand.check.run_base`,
`check`); each run in a dtype other than float32 first casts the weights (a copy W_d):

    1. the base in the check dtype d:           [W32] + F(base, d)
    2. the base in the floor's reference dtype: [W32] + O + F(base, ref)      (O: run 1's outputs, kept)
    3. the candidate in d:                      [W32] + O + F(candidate, d)

F = arguments + outputs + temporaries of that compiled forward; its arguments are the weights in the run's
dtype: W32 itself for a float32 run, else the cast copy W_d, beside which W32 stays loaded ([W32] counts it
then). The peak is the largest of the three.

`expand heal --teacher BASE` holds the student's float32 weights and AdamW state, the teacher's own copy
of the weights, and runs the teacher's forward (its final hidden states and its head rows, the embedding
itself when tied, are arguments of the step) and the step:

    teacher forward:  student + optimizer state + F(teacher forward)
    step:             F(step) (params, optimizer state, tokens, teacher hidden states and head in; new
                      params and state out) + the teacher's weights

Caveats: the figures are the compiler's for the platform it compiled for (XLA:CPU here unless an
accelerator with enough devices is present); on GPU and TPU the temporaries differ (other fusions), the
arguments and outputs do not. Nothing is allocated: a mesh larger than the machine is compiled for simulated
CPU devices (`--xla_force_host_platform_device_count`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from expand.config import Config
from expand.model import forward
from expand.sharding import RULES, data_parallel, placement
from expand.surgery.plan import LayerPlan

@dataclasses.dataclass(frozen=True)
class Compiled:
    """XLA's memory analysis of one compiled function, bytes per device."""

    name: str
    arguments: int
    outputs: int
    temporaries: int
    aliased: int

    @property
    def total(self) -> int:
        """What the function needs while it runs: arguments, outputs and temporaries (outputs written into
        donated arguments counted once)."""
        return self.arguments + self.outputs + self.temporaries - self.aliased

    @classmethod
    def of(cls, name: str, compiled: jax.stages.Compiled) -> "Compiled":
        stats = compiled.memory_analysis()
        return cls(name, stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.temp_size_in_bytes,
                   stats.alias_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What one verb holds per device at its peak: the compiled functions (XLA's numbers), the stages of the
    verb (name -> bytes), and the hand arithmetic (name -> bytes)."""

    verb: str
    mesh: str
    devices: str
    tokens: tuple[int, int]
    dtype: str
    compiled: list[Compiled]
    stages: dict[str, int]
    hand: dict[str, int]

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "peak_bytes_per_device": self.peak}


def abstract_params(config: Config, mesh: Mesh, dtype, num_layers: int | None = None) -> dict:
    """{name: ShapeDtypeStruct} of the params in `dtype`, each with its sharding on the mesh (no memory)."""
    from expand.params import tensor_specs

    place = placement(config, mesh)
    return {spec.name: jax.ShapeDtypeStruct(spec.shape(config, num_layers), dtype, sharding=place(spec, None))
            for spec in tensor_specs(config)}


def bytes_per_device(tree) -> int:
    """Bytes one device holds of abstract arrays (the largest shard of each)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


def _replicated(mesh: Mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _batch(mesh: Mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    """An input (B, ...) split over the data axis along B (replicated without one)."""
    axis = RULES["batch"] if data_parallel(mesh) > 1 else None
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(axis)))


def lower_forward(config: Config, mesh: Mesh, tokens: tuple[int, int], dtype, plan: LayerPlan | None = None,
                  return_hidden: bool = True):
    """`expand.forward` (with hidden states, as check runs it) lowered on abstract params in `dtype` on the
    mesh, for a token batch of shape `tokens`; a plan runs virtually (its layer_ids and slot scales)."""
    slots = config.num_hidden_layers if plan is None else plan.num_layers
    scales = {} if plan is None else {name: _replicated(mesh, (slots,), jnp.float32) for name in plan.slot_scales()}
    return forward.lower(abstract_params(config, mesh, dtype), _batch(mesh, tokens, jnp.int32), config,
                         layer_ids=_replicated(mesh, (slots,), jnp.int32), slot_scales=scales,
                         return_hidden=return_hidden)


def check_estimate(config: Config, mesh: Mesh, mesh_text: str, tokens: tuple[int, int], dtype_name: str = "fp32",
                   plan: LayerPlan | None = None) -> Estimate:
    """The peak of `expand check` on this mesh (module docstring): base and candidate (the plan, or the base
    itself) compiled in the check dtype and the base in the floor's reference dtype."""
    from expand.check import DTYPES, reference_dtype

    ref_name = reference_dtype(dtype_name)
    x64 = "fp64" in (dtype_name, ref_name)
    with jax.enable_x64(x64), jax.set_mesh(mesh):
        base = Compiled.of(f"base forward {dtype_name}",
                           lower_forward(config, mesh, tokens, DTYPES[dtype_name]).compile())
        ref = Compiled.of(f"base forward {ref_name}", lower_forward(config, mesh, tokens, DTYPES[ref_name]).compile())
        cand = Compiled.of(f"candidate forward {dtype_name}",
                           lower_forward(config, mesh, tokens, DTYPES[dtype_name], plan).compile())
        weights = {name: bytes_per_device(abstract_params(config, mesh, DTYPES[name]))
                   for name in {"fp32", dtype_name, ref_name}}
    w32 = weights["fp32"]

    def loaded(name: str) -> int:
        """The loaded float32 weights beside a run in `name` (a run in float32 has them as its arguments)."""
        return 0 if name == "fp32" else w32

    stages = {f"1. base in {dtype_name}": loaded(dtype_name) + base.total,
              f"2. base in {ref_name}, run 1 kept": loaded(ref_name) + base.outputs + ref.total,
              f"3. candidate in {dtype_name}, run 1 kept": loaded(dtype_name) + base.outputs + cand.total}
    hand = {"weights fp32 (loaded)": w32, **{f"weights {n} (a cast copy)": weights[n] for n in weights if n != "fp32"},
            **_activations(config, mesh, tokens, DTYPES[dtype_name], plan)}
    return Estimate("check", mesh_text, _devices(mesh), tokens, dtype_name, [base, ref, cand], stages, hand)


def _activations(config: Config, mesh: Mesh, tokens: tuple[int, int], dtype, plan: LayerPlan | None) -> dict:
    """Hand arithmetic of the forward's outputs per device, split over the data axis only (the compiler may
    split them further): logits (B, T, V) float32 and the candidate's residual stream (N + 1, B, T, d) in
    dtype."""
    rows = tokens[0] * tokens[1] / data_parallel(mesh)
    slots = config.num_hidden_layers if plan is None else plan.num_layers
    acc = np.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
    return {"logits (B, T, V) split over data only": int(rows * config.vocab_size * acc),
            "hidden (N + 1, B, T, d) split over data only": int((slots + 1) * rows * config.hidden_size * np.dtype(dtype).itemsize)}


def heal_estimate(config: Config, mesh: Mesh, mesh_text: str, tokens: tuple[int, int],
                  plan: LayerPlan | None = None) -> Estimate:
    """The peak of `expand heal --teacher BASE` (float32, the plan's duplicated slots sharing their weights)
    on this mesh (module docstring)."""
    with jax.set_mesh(mesh):
        teacher_params = abstract_params(config, mesh, jnp.float32)
        view = _lower_teacher_view(config, mesh, tokens).compile()
        # the step's teacher arguments placed as in a real run: the view's hidden states where XLA put them
        hidden = jax.ShapeDtypeStruct((tokens[0], tokens[1] - 1, config.hidden_size), jnp.float32,
                                      sharding=view.output_shardings)
        head = _teacher_head(config, teacher_params)
        step, student, opt_state = _lower_heal_step(config, mesh, tokens, plan, (hidden, head))
        step = Compiled.of("heal step", step.compile())
        teacher = Compiled.of("teacher view", view)
        weights = bytes_per_device(teacher_params)
        state = bytes_per_device(opt_state)
    # a tied head is the teacher's embedding: an argument of the step that the teacher's weights already hold
    shared_head = bytes_per_device(head) if config.tie_word_embeddings else 0
    stages = {"teacher view": bytes_per_device(student) + state + teacher.total,
              "step": step.total + weights - shared_head}
    hand = {"weights fp32 (student)": bytes_per_device(student), "AdamW state": state, "teacher weights fp32": weights,
            "teacher hidden states (B, T - 1, d)": bytes_per_device(hidden)}
    return Estimate("heal", mesh_text, _devices(mesh), tokens, "fp32", [teacher, step], stages, hand)


def _teacher_head(config: Config, teacher_params: dict) -> jax.ShapeDtypeStruct:
    """The teacher's head rows (V, d) as `expand.heal.loss.teacher_views` passes them to the step, placed as
    in a real run: the embedding itself when tied, else lm_head's transpose, split over lm_head's axes
    swapped."""
    if config.tie_word_embeddings:
        return teacher_params["embed_tokens.weight"]
    lm_head = teacher_params["lm_head.weight"]
    rows, columns = (tuple(lm_head.sharding.spec) + (None, None))[:2]  # lm_head is (d, V)
    sharding = NamedSharding(lm_head.sharding.mesh, PartitionSpec(columns, rows))
    return jax.ShapeDtypeStruct(lm_head.shape[::-1], lm_head.dtype, sharding=sharding)


def _lower_heal_step(config: Config, mesh: Mesh, tokens: tuple[int, int], plan: LayerPlan | None,
                     teacher: tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]):
    """(the heal step lowered on abstract arguments, the student's abstract params, the abstract optimizer
    state): `expand.heal`'s own student, optimizer and step, with default options (no plan: the model as it
    is, each layer once), on the teacher's (hidden states (B, T - 1, d), head rows (V, d)) of
    `expand.heal.loss.teacher_views`."""
    from expand.ablate.sweeps import plan_of
    from expand.container import Model
    from expand.heal import HealOptions
    from expand.heal.loss import make_step
    from expand.heal.optimizer import make_optimizer
    from expand.heal.student import make_student

    options = HealOptions(batch_size=tokens[0])
    plan = plan or plan_of(range(config.num_hidden_layers), config.num_hidden_layers)
    student = make_student(Model(config, abstract_params(config, mesh, jnp.float32)), plan, options)
    optimizer = make_optimizer(options, student)
    opt_state = jax.tree_util.tree_map_with_path(lambda path, x: _like_param(path, x, student.params, mesh),
                                                 jax.eval_shape(optimizer.init, student.params))
    step = make_step(student, optimizer, options)
    return (step.lower(student.params, opt_state, _batch(mesh, tokens, jnp.int32), teacher), student.params,
            opt_state)


def _lower_teacher_view(config: Config, mesh: Mesh, tokens: tuple[int, int]):
    """The teacher's side of a heal step (`expand.heal.loss.teacher_hidden`: its final-normed hidden
    states; its head is made once per run and is an argument of the step) lowered on abstract weights and
    tokens."""
    from expand.heal.loss import teacher_hidden

    view = jax.jit(lambda params, batch: teacher_hidden(params, batch, config))
    return view.lower(abstract_params(config, mesh, jnp.float32), _batch(mesh, tokens, jnp.int32))


def _like_param(path, leaf, params: dict, mesh: Mesh) -> jax.ShapeDtypeStruct:
    """An optimizer-state leaf with the sharding it gets in a real run: a leaf under a param's name with that
    param's shape (Adam's moments) is placed like the param (`optimizer.init` makes it with zeros_like of the
    param), anything else (step counts) is replicated."""
    names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
    param = next((params[n] for n in reversed(names) if n in params), None)
    if param is not None and tuple(param.shape) == tuple(leaf.shape):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=param.sharding)
    return _replicated(mesh, leaf.shape, leaf.dtype)


def _devices(mesh: Mesh) -> str:
    device = mesh.devices.flat[0]
    kind = "" if device.device_kind == device.platform else f" ({device.device_kind})"
    return f"{mesh.devices.size} x {device.platform}{kind}"


def compile_devices(count: int) -> list:
    """`count` devices to compile for: the default backend's when it has that many, else simulated CPU
    devices (the CLI asks XLA for enough of them before anything starts a backend)."""
    devices = jax.devices()
    if len(devices) >= count:
        return devices[:count]
    cpu = jax.devices("cpu")
    if len(cpu) < count:
        raise ValueError(f"a mesh of {count} devices needs {count} devices to compile for, and {len(cpu)} CPU devices "
                         f"exist: run with XLA_FLAGS=--xla_force_host_platform_device_count={count}")
    return cpu[:count]

