"""Random Llama checkpoints of any size, written tensor by tensor (peak memory: one tensor), for benchmarks
that need a model bigger than the embedded SmolLM2.

    python -m experiments.synthetic OUT --like experiments/configs/llama-3-8b [--layers 4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ml_dtypes
import numpy as np

from expand.config import Config
from expand.io import write_metadata
from expand.io.atomic import atomic_dir
from expand.io.safetensors import TensorEntry, parse_size, write_sharded
from expand.params import iter_hf_names
from expand.progress import progress_bar

LLAMA_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
                intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
                bos_token_id=128000, eos_token_id=128001)


def write_random_checkpoint(out: Path, config: Config, dtype: str = "bfloat16", seed: int = 0,
                            max_shard_size: str = "2GB", overwrite: bool = False) -> Path:
    """An HF directory of normal(0, 0.02) matrices and unit norm gains, in `dtype`."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    specs = {hf: spec for hf, spec, _ in iter_hf_names(config)}
    entries = [TensorEntry(hf, spec.hf_shape(config), np_dtype) for hf, spec in specs.items()]
    rng = np.random.default_rng(seed)

    def produce(entry: TensorEntry) -> np.ndarray:
        if entry.name.endswith("norm.weight"):
            return np.ones(entry.shape, np_dtype)
        return (rng.standard_normal(entry.shape, np.float32) * np.float32(0.02)).astype(np_dtype)

    with atomic_dir(out, overwrite) as tmp:
        with progress_bar(f"writing {Path(out).name}", total=len(entries)) as advance:
            write_sharded(tmp, entries, produce, parse_size(max_shard_size), on_tensor=lambda e: advance())
        write_metadata(tmp, config, np_dtype)
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--like", help="a directory with config.json (default: a Llama-3.2-1B shape)")
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    hf = json.loads((Path(args.like) / "config.json").read_text()) if args.like else dict(LLAMA_1B)
    if args.layers:
        hf["num_hidden_layers"] = args.layers
    write_random_checkpoint(args.out, Config.from_hf(hf), args.dtype, max_shard_size=args.max_shard_size,
                            overwrite=args.force)


if __name__ == "__main__":
    main()
