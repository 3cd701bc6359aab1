"""The architecture of a Llama-family model: a frozen dataclass that reads and writes HF `config.json`.

Field names follow transformers' `LlamaConfig`. `Config.from_hf` accepts the transformers 4.x spelling
(`rope_theta` + `rope_scaling`) and the 5.x spelling (`rope_parameters`), and refuses any field whose value
would make transformers compute something this model does not (a different activation, a sliding window,
an unsupported RoPE type, quantized weights), naming the field and what to do about it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class ConfigError(ValueError):
    """A config.json this model cannot implement faithfully."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `linear` divides every frequency by `factor`; `llama3` (Llama 3.1) divides
    only the low frequencies, with a smooth ramp between `low_freq_factor` and `high_freq_factor`."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def to_hf(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Config:
    """Hashable, so it can be a static argument of `jax.jit`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: grouped-query attention needs every kv head "
                "to serve the same number of query heads"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str | Path | None = None) -> Config:
        """Read a transformers config dict (4.x or 5.x spelling); refuse what the model does not implement,
        and a missing or malformed required field (ConfigError naming it, and the file `where` it came from)."""
        try:
            return cls._from_hf(d)
        except ConfigError as e:
            if where is None:
                raise
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def _from_hf(cls, d: dict[str, Any]) -> Config:
        if not isinstance(d, dict):
            raise ConfigError(f"a config is a JSON object, not a {type(d).__name__}")
        model_type = _architecture(d)
        _refuse_unsupported(d)
        _refuse_unknown_settings(d, model_type)
        missing = [name for name in REQUIRED_FIELDS if d.get(name) is None]
        if missing:
            raise ConfigError(f"the config has no {', no '.join(missing)}; a Llama config.json needs "
                              f"{', '.join(REQUIRED_FIELDS)} (transformers' save_pretrained writes them)")
        heads = _field(d, "num_attention_heads", int)
        head_dim = _field(d, "head_dim", int, None) or _field(d, "hidden_size", int) // heads
        theta, scaling = _rope(d)
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=_field(d, "vocab_size", int),
            hidden_size=_field(d, "hidden_size", int),
            intermediate_size=_field(d, "intermediate_size", int),
            num_hidden_layers=_field(d, "num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=_field(d, "num_key_value_heads", int, None) or heads,
            head_dim=head_dim,
            rms_norm_eps=_field(d, "rms_norm_eps", float, 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_field(d, "max_position_embeddings", int, 2048),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
            model_type=model_type,
        )

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """A config.json dict that transformers 5.x reads, with the legacy 4.x rope keys beside it."""
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {**self.rope_scaling.to_hf(), "rope_theta": self.rope_theta}
        architecture = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.model_type]
        d: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_parameters,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else self.rope_scaling.to_hf(),
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if self.model_type == "mistral":
            d["sliding_window"] = None
        if dtype is not None:
            d["dtype"] = dtype
            d["torch_dtype"] = dtype
        return d

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        """The Config of a config.json (or of the model directory holding it); every ConfigError names the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_hf(read_config_json(path), where=path)


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The dict of a config.json; a missing file is FileNotFoundError, invalid JSON or anything but an object
    a ConfigError naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: an HF model directory needs a config.json "
            "(save one with transformers' save_pretrained, or pass a .gguf file)"
        )
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint, or write it "
                          "again with transformers' save_pretrained") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} holds a JSON {type(d).__name__}, not an object; restore it from the original "
                          "checkpoint")
    return d


_REQUIRED = object()


def _field(d: dict[str, Any], name: str, kind: type, default: Any = _REQUIRED) -> Any:
    """d[name] as an int or a float; `default` where it is absent or null (ConfigError if there is none)."""
    value = d.get(name)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"the config has no {name}")
        return default
    try:
        if isinstance(value, bool) or (kind is int and float(value) != int(value)):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name}={value!r} is not {'an integer' if kind is int else 'a number'}") from None


def _architecture(d: dict[str, Any]) -> str:
    architectures = d.get("architectures") or []
    for arch in architectures:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    if not architectures and d.get("model_type") in SUPPORTED_ARCHITECTURES.values():
        return d["model_type"]
    found = ", ".join(architectures) or f"model_type={d.get('model_type')!r}"
    raise ConfigError(
        f"unknown architecture {found}: expand implements {', '.join(SUPPORTED_ARCHITECTURES)} "
        "(Mistral without a sliding window); convert other families elsewhere first"
    )


def _refuse_unsupported(d: dict[str, Any]) -> None:
    """Fields whose non-default values change the function in ways this model does not implement."""
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not implemented (only 'silu', the SwiGLU of Llama)")
    if d.get("sliding_window") is not None and d.get("use_sliding_window", True):
        raise ConfigError(
            f"sliding_window={d['sliding_window']} is not implemented: expand computes full causal attention. "
            "Set sliding_window to null in config.json only if your prompts never exceed it"
        )
    if float(d.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise ConfigError(f"attention_dropout={d['attention_dropout']} is not implemented; set it to 0.0")
    if d.get("quantization_config"):
        method = d["quantization_config"].get("quant_method", "?")
        raise ConfigError(
            f"quantization_config (quant_method={method!r}) is not supported: expand reads float weights. "
            "Dequantize the checkpoint first, or load the GGUF file directly"
        )
    if d.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ConfigError(f"partial_rotary_factor={d['partial_rotary_factor']} is not implemented (only 1.0)")


# Fields of transformers' config classes that expand reads (above) or that do not change the function of a
# forward pass (bookkeeping, training-time and output options; pretraining_tp only splits matmuls).
HANDLED = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "attention_bias", "mlp_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "model_type", "architectures", "hidden_act", "attention_dropout", "sliding_window",
    "use_sliding_window", "partial_rotary_factor", "quantization_config",
}
NO_EFFECT = {
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "initializer_range", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "pretraining_tp", "tokenizer_class",
}


@functools.cache
def transformers_defaults(model_type: str) -> dict[str, Any]:
    """Every field of transformers' config class for the architecture, with its default value."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[model_type]
    return cls().to_dict()


def unhandled_settings(d: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """Penzai's rule: the fields of `d` that transformers' config class knows (`defaults`), set to a value
    other than the default, that expand neither reads nor knows to be without effect. Such a field changes
    what transformers computes in a way expand does not. (Fields transformers does not know are ignored by
    transformers too.)"""
    return [key for key, value in d.items()
            if key in defaults and key not in HANDLED | NO_EFFECT and value != defaults[key]]


def _refuse_unknown_settings(d: dict[str, Any], model_type: str) -> None:
    """Refuse `unhandled_settings` by name instead of computing another function. transformers (seconds to
    import, and a few hundred MB) is imported only when config.json has a field outside HANDLED | NO_EFFECT:
    a config written by transformers for these architectures has none."""
    if not set(d) - HANDLED - NO_EFFECT:
        return
    defaults = transformers_defaults(model_type)
    unknown = unhandled_settings(d, defaults)
    if unknown:
        shown = ", ".join(f"{key}={d[key]!r} (default {defaults[key]!r})" for key in unknown)
        raise ConfigError(f"config.json sets {shown}, which transformers' {model_type} model reads and expand "
                          "does not implement; expand would compute another function. If the field has no "
                          "effect on the forward pass, remove it from config.json")


def _rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either spelling: 5.x `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    source = params if params.get("rope_type", "default") != "default" else scaling
    rope_type = source.get("rope_type", source.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope_scaling type {rope_type!r} is not implemented (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        return float(theta), RopeScaling("linear", _field(source, "factor", float))
    return float(theta), RopeScaling(
        "llama3",
        _field(source, "factor", float),
        _field(source, "low_freq_factor", float),
        _field(source, "high_freq_factor", float),
        _field(source, "original_max_position_embeddings", int),
    )
