"""Run in a subprocess with 8 simulated CPU devices (tests/test_sharding.py): load a checkpoint on one device
and on a mesh, counting the bytes read from its safetensors files (every tensor byte passes through
`expand.io.safetensors.read_bytes`, wrapped here), and check that both loads hold the same values. Prints one
JSON line."""

from __future__ import annotations

import json
import sys

import numpy as np

import expand
import expand.io.safetensors as safetensors
from expand.sharding import make_mesh, parse_mesh, placement

counted = {"bytes": 0, "reads": 0}
plain_read = safetensors.read_bytes


def counting_read(fd, target, offset):
    n = plain_read(fd, target, offset)
    counted["bytes"] += n
    counted["reads"] += 1
    return n


def main(path: str, mesh_text: str) -> None:
    safetensors.read_bytes = counting_read
    single = expand.load(path)
    one = dict(counted)
    counted.update(bytes=0, reads=0)
    sharded = expand.load(path, placement=placement(single.config, make_mesh(parse_mesh(mesh_text))))
    same = all(np.array_equal(np.asarray(sharded.params[k]), np.asarray(single.params[k])) for k in single.params)
    tensor_bytes = sum(np.asarray(v).nbytes for v in single.params.values())
    shard_bytes = sum(s.data.nbytes for v in sharded.params.values() for s in v.addressable_shards)
    print(json.dumps({"one_device": one, "mesh": counted, "same_values": same, "tensor_bytes": tensor_bytes,
                      "shard_bytes": shard_bytes,
                      "file_bytes": safetensors.SafetensorsSource(path).file_bytes()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
