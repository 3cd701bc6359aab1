"""Healing: the distillation loss falls, frozen tensors keep their bits, shared layers move by lr/k, gates
at 0 are the identity and fold into the weights, kill-and-resume equals an uninterrupted run, and a
diverging run stops keeping its last good checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

import expand
from expand.heal import HealDiverged, HealOptions, export, heal, make_student
from expand.model import forward
from tests.conftest import random_tokens


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return expand.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(256, (8, 33), seed=21).astype(np.int32)


GROWN = "0:3,1:"  # 4 -> 6 layers; layers 1 and 2 run twice


def plan(base, identity=False):
    p = expand.plan_from_layer_spec(GROWN, base.config.num_hidden_layers)
    return expand.with_identity(p, duplicates=True) if identity else p


def test_distillation_loss_falls(base, tokens):
    options = HealOptions(steps=10, lr=1e-3, warmup=0, batch_size=4, lm_weight=0.0)
    result = heal(base, tokens, plan(base), teacher=base, options=options)
    kl = [h["kl"] for h in result.history]  # 8 rows in batches of 4: even steps see the same batch
    print("KL to the base (pure distillation):", [round(k, 3) for k in kl])
    assert kl[8] < 0.5 * kl[0] and kl[9] < 0.5 * kl[1] and result.history[0]["loss"] == kl[0]


def test_frozen_tensors_keep_their_bits(base, tokens):
    options = HealOptions(steps=3, lr=1e-2, warmup=0, train="new", shared="decoupled")
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
    options = HealOptions(steps=1, lr=lr, warmup=0, clip=1e9)
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


def test_gates_train_from_zero(base, tokens):
    result = heal(base, tokens, plan(base), teacher=None,
                  options=HealOptions(steps=2, lr=1e-2, warmup=0, gates=True, shared="decoupled"))
    assert np.abs(np.asarray(result.params["gates"])).min() > 0
    healed = result.export()
    assert healed.config.num_hidden_layers == 6 and "gates" not in healed.params


def test_gates_take_their_own_learning_rate(base, tokens):
    lr, gate_lr = 1e-4, 1e-2
    options = HealOptions(steps=1, lr=lr, gate_lr=gate_lr, warmup=0, clip=1e9, gates=True, shared="decoupled")
    result = heal(base, tokens, plan(base), options=options)
    # Adam's first step moves each entry with a non-negligible gradient by its group's learning rate; the
    # gated slots' own weights get no gradient while their gates are 0
    np.testing.assert_allclose(np.abs(np.asarray(result.params["gates"])), gate_lr, rtol=1e-3)
    delta = np.abs(np.asarray(result.params["layers.mlp.up_proj.weight"]) -
                   np.asarray(make_student(base, plan(base), options).params["layers.mlp.up_proj.weight"]))
    np.testing.assert_allclose(delta.reshape(6, -1).max(axis=1), [lr, lr, lr, 0, 0, lr], rtol=1e-3)


def test_kill_and_resume_equals_an_uninterrupted_run(base, tokens, tmp_path):
    options = HealOptions(steps=6, lr=3e-3, warmup=2, batch_size=4, checkpoint_every=2)
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
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    for name in whole.params:
        np.testing.assert_array_equal(np.asarray(resumed.params[name]), np.asarray(whole.params[name]), err_msg=name)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(base, tokens, tmp_path):
    options = HealOptions(steps=6, lr=1e30, warmup=0, clip=1e30, checkpoint_every=1)
    with pytest.raises(HealDiverged, match="non-finite at step 2.*last good checkpoint is step 1"):
        heal(base, tokens, plan(base), options=options, checkpoint_dir=tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["1"]


@pytest.mark.parametrize("options, message", [
    (HealOptions(train="new"), "needs --shared decoupled"),
    (HealOptions(train="some"), "train must be"),
    (HealOptions(shared="linked"), "shared must be"),
    (HealOptions(lr=0), "learning rate"),
    (HealOptions(gate_lr=1e-2), "needs gates=True"),
])
def test_bad_options(base, tokens, options, message):
    with pytest.raises(ValueError, match=message):
        heal(base, tokens, plan(base), options=options)


def test_no_new_slots(base, tokens):
    with pytest.raises(ValueError, match="no new slots"):
        heal(base, tokens, None, options=HealOptions(train="new", shared="decoupled"))


def test_cli_heals_a_grown_model_into_a_plain_checkpoint(tmp_path, tiny_checkpoint):
    import json

    from expand.cli import main

    out = tmp_path / "healed"
    args = ["heal", str(tiny_checkpoint), str(out), "--layer-spec", GROWN, "--identity", "duplicates", "--gates",
            "--shared", "decoupled", "--train", "new", "--teacher", str(tiny_checkpoint), "--random-tokens",
            "--seq-len", "33", "--num-sequences", "8", "--steps", "4", "--lr", "1e-3", "--warmup", "0",
            "--checkpoint-every", "2"]
    assert main(args) == 0
    healed = expand.load(out)
    assert healed.config.num_hidden_layers == 6 and "gates" not in healed.params
    assert healed.provenance.layer_map == (0, 1, 2, 2, 2, 3)  # identity copies keep the base's correspondence
    assert healed.provenance.history[-1]["op"] == "heal"
    assert len(json.loads((out / "history.json").read_text())) == 4 and (out / "loss.png").stat().st_size > 1000
    assert (tmp_path / "healed.checkpoints" / "4").is_dir()
    assert main(args) == 2  # OUT exists and no --force
