"""The Flax NNX view of a model: `expand.load(path, nnx=True)` returns a `Llama` whose params are
`nnx.Param`s at paths mirroring Hugging Face's module tree, for code written against NNX (`nnx.state`,
`nnx.Optimizer`, NNX transforms). Calling it runs the one functional `expand.forward`."""

from __future__ import annotations

from flax import nnx

from expand.config import Config
from expand.model import forward
from expand.params import Params, flatten, nest


class _Node(nnx.Module):
    """A namespace of params addressed by path, mirroring HF's module tree (model.layers.self_attn...)."""

    def __init__(self, tree: dict):
        for key, value in tree.items():
            setattr(self, key, _Node(value) if isinstance(value, dict) else nnx.Param(value))


class Llama(nnx.Module):
    """Flax NNX view of a model: its params are `nnx.Param`s at HF-mirroring paths
    (`model.layers.self_attn.q_proj.weight` etc., stacked over layers), so `nnx.state`, `nnx.Optimizer`
    and NNX transforms work on it. Calling it runs the one functional `forward`."""

    def __init__(self, config: Config, params: Params):
        self.config = config
        self.model = _Node(nest({n: params[n] for n in params}))

    def params(self) -> Params:
        """The flat param dict (the layout of `expand.params`)."""
        return flatten(nnx.to_pure_dict(nnx.state(self.model, nnx.Param)))

    def __call__(self, tokens, **kwargs):
        return forward(self.params(), tokens, self.config, **kwargs)


