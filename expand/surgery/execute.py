"""Running a `TensorPlan`: in memory on loaded params (`execute`), or streamed from checkpoint to checkpoint
(`execute_to_disk`, one output tensor at a time, so peak memory is about one tensor whatever the model's
size). Both compute every output tensor with `compute`, so their results are equal by construction (the
tests still compare them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from expand.io import Checkpoint, input_path, source_dtype, write_metadata
from expand.io.atomic import atomic_dir, refuse_overlap
from expand.io.safetensors import TensorEntry, parse_size, write_sharded
from expand.params import Params, spec_by_name
from expand.progress import progress_bar
from expand.surgery.tensorplan import BASE, OutputTensor, Read, TensorPlan
from expand.surgery.width import compiled_grower

Reader = Callable[[Read], object]  # a stored tensor in expand's per-layer layout (numpy or jax)


def compute(out: OutputTensor, read: Reader, grow: Callable | None):
    """One output tensor by its rule (see `expand.surgery.tensorplan`). A plain copy is returned as read, so
    streaming an unchanged tensor costs no copy."""
    from expand.numerics import scale_rounded

    rule = out.rule
    x = read(rule.source)
    if rule.cast_in is not None:
        x = x.astype(jnp.dtype(rule.cast_in))
    if rule.scale != 1.0:
        x = scale_rounded(x, rule.scale)
    if rule.cast_out is not None:
        x = x.astype(jnp.dtype(rule.cast_out))
    if rule.grow is not None:
        donor = None if rule.grow.donor is None else read(rule.grow.donor)
        x = grow(out.spec, x, donor, rule.grow.layer)
    return x


def execute(plan: TensorPlan, params: Mapping[str, Params]) -> Params:
    """The plan's params, from the loaded params of every input model it reads (by key: BASE, a recipe
    model's name, DONOR); stacked tensors are stacked over the output layers."""
    missing = sorted(set(plan.inputs) - set(params))
    if missing:
        raise ValueError(f"the plan reads models {missing}, which were not given")
    grow = compiled_grower(plan.width) if plan.width is not None else None

    def read(r: Read):
        array = params[r.model][r.name]
        return array if r.layer is None else array[r.layer]

    pieces: dict[str, list] = {}
    for out in plan.outputs:
        pieces.setdefault(out.name, []).append(compute(out, read, grow))
    return {name: jnp.stack(arrays) if spec_by_name(name).stacked else jnp.asarray(arrays[0])
            for name, arrays in pieces.items()}


def execute_to_disk(plan: TensorPlan, checkpoints: Mapping[str, Checkpoint], out: str | Path, *,
                    lead: str = BASE, dtype=None, max_shard_size: str | int = "2GB", overwrite: bool = False,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Stream the plan into a new HF directory: each output tensor is read from its checkpoint(s), computed
    and written before the next is read, into sharded safetensors, written atomically beside `out`.

    checkpoints: every input model the plan reads, opened (`expand.io.open_checkpoint`), by key.
    lead: the checkpoint whose tokenizer and provenance the output carries (a multi-model recipe's MODEL).
    dtype: output dtype (default: the recipe's out_dtype or dtype, else the leading checkpoint's).
    extra(directory): run on the complete output before it is published (e.g. a check recorded in it)."""
    missing = sorted(set(plan.inputs) - set(checkpoints))
    if missing:
        raise ValueError(f"the plan reads models {missing}, which were not given")
    leading = checkpoints[lead]
    tokenizer_from, chat_template = leading.name, None
    if plan.depth is not None:
        tokenizer_from = plan.depth.tokenizer_model or tokenizer_from
        chat_template = None if plan.depth.chat_template == "auto" else plan.depth.chat_template
    inputs = [checkpoint.path for checkpoint in checkpoints.values()] + [input_path(tokenizer_from)]
    refuse_overlap(out, inputs)
    grow = compiled_grower(plan.width) if plan.width is not None else None
    stored = source_dtype(leading.source)
    out_dtype = np.dtype(dtype) if dtype is not None else plan.depth.output_dtype(stored) if plan.depth else stored
    by_name = {o.hf_name: o for o in plan.outputs}
    entries = [TensorEntry(o.hf_name, o.spec.hf_shape(plan.config), out_dtype) for o in plan.outputs]

    def read(r: Read):
        return checkpoints[r.model].read(spec_by_name(r.name), r.layer)

    def produce(entry: TensorEntry) -> np.ndarray:
        o = by_name[entry.name]
        return o.spec.to_hf(np.asarray(compute(o, read, grow)), plan.config).astype(out_dtype, copy=False)

    with atomic_dir(out, overwrite, inputs=inputs) as tmp:
        with progress_bar(f"writing {Path(out).name}", total=len(entries)) as advance:
            write_sharded(tmp, entries, produce, parse_size(max_shard_size), on_tensor=lambda e: advance())
        write_metadata(tmp, plan.config, out_dtype, tokenizer_from, plan.lineage(leading.provenance),
                       chat_template=chat_template)
        if extra is not None:
            extra(tmp)
    return Path(out)
