"""expand: grow, prune and re-wire Llama-family language models in JAX, and measure what each change does
to the function."""

from expand.ablate import ablate
from expand.check import check
from expand.config import Config, ConfigError, RopeScaling
from expand.container import Model
from expand.generate import generate
from expand.heal import HealOptions, heal
from expand.io import CheckpointError, load, load_tokenizer, read_config, save
from expand.model import forward
from expand.params import param_count
from expand.provenance import Provenance
from expand.surgery.grow import (apply_depth, depth_model, depth_to_disk, grow_to_disk, widen, widen_model,
                                 widen_to_disk)
from expand.surgery.layerspec import parse_layer_spec
from expand.surgery.plan import LayerPlan, llama_pro_plan, plan_from_layer_spec, with_identity, with_slot_scale
from expand.surgery.recipe import plan_from_recipe
from expand.text import shipped_text, token_batch

__all__ = [
    "CheckpointError", "Config", "ConfigError", "HealOptions", "LayerPlan", "Llama", "Model", "Provenance",
    "RopeScaling", "ablate", "apply_depth", "check", "depth_model", "depth_to_disk", "forward", "generate", "heal",
    "llama_pro_plan", "load", "load_tokenizer", "param_count", "parse_layer_spec", "plan_from_layer_spec",
    "plan_from_recipe", "read_config", "save", "widen", "widen_model", "widen_to_disk", "grow_to_disk",
    "shipped_text", "token_batch", "with_identity", "with_slot_scale",
]


def __getattr__(name: str):
    """`Llama` (expand.nnx_view) is imported on first use: it imports flax.nnx (about 0.3 s), and every CLI
    verb imports this package."""
    if name != "Llama":
        raise AttributeError(f"module 'expand' has no attribute {name!r}")
    from expand.nnx_view import Llama

    return Llama


def __dir__() -> list[str]:
    """The module's names, the lazily imported `Llama` included."""
    return sorted(set(globals()) | {"Llama"})
