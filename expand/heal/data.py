"""Which token windows train and which judge: the held-out split, the order batches are drawn in, and the
digests that tie checkpoints to their data."""

from __future__ import annotations

import hashlib

import numpy as np


def check_rows(tokens, vocab_size: int, what: str) -> np.ndarray:
    """Token windows as an int32 (rows, length >= 2) array with ids in [0, vocab_size)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or len(tokens) < 1:
        raise ValueError(f"{what} tokens must be (rows >= 1, length >= 2), got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"{what} tokens hold ids outside the vocabulary [0, {vocab_size}): {tokens.min()} .. "
                         f"{tokens.max()}; tokenize with the model's own tokenizer")
    return tokens.astype(np.int32)


def split_held_out(tokens: np.ndarray, fraction: float, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows): the last max(1, round(fraction x rows)) windows, rounded up to a
    multiple of `multiple` (the data groups the held-out batch is split over), are held out, so that
    consecutive windows of a text are not split between the two sets more than once."""
    held = -(-max(1, round(fraction * len(tokens))) // multiple) * multiple
    if len(tokens) - held < 1:
        raise ValueError(f"{len(tokens)} token windows are too few to hold {held} out and train on the rest: give "
                         "more text, shorter windows (--seq-len) or separate evaluation text (--eval-text)")
    return tokens[:-held], tokens[-held:]


def batch_at(tokens: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The (batch_size, T) batch of optimizer step `step` (0-based): the rows in the order of a permutation
    drawn from `seed`, batch_size at a time, wrapping around. A function of the step alone, so a resumed run
    sees the batches an uninterrupted one would."""
    order = np.random.default_rng(seed).permutation(len(tokens))
    return tokens[order[(np.arange(batch_size) + step * batch_size) % len(tokens)]]


def digest(tokens: np.ndarray) -> str:
    """sha256 of the rows' shape and int32 bytes: which data a checkpoint was made on."""
    tokens = np.ascontiguousarray(tokens, np.int32)
    return hashlib.sha256(str(tokens.shape).encode() + tokens.tobytes()).hexdigest()
