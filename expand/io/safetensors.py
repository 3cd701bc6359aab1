"""Safetensors in and out, one tensor at a time.

Both directions are our own code on the standard format (8-byte little-endian header length, JSON header,
raw data). Reading copies one tensor at a time out of the file (no memory map, whose touched pages would
count as resident memory until the whole file set had been read). Writing is a streaming writer: each shard's header is written first (shapes and dtypes are known in
advance), then each tensor's bytes as it is produced, so peak memory is the largest single tensor, not a
shard. The files are read back by the `safetensors` library and transformers.
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


CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class StoredTensor:
    path: Path
    offset: int  # absolute byte offset of the data in the file
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, ...


class SafetensorsSource:
    """HF tensors of a model directory (single file or sharded with an index), read lazily by name.

    Each read copies one tensor from the file into fresh memory (no memory map), so reading a checkpoint
    tensor by tensor keeps resident memory at about one tensor, however large the files are."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._files: dict[str, Path] = _weight_map(self.directory)
        self._headers: dict[Path, dict[str, StoredTensor]] = {}

    def names(self) -> set[str]:
        return set(self._files)

    def _stored(self, name: str) -> StoredTensor:
        path = self._files[name]
        if path not in self._headers:
            self._headers[path] = read_header(path)
        if name not in self._headers[path]:
            raise CheckpointError(f"the index puts {name} in {path.name}, but that file does not hold it")
        return self._headers[path][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._stored(name).shape

    def dtype(self, name: str) -> str:
        return self._stored(name).dtype

    def read(self, name: str) -> np.ndarray:
        stored = self._stored(name)
        if stored.dtype not in CODE_DTYPES:
            raise CheckpointError(f"{name} is stored as {stored.dtype}, which expand does not read")
        dtype = CODE_DTYPES[stored.dtype]
        buffer = np.empty(math.prod(stored.shape) * dtype.itemsize, np.uint8)
        with open(stored.path, "rb") as f:
            f.seek(stored.offset)
            if f.readinto(buffer) != buffer.size:
                raise CheckpointError(f"{stored.path} ends inside {name}: the file is truncated; re-download or re-save it")
        return buffer.view(dtype).reshape(stored.shape)

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self._files.values()))


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file declares, checked against the file's size."""
    size = path.stat().st_size
    broken = f"{path} is not a readable safetensors file"
    fix = "it may be truncated or still being written: re-download or re-save it"
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{broken} (shorter than its 8-byte header length); {fix}")
        (length,) = struct.unpack("<Q", prefix)
        if 8 + length > size:
            raise CheckpointError(f"{broken} (its header says {length} bytes, the file is {size}); {fix}")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise CheckpointError(f"{broken} (its header is not JSON: {e}); {fix}") from e
    header.pop("__metadata__", None)
    tensors, end = {}, 0
    for name, entry in header.items():
        begin, stop = entry["data_offsets"]
        tensors[name] = StoredTensor(path, 8 + length + begin, tuple(entry["shape"]), entry["dtype"])
        end = max(end, stop)
    if 8 + length + end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + length + end:,} bytes but the file "
                              f"has {size:,}; re-download or re-save it")
    return tensors


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
        return {name: single for name in read_header(single)}
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
