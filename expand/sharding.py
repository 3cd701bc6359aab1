"""Sharding on a JAX mesh, derived from the logical-axes table (`expand.params.TABLE`).

One rules table maps logical axes to mesh axes; every tensor's `PartitionSpec` follows from its axes:

    embed     -> fsdp     (every matrix and the embeddings are split along the residual width)
    q_heads   -> tp       (attention heads, Megatron-style)
    kv_heads  -> tp
    mlp       -> tp
    vocab     -> tp
    head_dim, layers -> replicated

A mesh is written `fsdp=8` or `fsdp=2,tp=4` (missing axes have size 1); it must use every device of the
process group. Loading with `placement(config, mesh)` builds each array from its device shards
(`jax.make_array_from_callback`), so no device or host ever holds a whole tensor's stacked copy; jit then
runs forward, check, ablate, heal and generate on the sharded arrays (GSPMD inserts the collectives).
A mesh axis that does not divide a logical axis it shards is refused, naming the axis and the sizes.

Several hosts: call `initialize_distributed` (CLI: --coordinator HOST:PORT --num-processes N
--process-id I, or the environment JAX reads itself on SLURM and TPU pods) before anything touches a
device; each process then loads its own shards of the same mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from expand.config import Config
from expand.params import TensorSpec, axis_sizes, tensor_specs

MESH_AXES = ("fsdp", "tp")
RULES: dict[str, str | None] = {"embed": "fsdp", "q_heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "tp",
                                "head_dim": None, "layers": None}


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=2,tp=4' -> {'fsdp': 2, 'tp': 4} (axes in MESH_AXES order, missing ones = 1)."""
    sizes = {axis: 1 for axis in MESH_AXES}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh item {item!r}: write AXIS=SIZE with AXIS in {', '.join(MESH_AXES)}, "
                             "e.g. fsdp=8 or fsdp=2,tp=4")
        sizes[name] = int(value)
    return sizes


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(sizes.values())
    if need != len(devices):
        shown = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise ValueError(f"the mesh {shown} needs {need} devices but {len(devices)} are available; make the "
                         f"product of the sizes {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def partition_spec(spec: TensorSpec, mesh: Mesh, rules=RULES) -> PartitionSpec:
    """Each stored axis -> its mesh axis (None where the rule says so or the mesh axis has size 1)."""
    names = []
    for axis in spec.full_axes:
        mesh_axis = rules.get(axis)
        names.append(mesh_axis if mesh_axis is not None and mesh.shape[mesh_axis] > 1 else None)
    return PartitionSpec(*names)


def check_divisible(config: Config, mesh: Mesh, rules=RULES) -> None:
    sizes = axis_sizes(config)
    for axis, mesh_axis in rules.items():
        if mesh_axis is None or mesh.shape[mesh_axis] == 1 or axis not in sizes:
            continue
        k, n = mesh.shape[mesh_axis], sizes[axis]
        if n % k:
            divisors = [d for d in range(1, n + 1) if n % d == 0 and d <= 64]
            raise ValueError(f"mesh axis {mesh_axis}={k} does not divide {axis}={n} (the model's {axis} axis is "
                             f"sharded over {mesh_axis}); use {mesh_axis} in {divisors}")


def placement(config: Config, mesh: Mesh, rules=RULES):
    """The `expand.io.load` placement for this mesh: spec, shape -> NamedSharding."""
    check_divisible(config, mesh, rules)
    return lambda spec, shape: NamedSharding(mesh, partition_spec(spec, mesh, rules))


def shard_params(config: Config, params: dict, mesh: Mesh, rules=RULES) -> dict:
    """Place in-memory params (e.g. the result of surgery) on the mesh."""
    place = placement(config, mesh, rules)
    return {spec.name: jax.device_put(params[spec.name], place(spec, None)) for spec in tensor_specs(config)
            if spec.name in params}


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize with explicit arguments, or from the environment when none are given."""
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ValueError("multi-host runs need --coordinator, --num-processes and --process-id together "
                         "(or none of them, on clusters where JAX reads them from the environment)")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
