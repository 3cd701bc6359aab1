"""Safetensors in and out, one tensor at a time.

Reading goes through the `safetensors` library (memory-mapped; a tensor is copied only when asked for).
Writing is our own streaming writer: each shard's header is written first (shapes and dtypes are known in
advance), then each tensor's bytes as it is produced, so peak memory is the largest single tensor, not a
shard. The files are the standard format (8-byte little-endian header length, JSON header, raw data) and
are read back by the `safetensors` library and transformers.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPE_CODES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
}


class CheckpointError(ValueError):
    """A checkpoint on disk that cannot be read as it claims to be."""


class SafetensorsSource:
    """HF tensors of a model directory (single file or sharded with an index), read lazily by name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._files: dict[str, Path] = _weight_map(self.directory)
        self._handles: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self._files)

    def _handle(self, name: str):
        path = self._files[name]
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{path} is not a readable safetensors file ({e}); it may be truncated or still being "
                    "written: re-download or re-save it"
                ) from e
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(name).get_slice(name).get_dtype()

    def read(self, name: str) -> np.ndarray:
        try:
            return self._handle(name).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read {name} from {self._files[name]}: {e}") from e

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self._files.values()))


def _weight_map(directory: Path) -> dict[str, Path]:
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: directory / file for name, file in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.exists()})
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    single = directory / SINGLE_FILE
    if single.exists():
        try:
            with safe_open(str(single), framework="numpy") as f:
                return {name: single for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{single} is not a readable safetensors file ({e}); it may be truncated: re-download or re-save it"
            ) from e
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory} holds PyTorch pickles, not safetensors: re-save it with "
            "transformers' save_pretrained(..., safe_serialization=True)"
        )
    raise CheckpointError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")


# ---- writing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Group tensors in order into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _header(entries: list[TensorEntry]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_sharded(directory: Path, entries: list[TensorEntry], produce: Callable[[TensorEntry], np.ndarray],
                  max_shard_bytes: int, on_tensor: Callable[[TensorEntry], None] | None = None) -> list[Path]:
    """Write `entries` as HF-style sharded safetensors into `directory`, calling `produce(entry)` for each
    tensor's data just before writing it. One shard is `model.safetensors`; several get
    `model-0000k-of-0000n.safetensors` and a `model.safetensors.index.json`. Returns the files written."""
    shards = plan_shards(entries, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for file_name, shard in zip(names, shards):
        with open(directory / file_name, "wb") as f:
            f.write(_header(shard))
            for entry in shard:
                array = np.ascontiguousarray(produce(entry))
                if array.shape != entry.shape or array.dtype != entry.dtype:
                    raise ValueError(
                        f"{entry.name}: produced {array.shape} {array.dtype}, planned {entry.shape} {entry.dtype}"
                    )
                f.write(memoryview(array.reshape(-1).view(np.uint8)))
                if on_tensor is not None:
                    on_tensor(entry)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {e.name: file_name for file_name, shard in zip(names, shards) for e in shard},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return [directory / n for n in names]


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1234 -> bytes."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)
