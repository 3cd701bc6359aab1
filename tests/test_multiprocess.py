"""One command as 2 real OS processes on localhost (jax.distributed over gloo, 2 simulated CPU devices each,
one mesh of 4 devices), as a user runs it on two hosts: check, ablate and heal give the numbers of one
process on one device (fp32, within 1e-5 relative), only process 0 reports and writes, and both processes
exit with the same status. And the ways such a run breaks: a process that never starts, processes given
different counts or one index twice, a process killed with SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from tests.helpers import make_hf_checkpoint
from tests.processes import free_port, rank_options, run_expand, run_expand_alone, start_expand

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


def check_command(checkpoint, port: int, processes: int, rank: int, timeout: int) -> list[str]:
    return ["check", str(checkpoint), "--layer-spec", "0:3,1:", *TOKENS, "--mesh", "fsdp=4",
            *rank_options(port, processes, rank), "--init-timeout", str(timeout)]


@pytest.mark.parametrize("rank, message", [(0, "process 1 of 2 did not check in at localhost:{port} within 5 s"),
                                           (1, "process 0 did not answer at localhost:{port} within 5 s")])
def test_a_process_started_alone_stops_within_its_timeout_naming_what_is_missing(checkpoint, rank, message):
    port = free_port()
    began = time.monotonic()
    [run] = start_expand([check_command(checkpoint, port, 2, rank, timeout=5)]).finish(timeout=120)
    assert run.returncode == 2 and message.format(port=port) in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and time.monotonic() - began < 60


@pytest.mark.parametrize("ranks, message", [
    ([(2, 0), (3, 1)], "process 1 was given --num-processes 3 and process 0 --num-processes 2"),
    ([(3, 0), (2, 1)], "process 1 was given --num-processes 2 and process 0 --num-processes 3"),
    ([(3, 0), (3, 1), (3, 1)], "two processes were given --process-id 1"),
])
def test_processes_that_disagree_on_who_runs_all_stop_at_once(checkpoint, ranks, message):
    """(--num-processes, --process-id) per process: every process exits 2 with the reason, long before the
    300 s it would wait for a process that is not coming."""
    port = free_port()
    began = time.monotonic()
    runs = start_expand([check_command(checkpoint, port, n, rank, timeout=300) for n, rank in ranks]).finish(120)
    assert [r.returncode for r in runs] == [2] * len(ranks), [r.stderr[-2000:] for r in runs]
    assert all(message in r.stderr and "Traceback" not in r.stderr for r in runs), [r.stderr[-2000:] for r in runs]
    assert time.monotonic() - began < 60


def committed_steps(checkpoints) -> list[int]:
    """The steps orbax finished saving under `checkpoints`."""
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


@pytest.mark.parametrize("killed, sent", [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGTERM)])
def test_a_process_killed_mid_heal_stops_the_other_and_the_run_resumes(checkpoint, tmp_path, killed, sent):
    """SIGKILL or SIGTERM to one of the two processes of a heal after its first checkpoint: the other
    stops within seconds (process 0 with exit 1 and a message, or, when its peer died inside a checkpoint's
    commit barrier, aborted by jax.distributed after its 20 s heartbeat timeout; process 1 is aborted by
    jax.distributed when process 0's coordination service is gone), no output appears, and both resume
    from the last checkpoint to the end."""
    out = tmp_path / "healed"
    args = ["heal", str(checkpoint), str(out), "--layer-spec", "0:3,1:", "--teacher", str(checkpoint),
            "--batch-size", "2", "--held-out", "0.5", "--checkpoint-every", "10", *TOKENS, "--mesh", "data=2,fsdp=2"]
    port = free_port()
    running = start_expand([[*args, "--steps", "100000", *rank_options(port, 2, rank)] for rank in (0, 1)])
    deadline = time.monotonic() + 300
    while not committed_steps(tmp_path / "healed.checkpoints") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert committed_steps(tmp_path / "healed.checkpoints"), "no checkpoint within 300 s"
    os.kill(running.children[killed].pid, sent)
    began = time.monotonic()
    runs = running.finish(timeout=120)
    survivor = runs[1 - killed]
    assert runs[killed].returncode == -sent and survivor.returncode != 0, survivor.stderr[-2000:]
    assert time.monotonic() - began < 30, survivor.stderr[-2000:]
    if killed == 1:
        stopped = survivor.returncode == 1 and "most likely another process stopped" in survivor.stderr
        assert stopped or survivor.returncode == -signal.SIGABRT, survivor.stderr[-2000:]
    # nothing partial: only the checkpoints, and the lock file of a killed process 0 (its flock died with it)
    assert {p.name for p in tmp_path.iterdir()} <= {"healed.checkpoints", ".healed.lock"} and not out.exists()

    last = committed_steps(tmp_path / "healed.checkpoints")[-1]
    resumed = run_expand(*args, "--steps", str(last + 3), "--resume")
    assert [r.returncode for r in resumed] == [0, 0], [r.stderr[-2000:] for r in resumed]
    history = json.loads((out / "history.json").read_text())
    assert [entry["step"] for entry in history["train"]][-4:] == [last, last + 1, last + 2, last + 3]
