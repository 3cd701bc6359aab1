"""Healing: with a teacher and default options a one-layer deletion heals on held-out windows, the chunked
loss equals the plain one, frozen tensors keep their bits, shared layers move by lr/k, gates at 0 are the
identity and fold into the weights, kill-and-resume and extending a finished run equal an uninterrupted run
bit for bit, a refused resume names the option, non-finite weights are refused before step 1, a diverging
run stops keeping its last good checkpoint, and the CLI writes its output whole or not at all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import expand
from expand.heal import HealDiverged, HealOptions, export, heal, make_student
from expand.heal.loss import heal_loss, teacher_views
from expand.heal.optimizer import clip_by_global_norm
from expand.model import forward
from expand.numerics import kl_divergence, next_token_nll
from tests.helpers import random_tokens

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return expand.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(256, (8, 33), seed=21).astype(np.int32)


GROWN = "0:3,1:"  # 4 -> 6 layers; layers 1 and 2 run twice
PRUNED = "0,2:"  # layer 1 deleted


def plan(base, identity=False, spec=GROWN):
    p = expand.plan_from_layer_spec(spec, base.config.num_hidden_layers)
    return expand.with_identity(p, duplicates=True) if identity else p


def test_distillation_loss_falls(base, tokens):
    options = HealOptions(steps=10, lr=1e-3, warmup=0, batch_size=4, lm_weight=0.0, keep="last")
    result = heal(base, tokens, plan(base), teacher=base, options=options)
    kl = [h["kl"] for h in result.history]  # 7 training rows (one held out) in batches of 4
    print("KL to the base (pure distillation):", [round(k, 3) for k in kl])
    assert kl[8] < 0.5 * kl[0] and kl[9] < 0.5 * kl[1] and result.history[0]["loss"] == kl[0]


def test_default_healing_lowers_the_held_out_kl_of_a_deletion(base):
    tokens = random_tokens(256, (40, 33), seed=5).astype(np.int32)
    result = heal(base, tokens, plan(base, spec=PRUNED), teacher=base)  # default options
    before, kept = result.before, result.kept
    print("held-out KL to the teacher:", [round(e["kl"], 4) for e in result.held_out], "kept step", result.kept_step)
    assert result.windows == {"train": [36, 33], "held_out": [4, 33]}
    assert before["step"] == 0 and before["kl"] > 0.05
    curve = [e["kl"] for e in result.held_out]  # the default lr (3e-5) moves a random tiny model slowly, steadily
    assert all(later < earlier for earlier, later in zip(curve, curve[1:]))
    assert result.kept_step == 100 and kept["kl"] < 0.95 * before["kl"] and result.improved
    assert all(h["lm"] > 0 for h in result.history) and result.history[0]["loss"] == result.history[0]["kl"]
    assert result.verdict().startswith("held-out KL to the teacher went down")


def test_chunked_loss_and_its_gradient_equal_the_plain_loss(base, tokens):
    options = HealOptions(lm_weight=0.5, distill_weight=2.0, loss_chunk=7)  # 4 x 32 = 128 positions, 19 chunks
    student = make_student(base, plan(base), options)
    batch = tokens[:4]
    teacher = teacher_views(base)(batch)

    def chunked(params):
        return heal_loss(params, batch, teacher, student, options)

    def plain(params):
        logits = forward(params, batch[:, :-1], student.config, layer_ids=student.layer_ids,
                         slot_scales=student.scales)
        lm = next_token_nll(logits, batch).mean()
        kl = kl_divergence(forward(base.params, batch[:, :-1], base.config), logits).mean()
        return 0.5 * lm + 2.0 * kl, (lm, kl)

    (loss, (lm, kl)), grads = jax.value_and_grad(chunked, has_aux=True)(student.params)
    (loss0, (lm0, kl0)), grads0 = jax.value_and_grad(plain, has_aux=True)(student.params)
    print("loss", float(loss), float(loss0), "kl", float(kl), float(kl0))
    np.testing.assert_allclose([loss, lm, kl], [loss0, lm0, kl0], rtol=1e-6)
    for name in grads0:
        scale = float(np.abs(grads0[name]).max())
        np.testing.assert_allclose(grads[name], grads0[name], rtol=1e-6, atol=1e-6 * scale, err_msg=name)


def test_remat_computes_the_same_gradient(base, tokens):
    batch = tokens[:4]
    teacher = teacher_views(base)(batch)
    grads = {}
    for remat in (False, True):
        options = HealOptions(lm_weight=0.5, remat=remat)
        student = make_student(base, plan(base), options)
        grads[remat] = jax.grad(lambda p: heal_loss(p, batch, teacher, student, options)[0])(student.params)
    # the recomputed forward is fused with the backward pass, so sums are rounded in another order: equal
    # to fp32 rounding accumulated through six layers and their transposes, not bit for bit
    for name, g in grads[False].items():
        np.testing.assert_allclose(grads[True][name], g, rtol=1e-5, atol=1e-5 * float(np.abs(g).max()), err_msg=name)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clips / does not clip
def test_clipping_by_one_factor_equals_optax(max_norm):
    rng = np.random.default_rng(0)
    grads = {"a": jnp.asarray(rng.normal(size=(30, 7)), jnp.float32), "b": jnp.asarray(rng.normal(size=5), jnp.float32)}
    ours, _ = clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    assert float(optax.global_norm(grads)) > 0.5
    for name in grads:  # u * (c / n) against (u / n) * c: one rounding apart at most
        np.testing.assert_allclose(ours[name], theirs[name], rtol=2e-7, atol=0, err_msg=name)


def test_frozen_tensors_keep_their_bits(base, tokens):
    options = HealOptions(steps=3, lr=1e-2, warmup=0, train="new", shared="decoupled", keep="last")
    result = heal(base, tokens, plan(base, identity=True), teacher=base, options=options)
    before = result.student.params
    new = [3, 4]  # the second runs of layers 1 and 2
    for name, value in result.params.items():
        old, now = np.asarray(before[name]), np.asarray(value)
        if name.startswith("layers."):
            keep = [i for i in range(6) if i not in new]
            assert old[keep].tobytes() == now[keep].tobytes(), name
        else:
            assert old.tobytes() == now.tobytes(), name
    moved = np.asarray(result.params["layers.self_attn.o_proj.weight"])[new]
    assert np.abs(moved - np.asarray(before["layers.self_attn.o_proj.weight"])[new]).max() > 0


def test_shared_layers_move_by_lr_over_k(base, tokens):
    lr = 1e-3
    options = HealOptions(steps=1, lr=lr, warmup=0, clip=1e9, keep="last")
    result = heal(base, tokens, plan(base), options=options)
    delta = np.abs(np.asarray(result.params["layers.mlp.up_proj.weight"]) -
                   np.asarray(base.params["layers.mlp.up_proj.weight"])).reshape(4, -1).max(axis=1)
    # Adam's first step moves every entry with a non-negligible gradient by the learning rate
    np.testing.assert_allclose(delta, [lr, lr / 2, lr / 2, lr], rtol=1e-3)


def test_gates_at_zero_are_the_identity_and_fold_into_the_weights(base, tokens):
    options = HealOptions(gates=True)
    student = make_student(base, plan(base), options)
    assert student.gated_slots == (3, 4)
    gated = forward({k: v for k, v in student.params.items() if k != "gates"}, tokens, student.config,
                    layer_ids=student.layer_ids, slot_scales=student.slot_scales(student.params["gates"]))
    np.testing.assert_allclose(gated, forward(base.params, tokens, base.config), atol=1e-5)
    params = dict(student.params, gates=np.asarray([0.3, -0.7], np.float32))
    gated = forward({k: v for k, v in params.items() if k != "gates"}, tokens, student.config,
                    layer_ids=student.layer_ids, slot_scales=student.slot_scales(params["gates"]))
    config, folded = export(student, params)
    assert config.num_hidden_layers == 6 and "gates" not in folded
    np.testing.assert_allclose(forward(folded, tokens, config), gated, atol=1e-5)


def test_gated_runs_are_judged_on_the_gated_plan(base, tokens):
    result = heal(base, tokens, plan(base), teacher=base,
                  options=HealOptions(steps=2, lr=1e-2, warmup=0, gates=True, shared="decoupled", keep="last"))
    assert result.before["kl"] < 1e-9 and result.before["top1"] == 1.0  # gates at 0: the teacher itself
    assert np.abs(np.asarray(result.params["gates"])).min() > 0
    healed = result.export()
    assert healed.config.num_hidden_layers == 6 and "gates" not in healed.params


def test_gates_take_their_own_learning_rate(base, tokens):
    lr, gate_lr = 1e-4, 1e-2
    options = HealOptions(steps=1, lr=lr, gate_lr=gate_lr, warmup=0, clip=1e9, gates=True, shared="decoupled",
                          keep="last")
    result = heal(base, tokens, plan(base), options=options)
    # Adam's first step moves each entry with a non-negligible gradient by its group's learning rate; the
    # gated slots' own weights get no gradient while their gates are 0
    np.testing.assert_allclose(np.abs(np.asarray(result.params["gates"])), gate_lr, rtol=1e-3)
    delta = np.abs(np.asarray(result.params["layers.mlp.up_proj.weight"]) -
                   np.asarray(make_student(base, plan(base), options).params["layers.mlp.up_proj.weight"]))
    np.testing.assert_allclose(delta.reshape(6, -1).max(axis=1), [lr, lr, lr, 0, 0, lr], rtol=1e-3)


def assert_same_run(a, b):
    assert a.history == b.history and a.held_out == b.held_out and a.kept_step == b.kept_step
    for name in b.params:
        np.testing.assert_array_equal(np.asarray(a.params[name]), np.asarray(b.params[name]), err_msg=name)


def test_kill_and_resume_equals_an_uninterrupted_run(base, tokens, tmp_path):
    options = HealOptions(steps=6, lr=3e-3, warmup=2, batch_size=4, checkpoint_every=2, eval_every=2)
    whole = heal(base, tokens, plan(base), teacher=base, options=options, checkpoint_dir=tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_after_5(step, logs):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        heal(base, tokens, plan(base), teacher=base, options=options, checkpoint_dir=tmp_path / "run",
             on_step=kill_after_5)
    with pytest.raises(ValueError, match="resume"):
        heal(base, tokens, plan(base), teacher=base, options=options, checkpoint_dir=tmp_path / "run")
    resumed = heal(base, tokens, plan(base), teacher=base, options=options, checkpoint_dir=tmp_path / "run",
                   resume=True)
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    assert_same_run(resumed, whole)


@pytest.mark.parametrize("keep", ["best", "last"])
def test_extending_a_finished_run_equals_one_longer_run(base, tokens, tmp_path, keep):
    options = HealOptions(steps=8, lr=3e-3, warmup=3, checkpoint_every=3, eval_every=2, keep=keep)
    longer = heal(base, tokens, plan(base), teacher=base, options=options)
    short = HealOptions(**{**options.to_json(), "steps": 4})
    first = heal(base, tokens, plan(base), teacher=base, options=short, checkpoint_dir=tmp_path / "run")
    assert [e["step"] for e in first.held_out] == [0, 2, 4]
    extended = heal(base, tokens, plan(base), teacher=base, options=options, checkpoint_dir=tmp_path / "run",
                    resume=True)
    assert_same_run(extended, longer)


def test_a_refused_resume_names_the_option_and_the_fix(base, tokens, tmp_path):
    options = HealOptions(steps=2, lr=3e-3, warmup=0)
    heal(base, tokens, plan(base), teacher=base, options=options, checkpoint_dir=tmp_path / "run")
    for changed, message in [(dict(lr=1e-3), "lr differs: the checkpoints were made with --lr 0.003.*Run again "
                                             "with --lr 0.003"),
                             (dict(decay_steps=5), "decay_steps differs.*Run again with no --decay-steps"),
                             (dict(steps=1), "at step 2, past the 1 steps asked for; pass --steps 2")]:
        with pytest.raises(ValueError, match=message):
            heal(base, tokens, plan(base), teacher=base, options=HealOptions(**{**options.to_json(), **changed}),
                 checkpoint_dir=tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="training tokens differ"):
        heal(base, tokens[::-1], plan(base), teacher=base, options=options, checkpoint_dir=tmp_path / "run",
             resume=True)
    with pytest.raises(ValueError, match="made with a teacher; run again with --teacher"):
        heal(base, tokens, plan(base), options=options, checkpoint_dir=tmp_path / "run", resume=True)


def test_non_finite_weights_are_refused_before_step_1(base, tokens):
    up = np.array(base.params["layers.mlp.up_proj.weight"])
    up[2, 5, 7] = np.nan
    broken = expand.Model(base.config, {**base.params, "layers.mlp.up_proj.weight": up}, source="broken")
    with pytest.raises(ValueError, match=r"student's weights are not finite before healing: "
                                         r"layers.mlp.up_proj.weight, layer 2 \(1 NaN or inf"):
        heal(broken, tokens, plan(base), teacher=base)
    with pytest.raises(ValueError, match="teacher's weights are not finite.*layer 2") as refused:
        heal(base, tokens, plan(base), teacher=broken)
    assert "learning rate" not in str(refused.value)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(base, tokens, tmp_path):
    options = HealOptions(steps=6, lr=1e30, warmup=0, clip=1e30, checkpoint_every=1)
    with pytest.raises(HealDiverged, match="non-finite at step 2.*last good checkpoint is step 1.*finite before "
                                           "step 1: lower the learning rate"):
        heal(base, tokens, plan(base), options=options, checkpoint_dir=tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["1"]


@pytest.mark.parametrize("options, message", [
    (HealOptions(train="new"), "needs --shared decoupled"),
    (HealOptions(train="some"), r"train \(--train\) must be"),
    (HealOptions(shared="linked"), r"shared \(--shared\) must be"),
    (HealOptions(lr=0), r"lr \(--lr\), the learning rate, must be positive"),
    (HealOptions(gate_lr=1e-2), "needs gates=True"),
    (HealOptions(keep="worst"), r"keep \(--keep\) must be"),
    (HealOptions(held_out=1.0), r"held_out \(--held-out\) is the fraction"),
    (HealOptions(warmup=10, decay_steps=10), r"decay_steps \(--decay-steps\)"),
    (HealOptions(eval_every=0, loss_chunk=0),
     r"^eval_every \(--eval-every\), loss_chunk \(--loss-chunk\) must be at least 1$"),
    (HealOptions(lm_weight=0.0), "nothing to train on .without a teacher"),
])
def test_bad_options(base, tokens, options, message):
    with pytest.raises(ValueError, match=message):
        heal(base, tokens, plan(base), options=options)


def test_bad_tokens(base, tokens):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        heal(base, tokens + 300, plan(base))
    with pytest.raises(ValueError, match="too few to hold 1 out"):
        heal(base, tokens[:1], plan(base))


def test_no_new_slots(base, tokens):
    with pytest.raises(ValueError, match="no new slots"):
        heal(base, tokens, None, options=HealOptions(train="new", shared="decoupled"))


def heal_args(checkpoint, out, *extra):
    return ["heal", str(checkpoint), str(out), "--layer-spec", GROWN, "--teacher", str(checkpoint), "--random-tokens",
            "--seq-len", "33", "--num-sequences", "8", "--lr", "1e-3", "--warmup", "0", *extra]


def test_cli_heals_a_grown_model_into_a_plain_checkpoint(tmp_path, tiny_checkpoint, capsys):
    from expand.cli import main

    out = tmp_path / "healed"
    args = heal_args(tiny_checkpoint, out, "--identity", "duplicates", "--gates", "--shared", "decoupled", "--train",
                     "new", "--steps", "4", "--checkpoint-every", "2", "--eval-every", "2")
    assert main(args) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("held-out KL to the teacher")
    healed = expand.load(out)
    assert healed.config.num_hidden_layers == 6 and "gates" not in healed.params
    assert healed.provenance.layer_map == (0, 1, 2, 2, 2, 3)  # identity copies keep the base's correspondence
    assert healed.provenance.history[-1]["op"] == "heal"
    record = json.loads((out / "history.json").read_text())
    assert len(record["train"]) == 4 and [e["step"] for e in record["held_out"]] == [0, 2, 4]
    assert record["windows"] == {"train": [7, 33], "held_out": [1, 33]}
    assert (out / "loss.png").stat().st_size > 1000
    assert (tmp_path / "healed.checkpoints" / "4").is_dir()
    assert main(args) == 2  # OUT exists and no --force
    assert main(heal_args(tiny_checkpoint, tmp_path / "other", "--resume")) == 2
    assert "no run to continue" in capsys.readouterr().err


def test_cli_names_an_evaluation_text_too_short_to_judge_on(tmp_path, capsys):
    from expand.cli import main
    from tests.helpers import make_hf_checkpoint
    from tests.tiny_tokenizer import VOCAB_SIZE, save_tiny_tokenizer

    model = save_tiny_tokenizer(make_hf_checkpoint(tmp_path / "model", vocab_size=VOCAB_SIZE))
    (tmp_path / "empty.txt").write_text("")
    args = ["heal", str(model), str(tmp_path / "out"), "--teacher", str(model), "--seq-len", "16", "--steps", "1",
            "--eval-text", str(tmp_path / "empty.txt")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--eval-text {tmp_path / 'empty.txt'}: the text has 0 tokens" in err and "--eval-sequences" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_killed_mid_run_leaves_no_output_and_resumes_to_the_same_result(tmp_path, tiny_checkpoint):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    common = ["--steps", "300", "--checkpoint-every", "10", "--eval-every", "50"]
    killed_out = tmp_path / "killed"
    command = [sys.executable, "-m", "expand", *heal_args(tiny_checkpoint, killed_out, *common)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "killed.checkpoints"
    deadline = time.monotonic() + 600
    while not (checkpoints / "20").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]  # still training: kill it mid-run
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not killed_out.exists()
    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = subprocess.run([sys.executable, "-m", "expand", *heal_args(tiny_checkpoint, tmp_path / "whole", *common)],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    weights = sorted(p.name for p in killed_out.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert all((killed_out / n).read_bytes() == (tmp_path / "whole" / n).read_bytes() for n in weights)
    assert (json.loads((killed_out / "history.json").read_text()) ==
            json.loads((tmp_path / "whole" / "history.json").read_text()))
