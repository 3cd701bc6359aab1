"""`expand show --memory`: XLA's memory analysis on abstract shapes (config.json alone) equals that of the
same function compiled from real weights on the same mesh, and its arguments and outputs are the bytes the
real arrays take on a device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_hf_checkpoint

ROOT = Path(__file__).parents[1]


def run(*args: str, devices: int = 8) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("memory") / "model", num_key_value_heads=4)


def test_show_memory_equals_the_compiled_function_on_real_weights(checkpoint, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((checkpoint / "config.json").read_text())  # no weights: never read
    shown = run("-m", "expand", "show", str(config_only), "--layer-spec", "0:3,1:", "--memory", "check", "--mesh",
                "fsdp=2,tp=4", "--batch", "4", "--seq-len", "32", "--json")
    assert shown.returncode == 0, shown.stderr[-3000:]
    estimate = json.loads(shown.stdout)["memory"]
    candidate = next(c for c in estimate["compiled"] if c["name"] == "candidate forward fp32")
    real = run("-m", "tests.memory_run", str(checkpoint), "fsdp=2,tp=4", "0:3,1:", "4", "32")
    assert real.returncode == 0, real.stderr[-3000:]
    out = json.loads(real.stdout.strip().splitlines()[-1])
    print(candidate, out)
    for key in ("arguments", "outputs", "temporaries"):
        assert candidate[key] == out["analysis"][key], key
    assert candidate["arguments"] == out["measured"]["arguments"]
    assert candidate["outputs"] == out["measured"]["outputs"] + 2 * 8  # XLA's output tuple: two pointers
    assert estimate["peak_bytes_per_device"] == max(estimate["stages"].values()) > candidate["arguments"]


def test_memory_options_need_memory(checkpoint):
    done = run("-m", "expand", "show", str(checkpoint), "--mesh", "fsdp=2", devices=1)
    assert done.returncode == 2 and "go with --memory" in done.stderr


@pytest.mark.parametrize("tied", [False, True])
def test_show_memory_of_a_heal_step_equals_the_real_step(tmp_path, tied):
    """--memory heal compiles heal's own step and teacher view on abstract shapes: its step has the memory
    analysis of the step `expand.heal` compiles from real weights on the same mesh (the teacher's head rows
    placed as the real ones are: a tied head is the sharded embedding), the student's weights and AdamW
    state among its arguments; the step's stage counts a tied head once; the peak is the larger stage."""
    checkpoint = make_hf_checkpoint(tmp_path / "model", num_key_value_heads=4, tie_word_embeddings=tied)
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((checkpoint / "config.json").read_text())
    shown = run("-m", "expand", "show", str(config_only), "--layer-spec", "0:3,1:", "--memory", "heal", "--mesh",
                "fsdp=2,tp=4", "--batch", "4", "--seq-len", "32", "--json")
    assert shown.returncode == 0, shown.stderr[-3000:]
    estimate = json.loads(shown.stdout)["memory"]
    step = next(c for c in estimate["compiled"] if c["name"] == "heal step")
    real = run("-m", "tests.memory_run", str(checkpoint), "fsdp=2,tp=4", "0:3,1:", "4", "32", "heal")
    assert real.returncode == 0, real.stderr[-3000:]
    out = json.loads(real.stdout.strip().splitlines()[-1])
    print(step, out)
    for key in ("arguments", "outputs", "temporaries"):
        assert step[key] == out["analysis"][key], key
    hand = estimate["hand"]
    assert step["arguments"] >= hand["weights fp32 (student)"] + hand["AdamW state"]
    config = json.loads((checkpoint / "config.json").read_text())
    head_shard = config["vocab_size"] * config["hidden_size"] * 4 // 8  # split over fsdp=2 x tp=4
    assert estimate["stages"]["step"] == (step["arguments"] + step["outputs"] + step["temporaries"] - step["aliased"]
                                          + hand["teacher weights fp32"] - (head_shard if tied else 0))
    assert estimate["peak_bytes_per_device"] == max(estimate["stages"].values())
