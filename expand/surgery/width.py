"""Width growth: hidden size d -> d', query heads n -> n', kv heads m -> m', MLP units f -> f', head_dim
fixed, every tensor grown by one rule applied over the logical-axes table (`expand.params.TABLE`).

Rows are outputs, columns inputs. For every grown axis, `AxisMap.source[i]` is the base index that new
position i holds (-1: a new position). A tensor's entries then fall into blocks by whether their output
and input coordinates are old or new:

    [[M, U],      M: base values (gathered through the maps; kv heads may be copied)
     [A, B]]      U: old outputs reading new inputs; A, B: new outputs reading old / new inputs

Modes (what goes in U, A, B, and how the norms change):

exact        writers into the residual stream (embed_tokens, o_proj, down_proj) are zero in every new
             row, and old outputs never read new heads or MLP units, so the residual stream is [h, 0]
             at every layer. Readers of the residual (q/k/v/gate/up, lm_head) get donor (or fill) values in
             U, A and B: U multiplies zeros at init, and filling it keeps the new residual coordinates
             trainable when the embeddings are tied. Every RMSNorm gain is multiplied by sqrt(d/d') and
             rms_norm_eps by d/d': for [x, 0], mean(x'^2) over d' is (d/d') mean(x^2) over d, so
             x' / sqrt(mean(x'^2) + eps d/d') * g sqrt(d/d') = x / sqrt(mean(x^2) + eps) * g. Exact.
frankenllama the published Llama-2-13B -> 22B script: U = 0; A = 0 (block-diagonal) or donor (triangular);
             B = donor, writers included; layer norms extended with donor values; final norm all ones;
             embedding and lm_head new columns zero. Not function-preserving: RMSNorm now averages over
             d' coordinates, and the donor writers fill the new coordinates.
zero-norm    the article's stated intent: as frankenllama, but every norm gain (final norm included)
             keeps its base values and is zero on the new coordinates. Still not preserving: the mean
             square is still taken over d'.
duplicate    integer-factor widening (HyperCloning): every grown axis is tiled k times, the copies of an
             input axis are divided by k (embed_tokens, a lookup, is not), eps unchanged; with tied
             embeddings the final norm gain is divided by the embed factor. Exact. `noise` adds +-eps
             pairs that sum to zero over the input copies, which keeps it exact and breaks the symmetry.

GQA: HF maps query head j to kv head j // g (g = n/m). With g' = n'/m', each old kv head k gets
c = ceil(g/g') consecutive kv slots holding copies of it, and old query head j = k g + r moves to slot
k c + r // g', place r % g' (q_proj rows and o_proj columns move together). g' = g is plain appending.
This needs m' >= m c; fewer kv heads than before has no exact layout and is refused.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from expand.config import Config
from expand.io import open_source, resolve, source_dtype, validate_source, write_metadata
from expand.io.atomic import atomic_dir, refuse_overlap
from expand.io.safetensors import TensorEntry, parse_size, write_sharded
from expand.container import Model
from expand.numerics import accumulation_dtype, scale_rounded
from expand.params import Params, TensorSpec, axis_sizes, tensor_specs
from expand.progress import progress_bar
from expand.provenance import Provenance

MODES = ("exact", "frankenllama", "zero-norm", "duplicate")
FILLS = ("random", "zeros")
RESIDUAL_WRITERS = ("embed_tokens.weight", "layers.self_attn.o_proj.weight", "layers.self_attn.o_proj.bias",
                    "layers.mlp.down_proj.weight", "layers.mlp.down_proj.bias")


@dataclass(frozen=True)
class AxisMap:
    """source[i]: the base index at new position i of one logical axis, -1 where the position is new."""

    source: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.source)

    def is_new(self) -> np.ndarray:
        return np.asarray(self.source) < 0


def appended(old: int, new: int) -> AxisMap:
    return AxisMap(tuple(range(old)) + (-1,) * (new - old))


def tiled(old: int, new: int) -> AxisMap:
    return AxisMap(tuple(i % old for i in range(new)))


def head_maps(n: int, m: int, n2: int, m2: int) -> tuple[AxisMap, AxisMap]:
    """(q_heads map, kv_heads map) placing the old heads exactly when the group ratio n/m changes."""
    if m2 < m:
        raise ValueError(f"num_key_value_heads {m} -> {m2}: fewer kv heads than before has no exact layout "
                         "(old query heads would have to share keys they never shared); keep or grow them")
    if n2 % m2:
        raise ValueError(f"num_attention_heads {n2} is not a multiple of num_key_value_heads {m2}")
    g, g2 = n // m, n2 // m2
    copies = -(-g // g2)
    if m2 < m * copies:
        raise ValueError(
            f"kv heads cannot host the old groups: {m} kv heads with {g} query heads each need "
            f"{m} x ceil({g}/{g2}) = {m * copies} kv heads at the new group size {g2}, but only {m2} are asked "
            f"for; choose num_key_value_heads >= {m * copies} or num_attention_heads = {g} x num_key_value_heads"
        )
    kv = [-1] * m2
    for k in range(m):
        for i in range(copies):
            kv[k * copies + i] = k
    q = [-1] * n2
    for j in range(n):
        k, r = divmod(j, g)
        q[(k * copies + r // g2) * g2 + r % g2] = j
    return AxisMap(tuple(q)), AxisMap(tuple(kv))


def _role(spec: TensorSpec) -> tuple[set[str], set[str]]:
    """(output axes, input axes) of a tensor; embed_tokens is a lookup that writes the residual."""
    if spec.name == "embed_tokens.weight":
        return {"vocab", "embed"}, set()
    return set(spec.hf_out), set(spec.hf_in)


def _take(array: jax.Array, axes: Sequence[str], maps: Mapping[str, AxisMap]) -> jax.Array:
    """Gather every mapped axis through its map (new positions read index 0; they are masked later)."""
    for position, axis in enumerate(axes):
        if axis in maps:
            array = jnp.take(array, jnp.asarray(np.maximum(maps[axis].source, 0)), axis=position)
    return array


def _crop(donor: jax.Array, shape: Sequence[int], name: str) -> jax.Array:
    if any(have < want for have, want in zip(donor.shape, shape)):
        raise ValueError(f"donor tensor {name} has shape {tuple(donor.shape)}, smaller than the target "
                         f"{tuple(shape)}: a donor must be at least as wide as the widened model")
    return donor[tuple(slice(0, s) for s in shape)]


def new_positions(axes: Sequence[str], names: set[str], maps: Mapping[str, AxisMap], shape) -> jax.Array:
    """Boolean array of `shape`: True where any of the `names` axes is at a new position."""
    out = jnp.zeros(shape, bool)
    for position, axis in enumerate(axes):
        if axis in names and axis in maps:
            view = [1] * len(shape)
            view[position] = shape[position]
            out = out | jnp.asarray(maps[axis].is_new()).reshape(view)
    return out


def _fill(base: jax.Array, shape, key: jax.Array, fill: str) -> jax.Array:
    """New values without a donor: zeros, or normal with the base tensor's standard deviation."""
    if fill == "zeros":
        return jnp.zeros(shape, base.dtype)
    std = jnp.std(base.astype(accumulation_dtype(base.dtype)))
    return (std * jax.random.normal(key, shape, accumulation_dtype(base.dtype))).astype(base.dtype)


def grow_tensor(spec: TensorSpec, base: jax.Array, new_values: jax.Array, maps: Mapping[str, AxisMap],
                mode: str, triangular: bool = False, norm_scale: float = 1.0, base_norm_fill: bool = False
                ) -> jax.Array:
    """One tensor (per-layer axes `spec.axes`, no layer axis) grown by `mode`'s block rules.

    new_values: donor (cropped to the target shape) or fill values, used wherever the mode puts new values.
    norm_scale: factor on the old coordinates of a norm gain (exact: sqrt(d/d')).
    base_norm_fill: norm gains without a donor fill their new coordinates with the mean old gain."""
    axes = spec.axes
    gathered = _take(base, axes, maps)
    shape = gathered.shape
    outputs, inputs = _role(spec)
    new_out = new_positions(axes, outputs, maps, shape)
    new_in = new_positions(axes, inputs, maps, shape)
    if spec.name.endswith("norm.weight"):
        if mode == "frankenllama" and spec.name == "norm.weight":
            return jnp.ones(shape, base.dtype)
        fresh = jnp.full(shape, jnp.mean(base.astype(accumulation_dtype(base.dtype))), base.dtype) if base_norm_fill else new_values
        fresh = jnp.zeros(shape, base.dtype) if mode == "zero-norm" else fresh
        old = scale_rounded(gathered, norm_scale)
        return jnp.where(new_out, fresh, old)
    zero = jnp.zeros(shape, base.dtype)
    if mode == "exact":
        if spec.name in RESIDUAL_WRITERS:
            return jnp.where(new_out | new_in, zero, gathered)
        return jnp.where(new_out | new_in, new_values, gathered)
    # frankenllama and zero-norm: [[M, 0], [A, B]], A = 0 unless triangular; new embedding columns zero
    if spec.name == "embed_tokens.weight":
        return jnp.where(new_out, zero, gathered)
    lower = jnp.where(new_in, new_values, new_values if triangular else zero)
    return jnp.where(new_out, lower, jnp.where(new_in, zero, gathered))


def duplicate_tensor(spec: TensorSpec, base: jax.Array, maps: Mapping[str, AxisMap], key: jax.Array,
                     noise: float, final_norm_factor: float) -> jax.Array:
    """Tile every grown axis; divide by the copy count of each grown input axis; add zero-sum noise
    over the input copies. `final_norm_factor` divides the final norm gain (tied embeddings)."""
    tiles = _take(base, spec.axes, maps)
    if spec.name == "norm.weight":
        return scale_rounded(tiles, 1.0 / final_norm_factor)
    _, inputs = _role(spec)
    grown = [(p, a) for p, a in enumerate(spec.axes) if a in inputs and a in maps]
    factor = math.prod(maps[a].size // (max(maps[a].source) + 1) for _, a in grown)
    out = tiles.astype(accumulation_dtype(tiles.dtype)) / factor
    if noise and grown:
        position, axis = grown[0]
        k = maps[axis].size // (max(maps[axis].source) + 1)
        eps = noise * jnp.std(out) * jax.random.normal(key, out.shape, out.dtype)
        split = eps.reshape(out.shape[:position] + (k, out.shape[position] // k) + out.shape[position + 1:])
        eps = (split - split.mean(axis=position, keepdims=True)).reshape(out.shape)
        out = out + eps
    return out.astype(base.dtype)


# ---- the plan: target sizes, maps, donor layers ------------------------------------------------------------


@dataclass(frozen=True)
class WidthPlan:
    config: Config          # the widened config
    maps: dict[str, AxisMap]
    mode: str
    fill: str
    triangular: bool
    noise: float
    donor_layers: tuple[int, ...] | None
    seed: int

    def to_json(self) -> dict:
        c = self.config
        return {"op": "widen", "mode": self.mode, "fill": self.fill, "triangular": self.triangular,
                "noise": self.noise, "seed": self.seed, "hidden_size": c.hidden_size,
                "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                "intermediate_size": c.intermediate_size,
                "donor_layers": list(self.donor_layers) if self.donor_layers else None,
                "maps": {axis: list(m.source) for axis, m in self.maps.items()}}


def _factor(old: int, new: int, what: str) -> int:
    if new % old:
        raise ValueError(f"duplicate mode tiles by an integer factor: {what} {old} -> {new} is not one")
    return new // old


def width_plan(config: Config, *, hidden_size=None, num_attention_heads=None, num_key_value_heads=None,
               intermediate_size=None, donor: Config | None = None, mode: str = "exact", fill: str = "random",
               donor_layers=None, triangular: bool = False, noise: float = 0.0, seed: int = 0) -> WidthPlan:
    """Check the request and work out the widened config and every axis map (no weights needed)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; choose one of {', '.join(FILLS)}")
    d, n, m, f = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    d2, n2, m2, f2 = hidden_size or d, num_attention_heads or n, num_key_value_heads or m, intermediate_size or f
    for what, old, new in (("hidden_size", d, d2), ("num_attention_heads", n, n2),
                           ("num_key_value_heads", m, m2), ("intermediate_size", f, f2)):
        if new < old:
            raise ValueError(f"{what} {old} -> {new}: widening cannot shrink; prune with depth surgery or "
                             "distill instead")
    if (d2, n2, m2, f2) == (d, n, m, f):
        raise ValueError("nothing to widen: every target size equals the model's")
    new_config = config.replace(hidden_size=d2, num_attention_heads=n2, num_key_value_heads=m2, intermediate_size=f2,
                                rms_norm_eps=config.rms_norm_eps * d / d2 if mode == "exact" else config.rms_norm_eps)
    if mode == "duplicate":
        kq, kkv = _factor(n, n2, "num_attention_heads"), _factor(m, m2, "num_key_value_heads")
        if kq != kkv:
            raise ValueError(f"duplicate mode tiles query and kv heads together: {n} -> {n2} is x{kq} but "
                             f"{m} -> {m2} is x{kkv}")
        _factor(d, d2, "hidden_size")
        _factor(f, f2, "intermediate_size")
        maps = {"embed": tiled(d, d2), "q_heads": tiled(n, n2), "kv_heads": tiled(m, m2), "mlp": tiled(f, f2)}
    else:
        q_map, kv_map = head_maps(n, m, n2, m2)
        maps = {"embed": appended(d, d2), "q_heads": q_map, "kv_heads": kv_map, "mlp": appended(f, f2)}
    maps = {axis: mp for axis, mp in maps.items() if mp.size != axis_sizes(config)[axis] or
            any(s != i for i, s in enumerate(mp.source))}
    layers = None
    if donor is not None:
        if mode == "duplicate":
            raise ValueError("duplicate mode takes no donor (it tiles the base)")
        layers = donor_layer_map(config.num_hidden_layers, donor.num_hidden_layers, donor_layers)
        check_donor(new_config, donor)
    elif donor_layers is not None:
        raise ValueError("donor_layers was given without a donor")
    return WidthPlan(new_config, maps, mode, fill, triangular, noise, layers, seed)


def donor_layer_map(layers: int, donor_layers_count: int, donor_layers) -> tuple[int, ...]:
    """Base layer l takes donor layer donor_layers[l]: the same l by default (equal depths only),
    'proportional' (floor(l * L_donor / L)), or an explicit list."""
    if donor_layers is None:
        if donor_layers_count != layers:
            raise ValueError(f"the donor has {donor_layers_count} layers and the base {layers}: pass "
                             "donor_layers='proportional' (CLI: --donor-layers proportional) or a list")
        return tuple(range(layers))
    if donor_layers == "proportional":
        return tuple(l * donor_layers_count // layers for l in range(layers))
    chosen = tuple(int(x) for x in donor_layers)
    if len(chosen) != layers or not all(0 <= x < donor_layers_count for x in chosen):
        raise ValueError(f"donor_layers must list {layers} donor layers, each in 0..{donor_layers_count - 1}")
    return chosen


def check_donor(target: Config, donor: Config) -> None:
    if donor.vocab_size != target.vocab_size:
        raise ValueError(f"the donor's vocab ({donor.vocab_size}) differs from the base's ({target.vocab_size}): "
                         "its embedding rows would mean other tokens")
    if donor.head_dim != target.head_dim:
        raise ValueError(f"the donor's head_dim {donor.head_dim} differs from the base's {target.head_dim}; "
                         "heads keep head_dim when widening")
    for what in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(donor, what) < getattr(target, what):
            raise ValueError(f"the donor is smaller than the target: {what} {getattr(donor, what)} < "
                             f"{getattr(target, what)}; pick a donor at least as wide")


# ---- applying a plan ------------------------------------------------------------------------------------------


def tensor_key(seed: int, name: str, layer: int | None) -> jax.Array:
    """The random key of one tensor (and layer): the same in memory and when streaming from disk."""
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
    return key if layer is None else jax.random.fold_in(key, layer)


def grow_one(plan: WidthPlan, spec: TensorSpec, base: jax.Array, donor: jax.Array | None, layer: int | None,
             base_config: Config) -> jax.Array:
    """Grow one per-layer tensor (no layer axis) of `spec` as `plan` says."""
    key = tensor_key(plan.seed, spec.name, layer)
    target_shape = tuple(axis_sizes(plan.config)[a] for a in spec.axes)
    if plan.mode == "duplicate":
        factor = plan.config.hidden_size // base_config.hidden_size if base_config.tie_word_embeddings else 1
        return duplicate_tensor(spec, base, plan.maps, key, plan.noise, factor)
    if donor is not None:
        values = _crop(donor, target_shape, spec.name).astype(base.dtype)
    else:
        values = _fill(base, target_shape, key, plan.fill)
    norm_scale = math.sqrt(base_config.hidden_size / plan.config.hidden_size) if plan.mode == "exact" else 1.0
    return grow_tensor(spec, base, values, plan.maps, plan.mode, plan.triangular, norm_scale,
                       base_norm_fill=donor is None)


def widen(config: Config, params: Params, *, hidden_size=None, num_attention_heads=None, num_key_value_heads=None,
          intermediate_size=None, donor: tuple[Config, Params] | None = None, mode: str = "exact",
          fill: str = "random", donor_layers=None, triangular: bool = False, noise: float = 0.0, seed: int = 0
          ) -> tuple[Config, Params]:
    """Widen a model (see the module docstring for the math of each mode). Returns (config, params).

    donor: (config, params) of a wider model of the same family; its values go where the mode puts new
        values, cropped to the target sizes (donor layer donor_layers[l] for base layer l).
    fill: without a donor, 'random' (normal with each base tensor's std, per layer) or 'zeros'.
    triangular: frankenllama/zero-norm only: new rows also read the old inputs (A from the donor).
    noise: duplicate only: relative std of the zero-sum noise over input copies."""
    plan = width_plan(config, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                      num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size,
                      donor=None if donor is None else donor[0], mode=mode, fill=fill, donor_layers=donor_layers,
                      triangular=triangular, noise=noise, seed=seed)
    return plan.config, apply_width(plan, config, params, None if donor is None else donor[1])


def widen_model(model: Model, donor: Model | None = None, **sizes_and_options) -> Model:
    """`widen` on a `Model`, recording the plan (sizes, mode, axis maps) in its provenance."""
    plan = width_plan(model.config, donor=None if donor is None else donor.config, **sizes_and_options)
    params = apply_width(plan, model.config, model.params, None if donor is None else donor.params)
    return Model(plan.config, params, model.source, model.lineage().with_operation(plan.to_json()))


def compiled_grower(plan: WidthPlan, base_config: Config) -> Callable[..., jax.Array]:
    """grow(spec, base, donor, layer): `grow_one` for this plan, compiled once per tensor spec (the arrays and
    the layer index are traced), so each tensor is one fused XLA computation. Op by op, the widening of
    experiments/bench_scale.py's 3.2B checkpoint held several float32 temporaries of the embedding at once
    (peak RSS 9.0 GB instead of 2.8 GB) and took 1.75x as long."""
    compiled: dict[str, Callable] = {}

    def grow(spec: TensorSpec, base: jax.Array, donor: jax.Array | None, layer: int | None) -> jax.Array:
        if spec.name not in compiled:
            compiled[spec.name] = jax.jit(functools.partial(grow_one, plan, spec, base_config=base_config))
        return compiled[spec.name](base, donor, layer)

    return grow


def apply_width(plan: WidthPlan, config: Config, params: Params, donor_params: Params | None) -> Params:
    grow = compiled_grower(plan, config)
    new: Params = {}
    for spec in tensor_specs(config):
        base = params[spec.name]
        if not spec.stacked:
            donor = None if donor_params is None else donor_params[spec.name]
            new[spec.name] = grow(spec, base, donor, None)
            continue
        layers = []
        for layer in range(config.num_hidden_layers):
            donor = None if donor_params is None else donor_params[spec.name][plan.donor_layers[layer]]
            layers.append(grow(spec, base[layer], donor, layer))
        new[spec.name] = jnp.stack(layers)
    return new


def widen_to_disk(model, out, *, donor=None, dtype=None, max_shard_size: str | int = "2GB",
                  overwrite: bool = False, **sizes_and_options) -> Path:
    """`widen` from checkpoint to checkpoint, one output tensor (one layer) at a time: each is read from
    the base (and donor), grown and written before the next is read. Same values as `widen` in memory."""
    path = resolve(model)
    inputs = [path, *([resolve(donor)] if donor is not None else [])]
    refuse_overlap(out, inputs)
    source, hf = open_source(path)
    config = Config.from_hf(hf)
    validate_source(config, source)
    donor_source = donor_config = None
    if donor is not None:
        donor_source, donor_hf = open_source(resolve(donor))
        donor_config = Config.from_hf(donor_hf)
        validate_source(donor_config, donor_source)
    plan = width_plan(config, donor=donor_config, **sizes_and_options)
    out_dtype = np.dtype(dtype) if dtype is not None else None
    grow = compiled_grower(plan, config)
    jobs = {}
    for spec in tensor_specs(config):
        for layer in (range(config.num_hidden_layers) if spec.stacked else [None]):
            jobs[spec.hf_name(layer)] = (spec, layer)

    def produce(entry: TensorEntry) -> np.ndarray:
        spec, layer = jobs[entry.name]
        base = jnp.asarray(spec.from_hf(source.read(spec.hf_name(layer)), config))
        donor_array = None
        if donor_source is not None:
            donor_layer = None if layer is None else plan.donor_layers[layer]
            donor_array = jnp.asarray(spec.from_hf(donor_source.read(spec.hf_name(donor_layer)), donor_config))
        grown = grow(spec, base, donor_array, layer)
        return spec.to_hf(np.asarray(grown), plan.config).astype(entry.dtype, copy=False)

    out_dtype = out_dtype or source_dtype(source)
    entries = [TensorEntry(name, spec.hf_shape(plan.config), out_dtype) for name, (spec, _) in jobs.items()]
    provenance = (Provenance.read(path) if path.is_dir() else None) or Provenance.identity(config, str(model))
    with atomic_dir(out, overwrite, inputs=inputs) as tmp:
        with progress_bar(f"widening into {Path(out).name}", total=len(entries)) as advance:
            write_sharded(tmp, entries, produce, parse_size(max_shard_size), on_tensor=lambda e: advance())
        write_metadata(tmp, plan.config, out_dtype, model, provenance.with_operation(plan.to_json()))
    return Path(out)
