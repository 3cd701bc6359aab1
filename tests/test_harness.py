"""expand as an lm-evaluation-harness backend, against lm-eval's own Hugging Face backend (PyTorch) on the
materialized model: the local multiple-choice and perplexity tasks of tests/data/lm_eval (no hub).

Tolerances (fp32): a multiple-choice request's log-likelihood (a few tokens) within 1e-4 of the HF
backend's; a perplexity document's (a sum of n token log-probs, both backends summing in float32) within
1e-4 per token, n x 1e-4; acc and acc_norm identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("lm_eval")

import expand  # noqa: E402
from expand.harness import ExpandLM, bucket_length, evaluate  # noqa: E402
from expand.model import TRACE_COUNTS  # noqa: E402
from tests.helpers import make_hf_checkpoint  # noqa: E402
from tests.tiny_tokenizer import DATA, VOCAB_SIZE, save_tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).parents[1]
TASKS = ["expand_mc", "expand_text"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny random Llama (4 layers) with a 300-token byte-level BPE tokenizer, saved by transformers."""
    path = make_hf_checkpoint(tmp_path_factory.mktemp("tiny_lm") / "model", vocab_size=VOCAB_SIZE)
    return save_tiny_tokenizer(path)


def hf_results(path: Path, limit=None) -> dict:
    """lm-eval's HF backend on a model directory, fp32 on the CPU."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(path), dtype="float32", batch_size=4, device="cpu")
    return simple_evaluate(model=lm, tasks=TASKS, task_manager=TaskManager(include_path=str(DATA)), limit=limit,
                           log_samples=True, bootstrap_iters=0)


def per_request(results: dict, task: str) -> list[tuple[float, bool | None]]:
    """(log-likelihood, is_greedy or None for rolling) of every request of a task, in document order."""
    out = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for response in sample["resps"]:
            value = response[0]
            out.append((float(value[0]), bool(value[1])) if isinstance(value, (list, tuple)) else (float(value), None))
    return out


def rolling_token_counts(tokenizer, results: dict) -> list[int]:
    samples = sorted(results["samples"]["expand_text"], key=lambda s: s["doc_id"])
    return [len(tokenizer(s["doc"]["text"])["input_ids"]) for s in samples]


def assert_same_evaluation(ours: dict, reference: dict, tokenizer) -> dict:
    """Per-request agreement and identical accuracies; returns the measured differences."""
    measured = {}
    mc, ref_mc = per_request(ours, "expand_mc"), per_request(reference, "expand_mc")
    assert len(mc) == len(ref_mc) > 0
    diffs = np.abs([a[0] - b[0] for a, b in zip(mc, ref_mc)])
    measured["mc_max_abs"] = float(diffs.max())
    assert diffs.max() <= 1e-4, diffs.max()
    assert [a[1] for a in mc] == [b[1] for b in ref_mc]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["expand_mc"][metric] == reference["results"]["expand_mc"][metric], metric
    text, ref_text = per_request(ours, "expand_text"), per_request(reference, "expand_text")
    tokens = np.asarray(rolling_token_counts(tokenizer, reference))
    per_token = np.abs([a[0] - b[0] for a, b in zip(text, ref_text)]) / tokens
    measured["text_max_abs_per_token"] = float(per_token.max())
    assert len(text) == len(ref_text) == len(tokens) > 0
    assert per_token.max() <= 1e-4, per_token.max()
    return measured


@pytest.mark.slow
def test_tiny_model_matches_hf_backend(tiny_lm):
    model = expand.load(tiny_lm)
    ours = evaluate(model, {"base": None}, TASKS, include_path=DATA, log_samples=True, bootstrap_iters=0)["base"]
    measured = assert_same_evaluation(ours, hf_results(tiny_lm), expand.load_tokenizer(tiny_lm))
    print(f"tiny model vs lm-eval's HF backend: {measured}")


@pytest.mark.slow
def test_virtual_plan_matches_hf_backend_on_materialized_model(tiny_lm, tmp_path):
    model = expand.load(tiny_lm)
    plan = expand.plan_from_layer_spec("0:3,1:4", 4)
    ours = evaluate(model, {"plan": plan}, TASKS, include_path=DATA, log_samples=True, bootstrap_iters=0)["plan"]
    grown = expand.depth_model(model, plan)
    expand.save(tmp_path / "grown", grown.config, grown.params, tokenizer_from=tiny_lm)
    assert_same_evaluation(ours, hf_results(tmp_path / "grown"), expand.load_tokenizer(tiny_lm))


@pytest.mark.slow
def test_smollm2_depth_plan_matches_hf_backend(smollm2, tmp_path):
    """SmolLM2 grown 30 -> 40 layers (0:20,10:30), run virtually, against the HF backend on the written model;
    8 questions (32 requests) and the 8 documents."""
    plan = expand.plan_from_layer_spec("0:20,10:30", 30)
    ours = evaluate(smollm2, {"plan": plan}, TASKS, include_path=DATA, limit=8, log_samples=True,
                    bootstrap_iters=0)["plan"]
    grown = expand.depth_model(smollm2, plan)
    expand.save(tmp_path / "grown", grown.config, grown.params, tokenizer_from="smollm2")
    reference = hf_results(tmp_path / "grown", limit=8)
    assert len(reference["samples"]["expand_text"]) == 8
    measured = assert_same_evaluation(ours, reference, expand.load_tokenizer("smollm2"))
    print(f"SmolLM2 0:20,10:30 vs lm-eval's HF backend: {measured}")


def test_loglikelihood_compiles_once_per_bucket(tiny_lm):
    """Requests of many lengths, batched and padded to buckets: one compilation per bucket length."""
    from lm_eval.api.instance import Instance

    lm = ExpandLM(expand.load(tiny_lm), expand.plan_from_layer_spec("3,2,1,0", 4), batch_size=4)
    words = " ".join(json.loads(line)["text"] for line in (DATA / "expand_text.jsonl").read_text().splitlines())
    requests = [Instance("loglikelihood", {}, (words[:n], " and more"), 0) for n in range(10, 400, 13)]
    lengths = {len(lm.tok_encode(r.args[0] + r.args[1])) - 1 for r in requests}
    before = TRACE_COUNTS["score_rows"]
    results = lm.loglikelihood(requests)
    buckets = {bucket_length(n, lm.max_length) for n in lengths}
    assert len(results) == len(requests) and len(lengths) > 20
    assert 1 < TRACE_COUNTS["score_rows"] - before <= len(buckets) <= 6
    again = TRACE_COUNTS["score_rows"]
    lm.loglikelihood(requests[::-1])
    assert TRACE_COUNTS["score_rows"] == again


def test_generate_until_matches_hf_backend(tiny_lm):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    prompts = ["Question: What color is the sky", "The river ran", "To make bread, mix"]
    requests = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 12, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
    ours = ExpandLM(expand.load(tiny_lm), batch_size=2).generate_until(requests)
    reference = HFLM(pretrained=str(tiny_lm), dtype="float32", batch_size=2, device="cpu").generate_until(requests)
    assert ours == reference
    assert any(len(text) > 0 for text in ours)


def test_registered_name_with_a_plan(tiny_lm):
    """lm-eval finds the backend by name (model="expand"), with the plan in model_args (a dict: lm-eval's
    argument string splits at commas, so a layer spec with commas cannot be written there)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    by_name = simple_evaluate(model="expand", model_args={"pretrained": str(tiny_lm), "layer_spec": "0:2,1:4"},
                              tasks=["expand_mc"], task_manager=TaskManager(include_path=str(DATA)), limit=4,
                              log_samples=True, bootstrap_iters=0)
    direct = evaluate(expand.load(tiny_lm), {"p": expand.plan_from_layer_spec("0:2,1:4", 4)}, ["expand_mc"],
                      include_path=DATA, limit=4, log_samples=True, bootstrap_iters=0)["p"]
    assert per_request(by_name, "expand_mc") == per_request(direct, "expand_mc")
    assert by_name["config"]["layer_map"] == "0-1, 1-3"


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m expand` with torch hidden from the interpreter: site-packages is replaced by a copy of its
    entries (links) without torch, as in a runtime install plus [eval]."""
    import site

    packages = Path(next(p for p in site.getsitepackages() if p.endswith("site-packages")))
    shadow = tmp_path / "site-packages"
    if not shadow.exists():
        shadow.mkdir()
        for entry in packages.iterdir():
            if entry.name.split("-")[0] not in ("torch", "functorch", "torchgen"):
                (shadow / entry.name).symlink_to(entry)
    code = (f"import site, sys; site.addsitedir({str(shadow)!r}); sys.path.insert(0, {str(ROOT)!r}); "
            "import importlib.util; assert importlib.util.find_spec('torch') is None; "
            "from expand.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-S", "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path)


def test_cli_several_plans_without_torch(tiny_lm, tmp_path):
    out = tmp_path / "results.json"
    result = run_cli(["eval", str(tiny_lm), "--layer-spec", "0:4", "--layer-spec", "0:2,1:4", "--tasks",
                      "expand_mc,expand_text", "--include-path", str(DATA), "--limit", "4", "--bootstrap-iters", "0",
                      "--output", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data) == ["0:4", "0:2,1:4"]
    assert set(data["0:4"]["results"]) == set(TASKS)
    assert data["0:2,1:4"]["config"]["layer_map"] == "0-1, 1-3"
    assert "0:2,1:4" in result.stdout and "acc_norm" in result.stdout


def test_cli_sweep_evaluates_base_and_every_variant(tiny_lm, tmp_path):
    from expand.cli import main

    out = tmp_path / "sweep.json"
    assert main(["eval", str(tiny_lm), "--sweep", "delete-one", "--tasks", "expand_mc", "--include-path", str(DATA),
                 "--limit", "2", "--bootstrap-iters", "0", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data) == 5 and next(iter(data)) == "base"
    assert [d["config"]["model_num_parameters"] for d in data.values()][1:] == \
        [expand.param_count(expand.read_config(tiny_lm), np.array([0, 1, 2]))] * 4


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "unknown lm-eval tasks ['no_such_task']"),
    (["--tasks", "expand_mc", "--sweep", "prune-greedy"], "run `expand ablate`"),
    (["--tasks", "expand_mc", "--layer-spec", "0:9"], "0:9"),
    (["--tasks", "expand_mc", "--layer-spec", "0:2", "--llama-pro", "6"], "give one of"),
])
def test_cli_bad_input_is_a_clear_error(tiny_lm, args, message, capsys):
    from expand.cli import main

    assert main(["eval", str(tiny_lm), "--include-path", str(DATA), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_a_mesh_equals_one_device(tiny_lm, tmp_path):
    """--mesh fsdp=2,tp=2 on 4 simulated CPU devices: the same scores as one device."""
    args = ["eval", str(tiny_lm), "--layer-spec", "0:2,1:4", "--tasks", "expand_mc,expand_text", "--include-path",
            str(DATA), "--limit", "4", "--bootstrap-iters", "0"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    scores = {}
    for name, extra in (("one", []), ("mesh", ["--mesh", "fsdp=2,tp=2"])):
        out = tmp_path / f"{name}.json"
        result = subprocess.run([sys.executable, "-m", "expand", *args, *extra, "--output", str(out)], cwd=ROOT,
                                env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        scores[name] = json.loads(out.read_text())["results"]
    assert scores["mesh"]["expand_mc"]["acc,none"] == scores["one"]["expand_mc"]["acc,none"]
    assert scores["mesh"]["expand_mc"]["acc_norm,none"] == scores["one"]["expand_mc"]["acc_norm,none"]
    np.testing.assert_allclose(scores["mesh"]["expand_text"]["bits_per_byte,none"],
                               scores["one"]["expand_text"]["bits_per_byte,none"], rtol=1e-5)
