"""Shared fixtures: a tiny random Llama checkpoint (tests/helpers.py builds it with transformers' own
`save_pretrained`), the embedded SmolLM2, its tokenizer and tokens of real text."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny GQA Llama (4 layers, hidden 64, 8 heads, 2 kv heads) saved by transformers."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, loaded by expand in float32."""
    import expand

    return expand.load("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    import expand

    return expand.load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def license_tokens(smollm2_tokenizer) -> np.ndarray:
    """512 real English tokens (the Apache-2.0 license text installed by Debian's base-files)."""
    text = Path("/usr/share/common-licenses/Apache-2.0").read_text()
    ids = smollm2_tokenizer(text)["input_ids"][:512]
    assert len(ids) == 512
    return np.asarray([ids])
