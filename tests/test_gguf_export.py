"""GGUF export (`expand convert SRC OUT.gguf --format gguf`) read back by two independent readers: expand's
(expand/io/gguf.py) and transformers' GGUF loader (PyTorch), which each undo llama.cpp's q/k row order
on their own. fp32: the same weights bit for bit, logits within 1e-4 of the source; q8_0: top-1 agreement
with the source recorded."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import numpy as np
import pytest

import expand
from expand.cli import main
from expand.io.gguf_writer import permute_rotary_rows
from expand.io.gguf import unpermute_rotary_rows
from tests.helpers import make_hf_checkpoint, random_tokens, torch_logits, torch_reference
from tests.tiny_tokenizer import VOCAB_SIZE, save_tiny_tokenizer

TEXTS = ["Question: What color is the sky? 12345", "<s>user: hi</s> The river ran slowly.\n\nDone"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("tiny_lm") / "model", vocab_size=VOCAB_SIZE)
    return save_tiny_tokenizer(path)


def transformers_gguf(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def state_dicts_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(bool((sa[k] == sb[k]).all()) for k in sa)


def test_rotary_permutation_is_the_inverse_of_reading():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    assert np.array_equal(unpermute_rotary_rows(permute_rotary_rows(w, 2), 2), w)
    assert not np.array_equal(permute_rotary_rows(w, 2), w)


def test_fp32_export_reads_back_identically(tiny_lm, tmp_path):
    out = tmp_path / "tiny.gguf"
    assert main(["convert", str(tiny_lm), str(out), "--format", "gguf"]) == 0
    source, exported = expand.load(tiny_lm), expand.load(out)
    # GGUF stores rms_norm_eps as float32 (llama.cpp reads that key as float32); the tokenizer's pad id is kept
    assert exported.config.rms_norm_eps == float(np.float32(source.config.rms_norm_eps))
    assert dataclasses.replace(exported.config, rms_norm_eps=source.config.rms_norm_eps, pad_token_id=None) == \
        source.config
    for name, value in source.params.items():
        assert np.array_equal(np.asarray(exported.params[name]), np.asarray(value)), name
    hf = transformers_gguf(out)
    assert state_dicts_equal(hf, torch_reference(tiny_lm))
    tokens = random_tokens(VOCAB_SIZE, (2, 128))
    ours = np.asarray(expand.forward(source.params, tokens, source.config))
    assert np.abs(torch_logits(hf, tokens) - ours).max() <= 1e-4


def test_loaded_weights_do_not_keep_the_file_mapped(tiny_lm, tmp_path):
    """An fp32 GGUF's tensors are read as views of the file's memory map; the loaded weights must be copies,
    or the whole file stays mapped (and resident) as long as the model lives."""
    out = tmp_path / "tiny.gguf"
    assert main(["convert", str(tiny_lm), str(out), "--format", "gguf"]) == 0
    model = expand.load(out)
    gc.collect()
    assert str(out.resolve()) not in Path("/proc/self/maps").read_text()
    assert model.params["norm.weight"].shape == (model.config.hidden_size,)


def test_tokenizer_and_chat_template_carried_over(tiny_lm, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tiny.gguf"
    assert main(["convert", str(tiny_lm), str(out), "--format", "gguf"]) == 0
    source = AutoTokenizer.from_pretrained(str(tiny_lm))
    for rebuilt in (expand.load_tokenizer(out), AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)):
        for text in TEXTS:
            assert rebuilt(text)["input_ids"] == source(text)["input_ids"]
        assert rebuilt.chat_template == source.chat_template
        assert (rebuilt.bos_token_id, rebuilt.eos_token_id) == (source.bos_token_id, source.eos_token_id)


@pytest.mark.parametrize("dtype, numpy_dtype", [("fp16", np.float16), ("bf16", "bfloat16")])
def test_half_precision_export_holds_the_rounded_weights(tiny_lm, tmp_path, dtype, numpy_dtype):
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    out = tmp_path / f"tiny-{dtype}.gguf"
    assert main(["convert", str(tiny_lm), str(out), "--format", "gguf", "--dtype", dtype]) == 0
    source, exported = expand.load(tiny_lm), expand.load(out)
    for name, value in source.params.items():
        expected = np.asarray(value) if "norm" in name else np.asarray(value).astype(numpy_dtype).astype(np.float32)
        assert np.array_equal(np.asarray(exported.params[name]), expected), name
    transformers_gguf(out)  # loads


def test_export_of_a_depth_output(tiny_lm, tmp_path):
    """A grown model (expand depth) exported to GGUF has the grown model's weights and logits."""
    grown = tmp_path / "grown"
    assert main(["depth", str(tiny_lm), str(grown), "--layer-spec", "0:3,1:4"]) == 0
    out = tmp_path / "grown.gguf"
    assert main(["convert", str(grown), str(out), "--format", "gguf"]) == 0
    source, exported = expand.load(grown), expand.load(out)
    assert exported.config.num_hidden_layers == 6
    tokens = random_tokens(VOCAB_SIZE, (1, 96))
    reference = np.asarray(expand.forward(source.params, tokens, source.config))
    assert np.array_equal(np.asarray(expand.forward(exported.params, tokens, exported.config)), reference)
    assert np.abs(torch_logits(transformers_gguf(out), tokens) - reference).max() <= 1e-4


@pytest.mark.slow
def test_smollm2_fp32_and_q8_0(smollm2, license_tokens, tmp_path):
    """SmolLM2 (embedded Q4_1, dequantized) to fp32 GGUF: every weight as it was, and transformers' loads of
    the original file and of the export are the same model; q8_0: top-1 agreement with the source."""
    out = tmp_path / "smollm2.gguf"
    assert main(["convert", "smollm2", str(out), "--format", "gguf"]) == 0
    exported = expand.load(out)
    for name, value in smollm2.params.items():
        assert np.array_equal(np.asarray(exported.params[name]), np.asarray(value)), name
    from expand.io.embedded import embedded_gguf

    assert state_dicts_equal(transformers_gguf(out), transformers_gguf(embedded_gguf()))
    assert expand.load_tokenizer(out)(TEXTS[0])["input_ids"] == expand.load_tokenizer("smollm2")(TEXTS[0])["input_ids"]
    out.unlink()

    q8 = tmp_path / "smollm2-q8_0.gguf"
    assert main(["convert", "smollm2", str(q8), "--format", "gguf", "--dtype", "q8_0"]) == 0
    quantized = expand.load(q8)
    base = np.asarray(expand.forward(smollm2.params, license_tokens, smollm2.config))
    ours = np.asarray(expand.forward(quantized.params, license_tokens, quantized.config))
    top1 = float((ours.argmax(-1) == base.argmax(-1)).mean())
    print(f"SmolLM2 q8_0 GGUF vs source on 512 tokens: top-1 agreement {top1:.4f}, "
          f"max |dlogit| {np.abs(ours - base).max():.3f}, size {q8.stat().st_size / 2**20:.1f} MiB")
    assert top1 >= 0.9


@pytest.mark.parametrize("args, message", [
    (["--format", "gguf", "--dtype", "q4_0"], "fp32, fp16, bf16, q8_0"),
    (["--dtype", "q8_0"], "add --format gguf"),
])
def test_bad_requests_are_clear_errors(tiny_lm, tmp_path, args, message, capsys):
    out = tmp_path / ("x.gguf" if "gguf" in args else "x")
    assert main(["convert", str(tiny_lm), str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unsupported_models_are_refused(tmp_path, capsys):
    path = make_hf_checkpoint(tmp_path / "biased", attention_bias=True)
    assert main(["convert", str(path), str(tmp_path / "x.gguf"), "--format", "gguf"]) == 2
    assert "without biases" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
