"""Sharded execution on 8 host devices (a subprocess, since the device count is fixed when jax starts):
loading places shards without gathering and reads each byte of the checkpoint once, sharded forward,
check, ablate, generate and heal equal one device, and a data axis splits the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_hf_checkpoint

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("sharded") / "model", num_key_value_heads=4)


def run_sharded(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("mesh, q_spec, q_shard", [
    ("fsdp=8", [None, "fsdp", None, None], (4, 8, 8, 8)),
    ("fsdp=2,tp=4", [None, "fsdp", "tp", None], (4, 32, 2, 8)),
    ("data=2,fsdp=4", [None, "fsdp", None, None], (4, 16, 8, 8)),
])
@pytest.mark.slow
def test_sharded_runs_equal_one_device(checkpoint, mesh, q_spec, q_shard):
    done = run_sharded("-m", "tests.sharded_run", str(checkpoint), mesh)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(mesh, {k: out[k] for k in ("forward_max_diff", "sharded_vs_fp64", "logit_scale", "fp32_floor", "check_diff",
                                     "ablate_diff", "heal_param_max_diff", "heal_loss_diff",
                                     "heal_held_out_diff")})
    assert out["devices"] == 8
    # each device holds only its shard: q_proj (layers 4, embed 64, heads 8, head_dim 8)
    assert out["specs"]["layers.self_attn.q_proj.weight"] == q_spec
    assert out["shard_shapes"]["layers.self_attn.q_proj.weight"] == [list(q_shard)]
    assert out["healed_spec"] == q_spec
    if mesh.startswith("data="):  # the batch of 8 sequences is split over the 2 data groups
        assert out["logits_spec"][0] == "data"
    # sharding reorders sums (fsdp splits the contraction over embed) and compiles other GEMM kernels: the
    # sharded fp32 logits: within twice the one-device fp32 distance from float64 (the fp32 floor), and
    # within 3x that floor of the one-device logits
    assert out["sharded_vs_fp64"] <= 2 * out["fp32_floor"] and out["forward_max_diff"] <= 3 * out["fp32_floor"]
    assert max(out["check_diff"].values()) <= 1e-5
    assert out["ablate_diff"] <= 1e-5
    assert out["generate_equal"]
    assert out["heal_param_max_diff"] <= 1e-5 and out["heal_loss_diff"] <= 1e-5 and out["heal_held_out_diff"] <= 1e-5


@pytest.mark.parametrize("mesh", ["fsdp=8", "fsdp=2,tp=4"])
def test_each_byte_of_the_checkpoint_is_read_once_over_the_mesh(checkpoint, mesh):
    done = run_sharded("-m", "tests.sharded_reads", str(checkpoint), mesh)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(mesh, out)
    assert out["same_values"]
    # one device reads every tensor once, in one run each; on the mesh each device reads exactly the bytes of
    # its own shards (contiguous rows or strided columns), not 8 copies of every tensor: with fsdp=8 every
    # tensor is split, so the 8 devices together read the checkpoint once; with tp=4 the norm gains (split
    # only over fsdp) are held, and read, by 4 devices each
    assert out["one_device"]["bytes"] == out["tensor_bytes"] and out["one_device"]["reads"] == 39
    assert out["mesh"]["bytes"] == out["shard_bytes"]
    if mesh == "fsdp=8":
        assert out["mesh"]["bytes"] == out["tensor_bytes"] <= out["file_bytes"]
    else:
        assert out["mesh"]["bytes"] - out["tensor_bytes"] == 3 * (2 * 4 + 1) * 64 * 4


def test_a_mesh_that_does_not_divide_is_refused(checkpoint):
    code = ("import expand; from expand.sharding import make_mesh, parse_mesh, placement; "
            f"c = expand.read_config({str(checkpoint)!r}); placement(c, make_mesh(parse_mesh('fsdp=1,tp=8')))")
    done = run_sharded("-c", code)
    assert done.returncode != 0
    assert "mesh axis tp=8 does not divide kv_heads=4" in done.stderr


def test_mesh_text_errors():
    from expand.sharding import make_mesh, parse_mesh

    with pytest.raises(ValueError, match="AXIS=SIZE"):
        parse_mesh("dp=2")
    assert parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tp": 1}
    with pytest.raises(ValueError, match="needs 8 devices but 1"):
        make_mesh(parse_mesh("fsdp=8"), devices=["cpu0"])


@pytest.mark.slow
def test_cli_check_on_a_mesh_equals_one_device(checkpoint, tmp_path):
    common = ["check", str(checkpoint), "--layer-spec", "0:3,1:", "--random-tokens", "--seq-len", "32",
              "--num-sequences", "2"]
    sharded = run_sharded("-m", "expand.cli", *common, "--mesh", "fsdp=2,tp=4", "--json", str(tmp_path / "a.json"))
    single = run_sharded("-m", "expand.cli", *common, "--json", str(tmp_path / "b.json"))
    assert sharded.returncode == single.returncode == 1, sharded.stderr[-2000:]  # a plain duplicate drifts
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert abs(a["mean_kl"] - b["mean_kl"]) <= 1e-5 and a["top1_agreement"] == b["top1_agreement"]
