"""Evaluation text: real English, never downloaded, and frozen, so that every number measured on it
reproduces. Two texts ship inside expand (`expand/data/`), each recorded by its sha256:

    expand-docs        the default: expand's own documentation (every docstring of its modules as they
                       stood when the text was frozen; about 11k SmolLM2 tokens)
    python-reference   the Python Language Reference topics of CPython 3.11.7 (`pydoc_data.topics`, the
                       text `help()` shows; about 110k tokens), for longer evaluations

Any text files can be given instead. Random tokens only when asked for."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
SHIPPED_TEXTS = {
    "expand-docs": "a2d5d807348910378e101c808c26bbd2fb5f00ab9867a0ae616acafdca3b074b",
    "python-reference": "d9dc35bce5ab1a24ed7f4c3c9b7c22450410e9d68279e3426db458c6be371621",
}
DEFAULT_TEXT = "expand-docs"


def text_sha256(text: str) -> str:
    """The sha256 of a text's UTF-8 bytes: what results files record to name the text they were measured on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shipped_text(name: str) -> str:
    """One of SHIPPED_TEXTS, checked against its recorded sha256."""
    text = (DATA / f"{name}.txt").read_text(encoding="utf-8")
    if text_sha256(text) != SHIPPED_TEXTS[name]:
        raise RuntimeError(f"{DATA / name}.txt does not have its recorded sha256; reinstall expand")
    return text


def default_text() -> str:
    return shipped_text(DEFAULT_TEXT)


def chat_prompt(tokenizer, text: str, raw: bool = False) -> list[int]:
    """Token ids of `text`, wrapped in the tokenizer's chat template unless `raw` or there is none."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer(text)["input_ids"]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def read_texts(paths) -> str:
    """The text of files or shipped texts (SHIPPED_TEXTS, by name), joined by blank lines."""
    texts = []
    for path in paths:
        if str(path) in SHIPPED_TEXTS and not Path(path).is_file():
            texts.append(shipped_text(str(path)))
            continue
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no text file at {path} (shipped texts: {', '.join(SHIPPED_TEXTS)})")
        texts.append(path.read_text(errors="replace"))
    return "\n\n".join(texts)


class TextTooShort(ValueError):
    """A text that does not fill the token windows asked of it."""


def token_batch(model, text: str | None, seq_len: int, num_sequences: int | None) -> np.ndarray:
    """(num_sequences, seq_len) token ids: consecutive windows of the tokenized text (default text if None);
    num_sequences=None: every full window. Refuses a text too short for the batch instead of padding it."""
    from expand.io import load_tokenizer

    tokenizer = load_tokenizer(model)
    ids = tokenizer(text if text is not None else default_text())["input_ids"]
    if seq_len < 1 or (num_sequences is not None and num_sequences < 1):
        raise ValueError(f"sequences of {seq_len} tokens, {num_sequences} of them: both must be at least 1")
    fits = len(ids) // seq_len
    wanted = fits if num_sequences is None else num_sequences
    if wanted < 1 or fits < wanted:
        raise TextTooShort(f"the text has {len(ids)} tokens, fewer than {max(wanted, 1)} x {seq_len}: give more text "
                         f"or fewer or shorter sequences (it fills {fits} sequences of {seq_len} tokens)")
    return np.asarray(ids[:wanted * seq_len], np.int32).reshape(wanted, seq_len)


def random_batch(vocab_size: int, seq_len: int, num_sequences: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (num_sequences, seq_len)).astype(np.int32)
