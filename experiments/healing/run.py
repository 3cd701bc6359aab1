"""Healing studies on SmolLM2-135M-Instruct, each setting run with three seeds (the order the training
windows are visited in), every number measured on held-out text only. Every run: STEPS steps of 2 x 128
tokens with expand.heal's defaults (distillation: KL(base || model) alone; the learning rate and warmup
that experiments/healing/sweep.py chose), judged every 10 steps on 4 x 256 held-out tokens (mean KL to the
base, top-1 agreement with it, the model's own LM loss). Training windows and held-out windows come from
the Python Language Reference (see common.data).

    width        SmolLM2 widened 576 -> 768 (12/4 heads, MLP 2048) with the self-donor (SmolLM2 tiled x2):
                 exact vs frankenllama block-diagonal vs block-triangular; how far the new blocks moved
    self-merge   the 50-layer self-merge 0:10,5:15,10:20,15:25,20:30: distillation vs LM only, shared (lr/k)
                 vs decoupled; gates on the new slots (own learning rate 1e-2, LM + KL), new layers only
    pruned       layers 20-24 removed (25 layers): how much distillation brings back
    progressive  30 -> 40 layers with identity copies (LLaMA-Pro), all at once vs two stages of 5 layers,
                 equal total steps

    python -m experiments.healing.run [width self-merge pruned progressive]    # default: all four
"""

from __future__ import annotations

import sys
import time

import numpy as np

import expand
from expand.io.embedded import cache_dir
from expand.surgery.grow import widen_model
from experiments.benchlib import write_json
from experiments.healing.common import HERE, SEEDS, compare, data, load_results, run, settings, texts

STEPS = 30
OPTIONS = dict(steps=STEPS, batch_size=2, eval_every=10, checkpoint_every=STEPS)
SELF_MERGE = "0:10,5:15,10:20,15:25,20:30"
WIDTH = dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048)
DOUBLE = dict(hidden_size=1152, num_attention_heads=18, num_key_value_heads=6, intermediate_size=3072)
LM_ONLY = {"lm_weight": 1.0, "distill_weight": 0.0}  # with the base as teacher only to be judged against it


def width_study(base, train, held_out):
    donor = widen_model(base, **DOUBLE, mode="duplicate")
    runs = []
    for label, mode, triangular in [("exact", "exact", False), ("frankenllama block-diagonal", "frankenllama", False),
                                    ("frankenllama block-triangular", "frankenllama", True)]:
        wide = widen_model(base, **WIDTH, donor=donor, mode=mode, triangular=triangular)
        for seed in SEEDS:
            record, result = run(f"width 768, {label}", wide, None, train, held_out, base, OPTIONS, seed)
            record["new_block_change"] = new_block_change(base.config.hidden_size, wide, result)
            runs.append(record)
    summary = settings(runs)
    names = list(summary)
    return {"runs": runs, "settings": summary,
            "comparisons": [compare(summary, names[1], names[2], k) for k in ("kl", "top1", "lm")] +
                           [compare(summary, names[0], names[2], k) for k in ("kl", "lm")]}


def new_block_change(d: int, wide, result) -> dict:
    """Max |change| over the run of the weights that write the new residual coordinates (embed_tokens
    columns >= d, o_proj and down_proj outputs >= d): 0 means the new width never trained."""
    healed = result.export().params
    names = ("embed_tokens.weight", "layers.self_attn.o_proj.weight", "layers.mlp.down_proj.weight")
    return {name: float(np.abs(np.asarray(healed[name])[..., d:] - np.asarray(wide.params[name])[..., d:]).max())
            for name in names}


SELF_MERGE_SETTINGS = [
    ("distill, shared (lr/k), all layers", {}),
    ("LM only, shared (lr/k), all layers", LM_ONLY),
    ("distill, decoupled, all layers", {"shared": "decoupled"}),
    # gates at 0 make the grown model the base itself (KL 0, zero gradient): distillation alone would leave
    # it there, so the gated run trains on LM + KL, the objective that gives the gates a reason to open
    ("LM + KL, gates (gate lr 1e-2) on new slots, new layers only",
     {"shared": "decoupled", "train": "new", "gates": True, "gate_lr": 1e-2, "lm_weight": 1.0}),
]


def self_merge_study(base, train, held_out):
    plan = expand.plan_from_layer_spec(SELF_MERGE, 30)
    runs = []
    for label, options in SELF_MERGE_SETTINGS:
        for seed in SEEDS:
            record, result = run(f"self-merge 50 layers: {label}", base, plan, train, held_out, base,
                                 {**OPTIONS, **options}, seed)
            if "gates" in result.params:
                record["gates"] = [float(g) for g in np.asarray(result.params["gates"])]
            runs.append(record)
    summary = settings(runs)
    n = list(summary)
    pairs = [(n[0], n[1]), (n[0], n[2])]
    return {"runs": runs, "settings": summary,
            "comparisons": [compare(summary, a, b, k) for a, b in pairs for k in ("kl", "top1", "lm")]}


def pruned_study(base, train, held_out):
    plan = expand.plan_from_layer_spec("0:20,25:", 30)
    runs = [run("pruned 25 layers: distill", base, plan, train, held_out, base, OPTIONS, seed)[0] for seed in SEEDS]
    return {"runs": runs, "settings": settings(runs), "comparisons": []}


def progressive_study(base, train, held_out):
    """All at once (30 -> 40, STEPS steps) vs two stages (30 -> 35 -> 40, STEPS / 2 steps each; the second
    stage trains on the windows after those of the first)."""
    half = dict(OPTIONS, steps=STEPS // 2, checkpoint_every=STEPS // 2, eval_every=5)
    runs = []
    for seed in SEEDS:
        runs.append(run("40 layers (identity copies), all at once", base, expand.llama_pro_plan(30, 40), train,
                        held_out, base, OPTIONS, seed)[0])
    for seed in SEEDS:
        first, stage = run("stage 30 -> 35", base, expand.llama_pro_plan(30, 35), train, held_out, base, half, seed)
        second, _ = run("stage 35 -> 40", stage.export(), expand.llama_pro_plan(35, 40), train[len(train) // 2:],
                        held_out, base, half, seed)
        runs.append({"name": "40 layers (identity copies), progressive 30 -> 35 -> 40", "seed": seed,
                     "before": first["before"], "after": second["after"],
                     "held_out": first["held_out"] + [dict(e, step=e["step"] + STEPS // 2) for e in second["held_out"][1:]],
                     "curve": first["curve"] + [dict(c, step=c["step"] + STEPS // 2) for c in second["curve"]],
                     "stages": [first["options"], second["options"]], "wall_s": first["wall_s"] + second["wall_s"]})
    summary = settings(runs)
    a, b = list(summary)
    return {"runs": runs, "settings": summary, "comparisons": [compare(summary, a, b, k) for k in ("kl", "top1", "lm")]}


STUDIES = {"width": width_study, "self-merge": self_merge_study, "pruned": pruned_study,
           "progressive": progressive_study}


def plot(results: dict, path) -> None:
    """Per study: held-out KL to the base against step, the mean over seeds with the min..max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = [s for s in STUDIES if s in results]
    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 4.2), squeeze=False)
    for ax, study in zip(axes[0], studies):
        runs = results[study]["runs"]
        for name in results[study]["settings"]:
            chosen = [r for r in runs if r["name"] == name]
            steps = [e["step"] for e in chosen[0]["held_out"]]
            values = np.array([[e["kl"] for e in r["held_out"]] for r in chosen])
            line, = ax.plot(steps, values.mean(0), "o-", label=name.split(": ")[-1], markersize=3)
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
        ax.set(title=study, xlabel="step", ylabel="held-out KL to the base (4 x 256 tokens)", yscale="log")
        ax.legend(fontsize=6)
    fig.suptitle(f"mean over seeds {', '.join(map(str, SEEDS))}; band: min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(names: list[str]) -> None:
    import jax

    unknown = set(names) - set(STUDIES)
    if unknown:
        sys.exit(f"unknown studies {sorted(unknown)}; choose from {', '.join(STUDIES)}")
    # runs that differ only in their seed compile the same step: reuse it across runs and invocations
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax-compilation"))
    base = expand.load("smollm2")
    train, held_out = data(base)
    results_file = HERE / "results.json"
    results = load_results(results_file)
    defaults = expand.HealOptions()
    results["setup"] = {"steps": STEPS, "batch": [2, 128], "seeds": list(SEEDS), "lr": defaults.lr,
                        "warmup": defaults.warmup, "objective": "KL(base || model) unless a run says otherwise",
                        "train_rows": list(train.shape), "held_out": list(held_out.shape),
                        "device": "CPU, 2 cores (no GPU lent)"}
    results["texts"] = texts()
    for name in names or list(STUDIES):
        start = time.perf_counter()
        results[name] = {**STUDIES[name](base, train, held_out), "wall_s": round(time.perf_counter() - start)}
        write_json(results_file, results)
        plot(results, HERE / "loss_curves.png")


if __name__ == "__main__":
    main(sys.argv[1:])
