"""Evaluation text: real English, never downloaded. The default is expand's own documentation (the
docstrings of its modules, which were written for it and ship inside it, about 8k SmolLM2 tokens). For
longer evaluations, `python-reference`: the Python Language Reference as installed with every CPython
(`pydoc_data.topics`, the text `help()` shows; about 110k tokens; its exact words follow the Python
version, so results record the text's sha256). Any text files can be given instead. Random tokens only
when asked for."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

PACKAGE = Path(__file__).parent


def default_text() -> str:
    """Every docstring of the expand package (modules, classes, functions), in file order."""
    parts = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 8:
                    parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))


def python_reference_text() -> str:
    """The Python Language Reference topics of the running interpreter, in sorted topic order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


NAMED_TEXTS = {"expand-docs": default_text, "python-reference": python_reference_text}


def chat_prompt(tokenizer, text: str, raw: bool = False) -> list[int]:
    """Token ids of `text`, wrapped in the tokenizer's chat template unless `raw` or there is none."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer(text)["input_ids"]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def read_texts(paths) -> str:
    """The text of files or named texts (NAMED_TEXTS), joined by blank lines."""
    texts = []
    for path in paths:
        if str(path) in NAMED_TEXTS and not Path(path).is_file():
            texts.append(NAMED_TEXTS[str(path)]())
            continue
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no text file at {path} (named texts: {', '.join(NAMED_TEXTS)})")
        texts.append(path.read_text(errors="replace"))
    return "\n\n".join(texts)


def token_batch(model, text: str | None, seq_len: int, num_sequences: int | None) -> np.ndarray:
    """(num_sequences, seq_len) token ids: consecutive windows of the tokenized text (default text if None);
    num_sequences=None: every full window. Refuses a text too short for the batch instead of padding it."""
    from expand.io import load_tokenizer

    tokenizer = load_tokenizer(model)
    ids = tokenizer(text if text is not None else default_text())["input_ids"]
    fits = len(ids) // seq_len
    wanted = fits if num_sequences is None else num_sequences
    if wanted < 1 or fits < wanted:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {wanted or 1} x {seq_len}: give more text "
                         f"or fewer or shorter sequences (it fills {fits} of {seq_len})")
    return np.asarray(ids[:wanted * seq_len], np.int32).reshape(wanted, seq_len)


def random_batch(vocab_size: int, seq_len: int, num_sequences: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (num_sequences, seq_len)).astype(np.int32)
