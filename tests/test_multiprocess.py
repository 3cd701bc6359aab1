"""One command as 2 real OS processes on localhost (jax.distributed over gloo, 2 simulated CPU devices each,
one mesh of 4 devices), as a user runs it on two hosts: check, ablate and heal give the numbers of one
process on one device (fp32, within 1e-5 relative), only process 0 reports and writes, and both processes
exit with the same status."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import make_hf_checkpoint
from tests.processes import run_expand, run_expand_alone

pytestmark = pytest.mark.slow

TOKENS = ["--random-tokens", "--seq-len", "32", "--num-sequences", "4"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("multiprocess") / "model", num_key_value_heads=4)


def assert_close(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= RTOL * max(abs(a), abs(b)), f"{what}: {a} vs {b}"


def printed(run) -> list[str]:
    """What a process printed on stdout, without gloo's own connection lines."""
    return [line for line in run.stdout.splitlines() if not line.startswith("[Gloo]")]


def assert_ran(runs, alone, code: int) -> None:
    detail = "\n".join(f"process {i}: {r.stderr[-2000:]}" for i, r in enumerate(runs)) + f"\nalone: {alone.stderr[-2000:]}"
    assert [r.returncode for r in runs] == [code, code] and alone.returncode == code, detail


def test_check_on_two_processes_equals_one_device(checkpoint, tmp_path):
    args = ["check", str(checkpoint), "--layer-spec", "0:3,1:", *TOKENS]
    runs = run_expand(*args, "--mesh", "fsdp=4", "--json", str(tmp_path / "two.json"))
    alone = run_expand_alone(*args, "--json", str(tmp_path / "one.json"))
    assert_ran(runs, alone, 1)  # a plain duplicate drifts
    assert "drifted" in runs[0].stdout and printed(runs[1]) == []  # only process 0 reports
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    for key in ("max_abs_logit_delta", "mean_kl", "max_kl", "top1_agreement"):
        assert_close(two[key], one[key], key)
    assert two["verdict"] == one["verdict"] and two["first_drift_layer"] == one["first_drift_layer"] == 3
    for a, b in zip(two["layers"], one["layers"]):
        assert a["drifted"] == b["drifted"]
        if b["drifted"]:
            assert_close(a["drift"], b["drift"], f"drift of slot {b['slot']}")


def test_ablate_on_two_processes_equals_one_device(checkpoint, tmp_path):
    args = ["ablate", str(checkpoint), "--sweep", "delete-one", *TOKENS, "--batch-size", "2"]
    runs = run_expand(*args, "--mesh", "fsdp=2,tp=2", "--out", str(tmp_path / "two"))
    alone = run_expand_alone(*args, "--out", str(tmp_path / "one"))
    assert_ran(runs, alone, 0)
    two, one = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("two", "one"))
    assert [r["name"] for r in two["rows"]] == [r["name"] for r in one["rows"]] == [f"delete {i}" for i in range(4)]
    for a, b in zip([two["base"], *two["rows"]], [one["base"], *one["rows"]]):
        for key in ("loss", "mean_kl", "top1"):
            assert_close(a[key], b[key], f"{b.get('name', 'base')} {key}")
        np.testing.assert_allclose(a["windows"]["loss"], b["windows"]["loss"], rtol=RTOL)


def test_heal_on_two_processes_equals_one_device(checkpoint, tmp_path):
    from safetensors.numpy import load_file

    # Adam's update g / (|g| + eps) turns rounding-level differences of near-zero gradients into differences
    # of up to lr per step, so the weights are compared after steps of a small learning rate
    args = ["--layer-spec", "0:3,1:", "--teacher", str(checkpoint), "--steps", "3", "--lr", "1e-5", "--warmup", "0",
            "--batch-size", "2", "--held-out", "0.5", "--checkpoint-every", "2", *TOKENS]
    runs = run_expand("heal", str(checkpoint), str(tmp_path / "two"), *args, "--mesh", "data=2,fsdp=2")
    alone = run_expand_alone("heal", str(checkpoint), str(tmp_path / "one"), *args)
    assert_ran(runs, alone, 0)
    assert sorted(p.name for p in (tmp_path / "two.checkpoints").iterdir()) == ["2", "3"]  # orbax, every process
    two, one = (json.loads((tmp_path / n / "history.json").read_text()) for n in ("two", "one"))
    assert len(two["train"]) == len(one["train"]) == 3 and two["kept_step"] == one["kept_step"]
    for a, b in zip(two["train"] + two["held_out"], one["train"] + one["held_out"]):
        for key in ("lm", "kl"):
            assert_close(a[key], b[key], f"step {b['step']} {key}")
    w2, w1 = (load_file(tmp_path / n / "model.safetensors") for n in ("two", "one"))
    assert sorted(w2) == sorted(w1) and len(w1) == 6 * 9 + 3  # 6 slots materialized
    for name, value in w1.items():
        scale = np.abs(value).max()
        assert np.abs(w2[name] - value).max() <= RTOL * scale, name


def test_every_process_exits_with_process_zeros_refusal(checkpoint, tmp_path):
    (tmp_path / "taken").mkdir()
    runs = run_expand("ablate", str(checkpoint), "--sweep", "delete-one", *TOKENS, "--mesh", "fsdp=4", "--out",
                      str(tmp_path / "taken"))
    assert [r.returncode for r in runs] == [2, 2], [r.stderr[-2000:] for r in runs]
    assert "exists" in runs[0].stderr and "process 0 failed" in runs[1].stderr
