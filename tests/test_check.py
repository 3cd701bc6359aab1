"""The function-preservation check: verdicts, the first drifting layer, the measured floor, exit codes,
and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

import expand
from expand.check import check, run_base
from expand.cli import main
from expand.surgery.grow import widen_model
from tests.helpers import make_hf_checkpoint, random_tokens


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return expand.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(256, (2, 128), seed=12)


@pytest.fixture(scope="module")
def base_run(base, tokens):
    return run_base(base, tokens, "fp32")


def test_floor_is_measured(base_run):
    assert 1e-8 < base_run.floor < 1e-4  # fp32 vs fp64 of the same model on these tokens
    assert len(base_run.layer_floor) == 5 and all(f > 0 for f in base_run.layer_floor[1:])


@pytest.mark.parametrize("build, verdict", [
    (lambda m: expand.with_identity(expand.plan_from_layer_spec("0:3,1:", 4), duplicates=True), "preserved"),
    (lambda m: widen_model(m, hidden_size=96, num_attention_heads=12, num_key_value_heads=3), "preserved"),
    (lambda m: widen_model(m, hidden_size=128, num_attention_heads=16, num_key_value_heads=4, intermediate_size=320,
                           mode="duplicate"), "preserved"),
    (lambda m: expand.plan_from_layer_spec("0:3,1:", 4), "drifted"),
    (lambda m: expand.plan_from_layer_spec("0,1,3", 4), "drifted"),
    (lambda m: widen_model(m, hidden_size=96, num_attention_heads=12, num_key_value_heads=3, mode="frankenllama"),
     "drifted"),
])
def test_verdicts(base, tokens, base_run, build, verdict):
    report = check(base, build(base), tokens=tokens, base_run=base_run)
    print(report.candidate, report.verdict, f"{report.max_abs_logit_delta:.2e}", f"floor {report.floor:.1e}")
    assert report.verdict == verdict
    if verdict == "preserved":
        assert report.top1_agreement == 1.0 and report.first_drift_layer is None
    else:
        assert report.max_abs_logit_delta > 100 * report.floor and report.mean_kl > 0


def test_names_the_first_drifting_layer_of_a_change_in_the_middle(base, tokens, base_run):
    plan = expand.with_slot_scale(expand.plan_from_layer_spec("all", 4), 2, "layers.mlp.down_proj.weight", 0.7)
    report = check(base, plan, tokens=tokens, base_run=base_run)
    assert report.verdict == "drifted"
    assert report.first_drift_layer == 2
    assert [layer["drifted"] for layer in report.layers] == [False, False, True, True]


def test_deletion_drifts_from_the_slot_after_the_gap(base, tokens, base_run):
    report = check(base, "0,1,3", tokens=tokens, base_run=base_run)
    assert [layer["base_layer"] for layer in report.layers] == [0, 1, 3]
    assert report.first_drift_layer == 2


def test_check_on_smollm2(smollm2, license_tokens):
    tokens = license_tokens[:, :512]
    run = run_base(smollm2, tokens, "fp32")
    assert check(smollm2, expand.llama_pro_plan(30, 36), tokens=tokens, base_run=run).preserved
    pruned = check(smollm2, "0:20,25:", tokens=tokens, base_run=run)
    assert pruned.verdict == "drifted" and pruned.first_drift_layer == 20


# ---- the command ------------------------------------------------------------------------------------------


def test_exit_codes_and_outputs(tmp_path, tiny_checkpoint):
    out = tmp_path / "grown"
    assert main(["depth", str(tiny_checkpoint), str(out), "--layer-spec", "0:3,1:", "--identity", "duplicates"]) == 0
    common = ["--random-tokens", "--seq-len", "64", "--num-sequences", "2"]
    assert main(["check", str(tiny_checkpoint), str(out), *common, "--json", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "r.png")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "preserved"
    assert [x["base_layer"] for x in report["layers"]] == [0, 1, 2, 2, 2, 3]  # identity copies repeat layer 2
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert main(["check", str(tiny_checkpoint), "--layer-spec", "0:3,1:", *common]) == 1
    assert main(["check", str(tiny_checkpoint), str(tmp_path / "missing"), *common]) == 2


def test_bad_input(tmp_path, tiny_checkpoint, base, tokens, capsys):
    other_vocab = make_hf_checkpoint(tmp_path / "vocab", vocab_size=300)
    with pytest.raises(ValueError, match="vocab"):
        check(base, other_vocab, tokens=tokens)
    deeper = make_hf_checkpoint(tmp_path / "deeper", num_hidden_layers=6)
    with pytest.raises(ValueError, match="no provenance"):
        check(base, deeper, tokens=tokens)
    assert main(["check", str(tiny_checkpoint), str(deeper), "--random-tokens"]) == 2
    assert "no provenance" in capsys.readouterr().err
    np.testing.assert_equal(base.config.num_hidden_layers, 4)


@pytest.mark.parametrize("where", ["down_proj", "lm_head_row", "embedding_row"])
def test_a_non_finite_model_is_never_preserved(tmp_path, tiny_checkpoint, where, capsys):
    """One NaN weight: XLA's max skips NaNs, so without the finite check the report looked preserved."""
    from expand.io.safetensors import SafetensorsSource

    model = expand.load(tiny_checkpoint)
    params = dict(model.params)
    if where == "down_proj":
        params["layers.mlp.down_proj.weight"] = params["layers.mlp.down_proj.weight"].at[2, 5, 7].set(np.nan)
    elif where == "lm_head_row":
        params["lm_head.weight"] = params["lm_head.weight"].at[:, 17].set(np.nan)
    else:
        params["embed_tokens.weight"] = params["embed_tokens.weight"].at[40].set(np.inf)
    broken = expand.save(tmp_path / "broken", model.config, params)
    tokens = np.arange(3, 3 + 2 * 48).reshape(2, 48) % 250 + 3
    report = check(model, expand.load(broken), tokens=tokens)
    assert report.verdict == "non-finite" and not report.preserved
    assert np.isnan(report.max_abs_logit_delta) and report.nonfinite_positions > 0
    assert report.first_nonfinite_slot == {"down_proj": 2, "lm_head_row": None, "embedding_row": -1}[where]
    before = SafetensorsSource(broken).read("lm_head.weight").copy()
    assert main(["check", str(tiny_checkpoint), str(broken), "--random-tokens", "--seq-len", "48",
                 "--num-sequences", "2"]) == 1
    out = capsys.readouterr().out
    assert "non-finite" in out
    if where == "embedding_row":  # token 40 may not be among the random tokens: the weights still say it
        assert "embed_tokens.weight" in out
    np.testing.assert_array_equal(SafetensorsSource(broken).read("lm_head.weight"), before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_compare_with_flags_each_non_finite_candidate_logit_where_it_is(bad):
    """compare_with derives the candidate's finiteness from its log-partition and max |dlogit| (no pass of
    its own): a NaN, +inf or -inf logit is flagged at its position and nowhere else; the finite positions'
    numbers equal a float64 NumPy computation."""
    from scipy.special import log_softmax

    from expand.check import compare_logits

    rng = np.random.default_rng(3)
    base_logits = rng.normal(size=(2, 6, 50)).astype(np.float32) * 3
    logits = base_logits + rng.normal(size=base_logits.shape).astype(np.float32)
    tokens = rng.integers(0, 50, (2, 6))
    logits[1, 2, 7] = bad
    out = {k: np.asarray(v) for k, v in compare_logits(base_logits, logits, tokens).items()}
    flagged = np.zeros((2, 6), bool)
    flagged[1, 2] = True
    np.testing.assert_array_equal(out["finite"], ~flagged)
    assert out["max_abs_delta"][1, 2] == np.inf
    with np.errstate(invalid="ignore"):  # the flagged row
        log_p, log_q = log_softmax(base_logits.astype(np.float64), -1), log_softmax(logits.astype(np.float64), -1)
    ok = ~flagged
    np.testing.assert_allclose(out["kl"][ok], (np.exp(log_p) * (log_p - log_q)).sum(-1)[ok], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["max_abs_delta"][ok], np.abs(logits - base_logits).max(-1)[ok], rtol=1e-6)
    nll = -np.take_along_axis(log_q[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(out["nll"][ok[:, :-1]], nll[ok[:, :-1]], rtol=1e-5)
    np.testing.assert_array_equal(out["agree"][ok], (logits.argmax(-1) == base_logits.argmax(-1))[ok])
