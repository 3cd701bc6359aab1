"""expand: grow, prune and re-wire Llama-family language models in JAX, and measure what each change does
to the function."""

from expand.config import Config, ConfigError, RopeScaling
from expand.io import CheckpointError, load, load_tokenizer, read_config, save
from expand.model import Llama, Model, forward, generate
from expand.params import param_count
from expand.provenance import Provenance

__all__ = [
    "CheckpointError", "Config", "ConfigError", "Llama", "Model", "Provenance", "RopeScaling", "forward",
    "generate", "load", "load_tokenizer", "param_count", "read_config", "save",
]
