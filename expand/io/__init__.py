"""Loading and saving: HF directories (safetensors, sharded or not), GGUF files, orbax directories, and
the embedded default model. I/O happens here and nowhere else; everything between is pure.

`load(path)` reads tensor by tensor: each param array is built with `jax.make_array_from_callback`, whose
callback reads (and for stacked tensors, stacks) only the block that one device shard holds, from that
block's byte ranges of a safetensors file (GGUF tensors are dequantized whole, then sliced), so no
checkpoint is ever held in RAM twice, sharded loads place every shard directly on its device, and the
devices of a mesh together read each byte about once.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from expand.config import Config, read_config_json
from expand.container import Model
from expand.distributed import several, to_host, write_on_writer
from expand.io.atomic import atomic_dir, refuse_existing, refuse_overlap
from expand.io.card import model_card
from expand.io.embedded import EMBEDDED, cache_dir, embedded_gguf, embedded_tokenizer_dir
from expand.io.gguf import GGUFSource
from expand.io.orbax import ORBAX_PARAMS, Placement, read_orbax, write_orbax
from expand.io.safetensors import (INDEX_FILE, SINGLE_FILE, CheckpointError, SafetensorsSource, TensorEntry,
                                   numpy_dtype, parse_size, write_sharded)
from expand.io.tokenizer import gguf_tokenizer
from expand.params import Params, TensorSpec, check_params, iter_hf_names, spec_by_name, tensor_specs
from expand.progress import progress_bar
from expand.provenance import Provenance

__all__ = [
    "Checkpoint", "CheckpointError", "load", "save", "resolve", "input_path", "load_tokenizer", "open_checkpoint",
    "open_source", "read_config", "refuse_existing", "refuse_overlap", "dtype_name", "source_dtype",
    "validate_source", "write_metadata",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")


def resolve(model: str | Path) -> Path:
    """A model argument -> a path: an HF directory, a .gguf file, an orbax directory, or an embedded name."""
    if str(model) in EMBEDDED:
        return embedded_gguf(EMBEDDED[str(model)])
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(
            f"no model at {model}: give an HF directory, a .gguf file, an orbax directory written by expand, "
            f"or one of the embedded models ({', '.join(EMBEDDED)})"
        )
    return path


def input_path(model: str | Path) -> Path:
    """What a model argument reads, without fetching anything: an embedded model's cache folder (its GGUF
    and tokenizer), else the path as given. For refusing outputs that would overwrite an input."""
    if str(model) in EMBEDDED:
        return cache_dir() / EMBEDDED[str(model)].name
    return Path(model)


def _kind(path: Path) -> str:
    if path.suffix == ".gguf":
        return "gguf"
    if not path.is_dir():
        raise CheckpointError(f"{path} is neither a model directory nor a .gguf file")
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} has no config.json: an HF model directory needs one (transformers' save_pretrained "
            "writes it)"
        )
    return "orbax" if (path / ORBAX_PARAMS).is_dir() else "hf"


def open_source(path: Path):
    """The tensor source (HF names and layout, read lazily) and HF config dict of a checkpoint, the config
    checked first (a ConfigError names the file), then every safetensors header."""
    if _kind(path) == "gguf":
        source = GGUFSource(path)
        hf_config = source.hf_config()
        Config.from_hf(hf_config, where=path)
        return source, hf_config
    hf_config = read_config_json(path / "config.json")
    Config.from_hf(hf_config, where=path / "config.json")
    return SafetensorsSource(path), hf_config


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint on disk: its path, config, lazily read HF-layout tensors (checked against the
    config) and provenance; `name` is how the user named it (a path or an embedded name)."""

    name: str
    path: Path
    config: Config
    source: object
    provenance: Provenance

    def read(self, spec: TensorSpec, layer: int | None) -> np.ndarray:
        """One tensor in expand's per-layer layout (a view of the stored array where the layout allows)."""
        return spec.from_hf(self.source.read(spec.hf_name(layer)), self.config)


def open_checkpoint(model: str | Path) -> Checkpoint:
    """Resolve a model argument and open it for reading tensor by tensor (HF safetensors or GGUF)."""
    path = resolve(model)
    if _kind(path) == "orbax":
        raise CheckpointError(f"{path} is an orbax checkpoint, which is read whole, not tensor by tensor: "
                              f"convert it first (expand convert {path} OUT)")
    source, hf_config = open_source(path)
    config = Config.from_hf(hf_config)
    validate_source(config, source)
    name = str(model) if str(model) in EMBEDDED else str(path)
    provenance = (Provenance.read(path) if path.is_dir() else None) or Provenance.identity(config, name)
    return Checkpoint(name, path, config, source, provenance)


def read_config(model: str | Path) -> Config:
    """The Config of a model, reading no weights (a directory holding only config.json is enough)."""
    path = resolve(model)
    if path.suffix == ".gguf":
        return Config.from_hf(GGUFSource(path).hf_config(), where=path)
    return Config.from_file(path)


def validate_source(config: Config, source) -> None:
    expected = {name: spec.hf_shape(config) for name, spec, _ in iter_hf_names(config)}
    present = source.names()
    problems = [f"missing {n}" for n in expected if n not in present]
    problems += [
        f"{n} has shape {source.shape(n)} in the file but config.json implies {shape}"
        for n, shape in expected.items()
        if n in present and source.shape(n) != shape
    ]
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    problems += [
        f"unexpected tensor {n}"
        for n in sorted(present - set(expected) - ignorable)
        if not n.endswith("rotary_emb.inv_freq")
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"the checkpoint does not match its config: {shown}")


def source_dtype(source) -> np.dtype:
    """The stored dtype of a checkpoint's weights (float32 for GGUF, which is dequantized)."""
    if not isinstance(source, SafetensorsSource):
        return np.dtype(np.float32)
    name = spec_by_name("embed_tokens.weight").hf_name()
    return numpy_dtype(source.dtype(name), f"{name} in {source.directory}")


def stored_weight_dtype(path: Path) -> np.dtype:
    """The dtype surgery writes by default for a checkpoint: its weights' stored dtype (safetensors), float32
    for GGUF (dequantized), else config.json's `dtype` / `torch_dtype` (a directory with only a config)."""
    if path.suffix != ".gguf" and any((path / f).exists() for f in (SINGLE_FILE, INDEX_FILE)):
        return source_dtype(SafetensorsSource(path))
    if path.suffix == ".gguf":
        return np.dtype(np.float32)
    d = read_config_json(path / "config.json")
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    return np.dtype(jnp.dtype(name))


def checkpoint_storage(path: Path) -> tuple[str, int]:
    """(how the weights are stored, in words; bytes of weight files) of a checkpoint path."""
    if path.suffix == ".gguf":
        counts = Counter(t.tensor_type.name for t in GGUFSource(path).reader.tensors)
        stored = ", ".join(f"{name} x{n}" for name, n in counts.most_common()) + " (dequantized on load)"
        return stored, path.stat().st_size
    files = [*path.glob("*.safetensors"), *path.glob(f"{ORBAX_PARAMS}/**/*")]
    size = sum(f.stat().st_size for f in files if f.is_file())
    d = read_config_json(path / "config.json")
    return str(d.get("dtype") or d.get("torch_dtype") or "unknown"), size


def _single_device(spec: TensorSpec, shape) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def read_shard(config: Config, source, spec: TensorSpec, index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
    """One device's block of a param (index: a slice per axis of `spec.full_axes`), in `dtype`, reading only
    that block of each layer's HF tensor from the source (`source.read_block`): the block's slices are mapped
    through the table to HF's axes (`TensorSpec.hf_index`), read, and transposed to our layout."""
    index = tuple(index) + (slice(None),) * (len(spec.full_axes) - len(index))
    shape = spec.hf_named_shape(config)

    def one(layer: int | None, block: tuple[slice, ...]) -> np.ndarray:
        named = source.read_block(spec.hf_name(layer), shape, spec.hf_index(block))
        return spec.from_hf_named(named).astype(dtype, copy=False)

    if not spec.stacked:
        return one(None, index)
    return np.stack([one(layer, index[1:]) for layer in range(config.num_hidden_layers)[index[0]]])


def params_from_source(config: Config, source, dtype=jnp.float32, placement: Placement | None = None,
                       description: str = "loading") -> Params:
    """Build every param array from an HF-layout tensor source (checked by `validate_source`), one tensor
    (or device shard) at a time: each device's shard is read from its own bytes of the file (`read_shard`)."""
    placement = placement or _single_device
    np_dtype = np.dtype(dtype)
    params: Params = {}
    specs = tensor_specs(config)
    with progress_bar(description, total=len(specs)) as advance:
        for spec in specs:
            shape = spec.shape(config)
            params[spec.name] = jax.make_array_from_callback(
                shape, placement(spec, shape), lambda index, spec=spec: read_shard(config, source, spec, index, np_dtype))
            advance()
    return params


def load(model: str | Path, dtype=jnp.float32, placement: Placement | None = None, nnx: bool = False):
    """Load an HF directory, a .gguf file, an orbax directory written by `save`, or an embedded model
    ('smollm2'). Returns a `Model`, which unpacks as `config, params`; with nnx=True the Flax NNX view of it
    (`expand.Llama`: params as `nnx.Param`s, for code written against NNX).

    dtype: the param dtype (float32 by default: the reference mode; bfloat16 for speed on accelerators).
    placement: spec, shape -> sharding for each param (see `expand.sharding`); one device by default.
    """
    path = resolve(model)
    if _kind(path) == "orbax":
        config = Config.from_file(path)
        params = read_orbax(path, config, dtype, placement or _single_device)
    else:
        checkpoint = open_checkpoint(model)
        config = checkpoint.config
        params = params_from_source(config, checkpoint.source, dtype, placement, f"loading {path.name}")
    source_name = str(model) if str(model) in EMBEDDED else str(path)
    if nnx:
        from expand.nnx_view import Llama

        return Llama(config, params)
    return Model(config, params, source_name, Provenance.read(path) if path.is_dir() else None)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def save(path: str | Path, config: Config, params: Params, tokenizer_from=None, *, format: str = "hf",
         overwrite: bool = False, provenance: Provenance | None = None, dtype=None,
         max_shard_size: str | int = "2GB", inputs=(), extra: Callable[[Path], None] | None = None) -> Path:
    """Write a model as an HF directory (sharded safetensors + index, config.json, generation_config.json,
    tokenizer files) or, with format='orbax', as an orbax checkpoint with the same metadata files.

    tokenizer_from: a model path / embedded name / tokenizer object whose tokenizer (and chat template)
    is saved alongside. The write goes to a temporary sibling and is renamed into place (`atomic_dir`); an
    existing `path` is replaced only with overwrite=True, and never when it is, lies inside or contains
    `tokenizer_from` or any of `inputs` (paths the caller read). extra(directory), if given, writes companion files (a history, a
    plot) into the same temporary directory, so the model and they appear together or not at all. With several processes (HF format only)
    every process takes part in gathering each tensor and process 0 writes (`distributed.write_on_writer`)."""
    if format not in ("hf", "orbax"):
        raise ValueError(f"format must be 'hf' or 'orbax', got {format!r}")
    if format == "orbax" and several():
        raise ValueError("several processes write HF checkpoints (gathered by process 0), not orbax; save with "
                         "format='hf', or from one process")
    source = tokenizer_from.source if isinstance(tokenizer_from, Model) else tokenizer_from
    inputs = [*inputs, *([input_path(source)] if isinstance(source, (str, Path)) else [])]
    refuse_overlap(path, inputs)
    check_params(config, params)
    dtype = np.dtype(dtype or params["embed_tokens.weight"].dtype)
    entries, tensor = hf_tensors(config, params, dtype)

    def write(produce) -> None:
        with atomic_dir(path, overwrite, inputs=inputs) as tmp:
            if format == "hf":
                _write_safetensors(tmp, entries, produce, parse_size(max_shard_size))
            else:
                write_orbax(tmp, {name: value.astype(dtype) for name, value in params.items()})
            write_metadata(tmp, config, dtype, tokenizer_from, provenance)
            if extra is not None:
                extra(tmp)

    write_on_writer(write, len(entries) if format == "hf" else 0, tensor)
    return Path(path)


def hf_tensors(config: Config, params: Params, dtype: np.dtype) -> tuple[list[TensorEntry], Callable[[int], np.ndarray]]:
    """The HF tensors of params, in HF's order: their entries, and i -> tensor i in HF layout as numpy in
    `dtype` (fetched with `to_host`: with several processes a collective, called by every process)."""
    specs = list(iter_hf_names(config))
    entries = [TensorEntry(hf, spec.hf_shape(config), dtype) for hf, spec, _ in specs]

    def tensor(i: int) -> np.ndarray:
        _, spec, layer = specs[i]
        array = params[spec.name] if layer is None else params[spec.name][layer]
        return spec.to_hf(to_host(array), config).astype(dtype)

    return entries, tensor


def _write_safetensors(directory: Path, entries: list[TensorEntry], produce: Callable[[int], np.ndarray],
                       max_shard_bytes: int) -> None:
    """write_sharded of entries, tensor i of them from produce(i) (asked for in order)."""
    position = {entry.name: i for i, entry in enumerate(entries)}
    with progress_bar(f"writing {directory.name.split('.tmp-')[0].lstrip('.')}", total=len(entries)) as advance:
        write_sharded(directory, entries, lambda entry: produce(position[entry.name]), max_shard_bytes,
                      on_tensor=lambda e: advance())


def write_metadata(directory: Path, config: Config, dtype, tokenizer_from=None,
                   provenance: Provenance | None = None, chat_template: str | None = None) -> None:
    """Everything of an output directory but the weights: config.json, generation_config.json, the
    tokenizer (and chat template; `chat_template` replaces the source's), expand.json (the provenance) and
    README.md (the model card)."""
    (directory / "config.json").write_text(json.dumps(config.to_hf(dtype_name(dtype)), indent=2))
    generation = {k: v for k, v in config.to_hf().items()
                  if k in ("bos_token_id", "eos_token_id", "pad_token_id") and v is not None}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_from is not None:
        save_tokenizer(tokenizer_from, directory)
    if chat_template is not None:
        set_chat_template(directory, chat_template)
    if provenance is not None:
        provenance.write(directory)
    has_template = (directory / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (directory / "tokenizer_config.json").read_text() if (directory / "tokenizer_config.json").exists() else "{}")
    name = directory.name.split(".tmp-")[0].lstrip(".")
    (directory / "README.md").write_text(model_card(name, config, dtype_name(dtype), provenance, has_template))


# ---- tokenizers --------------------------------------------------------------------------------------


def load_tokenizer(model):
    """The transformers tokenizer of a model path, embedded name, or `Model` (by its source)."""
    from transformers import AutoTokenizer

    if isinstance(model, Model):
        model = model.source
    if model is None:
        raise ValueError("this model has no source to take a tokenizer from; pass tokenizer_from explicitly")
    if str(model) in EMBEDDED:
        return AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir(EMBEDDED[str(model)])))
    path = resolve(model)
    if path.suffix == ".gguf":
        return gguf_tokenizer(path)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})")
    return AutoTokenizer.from_pretrained(str(path))


def save_tokenizer(tokenizer_from, directory: Path) -> None:
    """Tokenizer files of a directory are copied as they are; any other source is rebuilt and saved."""
    source = tokenizer_from.source if isinstance(tokenizer_from, Model) else tokenizer_from
    if hasattr(source, "save_pretrained"):
        source.save_pretrained(str(directory))
        return
    path = None if str(source) in EMBEDDED else resolve(source)
    if path is not None and path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).exists():
                shutil.copy2(path / name, directory / name)
        return
    load_tokenizer(source).save_pretrained(str(directory))


def set_chat_template(directory: Path, template: str) -> None:
    """Make `template` the chat template of the tokenizer saved in `directory` (chat_template.jinja, which
    transformers reads before tokenizer_config.json's key, which is removed)."""
    config_path = directory / "tokenizer_config.json"
    if config_path.exists():
        tokenizer_config = json.loads(config_path.read_text())
        if tokenizer_config.pop("chat_template", None) is not None:
            config_path.write_text(json.dumps(tokenizer_config, indent=2))
    (directory / "chat_template.json").unlink(missing_ok=True)
    (directory / "chat_template.jinja").write_text(template)
