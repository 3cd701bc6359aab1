"""Sharding on a JAX mesh, derived from the logical-axes table (`expand.params.TABLE`).

One rules table maps logical axes to mesh axes; every tensor's `PartitionSpec` follows from its axes, and
the batch axis of the activations from the same table:

    batch     -> data     (activations: each data group runs its own rows of the batch)
    embed     -> fsdp     (every matrix and the embeddings are split along the residual width)
    q_heads   -> tp       (attention heads, Megatron-style)
    kv_heads  -> tp
    mlp       -> tp
    vocab     -> tp
    head_dim, layers -> replicated

A mesh is written `fsdp=8`, `fsdp=2,tp=4` or `data=2,fsdp=4` (missing axes have size 1); it must use every
device of the process group, and its last axis varies fastest over `jax.devices()` (so `tp`, then `fsdp`,
stay within a host, and `data` spans hosts). Loading with `placement(config, mesh)` builds each array from
its device shards (`jax.make_array_from_callback`), each read from its own byte ranges of the checkpoint;
jit then runs forward, check, ablate, heal and generate on the sharded arrays (GSPMD inserts the
collectives). Under the mesh as the current one (`jax.set_mesh(mesh)`, which the CLI enters), the forward
constrains its activations (B, T, ...) to be split over `data` along the batch (`constrain_batch`), so
more data groups mean more tokens per second; without a `data` axis the constraint is absent. A mesh
axis that does not divide a logical axis it shards is refused, naming the axis and the sizes.

Several processes (hosts): `expand.distributed`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from expand.config import Config
from expand.params import TensorSpec, axis_sizes

MESH_AXES = ("data", "fsdp", "tp")
RULES: dict[str, str | None] = {"batch": "data", "embed": "fsdp", "q_heads": "tp", "kv_heads": "tp", "mlp": "tp",
                                "vocab": "tp", "head_dim": None, "layers": None}


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tp': 1} (axes in MESH_AXES order, missing ones = 1)."""
    sizes = {axis: 1 for axis in MESH_AXES}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh item {item!r}: write AXIS=SIZE with AXIS in {', '.join(MESH_AXES)}, "
                             "e.g. fsdp=8, fsdp=2,tp=4 or data=2,fsdp=4")
        sizes[name] = int(value)
    return sizes


def mesh_devices(sizes: dict[str, int]) -> int:
    return math.prod(sizes.values())


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    need = mesh_devices(sizes)
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


def current_mesh() -> Mesh | None:
    """The mesh made current with `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_mesh()
    return None if mesh.empty else mesh


def data_parallel(mesh) -> int:
    """How many data groups `mesh` (a Mesh or AbstractMesh, or None) splits the batch over."""
    axis = RULES["batch"]
    return 1 if mesh is None or mesh.empty or axis not in mesh.axis_names else mesh.shape[axis]


def check_batch(rows: int, mesh=None) -> None:
    """Refuse a batch of `rows` that the mesh's data axis (default: the current mesh's) does not divide."""
    groups = data_parallel(current_mesh() if mesh is None else mesh)
    if rows % groups:
        raise ValueError(f"the batch has {rows} rows, which the mesh's {RULES['batch']}={groups} does not divide "
                         f"(each data group runs batch / {groups} rows): use a batch (sequences, --num-sequences "
                         f"or --batch-size) that is a multiple of {groups}, or a mesh without {RULES['batch']}")


def constrain_batch(x: jax.Array, axis: int = 0) -> jax.Array:
    """Inside jit, under a current mesh with a data axis of size > 1: x split over `data` along its batch
    `axis`, its other axes left to the compiler. Elsewhere x as it is. (B rows over k groups: B % k == 0,
    else a ValueError at trace time.)"""
    mesh = jax.sharding.get_abstract_mesh()
    if data_parallel(mesh) == 1:
        return x
    check_batch(x.shape[axis], mesh)
    spec = [PartitionSpec.UNCONSTRAINED] * x.ndim
    spec[axis] = RULES["batch"]
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
