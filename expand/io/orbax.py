"""Orbax checkpoints of a model's params: written into `directory/params`, read back with each tensor placed
by a `Placement` (one device, or its shard of a mesh). Damaged checkpoints and full disks become the
errors the command line reports (CheckpointError, NoSpaceError)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax

from expand.config import Config
from expand.io.atomic import NoSpaceError, is_disk_full
from expand.io.safetensors import CheckpointError
from expand.params import Params, TensorSpec, flatten, nest, tensor_specs

ORBAX_PARAMS = "params"
Placement = Callable[[TensorSpec, tuple[int, ...]], jax.sharding.Sharding]


def write_orbax(directory: Path, params: Params) -> None:
    """An orbax checkpoint of `params` in directory/params; a full disk is NoSpaceError with the bytes of the
    uncompressed arrays (an upper bound: orbax compresses)."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save((directory / ORBAX_PARAMS).absolute(), nest(params))
            checkpointer.wait_until_finished()
    except Exception as e:
        if not is_disk_full(e):
            raise
        needed = sum(value.nbytes for value in params.values())
        raise NoSpaceError(f"{directory} ran out of space; the arrays are {needed:,} bytes uncompressed", needed) from e


def read_orbax(directory: Path, config: Config, dtype, placement: Placement) -> Params:
    import orbax.checkpoint as ocp

    target = {
        spec.name: jax.ShapeDtypeStruct(spec.shape(config), dtype, sharding=placement(spec, spec.shape(config)))
        for spec in tensor_specs(config)
    }
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore((directory / ORBAX_PARAMS).absolute(), nest(target))
    except Exception as e:  # orbax and tensorstore raise ValueError, OSError or bare Exception on damaged files
        raise CheckpointError(
            f"{directory} is not a readable orbax checkpoint ({_first_line(e)}); re-create it from the "
            f"checkpoint it was made from (expand convert SRC {directory} --format orbax --force)") from e
    return flatten(restored)


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The gist of a long library error: the first line of its root cause, before any dump of the
    tensorstore spec."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    for marker in (" See full TensorStore", " [tensorstore_spec", " [source locations"):
        text = text.split(marker)[0]
    return text if len(text) <= limit else text[:limit] + "..."
