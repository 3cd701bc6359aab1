"""GGUF files (llama.cpp) as a source of HF-layout tensors and an HF config.

Tensors are dequantized with the `gguf` package to (out, in) float32. llama.cpp stores the rows of
q_proj and k_proj in interleaved rotary order; per head, rows (2i, 2i+1) are HF's (i, i + h/2), so
    W_hf = W_gguf.reshape(heads, h/2, 2, d_in).swapaxes(1, 2).reshape(heads * h, d_in)
(heads = query heads for q, kv heads for k) gives exactly the tensors transformers' own GGUF loader makes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from expand.io.safetensors import CheckpointError

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
REQUIRED_KEYS = ("llama.attention.head_count", "llama.embedding_length", "llama.feed_forward_length",
                 "llama.block_count", "llama.attention.layer_norm_rms_epsilon")
REDO = ("re-download it (for the embedded model: delete its folder in the expand cache, $EXPAND_CACHE or "
        "~/.cache/expand, and it is fetched again), or export it again with llama.cpp's convert_hf_to_gguf.py")


def hf_tensor_name(gguf_name: str) -> str | None:
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    match = _LAYER.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp interleaved rotary row order -> HF rotate-half order, for q/k weights (rows, in) or biases."""
    rows = weight.shape[0]
    head_dim = rows // heads
    rest = weight.shape[1:]
    return weight.reshape(heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


class GGUFSource:
    """HF-named, HF-layout float32 tensors of a llama GGUF file, dequantized one at a time."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the gguf package raises bare ValueError/struct errors on damaged files
            raise CheckpointError(f"{self.path} is not a readable GGUF file ({e}); {REDO}") from e
        self.metadata = _metadata(self.reader)
        arch = self.metadata.get("general.architecture")
        if arch != "llama":
            raise CheckpointError(
                f"unknown architecture general.architecture={arch!r} in {self.path.name}: "
                "expand reads llama GGUF files only"
            )
        self._tensors = {}
        for tensor in self.reader.tensors:
            name = hf_tensor_name(tensor.name)
            if name is None:
                if tensor.name == "rope_freqs.weight":
                    raise CheckpointError(
                        f"{self.path.name} carries rope_freqs.weight (Llama 3.1 rope scaling), which this "
                        "reader does not map to a config; load the HF checkpoint of this model instead"
                    )
                raise CheckpointError(f"{self.path.name}: unexpected GGUF tensor {tensor.name!r}")
            self._tensors[name] = tensor
        self._config = self._config_from_metadata()

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))

    def read(self, name: str) -> np.ndarray:
        import gguf

        tensor = self._tensors[name]
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
            if np.may_share_memory(array, tensor.data):  # an unquantized tensor is a view of the file's memory
                array = array.copy()  # map, which would stay mapped (and resident) as long as the weights live
            array = array.reshape(self.shape(name))
        except Exception as e:  # a damaged tensor: dequantize and reshape raise ValueError / NotImplementedError
            raise CheckpointError(f"{self.path}: tensor {tensor.name} cannot be read ({e}); {REDO}") from e
        if ".self_attn.q_proj." in name:
            return unpermute_rotary_rows(array, self._config["num_attention_heads"])
        if ".self_attn.k_proj." in name:
            return unpermute_rotary_rows(array, self._config["num_key_value_heads"])
        return array

    def read_block(self, name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` of the tensor viewed as `shape`: quantized blocks span rows, so the whole tensor
        is read and dequantized, then sliced (every device's shard reads the whole tensor)."""
        return self.read(name).reshape(shape)[tuple(index)]

    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def hf_config(self) -> dict[str, Any]:
        """The HF config.json dict this file describes (as transformers' GGUF loader builds it)."""
        return dict(self._config)

    def _config_from_metadata(self) -> dict[str, Any]:
        m = self.metadata
        missing = [key for key in REQUIRED_KEYS if key not in m]
        if "llama.vocab_size" not in m and "tokenizer.ggml.tokens" not in m:
            missing.append("llama.vocab_size (or tokenizer.ggml.tokens)")
        if missing:
            raise CheckpointError(f"{self.path} lacks the metadata {', '.join(missing)}, which a llama GGUF file "
                                  f"carries; {REDO}")
        heads = int(m["llama.attention.head_count"])
        hidden = int(m["llama.embedding_length"])
        vocab = m.get("llama.vocab_size") or len(m["tokenizer.ggml.tokens"])
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(m["llama.feed_forward_length"]),
            "num_hidden_layers": int(m["llama.block_count"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(m.get("llama.attention.head_count_kv", heads)),
            "head_dim": int(m.get("llama.rope.dimension_count", hidden // heads)),
            "rms_norm_eps": float(m["llama.attention.layer_norm_rms_epsilon"]),
            "rope_theta": float(m.get("llama.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(m.get("llama.context_length", 2048)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": m.get("tokenizer.ggml.padding_token_id"),
            "hidden_act": "silu",
        }
        scaling_type = m.get("llama.rope.scaling.type")
        if scaling_type == "linear":
            if "llama.rope.scaling.factor" not in m:
                raise CheckpointError(f"{self.path} has linear rope scaling but no llama.rope.scaling.factor; {REDO}")
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(m["llama.rope.scaling.factor"])}
        elif scaling_type not in (None, "none"):
            raise CheckpointError(f"{self.path.name}: rope scaling type {scaling_type!r} is not implemented")
        return config


def _metadata(reader) -> dict[str, Any]:
    """Scalar and string GGUF fields (the large token arrays are left out, except tokens' length)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # fields of types the reader cannot render are not needed here
            continue
    return out
