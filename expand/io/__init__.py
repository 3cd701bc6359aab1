"""Loading and saving: HF directories (safetensors, sharded or not), GGUF files, orbax directories, and
the embedded default model. I/O happens here and nowhere else; everything between is pure.

`load(path)` reads tensor by tensor: each param array is built with `jax.make_array_from_callback`, whose
callback reads (and for stacked tensors, stacks) only the layers that one device shard holds, so no
checkpoint is ever held in RAM twice and sharded loads place every shard directly on its device.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from expand.config import Config
from expand.io.atomic import atomic_dir, refuse_existing, refuse_same_path
from expand.io.embedded import EMBEDDED, embedded_gguf, embedded_tokenizer_dir
from expand.io.gguf import GGUFSource
from expand.io.safetensors import (CODE_DTYPES, INDEX_FILE, SINGLE_FILE, CheckpointError, SafetensorsSource,
                                   TensorEntry, parse_size, write_sharded)
from expand.io.tokenizer import gguf_tokenizer
from expand.container import Model
from expand.params import (Params, TensorSpec, check_params, flatten, iter_hf_names, nest, spec_by_name,
                            tensor_specs)
from expand.progress import progress_bar
from expand.provenance import Provenance

__all__ = [
    "CheckpointError", "load", "save", "resolve", "load_tokenizer", "open_source", "read_config",
    "refuse_existing", "refuse_same_path", "dtype_name", "source_dtype", "validate_source", "write_metadata",
]

ORBAX_PARAMS = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")

Placement = Callable[[TensorSpec, tuple[int, ...]], jax.sharding.Sharding]


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
    """The tensor source (HF names and layout, read lazily) and HF config dict of a checkpoint."""
    if _kind(path) == "gguf":
        source = GGUFSource(path)
        return source, source.hf_config()
    return SafetensorsSource(path), json.loads((path / "config.json").read_text())


def read_config(model: str | Path) -> Config:
    """The Config of a model, reading no weights (a directory holding only config.json is enough)."""
    path = resolve(model)
    if path.suffix == ".gguf":
        return Config.from_hf(GGUFSource(path).hf_config())
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
    return CODE_DTYPES[source.dtype(spec_by_name("embed_tokens.weight").hf_name())]


def stored_weight_dtype(path: Path) -> np.dtype:
    """The dtype surgery writes by default for a checkpoint: its weights' stored dtype (safetensors), float32
    for GGUF (dequantized), else config.json's `dtype` / `torch_dtype` (a directory with only a config)."""
    if path.suffix != ".gguf" and any((path / f).exists() for f in (SINGLE_FILE, INDEX_FILE)):
        return source_dtype(SafetensorsSource(path))
    if path.suffix == ".gguf":
        return np.dtype(np.float32)
    d = json.loads((path / "config.json").read_text())
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
    d = json.loads((path / "config.json").read_text())
    return str(d.get("dtype") or d.get("torch_dtype") or "unknown"), size


def _single_device(spec: TensorSpec, shape) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def params_from_source(config: Config, source, dtype=jnp.float32, placement: Placement | None = None,
                       description: str = "loading") -> Params:
    """Build every param array from an HF-layout tensor source, one tensor (or device shard) at a time."""
    validate_source(config, source)
    placement = placement or _single_device
    np_dtype = np.dtype(dtype)
    params: Params = {}
    specs = tensor_specs(config)
    with progress_bar(description, total=len(specs)) as advance:
        for spec in specs:
            shape = spec.shape(config)

            def read(index, spec=spec):
                if not spec.stacked:
                    return spec.from_hf(source.read(spec.hf_name()), config).astype(np_dtype)[index]
                layers = range(config.num_hidden_layers)[index[0]]
                block = np.stack([spec.from_hf(source.read(spec.hf_name(i)), config).astype(np_dtype)
                                  for i in layers])
                return block[(slice(None),) + tuple(index[1:])]

            params[spec.name] = jax.make_array_from_callback(shape, placement(spec, shape), read)
            advance()
    return params


def load(model: str | Path, dtype=jnp.float32, placement: Placement | None = None) -> Model:
    """Load an HF directory, a .gguf file, an orbax directory written by `save`, or an embedded model
    ('smollm2'). Returns a `Model`, which unpacks as `config, params`.

    dtype: the param dtype (float32 by default: the reference mode; bfloat16 for speed on accelerators).
    placement: spec, shape -> sharding for each param (see `expand.sharding`); one device by default.
    """
    path = resolve(model)
    kind = _kind(path)
    if kind == "orbax":
        config = Config.from_file(path)
        params = _read_orbax(path, config, dtype, placement or _single_device)
    else:
        source, hf_config = open_source(path)
        config = Config.from_hf(hf_config)
        params = params_from_source(config, source, dtype, placement, f"loading {path.name}")
    source_name = str(model) if str(model) in EMBEDDED else str(path)
    return Model(config, params, source_name, Provenance.read(path) if path.is_dir() else None)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def save(path: str | Path, config: Config, params: Params, tokenizer_from=None, *, format: str = "hf",
         overwrite: bool = False, provenance: Provenance | None = None, dtype=None,
         max_shard_size: str | int = "2GB") -> Path:
    """Write a model as an HF directory (sharded safetensors + index, config.json, generation_config.json,
    tokenizer files) or, with format='orbax', as an orbax checkpoint with the same metadata files.

    tokenizer_from: a model path / embedded name / tokenizer object whose tokenizer (and chat template)
    is saved alongside. The write goes to a temporary sibling and is renamed into place; an existing
    `path` is replaced only with overwrite=True."""
    with atomic_dir(path, overwrite) as tmp:
        write_model(tmp, config, params, tokenizer_from, format=format, provenance=provenance, dtype=dtype,
                    max_shard_size=max_shard_size)
    return Path(path)


def write_model(directory: Path, config: Config, params: Params, tokenizer_from=None, *, format: str = "hf",
                provenance: Provenance | None = None, dtype=None, max_shard_size: str | int = "2GB") -> None:
    """What `save` writes, into an existing directory (for outputs that hold more than the model, written
    whole into one `atomic_dir`)."""
    if format not in ("hf", "orbax"):
        raise ValueError(f"format must be 'hf' or 'orbax', got {format!r}")
    check_params(config, params)
    dtype = np.dtype(dtype or params["embed_tokens.weight"].dtype)
    if format == "hf":
        _write_safetensors(directory, config, params, dtype, parse_size(max_shard_size))
    else:
        _write_orbax(directory, {name: value.astype(dtype) for name, value in params.items()})
    write_metadata(directory, config, dtype, tokenizer_from, provenance)


def _write_safetensors(directory: Path, config: Config, params: Params, dtype: np.dtype, max_shard_bytes: int):
    specs = {hf: (spec, layer) for hf, spec, layer in iter_hf_names(config)}
    entries = [TensorEntry(hf, spec.hf_shape(config), dtype) for hf, (spec, layer) in specs.items()]

    def produce(entry: TensorEntry) -> np.ndarray:
        spec, layer = specs[entry.name]
        array = params[spec.name] if layer is None else params[spec.name][layer]
        return spec.to_hf(np.asarray(array), config).astype(dtype)

    with progress_bar(f"writing {directory.name.split('.tmp-')[0].lstrip('.')}", total=len(entries)) as advance:
        write_sharded(directory, entries, produce, max_shard_bytes, on_tensor=lambda e: advance())


def write_metadata(directory: Path, config: Config, dtype, tokenizer_from=None,
                   provenance: Provenance | None = None) -> None:
    """Everything of an output directory but the weights: config.json, generation_config.json, the
    tokenizer (and chat template), and expand.json (the provenance)."""
    (directory / "config.json").write_text(json.dumps(config.to_hf(dtype_name(dtype)), indent=2))
    generation = {k: v for k, v in config.to_hf().items()
                  if k in ("bos_token_id", "eos_token_id", "pad_token_id") and v is not None}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_from is not None:
        save_tokenizer(tokenizer_from, directory)
    if provenance is not None:
        provenance.write(directory)


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


# ---- orbax -------------------------------------------------------------------------------------------


def _write_orbax(directory: Path, params: Params) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((directory / ORBAX_PARAMS).absolute(), nest(params))
        checkpointer.wait_until_finished()


def _read_orbax(directory: Path, config: Config, dtype, placement: Placement) -> Params:
    import orbax.checkpoint as ocp

    target = {
        spec.name: jax.ShapeDtypeStruct(spec.shape(config), dtype, sharding=placement(spec, spec.shape(config)))
        for spec in tensor_specs(config)
    }
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore((directory / ORBAX_PARAMS).absolute(), nest(target))
    return flatten(restored)
