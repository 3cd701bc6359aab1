"""The param layout: one table of names and logical axes that everything else reads.

Params are a flat dict `{name: array}`. Names are the HF tensor names without the `model.` prefix and
without the layer index: `model.layers.7.self_attn.q_proj.weight` is row 7 of the stacked
`layers.self_attn.q_proj.weight`. (Keeping HF's `.weight`/`.bias` suffixes lets biases sit beside their
weights and lets mergekit-style filters match the names users already write.)

Each row of `TABLE` names the logical axes of our layout and of HF's `(rows=outputs, columns=inputs)`
layout, and the tensor's role in the residual stream. From that one description follow: the HF conversion
(reshape, then transpose by axis name), shape validation, parameter counts, sharding rules (by logical
axis), which axes a tensor reads and writes (width growth), and which tensors write the residual stream
(identity blocks and gates scale them, exact widening zeroes their new rows).

Roles:
    writes     adds to the residual stream: embed_tokens (the stream starts as its row), o_proj and
               down_proj (and their biases)
    reads      reads the (normed) residual stream: q/k/v, gate/up (and their biases), lm_head
    norm       an RMSNorm gain over the residual stream

Logical axes and their sizes:
    vocab      vocab_size
    embed      hidden_size (the residual stream, d)
    q_heads    num_attention_heads (n)
    kv_heads   num_key_value_heads (m)
    head_dim   head_dim
    mlp        intermediate_size
    layers     num_hidden_layers (stacked tensors only)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from expand.config import Config

Params = dict[str, jax.Array]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor. `axes` is our per-layer layout; `hf_out`/`hf_in` are HF's rows and columns, each a
    tuple of logical axes in memory order (HF stores q_proj as (q_heads*head_dim, embed))."""

    name: str
    axes: tuple[str, ...]
    hf_out: tuple[str, ...]
    hf_in: tuple[str, ...]
    stacked: bool
    role: str
    present: Callable[[Config], bool] = lambda c: True

    @property
    def outputs(self) -> tuple[str, ...]:
        """The axes this tensor produces. HF's rows, except for the embedding: a lookup indexed by token
        (its rows) whose output is a residual-stream row (its columns)."""
        return self.hf_in if self.is_lookup else self.hf_out

    @property
    def inputs(self) -> tuple[str, ...]:
        """The axes this tensor consumes (empty for norm gains and biases)."""
        return self.hf_out if self.is_lookup else self.hf_in

    @property
    def is_lookup(self) -> bool:
        return self.name == "embed_tokens.weight"

    @property
    def full_axes(self) -> tuple[str, ...]:
        """Axes of the stored array, with the leading `layers` axis for stacked tensors."""
        return ("layers",) + self.axes if self.stacked else self.axes

    def hf_name(self, layer: int | None = None) -> str:
        if not self.stacked:
            return self.name if self.name == "lm_head.weight" else f"model.{self.name}"
        return "model." + self.name.replace("layers.", f"layers.{layer}.", 1)

    def shape(self, config: Config, num_layers: int | None = None) -> tuple[int, ...]:
        sizes = axis_sizes(config, num_layers)
        return tuple(sizes[a] for a in self.full_axes)

    def hf_shape(self, config: Config) -> tuple[int, ...]:
        sizes = axis_sizes(config)
        rows = math.prod(sizes[a] for a in self.hf_out)
        return (rows, math.prod(sizes[a] for a in self.hf_in)) if self.hf_in else (rows,)

    @property
    def hf_axes(self) -> tuple[str, ...]:
        """HF's memory order of the logical axes: rows then columns (q_proj: q_heads, head_dim, embed)."""
        return self.hf_out + self.hf_in

    def hf_named_shape(self, config: Config) -> tuple[int, ...]:
        """The HF tensor (one layer) reshaped to one dimension per logical axis, in HF's memory order."""
        sizes = axis_sizes(config)
        return tuple(sizes[a] for a in self.hf_axes)

    def hf_index(self, index: tuple[slice, ...]) -> tuple[slice, ...]:
        """A block of one layer in our layout (a slice per axis of `axes`, e.g. one device's shard) -> the
        same block of the HF tensor viewed as `hf_named_shape`: the slice of each logical axis, reordered to
        HF's memory order. Reading that block of the file and `from_hf_named` gives the block."""
        by_axis = dict(zip(self.axes, index))
        return tuple(by_axis.get(a, slice(None)) for a in self.hf_axes)

    def from_hf_named(self, named: np.ndarray) -> np.ndarray:
        """An array (or block) in HF's named axes -> our per-layer layout (a transpose by name)."""
        return named.transpose([self.hf_axes.index(a) for a in self.axes])

    def from_hf(self, array: np.ndarray, config: Config) -> np.ndarray:
        """HF layout (one layer) -> our per-layer layout: reshape to named axes, transpose by name."""
        return self.from_hf_named(array.reshape(self.hf_named_shape(config)))

    def to_hf(self, array: np.ndarray, config: Config) -> np.ndarray:
        """Our per-layer layout -> HF layout (one layer)."""
        return array.transpose([self.axes.index(a) for a in self.hf_axes]).reshape(self.hf_shape(config))


def _row(name, axes, role, hf_out, hf_in=(), present=lambda c: True) -> TensorSpec:
    return TensorSpec(name, axes, hf_out, hf_in, name.startswith("layers."), role, present)


_attn_bias = lambda c: c.attention_bias  # noqa: E731
_mlp_bias = lambda c: c.mlp_bias  # noqa: E731

WRITES, READS, NORM = "writes", "reads", "norm"

TABLE: tuple[TensorSpec, ...] = (
    _row("embed_tokens.weight", ("vocab", "embed"), WRITES, ("vocab",), ("embed",)),
    _row("layers.input_layernorm.weight", ("embed",), NORM, ("embed",)),
    _row("layers.self_attn.q_proj.weight", ("embed", "q_heads", "head_dim"), READS, ("q_heads", "head_dim"), ("embed",)),
    _row("layers.self_attn.q_proj.bias", ("q_heads", "head_dim"), READS, ("q_heads", "head_dim"), (), _attn_bias),
    _row("layers.self_attn.k_proj.weight", ("embed", "kv_heads", "head_dim"), READS, ("kv_heads", "head_dim"), ("embed",)),
    _row("layers.self_attn.k_proj.bias", ("kv_heads", "head_dim"), READS, ("kv_heads", "head_dim"), (), _attn_bias),
    _row("layers.self_attn.v_proj.weight", ("embed", "kv_heads", "head_dim"), READS, ("kv_heads", "head_dim"), ("embed",)),
    _row("layers.self_attn.v_proj.bias", ("kv_heads", "head_dim"), READS, ("kv_heads", "head_dim"), (), _attn_bias),
    _row("layers.self_attn.o_proj.weight", ("q_heads", "head_dim", "embed"), WRITES, ("embed",), ("q_heads", "head_dim")),
    _row("layers.self_attn.o_proj.bias", ("embed",), WRITES, ("embed",), (), _attn_bias),
    _row("layers.post_attention_layernorm.weight", ("embed",), NORM, ("embed",)),
    _row("layers.mlp.gate_proj.weight", ("embed", "mlp"), READS, ("mlp",), ("embed",)),
    _row("layers.mlp.gate_proj.bias", ("mlp",), READS, ("mlp",), (), _mlp_bias),
    _row("layers.mlp.up_proj.weight", ("embed", "mlp"), READS, ("mlp",), ("embed",)),
    _row("layers.mlp.up_proj.bias", ("mlp",), READS, ("mlp",), (), _mlp_bias),
    _row("layers.mlp.down_proj.weight", ("mlp", "embed"), WRITES, ("embed",), ("mlp",)),
    _row("layers.mlp.down_proj.bias", ("embed",), WRITES, ("embed",), (), _mlp_bias),
    _row("norm.weight", ("embed",), NORM, ("embed",)),
    _row("lm_head.weight", ("embed", "vocab"), READS, ("vocab",), ("embed",), lambda c: not c.tie_word_embeddings),
)

# The layer tensors that write into the residual stream from a block's two branches: an identity block
# scales them by 0, a residual gate multiplies them.
BRANCH_OUTPUTS = tuple(spec.name for spec in TABLE if spec.stacked and spec.role == WRITES)


def axis_sizes(config: Config, num_layers: int | None = None) -> dict[str, int]:
    return {
        "vocab": config.vocab_size,
        "embed": config.hidden_size,
        "q_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "mlp": config.intermediate_size,
        "layers": config.num_hidden_layers if num_layers is None else num_layers,
    }


def tensor_specs(config: Config) -> list[TensorSpec]:
    """The rows of TABLE that exist for this config (biases and untied lm_head are optional)."""
    return [spec for spec in TABLE if spec.present(config)]


def spec_by_name(name: str) -> TensorSpec:
    for spec in TABLE:
        if spec.name == name:
            return spec
    raise KeyError(f"no tensor named {name!r} in the param table")


def iter_hf_names(config: Config) -> Iterator[tuple[str, TensorSpec, int | None]]:
    """(hf_name, spec, layer) for every HF tensor of the config, in HF's natural order."""
    for spec in tensor_specs(config):
        if not spec.stacked:
            yield spec.hf_name(), spec, None
    for layer in range(config.num_hidden_layers):
        for spec in tensor_specs(config):
            if spec.stacked:
                yield spec.hf_name(layer), spec, layer


def param_shapes(config: Config, num_layers: int | None = None) -> dict[str, tuple[int, ...]]:
    return {spec.name: spec.shape(config, num_layers) for spec in tensor_specs(config)}


def param_count(config: Config, layer_ids=None) -> int:
    """Exact number of parameters; with `layer_ids`, of the model whose slots are those layers
    (duplicated slots counted once per slot, as a materialized copy would store them)."""
    num_layers = config.num_hidden_layers if layer_ids is None else len(layer_ids)
    return sum(math.prod(shape) for shape in param_shapes(config, num_layers).values())


def abstract_params(config: Config, dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes only: what `jax.eval_shape` needs, no memory."""
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, shape in param_shapes(config).items()}


def check_params(config: Config, params: Params) -> None:
    """Raise a ValueError naming every tensor whose presence or shape disagrees with the config."""
    expected = param_shapes(config)
    problems = [f"missing {n} (config expects {s})" for n, s in expected.items() if n not in params]
    problems += [f"unexpected {n}" for n in params if n not in expected]
    problems += [
        f"{n} has shape {tuple(params[n].shape)}, config expects {s}"
        for n, s in expected.items()
        if n in params and tuple(params[n].shape) != s
    ]
    if problems:
        raise ValueError("params do not match the config: " + "; ".join(problems))


def nonfinite_tensors(params: Params) -> list[str]:
    """Names of the tensors holding a NaN or inf (one reduction per tensor, on its devices)."""
    return [name for name, value in params.items() if not bool(jnp.isfinite(value).all())]


def init_params(config: Config, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random params (normal(0, std) matrices, unit norm gains, zero biases), for tests and benchmarks."""
    shapes = param_shapes(config)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    params = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            params[name] = jnp.ones(shape, dtype)
        elif name.endswith(".bias"):
            params[name] = jnp.zeros(shape, dtype)
        else:
            params[name] = (std * jax.random.normal(keys[name], shape, jnp.float32)).astype(dtype)
    return params


def nest(params: Params) -> dict:
    """Flat dotted names -> nested dicts (for orbax and NNX, which address params by path)."""
    tree: dict = {}
    for name, value in params.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> Params:
    """Inverse of `nest`."""
    flat: Params = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
