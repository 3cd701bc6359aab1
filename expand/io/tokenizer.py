"""The tokenizer of a GGUF file, rebuilt from its metadata without PyTorch.

A GGUF has no tokenizer.json: it stores the vocabulary, merges, token types, special token ids and chat
template as metadata under llama.cpp's keys (`tokenizer.ggml.*`, `tokenizer.chat_template`).
transformers' own GGUF path reads that metadata with a reader that imports torch, which expand's runtime
install does not have. Here the `gguf` package reads the metadata and transformers' converter
(`convert_gguf_tokenizer`, which needs only the `tokenizers` library) turns it into the same fast
tokenizer, with the same special tokens, BOS policy and chat template that transformers' GGUF loader
sets (tests/test_tokenizer.py compares the two token for token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expand.io.safetensors import CheckpointError

# The metadata keys whose full arrays the tokenizer needs (every other field is a scalar or a string).
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """The `general.architecture` and every `tokenizer.*` field of a GGUF file, arrays as Python lists."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises bare ValueError/struct errors on damaged files
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e
    wanted = {key: field for key, field in reader.fields.items()
              if key.startswith("tokenizer.") or key == "general.architecture"}
    if "tokenizer.ggml.tokens" not in wanted:
        raise CheckpointError(f"{path} carries no tokenizer (no tokenizer.ggml.tokens); pass a tokenizer from "
                              "another source")
    return {key: field.contents() for key, field in wanted.items()}


def gguf_tokenizer(path: str | Path):
    """A transformers fast tokenizer (`TokenizersBackend`) equal to what
    `AutoTokenizer.from_pretrained(dir, gguf_file=name)` builds, without importing torch."""
    from transformers import TokenizersBackend
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                       convert_gguf_tokenizer)

    metadata = tokenizer_metadata(path)
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, init_kwargs = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies
        init_kwargs.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        init_kwargs[name] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    return TokenizersBackend(tokenizer_object=backend, **init_kwargs, **extra)
