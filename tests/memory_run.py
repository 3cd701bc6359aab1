"""Run in a subprocess with 8 simulated CPU devices (tests/test_memory.py): on a real checkpoint loaded on a
mesh, the candidate forward of `expand check` (lowered from the real arrays, compiled and run), or with
`heal` as a sixth argument the heal step with that checkpoint as its own teacher (lowered from the real
student, optimizer state and teacher view). Prints the memory analysis, and for the forward the bytes its
arguments and outputs take on device 0, as one JSON line."""

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


def analysis(stats) -> dict:
    return {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "temporaries": stats.temp_size_in_bytes}


def heal_step_analysis(model, plan, tokens) -> dict:
    """The compiled heal step's memory analysis, its arguments as `expand.heal` makes them."""
    from expand.heal import HealOptions
    from expand.heal.loss import make_step, teacher_views
    from expand.heal.optimizer import make_optimizer
    from expand.heal.run import place_with
    from expand.heal.student import make_student

    options = HealOptions(batch_size=tokens.shape[0])
    student = make_student(model, plan, options)
    optimizer = make_optimizer(options, student)
    opt_state = place_with(optimizer.init(student.params), student.params)
    step = make_step(student, optimizer, options)
    return analysis(step.lower(student.params, opt_state, tokens, teacher_views(model)(tokens)).compile()
                    .memory_analysis())


def main(path: str, mesh_text: str, spec: str, batch: int, seq_len: int, function: str = "check") -> None:
    mesh = make_mesh(parse_mesh(mesh_text))
    with jax.set_mesh(mesh):
        model = expand.load(path, placement=placement(expand.read_config(path), mesh))
        plan = expand.plan_from_layer_spec(spec, model.config.num_hidden_layers)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, seq_len), np.int32))
        if function == "heal":
            print(json.dumps({"analysis": heal_step_analysis(model, plan, tokens)}))
            return
        args = (model.params, tokens, model.config)
        kwargs = dict(layer_ids=jnp.asarray(plan.layer_ids), slot_scales={}, return_hidden=True)
        stats = expand.forward.lower(*args, **kwargs).compile().memory_analysis()
        outputs = expand.forward(*args, **kwargs)
        print(json.dumps({"analysis": analysis(stats),
                          "measured": {"arguments": on_device_zero((model.params, tokens, kwargs["layer_ids"])),
                                       "outputs": on_device_zero(outputs)}}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), *sys.argv[6:])
