"""Run in a subprocess with 8 simulated CPU devices (tests/test_memory.py): the candidate forward of
`expand check` on a real checkpoint loaded on a mesh, lowered from the real arrays, compiled and run.
Prints its memory analysis and the bytes its arguments and outputs take on device 0, as one JSON line."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import expand
from expand.sharding import make_mesh, parse_mesh, placement


def on_device_zero(tree) -> int:
    device = jax.devices()[0]
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shards = [s for s in leaf.addressable_shards if s.device == device]
        total += shards[0].data.nbytes if shards else 0
    return total


def main(path: str, mesh_text: str, spec: str, batch: int, seq_len: int) -> None:
    mesh = make_mesh(parse_mesh(mesh_text))
    with jax.set_mesh(mesh):
        model = expand.load(path, placement=placement(expand.read_config(path), mesh))
        plan = expand.plan_from_layer_spec(spec, model.config.num_hidden_layers)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, seq_len), np.int32))
        args = (model.params, tokens, model.config)
        kwargs = dict(layer_ids=jnp.asarray(plan.layer_ids), slot_scales={}, return_hidden=True)
        stats = expand.forward.lower(*args, **kwargs).compile().memory_analysis()
        outputs = expand.forward(*args, **kwargs)
        print(json.dumps({"analysis": {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
                                       "temporaries": stats.temp_size_in_bytes},
                          "measured": {"arguments": on_device_zero((model.params, tokens, kwargs["layer_ids"])),
                                       "outputs": on_device_zero(outputs)}}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
