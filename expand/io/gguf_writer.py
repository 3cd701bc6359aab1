"""Writing a llama GGUF file for llama.cpp with the `gguf` package's writer: llama architecture metadata,
the tokenizer and chat template, and every tensor in llama.cpp's names and layout, streamed one tensor at a
time (the header and tensor table are written first, then each tensor is converted, encoded and appended).

Layout: HF (out, in) matrices are written as they are (GGUF lists dimensions fastest first, so the file
says (in, out)); the rows of q_proj and k_proj are permuted into llama.cpp's interleaved rotary order,
per head (n = heads of that tensor, h = head_dim):
    W_gguf = W_hf.reshape(n, 2, h/2, d_in).swapaxes(1, 2).reshape(n * h, d_in)
the inverse of what `expand.io.gguf` and transformers' GGUF loader undo on reading.

dtypes: fp32, fp16, bf16 or q8_0 for matrices (q8_0: blocks of 32 int8 values with one fp16 scale, for
rows whose length is a multiple of 32; other matrices fall back to fp16, as llama.cpp's converter does);
norm gains stay fp32.

The tokenizer: byte-level BPE (GPT-2 style: SmolLM2, Llama 3) as `tokenizer.ggml.model = gpt2`, its tokens
in id order (ids the tokenizer does not use, up to the model's vocabulary, as unused `[PAD{id}]`), token
types (added special tokens CONTROL, other added tokens USER_DEFINED), merges, special token ids, whether
BOS / EOS are added, and the chat template. `tokenizer.ggml.pre` names the pre-tokenizer llama.cpp should
apply, read from the tokenizer's own: GPT-2's ByteLevel regex `gpt-2`, single digits then ByteLevel
`smollm`, Llama 3's split `llama-bpe`, anything else `default`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from expand.config import Config
from expand.io.atomic import atomic_file
from expand.io.safetensors import CheckpointError
from expand.params import Params, iter_hf_names
from expand.progress import progress_bar

GGUF_DTYPES = ("fp32", "fp16", "bf16", "q8_0")
_LLAMA3_SPLIT_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"


def gguf_tensor_name(hf_name: str) -> str:
    """model.layers.7.self_attn.q_proj.weight -> blk.7.attn_q.weight (the inverse of expand.io.gguf's map)."""
    from expand.io.gguf import _LAYER_NAMES, _NAMES

    for gguf_name, name in _NAMES.items():
        if name == hf_name:
            return gguf_name
    prefix, _, rest = hf_name.removeprefix("model.layers.").partition(".")
    for gguf_suffix, suffix in _LAYER_NAMES.items():
        if suffix == rest:
            return f"blk.{prefix}.{gguf_suffix}"
    raise CheckpointError(f"no GGUF name for tensor {hf_name}")


def permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved order, for q/k weights (rows, in) or biases (rows,)."""
    rows = weight.shape[0]
    head_dim = rows // heads
    rest = weight.shape[1:]
    return weight.reshape(heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def ggml_type(shape: tuple[int, ...], dtype: str):
    """The GGML type of one tensor (out, in) or (n,) written at `dtype`."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1 or dtype == "fp32":
        return T.F32
    if dtype == "q8_0":
        return T.Q8_0 if shape[-1] % 32 == 0 else T.F16
    return {"fp16": T.F16, "bf16": T.BF16}[dtype]


def encode(array: np.ndarray, kind) -> np.ndarray:
    """float32 (out, in) -> the bytes (or float array) the GGUF file stores for GGML type `kind`."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if kind == T.F32:
        return np.ascontiguousarray(array, np.float32)
    if kind == T.F16:
        return np.ascontiguousarray(array, np.float16)
    return quants.quantize(np.ascontiguousarray(array, np.float32), kind)


def file_type(dtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"fp32": F.ALL_F32, "fp16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[dtype]


def check_exportable(config: Config) -> None:
    """Refuse what llama.cpp's llama graph (and expand's GGUF reader) cannot express."""
    if config.attention_bias or config.mlp_bias:
        raise CheckpointError("GGUF export writes Llama models without biases (attention_bias / mlp_bias are set); "
                              "keep this model as an HF directory")
    if config.rope_scaling is not None and config.rope_scaling.rope_type != "linear":
        raise CheckpointError(f"GGUF export writes linear rope scaling only, not {config.rope_scaling.rope_type!r} "
                              "(llama.cpp stores Llama 3.1 scaling as a rope_freqs tensor); keep this model as an "
                              "HF directory")


def add_config(writer, config: Config, dtype: str) -> None:
    """llama.* hyperparameters, as llama.cpp's convert_hf_to_gguf.py writes them for Llama."""
    from gguf import RopeScalingType

    writer.add_file_type(file_type(dtype))
    if dtype == "q8_0":
        writer.add_quantization_version(2)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.rope_scaling is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling.factor)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre_tokenizer (see the module docstring)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and str(steps[0].get("pattern", {}).get("Regex", "")).startswith(
            _LLAMA3_SPLIT_START):
        return "llama-bpe"
    return "default"


def add_tokenizer(writer, tokenizer, config: Config) -> None:
    """tokenizer.ggml.* and tokenizer.chat_template from a transformers fast tokenizer (byte-level BPE)."""
    from gguf import TokenType

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data["model"]
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise CheckpointError(f"GGUF export carries byte-level BPE tokenizers (SmolLM2, Llama 3); this one is "
                              f"{model.get('type')} with pre-tokenizer {(data.get('pre_tokenizer') or {}).get('type')}; "
                              "keep this model as an HF directory")
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    too_large = sorted(i for i in vocab.values() if i >= config.vocab_size)
    if too_large:
        raise CheckpointError(f"the tokenizer has ids up to {too_large[-1]} but the model's vocabulary is "
                              f"{config.vocab_size}; GGUF stores one token per embedding row")
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [TokenType.UNUSED] * config.vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, TokenType.NORMAL
    for added in data.get("added_tokens", []):
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(data.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id}
    special["bos"] = config.bos_token_id if special["bos"] is None else special["bos"]
    special["eos"] = config.eos_token_ids[0] if special["eos"] is None and config.eos_token_ids else special["eos"]
    for name, token_id in special.items():
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(int(token_id))
    probe, bare = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(len(probe) > len(bare) and probe[0] == special["bos"])
    writer.add_add_eos_token(len(probe) > len(bare) and probe[-1] == special["eos"])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def hf_layout_tensor(config: Config, params: Params, hf_name: str, spec, layer) -> np.ndarray:
    """One HF-layout float32 tensor, q/k rows permuted into llama.cpp's order."""
    array = params[spec.name] if layer is None else params[spec.name][layer]
    array = spec.to_hf(np.asarray(array, np.float32), config)
    if ".self_attn.q_proj." in hf_name:
        return permute_rotary_rows(array, config.num_attention_heads)
    if ".self_attn.k_proj." in hf_name:
        return permute_rotary_rows(array, config.num_key_value_heads)
    return array


def write_gguf(path: str | Path, config: Config, params: Params, tokenizer_from, *, dtype: str = "fp32",
               name: str | None = None, overwrite: bool = False, inputs=()) -> Path:
    """Write config + params as a llama GGUF file at `path`, with the tokenizer of `tokenizer_from` (a model
    path / embedded name / Model, as `expand.io.save` takes). Written to a temporary sibling and renamed
    into place."""
    import gguf

    from expand.io import load_tokenizer

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    check_exportable(config)
    tokenizer = load_tokenizer(tokenizer_from)
    names = [(hf_name, spec, layer) for hf_name, spec, layer in iter_hf_names(config)]
    kinds = {hf_name: ggml_type(spec.hf_shape(config), dtype) for hf_name, spec, _ in names}
    with atomic_file(path, overwrite, inputs=inputs) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name or Path(path).stem)
        add_config(writer, config, dtype)
        add_tokenizer(writer, tokenizer, config)
        for hf_name, spec, _ in names:
            shape = spec.hf_shape(config)
            size = gguf.quant_shape_to_byte_shape(shape, kinds[hf_name])[-1] * int(np.prod(shape[:-1]))
            writer.add_tensor_info(gguf_tensor_name(hf_name), shape, np.dtype(np.float32), size,
                                   raw_dtype=kinds[hf_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress_bar(f"writing {Path(path).name}", total=len(names)) as advance:
            for hf_name, spec, layer in names:
                writer.write_tensor_data(encode(hf_layout_tensor(config, params, hf_name, spec, layer),
                                                kinds[hf_name]))
                advance()
        writer.close()
    return Path(path)
