"""Healing studies on SmolLM2-135M-Instruct, short enough for a 2-core CPU (every run: STEPS optax steps of
2 x 128 tokens, AdamW, warmup 3, cosine to lr/10). Training rows are windows of the Python Language Reference
(`expand.text.python_reference_text`) after its first 32 x 512 tokens; the held-out set is 4 x 256 tokens of
the same text from before them, where each model is compared with the base (expand.check: mean KL, top-1)
and its own LM loss is measured, before and after healing.

    width        SmolLM2 widened 576 -> 768 (12/4 heads, MLP 2048) with the self-donor (SmolLM2 tiled x2):
                 exact vs frankenllama block-diagonal vs block-triangular, trained on LM + KL to the base;
                 loss curves at equal steps and how far the new blocks moved
    self-merge   the 50-layer self-merge 0:10,5:15,10:20,15:25,20:30: distillation vs LM only, shared (lr/k)
                 vs decoupled, all layers vs new layers only vs gates
    pruned       layers 20-24 removed (25 layers): distillation vs LM only
    progressive  30 -> 40 layers with identity copies (LLaMA-Pro), all at once vs two stages of 5 layers,
                 equal total steps
    gate-lr      the self-merge's gated run again with the gates' own learning rate (1e-2, 50 x lr)
    control      the base itself, no surgery, trained the same way (LM + KL): what the training text alone
                 does to the held-out numbers

    python experiments/healing/run.py [width self-merge pruned progressive gate-lr control]    # default: all
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import expand
from expand.heal import HealOptions, heal
from expand.model import lm_loss
from expand.surgery.grow import widen_model
from expand.text import python_reference_text, token_batch

HERE = Path(__file__).parent
STEPS, LR = 30, 2e-4
OPTIONS = dict(steps=STEPS, lr=LR, warmup=3, batch_size=2, checkpoint_every=STEPS)
SELF_MERGE = "0:10,5:15,10:20,15:25,20:30"
WIDTH = dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048)
DOUBLE = dict(hidden_size=1152, num_attention_heads=18, num_key_value_heads=6, intermediate_size=3072)


def data(base):
    """(training rows (S, 129), held-out rows (4, 256))."""
    ids = token_batch(base, python_reference_text(), 128, None).reshape(-1)
    held_out = ids[:1024].reshape(4, 256)
    train = ids[32 * 512:]
    rows = len(train) // 129
    return train[:rows * 129].reshape(rows, 129), held_out


def measure(base, candidate, held_out) -> dict:
    """Held-out mean KL to the base, top-1 agreement, and the candidate's own LM loss."""
    report = expand.check(base, candidate, tokens=held_out)
    if isinstance(candidate, expand.LayerPlan):
        loss = lm_loss(base.params, held_out, base.config, layer_ids=candidate.layer_ids,
                       slot_scales=candidate.slot_scales())
    else:
        loss = lm_loss(candidate.params, held_out, candidate.config)
    return {"mean_kl": report.mean_kl, "top1": report.top1_agreement, "loss": float(loss)}


def run(base, name, model, plan, rows, held_out, teacher, **options) -> dict:
    start = time.perf_counter()
    before = measure(base, plan if plan is not None else model, held_out)
    result = heal(model, rows, plan, teacher=teacher, options=HealOptions(**OPTIONS, **options))
    after = measure(base, result.export(), held_out)
    print(f"{name:55s} KL {before['mean_kl']:.4f} -> {after['mean_kl']:.4f}  loss {before['loss']:.3f} -> "
          f"{after['loss']:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"name": name, "options": options, "before": before, "after": after,
            "curve": [{k: h[k] for k in ("step", "loss", "lm", "kl")} for h in result.history],
            "result": result}


def width_study(base, train, held_out):
    donor = widen_model(base, **DOUBLE, mode="duplicate")
    runs = []
    for label, mode, triangular in [("exact", "exact", False), ("frankenllama block-diagonal", "frankenllama", False),
                                    ("frankenllama triangular", "frankenllama", True)]:
        wide = widen_model(base, **WIDTH, donor=donor, mode=mode, triangular=triangular)
        r = run(base, f"width 768, {label}", wide, None, train, held_out, base)
        r["new_block_change"] = new_block_change(base.config.hidden_size, wide, r.pop("result"))
        runs.append(r)
    return runs


def new_block_change(d: int, wide, result) -> dict:
    """Max |change| over the run of the weights that write the new residual coordinates (embed_tokens
    columns >= d, o_proj and down_proj outputs >= d): 0 means the new width never trained."""
    healed = result.export().params
    names = ("embed_tokens.weight", "layers.self_attn.o_proj.weight", "layers.mlp.down_proj.weight")
    return {name: float(np.abs(np.asarray(healed[name])[..., d:] - np.asarray(wide.params[name])[..., d:]).max())
            for name in names}


def self_merge_study(base, train, held_out):
    plan = expand.plan_from_layer_spec(SELF_MERGE, 30)
    configs = [("distill + LM, shared (lr/k), all layers", {}),
               ("LM only, shared (lr/k), all layers", {"teacher": None}),
               ("distill + LM, decoupled, all layers", {"shared": "decoupled"}),
               ("distill + LM, decoupled, new layers only", {"shared": "decoupled", "train": "new"}),
               ("distill + LM, gates on new slots, new layers only", {"shared": "decoupled", "train": "new",
                                                                      "gates": True})]
    runs = []
    for name, options in configs:
        teacher = options.pop("teacher", base)
        r = run(base, f"self-merge 50 layers: {name}", base, plan, train, held_out, teacher, **options)
        r.pop("result")
        runs.append(r)
    return runs


def pruned_study(base, train, held_out):
    plan = expand.plan_from_layer_spec("0:20,25:", 30)
    runs = []
    for name, teacher in [("distill + LM", base), ("LM only", None)]:
        r = run(base, f"pruned 25 layers: {name}", base, plan, train, held_out, teacher)
        r.pop("result")
        runs.append(r)
    return runs


def progressive_study(base, train, held_out):
    """All at once (30 -> 40, STEPS steps) vs two stages (30 -> 35 -> 40, STEPS / 2 steps each)."""
    half = dict(OPTIONS, steps=STEPS // 2, checkpoint_every=STEPS // 2)
    once = run(base, "all at once 30 -> 40 (identity copies)", base, expand.llama_pro_plan(30, 40), train,
               held_out, base)
    once.pop("result")
    first = heal(base, train, expand.llama_pro_plan(30, 35), teacher=base, options=HealOptions(**half))
    stage = first.export()
    second = heal(stage, train[half["steps"] * half["batch_size"]:], expand.llama_pro_plan(35, 40), teacher=base,
                  options=HealOptions(**half))
    final = second.export()
    after = measure(base, final, held_out)
    curve = [{k: h[k] for k in ("step", "loss", "lm", "kl")} for h in first.history] + \
        [{"step": h["step"] + STEPS // 2, **{k: h[k] for k in ("loss", "lm", "kl")}} for h in second.history]
    print(f"{'progressive 30 -> 35 -> 40':55s} KL -> {after['mean_kl']:.4f}  loss -> {after['loss']:.3f}", flush=True)
    return [once, {"name": "progressive 30 -> 35 -> 40 (identity copies)", "after": after, "curve": curve}]


def gate_lr_study(base, train, held_out):
    plan = expand.plan_from_layer_spec(SELF_MERGE, 30)
    r = run(base, "self-merge 50 layers: distill + LM, gates (gate lr 1e-2) on new slots, new layers only", base,
            plan, train, held_out, base, shared="decoupled", train="new", gates=True, gate_lr=1e-2)
    r["gates"] = [float(g) for g in np.asarray(r.pop("result").params["gates"])]
    return [r]


def control_study(base, train, held_out):
    r = run(base, "base 30 layers, no surgery: distill + LM", base, None, train, held_out, base)
    r.pop("result")
    return [r]


STUDIES = {"width": width_study, "self-merge": self_merge_study, "pruned": pruned_study,
           "progressive": progressive_study, "gate-lr": gate_lr_study, "control": control_study}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = [s for s in STUDIES if s in results]
    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 4), squeeze=False)
    for ax, study in zip(axes[0], studies):
        for r in results[study]["runs"]:
            ax.plot([c["step"] for c in r["curve"]], [c["lm"] for c in r["curve"]], label=r["name"].split(": ")[-1])
        ax.set_title(study)
        ax.set_xlabel("step")
        ax.set_ylabel("LM loss of each training batch (2 x 128 tokens)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(names: list[str]) -> None:
    unknown = set(names) - set(STUDIES)
    if unknown:
        sys.exit(f"unknown studies {sorted(unknown)}; choose from {', '.join(STUDIES)}")
    base = expand.load("smollm2")
    train, held_out = data(base)
    results_file = HERE / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results["setup"] = {"steps": STEPS, "lr": LR, "batch": [2, 128], "train_rows": list(train.shape),
                        "held_out": list(held_out.shape), "base_held_out": measure(base, base, held_out),
                        "device": "CPU, 2 cores (no GPU lent)"}
    for name in names or list(STUDIES):
        start = time.perf_counter()
        results[name] = {"runs": STUDIES[name](base, train, held_out), "wall_s": round(time.perf_counter() - start)}
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        plot(results, HERE / "loss_curves.png")


if __name__ == "__main__":
    main(sys.argv[1:])
