"""Ablation sweeps: the numbers equal the check's (one path), one compilation per variant length, the
importance scores equal a direct numpy computation, greedy pruning takes the measured minimum, and bad
sweeps are refused before any compute."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import expand
from expand.ablate import ablate, eval_set, importance, parse_sweep, trunk_of, variant_logits, window_layers
from expand.check import check, run_base
from expand.cli import main
from expand.model import TRACE_COUNTS, forward, lm_loss
from expand.surgery.layerspec import parse_layer_spec
from tests.helpers import make_hf_checkpoint, random_tokens

LAYERS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ablate") / "model", seed=3, num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def model(checkpoint):
    return expand.load(checkpoint)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(256, (4, 40), seed=5).astype(np.int32)


@pytest.fixture(scope="module")
def delete_one(model, tokens):
    return ablate(model, "delete-one", tokens)


def test_sweep_numbers_are_the_checks(model, tokens, delete_one):
    base_run = run_base(model, tokens, "fp32")
    assert [row["layer_spec"] for row in delete_one.rows][:2] == ["1:6", "0,2:6"]
    for row in delete_one.rows:
        report = check(model, row["layer_spec"], tokens=tokens, base_run=base_run)
        assert row["max_abs_logit_delta"] == report.max_abs_logit_delta
        assert row["top1"] == pytest.approx(report.top1_agreement, abs=1e-12)  # a mean of window means
        np.testing.assert_allclose(row["mean_kl"], report.mean_kl, rtol=1e-5)
    assert delete_one.base["mean_kl"] == 0.0 and delete_one.base["top1"] == 1.0


def test_loss_and_params_equal_the_materialized_variant(model, tokens, delete_one):
    for row in delete_one.rows[::2]:
        plan = expand.plan_from_layer_spec(row["layer_spec"], LAYERS)
        config, params = expand.apply_depth(model.config, model.params, plan)
        np.testing.assert_allclose(row["loss"], float(lm_loss(params, tokens, config)), rtol=1e-5)
        assert row["params"] == expand.param_count(config)
        assert row["ppl"] == pytest.approx(np.exp(row["loss"]))


def test_one_compilation_per_variant_length(model):
    tokens = random_tokens(256, (2, 24), seed=6).astype(np.int32)  # a shape no other test compiles
    before = TRACE_COUNTS["forward"]
    table = ablate(model, "duplicate-one", tokens)
    # lengths 6 (base) and 7 (every variant), plus the base's forward with hidden states for importance
    assert table.lengths == [6, 7] and table.compilations == 3 == TRACE_COUNTS["forward"] - before
    again = ablate(model, "swap-adjacent", tokens)  # all variants have the base's length: nothing new
    assert len(again.rows) == LAYERS - 1 and again.compilations == 0


def test_variants_resume_after_their_shared_prefix(model, tokens):
    n = LAYERS
    plans = {spec: expand.plan_from_layer_spec(spec, n) for spec in ("0:6", "0:3,4:6", "0:4,3:6", "1:6", "0,2,1,3:6")}
    evals = eval_set(model, tokens[:2])
    assert [evals.base.shared_prefix(p) for p in plans.values()] == [6, 3, 4, 0, 1]
    # the skipped slots are not run: poisoning the stored layers before slot 3 leaves the resumed variant exact
    poisoned = {name: a.at[:3].set(np.nan) if name.startswith("layers.") else a for name, a in model.params.items()}
    plan = plans["0:3,4:6"]
    resumed = variant_logits(dataclasses.replace(model, params=poisoned), evals, 0, plan)
    full = forward(model.params, tokens[:2], model.config, layer_ids=plan.layer_ids)
    assert np.array_equal(np.asarray(resumed), np.asarray(full))
    # from another trunk (prune-greedy's current model): without layer 1, then also without layer 4; only
    # stored layer 5 runs, so every other layer is poisoned
    trunk = trunk_of(model, evals, expand.plan_from_layer_spec("0,2:6", n))
    deeper = expand.plan_from_layer_spec("0,2,3,5", n)
    assert trunk.shared_prefix(deeper) == 3 and evals.base.shared_prefix(deeper) == 1
    poisoned = {name: a.at[:5].set(np.nan) if name.startswith("layers.") else a for name, a in model.params.items()}
    resumed = variant_logits(dataclasses.replace(model, params=poisoned), evals, 0, deeper, trunk)
    full = forward(model.params, tokens[:2], model.config, layer_ids=deeper.layer_ids)
    assert np.array_equal(np.asarray(resumed), np.asarray(full))


def test_importance_matches_numpy(model, tokens):
    scores = importance(model, eval_set(model, tokens), block_sizes=(1, 2))
    _, hidden = forward(model.params, tokens, model.config, return_hidden=True)
    h = np.asarray(hidden, np.float64)  # (N + 1, B, T, d)

    def cos(a, b):
        return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    bi = [1 - cos(h[i], h[i + 1]).mean() for i in range(LAYERS)]
    np.testing.assert_allclose(scores["block_influence"], bi, rtol=1e-4, atol=1e-6)
    for n in (1, 2):
        angular = [np.mean(np.arccos(np.clip(cos(h[i, :, -1], h[i + n, :, -1]), -1, 1)) / np.pi)
                   for i in range(LAYERS - n + 1)]
        np.testing.assert_allclose(scores["angular_distance"][n], angular, rtol=1e-4, atol=1e-6)


def test_correlations_are_reported_for_deletions(delete_one):
    assert set(delete_one.correlations) == {"angular_distance_n1 vs mean_kl", "angular_distance_n1 vs loss_increase",
                                            "block_influence vs mean_kl", "block_influence vs loss_increase"}
    from scipy.stats import spearmanr

    measured = {"mean_kl": [r["mean_kl"] for r in delete_one.rows],
                "loss_increase": [r["loss"] - delete_one.base["loss"] for r in delete_one.rows]}
    scores = {"block_influence": delete_one.importance["block_influence"],
              "angular_distance_n1": delete_one.importance["angular_distance"][1]}
    for key, rho in delete_one.correlations.items():
        score, effect = key.split(" vs ")
        assert rho == pytest.approx(spearmanr(scores[score], measured[effect]).statistic, abs=1e-12)


def test_spearman_is_the_pearson_correlation_of_ranks():
    from expand.ablate import spearman

    x = np.random.default_rng(3).normal(size=40)
    y = x + np.random.default_rng(4).normal(size=40)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))  # no ties in continuous draws
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    assert spearman(x, x) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)


def test_prune_greedy_removes_the_measured_least_harmful_layer(model, tokens, delete_one):
    table = ablate(model, "prune-greedy:4", tokens)
    assert [r["depth"] for r in table.rows] == [5, 4]
    first = min(delete_one.rows, key=lambda r: r["mean_kl"])
    assert table.rows[0]["layer_spec"] == first["layer_spec"] and table.rows[0]["mean_kl"] == first["mean_kl"]
    assert table.rows[0]["candidates"] == 6 and table.rows[1]["candidates"] == 5
    kept = set(parse_layer_spec(table.rows[1]["layer_spec"], LAYERS))
    assert len(kept) == 4 and table.rows[0]["removed"] not in kept and table.rows[1]["removed"] not in kept
    # the second step ran from the first step's model; measured from the base, the numbers are the same
    again = ablate(model, [table.rows[1]["layer_spec"]], tokens).rows[0]
    assert all(again[m] == table.rows[1][m] for m in ("loss", "mean_kl", "top1", "max_abs_logit_delta"))


def test_prune_by_block_influence_follows_the_scores(model, tokens, delete_one):
    table = ablate(model, "prune-bi:3", tokens)
    order = np.argsort(delete_one.importance["block_influence"], kind="stable")
    assert [r["removed"] for r in table.rows] == order[:3].tolist()


def test_window_is_the_120b_pattern():
    assert window_layers(80, 20, 10) == list(parse_layer_spec("0:20,10:30,20:40,30:50,40:60,50:70,60:80", 80))
    assert window_layers(30, 10, 8) == list(parse_layer_spec("0:10,8:18,16:26,20:30", 30))


@pytest.mark.parametrize("sweep, message", [
    ("delete-two", "unknown sweep"),
    ("delete-one:3", "takes no argument"),
    ("delete-block:0", "at least 1"),
    ("delete-block:6", "1 <= N < 6"),
    ("delete-block:x", "not an integer"),
    ("window:8:2", "exceed"),
    ("window:2:3", "stride"),
    ("window:4", "window:W:S"),
    ("prune-greedy:6", "between 1 and 5"),
    ("specs:/no/such/file", "specs:FILE"),
])
def test_bad_sweeps_are_refused(sweep, message):
    with pytest.raises(ValueError, match=message):
        parse_sweep(sweep, LAYERS)


def test_bad_spec_file_names_the_line(tmp_path):
    specs = tmp_path / "specs.txt"
    specs.write_text("# deletions\n0:3,4:\n0:3,8:4\n")
    with pytest.raises(ValueError, match="spec 2: .*'8:4'"):
        parse_sweep(f"specs:{specs}", LAYERS)


def test_cli_writes_tables_and_plots(tmp_path, checkpoint, capsys):
    common = ["--random-tokens", "--seq-len", "32", "--num-sequences", "2"]
    out = tmp_path / "delete"
    assert main(["ablate", str(checkpoint), "--sweep", "delete-one", *common, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "compilations" in printed and "Spearman" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == LAYERS and results["tokens"] == [2, 32]
    assert (out / "results.csv").read_text().count("\n") == LAYERS + 2  # header, base, variants
    assert (out / "importance.png").stat().st_size > 1000 and (out / "effect.png").stat().st_size > 1000
    assert main(["ablate", str(checkpoint), "--sweep", "delete-one", *common, "--out", str(out)]) == 2
    grid = tmp_path / "grid"
    assert main(["ablate", str(checkpoint), "--sweep", "window:3,4:1,2", *common, "--out", str(grid)]) == 0
    assert len(json.loads((grid / "results.json").read_text())["rows"]) == 4
    assert (grid / "window.png").stat().st_size > 1000


def test_cli_refuses_a_bad_sweep_before_computing(checkpoint, capsys):
    before = TRACE_COUNTS["forward"]
    assert main(["ablate", str(checkpoint), "--sweep", "window:9:2", "--random-tokens"]) == 2
    assert "exceed" in capsys.readouterr().err and TRACE_COUNTS["forward"] == before


def test_a_nan_weight_marks_every_row_and_never_ranks_as_harmless(tiny_checkpoint):
    model = expand.load(tiny_checkpoint)
    params = dict(model.params)
    params["layers.mlp.down_proj.weight"] = params["layers.mlp.down_proj.weight"].at[2, 0, 0].set(np.nan)
    broken = expand.Model(model.config, params, "broken")
    tokens = np.random.default_rng(1).integers(3, 256, (2, 24)).astype(np.int32)
    table = ablate(broken, "prune-greedy:2", tokens)
    assert table.base["finite"] is False and np.isnan(table.base["mean_kl"])
    assert all(row["finite"] is False and np.isnan(row["loss"]) for row in table.rows)


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_more_windows(model):
    """Intervals come from resampling the eval windows: each holds its point estimate, and with four times
    the windows of the same kind of tokens the intervals are narrower."""
    from expand.ablate.spread import bootstrap

    few = np.random.default_rng(5).integers(3, 256, (4, 32)).astype(np.int32)
    many = np.random.default_rng(5).integers(3, 256, (16, 32)).astype(np.int32)
    widths = []
    for tokens in (few, many):
        table = ablate(model, "delete-one", tokens)
        for row in [table.base, *table.rows]:
            for metric, (low, high) in row["ci"].items():
                assert low - 1e-12 <= row[metric] <= high + 1e-12, (row.get("name", "base"), metric)
        for key, (low, high) in table.correlation_intervals.items():
            assert -1 <= low <= high <= 1
        widths.append(np.mean([r["ci"]["mean_kl"][1] - r["ci"]["mean_kl"][0] for r in table.rows]))
        # the same draws give the same intervals: reproducible
        again, _ = bootstrap(parse_sweep("delete-one", LAYERS), table.importance, table.rows, table.base)
        assert again[1] == table.rows[0]["ci"]
    assert widths[1] < widths[0]
