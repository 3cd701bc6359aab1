"""The embedded model's tokenizer is rebuilt from the GGUF without torch, and equals transformers' own GGUF
tokenizer (which needs torch) token for token."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from expand.io.embedded import embedded_gguf
from expand.text import shipped_text

# Prose, code and the Language Reference's symbols, plus non-ASCII text for the byte-level fallback.
SAMPLE = (shipped_text("expand-docs")[:4000] + shipped_text("python-reference")[20000:26000]
          + "\nnaïve café, Straße, 東京タワー, Ελληνικά, emoji 🙂🚀, tabs\t\tand  spaces <|im_end|>")

BUILD_WITHOUT_TORCH = """
import json, sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from expand.io import load_tokenizer
tokenizer = load_tokenizer("smollm2")
text = sys.stdin.read()
chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
chat = chat["input_ids"] if hasattr(chat, "keys") else chat
print(json.dumps({"ids": tokenizer(text)["input_ids"], "chat": list(chat), "torch": "torch" in sys.modules and sys.modules["torch"] is not None}))
"""


def test_tokenizer_without_torch_equals_transformers_gguf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    gguf = embedded_gguf()  # the verified file (fetched into the test session's cache)
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    (empty / "smollm2").mkdir()
    os.link(gguf, empty / "smollm2" / gguf.name)  # the same GGUF, but no tokenizer cached beside it
    env = {**os.environ, "EXPAND_CACHE": str(empty), "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", BUILD_WITHOUT_TORCH], input=SAMPLE, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert not built["torch"]
    assert (empty / "smollm2" / "tokenizer" / "tokenizer.json").exists()

    reference = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert len(SAMPLE) >= 10_000
    expected = reference(SAMPLE)["input_ids"]
    assert len(expected) > 2000
    assert built["ids"] == expected
    chat = reference.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=True)
    assert built["chat"] == list(chat["input_ids"] if hasattr(chat, "keys") else chat)
