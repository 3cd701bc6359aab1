"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharding.py):
load a checkpoint sharded on a mesh, run forward, check, a delete-one sweep, greedy generation and a few
heal steps with the mesh current (as the CLI runs them), and compare each with the same run on one device.
Prints one JSON line."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

import expand
from expand.check import check, run_in
from expand.heal import HealOptions, heal
from expand.sharding import make_mesh, parse_mesh, placement


def normalized(spec, ndim: int) -> list:
    """A PartitionSpec as a list of ndim entries (JAX may drop trailing Nones)."""
    return list(spec) + [None] * (ndim - len(spec))


def main(path: str, mesh_text: str) -> None:
    tokens = np.random.default_rng(0).integers(3, 256, (8, 48)).astype(np.int32)
    single = expand.load(path)
    plan = expand.plan_from_layer_spec("0:3,1:", single.config.num_hidden_layers)
    prompts = [list(map(int, row[:8])) for row in tokens[:2]]
    # Adam's update g / (|g| + eps) turns rounding-level differences of near-zero gradients into differences
    # of up to lr per step, so the parameter comparison uses a small learning rate
    options = HealOptions(steps=3, lr=1e-5, warmup=0, batch_size=4, eval_every=2, keep="last", held_out=0.25)

    def runs(model):
        return {"logits": np.asarray(expand.forward(model.params, tokens, model.config)),
                "check": check(model, plan, tokens=tokens), "sweep": expand.ablate(model, "delete-one", tokens),
                "generated": expand.generate(model.params, model.config, prompts, 6),
                "healed": heal(model, tokens, plan, teacher=model, options=options)}

    one = runs(single)
    mesh = make_mesh(parse_mesh(mesh_text))
    with jax.set_mesh(mesh):
        sharded = expand.load(path, placement=placement(single.config, mesh))
        logits_spec = normalized(expand.forward(sharded.params, tokens, sharded.config).sharding.spec, 3)
        many = runs(sharded)
    out = {"devices": len(jax.devices()), "specs": {}, "shard_shapes": {}, "logits_spec": logits_spec}
    for name in ("embed_tokens.weight", "layers.self_attn.q_proj.weight", "layers.self_attn.k_proj.weight",
                 "layers.mlp.down_proj.weight", "lm_head.weight"):
        array = sharded.params[name]
        out["specs"][name] = normalized(array.sharding.spec, array.ndim)
        out["shard_shapes"][name] = sorted({tuple(s.data.shape) for s in array.addressable_shards})
        out.setdefault("full_shapes", {})[name] = list(array.shape)
    a, b = many["logits"], one["logits"]
    out["forward_max_diff"] = float(np.abs(a - b).max())
    out["logit_scale"] = float(np.abs(b).max())
    ra, rb = many["check"], one["check"]
    out["fp32_floor"] = rb.floor  # the base on one device in fp32 vs float64 on these tokens
    reference, _ = run_in("fp64", single, tokens)
    out["sharded_vs_fp64"] = float(np.abs(a.astype(np.float64) - reference).max())
    out["check_diff"] = {k: abs(getattr(ra, k) - getattr(rb, k)) for k in ("max_abs_logit_delta", "mean_kl",
                                                                           "top1_agreement")}
    out["ablate_diff"] = max(abs(x[k] - y[k]) for x, y in zip(many["sweep"].rows, one["sweep"].rows)
                             for k in ("loss", "mean_kl", "top1"))
    out["generate_equal"] = many["generated"] == one["generated"]
    ha, hb = many["healed"], one["healed"]
    out["heal_param_max_diff"] = max(float(np.abs(np.asarray(ha.params[k]) - np.asarray(hb.params[k])).max())
                                     for k in hb.params)
    out["heal_loss_diff"] = max(abs(x["loss"] - y["loss"]) for x, y in zip(ha.history, hb.history))
    out["heal_held_out_diff"] = max(abs(x[k] - y[k]) for x, y in zip(ha.held_out, hb.held_out)
                                    for k in ("lm", "kl", "top1"))
    out["healed_spec"] = normalized(ha.params["layers.self_attn.q_proj.weight"].sharding.spec, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
