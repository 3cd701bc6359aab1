"""Where a prefill's time goes, expand against transformers, on bench_forward's 1 x 512 and 1 x 2048 rows
(SmolLM2-135M fp32, this process, this machine): which part makes a row's ratio.

The forward is split into its parts, each timed alone on the row's shapes on both sides, alternating
(median of --repeats after a first call that compiles expand's side):

  projections  the seven matmuls of all 30 layers (q, k, v, o; gate, up, down with SwiGLU's product),
               one layer's work on (1, T, 576) times 30
  attention    the attention core of all 30 layers: q (1, T, 9, 64) against k, v (1, T, 3, 64), causal:
               scores, softmax, value product (expand: `expand.model.attend`; transformers: its
               `sdpa_attention_forward`, what LlamaForCausalLM runs here)
  head         the final norm and the lm_head matmul, (1, T, 576) -> (1, T, 49152)
  whole        one forward with logits at every position (bench_forward's prefill row)

`rest` is whole minus the parts: the norms, RoPE, residual adds, the embedding lookup, and (expand) the
scan over layers; it is negative where the parts timed alone cost more than inside the whole forward (XLA
fuses and overlaps them there; each part alone pays its own call), and its ratio is printed as "-" then.
A part's ratio transformers / expand > 1 means expand's part is faster. As in bench_forward, the run stops
without writing when other processes took more than 10% of the CPU during a part's timed calls.

    python -m experiments.profile_prefill [--repeats 5]

writes experiments/results/profile_prefill_cpu.{json,txt}.
"""

from __future__ import annotations

import argparse

import numpy as np

import expand
from experiments.bench_forward import alternate, busy_share, torch_model
from experiments.benchlib import add_repeats_option, device_line, load_average, refuse_busy_run, write_results

LENGTHS = [512, 2048]
PARTS = ["projections", "attention", "head", "whole"]


def expand_parts(model, length: int) -> dict:
    """The parts on expand's side as callables (each a jitted function on fixed random inputs)."""
    import jax
    import jax.numpy as jnp

    from expand.model import attend, linear, lm_head, matmul_precision, mlp

    config, params = model.config, model.params
    n, m, h, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    layers = config.num_hidden_layers
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (1, length, d), jnp.float32)
    q = jax.random.normal(keys[1], (1, length, n, h), jnp.float32)
    k, v = (jax.random.normal(key, (1, m, length, h), jnp.float32) for key in keys[2:])
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    stacked = {name: a for name, a in params.items() if name.startswith("layers.")}

    def projections(x):
        def layer(carry, w):
            with matmul_precision(x.dtype):
                qkv = [linear(carry, w[f"layers.self_attn.{p}_proj.weight"], None, e)
                       for p, e in (("q", "btd,dnh->btnh"), ("k", "btd,dmh->btmh"), ("v", "btd,dmh->btmh"))]
                o = linear(qkv[0], w["layers.self_attn.o_proj.weight"], None, "btnh,nhd->btd")
                return carry, o + mlp(carry, w) + qkv[1].sum() + qkv[2].sum()
        return jax.lax.scan(layer, x, stacked)[1]

    def attention(q, k, v):  # a different q per layer, so that XLA cannot hoist the work out of the loop
        def layer(carry, q):
            with matmul_precision(q.dtype):
                return carry, attend(q, k, v, mask, h**-0.5, 0)
        return jax.lax.scan(layer, 0, q + jnp.arange(layers, dtype=q.dtype)[:, None, None, None, None])[1]

    runs = {"projections": (jax.jit(projections), (x,)), "attention": (jax.jit(attention), (q, k, v)),
            "head": (jax.jit(lambda x: lm_head(params, x, config)), (x,)),
            "whole": (jax.jit(lambda t: expand.forward(params, t, config)),
                      (jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, length)), jnp.int32),))}
    return {part: (lambda fn=fn, args=args: jax.block_until_ready(fn(*args))) for part, (fn, args) in runs.items()}


def transformers_parts(model, reference, length: int) -> dict:
    """The same parts from transformers' own modules, on the same shapes."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = model.config
    n, m, h, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, length, d, generator=generator)
    q = torch.randn(1, n, length, h, generator=generator)
    k, v = (torch.randn(1, m, length, h, generator=generator) for _ in range(2))
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, config.vocab_size, (1, length)))
    layers = reference.model.layers

    def projections():
        for layer in layers:
            a = layer.self_attn
            a.q_proj(x), a.k_proj(x), a.v_proj(x)
            a.o_proj(x.new_zeros(1, length, n * h)), layer.mlp(x)

    def attention():
        for layer in layers:
            sdpa_attention_forward(layer.self_attn, q, k, v, None, scaling=layer.self_attn.scaling, is_causal=True)

    runs = {"projections": projections, "attention": attention,
            "head": lambda: reference.lm_head(reference.model.norm(x)), "whole": lambda: reference(tokens).logits}

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    return {part: no_grad(fn) for part, fn in runs.items()}


def profile(model, reference, length: int, repeats: int) -> dict:
    ours, theirs = expand_parts(model, length), transformers_parts(model, reference, length)
    row = {}
    for part in PARTS:
        ours[part](), theirs[part]()  # expand compiles
        times = alternate({"expand": ours[part], "transformers": theirs[part]}, repeats)
        row[part] = {side: round(t["median_s"], 4) for side, t in times.items()}
        row[part]["range_s"] = {side: [round(t["min_s"], 4), round(t["max_s"], 4)] for side, t in times.items()}
        row[part]["other_cpu_share"] = round(busy_share(times), 3)
    row["rest"] = {side: round(row["whole"][side] - sum(row[p][side] for p in PARTS[:-1]), 4)
                   for side in ("expand", "transformers")}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_repeats_option(parser, 5, "alternating rounds per part")
    args = parser.parse_args()
    import torch

    model = expand.load("smollm2")
    reference = torch_model(model)
    start_load = load_average()
    rows = {length: profile(model, reference, length, args.repeats) for length in LENGTHS}
    results = {"device": device_line(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "repeats": args.repeats, "load_average": {"start": start_load, "end": load_average()},
               "rows": {f"1x{length}": row for length, row in rows.items()}}
    lines = [f"device: {results['device']}; torch {torch.__version__} ({torch.get_num_threads()} threads)",
             (f"SmolLM2-135M fp32, batch 1; median of {args.repeats} alternating repeats per part, seconds; "
              f"ratio = transformers / expand (> 1: expand faster); load average {start_load} at start, "
              f"{results['load_average']['end']} at end"), ""]
    for length, row in rows.items():
        lines.append(f"1 x {length:<5} {'expand':>9} {'transformers':>13} {'ratio':>7}   per token (ms): expand / transformers")
        for part in [*PARTS[:-1], "rest", "whole"]:
            e, t = row[part]["expand"], row[part]["transformers"]
            ratio = f"{t / e:6.2f}x" if e > 0 and t > 0 else f"{'-':>7}"
            lines.append(f"  {part:<11} {e:9.3f} {t:13.3f} {ratio}   {1e3 * e / length:6.3f} / {1e3 * t / length:6.3f}")
        lines.append("")
    busiest = max(row[part]["other_cpu_share"] for row in rows.values() for part in PARTS)
    lines.append(f"other processes took at most {busiest:.1%} of the CPU during one part's timed calls")
    print("\n".join(lines))
    refuse_busy_run({f"1 x {length} {part}": row[part]["other_cpu_share"]
                     for length, row in rows.items() for part in PARTS})
    write_results("profile_prefill_cpu", results, "\n".join(lines).rstrip())


if __name__ == "__main__":
    main()
