"""Safetensors in and out, one tensor at a time.

Both directions are our own code on the standard format (8-byte little-endian header length, JSON header,
raw data). Reading first checks every header (and the index) as the safetensors library does, so a file
the library refuses is refused here before any tensor is used; then it copies one tensor, or one block of a
tensor (a device's shard), at a time out of the file, reading only that block's byte ranges (no memory
map, whose touched pages would count as resident memory until the whole file set had been read). Writing is a streaming writer: each shard's header is written first (shapes and dtypes are known in
advance), then each tensor's bytes as it is produced, so peak memory is the largest single tensor, not a
shard. The files are read back by the `safetensors` library and transformers.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from expand.io.atomic import NoSpaceError

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
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
# Every dtype the safetensors format defines, with its size in bits (what the library checks lengths with).
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses longer headers
REDO = "re-download it, or re-save it (transformers' save_pretrained, or safetensors' save_file)"


class CheckpointError(ValueError):
    """A checkpoint on disk that cannot be read as it claims to be."""


@dataclass(frozen=True)
class StoredTensor:
    path: Path
    offset: int  # absolute byte offset of the data in the file
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, ...


class SafetensorsSource:
    """HF tensors of a model directory (single file or sharded with an index), read lazily by name.

    Opening it reads and checks every header (and the index) before any tensor is used, as the safetensors
    library does. Each read copies one tensor from the file into fresh memory (no memory map), so reading a
    checkpoint tensor by tensor keeps resident memory at about one tensor, however large the files are."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        files = _weight_map(self.directory)
        headers = {path: read_header(path) for path in sorted(set(files.values()))}
        self._tensors: dict[str, StoredTensor] = {}
        for name, path in files.items():
            if name not in headers[path]:
                raise CheckpointError(f"{self.directory / INDEX_FILE} puts {name} in {path.name}, but that file "
                                      "does not hold it; re-download the checkpoint, or re-save it")
            self._tensors[name] = headers[path][name]

    def names(self) -> set[str]:
        return set(self._tensors)

    def _stored(self, name: str) -> StoredTensor:
        if name not in self._tensors:
            raise CheckpointError(f"{self.directory} holds no tensor {name}")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._stored(name).shape

    def dtype(self, name: str) -> str:
        return self._stored(name).dtype

    def read(self, name: str) -> np.ndarray:
        """The whole tensor, in its stored shape."""
        shape = self.shape(name)
        return self.read_block(name, shape, (slice(None),) * len(shape))

    def read_block(self, name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` (a slice per axis, step 1) of the tensor viewed as the C-order `shape` (a reshape
        of its stored shape), reading only the block's bytes from the file: a block whose trailing axes are
        whole is one contiguous run per combination of its leading indices (`block_runs`); a block of
        the leading axis is a single run, a block of the last axis one run per row."""
        stored = self._stored(name)
        dtype = numpy_dtype(stored.dtype, f"{name} in {stored.path}")
        if math.prod(shape) != math.prod(stored.shape):
            raise ValueError(f"{name} is stored as {stored.shape}, which does not reshape to {shape}")
        block_shape, offsets, run = block_runs(shape, index)
        buffer = np.empty(math.prod(block_shape) * dtype.itemsize, np.uint8)
        view, run_bytes = memoryview(buffer), run * dtype.itemsize
        with open(stored.path, "rb") as f:
            for i, offset in enumerate(offsets.tolist()):
                target = view[i * run_bytes:(i + 1) * run_bytes]
                if read_bytes(f.fileno(), target, stored.offset + offset * dtype.itemsize) != run_bytes:
                    raise CheckpointError(f"{stored.path} ends inside {name}: the file is truncated; {REDO}")
        return buffer.view(dtype).reshape(block_shape)

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(t.path for t in self._tensors.values()))


def read_bytes(fd: int, target: memoryview, offset: int) -> int:
    """Read len(target) bytes of the open file `fd` at `offset` into `target`; returns the bytes read (fewer
    only at the end of the file). Every tensor byte expand reads from a safetensors file passes here."""
    done = 0
    while done < len(target):
        n = os.preadv(fd, [target[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def block_runs(shape: tuple[int, ...], index: tuple[slice, ...]):
    """Where the block `index` (a slice per axis, step 1; missing trailing ones whole) of a C-order array of
    `shape` lies: (block shape, element offsets of its contiguous runs in block order, elements per run). The axes after the last partial one are whole, so each run covers that axis's range times
    everything after it; the runs are the combinations of the indices before it."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    bounds = []
    for axis, (s, n) in enumerate(zip(index, shape)):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"a block is read with step 1 on every axis, got {s} on axis {axis}")
        bounds.append((start, max(start, stop)))
    block_shape = tuple(b - a for a, b in bounds)
    strides = [math.prod(shape[axis + 1:]) for axis in range(len(shape))]
    partial = [axis for axis, (a, b) in enumerate(bounds) if (a, b) != (0, shape[axis])]
    if not partial or math.prod(block_shape) == 0:  # the whole tensor, or nothing
        return block_shape, np.zeros(1 if math.prod(block_shape) else 0, np.int64), math.prod(block_shape)
    last = partial[-1]
    run = block_shape[last] * strides[last]
    offsets = np.asarray(bounds[last][0] * strides[last], np.int64)
    for axis in range(last - 1, -1, -1):  # outer product over the leading axes, the earliest varying slowest
        offsets = (np.arange(*bounds[axis], dtype=np.int64)[:, None] * strides[axis] + offsets.reshape(1, -1))
    return block_shape, offsets.reshape(-1), run


def numpy_dtype(code: str, what: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype code that expand reads (F64, F32, F16, BF16, I64, I32)."""
    if code not in CODE_DTYPES:
        raise CheckpointError(f"{what} is stored as {code}, which expand does not read; convert the checkpoint to "
                              f"{', '.join(CODE_DTYPES)} first")
    return CODE_DTYPES[code]


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file declares, after every check the safetensors library makes: a header
    length inside the file and at most 100 MB; a UTF-8 JSON object; `__metadata__` a map of strings; each
    tensor a known dtype, a shape of non-negative integers and data_offsets [begin, end] with
    end - begin = (product of shape) x (dtype bits) / 8; sorted by offset, the tensors tile the data exactly:
    from byte 0, no overlap, no gap, up to the end of the file. A CheckpointError names the file and what
    is wrong."""
    size = path.stat().st_size

    def refuse(problem: str):
        raise CheckpointError(f"{path} is not a valid safetensors file: {problem}; {REDO}")

    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            refuse(f"it has {len(prefix)} bytes, fewer than the 8 of its header length (truncated?)")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            refuse(f"its header length {length:,} exceeds the format's limit of {MAX_HEADER_BYTES:,} bytes")
        if 8 + length > size:
            refuse(f"its header says {length:,} bytes but the file has {size:,} (truncated)")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both are
        refuse(f"its header is not UTF-8 JSON ({e})")
    if not isinstance(header, dict):
        refuse(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(v, str) for v in metadata.values())):
        refuse("its __metadata__ is not a map of strings")
    tensors: dict[str, StoredTensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        begin, end, tensor = _checked_entry(path, 8 + length, name, entry, refuse)
        tensors[name] = tensor
        spans.append((begin, end, name))
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            refuse(f"tensor {name} (bytes {begin}-{end}) overlaps tensor {previous}, which ends at byte {position}")
        if begin > position:
            refuse(f"tensor {name} begins at byte {begin}, leaving bytes {position}-{begin} unused")
        position, previous = end, name
    if 8 + length + position > size:
        refuse(f"its header describes {8 + length + position:,} bytes but the file has {size:,} (truncated)")
    if 8 + length + position < size:
        refuse(f"it has {size - 8 - length - position:,} bytes after its last tensor")
    return tensors


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_entry(path: Path, data_start: int, name: str, entry, refuse) -> tuple[int, int, StoredTensor]:
    """(begin, end, StoredTensor) of one header entry, refusing what the safetensors library refuses."""
    if not isinstance(entry, dict):
        refuse(f"the header entry of {name} is not an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        refuse(f"tensor {name} has no {' and no '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        refuse(f"tensor {name} has the unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
        refuse(f"tensor {name} has the shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        refuse(f"tensor {name} has data_offsets {offsets!r}, not [begin, end] in bytes")
    begin, end = offsets
    if end < begin:
        refuse(f"tensor {name} has data_offsets [{begin}, {end}], which end before they begin")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        refuse(f"tensor {name} is {dtype} of shape {shape}, {bits / 8:g} bytes, but its data_offsets "
               f"[{begin}, {end}] hold {end - begin}")
    return begin, end, StoredTensor(path, data_start + begin, tuple(shape), dtype)


def _weight_map(directory: Path) -> dict[str, Path]:
    """Tensor name -> file: the index's weight_map (checked), or every tensor of the single file."""
    index = directory / INDEX_FILE
    if index.exists():
        redo = f"re-download {index.name}, or re-save the checkpoint"
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except ValueError as e:
            raise CheckpointError(f"{index} is not valid JSON ({e}); {redo}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map (a map from tensor names to shard files); {redo}")
        outside = sorted({f for f in weight_map.values() if Path(f).name != f or f in (".", "..")})
        if outside:
            raise CheckpointError(f"{index} names shards outside its folder: {', '.join(outside)}; {redo}")
        files = {name: directory / file for name, file in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}; download them, "
                                  "or re-save the checkpoint")
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
    `model-0000k-of-0000n.safetensors` and a `model.safetensors.index.json`. Returns the files written.
    Refuses (NoSpaceError, with the bytes needed) before writing anything when the disk has too little room."""
    shards = plan_shards(entries, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    needed = sum(len(_header(shard)) + sum(e.nbytes for e in shard) for shard in shards)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise NoSpaceError(f"{directory} has {free:,} bytes free, and these tensors need {needed:,}", needed)
    try:
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
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise NoSpaceError(f"{directory} ran out of space; these tensors need {needed:,} bytes", needed) from e
        raise
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
